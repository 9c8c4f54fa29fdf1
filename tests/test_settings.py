"""The one settings model: LAZYCLUSTER_* variables, read when asked, bad values named."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from lazycluster_tasks.dask_options import DaskOptions
from lazycluster_tasks.settings import settings


def test_variables_are_read_when_asked(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("LAZYCLUSTER_MAIN_DIR", str(tmp_path))
    monkeypatch.delenv("LAZYCLUSTER_STATE_DIR", raising=False)
    monkeypatch.setenv("LAZYCLUSTER_SSH_CONFIG_RESOLVER", " Paramiko ")
    found = settings()
    assert found.state_directory == os.path.join(str(tmp_path), "clusters")
    assert found.ssh_config_resolver == "paramiko"
    monkeypatch.setenv("LAZYCLUSTER_SSH_CONFIG_RESOLVER", "")
    assert settings().ssh_config_resolver is None


def test_dashboard_default_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAZYCLUSTER_DASHBOARD", "true")
    assert DaskOptions().dashboard is True
    monkeypatch.setenv("LAZYCLUSTER_DASHBOARD", "false")
    assert DaskOptions().dashboard is False
    assert DaskOptions(dashboard=True).dashboard is True  # a cluster's own choice wins


def test_a_bad_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAZYCLUSTER_DASHBOARD", "sometimes")
    with pytest.raises(ValidationError, match="dashboard"):
        settings()


def test_a_port_range_is_the_default_port_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAZYCLUSTER_PORTS", " 61000-61003 ")
    assert settings().port_list(range(1, 3)) == [61000, 61001, 61002, 61003]
    monkeypatch.delenv("LAZYCLUSTER_PORTS")
    assert settings().port_list(range(1, 3)) == [1, 2]
    for bad in ("61000", "a-b", "9-1", "0-10", "60000-70000"):
        monkeypatch.setenv("LAZYCLUSTER_PORTS", bad)
        with pytest.raises(ValidationError, match="ports"):
            settings()


def test_the_python_api_reads_the_ssh_config_the_cli_reads(tmp_path, monkeypatch) -> None:
    from lazycluster_tasks.ssh_settings import resolve_settings

    config = tmp_path / "site_config"
    config.write_text("Host node7\n    HostName 10.9.8.7\n    Port 2207\n    User alice\n")
    monkeypatch.setenv("LAZYCLUSTER_SSH_CONFIG", str(config))
    found = resolve_settings("node7")
    assert (found.hostname, found.port, found.username) == ("10.9.8.7", 2207, "alice")
    given = tmp_path / "given_config"  # a path given wins over the variable
    given.write_text("Host node7\n    HostName 10.9.8.8\n")
    assert resolve_settings("node7", str(given)).hostname == "10.9.8.8"
    monkeypatch.setenv("LAZYCLUSTER_SSH_CONFIG", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"ssh config file not found: .*missing"):
        resolve_settings("node7")

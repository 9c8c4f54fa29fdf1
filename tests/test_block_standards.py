"""Prefect's own standard tests for integration blocks, run on both of ours.

The logo test opens the block's logo URL. This machine has no network, so the file that URL names
(``docs/logo.png`` of this repository) is served from the checkout on 127.0.0.1 for that one
test, and a second test checks the URL really names that file.
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from importlib.metadata import metadata
from pathlib import Path

import pytest
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from lazycluster_tasks.prefect import blocks
from lazycluster_tasks.prefect.blocks import HostGroupBlock, SSHSettingsBlock

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkout_server() -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(ROOT))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, name="checkout-http")
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            thread.join(5)


class _Standard(BlockStandardTestSuite):
    def test_has_a_valid_image(  # type: ignore[override]
        self, block: type[Block], checkout_server: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = str(block._logo_url).removeprefix(f"{blocks.PROJECT_URL}/raw/main/")
        monkeypatch.setattr(block, "_logo_url", f"{checkout_server}/{path}")
        super().test_has_a_valid_image(block)


class TestSSHSettingsBlock(_Standard):
    @pytest.fixture
    def block(self) -> type[Block]:
        return SSHSettingsBlock


class TestHostGroupBlock(_Standard):
    @pytest.fixture
    def block(self) -> type[Block]:
        return HostGroupBlock


class TestSSHCommand(_Standard):
    @pytest.fixture
    def block(self) -> type[Block]:
        from lazycluster_tasks.prefect.shell import SSHCommand

        return SSHCommand


def test_logo_and_documentation_urls_name_this_project() -> None:
    # as installed (pyproject.toml's [project.urls]): what PyPI and `pip show` print
    urls = dict(u.split(", ", 1) for u in metadata("lazycluster-tasks").get_all("Project-URL"))
    assert urls["Homepage"] == blocks.PROJECT_URL
    assert urls["Documentation"] == blocks.DOCUMENTATION_URL
    for block in (SSHSettingsBlock, HostGroupBlock):
        assert str(block._documentation_url) == blocks.DOCUMENTATION_URL
        assert str(block._logo_url) == blocks.LOGO_URL
    logo = blocks.LOGO_URL.removeprefix(f"{blocks.PROJECT_URL}/raw/main/")
    assert (ROOT / logo).is_file(), f"{logo} is not in the repository"


def test_every_parameter_of_our_flows_and_tasks_is_described_in_the_ui() -> None:
    """Prefect shows a flow's or task's parameter descriptions from its docstring's Args."""
    from prefect.utilities.callables import parameter_schema

    from lazycluster_tasks import prefect as ours
    from lazycluster_tasks.prefect.flows import teardown_run_clusters
    from lazycluster_tasks.prefect.shell import ssh_command

    names = [n for n in ours.__all__ if hasattr(getattr(ours, n), "fn")]
    assert {"cluster_lifecycle", "launch_master", "check_runtimes"} <= set(names)
    for item in [*(getattr(ours, n) for n in names), teardown_run_clusters, ssh_command]:
        properties = parameter_schema(item.fn).model_dump()["properties"]
        missing = [p for p, about in properties.items() if not about.get("description")]
        assert not missing, (item.name, missing)

"""Prefect blocks and artifacts of lazycluster_tasks, against a real (test harness) Prefect API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
from typing import Any
from uuid import UUID

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)
from prefect.client.schemas.objects import Artifact
from prefect.exceptions import ObjectNotFound
from pydantic import SecretStr, ValidationError

from lazycluster_tasks.prefect.artifacts import (
    WorkerProgress,
    artifact_key,
    cluster_markdown,
    flush,
    hosts_table,
    publish_cluster_markdown,
    publish_hosts_table,
)
from lazycluster_tasks.prefect.blocks import (
    DOCUMENTATION_URL,
    LOGO_URL,
    HostGroupBlock,
    SSHSettingsBlock,
)
from lazycluster_tasks.testing.helpers import QUIET_ENV

pytestmark = pytest.mark.slow

SECRETS = ("KEY-TEXT-s3cret", "PASSWORD-s3cret", "PASSPHRASE-s3cret")
SLUGS = ("lazycluster-ssh-settings", "lazycluster-host-group")

RECORD: dict[str, Any] = {
    "cluster_id": "ab12cd34ef56",
    "state": "running",
    "network_mode": "tunnelled",
    "hosts": [
        {
            "name": "host1",
            "ssh_config_path": "/x/config",
            "connection_kwargs": {},
            "python_executable": "/v/bin/python",
        }
    ],
    "scheduler_host": None,
    "scheduler_address": "tcp://127.0.0.1:8786",
    "dashboard_link": "http://127.0.0.1:40000/status",
    "processes": [
        {
            "host": "localhost",
            "name": "scheduler",
            "role": "master",
            "pid": 123,
            "pid_file": "/f/scheduler.pid",
            "log_file": "/f/scheduler.log",
            "ports": [8786],
        },
        {
            "host": "host1",
            "name": "host1-0",
            "role": "worker",
            "pid": 456,
            "pid_file": "/f/w.pid",
            "log_file": "/f/w.log",
            "ports": [60001, 60002],
        },
    ],
    "folders": {"(controller)": {"folder": "/f", "working_dir": "/w", "temporary": True}},
    "tunnels": [{"host": "host1", "kind": "-R", "local_port": 8786, "remote_port": 8786}],
}


@pytest.fixture
def api_url(prefect_api: str) -> str:
    """The session's Prefect test server."""
    return prefect_api


def full_ssh_block() -> SSHSettingsBlock:
    return SSHSettingsBlock(
        user="alice",
        private_key=SecretStr(SECRETS[0]),
        private_key_path="/keys/id_ed25519",
        password=SecretStr(SECRETS[1]),
        key_passphrase=SecretStr(SECRETS[2]),
        known_hosts_policy="auto-add",
        known_hosts_path="/keys/known_hosts",
        ssh_config_path="/keys/config",
        jump_host="bob@bastion:2222",
        connect_timeout=7.5,
    )


FULL_KWARGS = {
    "username": "alice",
    "private_key": SECRETS[0],
    "key_filename": "/keys/id_ed25519",
    "password": SECRETS[1],
    "passphrase": SECRETS[2],
    "host_key_policy": "auto-add",
    "known_hosts": "/keys/known_hosts",
    "proxy_jump": "bob@bastion:2222",
    "connect_timeout": 7.5,
}


def load_ssh(name: str) -> SSHSettingsBlock:
    block = SSHSettingsBlock.load(name)  # typed "Self | Coroutine": async_dispatch
    assert isinstance(block, SSHSettingsBlock)
    return block


def load_group(name: str) -> HostGroupBlock:
    block = HostGroupBlock.load(name)
    assert isinstance(block, HostGroupBlock)
    return block


def read_artifact(key: str) -> Artifact:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert len(found) == 1, found
    return found[0]


# -- registration (first: later saves register the types too) --------------------------------


def test_cli_registers_both_block_types(api_url: str) -> None:
    with get_client(sync_client=True) as client:
        for slug in SLUGS:  # start from "not registered", whatever ran before
            with contextlib.suppress(ObjectNotFound):
                client.delete_block_type(client.read_block_type_by_slug(slug).id)
            with pytest.raises(ObjectNotFound):
                client.read_block_type_by_slug(slug)

    env = {**os.environ, **QUIET_ENV, "PREFECT_API_URL": api_url}
    prefect_cli = os.path.join(os.path.dirname(sys.executable), "prefect")
    done = subprocess.run(
        [prefect_cli, "block", "register", "-m", "lazycluster_tasks"],  # the package itself
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    with get_client(sync_client=True) as client:
        ssh_type = client.read_block_type_by_slug("lazycluster-ssh-settings")
        group_type = client.read_block_type_by_slug("lazycluster-host-group")
    assert ssh_type.name == "Lazycluster SSH Settings"
    assert group_type.name == "Lazycluster Host Group"
    assert ssh_type.description and group_type.description
    for block_type in (ssh_type, group_type):  # what the UI's block catalog shows
        assert str(block_type.logo_url) == LOGO_URL
        assert str(block_type.documentation_url) == DOCUMENTATION_URL


# -- blocks: mapping and validation (pure) ---------------------------------------------------


def test_connection_kwargs_maps_every_field() -> None:
    assert full_ssh_block().connection_kwargs() == FULL_KWARGS


def test_connection_kwargs_omits_unset_fields() -> None:
    assert SSHSettingsBlock().connection_kwargs() == {"host_key_policy": "reject"}
    block = SSHSettingsBlock(user="u", password="pw", connect_timeout=3)  # type: ignore[arg-type]
    assert block.connection_kwargs() == {
        "username": "u",
        "password": "pw",
        "host_key_policy": "reject",
        "connect_timeout": 3.0,
    }


def test_connection_kwargs_are_accepted_by_resolve_settings() -> None:
    from lazycluster_tasks.ssh_settings import resolve_settings

    settings = resolve_settings("somehost", None, full_ssh_block().connection_kwargs())
    assert settings.username == "alice"
    assert settings.private_key == SECRETS[0]
    assert settings.passphrase == SECRETS[2]
    assert settings.key_filenames == ("/keys/id_ed25519",)
    assert settings.proxy_jump == "bob@bastion:2222"
    assert settings.host_key_policy == "auto-add"
    assert settings.connect_timeout == 7.5


def test_secrets_hidden_in_repr_str_and_dump() -> None:
    block = full_ssh_block()
    group = HostGroupBlock(hosts=["h1"], ssh=block)
    shown = [
        repr(block),
        str(block),
        repr(group),
        str(group),
        str(block.model_dump()),
        block.model_dump_json(),
        json.dumps(group.model_dump(mode="json")),
    ]
    for text in shown:
        for secret in SECRETS:
            assert secret not in text
    assert "alice" in repr(block)  # non-secret fields still show
    assert block.password is not None and block.password.get_secret_value() == SECRETS[1]


def test_secrets_absent_from_validation_errors() -> None:
    with pytest.raises(ValidationError) as info:
        SSHSettingsBlock(password=[SECRETS[1]], connect_timeout=-1)  # type: ignore[arg-type]
    assert "password" in str(info.value) and "connect_timeout" in str(info.value)
    assert SECRETS[1] not in str(info.value)
    with pytest.raises(ValidationError) as info:
        HostGroupBlock(hosts=["h1"], ssh={"private_key": [SECRETS[0]], "user": 5})  # type: ignore[arg-type]
    for secret in SECRETS:
        assert secret not in str(info.value)
        assert secret not in repr(info.value)


@pytest.mark.parametrize(
    ("hosts", "named"),
    [
        (["good", "bad host"], "'bad host'"),
        (["good", ""], "''"),
        (["tab\there"], "'tab\\there'"),
        ([], "at least one host"),
    ],
)
def test_host_group_rejects_bad_hosts(hosts: list[str], named: str) -> None:
    with pytest.raises(ValidationError) as info:
        HostGroupBlock(hosts=hosts)
    assert named in str(info.value)


def test_host_group_option_validation_and_cluster_options() -> None:
    with pytest.raises(ValidationError, match="workers_per_host"):
        HostGroupBlock(hosts=["h1"], workers_per_host=0)
    with pytest.raises(ValidationError, match="network_mode"):
        HostGroupBlock(hosts=["h1"], network_mode="sideways")  # type: ignore[arg-type]
    assert HostGroupBlock(hosts=["h1"]).cluster_options() == {
        "workers_per_host": 1,
        "network_mode": "auto",
        "host_links": True,
    }
    group = HostGroupBlock(
        hosts=["h1", "h2"],
        python={"h1": "/a/python", "h2": "/b/python"},
        workers_per_host=2,
        network_mode="tunnelled",
        host_links=False,  # a site whose policy is not to touch authorized_keys
    )
    assert group.cluster_options() == {
        "workers_per_host": 2,
        "network_mode": "tunnelled",
        "host_links": False,
        "python": {"h1": "/a/python", "h2": "/b/python"},
    }


def test_python_is_the_one_name_and_python_executable_still_works_warned() -> None:
    from lazycluster_tasks import LazySSHCluster

    with pytest.warns(DeprecationWarning, match="python_executable is deprecated: use python"):
        old = HostGroupBlock(hosts=["h1"], python_executable="/v/bin/python")
    assert old.python == "/v/bin/python"
    assert old.cluster_options()["python"] == "/v/bin/python"
    with pytest.warns(DeprecationWarning, match="python_executable is deprecated"):
        saved = HostGroupBlock.model_validate({"hosts": ["h1"], "python_executable": "/p"})
    assert saved.python == "/p"  # a group saved before the rename loads
    with pytest.raises(TypeError, match="got both python_executable= and python="):
        HostGroupBlock(hosts=["h1"], python="/a", python_executable="/b")
    # the cluster: warned as it starts (here stopped at once, by a wrong worker_ttl)
    with (
        pytest.warns(DeprecationWarning, match="python_executable is deprecated: use python"),
        pytest.raises(ValueError, match="worker_ttl"),
    ):
        LazySSHCluster(["h1"], python_executable="/v/bin/python", worker_ttl=-1)
    with pytest.raises(TypeError, match="got both python_executable= and python="):
        LazySSHCluster(["h1"], python="/a", python_executable="/b", worker_ttl=-1)


# -- blocks: saved and loaded through the API ------------------------------------------------


def test_ssh_block_saves_and_loads_by_name(api_url: str) -> None:
    full_ssh_block().save("ssh-full", overwrite=True)
    loaded = load_ssh("ssh-full")
    assert loaded.connection_kwargs() == FULL_KWARGS
    assert loaded.ssh_config_path == "/keys/config"

    SSHSettingsBlock(user="carol").save("ssh-full", overwrite=True)
    assert load_ssh("ssh-full").connection_kwargs() == {
        "username": "carol",
        "host_key_policy": "reject",
    }


def test_host_group_with_nested_ssh_round_trips(api_url: str) -> None:
    group = HostGroupBlock(
        hosts=["h1", "h2"],
        python="/v/bin/python",
        workers_per_host=3,
        network_mode="direct",
        ssh=full_ssh_block(),
    )
    group.save("group-inline", overwrite=True)
    loaded = load_group("group-inline")
    assert loaded.hosts == ["h1", "h2"]
    assert loaded.cluster_options() == {
        "workers_per_host": 3,
        "network_mode": "direct",
        "host_links": True,
        "python": "/v/bin/python",
    }
    assert isinstance(loaded.ssh, SSHSettingsBlock)
    assert loaded.ssh.connection_kwargs() == FULL_KWARGS

    # a saved ssh block referenced by a group
    full_ssh_block().save("ssh-shared", overwrite=True)
    HostGroupBlock(hosts=["h3"], ssh=load_ssh("ssh-shared")).save("group-ref", overwrite=True)
    ref = load_group("group-ref")
    assert ref.ssh is not None and ref.ssh.connection_kwargs() == FULL_KWARGS
    assert ref.cluster_options() == {
        "workers_per_host": 1,
        "network_mode": "auto",
        "host_links": True,
    }


def test_host_group_workers_per_host_by_host_round_trips_and_is_checked(api_url: str) -> None:
    counts = {"gpu1": 4, "cpu1": 1}
    HostGroupBlock(hosts=["gpu1", "cpu1", "cpu2"], workers_per_host=counts).save(
        "group-per-host", overwrite=True
    )
    loaded = load_group("group-per-host")
    assert loaded.workers_per_host == counts
    assert loaded.cluster_options()["workers_per_host"] == counts  # passed on as given
    with pytest.raises(ValidationError) as info:
        HostGroupBlock(hosts=["gpu1", "cpu1"], workers_per_host={"gpu1": 2, "gpu9": 1})
    assert "workers_per_host names host 'gpu9', which is not one of the hosts" in str(info.value)
    with pytest.raises(ValidationError, match=r"workers_per_host\['cpu1'\] must be >= 1, not 0"):
        HostGroupBlock(hosts=["gpu1", "cpu1"], workers_per_host={"cpu1": 0})
    with pytest.raises(ValidationError, match="workers_per_host must be >= 1, not -2"):
        HostGroupBlock(hosts=["gpu1"], workers_per_host=-2)


def test_a_host_group_gives_the_cluster_its_hosts_and_options(api_url: str) -> None:
    """The core reaches the blocks through the integration Prefect's package registers."""
    from lazycluster_tasks import integrations

    ssh = SSHSettingsBlock(ssh_config_path="/x/config", user="u")
    HostGroupBlock(hosts=["a", "b"], workers_per_host=3, network_mode="direct", ssh=ssh).save(
        "resolved-group", overwrite=True
    )
    found = integrations.resolve(None, "resolved-group", None, None, None)
    assert (found.hosts, found.ssh_config_path) == (["a", "b"], "/x/config")
    assert found.connection_kwargs["username"] == "u"
    assert found.defaults == {"workers_per_host": 3, "network_mode": "direct", "host_links": True}
    given = integrations.resolve(["c"], "resolved-group", None, "/mine", {"username": "me"})
    assert (given.hosts, given.ssh_config_path, given.connection_kwargs["username"]) == (
        ["c"],
        "/mine",
        "me",
    )


def test_blocks_load_by_name_as_flow_parameters(api_url: str) -> None:
    HostGroupBlock(hosts=["h1"], ssh=SSHSettingsBlock(user="dave")).save("group-param", True)

    @flow
    def hosts_of(name: str) -> tuple[list[str], dict[str, Any]]:
        group = load_group(name)
        assert group.ssh is not None
        return group.hosts, group.ssh.connection_kwargs()

    assert hosts_of("group-param") == (["h1"], {"username": "dave", "host_key_policy": "reject"})


# -- artifacts: pure rendering ---------------------------------------------------------------


def test_artifact_key() -> None:
    assert artifact_key("Cluster", "AB12_cd") == "cluster-ab12-cd"
    assert artifact_key("hosts table/ü!") == "hosts-table---"
    assert artifact_key("ok-1") == "ok-1"
    assert artifact_key() == ""


def test_hosts_table() -> None:
    assert hosts_table(RECORD) == [
        {
            "host": "localhost",
            "role": "master",
            "name": "scheduler",
            "pid": 123,
            "ports": "8786",
            "state": "running",
        },
        {
            "host": "host1",
            "role": "worker",
            "name": "host1-0",
            "pid": 456,
            "ports": "60001,60002",
            "state": "running",
        },
    ]
    assert hosts_table({**RECORD, "processes": []}) == []


def test_cluster_markdown() -> None:
    text = cluster_markdown(RECORD)
    for part in (
        "ab12cd34ef56",
        "tunnelled",
        "running",
        "tcp://127.0.0.1:8786",
        "[http://127.0.0.1:40000/status](http://127.0.0.1:40000/status)",
        "| host | kind | local port | remote port |",
        "| host1 | -R | 8786 | 8786 |",
    ):
        assert part in text
    bare = cluster_markdown({**RECORD, "dashboard_link": None, "tunnels": []})
    assert "no dashboard" in bare and "no tunnels" in bare
    assert "| host |" not in bare


def test_rendering_drops_secret_connection_kwargs() -> None:
    leaky = json.loads(json.dumps(RECORD))
    leaky["hosts"][0]["connection_kwargs"] = {
        "private_key": SECRETS[0],
        "password": SECRETS[1],
        "passphrase": SECRETS[2],
    }
    for proc in leaky["processes"]:
        proc["connection_kwargs"] = {"password": SECRETS[1]}
    leaky["tunnels"][0]["password"] = SECRETS[1]
    rendered = json.dumps(hosts_table(leaky)) + cluster_markdown(leaky)
    for secret in SECRETS:
        assert secret not in rendered
    assert leaky["hosts"][0]["connection_kwargs"]["password"] == SECRETS[1]  # input untouched


# -- artifacts: published in runs and read back ----------------------------------------------


def test_published_artifacts_read_back(api_url: str) -> None:
    @flow
    def publish() -> tuple[UUID, UUID, Any]:
        table_id = publish_hosts_table(RECORD, key="Hosts Table")
        markdown_id = publish_cluster_markdown(RECORD, key="cluster-md")
        progress = WorkerProgress(total=4, key="workers")
        start = read_artifact("workers").data
        progress.update(1, 4)
        worker = threading.Thread(target=progress.update, args=(3, 4))
        worker.start()
        worker.join()
        assert flush()  # progress goes out in the background, in order
        return table_id, markdown_id, start

    table_id, markdown_id, start = publish()
    assert start == 0.0

    table = read_artifact("hosts-table")
    assert table.id == table_id and table.type == "table"
    assert json.loads(str(table.data)) == hosts_table(RECORD)
    assert table.description and "ab12cd34ef56" in table.description
    assert "tunnelled" in table.description
    assert table.flow_run_id is not None

    markdown = read_artifact("cluster-md")
    assert markdown.id == markdown_id and markdown.type == "markdown"
    assert markdown.data == cluster_markdown(RECORD)

    progress = read_artifact("workers")
    assert progress.type == "progress"
    assert progress.data == 75.0
    assert progress.description == "3/4 workers registered"
    assert progress.flow_run_id == table.flow_run_id


def test_cluster_summary_is_copied_onto_the_root_flow_run(api_url: str) -> None:
    """Published from a task of a subflow, the summary also sits on the root run's own page; a
    flow run's own publication is not copied (once is enough)."""

    @task
    def in_task() -> None:
        publish_cluster_markdown(RECORD, key="nested-summary")

    @flow
    def child() -> None:
        in_task()

    @flow
    def own() -> None:
        publish_cluster_markdown(RECORD)

    @flow
    def root() -> None:
        child()

    root_state, own_state = root(return_state=True), own(return_state=True)
    assert root_state.is_completed() and own_state.is_completed()
    on_root = artifacts_of_run(root_state.state_details.flow_run_id)
    assert len(on_root) == 1, on_root  # the task's own artifact belongs to the subflow's run
    assert on_root[0].task_run_id is None and on_root[0].type == "markdown"
    assert on_root[0].data == cluster_markdown(RECORD)
    assert on_root[0].description == "Dask cluster ab12cd34ef56: running with 1 worker"
    assert read_artifact("nested-summary").flow_run_id != root_state.state_details.flow_run_id
    assert len(artifacts_of_run(own_state.state_details.flow_run_id)) == 1


def artifacts_of_run(flow_run_id: UUID | None) -> list[Artifact]:
    assert flow_run_id is not None
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def test_worker_progress_threads_and_zero_total(api_url: str) -> None:
    @flow
    def track() -> None:
        many = WorkerProgress(total=8, key="many-workers")
        threads = [threading.Thread(target=many.update, args=(n, 8)) for n in range(1, 9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        many.update(8, 8)  # the last word, whichever thread ran last
        none = WorkerProgress(total=0, key="no-workers")
        none.update(0, 0)
        assert flush()

    track()
    assert read_artifact("many-workers").data == 100.0
    assert read_artifact("no-workers").data == 100.0


def test_publish_inside_async_flow_is_synchronous(api_url: str) -> None:
    @flow
    async def publish_async() -> tuple[Any, Any]:
        progress = WorkerProgress(total=2, key="async-workers")
        progress.update(1, 2)
        assert flush()
        return publish_hosts_table(RECORD, key="async-hosts"), progress.artifact_id

    table_id, progress_id = asyncio.run(publish_async())
    assert isinstance(table_id, UUID) and isinstance(progress_id, UUID)
    assert read_artifact("async-hosts").id == table_id
    assert read_artifact("async-workers").data == 50.0


def test_a_host_group_block_gives_a_task_runner(api_url: str, multi_hosts, no_leftovers) -> None:
    """prefect#12980: the runner's configuration kept as a block."""
    from tests.prefect_jobs import fan_out

    ssh = SSHSettingsBlock(ssh_config_path=str(multi_hosts.ssh_config_path))
    HostGroupBlock(hosts=["host1", "host2"], ssh=ssh).save("runner-group", overwrite=True)
    runner = load_group("runner-group").task_runner(threads_per_worker=1)
    assert runner.cluster_kwargs == {"host_group": "runner-group", "threads_per_worker": 1}
    ran = fan_out.with_options(task_runner=runner)(2)
    assert {host for host, _ in ran} == {"host1", "host2"}
    unsaved = HostGroupBlock(hosts=["host1"], ssh=ssh, workers_per_host=2).task_runner(
        adapt_kwargs={"minimum": 1, "maximum": 2}
    )
    assert unsaved.cluster_kwargs["hosts"] == ["host1"]
    assert unsaved.cluster_kwargs["workers_per_host"] == 2
    assert unsaved.cluster_kwargs["ssh_config_path"] == str(multi_hosts.ssh_config_path)
    assert unsaved.adapt_kwargs == {"minimum": 1, "maximum": 2}


def test_a_command_on_hosts_from_a_flow_with_one_failing_host(
    api_url: str, multi_hosts, no_leftovers
) -> None:
    """prefect#4299: per-host exit codes and output as data; check=True names the failures."""
    from prefect import flow

    from lazycluster_tasks.prefect.shell import SSHCommand, ssh_command

    config = str(multi_hosts.ssh_config_path)
    line = 'echo "on $(hostname)"; test "$(hostname)" != host2'

    @flow
    def on_hosts(check: bool) -> dict:
        return ssh_command(line, ["host1", "host2"], ssh_config_path=config, check=check)

    found = on_hosts(False)
    assert found == {
        "host1": {"exit_code": 0, "output": "on host1\n"},
        "host2": {"exit_code": 1, "output": "on host2\n"},
    }
    state = on_hosts(True, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"the command failed on 1 of 2 hosts: host2: exit 1"):
        state.result()
    block = SSHCommand(
        commands=["echo first", "false", "echo never"], hosts=["host1"], ssh_config_path=config
    )
    assert block.run(check=False) == {"host1": {"exit_code": 1, "output": "first\n"}}

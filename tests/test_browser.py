"""What a user sees in a browser: the Prefect UI of a real `prefect server` after a lifecycle run,
and the Dask dashboard through the tunnel while the cluster lives (headless Debian Chromium)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import pytest
from prefect import flow

from lazycluster_tasks.prefect import ClusterHandle, cluster_lifecycle
from lazycluster_tasks.testing.prefect_server import PrefectServer

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
LOCAL = {"127.0.0.1", "localhost"}
#: Chromium stays off the network on its own (this machine's network is closed: its background
#: connections would be refused, many at a time)
QUIET_FLAGS = [
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@dataclass
class Visit:
    """What one page load showed: its text after the checks ran, and what went wrong."""

    text: str = ""
    errors: list[str] = field(default_factory=list)  # uncaught exceptions, console errors
    failed: list[str] = field(default_factory=list)  # local requests that failed or got >= 400
    outside: list[str] = field(default_factory=list)  # requests to other hosts (blocked)


def visit(url: str, ready: Callable[[Any], None], timeout_ms: int = 60_000) -> Visit:
    """Load ``url`` in a fresh headless Chromium, run ``ready(page)`` (it waits for what the page
    must show: each wait up to ``timeout_ms``, as a loaded CI machine once needed more than 30 s
    to draw a cluster run's page), and return what was seen. Requests leaving this machine are
    aborted: the test network is ours alone. Runs in its own thread so no caller's event loop is
    in the way."""
    out: Visit = Visit()
    problem: list[BaseException] = []

    def run() -> None:
        from playwright.sync_api import sync_playwright

        # Chromium leaves files of its own in its temp dir after it closed (its shared memory):
        # a folder of its own, removed once it exited
        scratch = tempfile.mkdtemp(prefix="chromium-")
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path=CHROMIUM,
                    args=["--no-sandbox", *QUIET_FLAGS],
                    env={**os.environ, "TMPDIR": scratch},
                )
                try:
                    page = browser.new_page()
                    page.set_default_timeout(timeout_ms)

                    def route(r: Any) -> None:
                        if urlparse(r.request.url).hostname in LOCAL:
                            r.continue_()
                        else:
                            out.outside.append(r.request.url)
                            r.abort()

                    page.route("**/*", route)
                    page.on("pageerror", lambda e: out.errors.append(f"uncaught: {e}"))
                    page.on(
                        "console",
                        lambda m: (
                            out.errors.append(f"console: {m.text}") if m.type == "error" else None
                        ),
                    )
                    page.on(
                        "requestfailed",
                        lambda r: (
                            out.failed.append(f"{r.url}: {r.failure}")
                            if urlparse(r.url).hostname in LOCAL
                            else None
                        ),
                    )
                    page.on(
                        "response",
                        lambda r: (
                            out.failed.append(f"{r.url}: HTTP {r.status}")
                            if r.status >= 400 and urlparse(r.url).hostname in LOCAL
                            else None
                        ),
                    )
                    page.goto(url, wait_until="load")
                    ready(page)
                    out.text = page.inner_text("body")
                finally:
                    browser.close()
        except BaseException as exc:
            problem.append(exc)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    thread = threading.Thread(target=run, name="browser")
    thread.start()
    thread.join(timeout_ms / 1000 * 3)
    assert not thread.is_alive(), f"the browser did not finish with {url}"
    if problem:
        raise problem[0]
    return out


#: Prefect's UI asks for an icon named "undefined" on flow run pages, a plain flow's too
#: (depending on how far the page rendered): its 404 is Prefect's, not ours.
PREFECT_UI_MISSING_ICON = "/ico/undefined.svg"
#: Prefect's run graph (drawn for a run with tasks, which a plain flow's page lacks) can throw
#: these while the page switches tabs under load (each seen once in a full run; the graph's
#: sprites, gone with the tab): its code, not ours.
PREFECT_UI_GRAPH_RACE = tuple(
    f"Cannot read properties of null (reading '{name}')" for name in ("position", "scale")
)


def _own_errors(seen: Visit) -> list[str]:
    """Errors that are not the browser reporting a blocked request to another host, nor the
    console's line for Prefect's own missing icon, nor its run graph's race."""
    ours = _own_failed(seen)
    return [
        e
        for e in seen.errors
        if not ("net::ERR_FAILED" in e and seen.outside)
        and not ("Failed to load resource" in e and seen.failed and not ours)
        and not (e.startswith("uncaught: ") and any(r in e for r in PREFECT_UI_GRAPH_RACE))
    ]


def _own_failed(seen: Visit) -> list[str]:
    """Local requests that failed, but for Prefect's own missing icon."""
    return [f for f in seen.failed if urlparse(f.split(": ")[0]).path != PREFECT_UI_MISSING_ICON]


@flow(name="plain")
def plain_flow() -> int:
    return 1


@pytest.fixture
def browser_ready() -> None:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")


def dashboard_job(cluster: ClusterHandle) -> dict[str, Any]:
    """A compute job that opens its own cluster's dashboard link while the cluster lives."""
    link = cluster.dashboard_link
    assert link, "the cluster has no dashboard link"

    def ready(page: Any) -> None:
        page.wait_for_selector("div.bk-Canvas, canvas, .bk-root, [class^=bk-]", state="attached")

    seen = visit(link, ready)
    return {"link": link, "title": seen.text[:200], "errors": _own_errors(seen)}


def test_the_ui_and_the_dashboard_tell_the_truth(
    browser_ready, prefect_server: PrefectServer, prefect_api, multi_hosts, no_leftovers
):
    state = cluster_lifecycle(
        job=dashboard_job,
        hosts=["host1", "host2"],
        ssh_config_path=str(multi_hosts.ssh_config_path),
        network_mode="tunnelled",
        options={"dashboard": True},
        return_state=True,
    )
    assert state.is_completed(), state
    dashboard = state.result()
    # the link is this machine's end of the tunnel, and it served bokeh's status page
    assert urlparse(dashboard["link"]).hostname == "127.0.0.1"
    assert "bokeh" not in dashboard["title"].lower(), dashboard
    assert dashboard["errors"] == [], dashboard

    # What Prefect's UI shows wrong on any flow run page (seen with a plain flow) is not ours.
    plain = plain_flow(return_state=True)
    baseline = visit(run_page(prefect_server, plain), lambda page: completed(page))

    def summary_shown(page: Any) -> None:
        completed(page)
        page.wait_for_load_state("networkidle")  # the run graph drawn before the tab switches
        page.get_by_text("Artifacts", exact=True).first.click()
        card = page.get_by_text(re.compile(r"Dask cluster \w+: stopped")).first
        card.wait_for()
        card.click()
        page.get_by_text(re.compile(r"state:\s*stopped")).first.wait_for()

    seen = visit(run_page(prefect_server, state), summary_shown)
    assert re.search(r"network mode:\s*tunnelled", seen.text), seen.text
    assert re.search(r"scheduler:\s*tls://127\.0\.0\.1:\d+", seen.text), seen.text
    assert "host1" in seen.text and "host2" in seen.text, seen.text
    assert not set(_own_errors(seen)) - set(baseline.errors), (seen.errors, baseline.errors)
    assert not set(_own_failed(seen)) - set(baseline.failed), (seen.failed, baseline.failed)


def run_page(server: PrefectServer, state: Any) -> str:
    return f"{server.ui_url}/runs/flow-run/{state.state_details.flow_run_id}"


def completed(page: Any) -> None:
    page.get_by_text("Completed").first.wait_for()

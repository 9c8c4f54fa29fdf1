"""The server-side safety net: an Automation that tears down the clusters of a flow run that
crashed or was cancelled, behind the client-side ``on_crashed``/``on_cancellation`` hooks (which
cannot run when the process running the flow was killed or lost its machine).

It reacts to ``prefect.flow-run.Crashed`` and ``prefect.flow-run.Cancelled`` of any flow run and
runs the ``teardown-run-clusters`` deployment with that run's id; for a run that launched no
cluster that run finds nothing to do. A second Automation marks a running flow run Crashed once
its heartbeats stopped (its machine was lost), so the first one reacts to that too. Create them
(idempotent: existing ones of the same names are replaced) once the deployment exists
(``prefect deploy`` or ``python -m deployments.serve``)::

    python -m deployments.automation [--deployment teardown-run-clusters/teardown-run-clusters]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import timedelta
from typing import cast
from uuid import UUID

from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, RunDeployment
from prefect.events.schemas.automations import EventTrigger, Posture

NAME = "lazycluster: tear down the clusters of crashed or cancelled runs"
SILENT_NAME = "lazycluster: a flow run without heartbeats crashed"
#: Seconds between flow run heartbeats (Prefect's default PREFECT_FLOWS_HEARTBEAT_FREQUENCY).
HEARTBEAT = 180.0
DEPLOYMENT = "teardown-run-clusters/teardown-run-clusters"
EVENTS = ("prefect.flow-run.Crashed", "prefect.flow-run.Cancelled")


def safety_net(deployment_id: UUID) -> Automation:
    """The Automation (not yet created) for the teardown deployment ``deployment_id``."""
    return Automation(
        name=NAME,
        description="Runs teardown-run-clusters for a flow run that crashed or was cancelled.",
        trigger=EventTrigger(
            expect=set(EVENTS),
            match={"prefect.resource.id": "prefect.flow-run.*"},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            RunDeployment(
                source="selected",
                deployment_id=deployment_id,
                parameters={"flow_run": "{{ event.resource.id }}"},
                job_variables=None,
            )
        ],
    )


def silent_runs(heartbeat: float = HEARTBEAT) -> Automation:
    """Crashed for a running flow run whose heartbeats stopped (its machine was lost: no
    process is left to report anything), so the safety net above reacts to it too. Flow runs
    send a heartbeat every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (180 by default);
    three missed ones mark the run."""
    ends = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    return Automation(
        name=SILENT_NAME,
        description="Marks a flow run Crashed after three missed heartbeats.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *ends},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=3 * heartbeat),
        ),
        actions=[
            ChangeFlowRunState(
                name="Crashed",
                state=StateType.CRASHED,
                message="no heartbeat: its machine was lost",
                force=False,
            )
        ],
    )


def create(deployment: str = DEPLOYMENT, heartbeat: float = HEARTBEAT) -> list[Automation]:
    """Create (or replace) both Automations; returns them as the API has them."""
    with get_client(sync_client=True) as client:
        target = client.read_deployment_by_name(deployment)
        for name in (NAME, SILENT_NAME):
            for existing in client.read_automations_by_name(name):
                client.delete_automation(existing.id)
    return [
        cast(Automation, automation.create(_sync=True))  # type: ignore[call-arg]
        for automation in (safety_net(target.id), silent_runs(heartbeat))
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deployment", default=DEPLOYMENT, help="flow-name/deployment-name")
    parser.add_argument(
        "--heartbeat",
        type=float,
        default=HEARTBEAT,
        help="the flows' PREFECT_FLOWS_HEARTBEAT_FREQUENCY (seconds)",
    )
    args = parser.parse_args(argv)
    for created in create(args.deployment, args.heartbeat):
        print(f"automation {created.id} created: {created.name}")


if __name__ == "__main__":
    main()

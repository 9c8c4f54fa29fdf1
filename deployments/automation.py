"""The server-side safety net: an Automation that tears down the clusters of a flow run that
crashed or was cancelled, behind the client-side ``on_crashed``/``on_cancellation`` hooks (which
cannot run when the process running the flow was killed or lost its machine).

It reacts to ``prefect.flow-run.Crashed`` and ``prefect.flow-run.Cancelled`` of any flow run and
runs the ``teardown-run-clusters`` deployment with that run's id; for a run that launched no
cluster that run finds nothing to do. Create it (idempotent: an existing one of the same name is
replaced) once the deployment exists (``prefect deploy`` or ``python -m deployments.serve``)::

    python -m deployments.automation [--deployment teardown-run-clusters/teardown-run-clusters]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import cast
from uuid import UUID

from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.events.actions import RunDeployment
from prefect.events.schemas.automations import EventTrigger, Posture

NAME = "lazycluster: tear down the clusters of crashed or cancelled runs"
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


def create(deployment: str = DEPLOYMENT) -> Automation:
    """Create (or replace) the Automation; returns it as the API has it."""
    with get_client(sync_client=True) as client:
        target = client.read_deployment_by_name(deployment)
        for existing in client.read_automations_by_name(NAME):
            client.delete_automation(existing.id)
    created = safety_net(target.id).create(_sync=True)  # type: ignore[call-arg]
    return cast(Automation, created)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deployment", default=DEPLOYMENT, help="flow-name/deployment-name")
    args = parser.parse_args(argv)
    created = create(args.deployment)
    print(f"automation {created.id} created: {created.name}")


if __name__ == "__main__":
    main()

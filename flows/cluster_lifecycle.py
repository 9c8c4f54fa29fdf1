"""Entry points of the library's own flows, for deployments (prefect.yaml, serve).

``cluster_lifecycle`` wraps any compute job ("module:function") in a Dask cluster on SSH hosts;
``teardown_cluster`` stops a cluster from its persisted record (e.g. after its controller died);
``teardown_run_clusters`` stops those of a flow run (what the safety-net Automation runs).
All are defined in :mod:`lazycluster_tasks.prefect.flows`.
"""

from lazycluster_tasks.prefect.flows import (
    cluster_lifecycle,
    teardown_cluster,
    teardown_run_clusters,
)

__all__ = ["cluster_lifecycle", "teardown_cluster", "teardown_run_clusters"]

"""What the Ray cluster has and can get: waiting for the autoscaler, and the settings a multi-node run needs.

A stage that asks for resources the cluster does not have right now (GPUs on a cluster whose GPU workers
start at ``min_workers: 0``, a custom resource) asks the autoscaler for them
(``ray.autoscaler.sdk.request_resources``) and waits, with a progress line, up to a bound. It fails at
once only when nothing can ever provide them:

- no autoscaler runs (a laptop, a fixed cluster): the resources the cluster has now are all it will have;
- the autoscaler (v2, the default of ``ray up`` and of KubeRay's in-tree autoscaler since Ray 2.5x) reports
  the request infeasible: no node type of the cluster has that shape.

An autoscaler v1 is not recognised (it reports neither its node types nor infeasible requests through any
API, and a local Ray runs a read-only one): there a stage fails at once, as on a fixed cluster.

Ray is imported inside the functions: the CLI reads configs without it.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Mapping

from galray.config import ConfigError
from galray.storage import split_uri

POLL_S = 1.0
PROGRESS_EVERY_S = 10.0


def _amounts(total: Mapping[str, float], bundle: Mapping[str, float]) -> str:
    return ", ".join(f"{total.get(k, 0.0):g} {k}" if total.get(k, 0.0) else f"no {k}s" for k in bundle)


def _fits(total: Mapping[str, float], bundle: Mapping[str, float], count: int) -> bool:
    return all(total.get(k, 0.0) >= v * count for k, v in bundle.items())


def autoscaler_version() -> int:
    """2 when an autoscaler v2 runs on this Ray cluster (`ray up` and KubeRay's in-tree autoscaler), else 0.

    A v1 monitor is not counted: a local Ray runs one too (a read-only provider that can add nothing), and
    v1 reports neither its node types nor infeasible requests through any API, so a wait could never be
    bounded by them; on such a cluster the resources it has now are all a stage counts on.
    """
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    return 2 if is_autoscaler_v2(fetch_from_server=True) else 0


def _infeasible(bundle: Mapping[str, float]) -> bool:
    """Whether the v2 autoscaler found that no node type can hold ``bundle`` (its infeasible constraints)."""
    import ray
    from ray._raylet import GcsClient
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    reply = GetClusterStatusReply()
    reply.ParseFromString(GcsClient(ray.get_runtime_context().gcs_address).get_cluster_status(timeout_s=10))
    for constraint in reply.autoscaling_state.infeasible_cluster_resource_constraints:
        for by_count in constraint.resource_requests:
            shape = dict(by_count.request.resources_bundle)
            if all(abs(shape.get(k, 0.0) - v) < 1e-9 for k, v in bundle.items() if v):
                return True
    return False


def _say(line: str) -> None:
    print(f"galray: {line}", file=sys.stderr, flush=True)


def await_resources(bundle: Mapping[str, float], count: int, *, timeout_s: float, field: str,
                    progress: Callable[[str], None] = _say) -> dict[str, float]:
    """The cluster's total resources once ``count`` x ``bundle`` fit in them.

    Asks the autoscaler for the bundles and waits up to ``timeout_s`` (a progress line every 10 s).
    Raises :class:`ConfigError` naming ``field`` at once when no autoscaler runs or none of its node types
    can hold the bundle, and after ``timeout_s`` when the nodes did not come.
    """
    import ray
    from ray.autoscaler.sdk import request_resources

    bundle = {k: float(v) for k, v in bundle.items() if v}
    total = ray.cluster_resources()
    if _fits(total, bundle, count):
        return total
    want = ", ".join(f"{v * count:g} {k}" for k, v in bundle.items())
    have = _amounts(total, bundle)
    version = autoscaler_version()
    if version == 0:
        raise ConfigError(field, f"needs {want} ({count} x {bundle}), but the Ray cluster has {have} and no "
                                 f"autoscaler that could add nodes; Ray would wait forever")
    request_resources(bundles=[dict(bundle)] * count)
    t0 = time.monotonic()
    last = t0
    progress(f"asked the autoscaler for {want} (the cluster has {have}); waiting up to {timeout_s:g} s")
    while True:
        time.sleep(POLL_S)
        total = ray.cluster_resources()
        if _fits(total, bundle, count):
            progress(f"the cluster has {want} after {time.monotonic() - t0:.0f} s")
            return total
        if _infeasible(bundle):
            request_resources(bundles=[])
            raise ConfigError(field, f"needs {count} x {bundle}, but no node type of this cluster has such a "
                                     f"node (the autoscaler reports the request infeasible)")
        now = time.monotonic()
        if now - t0 > timeout_s:
            request_resources(bundles=[])
            raise ConfigError(field, f"waited {timeout_s:g} s for the autoscaler to provide {want}; the cluster "
                                     f"has {_amounts(total, bundle)}")
        if now - last >= PROGRESS_EVERY_S:
            last = now
            have = _amounts(total, bundle)
            progress(f"waiting for the autoscaler: {have} of {want} ({now - t0:.0f} s of {timeout_s:g} s)")


def release_request() -> None:
    """Withdraw this job's standing request to the autoscaler (so idle nodes can go)."""
    from ray.autoscaler.sdk import request_resources

    if autoscaler_version():
        request_resources(bundles=[])


def is_multi_node() -> bool:
    """More than one node now, or an autoscaler that can add some."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive")) > 1 or autoscaler_version() > 0


def check_reachable_from_every_node(tracking_uri: str | None, storage_path: str | None) -> None:
    """On a multi-node cluster, refuse a tracking URI or storage path that only the driver's node can reach."""
    if not is_multi_node():
        return
    if tracking_uri and (tracking_uri.startswith("sqlite:") or "://" not in tracking_uri
                         or tracking_uri.startswith("file:")):
        raise ConfigError("tracking.uri", f"{tracking_uri} is a file on the driver's node, which the other nodes of "
                                          f"this multi-node Ray cluster cannot reach: run a tracking server "
                                          f"(`mlflow server`, see README \"Run on a cluster\") and give its "
                                          f"http(s):// URI with --tracking-uri or MLFLOW_TRACKING_URI")
    if storage_path and "://" not in storage_path and split_uri(storage_path)[0] == "file":
        raise ConfigError("storage_path", f"{storage_path} is a local folder, which Ray Train cannot share between "
                                          f"the nodes of this multi-node Ray cluster: use s3://bucket/prefix, or a "
                                          f"file:// URI on a filesystem every node mounts at the same path")

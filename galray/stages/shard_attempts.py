"""How many times each shard has been started, counted where the work happens, to bound retries.

Ray's own bound (``max_task_retries``) counts every failed submission of an actor call, including
the ones that never reached a replica: when a node is lost, the callers learn of it late and spend
their retries in about a second on "actor temporarily unavailable" errors against the dead address
(seen on a 2-node ``ray.cluster_utils.Cluster``: 2 of 24 shards used up 1 + 3 retries that way and
were given up although nothing was wrong with them). So Ray retries without end, and galray counts
the calls that did start: the replica asks :class:`ShardAttempts` for the attempt number before it
reads a shard, and a shard started 1 + :data:`galray.session.MAX_RETRIES` times already (it killed
its replica each time, e.g. for memory) is given up as errors rows instead of being read again.

The counter is one small actor (no CPU) pinned to the driver's node, which lives as long as the job.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


class ShardAttempts:
    """Actor: the number of times each shard has been started."""

    def __init__(self) -> None:
        self.started: Counter[str] = Counter()

    def start(self, shard: str) -> int:
        """Count one more start of ``shard``; returns its attempt number (1 for the first)."""
        self.started[shard] += 1
        return self.started[shard]


def shard_attempts_counter() -> Any:
    """A :class:`ShardAttempts` actor on this (the driver's) node, owned by the caller."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(ShardAttempts).remote()


def attempt_number(counter: Any, shard: str) -> int:
    """Count a start of ``shard`` with ``counter`` (an actor handle) and return its attempt number."""
    import ray

    return ray.get(counter.start.remote(shard))

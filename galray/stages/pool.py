"""Fixed actor pools of model replicas (`galray embed`, `galray encode`): their settings and the one sizing rule.

A pool is sized once, on the driver, and checked against the Ray cluster before anything starts.
GPUs the cluster does not have yet are asked of its autoscaler and waited for, up to ``wait_s``
(:func:`galray.cluster_resources.await_resources`); on a cluster that can never have them (no
autoscaler, or no node type with GPUs) it fails at once naming the field, instead of leaving Ray
waiting for resources that never come. So does asking for more CPUs than the cluster has.

- GPU (or custom ``resources``): ``actors`` replicas (default: as many as the cluster's GPUs and
  resources hold).
- CPU: ``actors`` replicas (default: ``cpu_share x CPUs / cpus_per_actor``, at least one). Encode
  keeps half the CPUs for the rest of the machine (cpu_share 0.5); embed's replicas read and prepare
  their own shards, so they take every CPU (cpu_share 1).

:func:`map_bounded` runs a pool of plain Ray actors over a list of inputs (`galray encode`'s shards)
with a bounded number of attempts per input; `galray embed` gets the same bound from Ray Data's own
actor pool (``max_task_retries``).

Ray is imported inside functions only (the config is read by the CLI without Ray).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from galray.config import ConfigError, check

if TYPE_CHECKING:
    import ray.actor

# Resources with their own setting (num_gpus, cpus_per_actor) or that Ray manages itself.
_BUILT_IN = ("CPU", "GPU", "memory", "object_store_memory")


@dataclass(frozen=True)
class ActorPoolConfig:
    """The fixed pool of model replicas of a stage."""

    actors: int = 0
    """Model replicas; 0: one per num_gpus GPU(s) on GPU, CPUs / (2 cpus_per_actor) on CPU."""
    num_gpus: float = 0.0
    """GPUs per replica (0: CPU). Checked against the cluster before anything starts."""
    cpus_per_actor: float = 1.0
    """CPUs Ray reserves for each replica."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each replica needs, e.g. ``{accelerator_type:A10G: 0.001}`` or a resource a
    node type of the cluster declares: places the replicas on those nodes; asked of the autoscaler and
    waited for like GPUs."""
    wait_s: float = 900.0
    """Seconds to wait for an autoscaler to add the GPUs the pool needs (a progress line every 10 s)."""

    def __post_init__(self) -> None:
        check(self.actors >= 0, "actors", "must be >= 0 (0 = size the pool to the cluster)")
        check(self.num_gpus >= 0, "num_gpus", "must be >= 0")
        check(self.cpus_per_actor > 0, "cpus_per_actor", "must be positive")
        check(self.wait_s >= 0, "wait_s", "must be >= 0")
        for name, amount in self.resources.items():
            check(name not in _BUILT_IN, f"resources.{name}", "is set by num_gpus / cpus_per_actor, not here")
            check(isinstance(amount, (int, float)) and amount > 0, f"resources.{name}", "must be a positive number")

    def ray_options(self) -> dict[str, Any]:
        """Ray's per-replica resource options (``map_batches`` and ``.options()`` take the same keys)."""
        return {"num_cpus": self.cpus_per_actor, "num_gpus": self.num_gpus or None,
                "resources": dict(self.resources) or None}


def pool_size(pool: ActorPoolConfig, field_prefix: str = "", cpu_share: float = 0.5) -> int:
    """Replicas of ``pool`` on the current Ray cluster, after checking the cluster can host them; on CPU
    the default count fills ``cpu_share`` of the CPUs. Errors name ``<field_prefix>actors`` etc."""
    import ray

    from galray.cluster_resources import await_resources
    from galray.session import ensure_ray

    ensure_ray()
    cpus = float(ray.cluster_resources().get("CPU", 0.0))
    bundle = {"GPU": pool.num_gpus, **pool.resources} if pool.num_gpus else dict(pool.resources)
    if bundle:
        name = f"{field_prefix}num_gpus" if pool.num_gpus else f"{field_prefix}resources"
        total = await_resources(bundle, max(pool.actors, 1), timeout_s=pool.wait_s, field=name)
        cpus = total.get("CPU", 0.0)
        n = pool.actors or min(int(total.get(k, 0.0) / v + 1e-9) for k, v in bundle.items())
        short = {k: v for k, v in bundle.items() if max(n, 1) * v > total.get(k, 0.0) + 1e-9}
        if n < 1 or short:
            k, v = next(iter(short.items())) if short else next(iter(bundle.items()))
            what = "GPU(s)" if k == "GPU" else k
            raise ConfigError(f"{field_prefix}actors", f"{max(n, 1)} actor(s) x {v:g} {what} need "
                              f"{max(n, 1) * v:g}, but the Ray cluster has {total.get(k, 0.0):g}")
    else:
        n = pool.actors or max(1, int(cpu_share * cpus / pool.cpus_per_actor + 1e-9))
    need = n * pool.cpus_per_actor
    if need > cpus:
        raise ConfigError(f"{field_prefix}actors", f"{n} actor(s) x {pool.cpus_per_actor:g} CPU(s) need "
                          f"{need:g} CPUs, but the Ray cluster has {cpus:g}; lower --actors or "
                          f"{field_prefix}cpus_per_actor")
    return n


def map_bounded(new_actor: Callable[[], "ray.actor.ActorHandle"], actors: int, inputs: Sequence[str],
                call: Callable[["ray.actor.ActorHandle", str], Any], retries: int) -> tuple[list[Any], list[str]]:
    """``call(actor, input)`` (an ObjectRef) for every input over a pool of ``actors`` actors made by
    ``new_actor``; returns (the results, the inputs given up).

    An actor that dies in a call (killed, e.g. for memory) is replaced by a new one, and its input
    is tried again first, ``retries`` times at most; after that the input is given up, and the others
    go on. (New actors, not Ray's restarts: Ray cannot safely restart an actor built from object-store
    arguments, ray#53727.) An exception raised in a call or in an actor's constructor is not retried: it
    propagates.
    """
    import ray
    from ray.exceptions import OutOfMemoryError, RayActorError

    queue = [(name, 0) for name in inputs]  # (input, attempts so far)
    idle = [new_actor() for _ in range(min(actors, len(queue)))]
    running: dict[Any, tuple[Any, str, int]] = {}
    results: list[Any] = []
    given_up: list[str] = []
    try:
        while queue or running:
            while idle and queue:
                actor = idle.pop()
                name, tries = queue.pop(0)
                running[call(actor, name)] = (actor, name, tries)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, name, tries = running.pop(ref)
            try:
                results.append(ray.get(ref))
                idle.append(actor)
            except (RayActorError, OutOfMemoryError) as err:
                if isinstance(err, RayActorError) and err.actor_init_failed:
                    raise  # its constructor raised: every actor would, whatever the input
                ray.kill(actor)
                idle.append(new_actor())
                if tries < retries:
                    queue.insert(0, (name, tries + 1))
                else:
                    given_up.append(name)
    finally:
        for actor in idle + [a for a, _, _ in running.values()]:
            ray.kill(actor)
    return results, given_up

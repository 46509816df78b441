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

Ray is imported inside :func:`pool_size` only (the config is read by the CLI without Ray).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from galray.config import ConfigError, check

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

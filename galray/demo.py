"""`galray demo`: the quickstart job on embedded defaults, end to end on a laptop.

Today it simulates a small survey into a local folder, writes a preview montage and prints a
summary of the store. Later stages (embedding, SAE, VQ-VAE) join it as they land.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from galray.config import check
from galray.data.simulate import SimConfig
from galray.data.store import store_summary
from galray.simulate import SimulateJob, format_summary, simulate_survey
from galray.storage import StorageConfig, join


@dataclass(frozen=True)
class DemoConfig:
    """Settings of `galray demo`."""

    out: str = "galray-demo"
    """Folder (or s3:// prefix) that receives everything the demo writes."""
    n: int = 500
    """Simulated galaxies."""
    size: int = 64
    """Cutout size in pixels."""
    seed: int = 0
    """Random seed."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage settings, when --out is s3://."""

    def __post_init__(self) -> None:
        check(self.n >= 10, "n", "must be at least 10")
        check(self.size >= 16, "size", "must be at least 16 pixels")


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo and print what it did; returns the paths it wrote."""
    store = join(cfg.out, "sim")
    preview = join(cfg.out, "sim_montage.png")
    job = SimulateJob(out=store, n=cfg.n, shard_rows=max(cfg.n // 4, 50), preview=preview,
                      sim=SimConfig(size=cfg.size, seed=cfg.seed), storage=cfg.storage)
    print(f"[1/1] simulating {cfg.n} galaxies at {cfg.size} px -> {store}")
    print(format_summary(simulate_survey(job)))
    print(store_summary(store, cfg.storage).format())
    print(f"\ndone: look at {preview}, then try `galray info {store}`")
    return {"store": store, "preview": preview}

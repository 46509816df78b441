"""Tune efficiency: the same SAE search space as a full grid run to the end and under ASHA, in one run.

Run from the repo root:  python3 bench/tune_efficiency.py --quick --json OUT.json

Both campaigns are `galray tune` campaigns (galray.stages.tune.tune) in one Ray session, on one
planted-dictionary embedding store (Zipf-distributed features, 25 % held out), over the same grid
of learning rate x k (the SAE's active latents). Trials are seeded, so one point trains the same in
both campaigns:
- grid: --scheduler none, every trial runs all its steps;
- asha: --scheduler asha with grace period one report and reduction factor 3 (the Hyperband
  papers' eta; Ray's documented default is 4). Grid points start in galray's seeded random order.
Both run one trial at a time (``max_concurrent=1``): asynchronous successive halving promotes a
trial against whatever has reported so far, so with concurrent trials its decisions, and this
figure, would depend on the machine's timing.

Compute is optimizer steps summed over trials (each trial's last reported step); the objective is
held-out FVU at each trial's last report. Writes one flat JSON object: trial_steps_grid,
trial_steps_asha, best_grid, best_asha, compute_ratio (asha / grid; target <= 0.5), best_rel_gap
(best_asha / best_grid - 1; target <= 0.05), trials, asha_stopped, asha_full_trials, steps_per_trial,
report_every, grace_period, reduction_factor, seed, wall_grid_s, wall_asha_s, wall_s (wall times
are for information: the figures are step counts, the same on any machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from galray.config import from_dict
from galray.data.shards import shard_name, write_table
from galray.data.stores import embedding_table
from galray.models.sae import planted_dictionary
from galray.stages.tune import TuneJob, tune
from galray.storage import arrow_filesystem


def write_store(uri: str, n: int, d: int, seed: int) -> None:
    """A planted-dictionary embedding store in 4 shards (256 features, 6 active, Zipf 1 with offset 4)."""
    x, _ = planted_dictionary(n, d, n_features=256, k_active=6, noise=0.02, zipf=1.0, zipf_offset=4.0, seed=seed)
    fs, root = arrow_filesystem(uri)
    fs.create_dir(root, recursive=True)
    shards = 4
    for s in range(shards):
        part = slice(s * n // shards, (s + 1) * n // shards)
        ids = np.array([f"emb-{i:06d}" for i in range(part.start, part.stop)], dtype=object)
        write_table(embedding_table(ids, x[part].numpy(), {"embedding_dim": d}), fs, f"{root}/{shard_name(s)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="12-point grid, 300 steps per trial")
    ap.add_argument("--json", type=str, default=None, help="write the JSON figures here")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data and of the grid's order")
    ap.add_argument("--reduction-factor", type=float, default=3.0)
    args = ap.parse_args()

    if args.quick:
        lrs, ks, steps = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2], [4, 16], 300
    else:
        lrs, ks, steps = [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1], [4, 8, 16], 600
    every = 25
    out = Path(tempfile.mkdtemp(prefix="tune_efficiency_"))
    write_store(str(out / "emb"), 8192, 32, args.seed)
    base = {"kind": "sae", "input": str(out / "emb"), "storage_path": str(out / "runs"), "steps": steps,
            "batch_size": 128, "val_fraction": 0.25, "register": False, "seed": args.seed,
            "sae": {"model": {"group_sizes": [32, 32, 64, 128], "k": 4}, "norm_samples": 4096},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1.0},
            "tracking": {"uri": f"sqlite:///{out}/mlflow.db", "experiment": "tune-efficiency"}}
    space = {"sae.train.lr": {"grid": lrs}, "sae.model.k": {"grid": ks}}
    tune_section = {"space": space, "report_every": every, "grace_period": every, "max_concurrent": 1,
                    "reduction_factor": args.reduction_factor, "seed": args.seed}

    figures = {}
    t_all = time.perf_counter()
    for name, scheduler in (("grid", "none"), ("asha", "asha")):
        job = from_dict(TuneJob, {**base, "name": name, "tune": {**tune_section, "scheduler": scheduler}})
        t0 = time.perf_counter()
        summary = tune(job)
        assert summary.errored == 0, summary.format()
        print(summary.format(), file=sys.stderr)
        figures[name] = summary
        figures[f"wall_{name}_s"] = time.perf_counter() - t0
    grid, asha = figures["grid"], figures["asha"]
    report = {
        "trial_steps_grid": grid.trial_steps, "trial_steps_asha": asha.trial_steps,
        "best_grid": grid.best_value, "best_asha": asha.best_value,
        "compute_ratio": asha.trial_steps / grid.trial_steps, "best_rel_gap": asha.best_value / grid.best_value - 1.0,
        "trials": grid.trials, "asha_stopped": asha.stopped, "asha_full_trials": asha.finished,
        "steps_per_trial": steps, "report_every": every, "grace_period": every,
        "reduction_factor": args.reduction_factor, "seed": args.seed,
        "wall_grid_s": figures["wall_grid_s"], "wall_asha_s": figures["wall_asha_s"],
        "wall_s": time.perf_counter() - t_all,
    }
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report))
    import ray

    ray.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

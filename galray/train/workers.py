"""The per-worker Ray Train loop, one for every kind: the kind's loop module (:mod:`galray.train.loop`'s
face, ``job.loop``) supplies the model class, optimizer, learning rate, step and evaluation.

Each Ray Train worker runs :func:`train_loop_per_worker` with the job as a plain dict, the model
config the driver resolved and the state it fitted. The loop:

1. rebuilds the model with the job's seed and gives it the driver's initial state (the SAE's
   normalisation and b_pre, so every rank starts identical), then, if Ray Train hands it a
   checkpoint (a restart after a failure, or a rerun of the same run name), loads model,
   optimizer and step from it and continues counting from there;
2. wraps the model in DDP (``ray.train.torch.prepare_model``; gloo on CPU, NCCL on GPU);
3. iterates its shard of the training split in repeated epochs (``drop_last``: every rank sees
   the same number of equal batches, so DDP's collectives always pair up) until ``steps``, setting
   ``lr_at(step)`` before each step; the step's randomness (the prior's class dropout) comes from a
   generator seeded per rank and from the step, so a restarted attempt draws afresh;
4. every ``log_every`` steps all-reduces the step statistics (mean over ranks), and rank 0 logs
   them to the MLflow run the driver opened (``run_id`` and the tracking URI are passed in, never
   taken from a worker's environment); every ``checkpoint_every`` steps and at the end, rank 0
   writes a checkpoint and every rank calls ``ray.train.report`` (it is a barrier, and each one
   waits for the controller's next poll, so the steps between checkpoints do not report to Ray);
5. at the end checks that all replicas hold the same weights (parameters and synchronised
   buffers: the VQ codebook, the SAE's statistics), and rank 0 evaluates on the validation split
   and returns metrics and figure data to the driver.

**Checkpoints**: see :mod:`galray.train.checkpoint`.

BatchNorm running statistics (VQ-VAE) are per-rank under DDP, as usual; the checkpoint holds
rank 0's.

A worker that dies (a killed process, a lost node) fails the attempt; Ray Train restarts the
group from the latest checkpoint (``FailureConfig.max_failures``). The tests kill a real worker
process from outside; there is no fault hook in this module.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from galray.config import from_dict
from galray.tracking import Tracker, TrackingConfig
from galray.train.checkpoint import checkpoint_dir_name, load_checkpoint_model, load_train_state, save_checkpoint
from galray.train.config import TrainJob
from galray.train.loop import Loop, RecentBatches, batch_rows, set_lr

# --- the model -------------------------------------------------------------------------------------

def build_model(loop: Loop, model_config: dict[str, Any], seed: int) -> nn.Module:
    """The kind's model from the driver's resolved config, with the same init on every rank
    (DDP also broadcasts rank 0's)."""
    torch.manual_seed(seed)
    return loop.MODEL(from_dict(loop.MODEL.config_class, model_config))


def _restore(model: nn.Module, init_state: dict[str, np.ndarray], checkpoint: "ray.train.Checkpoint | None"
             ) -> tuple[int, dict[str, Any] | None]:
    """(start step, training state) from the checkpoint Ray hands over if any (a restart or a rerun
    of the same run), else (0, None) with the driver's initial state copied into the fresh model."""
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            load_checkpoint_model(model, Path(d))
            state = load_train_state(Path(d))
        return int(state["step"]), state
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for name, value in init_state.items():
            named[name].copy_(torch.as_tensor(np.asarray(value)))
    return 0, None


# --- helpers ---------------------------------------------------------------------------------------

def _mean_over_ranks(stats: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    keys = sorted(stats)
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def replica_max_diff(model: nn.Module, device: torch.device) -> float:
    """Largest difference between ranks of per-tensor (sum, sum of squares) of the parameters and
    the buffers that training keeps in sync (not BatchNorm's per-rank running statistics)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0.0
    parts = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "running_" in name or "num_batches_tracked" in name:
            continue
        t = t.detach().double()
        parts += [t.sum(), t.pow(2).sum()]
    v = torch.stack(parts).to(device)
    hi, lo = v.clone(), v.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).abs().max())


# --- the loop --------------------------------------------------------------------------------------

def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point. ``config``: job (TrainJob as a dict, storage and tracking resolved),
    run_id (MLflow), model (the resolved model config as a dict) and init_state (driver-fitted tensors)."""
    job = from_dict(TrainJob, config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    run_id = config.get("run_id")
    tracker = Tracker(from_dict(TrackingConfig, config["job"]["tracking"]), run_id=run_id) if (
        rank == 0 and run_id) else None
    worker = Worker.create(job, config["model"], config.get("init_state") or {}, ray.train.get_checkpoint(),
                           ray.train.get_dataset_shard("train"), device, ray.train.torch.prepare_model, rank, world,
                           tracker, run_id, held_out=ray.train.get_dataset_shard("val"))
    step, last = worker.run()

    model, start = worker.model, worker.start
    diff = replica_max_diff(model, device)
    if rank != 0:
        return {}
    val = worker.held_out_batches
    if val is None:
        val = ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=job.batch_size, device=device)
    evaluation = job.loop.evaluate(model, val, job.eval_max_rows)
    if tracker is not None and evaluation.metrics:
        tracker.log_metrics(evaluation.metrics, step=step)
    return {"step": step, "resumed_from_step": start, "replica_max_diff": diff, "last": last,
            "eval": evaluation.metrics, "figure_data": evaluation.figure_data}


@dataclass
class Worker:
    """One rank's training: its model (bare and wrapped), optimizer, step generator and training data.

    The Ray Train worker reports through ``ray.train.report``; a Tune trial
    (:mod:`galray.train.tune_trial`) runs the same steps and overrides :meth:`_report`.
    """

    job: TrainJob
    tcfg: Any
    """The kind's TrainConfig as run (job.train_config())."""
    model: nn.Module
    ddp: nn.Module
    """The model as trained: DDP-wrapped under Ray Train, the bare model on its device in a trial."""
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    start: int
    rank: int
    world: int
    device: torch.device
    tracker: Tracker | None
    run_id: str | None
    shard: Any
    """This rank's training data: anything with Ray Data's ``iter_torch_batches`` (a Train dataset
    shard, or a whole Dataset in a single-process trial)."""
    held_out: Any = None
    """The validation split, whole on every rank (``iter_torch_batches``), or None: what the last
    checkpoint's inference statistics are calibrated on (:meth:`_calibrate`)."""
    held_out_batches: list[Any] | None = None
    """All of the validation split's batches when the last calibration read them all (the evaluation
    then uses them: each pass over a Ray dataset starts an execution, about 3 s here)."""

    @classmethod
    def create(cls, job: TrainJob, model_config: dict[str, Any], init_state: dict[str, np.ndarray],
               checkpoint: "ray.train.Checkpoint | None", shard: Any, device: torch.device,
               wrap: Callable[[nn.Module], nn.Module], rank: int = 0, world: int = 1, tracker: Tracker | None = None,
               run_id: str | None = None, **extra: Any) -> "Worker":
        """The kind's model built from ``model_config`` with the driver's ``init_state``, or restored from
        ``checkpoint`` (model, optimizer, step), then ``wrap``-ped (DDP, or moved to ``device``);
        ``extra``: a subclass's own fields."""
        tcfg = job.train_config()
        model = build_model(job.loop, model_config, job.seed)
        start, state = _restore(model, init_state, checkpoint)
        ddp = wrap(model)
        optimizer = job.loop.make_optimizer(ddp, tcfg)
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
        # The step's randomness differs per rank, and is seeded again from the step after a restart.
        generator = torch.Generator(device=device).manual_seed(tcfg.seed * 1_000_003 + rank * 7919 + start)
        return cls(job, tcfg, model, ddp, optimizer, generator, start, rank, world, device, tracker, run_id, shard,
                   **extra)

    def run(self) -> tuple[int, dict[str, float]]:
        """Steps from ``start`` to ``job.steps`` over repeated epochs of this rank's shard;
        returns (the last step, the last metrics logged)."""
        job, shard = self.job, self.shard
        calibrates = hasattr(job.loop, "calibrate")
        recent = RecentBatches(getattr(job.loop, "CALIBRATION_ROWS", 8192)) if calibrates else None
        step, epoch = self.start, 0
        # The rate is counted from the first batch: the wait for it (Ray Data starting this rank's
        # stream) is start-up, reported apart as first_batch_s. Later epochs' stream restarts count.
        t_begin, t0, first_batch_s, rows_seen = time.perf_counter(), None, 0.0, 0
        last: dict[str, float] = {}
        while step < job.steps:
            batches = 0
            seed = job.seed + 1000 * epoch + self.rank + 7 * self.start
            for batch in shard.iter_torch_batches(batch_size=job.batch_size, drop_last=True, device=self.device,
                                                  local_shuffle_buffer_size=4 * job.batch_size, local_shuffle_seed=seed):
                if t0 is None:
                    t0 = time.perf_counter()
                    first_batch_s = t0 - t_begin
                batches += 1
                lr = job.loop.lr_at(step, self.tcfg)
                set_lr(self.optimizer, lr)
                stats = job.loop.train_step(self.ddp, self.optimizer, batch, self.tcfg, self.generator)
                step += 1
                if recent is not None:
                    recent.add(batch)
                    if self._is_checkpoint(step):  # every rank: the calibration is collective
                        self._calibrate(recent, final=step >= job.steps)
                rows_seen += batch_rows(batch) * self.world
                if step % job.log_every == 0 or self._is_checkpoint(step):
                    elapsed = time.perf_counter() - t0
                    last = {**_mean_over_ranks({k: float(v) for k, v in stats.items()}, self.device), "lr": lr,
                            "samples_per_s": rows_seen / max(elapsed, 1e-9), "first_batch_s": first_batch_s,
                            "epoch": float(epoch)}
                    self._report(last, step)
                if step >= job.steps:
                    break
            if batches == 0:
                raise RuntimeError(f"the training split gives no full batch of {job.batch_size} rows per worker "
                                   f"({self.world} workers): use a smaller batch_size or more data")
            epoch += 1
        return step, last

    def _calibrate(self, recent: RecentBatches, final: bool) -> None:
        """Fit the model's inference statistics (the SAE's threshold) before a checkpoint is written, so
        every checkpoint can be used as it is. At the end, on held-out rows when there are any: after
        several epochs the model has learnt its training rows, and a threshold set on them gives unseen
        rows more active latents than k (bench/sae_quality: L0 77 at k = 64 on 3,025 real embeddings
        after 30 epochs). Every rank reads the same validation rows, so they agree on whether there are
        any, and the collective calibration gives the threshold of those rows."""
        batches = list(recent.batches)
        if final and self.held_out is not None:
            rows, val, whole = 0, [], True
            for b in self.held_out.iter_torch_batches(batch_size=self.job.batch_size, device=self.device):
                if rows >= recent.max_rows:
                    whole = False
                    break
                val.append(b)
                rows += batch_rows(b)
            self.held_out_batches = val if whole else None
            batches = val or batches
        self.job.loop.calibrate(self.model, batches)

    def _is_checkpoint(self, step: int) -> bool:
        return step % self.job.checkpoint_every == 0 or step == self.job.steps

    def _report(self, last: dict[str, float], step: int) -> None:
        """Log to MLflow (rank 0); at a checkpoint step, write the checkpoint and report it to Ray Train (a barrier)."""
        if self.tracker is not None:
            self.tracker.log_metrics(last, step=step)
        # Only checkpoint steps go to Ray Train: a report blocks its worker until the controller takes
        # the result off the worker's one-slot queue, which it does when it next polls the group (every
        # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), so a report every log step cost about 1 s
        # each (bench/train_scaling). The step metrics are in MLflow already, logged above.
        if self._is_checkpoint(step):
            metrics = {**last, "step": step, "resumed_from_step": self.start}
            _report_checkpoint(self.model, self.optimizer, self.job.kind, metrics, step, self.rank, self.run_id)


def _report_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, kind: str, metrics: dict[str, Any],
                       step: int, rank: int, run_id: str | None) -> None:
    name = checkpoint_dir_name(step)
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(model, optimizer, Path(tmp), step, kind, run_id)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)

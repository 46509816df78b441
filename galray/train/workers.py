"""Per-worker Ray Train loops for the SAE, the VQ-VAE and the prior (one function, three tasks).

Each Ray Train worker runs :func:`train_loop_per_worker` with the job as a plain dict. The loop:

1. rebuilds the model with the job's seed; the SAE also gets the normalisation and b_pre that
   the driver fitted on one sample (so every rank starts identical), then, if Ray Train hands it a
   checkpoint (a restart after a failure, or a rerun of the same run name), loads model,
   optimizer, scheduler and step from it and continues counting from there;
2. wraps the model in DDP (``ray.train.torch.prepare_model``; gloo on CPU, NCCL on GPU);
3. iterates its shard of the training split in repeated epochs (``drop_last``: every rank sees
   the same number of equal batches, so DDP's collectives always pair up) until ``steps``;
4. every ``log_every`` steps all-reduces the step statistics (mean over ranks), and rank 0 logs
   them to the MLflow run the driver opened (``run_id`` and the tracking URI are passed in, never
   taken from a worker's environment); every ``checkpoint_every`` steps and at the end, rank 0
   writes a checkpoint and every rank calls ``ray.train.report`` (it is a barrier);
5. at the end checks that all replicas hold the same weights (parameters and synchronised
   buffers: the VQ codebook, the SAE's statistics), and rank 0 evaluates on the validation split
   and returns metrics and figure data to the driver.

**Checkpoint layout** (one folder per checkpoint, ``step-00000500``): ``config.json`` +
``model.safetensors`` (galray.models.checkpoint: weights and every buffer, including the SAE's
normalisation and threshold and the VQ codebook's EMA state) and ``train_state.pt`` (optimizer
and scheduler state, step, MLflow run id), loaded with ``torch.load(weights_only=True)``.

BatchNorm running statistics (VQ-VAE) are per-rank under DDP, as usual; the checkpoint holds
rank 0's.

**Fault injection (tests only).** With ``GALRAY_TEST_FAIL_AT_STEP=N`` and
``GALRAY_TEST_FAIL_MARKER=/path`` in the workers' environment, rank ``GALRAY_TEST_FAIL_RANK``
(default: the last) raises once, before step N, and creates the marker file so the restarted
attempt does not raise again.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import Tensor, nn

from galray.config import from_dict
from galray.models.checkpoint import load_model, save_model
from galray.models.vqvae import pixels_to_model
from galray.tracking import Tracker, TrackingConfig
from galray.train.config import TrainJob

STATE_NAME = "train_state.pt"
FAIL_AT_ENV = "GALRAY_TEST_FAIL_AT_STEP"
FAIL_MARKER_ENV = "GALRAY_TEST_FAIL_MARKER"
FAIL_RANK_ENV = "GALRAY_TEST_FAIL_RANK"


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# --- the three tasks -------------------------------------------------------------------------------

class _Task:
    """What differs between kinds: the model, one optimisation step, the state beyond the model,
    and the final evaluation. ``self.model`` is the bare module; ``self.ddp`` the wrapped one."""

    model: nn.Module
    ddp: nn.Module
    optimizer: torch.optim.Optimizer

    def __init__(self, job: TrainJob, config: dict[str, Any], device: torch.device, rank: int):
        self.job, self.config, self.device, self.rank = job, config, device, rank

    def build(self) -> nn.Module:
        raise NotImplementedError

    def init_fresh(self) -> None:
        """Set up a model that starts from scratch (not from a checkpoint)."""

    def make_optimizer(self) -> None:
        raise NotImplementedError

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, float]:
        """One optimizer step on this rank's batch; ``step`` counts the steps done before it."""
        raise NotImplementedError

    def rows(self, batch: dict[str, Tensor]) -> int:
        raise NotImplementedError

    def evaluate(self, batches: Iterable[dict[str, Tensor]]) -> tuple[dict[str, float], dict[str, Any]]:
        """(validation metrics, figure data) on the bare model."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


class _SAETask(_Task):
    def build(self) -> nn.Module:
        from galray.models.sae import SparseAutoencoder

        self.tcfg = self.job.sae_train_config()
        self.model = SparseAutoencoder(self.job.sae.model_config(int(self.config["d_in"])))
        return self.model

    def init_fresh(self) -> None:
        # Statistics the driver fitted once: identical on every rank by construction.
        named = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        with torch.no_grad():
            for name, value in self.config["sae_init"].items():
                named[name].copy_(torch.as_tensor(np.asarray(value)))

    def make_optimizer(self) -> None:
        from galray.train.sae_loop import make_optimizer, make_scheduler

        self.optimizer = make_optimizer(self.ddp, self.tcfg)
        self.scheduler = make_scheduler(self.optimizer, self.tcfg, self.job.steps)

    def extra_state(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])

    def rows(self, batch: dict[str, Tensor]) -> int:
        return batch["x"].shape[0]

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, float]:
        from galray.train.sae_loop import sae_train_step

        stats = sae_train_step(self.ddp, self.optimizer, batch["x"].float(), self.tcfg.grad_clip, self.scheduler)
        return {k: float(v) for k, v in stats.items()}

    def evaluate(self, batches: Iterable[dict[str, Tensor]]) -> tuple[dict[str, float], dict[str, Any]]:
        from galray.models.sae import evaluate_sae

        xs = [b["x"].float() for b in batches]
        if not xs:
            return {}, {}
        rep = evaluate_sae(self.model, torch.cat(xs)[: self.job.eval_max_rows or None])
        metrics = {f"val_{k}": float(rep[k]) for k in ("fvu", "l0_mean", "dead_frac")}
        return metrics, {"density_log10_hist": rep["density_log10_hist"],
                         "density_log10_edges": rep["density_log10_edges"], "n_samples": rep["n_samples"],
                         "n_latents": self.model.cfg.n_latents,
                         "fvu_prefix": rep["fvu_prefix"], "prefix_sizes": rep["prefix_sizes"]}


class _VQVAETask(_Task):
    def build(self) -> nn.Module:
        from galray.models.vqvae import VQVAE

        self.tcfg = self.job.vqvae_train_config()
        torch.manual_seed(self.job.seed)  # same conv init on every rank (DDP also broadcasts rank 0's)
        self.model = VQVAE(self.job.vqvae.model)
        return self.model

    def make_optimizer(self) -> None:
        from galray.train.vqvae_loop import make_optimizer

        self.optimizer = make_optimizer(self.ddp, self.tcfg)

    def rows(self, batch: dict[str, Tensor]) -> int:
        return batch["pixels"].shape[0]

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, float]:
        from galray.train.vqvae_loop import train_step

        return train_step(self.ddp, pixels_to_model(batch["pixels"]), self.optimizer, self.tcfg)

    def evaluate(self, batches: Iterable[dict[str, Tensor]]) -> tuple[dict[str, float], dict[str, Any]]:
        from galray.models.codebook_metrics import CodebookMetrics

        vq = self.model
        vq.eval()
        metrics = CodebookMetrics(vq.cfg.codebook_size)
        n = 0
        with torch.no_grad():
            for b in batches:
                x = pixels_to_model(b["pixels"])
                out = vq(x)
                metrics.update(out.indices, x=x, x_hat=out.x_hat)
                n += x.shape[0]
                if self.job.eval_max_rows and n >= self.job.eval_max_rows:
                    break
        if n == 0:
            return {}, {}
        rep = metrics.compute()
        return ({"val_utilisation": rep.utilisation, "val_perplexity": rep.perplexity,
                 "val_perplexity_foreground": rep.perplexity_foreground, "val_mse": rep.mse},
                {"code_counts": metrics.counts.tolist()})


class _PriorTask(_Task):
    def build(self) -> nn.Module:
        from galray.models.prior import Prior

        self.tcfg = self.job.prior_train_config()
        torch.manual_seed(self.job.seed)
        self.model = Prior(self.job.prior.model)
        return self.model

    def make_optimizer(self) -> None:
        from galray.train.prior_loop import make_optimizer

        self.optimizer = make_optimizer(self.ddp, self.tcfg)
        self.amp = torch.bfloat16 if self.device.type == "cuda" else None
        self.drop_gen: torch.Generator | None = None

    def rows(self, batch: dict[str, Tensor]) -> int:
        return batch["codes"].shape[0]

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, float]:
        from galray.train.prior_loop import lr_at, prior_train_step

        if self.drop_gen is None:
            # Class dropout differs per rank, and is seeded again from the step after a restart.
            self.drop_gen = torch.Generator(device=self.device).manual_seed(
                self.tcfg.seed * 1_000_003 + self.rank * 7919 + step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.tcfg)
        return prior_train_step(self.ddp, self.optimizer, batch["codes"].long(), batch["label"].long(),
                                grad_clip=self.tcfg.grad_clip, generator=self.drop_gen, autocast_dtype=self.amp)

    def evaluate(self, batches: Iterable[dict[str, Tensor]]) -> tuple[dict[str, float], dict[str, Any]]:
        prior = self.model
        prior.eval()
        loss_sum = acc_sum = 0.0
        n = 0
        with torch.no_grad():
            for b in batches:
                codes, labels = b["codes"].long(), b["label"].long()
                out = prior(codes, labels)
                loss_sum += float(out.loss) * codes.shape[0]
                acc_sum += float((out.logits.argmax(-1) == codes).float().mean()) * codes.shape[0]
                n += codes.shape[0]
                if self.job.eval_max_rows and n >= self.job.eval_max_rows:
                    break
        if n == 0:
            return {}, {}
        return {"val_loss": loss_sum / n, "val_acc": acc_sum / n}, {}


TASKS: dict[str, type[_Task]] = {"sae": _SAETask, "vqvae": _VQVAETask, "prior": _PriorTask}


# --- checkpoints -----------------------------------------------------------------------------------

def save_checkpoint(task: _Task, directory: Path, step: int, run_id: str | None) -> None:
    save_model(task.model, directory, extra={"step": step, "kind": task.job.kind})
    torch.save({"step": step, "optimizer": task.optimizer.state_dict(), "mlflow_run_id": run_id or "",
                **task.extra_state()}, directory / STATE_NAME)


def load_checkpoint_model(task: _Task, directory: Path) -> None:
    """Weights and buffers into the (not yet wrapped) model, strictly."""
    loaded = load_model(type(task.model), directory)
    task.model.load_state_dict(loaded.state_dict(), strict=True)


def load_train_state(directory: Path) -> dict[str, Any]:
    return torch.load(directory / STATE_NAME, map_location="cpu", weights_only=True)


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


def _maybe_fail(step: int, rank: int, world: int) -> None:
    """Test-only fault injection (see module docstring); a no-op unless the variables are set."""
    at = os.environ.get(FAIL_AT_ENV)
    marker = os.environ.get(FAIL_MARKER_ENV)
    if not at or not marker or step + 1 != int(at):
        return
    if rank != int(os.environ.get(FAIL_RANK_ENV, world - 1)) or Path(marker).exists():
        return
    Path(marker).write_text(f"failed before step {at} on rank {rank}\n")
    raise RuntimeError(f"injected failure before step {at} on rank {rank} ({FAIL_AT_ENV})")


# --- the loop --------------------------------------------------------------------------------------

def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point. ``config``: job (TrainJob as a dict, storage and tracking resolved),
    run_id (MLflow), and the kind's extras (sae: d_in, sae_init)."""
    job = from_dict(TrainJob, config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    task = TASKS[job.kind](job, config, device, rank)
    task.build()

    start = 0
    state: dict[str, Any] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            load_checkpoint_model(task, Path(d))
            state = load_train_state(Path(d))
        start = int(state["step"])
    else:
        task.init_fresh()

    task.ddp = ray.train.torch.prepare_model(task.model)
    task.make_optimizer()
    if state is not None:
        task.optimizer.load_state_dict(state["optimizer"])
        task.load_extra_state(state)

    run_id = config.get("run_id")
    tracker = Tracker(from_dict(TrackingConfig, config["job"]["tracking"]), run_id=run_id) if (
        rank == 0 and run_id) else None

    shard = ray.train.get_dataset_shard("train")
    step, epoch = start, 0
    t0, rows_seen = time.perf_counter(), 0
    last: dict[str, float] = {}
    while step < job.steps:
        batches = 0
        for batch in shard.iter_torch_batches(batch_size=job.batch_size, drop_last=True, device=device,
                                              local_shuffle_buffer_size=4 * job.batch_size,
                                              local_shuffle_seed=job.seed + 1000 * epoch + rank + 7 * start):
            batches += 1
            _maybe_fail(step, rank, world)
            lr = task.lr()
            stats = task.step(batch, step)
            step += 1
            rows_seen += task.rows(batch) * world
            is_ckpt = step % job.checkpoint_every == 0 or step == job.steps
            if step % job.log_every == 0 or is_ckpt:
                stats = _mean_over_ranks(stats, device)
                elapsed = time.perf_counter() - t0
                last = {**stats, "lr": lr, "samples_per_s": rows_seen / max(elapsed, 1e-9), "epoch": float(epoch)}
                if tracker is not None:
                    tracker.log_metrics(last, step=step)
                metrics = {**last, "step": step, "resumed_from_step": start}
                if is_ckpt:
                    _report_checkpoint(task, metrics, step, rank, run_id)
                else:
                    ray.train.report(metrics)
            if step >= job.steps:
                break
        if batches == 0:
            raise RuntimeError(f"the training split gives no full batch of {job.batch_size} rows per worker "
                               f"({world} workers): use a smaller batch_size or more data")
        epoch += 1

    diff = replica_max_diff(task.model, device)
    if rank != 0:
        return {}
    eval_metrics, figure_data = task.evaluate(
        ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=job.batch_size, device=device))
    if tracker is not None and eval_metrics:
        tracker.log_metrics(eval_metrics, step=step)
    return {"step": step, "resumed_from_step": start, "replica_max_diff": diff, "last": last,
            "eval": eval_metrics, "figure_data": figure_data}


def _report_checkpoint(task: _Task, metrics: dict[str, Any], step: int, rank: int, run_id: str | None) -> None:
    name = checkpoint_dir_name(step)
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(task, Path(tmp), step, run_id)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)

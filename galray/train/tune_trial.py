"""What one trial of a `galray tune` campaign runs: the training of :mod:`galray.train.workers`, inside Ray Tune.

**Single-worker trials** (``scaling.num_workers == 1``, what campaigns use): :func:`single_worker_trial`
is a plain Tune function trainable that trains in its own process, on the campaign's
datasets (built and materialised once on the driver, handed over with ``tune.with_parameters``).
Every ``report_every`` steps it evaluates on the same held-out rows and reports the kind's
validation metrics (``val_*``: the objective and what is reported beside it) with a checkpoint
(galray's layout: ``config.json`` + ``model.safetensors`` + ``train_state.pt``), so a scheduler
can stop it between reports and a restored campaign continues it from there.

Why not a ``TorchTrainer`` with one worker: a trial that runs a TorchTrainer and is stopped by
ASHA leaks the worker group's placement group on Ray 2.60 (ray-project/ray#54305: Ray's
cleaner asks the dashboard's state API whether the Train controller lives, and the Ray galray
starts has no dashboard), so the next trials wait for CPUs forever. A function trainable has
only Tune's own placement group, which Tune removes when it stops the trial
(tests/test_tune.py holds both: the campaign test and its resource check).

**Multi-worker trials** (:func:`multi_worker_trial`) run :func:`galray.train.launch.fit` (a
TorchTrainer, DDP) inside the trial and report once, at the end; the campaign refuses early
stopping for them (galray.stages.tune), for the reason above.

**Done records.** Tune saves its experiment state at most every few seconds, so a driver killed
just after a trial finished can leave that trial "running" in the saved state. The driver writes
a record of each finished trial (:mod:`galray.train.tune_records`); a trial started again finds
its record and reports the recorded result instead of training again.

**Checkpoints are the trial's own**, under ``<campaign>/checkpoints/<trial_id>/`` with a
``latest.json`` pointer written after the checkpoint and before the previous one is deleted; they
are not handed to Tune. With Tune's checkpoints and ``num_to_keep=1``, a driver killed just after
a report restored the trial from its stale state's checkpoint, which Tune had already deleted
("Could not recover from checkpoint as it does not exist on storage anymore": the trial errored
instead of resuming; seen in tests/test_tune.py's interruption test). A trial started again reads
its own pointer, which always names a complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow.fs as pafs
import ray.tune
import torch
from torch import Tensor

from galray.config import from_dict, to_dict
from galray.storage import StorageConfig, arrow_filesystem, join
from galray.train.checkpoint import checkpoint_dir_name, save_checkpoint
from galray.train.config import TrainJob
from galray.train.datasets import MODEL_CONFIGS, ModelConfig
from galray.train.loop import limit_rows
from galray.train.tune_space import SearchSpace, apply_values
from galray.train.workers import Worker

DONE_DIR = "done"
"""Folder of the campaign holding one ``<trial_id>.json`` record per finished trial."""
CHECKPOINTS_DIR = "checkpoints"
"""Folder of the campaign holding each single-worker trial's checkpoints (``<trial_id>/``)."""
LATEST = "latest.json"
"""A trial's checkpoint pointer: {"step", "checkpoint"} (the folder name)."""
REPLAYED = "galray_replayed"
"""Result key marking a result replayed from a done record (not logged again)."""


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a campaign shares (handed to trials with ``tune.with_parameters``)."""

    base: dict[str, Any]
    """The training job the space's values are applied to (a TrainJob as a dict, without credentials)."""
    space: dict[str, Any]
    """The search space (SearchSpace.to_dict)."""
    report_every: int
    """Steps between reports (evaluation + checkpoint)."""
    eval_rows: int
    """Held-out rows every report evaluates on (the same rows each time, kept in the trial's memory)."""
    model_config: ModelConfig | None = None
    """The model config the data built (single-worker trials: MODEL_CONFIGS derives each trial's)."""
    init_state: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    """Parameters every trial starts from (the SAE's normalisation and b_pre)."""
    train_storage_path: str = ""
    """Multi-worker trials: where their Ray Train runs keep checkpoints (<campaign>/train)."""
    campaign: str = ""
    """The campaign folder (single-worker trials keep their checkpoints under it)."""

    def job(self, config: Mapping[str, Any]) -> TrainJob:
        """The trial's training job: the base with the trial's values."""
        return apply_values(from_dict(TrainJob, self.base), SearchSpace.parse(self.space).decode(config))


def trial_device(use_gpu: bool) -> torch.device:
    """The accelerator Ray gave this trial when it asked for one, else the CPU."""
    acc = getattr(torch, "accelerator", None)
    if use_gpu and acc is not None and acc.is_available():
        return torch.device(acc.current_accelerator())
    return torch.device("cpu")


def _replay_done() -> bool:
    """Report this trial's done record, if the driver wrote one, and say whether it did."""
    ctx = ray.tune.get_context()
    storage = ctx.get_storage()
    path = f"{storage.experiment_fs_path}/{DONE_DIR}/{ctx.get_trial_id()}.json"
    fs = storage.storage_filesystem
    if fs.get_file_info(path).type.name == "NotFound":
        return False
    with fs.open_input_stream(path) as f:
        record = json.loads(f.read().decode())
    ray.tune.report({**record["metrics"], REPLAYED: 1})
    return True


@dataclass(frozen=True)
class TrialCheckpoints:
    """One trial's checkpoint folder (module docstring): ``<campaign>/checkpoints/<trial_id>``."""

    root: str
    storage: StorageConfig

    def latest(self) -> "ray.tune.Checkpoint | None":
        """The newest complete checkpoint, or None before the first."""
        fs, root = arrow_filesystem(self.root, self.storage)
        if fs.get_file_info(f"{root}/{LATEST}").type.name == "NotFound":
            return None
        with fs.open_input_stream(f"{root}/{LATEST}") as f:
            name = json.loads(f.read().decode())["checkpoint"]
        return ray.tune.Checkpoint(f"{root}/{name}", filesystem=fs)

    def save(self, local: Path, step: int) -> str:
        """Copy the checkpoint in ``local`` in, point at it, then delete the older ones; returns its URI."""
        fs, root = arrow_filesystem(self.root, self.storage)
        name = checkpoint_dir_name(step)
        fs.create_dir(f"{root}/{name}", recursive=True)
        pafs.copy_files(str(local), f"{root}/{name}", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        with fs.open_output_stream(f"{root}/.{LATEST}.tmp") as f:
            f.write(json.dumps({"step": step, "checkpoint": name}).encode())
        fs.move(f"{root}/.{LATEST}.tmp", f"{root}/{LATEST}")
        for info in fs.get_file_info(pafs.FileSelector(root)):
            if info.type == pafs.FileType.Directory and info.base_name != name:
                fs.delete_dir(info.path)
        return join(self.root, name)


@dataclass
class TrialWorker(Worker):
    """The Ray Train worker's steps in one process; each report evaluates and checkpoints."""

    val: list[dict[str, Tensor]] = dataclasses.field(default_factory=list)
    """The held-out batches every report evaluates on."""
    checkpoints: TrialCheckpoints | None = None

    def _report(self, last: dict[str, float], step: int) -> None:
        evaluation = self.job.loop.evaluate(self.model, self.val)
        metrics = {**last, **evaluation.metrics, "step": step, "trial_steps": self.job.steps,
                   "resumed_from_step": self.start}
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(self.model, self.optimizer, Path(tmp), step, self.job.kind, None)
            uri = self.checkpoints.save(Path(tmp), step)
        ray.tune.report({**metrics, "checkpoint_uri": uri})


def single_worker_trial(config: dict[str, Any], setup: TrialSetup, train: Any, val: Any) -> None:
    """Tune function trainable: train the trial's job in this process on ``train`` (a Ray Dataset),
    reporting every ``setup.report_every`` steps (module docstring)."""
    if _replay_done():
        return
    job = setup.job(config)
    # Logging and checkpoints follow the campaign's reports.
    job = dataclasses.replace(job, log_every=setup.report_every, checkpoint_every=setup.report_every)
    device = trial_device(job.scaling.use_gpu)
    model_config = to_dict(MODEL_CONFIGS[job.kind](job, setup.model_config))
    held_out = list(limit_rows(val.iter_torch_batches(batch_size=job.batch_size, device=device), setup.eval_rows))
    checkpoints = TrialCheckpoints(join(setup.campaign, CHECKPOINTS_DIR, ray.tune.get_context().get_trial_id()),
                                   job.storage)
    worker = TrialWorker.create(job, model_config, setup.init_state, checkpoints.latest(), train, device,
                                lambda m: m.to(device), val=held_out, checkpoints=checkpoints)
    worker.run()


def multi_worker_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Tune function trainable: the trial's job as a data-parallel Ray Train run (``fit``), named after the
    trial under ``setup.train_storage_path`` so that a restored trial resumes it from its last checkpoint;
    one report at the end. Only the driver records to MLflow (the run's own tracking is off)."""
    from galray.train.launch import fit

    if _replay_done():
        return
    job = setup.job(config)
    trial_id = ray.tune.get_context().get_trial_id()
    job = dataclasses.replace(job, name=f"trial-{trial_id}", storage_path=setup.train_storage_path, register=False,
                              tracking=dataclasses.replace(job.tracking, enabled=False))
    summary = fit(job)
    ray.tune.report({**summary.metrics, **summary.eval, "step": summary.step, "trial_steps": job.steps,
                     "resumed_from_step": summary.resumed_from_step, "checkpoint_uri": summary.checkpoint or ""})

"""The face every ``train/<kind>_loop.py`` shows, and the few helpers the loops share. Pure torch.

A training kind is a loop module with this face plus a section in :mod:`galray.train.config`
(``KINDS``) and a dataset builder in :mod:`galray.train.datasets`; the Ray Train worker
(:mod:`galray.train.workers`) is the same for every kind:

====================  ===========================================================================
``TrainConfig``       the kind's optimisation settings (a frozen dataclass with ``lr`` and ``seed``)
``MODEL``             the model class it trains (built from its config, saved by models.checkpoint)
``CURVES``            the step metrics drawn as the run's loss curves
``OBJECTIVE``         ``(metric, mode)``: the validation metric a hyperparameter campaign optimises by
                      default (``galray tune``), one of ``evaluate``'s ``val_*`` keys; the other
                      ``val_*`` metrics are reported beside it
``make_optimizer``    ``(model, cfg) -> Optimizer``; ``model`` may be wrapped in DDP
``lr_at``             ``(step, cfg) -> float``: the learning rate of step ``step`` (0-based); the
                      caller sets it (:func:`set_lr`) before every step, so a resumed run needs no
                      scheduler state
``train_step``        ``(model, optimizer, batch, cfg, generator=None) -> {name: scalar}``: one
                      optimizer step on a batch dict as the kind's dataset yields it; ``generator``
                      carries the step's randomness (class dropout for the prior)
``evaluate``          ``(model, batches, max_rows=0) -> Evaluation``: validation metrics
                      (``val_*``) and the data of the run's figures
``train``             a single-process loop over in-memory data (tests, benchmarks, notebooks)
``calibrate``         optional, ``(model, batches) -> None``: fit the model's inference statistics on
                      recent training batches (the SAE's threshold), called at the end of ``train``
====================  ===========================================================================
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Protocol, TypeVar

import torch
from torch import Tensor, nn

B = TypeVar("B")


class Evaluation(NamedTuple):
    """What ``evaluate`` returns."""

    metrics: dict[str, float]
    """Validation metrics, named ``val_<metric>`` (empty when there were no validation rows)."""
    figure_data: dict[str, Any]
    """Arrays for the run's figures (galray.analysis.figures): code counts, feature density, ..."""


class Loop(Protocol):
    """A ``train/<kind>_loop.py`` module (see the table above)."""

    TrainConfig: type
    MODEL: type[nn.Module]
    CURVES: tuple[str, ...]
    OBJECTIVE: tuple[str, str]

    def make_optimizer(self, model: nn.Module, cfg: Any) -> torch.optim.Optimizer: ...

    def lr_at(self, step: int, cfg: Any) -> float: ...

    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping[str, Tensor], cfg: Any,
                   generator: torch.Generator | None = None) -> dict[str, float | Tensor]: ...

    def evaluate(self, model: nn.Module, batches: Iterable[Mapping[str, Tensor]], max_rows: int = 0) -> Evaluation: ...


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP (or torch.compile) wrapper, which keeps it in ``.module``."""
    return getattr(model, "module", model)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate (the loops' schedules are ``lr_at``, not LR schedulers)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def batch_rows(batch: Mapping[str, Tensor]) -> int:
    """Rows of a batch dict (every column has one per row)."""
    return next(iter(batch.values())).shape[0]


def limit_rows(batches: Iterable[Mapping[str, Tensor]], max_rows: int = 0) -> Iterator[Mapping[str, Tensor]]:
    """The batches up to and including the one that reaches ``max_rows`` rows (0: all of them)."""
    n = 0
    for batch in batches:
        yield batch
        n += batch_rows(batch)
        if max_rows and n >= max_rows:
            return


def repeat(batches: Iterable[B]) -> Iterator[B]:
    """Iterate a re-iterable (a list, a DataLoader) again and again; an empty one raises."""
    while True:
        empty = True
        for item in batches:
            empty = False
            yield item
        if empty:
            raise ValueError("no batches to train on")


class RecentBatches:
    """The last batches seen, at most ``max_rows`` rows in all: what ``calibrate`` runs on."""

    def __init__(self, max_rows: int):
        self.max_rows, self.rows = max_rows, 0
        self.batches: deque[Mapping[str, Tensor]] = deque()

    def add(self, batch: Mapping[str, Tensor]) -> None:
        self.batches.append(batch)
        self.rows += batch_rows(batch)
        while len(self.batches) > 1 and self.rows - batch_rows(self.batches[0]) >= self.max_rows:
            self.rows -= batch_rows(self.batches.popleft())

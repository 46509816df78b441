"""Search spaces of `galray tune`: distributions over dotted `galray train` config keys, checked before Ray starts.

A space is one YAML mapping; each key is a dotted key of the training config (the same names as
``galray train --set``), each value names one distribution::

    sae.model.k: {randint: [4, 64]}                       # integers, both ends included
    sae.train.lr: {loguniform: [1.0e-5, 1.0e-2]}          # log-uniform floats
    vqvae.model.beta: {uniform: [0.1, 0.5]}               # uniform floats
    sae.model.group_sizes: {choice: [[64, 192], [128, 384]]}   # one of these, at random
    steps: {grid: [500, 1000]}                            # every one of these, each in its own trials

**Checked by instantiation.** Every key is tried with representative values of its distribution
(every value of a choice or grid, both ends and the middle of a range, as the type the
distribution draws) applied to the real training config and built through ``from_dict``, so the
config's own checks decide: an unknown key, a float range for an integer field, a value out of the
field's range all fail with the key named, before Ray starts. Keys the campaign fixes (where
trials run, what data they read: see :data:`FIXED_KEYS` and
:data:`galray.train.datasets.DATA_KEYS`) and keys of another kind's section are refused too. When
the representatives make few combinations, every combination is built as well, which catches
conflicts between keys (an SAE ``k`` above a searched width).

**Grid order.** Grid points run in a seeded random order, not sorted: asynchronous successive
halving (ASHA) promotes a trial against whatever has reported so far, so sorted grids (Tune's own
enumeration) start with one end of each range and promote most of what follows
(tune_efficiency measured compute ratio 0.69 sorted against 0.17-0.44 shuffled on the same space).

Pure: no Ray import (the Ray Tune domains are built in :mod:`galray.stages.tune`).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from galray.config import ConfigError, from_dict, read_mapping, set_dotted, to_dict
from galray.train.config import KINDS, TrainJob
from galray.train.datasets import DATA_KEYS

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
SCALARS = (bool, int, float, str, type(None))

# Settings a campaign fixes for all its trials: where trials run and record (scaling decides each
# trial's resources, which Tune reserves once), how they report (the campaign's report_every sets
# logging and checkpoints), and the section of the campaign itself.
FIXED_KEYS = ("kind", "name", "storage_path", "storage", "tracking", "scaling", "register", "max_failures",
              "keep_checkpoints", "checkpoint_every", "log_every", "eval_max_rows", "tune")
# Joint validation builds every combination of representatives up to this many configs (each is a
# from_dict, well under a millisecond); larger spaces are checked key by key only.
MAX_COMBINATIONS = 512


@dataclass(frozen=True)
class Param:
    """One searched key and its distribution."""

    key: str
    kind: str
    """One of DISTRIBUTIONS."""
    args: tuple[Any, ...]
    """The values (choice, grid) or [low, high] (uniform, loguniform, randint: both ends included)."""

    def describe(self) -> str:
        return f"{self.kind} {json.dumps(list(self.args))}"

    @property
    def categorical(self) -> bool:
        return self.kind in ("choice", "grid")

    def representatives(self) -> list[Any]:
        """Values that stand for the distribution when the config checks it, of the type it draws."""
        if self.categorical:
            return list(self.args)
        lo, hi = self.args
        if self.kind == "randint":
            return [lo, hi]
        mid = math.sqrt(lo * hi) if self.kind == "loguniform" else (lo + hi) / 2
        return [float(lo), float(mid), float(hi)]

    def encode(self, value: Any) -> Any:
        """The value as a search algorithm holds it: scalars as they are, lists and mappings as JSON
        text (Optuna's categorical distributions take scalars only)."""
        return value if isinstance(value, SCALARS) else json.dumps(value)

    def decode(self, value: Any) -> Any:
        """The config value of what a search algorithm suggested (inverse of :meth:`encode`)."""
        if self.categorical:
            for v in self.args:
                if self.encode(v) == value:
                    return copy.deepcopy(v)
            raise ConfigError(f"space.{self.key}", f"{value!r} is not one of {self.describe()}")
        if self.kind == "randint":
            return int(value)
        return float(value)

    @property
    def high(self) -> Any:
        """The largest value the distribution can give (for numbers)."""
        return max(self.args) if self.categorical else self.args[1]


@dataclass(frozen=True)
class SearchSpace:
    """The parsed space: its parameters in file order."""

    params: tuple[Param, ...]

    @classmethod
    def load(cls, source: str | Path | Mapping[str, Any]) -> "SearchSpace":
        """From a YAML file or a mapping; a malformed entry fails naming ``space.<key>``."""
        raw = read_mapping(source) if isinstance(source, (str, Path)) else dict(source)
        return cls.parse(raw)

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> "SearchSpace":
        if not raw:
            raise ConfigError("space", "is empty: give at least one dotted config key with a distribution, "
                                       "e.g. sae.model.k: {choice: [8, 16, 32]}")
        return cls(tuple(_parse_param(str(key), spec) for key, spec in raw.items()))

    def to_dict(self) -> dict[str, Any]:
        """The YAML mapping this space was parsed from (normalised)."""
        return {p.key: {p.kind: list(p.args)} for p in self.params}

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def param(self, key: str) -> Param:
        return next(p for p in self.params if p.key == key)

    @property
    def grid(self) -> list[Param]:
        return [p for p in self.params if p.kind == "grid"]

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.args) for p in self.grid)

    def grid_points(self, trials: int, seed: int) -> list[dict[str, Any]]:
        """Each grid point (the grid keys only, encoded) ``trials / grid_size`` times, in a seeded
        random order (module docstring); [] without grid keys."""
        if not self.grid:
            return []
        points = [{p.key: p.encode(v) for p, v in zip(self.grid, values)}
                  for values in itertools.product(*(p.args for p in self.grid))]
        points = points * (trials // len(points))
        random.Random(seed).shuffle(points)
        return points

    def decode(self, suggested: Mapping[str, Any]) -> dict[str, Any]:
        """{key: config value} of a trial's suggested values (only the space's keys)."""
        return {p.key: p.decode(suggested[p.key]) for p in self.params if p.key in suggested}

    def max_value(self, key: str, default: Any) -> Any:
        """The largest value ``key`` can take in this space, else ``default`` (ASHA's max_t when steps is searched)."""
        return self.param(key).high if key in self.keys else default

    def validate(self, base: TrainJob, search: str = "random") -> None:
        """Raise ConfigError naming ``space.<key>`` unless every representative value, and (when few)
        every combination of them, makes a valid job of ``base.kind`` (module docstring)."""
        fixed = FIXED_KEYS + DATA_KEYS["*"] + DATA_KEYS[base.kind]
        base_dict = to_dict(base)
        for p in self.params:
            _check_key(p, base.kind, fixed)
            if search == "optuna" and p.kind == "grid":
                raise ConfigError(f"space.{p.key}", "grid is not supported by --search optuna, which chooses every "
                                                    "value itself: use choice")
            for value in p.representatives():
                _build(base_dict, {p.key: value}, f"space.{p.key}", f"{p.describe()} gives {value!r}, which")
        combos = math.prod(len(p.representatives()) for p in self.params)
        if len(self.params) > 1 and combos <= MAX_COMBINATIONS:
            for values in itertools.product(*(p.representatives() for p in self.params)):
                chosen = dict(zip(self.keys, values))
                _build(base_dict, chosen, "space", "the combination " + ", ".join(
                    f"{k}={json.dumps(v)}" for k, v in chosen.items()) + " is a config that")


def with_value(data: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``data`` with the dotted ``key`` set to ``value``, as a Python value (never re-parsed
    from text, as ``--set`` overrides are)."""
    out = copy.deepcopy(dict(data))
    set_dotted(out, key.split("."), value, f"space key {key!r}")
    return out


def apply_values(base: TrainJob, values: Mapping[str, Any]) -> TrainJob:
    """``base`` with each dotted key set to its (decoded) value, validated as a whole."""
    data = to_dict(base)
    for key, value in values.items():
        data = with_value(data, key, value)
    return from_dict(TrainJob, data)


# --- parsing and checking --------------------------------------------------------------------------

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_param(key: str, spec: Any) -> Param:
    field = f"space.{key}"
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(field, f"must name one distribution, {{{' | '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(field, f"unknown distribution {kind!r} (one of {', '.join(DISTRIBUTIONS)})")
    if not isinstance(args, list):
        raise ConfigError(field, f"{kind} takes a list, got {args!r}")
    if kind in ("choice", "grid"):
        if not args:
            raise ConfigError(field, f"{kind} is empty: give at least one value")
        if len({json.dumps(a, sort_keys=True) for a in args}) != len(args):
            raise ConfigError(field, f"{kind} repeats a value: {args!r}")
        return Param(key, kind, tuple(args))
    # PyYAML reads 1e-5 (no dot) as text; galray's configs read numbers as typed, so does the space.
    args = [_number(a, field, kind) for a in args]
    if len(args) != 2:
        raise ConfigError(field, f"{kind} takes [low, high], got {args!r}")
    lo, hi = args
    if not lo < hi:
        raise ConfigError(field, f"{kind}: low {lo} must be below high {hi}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(field, f"loguniform needs low > 0, got {lo}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(field, f"randint takes integer bounds, got {args!r}")
    return Param(key, kind, (lo, hi))


def _number(value: Any, field: str, kind: str) -> int | float:
    if isinstance(value, str):
        try:
            text = value.strip()
            value = int(text) if text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise ConfigError(field, f"{kind} takes numbers, got {value!r}") from None
    if not _is_number(value):
        raise ConfigError(field, f"{kind} takes finite numbers, got {value!r}")
    return value


def _check_key(p: Param, kind: str, fixed: Iterable[str]) -> None:
    field = f"space.{p.key}"
    head = p.key.split(".")[0]
    if head in KINDS and head != kind:
        raise ConfigError(field, f"searches the {head} section, but the campaign trains {kind} "
                                 f"(search {kind}.* keys)")
    for f in fixed:
        if p.key == f or p.key.startswith(f + "."):
            why = ("changes the training data, which a campaign reads once for all its trials: run one campaign "
                   "per setting" if f in DATA_KEYS["*"] or f in DATA_KEYS[kind] else
                   "is fixed for the whole campaign (set it in the config or the tune section instead)")
            raise ConfigError(field, why)


def _build(base: dict[str, Any], values: Mapping[str, Any], field: str, what: str) -> None:
    """Build the job of ``base`` with ``values`` set; a rejection fails naming ``field``, saying ``what`` was tried."""
    data = base
    try:
        for key, value in values.items():
            data = with_value(data, key, value)
        from_dict(TrainJob, data).train_config()
    except ConfigError as err:
        raise ConfigError(field, f"{what} the config rejects: {err}") from None

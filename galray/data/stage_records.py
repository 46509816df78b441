"""Records of finished pipeline stages in an output folder, so that a rerun reuses them.

A multi-stage command (``galray demo``) writes one small JSON file per finished stage under
``<output>/stages/``: what the stage wrote (paths), its headline figures, how long it took, and a
fingerprint of the settings it ran with. A rerun with the same settings reuses a recorded stage
instead of running it again; a changed setting, or a stage upstream that ran again, makes it run
again. A record is written only after the stage has finished (atomically, by rename), so an
interrupted stage is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RECORDS_DIR = "stages"


@dataclass(frozen=True)
class StageRecord:
    """One finished stage."""

    stage: str
    fingerprint: str
    """Hash of the settings the stage ran with (see :func:`fingerprint`)."""
    paths: dict[str, str] = field(default_factory=dict)
    """What the stage wrote, by name (stores, checkpoints, figures)."""
    figures: dict[str, float] = field(default_factory=dict)
    """Headline numbers (FVU, perplexity, ...)."""
    seconds: float = 0.0
    finished_at: float = 0.0
    """Unix time the stage finished."""


def fingerprint(settings: Any) -> str:
    """A short stable hash of JSON-able settings (dict keys sorted)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StageRecords:
    """The records under ``<root>/stages``: read, write and forget them."""

    def __init__(self, root: str | Path):
        self.dir = Path(root) / RECORDS_DIR

    def _path(self, stage: str) -> Path:
        return self.dir / f"{stage}.json"

    def get(self, stage: str) -> StageRecord | None:
        """The stage's record, or None when it never finished (or its record is unreadable)."""
        try:
            data = json.loads(self._path(stage).read_text())
            return StageRecord(**data)
        except (OSError, ValueError, TypeError):
            return None

    def put(self, record: StageRecord) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self._path(record.stage).with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(record), indent=1, sort_keys=True))
        tmp.replace(self._path(record.stage))

    def forget(self, stage: str) -> None:
        self._path(stage).unlink(missing_ok=True)

    @staticmethod
    def now() -> float:
        return time.time()

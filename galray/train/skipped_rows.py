"""The rows training leaves out, and why: counted once each, wherever the batch functions run.

The batch functions of :mod:`galray.train.datasets` leave out rows a model cannot take: an image
that cannot be prepared (VQ-VAE, encoder: the ``CutoutError`` reason), an embedding with NaN or
infinite values (SAE), codes outside the codebook (prior). They run in Ray Data tasks, once per
epoch unless the data are materialised, so each left-out row is sent, with its split and reason,
to one small actor (:class:`SkippedRows`, made by :func:`skipped_rows_counter` on the driver)
that counts every (split, object_id) once. ``fit`` puts the counts in its summary and its MLflow
run (metric ``rows_skipped``, artifact ``skipped_rows.json`` with a few example ids per reason).

A batch waits for its report (a round trip, only when it left rows out), so by the time training
has consumed a batch its rows are counted. The counts cover the rows training read: a run that
stops before an epoch ends has not read the rest.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

MAX_TRACKED = 1_000_000  # distinct (split, id) remembered to count each row once; beyond, a row read again counts again
EXAMPLES = 5  # example ids kept per reason


class SkippedRows:
    """Actor: the rows left out by reason, each (split, object_id) counted once."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, split: str, ids: Sequence[str], reason: str) -> None:
        for object_id in ids:
            key = (split, str(object_id))
            if key in self.seen:
                continue
            if len(self.seen) < MAX_TRACKED:
                self.seen.add(key)
            self.counts[reason] += 1
            shown = self.examples.setdefault(reason, [])
            if len(shown) < EXAMPLES:
                shown.append(str(object_id))

    def report(self) -> dict[str, dict[str, Any]]:
        """{reason: {"rows": n, "examples": [a few ids]}}, most frequent first."""
        return {reason: {"rows": n, "examples": self.examples[reason]} for reason, n in self.counts.most_common()}


def skipped_rows_counter() -> Any:
    """A :class:`SkippedRows` actor (no CPU: it only counts) owned by the caller, on the caller's node.

    Pinned there because a zero-CPU actor can otherwise land on any node, and a run that loses that
    node (a spot preemption, a scale-down) would lose the counts and fail when it asks for them after
    training has recovered and finished; the caller's node is the one the run cannot outlive anyway."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(SkippedRows).options(scheduling_strategy=here).remote()


def report_skipped(counter: Any, split: str, ids: Sequence[str], reason: str) -> None:
    """Send rows left out to ``counter`` and wait for it (no-op without a counter or rows)."""
    if counter is None or not len(ids):
        return
    import ray

    ray.get(counter.add.remote(split, [str(i) for i in ids], reason))


def skipped_totals(report: dict[str, dict[str, Any]]) -> dict[str, int]:
    """{reason: rows} of a :meth:`SkippedRows.report`."""
    return {reason: int(entry["rows"]) for reason, entry in report.items()}

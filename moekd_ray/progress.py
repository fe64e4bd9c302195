"""Progress from anywhere to the one console of `moekd`: the driver, Ray Train workers and Tune trials alike print
one marker line; Ray forwards worker output to the driver, where console.py turns the markers into its live
status line (the run's log file keeps every line). Without a console (a test, a notebook) a marker is just a short
line on stdout."""

from __future__ import annotations

import json
import time
from typing import Callable

MARKER = "[moekd-progress] "


def report(task: str, done: int, total: int, unit: str = "steps", note: str = "") -> None:
    """`task` has done `done` of `total` `unit`; `note` says where it is (e.g. "epoch 2/3, val auc 0.69")."""
    print(MARKER + json.dumps({"task": task, "done": done, "total": total, "unit": unit, "note": note}), flush=True)


def stage(name: str | None, index: int = 0, count: int = 0) -> None:
    """The driver entered stage `index` of `count` (the console's status line names it); None: it left it."""
    print(MARKER + json.dumps({"stage": name, "index": index, "count": count}), flush=True)


def parse(line: str) -> dict | None:
    """The fields of a marker line (wherever it sits in a line Ray prefixed), or None for any other line."""
    at = line.find(MARKER)
    if at < 0:
        return None
    try:
        return json.loads(line[at + len(MARKER):])
    except ValueError:
        return None


class Ticker:
    """`ticker(done)` reports at most every `every` seconds, and always on the last unit; off when not `enabled`
    (every rank but 0), so a data-parallel run shows one progress, not one per worker."""

    def __init__(self, task: str, total: int, unit: str = "steps", every: float = 2.0, enabled: bool = True):
        self.task, self.total, self.unit, self.every, self.enabled = task, total, unit, every, enabled
        self.note, self.last = "", float("-inf")  # the first report goes out (monotonic time may start near 0)

    def __call__(self, done: int, note: str | None = None) -> None:
        if note is not None:
            self.note = note
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.every or done >= self.total):
            self.last = now
            report(self.task, done, self.total, self.unit, self.note)

    def epoch(self, epoch: int, epochs: int) -> Callable[[int], None]:
        """`train_epoch`'s on_step: batch i of epoch `epoch` (from 1) is unit (epoch - 1) * steps + i, with
        steps = total / epochs."""
        steps = self.total // epochs
        return lambda i: self((epoch - 1) * steps + i, f"epoch {epoch}/{epochs}")

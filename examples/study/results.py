"""The study's CSV (:class:`Results`): one row per evaluation, appended by every worker under one
``flock``; :class:`RunKey` names a run, and :func:`runs_of`, :func:`finished`, :func:`final_value`
and :func:`better` read what a run's rows say."""

from __future__ import annotations

import csv
import fcntl
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence

from .task import Task


@dataclass(frozen=True)
class RunKey:
    optimizer: str
    lr: float
    seed: int

    @property
    def tag(self) -> str:
        return re.sub(r"[^A-Za-z0-9.=_+-]", "_", f"{self.optimizer}_lr{self.lr:g}_seed{self.seed}")


def _key(row: Dict[str, str]) -> RunKey:
    return RunKey(row["optimizer"], float(row["lr"]), int(row["seed"]))


class Results:
    """The study's CSV, shared by the workers (every read-modify-write under one ``flock``)."""

    def __init__(self, path: str, metrics: Sequence[str]):
        self.path = path
        self.columns = ["optimizer", "lr", "seed", "step", "wall_s", "train_loss", *metrics, "status"]
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def _locked(self):
        handle = open(self.path + ".lock", "w")
        fcntl.flock(handle, fcntl.LOCK_EX)
        return handle

    def rows(self) -> List[Dict[str, str]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def append(self, row: Dict[str, object]) -> None:
        with self._locked():
            new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
            with open(self.path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="raise")
                if new:
                    writer.writeheader()
                writer.writerow({c: row.get(c, "") for c in self.columns})

    def truncate(self, key: RunKey, after_step: int) -> None:
        """Drop ``key``'s rows past ``after_step`` (a run resumed from that step's checkpoint)."""
        with self._locked():
            rows = self.rows()
            keep = [r for r in rows if _key(r) != key or int(r["step"]) <= after_step]
            if len(keep) != len(rows):
                with open(self.path + ".tmp", "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=self.columns)
                    writer.writeheader()
                    writer.writerows(keep)
                os.replace(self.path + ".tmp", self.path)


def runs_of(rows: Iterable[Dict[str, str]]) -> Dict[RunKey, List[Dict[str, str]]]:
    out: Dict[RunKey, List[Dict[str, str]]] = {}
    for row in rows:
        out.setdefault(_key(row), []).append(row)
    for rows_ in out.values():
        rows_.sort(key=lambda r: int(r["step"]))
    return out


def finished(rows: List[Dict[str, str]], steps: int) -> bool:
    return bool(rows) and (rows[-1]["status"] == "diverged" or int(rows[-1]["step"]) >= steps)


def final_value(task: Task, rows: List[Dict[str, str]]) -> float:
    """The selection metric at the end of a finished run; the worst value when it diverged."""
    value = float(rows[-1][task.select]) if rows[-1][task.select] not in ("", None) else math.nan
    if rows[-1]["status"] == "diverged" or not math.isfinite(value):
        return -math.inf if task.higher_is_better else math.inf
    return value


def better(task: Task, a: float, b: float) -> bool:
    return a > b if task.higher_is_better else a < b

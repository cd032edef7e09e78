"""``metrics.jsonl``: a run's log, one JSON record a line — written here, read here.

Records: ``{"kind": "train", "step": s, ...}`` every ``log_every`` steps (losses, accuracies on the
batch, lr, λ, images/s, ``per_source`` with several sources) and ``{"kind": "eval", "step": s, ...}`` at
each evaluation (target/source accuracy, the label-free validators). The file is append-only; on resume,
records past the checkpoint's step are dropped, so a resumed run's log is the uninterrupted run's. A reader
may meet a last line still being written, or cut short by a crash or a full disk: it is skipped.

Example::

    >>> log = MetricsLog(run / "metrics.jsonl", resume_step=None)
    >>> log.write({"kind": "train", "step": 50, "loss_cls": 0.7}); log.close()
    >>> train, evals = read_metrics(run / "metrics.jsonl")
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _lines(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of every whole JSON object of the file, in order (a partial or non-object line is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append((line, rec))
    return out


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """``metrics.jsonl`` → (train records, eval records)."""
    recs = [r for _, r in _lines(path)]
    return [r for r in recs if r.get("kind") == "train"], [r for r in recs if r.get("kind") == "eval"]


def last_step(path: Path) -> int:
    """The step of the last train record (0 when there is none yet, or no file)."""
    try:
        train, _ = read_metrics(path)
    except OSError:
        return 0
    return int(train[-1]["step"]) if train else 0


class MetricsLog:
    """Append-only ``metrics.jsonl``; with ``resume_step``, lines past that step are dropped first, and so is
    a line cut short by a crash or a full disk (the run can resume once there is room again)."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            keep = [ln for ln, r in _lines(path) if isinstance(r.get("step"), int) and r["step"] <= resume_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, path)
        self.f = open(path, "a" if resume_step is not None else "w")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()

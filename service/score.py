"""``adaptserve score MODEL INPUT --out FILE`` — batch scoring with an exported model, torch-free.

    adaptserve score adaptserve-dann:latest photos/ --out scores.csv
    adaptserve score runs/model-folder test.npz --out scores.parquet

MODEL is a BentoML store tag or a folder written by ``adaptserve export --out``. INPUT is one of

- a folder of images, searched recursively (files with an image suffix; a folder whose top level holds only
  sub-folders named after the model's classes is labelled by them, like ``folder:`` training data);
- a ``.npy`` file of images (memory-mapped, so it is read batch by batch);
- a ``.npz`` file with an ``images`` array (or its only array) and optionally ``labels`` (class indices).

Images stream through in batches (``--batch-size``, default 256): memory is bounded by one batch plus one
drift window. Each item gets a row — ``path`` (folders) or ``index`` (arrays), ``label``, ``class_index``,
``confidence``, ``true_label`` (when labelled) and ``error`` — written to ``.csv``, ``.jsonl`` or
``.parquet`` (parquet needs pyarrow) by FILE's suffix. An unreadable item gets a row with its ``error`` and
no prediction; the run goes on and the count is printed on stderr.

The drift report ``FILE.drift.json`` holds the three tests of :meth:`service.drift.DriftReference.check` on
every consecutive, non-overlapping window of W scored images (W = the window the model's thresholds are
calibrated for; a tail shorter than W is not tested), and a summary: the fraction of windows that alarmed
and ``whole_set``, a binomial test of the number of alarmed windows against α (the per-window false-alarm
rate): ``is_drift`` when ``P(Binomial(n, α) ≥ alarmed) ≤ α``. Windows are consecutive, so the input should be in
random order (sorted by class, a window holds few classes and the softmax tests rightly call that label shift).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from scipy.stats import binom

from adaptserve.service.drift import TESTS, WindowBuffer
from adaptserve.service.inputs import DEFAULT_BATCH, Batch, ScoreError, open_input
from adaptserve.service.preprocess import DEFAULT_MAX_PIXELS, ImageError, describe_conversion, to_input_spec

FORMATS = (".csv", ".jsonl", ".parquet")


# ---------------------------------------------------------------- outputs

def check_out_parent(out: Path) -> None:
    """Fail before any work when ``out`` cannot be created: its nearest existing ancestor must be a
    writable folder (a regular file there, or no permission, would only fail after scoring)."""
    parent = next(p for p in Path(out).absolute().parents if p.exists())
    if not parent.is_dir():
        raise ScoreError(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ScoreError(f"--out {out}: no permission to write in {parent}")


def is_dataset(out: Path) -> bool:
    """``--out`` without a suffix names a parquet dataset: a folder with one ``part-NNNNN.parquet`` per batch."""
    return Path(out).suffix == ""


class Writer:
    """Rows to .csv / .jsonl / .parquet (by suffix), or to a parquet dataset folder (no suffix; one file per
    batch, each written to a temporary name and renamed), written batch by batch."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns
        self.suffix = ".parquet" if is_dataset(path) else path.suffix.lower()
        self.parts = 0 if is_dataset(path) else None
        if self.suffix not in FORMATS:
            raise ScoreError(f"--out {path}: the suffix must be one of {', '.join(FORMATS)}")
        if self.suffix == ".parquet":
            try:
                import pyarrow  # noqa: F401
                import pyarrow.parquet  # noqa: F401
            except ImportError:
                raise ScoreError("--out .parquet needs the pyarrow package (pip install pyarrow); "
                                 "use .csv or .jsonl instead") from None
        (path if self.parts is not None else path.parent).mkdir(parents=True, exist_ok=True)
        self._pq = None
        if self.suffix == ".parquet":
            self._f = None
        else:
            self._f = open(path, "w", newline="" if self.suffix == ".csv" else None, encoding="utf-8")
            if self.suffix == ".csv":
                self._csv = csv.writer(self._f)
                self._csv.writerow(columns)

    def write(self, cols: dict[str, list]) -> None:
        """Append rows given column by column: ``{column: [value per row]}``; None is an empty field."""
        rows = zip(*(cols[c] for c in self.columns))
        if self.suffix == ".csv":
            self._csv.writerows(rows)  # csv writes None as ""
        elif self.suffix == ".jsonl":
            self._f.write("".join(json.dumps(dict(zip(self.columns, r))) + "\n" for r in rows))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            types = {"path": pa.string(), "index": pa.int64(), "label": pa.string(), "class_index": pa.int64(),
                     "confidence": pa.float64(), "true_label": pa.string(), "error": pa.string()}
            schema = pa.schema([(c, types[c]) for c in self.columns])
            table = pa.Table.from_pydict({c: cols[c] for c in self.columns}, schema=schema)
            if self.parts is not None:
                part = self.path / f"part-{self.parts:05d}.parquet"
                tmp = part.with_name(f"_{part.name}.tmp")  # readers skip names that start with _
                pq.write_table(table, str(tmp))
                os.replace(tmp, part)
                self.parts += 1
                return
            if self._pq is None:
                self._pq = pq.ParquetWriter(str(self.path), schema)
            self._pq.write_table(table)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        if self._pq is not None:
            self._pq.close()
        elif self.suffix == ".parquet" and not self.parts:  # no rows at all: an empty file / part with the schema
            self.write({c: [] for c in self.columns})
            if self._pq is not None:
                self._pq.close()


# ---------------------------------------------------------------- drift windows

class WindowDrift:
    """Consecutive, non-overlapping windows of W outputs → :meth:`DriftReference.check` each.

    The checks run on one worker thread, so they overlap the inference of the next batches (ONNX Runtime,
    numpy and scipy release the GIL); at most ``MAX_PENDING`` full windows wait for it, which bounds memory.
    :meth:`report` waits for every check and stops the thread; on an error, call :meth:`shutdown`.
    """

    MAX_PENDING = 4

    def __init__(self, ref, projected: bool = False):
        self.ref, self.window, self.projected = ref, ref.window, projected
        self._buffer, self._start = WindowBuffer(ref.window), 0
        self._pending: deque = deque()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="adaptserve-drift")
        self.results: list[dict] = []

    def add(self, p_target, probabilities, features) -> None:
        for window in self._buffer.add(p_target, probabilities, features):
            future = self._pool.submit(self.ref.check, *window, projected=self.projected)
            self._pending.append((self._start, future))
            self._start += self.window
            while len(self._pending) > self.MAX_PENDING:
                self._collect()

    def _collect(self) -> None:
        """Wait for the oldest pending check and record its result (a check's exception is raised here)."""
        start, future = self._pending.popleft()
        result = future.result()
        self.results.append({"window": len(self.results), "start": start, "end": start + self.window,
                             "is_drift": bool(result["drift"]), "tests": self.ref.tests(result)})

    def shutdown(self) -> None:
        """Stop the worker thread (pending checks are dropped)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def report(self, model_tag: str, n_images: int) -> dict:
        while self._pending:
            self._collect()
        self.shutdown()
        n = len(self.results)
        alarmed = sum(r["is_drift"] for r in self.results)
        per_test = {t: (sum(any(x["name"] == t and x["is_drift"] for x in r["tests"]) for r in self.results) / n
                        if n else None) for t in TESTS}
        # the whole input: are more windows alarmed than chance allows? P(Binomial(n, α) ≥ alarmed)
        p_all = float(binom.sf(alarmed - 1, n, self.ref.alpha)) if n else None
        return {"model": model_tag, "window_size": self.window, "alpha": self.ref.alpha,
                "alpha_per_test": self.ref.alpha_per_test, "n_images": n_images, "n_windows": n,
                "n_untested_tail": self._buffer.n, "n_windows_alarmed": alarmed,
                "fraction_windows_alarmed": (alarmed / n) if n else None,
                "fraction_windows_alarmed_per_test": per_test,
                "whole_set": {"test": "binomial: alarmed windows against the per-window false-alarm rate alpha",
                              "p_value": p_all, "is_drift": bool(n) and p_all <= self.ref.alpha},
                "note": None if n else f"fewer than {self.window} images were scored: no window was tested",
                "windows": self.results}


# ---------------------------------------------------------------- the job

def _prepare(model, images: list | np.ndarray) -> tuple[np.ndarray | None, list[str | None]]:
    """Bring readable images to the input spec; returns (stacked, per-item error or None).

    An (N,H,W[,C]) array (the ``.npy``/``.npz`` case) or a list of same-shape images goes through one
    vectorised call; per item only when that fails, so one bad item costs only itself."""
    spec = model.input_spec
    if isinstance(images, np.ndarray):
        stack = images
    else:
        shapes = {None if img is None else img.shape for img in images}
        stack = np.stack(images) if len(shapes) == 1 and None not in shapes else None
    if stack is not None:
        try:
            return to_input_spec(stack[..., None] if stack.ndim == 3 else stack, spec), [None] * len(images)
        except ImageError:
            pass
    out, errors = [], []
    for img in images:
        if img is None:
            errors.append(None)
            continue
        try:
            out.append(to_input_spec(img, spec)[0])
            errors.append(None)
        except ImageError as e:
            errors.append(str(e))
    return (np.stack(out) if out else None), errors


def score_batch(model, batch: Batch, drift: bool) -> tuple[dict, object]:
    """One batch → its output columns (``id``, ``label``, ``class_index``, ``confidence``, ``error`` and, when
    labelled, ``true_label``) and the model's Prediction of its readable items (None if none is readable)."""
    classes = model.classes
    stacked, prep_errors = _prepare(model, batch.images)
    pred = model.predict(stacked, discriminator=drift) if stacked is not None else None
    errors = [e or p for e, p in zip(batch.errors, prep_errors)]
    ok = [e is None for e in errors]
    # the readable items' predictions, spread back over all items (None where unreadable)
    index = pred.predictions.tolist() if pred is not None else []
    conf = iter(pred.probabilities[np.arange(len(index)), index].tolist() if pred is not None else [])
    index = iter(index)
    class_index = [next(index) if good else None for good in ok]
    cols = {"id": batch.ids, "label": [None if c is None else classes[c] for c in class_index],
            "class_index": class_index, "confidence": [next(conf) if good else None for good in ok], "error": errors}
    if batch.labels is not None:
        cols["true_label"] = [classes[t] if t is not None and 0 <= t < len(classes) else None for t in batch.labels]
    return cols, pred


class Tally:
    """Counts over the written rows: scored, errors, and accuracy where labelled."""

    def __init__(self):
        self.ok = self.errors = self.correct = self.labelled = 0

    def add(self, cols: dict, labels: list | None) -> None:
        n_ok = sum(c is not None for c in cols["class_index"])
        self.ok += n_ok
        self.errors += len(cols["class_index"]) - n_ok
        if labels is not None:
            known = [(c, t) for c, t in zip(cols["class_index"], labels) if c is not None and t is not None]
            self.labelled += len(known)
            self.correct += sum(c == t for c, t in known)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


def default_max_pixels() -> int:
    raw = os.environ.get("ADAPTSERVE_MAX_PIXELS", "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else DEFAULT_MAX_PIXELS


def check_out(out, batch_size: int) -> Path:
    if batch_size < 1:
        raise ScoreError("--batch-size must be at least 1")
    out = Path(out)
    if is_dataset(out):
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ScoreError(f"--out {out}: a parquet dataset folder must be new or empty (it holds files)")
    elif out.suffix.lower() not in FORMATS:
        raise ScoreError(f"--out {out}: the suffix must be one of {', '.join(FORMATS)} (or none: a parquet "
                         "dataset folder, one file per batch)")
    check_out_parent(out)
    return out


def score(model_source, input_path, out, *, batch_size: int = DEFAULT_BATCH, progress: bool = True,
          device: str = "cpu", threads: int = 0, model=None, drift: bool = True,
          max_pixels: int | None = None) -> dict:
    """Score INPUT with MODEL into ``out`` and ``out.drift.json``; return a summary dict.

    ``drift=False``: no drift windows, no discriminator, no ``out.drift.json`` (a stale one from an earlier
    run on the same ``out`` is removed, so it cannot be read as this run's). ``max_pixels``: an image file
    with more pixels (read from its header) is an error row, not decoded (default ``ADAPTSERVE_MAX_PIXELS``
    or 4096 × 4096). Arrays whose images are not the input spec are converted (``.npy`` at its own size is
    data, like a folder of images); the conversion is said once on stderr and in the drift report."""
    from adaptserve.service.runtime import Model

    out = check_out(out, batch_size)
    t0 = time.perf_counter()
    model = model or Model.open(model_source, device=device, threads=threads)
    source = open_input(input_path, model.classes, batch_size, max_pixels or default_max_pixels())
    conversion = describe_conversion(source.shape, model.input_spec) if source.shape else None

    def results():
        for batch in source.batches:
            cols, pred = score_batch(model, batch, drift)
            outputs = (pred.p_target, pred.probabilities, pred.features) if pred is not None and drift else None
            yield cols, batch.labels, outputs

    return write_results(results(), out, tag=model.tag or str(Path(model_source)), input_path=input_path,
                         kind=source.kind, labelled=source.labelled, n_items=source.n,
                         reference=model.drift_reference if drift else None, conversion=conversion,
                         progress=progress, t0=t0)


def write_results(results, out: Path, *, tag: str, input_path, kind: str, labelled: bool, n_items: int, reference,
                  conversion: str | None, progress: bool, t0: float, projected: bool = False) -> dict:
    """Write scored batches in order — ``(columns, true labels, (p_target, probabilities, features) or None)``
    — to ``out`` and the drift report beside it; return the summary. The local scorer and the Ray engine both
    end here, so their rows, windows and reports are built the same way. ``projected``: the features are
    already PCA-projected (the Ray workers send k floats per image, not D)."""
    from tqdm import tqdm

    if conversion:
        print(f"{input_path}: images converted to the model's input, {conversion}", file=sys.stderr)
    id_col = "path" if kind == "folder" else "index"
    columns = [id_col, "label", "class_index", "confidence"] + (["true_label"] if labelled else []) + ["error"]
    writer = Writer(out, columns)
    monitor = WindowDrift(reference, projected=projected) if reference is not None else None
    tally = Tally()
    bar = tqdm(total=n_items, unit="img", desc="scoring", disable=not progress, file=sys.stderr)
    drift_path = out.with_name(out.name + ".drift.json")
    writing = out
    try:
        for cols, labels, outputs in results:
            cols = {id_col if k == "id" else k: v for k, v in cols.items()}
            writer.write(cols)
            tally.add(cols, labels)
            if outputs is not None and monitor is not None:
                monitor.add(*outputs)
            bar.update(len(cols[id_col]))
        writer.close()
        if monitor is not None:
            report, writing = {**monitor.report(tag, tally.ok), "input_conversion": conversion}, drift_path
            drift_path.write_text(json.dumps(report, indent=2))
        else:
            report = {"n_windows": None, "fraction_windows_alarmed": None}
            drift_path.unlink(missing_ok=True)
    except BaseException as e:  # disk full, a bug, Ctrl-C: no half-written results are left behind
        if monitor is not None:
            monitor.shutdown()
        bar.close()
        try:
            writer.close()
        except OSError:
            pass
        if writer.parts is not None:
            import shutil

            shutil.rmtree(out, ignore_errors=True)  # the folder was new or empty (check_out)
        else:
            out.unlink(missing_ok=True)
        drift_path.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write() names no file: name it
            raise OSError(e.errno, f"cannot write {writing}: {e.strerror}") from None
        raise
    bar.close()
    return {"model": tag, "input": str(input_path), "out": str(out),
            "drift_report": str(drift_path) if monitor is not None else None,
            "n_items": n_items, "n_scored": tally.ok, "n_errors": tally.errors, "input_conversion": conversion,
            "accuracy": tally.accuracy, "n_labelled": tally.labelled,
            "n_windows": report["n_windows"], "fraction_windows_alarmed": report["fraction_windows_alarmed"],
            "whole_set_is_drift": (report.get("whole_set") or {}).get("is_drift"), "seconds": time.perf_counter() - t0}

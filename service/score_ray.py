"""``adaptserve score MODEL INPUT --out OUT --engine ray``: the batch scorer on Ray Data.

    adaptserve score demo-dann:latest photos/ --out scores.csv --engine ray --workers 2
    RAY_ADDRESS=ray://head:10001 adaptserve score m:latest s3://bucket/images.parquet --out s.parquet --engine ray

The same rows as the local scorer (:mod:`service.score`), computed by a pool of Ray actors:

    driver: read INPUT into a Ray Dataset of items ──► actors (``--workers``): decode, bring to the input
    spec, ONNX Runtime, rows + (P(target), softmax, PCA-projected features) ──► driver, in input order:
    write OUT, cut the drift windows, write ``OUT.drift.json``

- INPUT: a folder of images, a ``.npy`` / ``.npz`` file (paths every node can read), or a parquet dataset of
  encoded image bytes (column ``image``; optional ``path`` and ``label`` — a class index or name) at a
  local path or any URI pyarrow reads (``s3://``, ``gs://``, ``hdfs://``, ``file://``).
- The model goes to every actor through Ray's object store (its files, a few MB), and each actor
  verifies them against the manifest's sha256 and opens them from memory (nothing written to its disk), as
  the service verifies its folder. A tampered model is refused on the driver before any actor starts and
  before any row is written.
- Faults: an actor that dies is restarted by Ray Data and its batch retried (``max_restarts`` and
  ``max_task_retries`` are unbounded for actor pools); the driver writes each batch once, when it comes
  back, in order (``preserve_order``), so every row appears exactly once. An unreadable image is an error
  row, as in the local scorer.
- Drift is checked on the driver: each image sends back its P(target) (1 float), softmax (K) and features
  projected on the reference's PCA directions (k = 10) — 84 bytes an image for 10 classes instead of the
  4.8 KB of 1,200 raw features — and the driver cuts consecutive windows of W in input order exactly as
  the local scorer does (:class:`service.drift.WindowBuffer`), so the windows, their p-values and the
  false-alarm rate are the local scorer's, not an approximation (a per-block check would cut other windows
  at block edges).
- ``--address``: unset = a Ray started for this run on this machine (``ray.init(num_cpus=…)``, shut down
  after); ``auto`` or ``ray://host:10001`` = an existing cluster (also ``RAY_ADDRESS``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from adaptserve.service.inputs import Batch, ScoreError, decode_files, list_folder, open_arrays, read_file
from adaptserve.service.preprocess import describe_conversion
from adaptserve.service.score import check_out, default_max_pixels, score_batch, write_results

RAY_BATCH = 1024  # images per Ray task; at 256 the per-task overhead cost 20 % (docs/benchmarks.md §10)
CRASH_ONCE = "ADAPTSERVE_RAY_CRASH_ONCE"  # fault injection for the tests: a path; the first actor batch dies


def model_files(folder: Path) -> dict[str, bytes]:
    """The manifest and every file it lists, as bytes (what an actor needs to open the model anywhere)."""
    from adaptserve.service.runtime import MANIFEST, read_manifest

    manifest = read_manifest(folder)
    return {name: (folder / name).read_bytes() for name in [MANIFEST, *manifest["files"]]}


class Scorer:
    """A Ray Data actor: the model, opened once from its files (sha256-verified), scoring batches of items."""

    def __init__(self, files_ref, kind: str, source: str | None, classes: list[str], labelled: bool,
                 max_pixels: int, threads: int, device: str, drift: bool, crash_once: str | None = None):
        import ray

        from adaptserve.service.runtime import Model

        files = ray.get(files_ref[0])  # wrapped in a list: Ray passes the ref itself, not its value
        # from the bytes, verified, nothing on disk: an actor killed while it opens the model leaves nothing behind
        self.model = Model.from_files(files, device=device, threads=threads, where="the driver's model")
        self.kind, self.source, self.classes, self.labelled = kind, source, classes, labelled
        self.max_pixels, self.drift, self.crash_once = max_pixels, drift, crash_once
        self.arrays = None

    def _batch(self, items: dict) -> Batch:
        if self.kind == "array":
            if self.arrays is None:
                self.arrays = open_arrays(Path(self.source))
            images, labels = self.arrays
            idx = np.asarray(items["id"], np.int64)
            return Batch(idx.tolist(), np.asarray(images[idx]), [None] * len(idx),
                         labels[idx].tolist() if labels is not None else None)
        if self.kind == "folder":
            ids = [str(p) for p in items["id"]]
            datas = [read_file(Path(p)) for p in ids]
        else:  # parquet: encoded bytes in the rows
            datas = [bytes(b) if b is not None else OSError("empty image cell") for b in items["image"]]
            ids = [str(p) for p in items["id"]] if "id" in items else [None] * len(datas)
        images, errors = decode_files(datas, self.max_pixels)
        labels = None
        if self.labelled:
            labels = [self._label(v) for v in items["label"]]
        return Batch(ids, images, errors, labels)

    def _label(self, v):
        if v is None or (isinstance(v, float) and v != v):  # a null of an Arrow column comes back as None or NaN
            return None
        if isinstance(v, (str, bytes)):
            v = v.decode() if isinstance(v, bytes) else v
            return self.classes.index(v) if v in self.classes else None
        return int(v)

    def __call__(self, items: dict) -> dict:
        if self.crash_once and not os.path.exists(self.crash_once):
            Path(self.crash_once).write_text("crashed")
            os._exit(1)
        batch = self._batch(items)
        cols, pred = score_batch(self.model, batch, self.drift)
        n = len(batch.ids)
        out = {"id": np.array(batch.ids, dtype=object), "label": np.array(cols["label"], dtype=object),
               "class_index": np.array([-1 if c is None else c for c in cols["class_index"]], np.int64),
               "confidence": np.array([np.nan if c is None else c for c in cols["confidence"]], np.float64),
               "error": np.array(cols["error"], dtype=object),
               "true_label": np.array(batch.labels if batch.labels is not None else [None] * n, dtype=object)}
        ok = out["class_index"] >= 0
        k = len(self.classes)
        probs = np.zeros((n, k), np.float32)
        proj = np.zeros((n, self.model.drift_reference.pca_components.shape[0]), np.float32)
        p_target = np.zeros(n, np.float32)
        if pred is not None:
            probs[ok] = pred.probabilities
            if self.drift:
                p_target[ok] = pred.p_target
                proj[ok] = self.model.drift_reference.project(pred.features)
        out.update(p_target=p_target, probabilities=probs, projected=proj)
        return out


def _blocks(ray, columns: dict, per_block: int):
    """A Dataset made on the driver (no read task) from equal-length ``columns``, in blocks of ``per_block`` rows.

    No read task: on a cluster whose CPUs all went to the scoring actors a read task would never be scheduled
    (Ray Data waits for it forever). Several blocks: the actor pool gets one block at a time per actor."""
    import pyarrow as pa

    n = len(next(iter(columns.values())))
    return ray.data.from_arrow([pa.table({k: v[i:i + per_block] for k, v in columns.items()})
                                for i in range(0, max(n, 1), per_block)])


def _items(ray, input_path: str, classes: list[str], per_block: int) -> tuple:
    """(Ray Dataset of items, kind, source path, labelled, n, (H, W[, C]) of arrays or None)."""
    s = str(input_path)
    local = Path(s)
    if "://" not in s and local.is_dir() and not any(local.glob("*.parquet")):
        files, labels = list_folder(local, classes)
        columns = {"id": [str(p) for p in files], "label": list(labels) if labels else [None] * len(files)}
        return _blocks(ray, columns, per_block), "folder", None, labels is not None, len(files), None
    if "://" not in s and local.suffix.lower() in (".npy", ".npz"):
        if not local.exists():
            raise ScoreError(f"input {local} does not exist")
        images, labels = open_arrays(local)
        return (_blocks(ray, {"id": np.arange(len(images))}, per_block), "array", str(local.resolve()), labels is not None, len(images),
                tuple(images.shape[1:]))
    if s.endswith(".parquet") or "://" in s or local.is_dir():
        ds = ray.data.read_parquet(s)
        names = ds.schema().names
        if "image" not in names:
            raise ScoreError(f"{s}: a parquet input needs a column 'image' of encoded image bytes (found {names})")
        if "path" in names:
            ds = ds.rename_columns({"path": "id"})
        return ds, "parquet", None, "label" in names, ds.count(), None
    if not local.exists():
        raise ScoreError(f"input {local} does not exist")
    raise ScoreError(f"input {s}: expected a folder of images, a .npy or .npz file, or a parquet dataset")


def score_ray(model_source, input_path, out, *, address: str | None = None, workers: int = 2,
              batch_size: int = RAY_BATCH, gpus_per_worker: float = 0.0, progress: bool = True, drift: bool = True,
              max_pixels: int | None = None) -> dict:
    """Score INPUT with MODEL on Ray Data into ``out`` and ``out.drift.json`` (the local scorer's files)."""
    try:
        import ray
    except ImportError:
        raise ScoreError("--engine ray needs Ray: pip install 'adaptserve[ray]'") from None
    from adaptserve.service.runtime import Model

    if workers < 1:
        raise ScoreError("--workers must be at least 1")
    out = check_out(out, batch_size)
    t0, cpu0 = time.perf_counter(), time.process_time()
    model = Model.open(model_source, device="cpu", threads=1)  # IntegrityError here: nothing has started
    started, t_init = not ray.is_initialized(), time.perf_counter()
    if started:
        address = address or os.environ.get("RAY_ADDRESS")
        kwargs = {"address": address} if address else {"num_cpus": max(workers, os.cpu_count() or 1)}
        ray.init(**kwargs, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    timing = {"ray_init_s": time.perf_counter() - t_init}
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False  # the scorer's own bar, one line (Ray's draws one per operator)
        ctx.print_on_execution_start = False
        import logging

        logging.getLogger("ray.data").setLevel(logging.WARNING)
        items, kind, source, labelled, n, shape = _items(ray, input_path, model.classes, per_block=4 * batch_size)
        files_ref = [ray.put(model_files(model.path))]
        device = "cuda" if gpus_per_worker > 0 else "cpu"
        total = ray.cluster_resources().get("CPU", workers)
        cpus = max(1, int(total / workers)) if not gpus_per_worker else 1  # ORT threads per actor
        # Ray Data's read tasks (its ListFiles asks 1 CPU, whatever ray_remote_args say) wait forever when the
        # actors hold every logical CPU: on parquet input the actors leave one free (the other inputs are
        # built on the driver and need no read task).
        actor_cpus = (max(total - 1, 0) if kind == "parquet" else total) / workers if not gpus_per_worker else 1
        scored = items.map_batches(
            Scorer, batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=actor_cpus,
            num_gpus=gpus_per_worker or None,
            fn_constructor_kwargs={"files_ref": files_ref, "kind": kind, "source": source, "classes": model.classes,
                                   "labelled": labelled, "max_pixels": max_pixels or default_max_pixels(),
                                   "threads": cpus, "device": device, "drift": drift,
                                   "crash_once": os.environ.get(CRASH_ONCE)})

        def results():
            index = 0
            for b in scored.iter_batches(batch_size=None, batch_format="numpy"):
                m = len(b["class_index"])
                if index == 0:  # the fixed cost: Ray, the actors, the model in each, the first batch
                    timing.update(first_batch_s=time.perf_counter() - t0, first_batch_rows=m)
                ids = [index + i if v is None else v for i, v in enumerate(b["id"].tolist())] \
                    if kind == "parquet" else b["id"].tolist()
                index += m
                ok = b["class_index"] >= 0
                cols = {"id": ids, "label": [v if isinstance(v, str) else None for v in b["label"].tolist()],
                        "class_index": [int(c) if good else None for c, good in zip(b["class_index"], ok)],
                        "confidence": [float(c) if good else None for c, good in zip(b["confidence"], ok)],
                        "error": [e if isinstance(e, str) else None for e in b["error"].tolist()]}  # NaN: none
                labels = None
                if labelled:
                    labels = [None if t is None else int(t) if not isinstance(t, str) else model.classes.index(t)
                              for t in b["true_label"].tolist()]
                    cols["true_label"] = [None if t is None or not 0 <= t < len(model.classes) else model.classes[t]
                                          for t in labels]
                outputs = (b["p_target"][ok], b["probabilities"][ok], b["projected"][ok]) if drift and ok.any() else None
                yield cols, labels, outputs

        by_path = kind == "folder" or (kind == "parquet" and "id" in items.schema().names)
        summary = write_results(results(), out, tag=model.tag or str(Path(model_source)), input_path=input_path,
                                kind="folder" if by_path else "array", labelled=labelled, n_items=n,
                                reference=model.drift_reference if drift else None,
                                conversion=describe_conversion(shape, model.input_spec) if shape else None,
                                progress=progress, t0=t0, projected=True)
        rest = summary["seconds"] - timing.get("first_batch_s", 0.0)
        timing["steady_images_per_s"] = (n - timing.get("first_batch_rows", 0)) / rest if rest > 0 else None
        timing["driver_cpu_s"] = time.process_time() - cpu0  # receiving, writing, drift windows: the driver's share
        return {**summary, "engine": "ray", "workers": workers, **timing}
    finally:
        if started:
            ray.shutdown()

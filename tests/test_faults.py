"""Fault injection (issue 6's reliability suite): kills, a tampered model, disk full, unwritable outputs.

- SIGKILL of the whole ``bentoml serve`` process group while clients are sending requests; a restart serves
  again with the same answers and the model store still verifies.
- A model whose file was altered after export is refused where a user meets it: ``bentoml serve`` exits
  with the IntegrityError, ``adaptserve score`` exits 2 with one line. (The runtime side,
  ``Model.open`` on a flipped byte, is tests/test_export.py's.)
- Disk full and an unwritable output folder for ``adaptserve train``, ``export`` and ``score``: one clear
  line, exit status 2, no traceback, no half-written checkpoint / model / scores file. Disk full is a file
  size limit in the child (``RLIMIT_FSIZE``; Python ignores SIGXFSZ, so writes fail with EFBIG), which needs
  no root; the unwritable folder is an ``--out`` below a regular file (fails for root too) and, when not
  running as root, a ``chmod 0o555`` folder.

SIGKILL during training and ``--resume`` is tests/test_training.py's
``test_resume_after_sigkill_matches_uninterrupted_run`` (not repeated here).
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import tiny_model
from test_service import ROOT, Server, npy

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
IS_ROOT = os.geteuid() == 0


def adaptserve(*args, fsize: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI in a child process, optionally with a file size limit of ``fsize`` bytes."""
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))) if fsize else None
    return subprocess.run([sys.executable, "-m", "adaptserve", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=limit)


def assert_one_line_error(r: subprocess.CompletedProcess, command: str, *fragments: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"adaptserve {command}: error: "), r.stderr[-3000:]
    for fragment in fragments:
        assert fragment in line, line
    return line


def store_models() -> set[str]:
    import bentoml

    return {str(m.tag) for m in bentoml.models.list()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def images(tiny):
    from adaptserve.service.preprocess import to_input_spec
    from adaptserve.service.runtime import Model
    from adaptserve.train.data import demo_domain

    x, y = demo_domain("target", "test")
    return to_input_spec(x[:450], Model.open(tiny["folder"]).input_spec), y[:450]


@pytest.fixture()
def a_file(tmp_path) -> Path:
    f = tmp_path / "a-file"
    f.write_text("a regular file where a folder should be\n")
    return f


# ---------------------------------------------------------------- the service

def test_sigkill_of_the_service_under_load_then_restart(tiny, images, tmp_path):
    from adaptserve.service.runtime import Model

    x = images[0][:16]
    body = npy(x)
    headers = {"content-type": "application/x-npy"}
    s = Server(tiny["tag"], tmp_path / "first.log", ADAPTSERVE_THREADS=1)
    results, stop = {"ok": 0, "failed_before_kill": 0, "after_kill": 0}, threading.Event()
    killed = threading.Event()

    def client():
        with httpx.Client(base_url=s.url, timeout=10) as c:
            while not stop.is_set():
                try:
                    ok = c.post("/predict", content=body, headers=headers).status_code == 200
                except httpx.HTTPError:
                    ok = False
                key = "after_kill" if killed.is_set() else ("ok" if ok else "failed_before_kill")
                results[key] += 1

    threads = [threading.Thread(target=client) for _ in range(8)]
    try:
        s.wait_ready()
        expected = httpx.post(s.url + "/predict", content=body, headers=headers, timeout=30).json()
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while results["ok"] < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        killed.set()
        tree = s.tree()
        assert tree, "bentoml serve has no worker process"
        s.kill()  # SIGKILL of the arbiter and its workers (each worker runs in a session of its own)
        assert not any(p.is_running() and p.status() != "zombie" for p in tree), tree
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(15)
    finally:
        stop.set()
        s.stop()
    assert results["ok"] >= 50 and results["failed_before_kill"] == 0, results

    Model.open(tiny["tag"])  # the store's copy still verifies (sha256 of every file)
    again = Server(tiny["tag"], tmp_path / "restart.log", ADAPTSERVE_THREADS=1)
    try:
        again.wait_ready()
        r = httpx.post(again.url + "/predict", content=body, headers=headers, timeout=30)
        assert r.status_code == 200 and r.json()["class_indices"] == expected["class_indices"], r.text
        np.testing.assert_allclose(r.json()["probabilities"], expected["probabilities"], atol=1e-6)
        d = httpx.get(again.url + "/drift", timeout=10).json()
        assert d["status"] == "warming_up" and d["n_in_window"] == 16, d  # drift state is per process: it restarts
    finally:
        again.stop()


@pytest.fixture(scope="module")
def tampered(tiny):
    """A second store model, a copy of the tiny one, whose model.onnx then has one byte flipped."""
    import bentoml

    from adaptserve.export.bundle import save

    tag = save(tiny["folder"], tiny["manifest"], "test-tampered")
    path = Path(bentoml.models.get(tag).path) / "model.onnx"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    yield tag
    bentoml.models.delete(tag)


def test_a_tampered_model_stops_bentoml_serve(tampered, tmp_path):
    s = Server(tampered, tmp_path / "serve.log")
    try:
        code = s.proc.wait(60)
    finally:
        s.stop()
    log = s.log.read_text()
    assert code != 0 and "model.onnx does not match its manifest" in log, log[-3000:]
    assert "re-export the model" in log.strip().splitlines()[-1], log[-3000:]


def test_a_tampered_model_is_refused_by_score(tampered, images, tmp_path):
    np.save(tmp_path / "in.npy", images[0][:8])
    out = tmp_path / "scores.csv"
    r = adaptserve("score", tampered, tmp_path / "in.npy", "--out", out, "--no-progress")
    assert_one_line_error(r, "score", "model.onnx does not match its manifest", "re-export")
    assert not out.exists()


# ---------------------------------------------------------------- disk full, unwritable --out

TRAIN = ["train", "--steps", "4", "--eval-every", "2", "--batch-size", "16", "--threads", "1", "--no-tsne",
         "--no-progress"]


def test_train_disk_full_leaves_no_checkpoint(tmp_path):
    out = tmp_path / "run"
    r = adaptserve(*TRAIN, "--out", out, fsize=64 << 10)  # a checkpoint is ~2.3 MB
    assert_one_line_error(r, "train", "cannot write checkpoint", "best.pt", "disk full")
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert left == [], left  # neither best.pt / last.pt nor a temp file
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # what was written is whole


def test_resume_drops_a_metrics_line_cut_short_by_a_full_disk(tmp_path):
    from adaptserve.train.metrics import MetricsLog, last_step, read_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"kind": "train", "step": s}) for s in (10, 20, 30)]
    path.write_text("\n".join(lines) + "\n" + '{"kind": "eval", "step": 3')  # the last write was cut short
    assert last_step(path) == 30 and [r["step"] for r in read_metrics(path)[1]] == []  # readers skip the cut line
    log = MetricsLog(path, resume_step=20)
    log.write({"kind": "train", "step": 30})
    log.close()
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [10, 20, 30]
    assert last_step(tmp_path / "none.jsonl") == 0


def test_train_out_below_a_file(a_file):
    r = adaptserve(*TRAIN, "--out", a_file / "run")
    assert_one_line_error(r, "train", "Not a directory", str(a_file))


def test_export_disk_full_leaves_nothing(tiny, tmp_path):
    before = store_models()
    out = tmp_path / "model"
    r = adaptserve("export", tiny["base"] / "run", "--name", "test-disk-full", "--out", out, "--bootstrap", "100",
                   fsize=64 << 10)  # model.onnx is ~0.7 MB
    assert_one_line_error(r, "export", "File too large")
    assert store_models() == before and not out.exists() and list(tmp_path.iterdir()) == []


def test_export_out_below_a_file_fails_before_any_work(tiny, a_file):
    before = store_models()
    t0 = time.perf_counter()
    r = adaptserve("export", tiny["base"] / "run", "--name", "test-no-dir", "--out", a_file / "model")
    assert_one_line_error(r, "export", f"{a_file} is a file, not a folder")
    assert time.perf_counter() - t0 < 15 and store_models() == before


def test_score_disk_full_leaves_no_partial_scores(tiny, images, tmp_path):
    np.savez(tmp_path / "in.npz", images=images[0], labels=images[1])
    for name in ("scores.csv", "scores.jsonl"):
        out = tmp_path / "out" / name
        r = adaptserve("score", tiny["folder"], tmp_path / "in.npz", "--out", out, "--no-progress", fsize=8 << 10)
        assert_one_line_error(r, "score", "File too large", f"cannot write {out}")
        assert list((tmp_path / "out").iterdir()) == []  # neither the rows nor the drift report
    r = adaptserve("score", tiny["folder"], tmp_path / "in.npz", "--out", out, "--no-progress")  # room again
    assert r.returncode == 0 and len(out.read_text().splitlines()) == 450, r.stderr[-2000:]


def test_score_out_below_a_file(tiny, images, a_file, tmp_path):
    np.save(tmp_path / "in.npy", images[0][:8])
    r = adaptserve("score", tiny["folder"], tmp_path / "in.npy", "--out", a_file / "scores.csv", "--no-progress")
    assert_one_line_error(r, "score", f"{a_file} is a file, not a folder")


@pytest.mark.skipif(IS_ROOT, reason="root ignores folder permissions (the '--out below a file' tests cover root)")
def test_read_only_out_folder(tiny, images, tmp_path):
    np.save(tmp_path / "in.npy", images[0][:8])
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = adaptserve("score", tiny["folder"], tmp_path / "in.npy", "--out", ro / "scores.csv", "--no-progress")
        assert_one_line_error(r, "score", f"no permission to write in {ro}")
        r = adaptserve("export", tiny["base"] / "run", "--name", "test-ro", "--out", ro / "model")
        assert_one_line_error(r, "export", f"no permission to write in {ro}")
        r = adaptserve(*TRAIN, "--out", ro / "run")
        assert_one_line_error(r, "train", "Permission denied")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)
        shutil.rmtree(ro, ignore_errors=True)

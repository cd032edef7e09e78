import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cli():
    """Command prefix that runs the adaptserve CLI of this checkout in a subprocess."""
    return [sys.executable, "-m", "adaptserve"]


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("ADAPTSERVE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    """Tests never touch the user's BentoML store: one temporary BENTOML_HOME for the whole session, set
    before any test module imports bentoml (it reads the variable at import)."""
    import shutil
    import tempfile

    home = tempfile.mkdtemp(prefix="adaptserve-test-bentoml-")
    os.environ["BENTOML_HOME"] = home
    os.environ["BENTOML_DO_NOT_TRACK"] = "True"
    config.add_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))


_TINY: dict = {}


def tiny_model(tmp_path_factory) -> dict:
    """Train (40 steps) and export one model into the session's BENTOML_HOME and a folder; cached."""
    if not _TINY:
        from adaptserve.export import bundle
        from adaptserve.train.config import TrainConfig
        from adaptserve.train.loop import run

        base = tmp_path_factory.mktemp("tiny-model")
        # 30 % of the demo target's digits held out, as the demo does: 216 calibration digits → windows of 200
        run(TrainConfig(steps=40, batch_size=32, eval_every=20, threads=1, tsne=False, target_holdout=0.3), base / "run",
            progress=False)
        tag, manifest = bundle.export(base / "run", name="test-serve", out=base / "model", n_bootstrap=200)
        _TINY.update(tag=tag, folder=base / "model", manifest=manifest, base=base)
    return _TINY


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny model of ``tiny_model`` and its ONNX runtime (the service, scorer and Ray tests)."""
    from adaptserve.service.runtime import Model

    tiny = tiny_model(tmp_path_factory)
    return {**tiny, "runtime": Model.open(tiny["folder"], device="cpu")}


def train_side_by_side(cli: list[str], runs: dict[str, list[str]], out: Path, timeout: float = 1500) -> dict:
    """``adaptserve train`` once per entry of ``runs`` (name → its flags; ``--out out/name`` is added), all at
    the same time, one process each, as the demo trains; waits for every one and returns each run's
    summary.json by name."""
    import json
    import subprocess

    procs = {name: subprocess.Popen(cli + ["train", *flags, "--out", str(out / name)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, flags in runs.items()}
    for p in procs.values():
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
    return {name: json.loads((out / name / "summary.json").read_text()) for name in runs}


def kill_and_resume(cli: list[str], flags: list[str], out: Path, steps: int) -> tuple[dict, dict]:
    """``adaptserve train *flags`` twice, side by side (one process each): uninterrupted into ``out/full``, and
    into ``out/killed``, SIGKILLed as soon as its first checkpoint is written, then ``--resume``d to the end.
    Returns the two runs' ``checkpoints/last.pt`` (full, killed). ``flags`` is a run of ``steps`` steps."""
    import signal
    import subprocess
    import time

    from adaptserve.train import checkpoint as ckpt_io

    full = subprocess.Popen(cli + ["train", *flags, "--out", str(out / "full")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        run_dir = out / "killed"
        proc = subprocess.Popen(cli + ["train", *flags, "--out", str(run_dir)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        last = run_dir / "checkpoints" / "last.pt"
        deadline = time.time() + 120
        while not last.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = ckpt_io.load(last)["step"]
        assert 0 < killed_at < steps, "the run finished before it could be killed; the test proves nothing"
        r = subprocess.run(cli + ["train", "--resume", str(run_dir), "--no-progress"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        _, err = full.communicate(timeout=600)
        assert full.returncode == 0, err[-3000:]
    finally:
        if full.poll() is None:
            full.kill()
    return ckpt_io.load(out / "full" / "checkpoints" / "last.pt"), ckpt_io.load(last)

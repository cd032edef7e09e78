import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cli():
    """Command prefix that runs the adaptserve CLI of this checkout in a subprocess."""
    return [sys.executable, str(ROOT / "adaptserve.py")]


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

"""One top-level name: a user's own train.py, export.py or service.py (BentoML's own examples name their
file service.py) in the working directory must not shadow a part of adaptserve — not for the CLI, not for
``import``, not for ``bentoml serve``. The package lives under ``adaptserve`` (adaptserve/__init__.py)."""

import json
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

from adaptserve.service.launch import ServeProcess

pytestmark = pytest.mark.slow


@pytest.fixture
def user_project(tmp_path):
    """A directory like a user's: train.py, export.py, service.py that fail loudly if anything imports them."""
    for name in ("train", "export", "service"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user\\'s own {name}.py was imported')\n")
    return tmp_path


def test_cli_and_imports_ignore_the_users_own_modules(user_project):
    for cmd in (["-m", "adaptserve", "--help"], ["-m", "adaptserve", "train", "--help"],
                ["-c", "import adaptserve.train.loop, adaptserve.export.bundle, adaptserve.service.runtime, "
                       "adaptserve.service.score"]):
        r = subprocess.run([sys.executable, *cmd], cwd=user_project, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
    # and the user's files are still theirs: plain `import service` finds service.py, not adaptserve's
    r = subprocess.run([sys.executable, "-c", "import service"], cwd=user_project, capture_output=True, text=True)
    assert "the user's own service.py was imported" in r.stderr


def test_bentoml_serve_from_the_users_project(user_project, model, tmp_path):
    with ServeProcess(model["tag"], tmp_path / "serve.log", cwd=user_project) as server:
        server.wait_ready(120)
        x = np.zeros((2, *[model["manifest"]["input_spec"][k] for k in ("height", "width", "channels")]), np.uint8)
        req = urllib.request.Request(server.url + "/predict", data=json.dumps({"images": x.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and len(json.loads(r.read())["labels"]) == 2

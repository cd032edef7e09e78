"""Start and stop ``bentoml serve`` for this service as a child process on loopback (demo, tests, benchmarks).

    with ServeProcess("adaptserve-demo:latest", log=Path("serve.log")) as srv:
        srv.wait_ready()
        httpx.post(srv.url + "/predict", ...)

The server runs in its own process group (``start_new_session``). BentoML starts each worker in a session
of its own, so signalling the group reaches only the arbiter: :meth:`ServeProcess.stop` sends it SIGTERM
(it stops its workers), then SIGKILL after ``grace`` seconds, and finally kills any process of the tree
still alive; :meth:`ServeProcess.kill` SIGKILLs the whole tree at once (a crash). It always listens on
127.0.0.1 at a free port. Torch-free.

Each server gets a BENTOML_HOME of its own (beside its log) whose ``models`` and ``bentos`` link to the
caller's store: ``bentoml serve`` empties ``$BENTOML_HOME/prometheus_multiproc_dir`` when it starts, so two
servers sharing one home would wipe each other's ``/metrics``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_home(shared: str, home: Path) -> str:
    """A BENTOML_HOME at ``home`` that shares ``shared``'s model and bento stores (``shared`` empty: ~/bentoml)."""
    shared_home = Path(shared or Path.home() / "bentoml").resolve()
    home.mkdir(parents=True, exist_ok=True)
    for store in ("models", "bentos"):
        (shared_home / store).mkdir(parents=True, exist_ok=True)
        link = home / store
        if not link.is_symlink():
            link.symlink_to(shared_home / store, target_is_directory=True)
    return str(home)


class ServeProcess:
    """``bentoml serve adaptserve.service.service:AdaptService`` for model ``model`` (store tag or folder)."""

    def __init__(self, model: str, log: Path, port: int | None = None, argv: list[str] | None = None,
                 cwd: Path = ROOT, **env: object):
        """``argv``: another server command to run instead (e.g. a benchmark's baseline); ``{port}`` in it is
        replaced by the port. ``cwd``: the directory it runs in (a user's project, say; default the repo)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        self.ready_s: float | None = None
        full_env = {**os.environ, "ADAPTSERVE_MODEL": str(model), "BENTOML_DO_NOT_TRACK": "True",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    **{k: str(v) for k, v in env.items()}}
        full_env.setdefault("BENTOML_HOME", "")
        full_env["BENTOML_HOME"] = private_home(full_env["BENTOML_HOME"], self.log.with_suffix(".bentoml"))
        if argv is None:
            bentoml_cli = Path(sys.executable).parent / "bentoml"
            argv = [str(bentoml_cli)] if bentoml_cli.exists() else [sys.executable, "-m", "bentoml"]
            argv += ["serve", "adaptserve.service.service:AdaptService", "--host", "127.0.0.1", "--port", "{port}"]
        self._log = open(self.log, "wb")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([a.replace("{port}", str(self.port)) for a in argv],
                                     cwd=cwd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Poll ``/readyz`` until 200; return seconds since start. Raises RuntimeError with the log's tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with status {self.proc.returncode}; "
                                   f"last lines of {self.log}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1.0) as r:
                    if r.status == 200:
                        self.ready_s = time.perf_counter() - self.t0
                        return self.ready_s
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"bentoml serve not ready after {timeout:.0f} s; last lines of {self.log}:\n{self.tail()}")

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def tree(self) -> list:
        """The server's descendant processes (psutil, a BentoML dependency) — its workers among them."""
        import psutil

        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def kill(self) -> None:
        """SIGKILL the server and every process it started, as a crash of the machine would."""
        tree = self.tree()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._reap(tree)
        self.proc.wait(10)

    def stop(self, grace: float = 15.0) -> None:
        tree = self.tree()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._reap(tree)
        self._log.close()

    @staticmethod
    def _reap(tree: list) -> None:
        import psutil

        for p in tree:
            try:
                p.kill()
            except psutil.Error:  # already gone
                pass
        psutil.wait_procs(tree, timeout=5)

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

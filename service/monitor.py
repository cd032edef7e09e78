"""The live drift monitor of the service: model outputs in, a check of every full window of W images on one
background thread, its result at ``GET /drift`` and as ``adaptserve_drift_*`` Prometheus metrics.

    monitor = DriftMonitor(model.drift_reference, "adaptserve-dann:abc", budget=0.05)
    monitor.add(pred.p_target, pred.probabilities, pred.features)     # after every inference, any N
    monitor.status()                                                  # what GET /drift answers

Windows are cut by :class:`service.drift.WindowBuffer` (as in the batch scorer) and checked with
:meth:`service.drift.DriftReference.check`. State is per worker process.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from adaptserve.service.drift import WindowBuffer

log = logging.getLogger("adaptserve.service")

MAX_PENDING_WINDOWS = 4
DEFAULT_DRIFT_BUDGET = 0.05

_METRICS: dict | None = None
_METRICS_LOCK = threading.Lock()


def metrics() -> dict:
    """The adaptserve_drift_* metrics, created once per process (BentoML sets PROMETHEUS_MULTIPROC_DIR for
    its workers, so they appear on BentoML's /metrics)."""
    global _METRICS
    with _METRICS_LOCK:
        if _METRICS is None:
            from prometheus_client import Counter, Gauge, Histogram

            _METRICS = {
                "p_value": Gauge("adaptserve_drift_p_value", "p-value of the last drift check, per test",
                                 ["test"], multiprocess_mode="mostrecent"),
                "is_drift": Gauge("adaptserve_drift_is_drift", "1 if the last checked window alarmed, else 0",
                                  multiprocess_mode="mostrecent"),
                "checks": Counter("adaptserve_drift_checks_total", "drift checks run (windows of W images)"),
                "alarms": Counter("adaptserve_drift_alarms_total", "drift checks that alarmed"),
                "skipped": Counter("adaptserve_drift_windows_skipped_total",
                                   "full windows not checked: too many checks pending, or within the check budget"),
                "fill": Gauge("adaptserve_drift_window_fill", "images in the current, not yet full window",
                              multiprocess_mode="mostrecent"),
                "seconds": Histogram("adaptserve_drift_check_seconds", "time of one drift check",
                                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)),
            }
    return _METRICS


class DriftMonitor:
    """Buffers model outputs and checks full windows of W images on one background thread.

    ``budget`` caps the checks' share of time: after a check that took t seconds of CPU (its thread's CPU
    time: on a busy machine wall time would overstate it), the next check starts no sooner than
    t·(1/budget − 1) seconds later, so at most ~``budget`` of one core goes to drift checks however heavy
    the traffic. The first check of a process also pays one-off imports (scipy) and caches; it sets no
    cool-down. Windows that fill up during that cool-down are not all dropped: the most
    recent one is kept and checked when the cool-down ends (older ones are counted in ``windows_skipped``),
    so the status after a burst always reflects the burst's last window. At the default 5 % and a check of
    ≈ 3.5 ms (W = 200, docs/benchmarks.md §6), every window is checked up to ≈ 2,800 images/s; above that,
    windows are sampled.
    """

    def __init__(self, reference, model_tag: str, max_pending: int = MAX_PENDING_WINDOWS,
                 budget: float = DEFAULT_DRIFT_BUDGET):
        if not 0 < budget <= 1:
            raise ValueError(f"the drift check budget must be in (0, 1], got {budget}")
        self.ref, self.model_tag, self.window = reference, model_tag, reference.window
        self.max_pending, self.budget = max_pending, budget
        self._next_check_at = 0.0  # time.monotonic() before which new windows are skipped
        self._lock = threading.Lock()
        self._buffer = WindowBuffer(self.window)
        self._pending = 0
        self._deferred = None  # the latest window that filled during the cool-down, checked when it ends
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="adaptserve-drift")
        self.windows_checked = self.windows_skipped = self.alarms = 0
        self.last: dict | None = None
        self.last_checked_at: float | None = None
        self.errors = 0
        self.m = metrics()
        self.m["fill"].set(0)
        self._executor.submit(self._warm)

    def _warm(self) -> None:
        try:  # the reference's own MMD term (n×n kernel) is computed once, here, not on the first window
            self.ref.mmd2(self.ref.pca_mean[None].repeat(2, 0))
        except Exception:  # pragma: no cover
            log.exception("drift reference warm-up failed")

    def add(self, p_target: np.ndarray, probabilities: np.ndarray, features: np.ndarray) -> None:
        with self._lock:
            windows = self._buffer.add(p_target, probabilities, features)
            submit, defer = [], False
            cooling = time.monotonic() < self._next_check_at
            for w in windows:
                if cooling and self._pending < self.max_pending or self._deferred is not None:
                    if self._deferred is not None:  # a newer window replaces the one waiting
                        self.windows_skipped += 1
                        self.m["skipped"].inc()
                    else:
                        self._pending += 1
                        defer = True
                    self._deferred = w
                elif self._pending >= self.max_pending:
                    self.windows_skipped += 1
                    self.m["skipped"].inc()
                else:
                    self._pending += 1
                    submit.append(w)
            self.m["fill"].set(self._buffer.n)
        for w in submit:
            self._executor.submit(self._check, w)
        if defer:
            self._executor.submit(self._check_deferred)

    def _check_deferred(self) -> None:
        """Wait out the cool-down, then check the most recent window that filled during it."""
        with self._lock:
            wait = self._next_check_at - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        with self._lock:
            window, self._deferred = self._deferred, None
        self._check(window)

    def _check(self, window) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            result = self.ref.check(*window)
        except Exception:  # a bug, not the client's: log it, keep serving
            log.exception("drift check failed")
            with self._lock:
                self.errors += 1
                self._pending -= 1
            return
        seconds, cpu = time.perf_counter() - t0, time.thread_time() - c0
        tests = self.ref.tests(result)
        with self._lock:
            if self.windows_checked:
                self._next_check_at = time.monotonic() + cpu * (1 / self.budget - 1)
            self._pending -= 1
            self.windows_checked += 1
            self.alarms += bool(result["drift"])
            self.last = {"tests": tests, "is_drift": bool(result["drift"]), "check_seconds": seconds}
            self.last_checked_at = time.time()
        self.m["checks"].inc()
        if result["drift"]:
            self.m["alarms"].inc()
        self.m["is_drift"].set(1 if result["drift"] else 0)
        for t in tests:
            self.m["p_value"].labels(test=t["name"]).set(t["p_value"])
        self.m["seconds"].observe(seconds)

    def status(self) -> dict:
        with self._lock:
            last = self.last
            out = {"status": "warming_up" if last is None else ("drift" if last["is_drift"] else "ok"),
                   "model": self.model_tag, "window_size": self.window, "n_in_window": self._buffer.n,
                   "alpha": self.ref.alpha, "tests": last["tests"] if last else [],
                   "is_drift": bool(last and last["is_drift"]), "windows_checked": self.windows_checked,
                   "windows_pending": self._pending, "windows_skipped": self.windows_skipped,
                   "alarms": self.alarms, "last_checked_at": self.last_checked_at}
        return out

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until no check is pending (tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._pending == 0:
                    return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)



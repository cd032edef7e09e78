"""Every ``ADAPTSERVE_*`` variable of the service, read once into one frozen :class:`Settings`.

    settings = Settings.from_env()          # raises ValueError naming the variable and what it must be

| variable | default | meaning |
| --- | --- | --- |
| ``ADAPTSERVE_MODEL`` | the bento's model, else ``adaptserve-dann:latest`` | store tag or exported folder |
| ``ADAPTSERVE_DEVICE`` | ``auto`` | ``auto`` / ``cpu`` / ``cuda`` (ONNX Runtime provider) |
| ``ADAPTSERVE_THREADS`` | 0 | ORT intra-op threads (0 = ORT's choice) |
| ``ADAPTSERVE_CONCURRENCY`` | CPU cores, at most 8 | requests whose decoding and inference run at once off the event loop; the others wait their turn (bounds memory) |
| ``ADAPTSERVE_MAX_IMAGES`` | 1024 | images (or files) per request |
| ``ADAPTSERVE_MAX_BYTES`` | 64 MiB | bytes per request body |
| ``ADAPTSERVE_MAX_PIXELS`` | 4096 × 4096 | pixels of one uploaded image file (read from its header) |
| ``ADAPTSERVE_MAX_REQUEST_PIXELS`` | 4 × the above | pixels of all the files of one request |
| ``ADAPTSERVE_API_KEY`` | unset | when set, ``Authorization: Bearer <key>`` on every route but health/metrics/docs |
| ``ADAPTSERVE_DRIFT`` | on | live drift checks on/off |
| ``ADAPTSERVE_DRIFT_BUDGET`` | 0.05 | the largest share of one core the drift checks may take |
| ``ADAPTSERVE_BATCHING`` | auto | BentoML adaptive batching: on / off / auto (= on with a GPU) |
| ``ADAPTSERVE_BATCH_MAX_SIZE`` | 256 | images per merged call |
| ``ADAPTSERVE_BATCH_MAX_LATENCY_MS`` | 60000 | BentoML answers 503 to calls it predicts will wait longer |

The drift window is not a setting: it is the W the model's thresholds were calibrated for at export.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

DEFAULT_MODEL = "adaptserve-dann:latest"
ON, OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"${name} must be at least {minimum}, got {value}")
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ON or raw in OFF:
        return raw in ON
    raise ValueError(f"${name} must be on or off, got {raw!r}")


def _fraction(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"${name} must be a number in (0, 1], got {raw!r}") from None
    if not 0 < value <= 1:
        raise ValueError(f"${name} must be in (0, 1], got {value}")
    return value


def batching_enabled(raw: str, device: str, gpu: bool) -> bool:
    """``ADAPTSERVE_BATCHING``: ``on``, ``off`` or ``auto`` (the default) = on exactly when inference runs on
    a GPU (``ADAPTSERVE_DEVICE`` is not ``cpu`` and a CUDA device is usable). On the CPU BentoML's batching
    costs an extra inter-process hop per request that merging does not win back (docs/benchmarks.md §5);
    on a GPU one large call is much cheaper than many small ones."""
    mode = (raw or "").strip().lower()
    if mode in ("", "auto"):
        return gpu and device.strip().lower() != "cpu"
    if mode in ON or mode in OFF:
        return mode in ON
    raise ValueError(f"$ADAPTSERVE_BATCHING must be on, off or auto, got {raw!r}")


def bundled_model_tag(module_file: str | os.PathLike) -> str | None:
    """The exact model tag ``bentoml build`` bundled, when ``module_file`` runs from a built bento
    (``<bento>/src/service/service.py`` beside ``<bento>/bento.yaml``); None elsewhere.

    Without it a bento served with no ``ADAPTSERVE_MODEL`` (``bentoml serve adaptserve:latest``, ``docker run``)
    would look up ``adaptserve-dann:latest`` — in a container a model that is not there, and on a machine
    with a store the newest local model rather than the one that was built in."""
    src = Path(module_file).resolve().parents[1]
    bento_yaml = src.parent / "bento.yaml"
    if src.name != "src" or not bento_yaml.is_file():
        return None
    import yaml

    info = yaml.safe_load(bento_yaml.read_text()) or {}
    tags = [m["tag"] for s in info.get("services") or [] for m in s.get("models") or []]
    return tags[0] if len(set(tags)) == 1 else None


@dataclass(frozen=True)
class Settings:
    model: str = DEFAULT_MODEL
    device: str = "auto"
    threads: int = 0
    concurrency: int = min(8, os.cpu_count() or 1)
    max_images: int = 1024
    max_bytes: int = 64 << 20
    max_pixels: int = 4096 * 4096
    max_request_pixels: int = 4 * 4096 * 4096
    api_key: str = ""
    drift: bool = True
    drift_budget: float = 0.05
    batching: bool = False
    batch_max_size: int = 256
    batch_max_latency_ms: int = 60_000

    @property
    def model_is_folder(self) -> bool:
        return Path(self.model).is_dir()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, bundled: str | None = None,
                 gpu: bool | None = None) -> "Settings":
        """Read the environment (``env``, default ``os.environ``). ``bundled``: the model a built bento holds.
        ``gpu``: whether a CUDA device is usable (probed only when ``ADAPTSERVE_BATCHING`` is auto)."""
        env = os.environ if env is None else env
        if "ADAPTSERVE_DRIFT_WINDOW" in env:
            raise ValueError("$ADAPTSERVE_DRIFT_WINDOW is gone: the drift window is the one the model's thresholds "
                             "were calibrated for at export (see `adaptserve export --help`); unset it")
        device = env.get("ADAPTSERVE_DEVICE", "auto").strip().lower() or "auto"
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"$ADAPTSERVE_DEVICE must be auto, cpu or cuda, got {device!r}")
        raw_batching = env.get("ADAPTSERVE_BATCHING", "")
        if gpu is None:
            gpu = False
            if raw_batching.strip().lower() in ("", "auto") and device != "cpu":
                from adaptserve.service.runtime import providers

                gpu = "CUDAExecutionProvider" in providers("auto")  # onnxruntime *and* a CUDA device
        max_pixels = _int(env, "ADAPTSERVE_MAX_PIXELS", cls.max_pixels)
        return cls(
            model=env.get("ADAPTSERVE_MODEL") or bundled or DEFAULT_MODEL,
            device=device,
            threads=_int(env, "ADAPTSERVE_THREADS", 0, minimum=0),
            concurrency=_int(env, "ADAPTSERVE_CONCURRENCY", cls.concurrency),
            max_images=_int(env, "ADAPTSERVE_MAX_IMAGES", cls.max_images),
            max_bytes=_int(env, "ADAPTSERVE_MAX_BYTES", cls.max_bytes),
            max_pixels=max_pixels,
            max_request_pixels=_int(env, "ADAPTSERVE_MAX_REQUEST_PIXELS", 4 * max_pixels),
            api_key=env.get("ADAPTSERVE_API_KEY", ""),
            drift=_flag(env, "ADAPTSERVE_DRIFT", True),
            drift_budget=_fraction(env, "ADAPTSERVE_DRIFT_BUDGET", cls.drift_budget),
            batching=batching_enabled(raw_batching, device, gpu),
            batch_max_size=_int(env, "ADAPTSERVE_BATCH_MAX_SIZE", cls.batch_max_size, minimum=2),
            batch_max_latency_ms=_int(env, "ADAPTSERVE_BATCH_MAX_LATENCY_MS", cls.batch_max_latency_ms),
        )

"""The bare server's app inside a minimal BentoML service: the floor of what ``bentoml serve`` costs.

    ADAPTSERVE_MODEL=MODEL_FOLDER .venv/bin/bentoml serve bentoml_bare:BentoBare --working-dir benchmarks \\
        --host 127.0.0.1 --port 38501

Nothing of adaptserve's: the same Starlette routes, ONNX Runtime session and handler as
``benchmarks/bare_server.py`` (one classifier run per request, no validation, no discriminator, no drift),
mounted with ``@bentoml.asgi_app`` on a ``@bentoml.service`` with BentoML's defaults — except that, like the
adaptserve service, ``/predict`` gets no OpenTelemetry span. Its distance from ``bare`` is what BentoML's
server and per-request middleware (metrics, access log, timeout, concurrency, context) cost: no service
served by ``bentoml serve`` can answer faster than this one. ``serve_throughput.py --kinds bentoml-bare``.
"""

from __future__ import annotations

import os

import bentoml
from bare_server import make_app

app = make_app(os.path.join(os.environ["ADAPTSERVE_MODEL"], "model.onnx"), int(os.environ.get("ADAPTSERVE_THREADS", "1")))


@bentoml.service(name="bentoml-bare", tracing={"excluded_urls": ["/predict"]})
@bentoml.asgi_app(app, path="/")
class BentoBare:
    """No APIs of its own: every route is the bare server's."""

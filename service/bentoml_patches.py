"""Workarounds for BentoML behaviour, each applied by one explicit call and each with a test
(tests/test_service.py) that fails when BentoML changes what it works around.

    from adaptserve.service import bentoml_patches
    bentoml_patches.apply()        # before BentoML builds the app (service/service.py does it at import)
"""

from __future__ import annotations

import logging

log = logging.getLogger("adaptserve.service")


def apply() -> None:
    """Every workaround of this module."""
    cancel_bentoml_timeout_timers()
    document_error_responses()
    log_client_errors_without_traceback()
    refuse_urls_in_place_of_files()


ERROR_STATUSES = {400: "the request is malformed or its values are not images the model takes",
                  401: "missing or invalid API key (ADAPTSERVE_API_KEY)",
                  413: "too many images, bytes or pixels (ADAPTSERVE_MAX_*)",
                  415: "unsupported Content-Type", 503: "overloaded (adaptive batching queue full)"}


def document_error_responses() -> None:
    """List the service's client errors in the OpenAPI of every typed API (``/docs.json``).

    BentoML 1.4 documents 400/404/500 for each ``@bentoml.api`` route from one module-level dict
    (``_bentoml_sdk/service/openapi.py: error_responses``) and offers no per-API override; the service also
    answers 401, 413, 415 and 503 (``{"error": ..., "status": ...}``), and BentoML's own 400 for a body that
    fails validation carries pydantic's ``detail`` list where its schema says a string. Set in that dict.
    """
    from _bentoml_sdk.service import openapi
    from bentoml._internal.service.openapi.specification import MediaType, Response, Schema

    body = Schema(type="object", required=["error"], properties={
        "error": Schema(type="string"), "status": Schema(type="integer"),
        "detail": Schema(description="BentoML's validation errors (pydantic), when the body does not fit the API")})
    for status, description in ERROR_STATUSES.items():
        openapi.error_responses[status] = Response(description=description,
                                                   content={"application/json": MediaType(schema=body)})


def refuse_urls_in_place_of_files() -> None:
    """A typed file input (``classify(files: list[Path])``) takes uploaded files only.

    BentoML 1.4's multipart parser treats a form *field* in place of a file as a URL and downloads it
    (``_bentoml_impl/serde.py: MultipartSerde.ensure_file``): the server would fetch whatever a client names,
    and any other text was a 500. Here such a field is a 400 (a pydantic ValidationError, which BentoML
    answers as it answers every invalid body)."""
    from _bentoml_impl.serde import MultipartSerde
    from pydantic_core import PydanticCustomError, ValidationError
    from starlette.datastructures import UploadFile

    if getattr(MultipartSerde.ensure_file, "_adaptserve", False):
        return

    async def ensure_file(obj):
        if isinstance(obj, UploadFile):
            return obj
        error = PydanticCustomError("not_a_file", "must be an uploaded file (a form field with a file name); "
                                                  "URLs and text are not fetched")
        raise ValidationError.from_exception_data("Input", [{"type": error, "loc": ("files",), "input": str(obj)[:80]}])

    ensure_file._adaptserve = True
    MultipartSerde.ensure_file = staticmethod(ensure_file)


class _NoTracebackForClientErrors:
    """A logging filter: a request that failed BentoML's input validation (pydantic) is the client's error;
    log its one line, not the traceback."""

    def filter(self, record) -> bool:
        import pydantic

        if record.exc_info and isinstance(record.exc_info[1], pydantic.ValidationError):
            record.msg = f"{record.msg}: %s"
            record.args = (*(record.args or ()), str(record.exc_info[1]).splitlines()[0])
            record.exc_info, record.exc_text = None, None
        return True


def log_client_errors_without_traceback() -> None:
    """BentoML logs every request its typed APIs refuse (a 400 from pydantic validation) at ERROR with the full
    traceback (``bentoml/_internal/server/http_app.py: log_exception``): a fuzzer or a misconfigured client
    fills the log with tracebacks of client errors. Keep the line, drop the traceback."""
    import logging

    logger = logging.getLogger("bentoml._internal.server.http_app")
    if not any(isinstance(f, _NoTracebackForClientErrors) for f in logger.filters):
        logger.addFilter(_NoTracebackForClientErrors())


def cancel_bentoml_timeout_timers() -> None:
    """Make BentoML's ``TimeoutMiddleware`` cancel its per-request timer when the request is done.

    BentoML 1.4.39 (``bentoml/_internal/server/http/traffic.py``) schedules ``loop.call_later(timeout, ...)``
    for every request and never cancels it, so each request leaves a timer, its future and a copied context
    on the event loop for ``traffic.timeout`` seconds (120 s here): 12,000 one-image requests left 32k
    GC-tracked objects instead of 2k (in-process), and in a 160-s soak the worker grew by 164 MiB without
    this fix against 84 MiB with it (docs/benchmarks.md §8). This replaces the
    middleware's ``__call__`` with the same logic plus ``timer.cancel()``: a request still gets BentoML's 504
    after ``traffic.timeout``. Applied at import, before BentoML builds the app; a BentoML whose middleware
    differs from the one this was written for is left alone (and logged).
    """
    import asyncio
    import inspect

    from bentoml._internal.server.http import traffic

    cls = traffic.TimeoutMiddleware
    if getattr(cls.__call__, "_adaptserve", False):
        return
    try:
        source = inspect.getsource(cls.__call__)
    except (OSError, TypeError):
        source = ""
    if "call_later" not in source or ".cancel()" in source.replace("fut.cancel()", ""):
        log.info("BentoML's TimeoutMiddleware is not the one patched here; leaving it as it is")
        return

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message):
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            await waiter
        except asyncio.TimeoutError:
            if fut.cancel():
                from starlette.responses import JSONResponse

                await JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                   status_code=504)(scope, receive, send)
        else:
            await fut
        finally:
            timer.cancel()

    __call__._adaptserve = True
    cls.__call__ = __call__


cancel_bentoml_timeout_timers()


def upload_filename(path) -> str:
    """The client's file name of a ``Path`` input: BentoML 1.4 saves each uploaded file as
    ``NamedTemporaryFile(suffix=<client's name>)`` in the request's temp dir, i.e. ``tmp`` + 8 random
    characters + the name (``_bentoml_sdk/validators.py``, ``FileSchema``). test_classify_png_uploads
    fails if that changes."""
    name = path.name
    return name[11:] if name.startswith("tmp") and len(name) > 11 else name

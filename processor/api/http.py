"""The HTTP side port, on aiohttp in the daemon's own event loop.

/metrics, /healthz and /readyz are open (scrapers and orchestrators); everything under /v1 is
the programme control API (processor/api/control.py, specs/openapi.yaml) and needs the bearer
token named by `http.api_token_env` (checked at start). Handlers only read or enqueue; nothing
here blocks the loop.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadStatusLine,
    HttpProcessingError,
    InvalidURLError,
    LineTooLong,
)
from prometheus_client import CONTENT_TYPE_LATEST

from processor import limits
from processor.api.control import BODY_BYTES_MAX, ApiError, ControlApi
from processor.api.port import Processor
from processor.api.reveal import REVEAL_PATH, reveal_handler
from processor.api.views import ErrorBody, ErrorDetail
from processor.log_budget import LogBudget
from processor.metrics import Metrics
from processor.security import PanHasher, mask_card_numbers

log = logging.getLogger("processor.api")

DAEMON_KEY: web.AppKey[Processor] = web.AppKey("daemon")
TOKEN_KEY: web.AppKey[str | None] = web.AppKey("api_token")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# aiohttp's own errors (unknown route, wrong method, body too large) under stable codes.
STATUS_CODES: Final = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    417: "expectation_failed",
}
# Kept from aiohttp's error responses: they tell the client what to do next.
PASSED_HEADERS: Final = ("Allow", "WWW-Authenticate", "Retry-After")


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    field: str | None = None,
    details: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    # Each part may quote what the client sent: an unknown key or query parameter is named in
    # `field` as well as in the message.
    message = mask_card_numbers(message)
    if field is not None:
        field = mask_card_numbers(field)
    if details is not None:
        details = {key: mask_card_numbers(value) for key, value in details.items()}
    body = ErrorBody(error=ErrorDetail(code=code, message=message, field=field, details=details))
    return web.Response(
        body=msgspec.json.encode(body),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def is_control_api(request: web.Request) -> bool:
    return request.path == "/v1" or request.path.startswith("/v1/")


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as JSON with a stable code, never as an HTML page."""
    response = await _json_errors(request, handler)
    if is_control_api(request):
        response.headers["Cache-Control"] = "no-store"  # one answer carries a card number
    return response


async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return error_response(
            error.status,
            error.code,
            error.message,
            field=error.field,
            details=error.details,
            headers=error.headers,
        )
    except web.RequestPayloadError:
        # The body does not decode (a corrupt gzip or deflate stream, a broken chunk): the
        # client's to fix, not a failure of ours.
        return error_response(
            400,
            "invalid_body",
            "the body could not be read: its Content-Encoding or chunking is broken",
            field="Content-Encoding",
        )
    except ConnectionResetError:
        # The client went away before its body arrived: nothing to answer, nothing to log loud.
        log.debug("%s %s: the client closed before sending its body", request.method, request.path)
        return error_response(400, "incomplete_body", "the connection closed mid-body")
    except web.HTTPException as error:
        if error.status < 400:
            raise
        code = STATUS_CODES.get(error.status) or error.reason.lower().replace(" ", "_")
        headers = {name: error.headers[name] for name in PASSED_HEADERS if name in error.headers}
        message = error.text or error.reason
        if error.status == 404:
            message = f"no such resource: {request.method} {request.rel_url.path[:200]}"
        elif error.status == 405:
            message = f"{request.method} is not allowed here; allowed: {headers.get('Allow', '')}"
        return error_response(error.status, code, message, headers=headers)
    except Exception:
        # A bug, not bad input (input errors are ApiErrors): say so without details.
        # The route's template, not the address: an address may carry a secret (a token).
        resource = request.match_info.route.resource
        where = resource.canonical if resource is not None else request.rel_url.path[:200]
        log.exception("%s %s failed", request.method, where)
        return error_response(
            500, "internal_error", "the processor failed on this request; it is logged"
        )


async def json_escaped_errors(request: web.Request, response: web.StreamResponse) -> None:
    """The errors aiohttp raises before the middleware runs, in the API's format too.

    An Expect header other than 100-continue is refused by the route's expect handler before
    any middleware: aiohttp's text/plain 417 quoted the header back, to a client that had
    shown no token. Any route, an unknown one included, has that handler, so the answer is
    rewritten here, as it is prepared (on_response_prepare), rather than per route."""
    if not isinstance(response, web.HTTPException) or response.status < 400:
        return
    code = STATUS_CODES.get(response.status) or response.reason.lower().replace(" ", "_")
    message = ESCAPED_MESSAGES.get(response.status, response.reason)
    body = ErrorBody(error=ErrorDetail(code=code, message=message))
    response.body = msgspec.json.encode(body)
    response.content_type = "application/json"
    # The exception's own text set the length; kept, a client reading by it got a cut body.
    response.headers["Content-Length"] = str(len(response.body))
    if is_control_api(request):
        response.headers["Cache-Control"] = "no-store"


# What an error raised before the middleware says; never quoted from the request.
ESCAPED_MESSAGES: Final = {417: "the only expectation supported is Expect: 100-continue"}


@web.middleware
async def control_api_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """/v1 needs the bearer token (compared in constant time)."""
    if not is_control_api(request):
        return await handler(request)
    token = request.app[TOKEN_KEY]
    if token is None:
        raise ApiError(
            503,
            "api_disabled",
            "the control API is switched off (http.control_api = false in the daemon's config)",
        )
    presented = request.headers.get("Authorization", "")
    scheme, _, credentials = presented.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        credentials.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8")
    ):
        challenge = 'Bearer realm="processor"'
        if presented:
            challenge += ', error="invalid_token"'
        raise ApiError(
            401,
            "unauthorized",
            "send Authorization: Bearer <token> with the control API token",
            headers={"WWW-Authenticate": challenge},
        )
    return await handler(request)


async def metrics(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    body = daemon.metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    # The links of every process: the worker processes' as they last reported (within a
    # second); the primary's own count alone said 0 while the workers served every network.
    links = daemon.link_count + int(daemon.metrics.workers.gauge("processor_open_links"))
    return web.json_response(
        {
            "status": "stopping" if daemon.stopping else "ok",
            "links": links,
            "pending": daemon.pending,
        }
    )


async def readyz(request: web.Request) -> web.Response:
    """Ready while accepting, the ledger answers a read transaction and has room: 503 when it
    is full at its ceiling or the last batch of this process or of a worker process failed to
    commit (authorisations are answered 96), ready but `degraded` from 90 % of the ceiling in
    use."""
    daemon = request.app[DAEMON_KEY]
    if daemon.stopping:
        return web.json_response({"ready": False, "reason": "stopping"}, status=503)
    try:
        with daemon.ledger.read() as reader:
            reader.ledger_id()  # any read: the ledger answers
        used = daemon.map_used_ratio()
    except Exception as error:  # any failure to read means not ready; say which
        return web.json_response(
            {"ready": False, "reason": f"ledger unavailable: {type(error).__name__}"}, status=503
        )
    # This process's last batch found it full, or (worker processes report no such thing) the
    # file's pages reach the ceiling: new batches can only use pages freed since.
    if daemon.ledger_full or used >= limits.map_used_full_ratio:
        return web.json_response(
            {"ready": False, "reason": "ledger_full", "map_used_ratio": round(used, 3)},
            status=503,
        )
    if daemon.ledger_failing is not None:
        # Reads work, writes do not (a disk error, a file size limit, a lost checkpoint):
        # every authorisation of the last batch was answered 96.
        return web.json_response(
            {"ready": False, "reason": "ledger_error", "error": daemon.ledger_failing},
            status=503,
        )
    failing_elsewhere = daemon.metrics.workers.gauge("processor_ledger_writes_failing")
    if failing_elsewhere:
        # The links a network keeps open may all be a worker's: answering 96 to everything
        # while /readyz said ready (each process only knew its own batches).
        return web.json_response(
            {
                "ready": False,
                "reason": "ledger_error_in_workers",
                "workers": int(failing_elsewhere),
            },
            status=503,
        )
    if used >= limits.map_used_degraded_ratio:
        return web.json_response(
            {"ready": True, "degraded": "ledger_nearly_full", "map_used_ratio": round(used, 3)}
        )
    return web.json_response({"ready": True})


def build_app(
    daemon: Processor, api_token: str | None, *, hasher: PanHasher | None = None
) -> web.Application:
    """The side port's app; `api_token` None switches the control API off (it answers 503)."""
    app = web.Application(
        middlewares=[json_errors, control_api_guard], client_max_size=BODY_BYTES_MAX
    )
    app[DAEMON_KEY] = daemon
    app[TOKEN_KEY] = api_token
    app.on_response_prepare.append(json_escaped_errors)
    if hasher is None:
        hasher = daemon.hasher  # the key the ledger is bound to
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_routes(ControlApi(daemon, hasher).routes())
    # Outside /v1: the cardholder's browser comes with a one-time token, not the bearer token.
    # GET only: a HEAD (link checkers, previews) must not spend the one use.
    app.router.add_get(REVEAL_PATH, reveal_handler(daemon), allow_head=False)
    return app


# --- requests that are not HTTP enough to reach the app ------------------------------------
#
# aiohttp answers a request its parser refuses (a header line over 8 KB, a control character in
# a header, a bad request line) from RequestHandler.handle_error, before any middleware: a
# text/plain 400 whose body quotes up to 100 bytes of the offending line (an Authorization
# header's token included), logged at ERROR with a traceback. It offers no hook for this
# (aio-libs/aiohttp#3287 is open), so the side port's connections are served by a
# RequestHandler whose handle_error answers in the API's JSON error format, with a status that
# says what was wrong, a message that quotes nothing of the request, and one warning line
# without a traceback, within a log budget. aiohttp.web exports RequestHandler; handle_error is
# its override point (not documented, unchanged in signature through aiohttp 3.x): the tests in
# tests/unit/test_api_http.py and tests/e2e/test_hostile_peers_e2e.py hold it to that.

# (status, code, message) per kind of parser error; the message never quotes the request.
HEADER_LINE_TOO_LONG: Final = (
    431,
    "header_fields_too_large",
    "a request header is longer than 8190 bytes",
)
TOO_MANY_HEADERS: Final = (431, "header_fields_too_large", "the request has over 128 headers")
REQUEST_TARGET: Final = re.compile(rb"([A-Z]{3,10} )?(/|\*|https?:)", re.IGNORECASE)
URI_TOO_LONG: Final = (414, "uri_too_long", "the request target is longer than 8190 bytes")
BAD_REQUEST_LINE: Final = (400, "bad_request", "the request line is not HTTP/1.1")
MALFORMED: Final = (400, "bad_request", "the request is not well-formed HTTP/1.1")
INTERNAL: Final = (
    500,
    "internal_error",
    "the processor failed on this request; it is logged",
)


def malformed_request_answer(exc: BaseException | None) -> tuple[int, str, str]:
    """(status, code, message) for a request aiohttp's parser refused, by its error."""
    if isinstance(exc, LineTooLong):
        # The parser names no part, only the line's first bytes: a request target starts with
        # "/" (or a scheme, or "*"), and the pure-Python parser gives the whole request line
        # ("GET /..."); a header name or value hardly ever looks like either.
        line = exc.args[0] if exc.args else b""
        if isinstance(line, str):
            line = line.encode("latin-1", "replace")
        start = bytes(line[:16]) if isinstance(line, bytes | bytearray) else b""
        if REQUEST_TARGET.match(start):
            return URI_TOO_LONG
        return HEADER_LINE_TOO_LONG
    if isinstance(exc, BadHttpMessage) and exc.message == "Too many headers received":
        return TOO_MANY_HEADERS
    if isinstance(exc, BadStatusLine | InvalidURLError):
        return BAD_REQUEST_LINE
    return MALFORMED


class MalformedRequestLog:
    """One warning line per malformed request, within the port's budget per code; the lines
    left out are counted in `processor_log_lines_suppressed_total{kind="http_<code>"}`."""

    def __init__(self, metrics: Metrics) -> None:
        self._budget = LogBudget()
        self._metrics = metrics

    def write(self, remote: str | None, status: int, code: str, exc: BaseException) -> None:
        kind = f"http_{code}"
        suppressed = self._budget.allow(kind, time.monotonic())
        if suppressed is None:
            self._metrics.log_lines_suppressed.labels(kind).inc()
            return
        more = f" ({suppressed} more like it left out)" if suppressed else ""
        # The error's class only: its message quotes the request (a token, a card number).
        log.warning("HTTP %d %s from %s: %s%s", status, code, remote, type(exc).__name__, more)


class JsonErrorRequestHandler(web.RequestHandler):
    """The side port's connections: aiohttp's, with its own error answers (see above)."""

    def __init__(
        self, manager: web.Server, *, malformed: MalformedRequestLog, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._malformed = malformed

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or not isinstance(exc, HttpProcessingError):
            # Not bad input but a failure on our side that escaped the middleware: loud.
            log.error("HTTP request from %s failed", request.remote, exc_info=exc)
            status, code, text = INTERNAL
        else:
            status, code, text = malformed_request_answer(exc)
            self._malformed.write(request.remote, status, code, exc)
        if request.writer.output_size > 0:  # part of an answer left already: nothing to add
            raise ConnectionError("an answer was being sent; cannot send an error instead")
        response = error_response(status, code, text)
        response.force_close()  # the stream cannot be trusted past a malformed request
        return response


class Accepting(Protocol):
    """The accepting side of the HTTP port, as the composition root provides it: connections
    on a listening socket, each served by the protocol the factory makes, and closed with
    `close()` (processor/server/acceptor.py, which also counts connections refused at the
    open-files limit)."""

    def close(self) -> None: ...


# Starts accepting connections for the protocol factory; returns how to stop.
Accept = Callable[[Callable[[], asyncio.Protocol]], Accepting]


class HttpPort:
    """The side port: aiohttp's app runner, its connections served by JsonErrorRequestHandler."""

    def __init__(self, runner: web.AppRunner, accepting: Accepting):
        self._runner = runner
        self._accepting = accepting

    async def cleanup(self) -> None:
        self._accepting.close()  # no new connections; the runner then closes the open ones
        await self._runner.cleanup()


async def start_http(accept: Accept, daemon: Processor, api_token: str | None) -> HttpPort:
    """Serve the app on the connections `accept` hands over."""
    runner = web.AppRunner(build_app(daemon, api_token), access_log=None)
    await runner.setup()
    manager = runner.server
    assert manager is not None  # set up above
    loop = asyncio.get_running_loop()

    malformed = MalformedRequestLog(daemon.metrics)

    def connection() -> web.RequestHandler:
        # What manager() makes (no access log, as asked of the runner), with the answers of
        # JsonErrorRequestHandler.handle_error.
        # lingering_time=0: a body the handler left unread (an unauthenticated POST, a 404) is
        # not read on after the answer; the connection closes instead. Reading it on decoded a
        # corrupt gzip body and logged aiohttp's "Unhandled exception" traceback per request,
        # before any token was checked.
        return JsonErrorRequestHandler(
            manager, malformed=malformed, loop=loop, access_log=None, lingering_time=0
        )

    try:
        accepting = accept(connection)
    except BaseException:
        await runner.cleanup()
        raise
    return HttpPort(runner, accepting)

"""The HTTP side port, on aiohttp in the daemon's own event loop.

/metrics, /healthz and /readyz are open (scrapers and orchestrators); everything under /v1 is
the programme control API (processor/api/control.py, specs/openapi.yaml) and needs the bearer
token named by `http.api_token_env` (checked at start). Handlers only read or enqueue; nothing
here blocks the loop.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from processor.api.control import BODY_BYTES_MAX, ApiError, ControlApi
from processor.api.port import Processor
from processor.api.views import ErrorBody, ErrorDetail
from processor.security import PanHasher

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
        log.exception("%s %s failed", request.method, request.rel_url.path[:200])
        return error_response(
            500, "internal_error", "the processor failed on this request; it is logged"
        )


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
    return web.json_response(
        {
            "status": "stopping" if daemon.stopping else "ok",
            "links": daemon.link_count,
            "pending": daemon.pending,
        }
    )


async def readyz(request: web.Request) -> web.Response:
    """Ready while accepting and the ledger answers a read transaction."""
    daemon = request.app[DAEMON_KEY]
    if daemon.stopping:
        return web.json_response({"ready": False, "reason": "stopping"}, status=503)
    try:
        with daemon.ledger.read() as reader:
            reader.ledger_id()  # any read: the ledger answers
    except Exception as error:  # any failure to read means not ready; say which
        return web.json_response(
            {"ready": False, "reason": f"ledger unavailable: {type(error).__name__}"}, status=503
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
    if hasher is None:
        hasher = daemon.hasher  # the key the ledger is bound to
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_routes(ControlApi(daemon, hasher).routes())
    return app


async def start_http(
    host: str, port: int, daemon: Processor, api_token: str | None
) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(build_app(daemon, api_token), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses  # with port 0 the OS picked one; report what was bound
    return runner, int(bound[0][1])

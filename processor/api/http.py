"""The HTTP side port, on aiohttp in the daemon's own event loop.

Handlers only read counters and states; nothing here blocks the loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from processor.server.daemon import Daemon

DAEMON_KEY: web.AppKey[Daemon] = web.AppKey("daemon")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as JSON with a stable code, never as an HTML page."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return web.json_response(
            {"error": {"code": error.reason.lower().replace(" ", "_"), "message": error.text}},
            status=error.status,
        )


async def metrics(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    body = generate_latest(daemon.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON_KEY]
    return web.json_response(
        {
            "status": "stopping" if daemon.stopping else "ok",
            "links": len(daemon.links),
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
            reader.account_count()
    except Exception as error:  # any failure to read means not ready; say which
        return web.json_response(
            {"ready": False, "reason": f"ledger unavailable: {type(error).__name__}"}, status=503
        )
    return web.json_response({"ready": True})


def build_app(daemon: Daemon) -> web.Application:
    app = web.Application(middlewares=[json_errors])
    app[DAEMON_KEY] = daemon
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_http(host: str, port: int, daemon: Daemon) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(build_app(daemon), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses  # with port 0 the OS picked one; report what was bound
    return runner, int(bound[0][1])

"""Entry point of the gateway role (``mlx-stack gateway``)."""

from __future__ import annotations

import sys

import uvicorn

from mlx_stack.common import logs
from mlx_stack.common.config import Settings
from mlx_stack.common.meshkeys import load_keys
from mlx_stack.gateway.app import create_app
from mlx_stack.gateway.auth import exposure_warning

KEEP_ALIVE_S = 75
"""How long an idle client connection stays open. Longer than HTTP clients keep an idle
connection in their pools (httpx and the openai SDK: 5 s; Node's agents: 5 s; aiohttp:
15 s), so the client always lets go first: at uvicorn's default (5 s, the same as
httpx's) a client could send its next request on a connection the gateway was closing,
and see it fail before it started (found by tests/test_chaos_hosts.py, once in a few
hundred streams). 75 s is what nginx and load balancers use for the same reason."""


def main(settings: Settings) -> None:
    """Serve the OpenAI API on ``gateway_host:gateway_port`` until SIGINT/SIGTERM."""
    logs.setup("gateway", settings.log_level, settings.log_file)
    if warning := exposure_warning(settings, load_keys(settings.home)):
        print(warning, file=sys.stderr, flush=True)
    uvicorn.run(create_app(settings), host=settings.gateway_host, port=settings.gateway_port,
                log_level=settings.log_level, access_log=False, timeout_graceful_shutdown=2,
                timeout_keep_alive=KEEP_ALIVE_S,
                log_config=None)

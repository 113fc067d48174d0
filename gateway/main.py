"""Entry point of the gateway role (``mlx-stack gateway``)."""

from __future__ import annotations

import sys

import uvicorn

from common import logs
from common.config import Settings
from common.meshkeys import load_keys
from gateway.app import create_app
from gateway.auth import exposure_warning


def main(settings: Settings) -> None:
    """Serve the OpenAI API on ``gateway_host:gateway_port`` until SIGINT/SIGTERM."""
    logs.setup("gateway", settings.log_level, settings.log_file)
    if warning := exposure_warning(settings, load_keys(settings.home)):
        print(warning, file=sys.stderr, flush=True)
    uvicorn.run(create_app(settings), host=settings.gateway_host, port=settings.gateway_port,
                log_level=settings.log_level, access_log=False, timeout_graceful_shutdown=2,
                log_config=None)

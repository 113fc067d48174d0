"""Optional API keys: ``Authorization: Bearer <key>`` on the OpenAI routes.

Keys come from the ``api_keys`` setting (``MLX_STACK_API_KEYS``, comma-separated, or
``api_keys`` in config.toml). With none set, the gateway is open, which is only safe on
loopback: :func:`exposure_warning` says so at start.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from common.config import Settings, is_loopback


class Unauthorized(Exception):
    """A request without a valid key; answered 401 in OpenAI's error shape."""


class ApiKeys:
    """A FastAPI dependency that admits a request only with one of ``keys``."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = [k.encode() for k in keys]

    async def __call__(self, request: Request) -> None:
        if not self.keys:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Unauthorized(
                "You didn't provide an API key. Send it in the header "
                "'Authorization: Bearer YOUR_KEY' (OpenAI clients: api_key=...).")
        token = given.strip().encode()
        # Compare with every key in constant time: no early exit tells which was close.
        if not any([hmac.compare_digest(token, key) for key in self.keys]):
            raise Unauthorized("Incorrect API key provided. Use a key from this gateway's "
                               "api_keys setting (MLX_STACK_API_KEYS).")


def exposure_warning(settings: Settings) -> str | None:
    """The warning to print when the gateway is reachable from the network with no key."""
    if settings.api_key_list or is_loopback(settings.gateway_host):
        return None
    return (f"WARNING: the gateway listens on {settings.gateway_host}:{settings.gateway_port} "
            "without an API key: anyone who can reach this machine can use your models. "
            "Set MLX_STACK_API_KEYS=<key> (or api_keys in config.toml) to require one.")

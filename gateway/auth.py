"""API keys: ``Authorization: Bearer <key>``, or ``x-api-key: <key>`` as Anthropic's
clients send it, on the API routes.

Two kinds of key are accepted:
- the ``api_keys`` setting (``MLX_STACK_API_KEYS``, comma-separated, or ``api_keys`` in
  config.toml): when set, every client needs one, on loopback too;
- the mesh's key (``mlx-stack mesh key``, derived from the mesh secret, the same on every
  node): once the mesh is enabled, a client from the network needs a key, and the mesh's
  key is one. A client on this Mac's loopback needs none unless ``api_keys`` is set.

With neither, the gateway is open, which is only safe on loopback: :func:`exposure_warning`
says so at start.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from mlx_stack.common.config import Settings, is_loopback
from mlx_stack.common.meshkeys import MeshKeys


class Unauthorized(Exception):
    """A request without a valid key; answered 401 in OpenAI's error shape."""


class ApiKeys:
    """A FastAPI dependency that admits a request only with one of the keys it needs
    (see the module docstring)."""

    def __init__(self, keys: list[str], mesh: MeshKeys | None = None) -> None:
        self.configured = [k.encode() for k in keys]
        self.keys = self.configured + ([mesh.api_key.encode()] if mesh else [])
        self.mesh = mesh is not None

    async def __call__(self, request: Request) -> None:
        if not self.keys:
            return
        local = request.client is not None and is_loopback(request.client.host)
        if local and not self.configured:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else ""
        given = given or request.headers.get("x-api-key", "").strip()
        if not given:
            raise Unauthorized(
                "You didn't provide an API key. Send it in the header "
                "'Authorization: Bearer YOUR_KEY' or 'x-api-key: YOUR_KEY' (OpenAI and "
                f"Anthropic clients: api_key=...); {self._which}.")
        token = given.encode()
        # Compare with every key in constant time: no early exit tells which was close.
        if not any([hmac.compare_digest(token, key) for key in self.keys]):
            raise Unauthorized(f"Incorrect API key provided; {self._which}.")

    @property
    def _which(self) -> str:
        """Where a valid key comes from."""
        if self.mesh:
            return ("the mesh's key is printed by `mlx-stack mesh key` on any of its Macs"
                    + (", or use one of the api_keys setting" if self.configured else ""))
        return "use a key from this gateway's api_keys setting (MLX_STACK_API_KEYS)"


def exposure_warning(settings: Settings, mesh: MeshKeys | None) -> str | None:
    """The warning to print when the gateway is reachable from the network with no key."""
    if settings.api_key_list or mesh is not None or is_loopback(settings.gateway_host):
        return None
    return (f"WARNING: the gateway listens on {settings.gateway_host}:{settings.gateway_port} "
            "without an API key: anyone who can reach this machine can use your models. "
            "Run `mlx-stack mesh enable` (the mesh's key is then needed from the network), "
            "or set MLX_STACK_API_KEYS=<key> (or api_keys in config.toml).")

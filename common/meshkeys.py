"""The mesh secret, and the CURVE keys and mesh id derived from it.

A mesh is the set of processes that hold one 32-byte secret. Every ZeroMQ socket of the
mesh uses CURVE with the one key pair derived from it, so traffic is encrypted and a process
without the secret can neither join nor pose as a broker, whatever it advertises over mDNS.
The mesh id published over mDNS is a hash of the public key: meshes sharing a LAN do not
see each other, and the id gives nothing away.

The secret lives in ``<home>/mesh.secret`` (mode 0600). It leaves the machine only as a
join token (``mlx-stack mesh token``), printed on request and never logged. The mesh's
HTTP API key is derived from it too (another purpose, so the key gives the secret away no
more than the CURVE keys do): LAN clients present it to any gateway of the mesh.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.utils import z85

SECRET_FILE = "mesh.secret"
SECRET_BYTES = 32
TOKEN_PREFIX = "mlxs1-"
API_KEY_PREFIX = "mlxs-key-"
_CHECK_BYTES = 3


class MeshSecretError(ValueError):
    """A join token or secret file that cannot be used; the message says what to do."""


@dataclass(frozen=True, slots=True)
class MeshKeys:
    """The key pair every socket of one mesh uses (Z85-encoded, as libzmq wants them)."""

    public: bytes
    secret: bytes = field(repr=False)
    api_key: str = field(default="", repr=False)
    """The mesh's HTTP API key: every gateway of the mesh accepts it from the LAN, so a
    client may use any node or ``mlx-stack.local`` (``mlx-stack mesh key`` prints it)."""

    @classmethod
    def from_secret(cls, secret: bytes) -> MeshKeys:
        curve_secret = z85.encode(_derive(secret, b"curve-key"))
        api_key = API_KEY_PREFIX + base64.urlsafe_b64encode(
            _derive(secret, b"api-key")[:24]).decode()
        return cls(public=zmq.curve_public(curve_secret), secret=curve_secret, api_key=api_key)

    @property
    def mesh_id(self) -> str:
        """What the mesh is called over mDNS: 12 hex digits of the public key's hash."""
        return hashlib.blake2b(z85.decode(self.public), digest_size=6).hexdigest()


def _derive(secret: bytes, purpose: bytes) -> bytes:
    """A key for one purpose; the secret itself is never used as a key."""
    return hashlib.blake2b(secret, digest_size=32, person=b"mlx-stack-mesh",
                           salt=purpose.ljust(16, b"\0")[:16]).digest()


def new_secret() -> bytes:
    return os.urandom(SECRET_BYTES)


def token_of(secret: bytes) -> str:
    """The join token: the secret plus a short checksum (catches a bad copy-paste)."""
    check = hashlib.blake2b(secret, digest_size=_CHECK_BYTES).digest()
    return TOKEN_PREFIX + base64.urlsafe_b64encode(secret + check).decode().rstrip("=")


def secret_of(token: str) -> bytes:
    """The secret in a join token, or :class:`MeshSecretError` saying what went wrong."""
    token = token.strip()
    hint = "copy it again from `mlx-stack mesh token` on a Mac of the mesh"
    if not token.startswith(TOKEN_PREFIX):
        raise MeshSecretError(f"not a mesh join token (it starts with {TOKEN_PREFIX!r}); {hint}")
    body = token[len(TOKEN_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except ValueError:
        raise MeshSecretError(f"the join token is garbled; {hint}") from None
    secret, check = raw[:-_CHECK_BYTES], raw[-_CHECK_BYTES:]
    if len(secret) != SECRET_BYTES or hashlib.blake2b(
            secret, digest_size=_CHECK_BYTES).digest() != check:
        raise MeshSecretError(f"the join token is incomplete or mistyped; {hint}")
    return secret


def secret_path(home: Path) -> Path:
    return home / SECRET_FILE


def save_secret(home: Path, secret: bytes) -> Path:
    """Write the secret readable by this user only (created 0600, never wider)."""
    home.mkdir(parents=True, exist_ok=True)
    path = secret_path(home)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)  # a stale one may be wider open, or a symlink
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
        f.flush()
        os.fsync(f.fileno())  # never a 0-byte secret after a crash
    os.replace(tmp, path)
    return path


def load_secret(home: Path) -> bytes | None:
    """This node's mesh secret, or None when the mesh is not enabled here."""
    path = secret_path(home)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise MeshSecretError(
            f"{path} is readable by other users; run `chmod 600 {path}` (or "
            "`mlx-stack mesh enable --join TOKEN` again) so only you can read the secret")
    secret = path.read_bytes()
    if len(secret) != SECRET_BYTES:
        raise MeshSecretError(f"{path} is not a mesh secret ({len(secret)} bytes, want "
                              f"{SECRET_BYTES}); run `mlx-stack mesh enable --join TOKEN`")
    return secret


def load_keys(home: Path) -> MeshKeys | None:
    """The mesh keys of this node, or None when the mesh is not enabled."""
    secret = load_secret(home)
    return MeshKeys.from_secret(secret) if secret is not None else None

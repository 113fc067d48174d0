"""Configuration: one dataclass, four layers.

Every value comes from, in rising precedence: the default below, ``config.toml`` in the
home directory (``~/.mlx-stack``, or ``$MLX_STACK_HOME``), an environment variable
``MLX_STACK_<NAME>`` (``MLX_STACK_GATEWAY_PORT=4001``), and a command-line flag. The CLI
passes its flags as ``overrides``; roles only ever see a finished :class:`Settings`.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from mlx_stack.common.names import DEFAULT_NAMES, ModelSpec, format_names, parse_names
from mlx_stack.common.wire import MAX_BODY_BYTES

ENV_PREFIX = "MLX_STACK_"


ENDPOINT = re.compile(r"tcp://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}")
"""A broker endpoint as the mesh writes them: ``tcp://host:port`` (IPv6 in brackets)."""


@functools.lru_cache(maxsize=1024)
def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps a server on this machine only (remembered: the
    gateway asks it of every request's client address, and parsing one is not free)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def primary_address() -> str:
    """This machine's address on its default route (connecting a UDP socket sends
    nothing); loopback when there is no route at all."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: never contacted
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def default_home() -> Path:
    return Path(os.environ.get(f"{ENV_PREFIX}HOME") or Path.home() / ".mlx-stack")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a role needs to know, with the defaults a single Mac wants."""

    home: Path = dataclasses.field(default_factory=default_home)
    models_dir: Path | None = None
    """Where pulled/converted models live; defaults to ``<home>/models``."""
    node_id: str = dataclasses.field(default_factory=lambda: socket.gethostname().split(".")[0])

    gateway_host: str = "127.0.0.1"
    gateway_port: int = 4000
    broker_host: str = "127.0.0.1"
    broker_port: int = 4100
    broker_endpoint: str = ""
    """Where workers and gateways connect first; defaults to this node's broker."""
    broker_advertise: str = ""
    """How other nodes reach this broker; defaults to tcp://<broker_host>:<broker_port>."""
    stream_port: int = 0
    """Where the gateway takes the output that workers stream to it directly, on
    broker_host and reached at broker_advertise's host; 0 = any free port. A worker that
    cannot reach it sends through the broker instead (one more hop per token)."""
    peers: str = ""
    """Other brokers' endpoints, comma-separated (static peers, for networks without
    multicast); workers and gateways fall back to them when their broker is silent."""
    priority: int = 0
    """Coordinator preference: the highest priority live broker coordinates."""
    mdns_interfaces: str = ""
    """Interfaces for mDNS discovery: addresses (comma-separated) or ``all``; empty = off."""
    mesh_id: str = "local"
    """Brokers only see brokers of the same mesh id over mDNS."""
    hold_down: float = 5.0
    """Seconds a returning better-ranked broker waits before taking over (no flapping)."""

    heartbeat_interval: float = 0.5
    heartbeat_liveness: int = 3
    queue_size: int = 64
    """Jobs that may wait per model when every worker is busy; more get HTTP 429."""
    grace: float = 10.0
    """Seconds a job for a known model waits for a worker to come back before HTTP 503."""
    request_timeout: float = 600.0
    max_retries: int = 3
    """Workers a request may lose before it fails (a lost broker never counts)."""
    engine_stall_timeout: float = 300.0
    """Seconds one engine call (a step, a prompt joining the batch) may run before the
    worker takes its engine for wedged: it leaves the broker, so that its jobs resume on
    another worker, and exits for its supervisor to start it again. Longer than the
    longest prefill this node should ever run (a long prompt on a small Mac)."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Larger request bodies get HTTP 413 before they are parsed."""
    max_messages: int = 1024
    """Chat requests with more messages get HTTP 400."""
    max_streams_per_client: int = 256
    """SSE streams one client address may hold open at once; more get HTTP 429. A bound
    on a runaway client, above the 100 streams per gateway that load tests open."""
    max_slots: int = 8
    """Most requests one worker decodes at once (its batch); it advertises fewer when the
    KV caches would not fit in the memory left after loading its model."""
    prompt_cache_bytes: int = 1024 * 1024 * 1024
    """Memory for KV caches of prompts already computed, per worker, so that an agent's
    next turn pays only for its new tokens; 0 turns the prompt cache off."""
    cache_routing: bool = True
    """Whether the coordinator sends a job to the worker whose prompt cache probably holds
    its prompt (broker/routing.py); false routes by load, memory and locality only, so the
    difference can be measured (``bench/agents.py``)."""
    max_tokens_limit: int = 32768
    """No request generates more tokens than this (a request asking more gets 400)."""
    default_max_tokens: int = 0
    """Tokens a request that sets no limit may generate; 0 = up to the model's context
    length minus the prompt (OpenAI's behaviour), bounded by max_tokens_limit."""
    serve: str = ""
    """The models ``up`` and ``install`` serve when given no ``--model``: ``SPEC[=TIER,...]``
    separated by ``;`` (in config.toml, ``serve`` of the ``[models]`` section, a list;
    common/names.py). Empty: the default model."""
    model_names: str = format_names(DEFAULT_NAMES)
    """Patterns mapping a client's model names to the mesh's, ``PATTERN=NAME`` separated
    by ``;`` (in config.toml, ``names`` of the ``[models]`` section, a table)."""
    expect_models: str = ""
    """Model names (ids and tiers, comma-separated) this node's workers will serve, set
    by ``mlx-stack up`` and ``install``: a request for one that arrives while they load
    waits the grace period instead of a 404 (a standby's broker announces them to the
    coordinator)."""
    log_level: str = "warning"
    log_file: str = ""
    """Where a role logs instead of stderr, capped and rotated (set for the services
    ``mlx-stack install`` writes: ``<home>/logs/<role>.log``)."""
    api_keys: str = dataclasses.field(default="", repr=False)  # never in logs or tracebacks
    """Keys the gateway accepts as ``Authorization: Bearer``, comma-separated, from every
    client; empty = open on loopback (and, once the mesh is enabled, the mesh's key from
    the network: ``gateway/auth.py``)."""

    def __post_init__(self) -> None:
        """Refuse values that would break the mesh later, where the cause is hard to see
        (a body the protocol cannot carry is dropped by the broker: the request would hang
        until its deadline)."""
        problems = []
        if not 0 < self.max_body_bytes <= MAX_BODY_BYTES // 2:
            problems.append(f"max_body_bytes must be 1..{MAX_BODY_BYTES // 2}")
        if not 0 < self.request_timeout < 1e7:
            problems.append("request_timeout must be a positive number of seconds")
        if not (self.heartbeat_interval > 0 and self.heartbeat_liveness >= 1):
            problems.append("heartbeat_interval must be > 0 and heartbeat_liveness >= 1")
        if not self.engine_stall_timeout > 0:
            problems.append("engine_stall_timeout must be a positive number of seconds")
        if not 1 <= self.max_slots <= 1024:
            problems.append("max_slots must be 1..1024")
        if self.prompt_cache_bytes < 0:
            problems.append("prompt_cache_bytes must be >= 0 (0 turns the prompt cache off)")
        if not 0 <= self.default_max_tokens <= self.max_tokens_limit:
            problems.append("default_max_tokens must be 0..max_tokens_limit (0: up to the "
                            "model's context length)")
        try:
            self.model_specs, self.name_map  # noqa: B018 (parsed to check them)
        except ValueError as exc:
            problems.append(str(exc))
        for name in ("gateway_port", "broker_port", "stream_port"):
            if not 0 <= getattr(self, name) <= 65535:
                problems.append(f"{name} must be a port number, 0..65535")
        if problems:
            raise ValueError("; ".join(problems) + " (fix it in config.toml, the "
                             f"{ENV_PREFIX}<NAME> variable or the flag)")

    @property
    def models_path(self) -> Path:
        return self.models_dir or self.home / "models"

    @property
    def broker_connect(self) -> str:
        if self.broker_endpoint:
            return self.broker_endpoint
        host = "127.0.0.1" if self.broker_host in ("0.0.0.0", "*", "") else self.broker_host
        return f"tcp://{host}:{self.broker_port}"

    @property
    def advertise(self) -> str:
        """How other nodes reach this broker. Bound to every interface (``0.0.0.0``, what
        ``mesh enable`` sets), that is the first mDNS address or the default route's."""
        if self.broker_advertise:
            return self.broker_advertise
        host = self.broker_host
        if host in ("0.0.0.0", "*", ""):
            named = [a for a in self.mdns_interfaces.split(",") if a.strip() not in ("", "all")]
            host = named[0].strip() if named else primary_address()
        return f"tcp://{host}:{self.broker_port}"

    @property
    def peer_list(self) -> list[str]:
        return [p.strip() for p in self.peers.split(",") if p.strip()]

    @property
    def expected_models(self) -> list[str]:
        return [m.strip() for m in self.expect_models.split(",") if m.strip()]

    @property
    def model_specs(self) -> list[ModelSpec]:
        """``serve`` parsed: the models to serve when no ``--model`` is given."""
        return [ModelSpec.parse(s) for s in self.serve.split(";") if s.strip()]

    @property
    def name_map(self) -> dict[str, str]:
        """``model_names`` parsed: pattern -> mesh name, first match wins."""
        return parse_names(self.model_names)

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @property
    def broker_candidates(self) -> list[str]:
        """Where a worker or gateway looks for the coordinator, in order: its own node's
        broker first (it knows whom to redirect to), then the static peers."""
        return list(dict.fromkeys([self.broker_connect, *self.peer_list]))

    @property
    def peer_timeout(self) -> float:
        """Seconds of silence after which a peer is dead."""
        return self.heartbeat_interval * self.heartbeat_liveness

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Defaults < config.toml < MLX_STACK_* environment < ``overrides`` (None = unset)."""
        home = Path(overrides.get("home") or default_home()).expanduser()
        values: dict[str, Any] = {"home": home}
        config_file = home / "config.toml"
        if config_file.is_file():
            with config_file.open("rb") as f:
                values.update(_flatten(tomllib.load(f), config_file))
        for f in dataclasses.fields(cls):
            env = os.environ.get(ENV_PREFIX + f.name.upper())
            if env is not None and f.name != "home":
                values[f.name] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = values.keys() - known.keys()
        if unknown:
            raise ValueError(
                f"unknown setting(s) {sorted(unknown)} in {config_file} or overrides; "
                f"known: {sorted(known)}"
            )
        return cls(**{k: _coerce(k, v, known[k].type) for k, v in values.items()})


def _flatten(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """config.toml's values as settings: the ``[models]`` section (``serve``, a list of
    ``SPEC[=TIER,...]``; ``names``, a table of patterns) becomes ``serve`` and
    ``model_names``, in the form their environment variables take."""
    section = config.pop("models", None)
    if section is None:
        return config
    if not isinstance(section, dict) or section.keys() - {"serve", "names"}:
        raise ValueError(f"[models] in {path} takes serve = [\"SPEC=TIER,...\", ...] and "
                         'names = { "claude-*" = "standard" } only')
    serve, names = section.get("serve", []), section.get("names")
    if not (isinstance(serve, list) and all(isinstance(s, str) for s in serve)):
        raise ValueError(f"[models] serve in {path} must be a list of strings")
    config["serve"] = ";".join(serve)
    if names is not None:
        if not (isinstance(names, dict) and all(isinstance(v, str) for v in names.values())):
            raise ValueError(f"[models] names in {path} must be a table of "
                             '"PATTERN" = "NAME"')
        config["model_names"] = format_names(names)
    return config


def update_config_file(home: Path, **values: Any) -> Path:
    """Set (or, with None, remove) keys in ``<home>/config.toml``, keeping the others.
    What the ``mesh`` commands use to remember a choice across restarts."""
    path = home / "config.toml"
    current: dict[str, Any] = {}
    if path.is_file():
        with path.open("rb") as f:
            current = tomllib.load(f)
    for key, value in values.items():
        if value is None:
            current.pop(key, None)
        else:
            current[key] = value
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(current))
    return path


def _coerce(name: str, value: Any, type_name: Any) -> Any:
    """Turn a string from the environment or TOML into the field's type, or explain."""
    kind = str(type_name)
    try:
        if "Path" in kind:
            return Path(value).expanduser() if value not in (None, "") else None
        if kind == "bool":
            return _boolean(value)
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"setting {name}={value!r} is not a valid {kind}; "
            f"fix {ENV_PREFIX}{name.upper()} or {name} in config.toml"
        ) from None


BOOLEANS = {"true": True, "1": True, "yes": True, "on": True,
            "false": False, "0": False, "no": False, "off": False}
"""The words a boolean setting takes in the environment (TOML has its own true/false)."""


def _boolean(value: Any) -> bool:
    """A TOML boolean as it is; a word from the environment by :data:`BOOLEANS`. Anything
    else is refused: ``bool("false")`` is true, the opposite of what was meant."""
    if isinstance(value, bool):
        return value
    try:
        return BOOLEANS[str(value).strip().lower()]
    except KeyError:
        raise ValueError(value) from None

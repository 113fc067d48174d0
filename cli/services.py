"""This node's roles as OS services: one description, rendered for launchd and systemd.

A node is a broker, a gateway and one worker per model, as under ``mlx-stack up``; run as
services, the OS starts them when the user logs in (on Linux at boot too, once
``loginctl enable-linger`` is set for the user) and restarts whichever dies. Each service is
described once (:class:`Service`: its command line, environment and log), and rendered
from that: a LaunchAgent plist on macOS (``KeepAlive``, ``RunAtLoad``) and a user unit on
Linux (``Restart=always``). ``deploy/`` holds examples of both, written by
:func:`write_examples` (a test keeps them in step).

Paths come from the running interpreter (``python -m mlx_stack.cli`` of this installation) and the
node's settings. Each role logs to ``<home>/logs/<role>.log``, capped and rotated by the
role itself (``log_file``); what the OS catches on stdout and stderr (a crash's traceback)
goes to ``<home>/logs/<role>.out``.
"""

from __future__ import annotations

import plistlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from mlx_stack.common.config import ENV_PREFIX, Settings
from mlx_stack.common.names import ModelSpec

LABEL_PREFIX = "com.mlx-stack."
UNIT_PREFIX = "mlx-stack-"


@dataclass(frozen=True, slots=True)
class Service:
    """One role of this node as the OS runs it."""

    role: str
    """``broker``, ``gateway`` or ``worker-<model>``: the name in logs and commands."""
    argv: list[str]
    env: dict[str, str]
    home: Path

    @property
    def log(self) -> Path:
        return self.home / "logs" / f"{self.role}.log"

    @property
    def out(self) -> Path:
        return self.home / "logs" / f"{self.role}.out"

    @property
    def label(self) -> str:
        """The launchd label (also the plist's file name)."""
        return LABEL_PREFIX + self.role

    @property
    def unit(self) -> str:
        """The systemd unit's name."""
        return f"{UNIT_PREFIX}{self.role}.service"


@dataclass(frozen=True, slots=True)
class ServedModel:
    """One model of this node, as its worker is told to serve it."""

    spec: str
    """``default``, an absolute model directory (a service runs in another directory), a
    name under the models directory or a cached Hugging Face id."""
    model_id: str
    tiers: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Every name a request may use for it."""
        return (self.model_id, *self.tiers)

    @property
    def argv(self) -> list[str]:
        """The worker's ``--model``, tiers always written out (``SPEC=`` for none): the
        node, not the worker alone, decides whether the default model takes its tiers."""
        return ["--model", str(ModelSpec(self.spec, self.tiers, explicit=True))]


def services(cfg: Settings, workers: list[ServedModel], overrides: dict[str, object],
             python: str = sys.executable) -> list[Service]:
    """The services of this node: its broker, one worker per model (with its tiers) and
    its gateway. ``overrides`` are the settings given as flags, which the services get as
    ``MLX_STACK_*`` variables (the rest they read from ``config.toml`` as every role
    does)."""
    base = {f"{ENV_PREFIX}{k.upper()}": str(v) for k, v in overrides.items() if v is not None}
    base[f"{ENV_PREFIX}HOME"] = str(cfg.home)
    base["PYTHONUNBUFFERED"] = "1"

    def service(role: str, *args: str, **env: str) -> Service:
        log = str(cfg.home / "logs" / f"{role}.log")
        return Service(role, [python, "-m", "mlx_stack.cli", *args], {
            **base, f"{ENV_PREFIX}LOG_FILE": log, **env}, cfg.home)

    return [service("broker", "broker", **{f"{ENV_PREFIX}EXPECT_MODELS": expected_names(
                workers)}),
            *(service(f"worker-{safe(w.model_id)}", "worker", *w.argv) for w in workers),
            service("gateway", "gateway")]


def expected_names(workers: list[ServedModel]) -> str:
    """Every name the workers will serve (ids and tiers), as ``expect_models`` wants."""
    return ",".join(n for w in workers for n in w.names)


def model_specs(given: list[str] | None, cfg: Settings) -> list[ModelSpec]:
    """What to serve: the ``--model`` flags, else config.toml's ``[models] serve``, else
    the default model. ValueError naming the fix for a malformed one."""
    if given:
        return [ModelSpec.parse(text) for text in given]
    return cfg.model_specs or [ModelSpec("default")]


def resolve_workers(specs: list[ModelSpec], models_dir: Path, pull: bool = True
                    ) -> list[ServedModel]:
    """Each model to serve, with its model id and tiers (the default model pulled and
    converted here, with progress on this terminal, unless ``pull`` is false);
    ValueError or RuntimeError saying why one cannot be served."""
    from mlx_stack.worker.default_model import DEFAULT_MODEL_ID
    from mlx_stack.worker.models import is_default, resolve_model, tiers_of

    out = []
    for model in specs:
        tiers = tuple(tiers_of(model, alone=len(specs) == 1))
        if is_default(model.spec):
            if pull:
                resolve_model("default", models_dir)
            out.append(ServedModel("default", DEFAULT_MODEL_ID, tiers))
            continue
        _, model_id = resolve_model(model.spec, models_dir)
        local = Path(model.spec).expanduser()
        # Absolute, as a service runs elsewhere; not resolved: the model's id is the
        # directory's own name, also when it is a link to another model's files.
        spec = str(local.absolute()) if local.is_dir() else model.spec
        out.append(ServedModel(spec, model_id, tiers))
    return out


def safe(name: str) -> str:
    """``name`` as a piece of a launchd label and a unit name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def plist(service: Service) -> bytes:
    """The LaunchAgent: started at login (RunAtLoad), restarted whenever it exits
    (KeepAlive), at most every 5 s (ThrottleInterval)."""
    return plistlib.dumps({
        "Label": service.label,
        "ProgramArguments": service.argv,
        "EnvironmentVariables": service.env,
        "WorkingDirectory": str(service.home),
        "RunAtLoad": True,
        "KeepAlive": True,
        "ThrottleInterval": 5,
        "ProcessType": "Interactive",  # inference must not be throttled as background work
        "StandardOutPath": str(service.out),
        "StandardErrorPath": str(service.out),
    })


def unit(service: Service) -> str:
    """The systemd user unit: started with the user's session (default.target) and
    restarted whenever it exits."""
    env = "\n".join(f"Environment={_quote(f'{k}={v}')}" for k, v in service.env.items())
    return f"""[Unit]
Description=mlx-stack {service.role}

[Service]
ExecStart={" ".join(_quote(a) for a in service.argv)}
{env}
WorkingDirectory={service.home}
Restart=always
RestartSec=1
StandardOutput=append:{service.out}
StandardError=append:{service.out}

[Install]
WantedBy=default.target
"""


def _quote(word: str) -> str:
    """A word as systemd reads it: double quotes when it has spaces or quotes."""
    if re.fullmatch(r"[A-Za-z0-9_./:=,+@%-]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_examples(deploy: Path) -> list[Path]:
    """Render ``deploy/``'s examples: the services of a node serving the default model,
    for a user ``you`` with a checkout at ``~/mlx-stack`` (on a Mac and on Linux)."""
    written = []
    for kind, user in (("launchd", Path("/Users/you")), ("systemd", Path("/home/you"))):
        cfg = Settings(home=user / ".mlx-stack", node_id="mac-mini-1")
        default = ServedModel("default", "SmolLM2-135M-Instruct", ("fast", "standard"))
        for s in services(cfg, [default], {},
                          python=str(user / "mlx-stack" / ".venv" / "bin" / "python")):
            path, data = ((deploy / kind / f"{s.label}.plist", plist(s)) if kind == "launchd"
                          else (deploy / kind / s.unit, unit(s).encode()))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            written.append(path)
    return written

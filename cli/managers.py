"""launchd and systemd, driven for ``mlx-stack install``, ``uninstall``, ``status``, ``down``.

What to do is decided by :func:`plan` from what is on disk and what runs (no I/O), then
carried out by :meth:`Manager.apply`, which writes files and runs ``launchctl`` or
``systemctl --user``. A service whose file is already what would be written, and which
runs, is left alone: installing twice changes nothing the second time.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mlx_stack.cli.services import LABEL_PREFIX, UNIT_PREFIX, Service, plist, unit

QUERY_TIMEOUT_S = 10.0
CHANGE_TIMEOUT_S = 120.0
"""For a command that stops or starts a service: the OS waits for the old process to exit
(launchd up to 20 s, systemd up to 90 s) before it answers."""


class ServiceError(RuntimeError):
    """A launchctl or systemctl command failed; the message names it and what it said."""


@dataclass(frozen=True, slots=True)
class State:
    """What the OS says of one service."""

    loaded: bool
    running: bool = False
    pid: int = 0
    restarts: int = 0


@dataclass
class Plan:
    """In this order: commands that stop services, files to delete and to write, then
    commands that (re)load and start services. A service is stopped while its file still
    exists: systemd cannot stop a unit whose file is gone."""

    stops: list[list[str]] = field(default_factory=list)
    deletes: list[Path] = field(default_factory=list)
    writes: dict[Path, bytes] = field(default_factory=dict)
    starts: list[list[str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.stops or self.deletes or self.writes or self.starts)


class Manager:
    """One service manager; :class:`Launchd` and :class:`Systemd` fill in the details."""

    name = ""
    suffix = ""
    prefix = ""
    reload: list[str] = []
    """What makes the manager read changed files again (systemd), if anything."""

    def __init__(self, user_home: Path | None = None) -> None:
        self.user_home = user_home or Path.home()

    @property
    def directory(self) -> Path:
        raise NotImplementedError

    def path(self, service: Service) -> Path:
        raise NotImplementedError

    def render(self, service: Service) -> bytes:
        raise NotImplementedError

    def state(self, name: str) -> State:
        """Ask the OS about the service whose file is named ``name`` (without suffix)."""
        raise NotImplementedError

    def start(self, path: Path, fresh: bool, state: State) -> list[list[str]]:
        """Commands that load and start the service in ``path``, now in ``state``
        (``fresh``: its file was just written or changed, so a running copy must be
        restarted)."""
        raise NotImplementedError

    def stop(self, name: str) -> list[list[str]]:
        """Commands that stop and unload the service ``name``."""
        raise NotImplementedError

    def halt(self, name: str) -> Plan:
        """Stop the service ``name`` until the next login or install (``down``)."""
        return Plan(stops=self.stop(name))

    def installed(self) -> list[Path]:
        """This node's service files present now."""
        return sorted(self.directory.glob(f"{self.prefix}*{self.suffix}"))

    @staticmethod
    def name_of(path: Path) -> str:
        """The name the manager knows a service by: its label (launchd), its unit file's
        name (systemd)."""
        return path.name.removesuffix(".plist")

    def apply(self, plan: Plan, dry_run: bool, say: Callable[[str], object]) -> None:
        """Carry ``plan`` out, saying each step (with ``dry_run``, only say them); stop at
        the first command that fails, with :class:`ServiceError`."""
        for argv in plan.stops:
            self._run_step(argv, dry_run, say, ok_if_absent=True)
        for path in plan.deletes:
            say(f"delete {path}")
            if not dry_run:
                path.unlink(missing_ok=True)
        for path, data in plan.writes.items():
            say(f"write {path}")
            if not dry_run:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        for argv in plan.starts:
            self._run_step(argv, dry_run, say, ok_if_absent=False)

    @staticmethod
    def _run_step(argv: list[str], dry_run: bool, say: Callable[[str], object],
                  ok_if_absent: bool) -> None:
        """Run one command; a stop may find the service gone already (not an error)."""
        say("run " + shlex.join(argv))
        if dry_run:
            return
        try:
            done = subprocess.run(argv, capture_output=True, text=True, check=False,
                                  timeout=CHANGE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ServiceError(f"`{shlex.join(argv)}` failed: {exc}") from None
        if done.returncode != 0 and not ok_if_absent:
            raise ServiceError(f"`{shlex.join(argv)}` exited with {done.returncode}: "
                               f"{(done.stderr or done.stdout).strip()[:300]}")


class Launchd(Manager):
    """LaunchAgents in ``~/Library/LaunchAgents``, in the user's GUI domain."""

    name = "launchd"
    suffix = ".plist"
    prefix = LABEL_PREFIX

    @property
    def directory(self) -> Path:
        return self.user_home / "Library" / "LaunchAgents"

    @property
    def domain(self) -> str:
        return f"gui/{os.getuid()}"

    def path(self, service: Service) -> Path:
        return self.directory / f"{service.label}.plist"

    def render(self, service: Service) -> bytes:
        return plist(service)

    def state(self, name: str) -> State:
        done = _run(["launchctl", "print", f"{self.domain}/{name}"])
        if done is None or done.returncode != 0:
            return State(loaded=False)
        fields = dict(line.strip().split(" = ", 1) for line in done.stdout.splitlines()
                      if " = " in line and line.startswith("\t") and not line.startswith("\t\t"))
        return State(loaded=True, running=fields.get("state") == "running",
                     pid=_int(fields.get("pid")), restarts=max(0, _int(fields.get("runs")) - 1))

    def start(self, path: Path, fresh: bool, state: State) -> list[list[str]]:
        unload = [["launchctl", "bootout", f"{self.domain}/{self.name_of(path)}"]]
        return [*(unload if state.loaded else []),
                ["launchctl", "bootstrap", self.domain, str(path)]]

    def stop(self, name: str) -> list[list[str]]:
        return [["launchctl", "bootout", f"{self.domain}/{name}"]]


class Systemd(Manager):
    """User units in ``~/.config/systemd/user``, run by the user's systemd."""

    name = "systemd"
    suffix = ".service"
    prefix = UNIT_PREFIX
    reload = ["systemctl", "--user", "daemon-reload"]

    @property
    def directory(self) -> Path:
        return self.user_home / ".config" / "systemd" / "user"

    def path(self, service: Service) -> Path:
        return self.directory / service.unit

    def render(self, service: Service) -> bytes:
        return unit(service).encode()

    def state(self, name: str) -> State:
        done = _run(["systemctl", "--user", "show", name,
                     "--property=LoadState,ActiveState,MainPID,NRestarts"])
        if done is None or done.returncode != 0:
            return State(loaded=False)
        fields = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
        return State(loaded=fields.get("LoadState") == "loaded",
                     running=fields.get("ActiveState") == "active",
                     pid=_int(fields.get("MainPID")), restarts=_int(fields.get("NRestarts")))

    def start(self, path: Path, fresh: bool, state: State) -> list[list[str]]:
        return [["systemctl", "--user", "enable", path.name],
                ["systemctl", "--user", "restart" if fresh else "start", path.name]]

    def stop(self, name: str) -> list[list[str]]:
        return [["systemctl", "--user", "disable", "--now", name]]

    def halt(self, name: str) -> Plan:
        return Plan(stops=[["systemctl", "--user", "stop", name]])


MANAGERS: dict[str, type[Manager]] = {"launchd": Launchd, "systemd": Systemd}


def plan(manager: Manager, wanted: list[Service], present: dict[Path, bytes],
         states: dict[str, State]) -> Plan:
    """What installing ``wanted`` takes, given the service files ``present`` (path ->
    content) and the OS's ``states`` of them by name: stop and delete this node's
    services that are no longer wanted, write what differs, start what does not run."""
    out = Plan()
    paths = {manager.path(s): manager.render(s) for s in wanted}
    for path in sorted(present.keys() - paths.keys()):
        out.stops += manager.stop(manager.name_of(path))
        out.deletes.append(path)
    starts = []
    for path, data in paths.items():
        state = states.get(manager.name_of(path), State(loaded=False))
        fresh = present.get(path) != data
        if fresh:
            out.writes[path] = data
        if fresh or not state.running:
            starts += manager.start(path, fresh, state)
    if manager.reload and (out.writes or out.deletes):
        out.starts.append(manager.reload)
    out.starts += starts
    return out


def uninstall_plan(manager: Manager, present: list[Path]) -> Plan:
    """Stop and delete every service of this node."""
    return Plan(stops=[argv for path in present for argv in manager.stop(manager.name_of(path))],
                deletes=list(present),
                starts=[manager.reload] if manager.reload and present else [])


def _run(argv: list[str]) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0

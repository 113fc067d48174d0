"""This node for good: ``install``, ``uninstall``, ``status``, ``logs``, ``down``.

``install`` runs each role of the node as an OS service (:mod:`cli.services` says what
they are, :mod:`cli.managers` drives launchd or systemd), so that the node starts at login
and a role that dies is restarted. ``status`` shows them and the mesh, ``logs`` their logs,
``down`` stops them (or a foreground ``mlx-stack up``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import psutil
import typer
from rich.markup import escape
from rich.table import Table

from mlx_stack.cli.console import err, out, settings
from mlx_stack.cli.managers import MANAGERS, Manager, Plan, ServiceError, plan, uninstall_plan
from mlx_stack.cli.services import LABEL_PREFIX, UNIT_PREFIX, services
from mlx_stack.common.control import ControlClient, ControlError
from mlx_stack.common.meshkeys import load_keys

Home = Annotated[Path | None, typer.Option(help="Config, secrets and models [~/.mlx-stack].",
                                           show_default=False)]
ManagerName = Annotated[str | None, typer.Option(
    "--manager", help="launchd or systemd \\[launchd on macOS, systemd elsewhere].",
    show_default=False)]
Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts, not tables.")]
UP_PID = "up.pid"
"""A foreground ``mlx-stack up`` writes its pid here, for ``down``."""
ERROR_MARKS = (" ERROR ", " CRITICAL ", "Traceback", "Error:")


def manager(name: str | None) -> Manager:
    name = name or ("launchd" if sys.platform == "darwin" else "systemd")
    if name not in MANAGERS:
        err.print(f"[red]unknown service manager {escape(name)}[/red]; use launchd or systemd")
        raise typer.Exit(2)
    return MANAGERS[name]()


def install(
    model: Annotated[list[str] | None, typer.Option(
        help="Model to serve, SPEC[=TIER[,TIER...]] as for `up` (repeatable, one worker "
        "each); its tiers are written into its service. \\[config.toml's \\[models] serve, "
        "else the default model]", show_default=False)] = None,
    port: Annotated[int | None, typer.Option(help="Gateway HTTP port [4000].",
                                             show_default=False)] = None,
    broker_port: Annotated[int | None, typer.Option(help="Broker port [4100].",
                                                    show_default=False)] = None,
    node_id: Annotated[str | None, typer.Option(help="This node's name \\[hostname].",
                                                show_default=False)] = None,
    home: Home = None, manager_name: ManagerName = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print what would be written and run; change nothing.")] = False,
) -> None:
    """Run this node's roles as services that start at login and restart when they die.

    One service per role: the broker, the gateway and one worker per model (LaunchAgents
    on macOS, systemd user units on Linux). Each role logs to <home>/logs/<role>.log.
    Running it again applies a change (another model, port) and leaves the rest alone."""
    from mlx_stack.cli.services import model_specs, resolve_workers

    overrides = {"node_id": node_id, "gateway_port": port, "broker_port": broker_port}
    cfg = settings(home=home, **overrides)
    try:
        workers = resolve_workers(model_specs(model, cfg), cfg.models_path, pull=not dry_run)
    except (ValueError, RuntimeError) as exc:
        err.print(f"[red]cannot install:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    mgr = manager(manager_name)
    wanted = services(cfg, workers, overrides)
    present = {path: path.read_bytes() for path in mgr.installed()}
    states = {mgr.name_of(p): mgr.state(mgr.name_of(p))
              for p in (mgr.path(s) for s in wanted) if p in present}
    todo = plan(mgr, wanted, present, states)
    if not todo:
        out.print(f"nothing to change: {len(wanted)} services installed and running "
                  f"({mgr.name}; `mlx-stack status` shows them)")
        return
    if dry_run:  # plain print: whole lines to copy, never wrapped
        for path, data in todo.writes.items():
            print(f"# {path}\n{data.decode()}")
    else:  # the OS opens each service's <role>.out there before the role runs
        (cfg.home / "logs").mkdir(parents=True, exist_ok=True)
    apply(mgr, todo, dry_run)
    if not dry_run:
        out.print(f"installed {len(wanted)} services ({mgr.name}); logs in "
                  f"{cfg.home / 'logs'}; `mlx-stack status` shows them")


def uninstall(home: Home = None, manager_name: ManagerName = None,
              dry_run: Annotated[bool, typer.Option(
                  "--dry-run", help="Print what would be run; change nothing.")] = False,
              ) -> None:
    """Stop this node's services and remove them (config, secret, models and logs stay)."""
    settings(home=home)
    mgr = manager(manager_name)
    present = mgr.installed()
    if not present:
        out.print("no mlx-stack services are installed; nothing to do")
        return
    apply(mgr, uninstall_plan(mgr, present), dry_run)


def status(home: Home = None, manager_name: ManagerName = None, json_: Json = False) -> None:
    """Show this node's roles and the mesh as its broker sees it.

    Per role: installed, running, pid, uptime, restarts and the last error line."""
    cfg = settings(home=home)
    mgr = manager(manager_name)
    rows = []
    for path in mgr.installed():
        name = mgr.name_of(path)
        role = name.removeprefix(LABEL_PREFIX).removeprefix(UNIT_PREFIX).removesuffix(
            ".service")
        state = mgr.state(name)
        rows.append({"role": role, "service": name, "installed": True,
                     "loaded": state.loaded, "running": state.running, "pid": state.pid,
                     "uptime_s": uptime(state.pid), "restarts": state.restarts,
                     "last_error": last_error(cfg.home, role)})
    up_pid = foreground_up(cfg.home)
    view = {"manager": mgr.name, "roles": rows, "foreground_up_pid": up_pid,
            "mesh": mesh_summary(cfg)}
    if json_:
        out.print_json(json.dumps(view))
        return
    if rows:
        table = Table(title=f"This node's services ({mgr.name})")
        for column in ("Role", "Running", "PID", "Uptime", "Restarts", "Last error"):
            table.add_column(column)
        for r in rows:
            table.add_row(escape(r["role"]), "yes" if r["running"] else
                          ("loaded" if r["loaded"] else "no"), str(r["pid"] or "-"),
                          f"{r['uptime_s']:.0f} s" if r["uptime_s"] else "-",
                          str(r["restarts"]), escape(r["last_error"] or "-"))
        out.print(table)
    elif up_pid:
        out.print(f"running in the foreground: `mlx-stack up`, pid {up_pid}")
    else:
        out.print("no services installed (`mlx-stack install`) and no `mlx-stack up` running")
    mesh = view["mesh"]
    out.print("mesh: " + (f"this broker is [bold]{mesh['role']}[/bold], coordinator "
                          f"{escape(mesh['coordinator'] or 'none known')}, epoch "
                          f"{mesh['epoch']}, {mesh['workers']} workers here"
                          if mesh else "no answer from this node's broker"))


def logs(role: Annotated[str | None, typer.Argument(
             help="broker, gateway, worker (every worker) or worker-MODEL \\[all].",
             show_default=False)] = None,
         follow: Annotated[bool, typer.Option("--follow", "-f",
                                              help="Keep printing new lines.")] = False,
         lines: Annotated[int, typer.Option("--lines", "-n", min=0,
                                            help="Lines of each log to show first.")] = 40,
         home: Home = None) -> None:
    """Print this node's logs.

    <home>/logs/ROLE.log, and ROLE.out: what the OS caught, such as a crash's traceback."""
    cfg = settings(home=home)
    files = sorted(p for p in (cfg.home / "logs").glob("*")
                   if p.suffix in (".log", ".out")
                   and (role is None or p.stem == role or p.stem.startswith(f"{role}-")))
    if not files:
        err.print(f"no logs for {escape(role or 'any role')} in {cfg.home / 'logs'}")
        raise typer.Exit(1)
    offsets = {}
    for path in files:
        text = path.read_text(errors="replace").splitlines()
        for line in text[-lines:] if lines else []:
            print(f"{path.name}: {line}" if len(files) > 1 else line)
        offsets[path] = path.stat().st_size
    while follow:
        time.sleep(0.5)
        for path in files:
            size = path.stat().st_size if path.exists() else 0
            if size < offsets[path]:  # rotated
                offsets[path] = 0
            if size > offsets[path]:
                with path.open("rb") as f:
                    f.seek(offsets[path])
                    chunk = f.read().decode(errors="replace")
                offsets[path] = size
                for line in chunk.splitlines():
                    print(f"{path.name}: {line}" if len(files) > 1 else line, flush=True)


def down(home: Home = None, manager_name: ManagerName = None) -> None:
    """Stop this node's roles: its services, or a foreground `mlx-stack up`.

    Services stay installed: they start again at the next login, or with
    `mlx-stack install`."""
    cfg = settings(home=home)
    mgr = manager(manager_name)
    stopped = 0
    for path in mgr.installed():
        name = mgr.name_of(path)
        if mgr.state(name).loaded:
            apply(mgr, mgr.halt(name), False)
            stopped += 1
    pid = foreground_up(cfg.home)
    if pid:
        try:
            os.kill(pid, signal.SIGTERM)
            psutil.Process(pid).wait(20)
        except psutil.TimeoutExpired:
            err.print(f"[yellow]mlx-stack up (pid {pid}) is still stopping[/yellow]")
        except (OSError, psutil.Error):
            pass  # it ended meanwhile
        out.print(f"stopped `mlx-stack up` (pid {pid})")
    elif not stopped:
        out.print("nothing runs here: no loaded services, no `mlx-stack up`")


def apply(mgr: Manager, todo: Plan, dry_run: bool) -> None:
    """Carry out ``todo``, printing each step; a failed command exits 1 with its error."""
    try:
        mgr.apply(todo, dry_run, print)
    except ServiceError as exc:
        err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from None


def foreground_up(home: Path) -> int:
    """The pid of a running ``mlx-stack up`` of this home, or 0 (also when the pid file is
    stale and the pid now belongs to another process)."""
    try:
        pid = int((home / UP_PID).read_text().strip())
        return pid if "up" in psutil.Process(pid).cmdline() else 0
    except (OSError, ValueError, psutil.Error):
        return 0


def uptime(pid: int) -> float:
    try:
        return round(time.time() - psutil.Process(pid).create_time(), 1) if pid else 0.0
    except psutil.Error:
        return 0.0


def last_error(home: Path, role: str) -> str:
    """The last error line of a role's logs: its own log and what the OS caught, the
    newer file first."""
    paths = [p for p in (home / "logs" / f"{role}.log", home / "logs" / f"{role}.out")
             if p.exists()]
    for path in sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            lines = path.read_text(errors="replace").splitlines()[-2000:]
        except OSError:
            continue
        for line in reversed(lines):
            if any(mark in line for mark in ERROR_MARKS):
                return line.strip()[:200]
    return ""


def mesh_summary(cfg: Any) -> dict[str, Any] | None:
    """This node's broker's view of the mesh, or None when it does not answer."""
    client = ControlClient(cfg.broker_connect, cfg, load_keys(cfg.home))
    try:
        st = client.ask("status", timeout=1.0)
    except ControlError:
        st = None
    finally:
        client.close()
    if st is None:
        return None
    return {"role": st.role, "coordinator": st.coordinator, "epoch": st.epoch,
            "workers": len(st.workers), "peers": [p.node_id for p in st.peers]}

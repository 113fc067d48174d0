"""``mlx-stack mesh``: join Macs into one mesh and see what it is doing.

Every command that looks at the mesh asks this Mac's broker (``--broker`` to ask another)
with a CONTROL request, and follows it to the coordinator when it is a standby. Tables by
default, ``--json`` for scripts. Exit codes scripts can rely on:

    0  done
    1  the broker refused the request, or NODE is not in the mesh
    2  bad usage or configuration
    3  no broker answered (is `mlx-stack up` running?)
    4  the mesh is not enabled on this Mac (run `mlx-stack mesh enable`)
"""

from __future__ import annotations

import datetime
import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from mlx_stack.cli import watch as live
from mlx_stack.cli.console import err, out, settings
from mlx_stack.common import meshview
from mlx_stack.common.config import ENDPOINT, Settings, is_loopback, update_config_file
from mlx_stack.common.control import ControlClient, ControlError
from mlx_stack.common.discovery import ALIAS
from mlx_stack.common.meshkeys import (
    MeshSecretError,
    load_keys,
    load_secret,
    new_secret,
    save_secret,
    secret_of,
    secret_path,
    token_of,
)
from mlx_stack.common.status import BrokerStatus, plain

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_DISABLED = 1, 2, 3, 4

mesh = typer.Typer(
    name="mesh", no_args_is_help=True,
    help="Join this Mac to a mesh and look at it: status, nodes, routes, peers, token, "
    "key.\n\n"
    "Exit codes: 0 done, 1 refused / unknown node, 2 bad usage, 3 no broker answered, "
    "4 the mesh is not enabled here.")

Home = Annotated[str | None, typer.Option(help="Config and secret directory [~/.mlx-stack].",
                                          show_default=False)]
Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts, not tables.")]
BrokerAt = Annotated[str | None, typer.Option(
    "--broker", help="Ask this broker instead of this Mac's [tcp://127.0.0.1:4100].",
    show_default=False)]


def fail(code: int, message: str) -> typer.Exit:
    err.print(message)
    return typer.Exit(code)


class Unanswered(Exception):
    """A quiet :class:`Asker`'s question got no answer (the message says why)."""


class Asker:
    """CONTROL requests from the command line, with the exits above on failure."""

    def __init__(self, cfg: Settings, broker: str | None, quiet: bool = False) -> None:
        """``quiet``: a failure raises :class:`Unanswered` and prints nothing (the watch
        shows it on its screen), rather than printing and exiting."""
        self.cfg = cfg
        self.quiet = quiet
        self.keys = load_keys(cfg.home)
        self.endpoint = broker or cfg.broker_connect
        self.clients: dict[str, ControlClient] = {}

    def ask(self, op: str, at: str | None = None, **args: Any) -> Any:
        """CONTROL ``op`` at this broker, or at the broker ``at``."""
        endpoint = at or self.endpoint
        if endpoint not in self.clients:
            self.clients[endpoint] = ControlClient(endpoint, self.cfg, self.keys)
        try:
            result = self.clients[endpoint].ask(op, timeout=3.0, **args)
        except ControlError as exc:
            raise self.fail(EXIT_REFUSED, f"[red]the broker refused:[/red] "
                            f"{escape(str(exc))}") from None
        if result is None:
            host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
            if self.keys is None and not is_loopback(host):
                hint = "this Mac has no mesh secret: run `mlx-stack mesh enable --join TOKEN`"
            else:
                hint = ("is `mlx-stack up` running on this Mac? Or name another node's broker "
                        "with --broker tcp://HOST:4100")
            if self.keys is not None:
                hint += ("; if the mesh was enabled since, restart `mlx-stack up` so that the "
                         "broker uses the secret")
            raise self.fail(EXIT_UNREACHABLE,
                            f"[red]no broker answered at {escape(endpoint)}[/red]: {hint}")
        return result

    def fail(self, code: int, message: str) -> Exception:
        """The exit with ``message``, or, when quiet, :class:`Unanswered` saying it."""
        return Unanswered(Text.from_markup(message).plain) if self.quiet else fail(code, message)

    def coordinator(self) -> BrokerStatus:
        """The coordinator's status: this broker's, or its coordinator's when it is a
        standby that knows one."""
        status = self.ask("status")
        if not status.coordinating and status.coordinator:
            status = self.ask("status", at=status.coordinator)
        return status

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def gib(n: int) -> str:
    return f"{n / 1024**3:.1f}" if n else "-"


def print_nodes(rows: list[meshview.NodeView]) -> None:
    """The nodes table, then in yellow what to do about each node of another protocol
    version."""
    out.print(nodes_table(rows))
    for r in rows:
        if r.advice:
            out.print(f"[yellow]{escape(r.node_id)}: {escape(r.advice)}[/yellow]")


def nodes_table(rows: list[meshview.NodeView]) -> Table:
    table = Table(title="Nodes")
    for column in ("Node", "Role", "Models (queued)", "Slots", "Memory free/total GiB",
                   "Last heartbeat"):
        table.add_column(column)
    for r in rows:
        heard = "-" if r.heartbeat_age_s is None else f"{r.heartbeat_age_s:.1f} s ago"
        models = ", ".join(f"{m.model_id} ({m.queue})" for m in r.models)
        table.add_row(*map(escape, (r.node_id, r.role, models or "-",
                                    f"{r.slots_in_use}/{r.slots_total}",
                                    f"{gib(r.mem_free)}/{gib(r.mem_total)}", heard)))
    return table


@mesh.command()
def status(json_: Json = False, broker: BrokerAt = None, home: Home = None,
           watch: Annotated[bool, typer.Option(
               "--watch", help="Redraw a live picture (nodes, tokens/s, queues, events) "
               "until Ctrl-C.")] = False,
           interval: Annotated[float, typer.Option(
               min=0.1, max=60, help="Seconds between two pictures of --watch.")] = 1.0,
           count: Annotated[int | None, typer.Option(
               min=1, help="Stop --watch after this many pictures (for scripts).",
               show_default=False)] = None) -> None:
    """The coordinator, its epoch, every node and every model's queue."""
    cfg = settings(home=home)
    if watch:
        watcher = Asker(cfg, broker, quiet=True)
        try:
            live.watch(watcher.coordinator, interval, count)
        finally:
            watcher.close()
        return
    asker = Asker(cfg, broker)
    try:
        st = asker.coordinator()
    finally:
        asker.close()
    keys = asker.keys
    lead, rows = meshview.coordinator(st), meshview.nodes(st)
    models, tiers = meshview.models(st), meshview.tiers(st)
    if json_:
        url = f"http://{ALIAS.rstrip('.') if keys else 'localhost'}:{cfg.gateway_port}/v1"
        out.print_json(json.dumps({
            "mesh_id": keys.mesh_id if keys else None, "enabled": keys is not None,
            "url": url, "coordinator": plain(lead), "nodes": plain(rows),
            "models": plain(models), "tiers": plain(tiers), "jobs": st.jobs}))
        return
    name = f"mesh {keys.mesh_id}" if keys else "mesh not enabled (this Mac only)"
    out.print(f"[bold]{name}[/bold]: coordinator [green]{escape(lead.node_id or '?')}"
              f"[/green] ({escape(lead.endpoint or 'none known')}), epoch {lead.epoch}, "
              f"{st.jobs} jobs running or queued\nClients use it with:\n{client_setup(cfg)}")
    print_nodes(rows)
    table = Table(title="Models")
    for column in ("Model", "Engine", "Workers", "Slots", "Context", "Queued"):
        table.add_column(column)
    for m in models:
        table.add_row(*map(escape, (m.model, m.engine, str(m.workers),
                                    f"{m.slots_in_use}/{m.slots_total}",
                                    str(m.context_length or "-"), str(m.queued))))
    out.print(table)
    if tiers:
        out.print(tiers_table(tiers))


def tiers_table(rows: list[meshview.TierView]) -> Table:
    """Each tier, the model that answers it, where, and its queue; an ambiguous name in
    red with the models that also serve it and what to do."""
    table = Table(title="Tiers")
    for column in ("Tier", "Model", "Nodes", "Queued"):
        table.add_column(column)
    for r in rows:
        model = escape(r.model)
        if r.ambiguous:
            others = ", ".join(m for m in r.ambiguous if m != r.model)
            model += (f"\n[red]ambiguous: also served by {escape(others)}; only "
                      f"{escape(r.model)} answers. Give one of them another tier[/red]")
        table.add_row(escape(r.tier), model, escape(", ".join(r.nodes)), str(r.queued))
    return table


@mesh.command()
def nodes(json_: Json = False, broker: BrokerAt = None, home: Home = None) -> None:
    """Every node of the mesh: role, models, slots, memory, last heard."""
    asker = Asker(settings(home=home), broker)
    try:
        rows = meshview.nodes(asker.coordinator())
    finally:
        asker.close()
    if json_:
        out.print_json(json.dumps(plain(rows)))
    else:
        print_nodes(rows)


@mesh.command()
def routes(last: Annotated[int, typer.Option(min=1, max=1000, help="How many decisions.")
                           ] = 20,
           json_: Json = False, broker: BrokerAt = None, home: Home = None) -> None:
    """The most recent routing decisions: candidates (score, prompt characters cached),
    choice, prompt tokens the chosen one's cache served (of all), outcome."""
    asker = Asker(settings(home=home), broker)
    try:
        history = asker.ask("routes", at=asker.coordinator().endpoint, last=last)
    finally:
        asker.close()
    if json_:
        out.print_json(json.dumps(plain(history)))
        return
    table = Table(title=f"Last {len(history)} routing decisions")
    for column in ("Time", "Request", "Model", "Chosen", "Candidates (score, cached chars)",
                   "Reused tokens", "Wait ms", "Retries", "Outcome"):
        table.add_column(column)
    for r in history:
        when = datetime.datetime.fromtimestamp(r.time).strftime("%H:%M:%S")
        candidates = ", ".join(f"{c.worker_id} {c.score:.3f}"
                               + (f" cached {c.cached:,}" if c.cached else "")
                               for c in r.candidates)
        request = r.request_id[:16] or r.job_id[:16]
        reused = f"{r.reused:,} of {r.reused + r.computed:,}" if r.outcome == "ok" else "-"
        table.add_row(*map(escape, (when, request, r.model, r.worker_id or "-",
                                    candidates or "-", reused, str(r.queue_wait_ms),
                                    str(r.retries), r.outcome)))
    out.print(table)


def endpoint_of(address: str) -> str:
    """``HOST[:PORT]`` or ``tcp://HOST:PORT`` as a broker endpoint (port 4100 if none)."""
    address = address.removeprefix("tcp://")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        host, port = address, str(Settings().broker_port)
    endpoint = f"tcp://{host}:{port}"
    if not ENDPOINT.fullmatch(endpoint):
        raise fail(EXIT_USAGE, f"[red]{escape(repr(address))} is not HOST:PORT[/red] "
                   "(e.g. mini-2.local:4100)")
    return endpoint


def require_enabled(cfg: Settings) -> None:
    if load_secret(cfg.home) is None:
        raise fail(EXIT_DISABLED, "[red]the mesh is not enabled on this Mac.[/red] Run "
                   "`mlx-stack mesh enable` (first Mac) or `mlx-stack mesh enable --join TOKEN`.")


@mesh.command()
def add(address: Annotated[str, typer.Argument(help="Another node's broker, HOST:PORT.")],
        broker: BrokerAt = None, home: Home = None) -> None:
    """Add a static peer (for networks where mDNS does not reach); kept in config.toml."""
    cfg = settings(home=home)
    require_enabled(cfg)
    endpoint = endpoint_of(address)
    asker = Asker(cfg, broker)
    try:
        asker.ask("add_peer", endpoint=endpoint)
    finally:
        asker.close()
    update_config_file(cfg.home, peers=",".join(dict.fromkeys([*cfg.peer_list, endpoint])))
    out.print(f"added {endpoint}; `mlx-stack mesh nodes` shows it once it answers")


@mesh.command()
def remove(node: Annotated[str, typer.Argument(help="Node id or HOST:PORT to remove.")],
           broker: BrokerAt = None, home: Home = None) -> None:
    """Stop talking to a peer and drop it from config.toml.

    Only the broker asked forgets the peer, until it restarts (mDNS may find it again
    then). To take a Mac out of the mesh for good, run `mlx-stack mesh disable` on it."""
    cfg = settings(home=home)
    require_enabled(cfg)
    asker = Asker(cfg, broker)
    try:
        peers = {p.node_id: p.endpoint for p in asker.ask("status").peers}
        endpoint = peers.get(node) or endpoint_of(node)
        was_live = bool(endpoint) and asker.ask("remove_peer", endpoint=endpoint)
    finally:
        asker.close()
    if not was_live and endpoint not in cfg.peer_list:
        raise fail(EXIT_REFUSED, f"[red]{escape(repr(node))} is not a peer of this node[/red]; "
                   f"known: {escape(', '.join(sorted(peers)) or 'none')}")
    update_config_file(cfg.home, peers=",".join(e for e in cfg.peer_list if e != endpoint)
                       or None)
    out.print(f"removed {node} ({endpoint})")


@mesh.command()
def enable(
    priority: Annotated[int | None, typer.Option(
        help="Coordinator preference: the highest live priority coordinates [0].",
        show_default=False)] = None,
    join: Annotated[str | None, typer.Option(
        help="Join an existing mesh with the token `mlx-stack mesh token` printed there.",
        show_default=False)] = None,
    interface: Annotated[str | None, typer.Option(
        help="Address(es) of the LAN interface for mDNS, comma-separated [all].",
        show_default=False)] = None,
    home: Home = None,
) -> None:
    """Create a mesh secret (or take one with --join) and listen on the LAN.

    The broker then binds to every interface with CURVE encryption, and finds the other
    Macs over mDNS. Restart `mlx-stack up` for it to take effect."""
    cfg = settings(home=home)
    current = load_secret(cfg.home)
    try:
        secret = secret_of(join) if join else current or new_secret()
    except MeshSecretError as exc:
        raise fail(EXIT_USAGE, f"[red]{escape(str(exc))}[/red]") from None
    if current is not None and secret != current:
        err.print("[yellow]this Mac leaves its previous mesh for the new one[/yellow]")
    save_secret(cfg.home, secret)
    update_config_file(cfg.home, broker_host="0.0.0.0", gateway_host="0.0.0.0",
                       mdns_interfaces=interface or "all",
                       **({"priority": priority} if priority is not None else {}))
    keys = load_keys(cfg.home)
    assert keys is not None
    out.print(f"mesh [bold]{keys.mesh_id}[/bold] enabled; secret in {secret_path(cfg.home)} "
              "(mode 0600).\nRestart `mlx-stack up` (or `mlx-stack down && mlx-stack install` "
              "for services) to apply. On the next Mac run:\n"
              "  mlx-stack mesh enable --join $TOKEN   (TOKEN: `mlx-stack mesh token` here)\n"
              f"The endpoint then answers the LAN with the mesh's key:\n{client_setup(cfg)}")


@mesh.command()
def disable(home: Home = None) -> None:
    """Leave the mesh: delete the secret and go back to serving this Mac only (loopback)."""
    cfg = settings(home=home)
    if load_secret(cfg.home) is None:
        out.print("the mesh is not enabled on this Mac; nothing to do")
        return
    secret_path(cfg.home).unlink()
    update_config_file(cfg.home, broker_host=None, gateway_host=None, mdns_interfaces=None,
                       priority=None)
    out.print("mesh disabled; restart `mlx-stack up` to serve this Mac alone")


def client_setup(cfg: Settings) -> str:
    """How a client on the LAN points at the mesh: its URL and key, as shell exports."""
    keys = load_keys(cfg.home)
    if keys is None:
        return f"  export OPENAI_BASE_URL=http://localhost:{cfg.gateway_port}/v1"
    return (f"  export OPENAI_BASE_URL=http://{ALIAS.rstrip('.')}:{cfg.gateway_port}/v1\n"
            f"  export OPENAI_API_KEY=$(mlx-stack mesh key)   # on a member; or paste it")


@mesh.command()
def key(home: Home = None) -> None:
    """Print the mesh's API key: every gateway of the mesh accepts it from the LAN (clients
    on a Mac's own loopback need none). Derived from the mesh secret: share it with the
    people who may use the mesh, not the join token."""
    cfg = settings(home=home)
    require_enabled(cfg)
    keys = load_keys(cfg.home)
    assert keys is not None
    print(keys.api_key)


@mesh.command()
def token(home: Home = None) -> None:
    """Print the join token for the next Mac (it is the mesh secret: share it privately)."""
    cfg = settings(home=home)
    require_enabled(cfg)
    secret = load_secret(cfg.home)
    assert secret is not None
    print(token_of(secret))

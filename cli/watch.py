"""``mlx-stack mesh status --watch``: the dashboard's live picture in the terminal.

Asks the broker for its status every ``interval`` seconds and redraws one screen (rich
Live): each node with its role, a memory bar, slots, tokens/s and prompt-cache hit rate;
the mesh's tokens/s over the last minutes as a sparkline; the queues; the last events
(workers and nodes lost or joined, a new coordinator, the broker down), found with the
same :class:`common.meshview.Changes` as the dashboard. Memory is bounded (rings), a
broker that stops answering is said on screen rather than ending the watch, and Ctrl-C
ends it cleanly.
"""

from __future__ import annotations

import collections
import datetime
import time
from collections.abc import Callable

from rich.console import Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from mlx_stack.cli.console import out
from mlx_stack.common import meshview
from mlx_stack.common.status import BrokerStatus

WINDOW_S = 15 * 60.0
EVENTS = 8
"""Events shown."""
SPARKS = "▁▂▃▄▅▆▇█"
BAR = 12
"""Characters of a memory bar."""


def bar(used: float, total: float) -> str:
    """``used`` of ``total`` as a bar of :data:`BAR` characters."""
    filled = round(BAR * used / total) if total else 0
    return "█" * filled + "░" * (BAR - filled)


def sparkline(values: list[float], width: int = 60) -> str:
    """The last ``width`` values as block characters, scaled to their maximum."""
    shown = values[-width:]
    top = max(shown, default=0) or 1
    return "".join(SPARKS[min(len(SPARKS) - 1, int(v / top * (len(SPARKS) - 1)))]
                   for v in shown)


def percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.0%}"


class Watch:
    """What the watch remembers between two screens: the tokens/s ring, the events ring
    and the last status (shown, marked stale, while the broker does not answer)."""

    def __init__(self, interval: float) -> None:
        self.tokens: collections.deque[float] = collections.deque(
            maxlen=int(WINDOW_S / interval) + 1)
        self.events: collections.deque[meshview.Event] = collections.deque(maxlen=EVENTS)
        self.changes = meshview.Changes(WINDOW_S)
        self.status: BrokerStatus | None = None
        self.error = ""

    def take(self, status: BrokerStatus | None, error: str = "") -> None:
        now = time.time()
        self.events.extend(self.changes.update(status, now, error))
        self.error = error
        if status is not None:
            self.status = status
            self.tokens.append(sum(w.load.tokens_per_s for w in status.workers))

    def render(self) -> RenderableType:
        clock = datetime.datetime.now().strftime("%H:%M:%S")
        status = self.status
        if status is None:
            return Text(f"{clock}  no broker answered: {self.error}", style="red")
        lead = meshview.coordinator(status)
        head = Text.from_markup(
            f"[bold]{clock}[/bold]  coordinator [green]{escape(lead.node_id or '?')}"
            f"[/green], epoch {lead.epoch}, {status.jobs} jobs running or queued")
        if self.error:
            head.append(f"  (broker not answering: {self.error}; last picture shown)",
                        style="red")
        nodes = Table(title="Nodes", expand=False)
        for column in ("Node", "Role", "Memory used", "Models", "Slots", "Tokens/s", "Cache",
                       "Heartbeat"):
            nodes.add_column(column)
        for n in meshview.nodes(status):
            used = n.mem_total - n.mem_free
            memory = (f"{bar(used, n.mem_total)} {used / 2**30:.1f}/"
                      f"{n.mem_total / 2**30:.1f} GiB") if n.mem_total else "-"
            models = "\n".join(f"{m.model_id} ({m.slots_in_use}/{m.slots_total}, "
                               f"queue {m.queue})" for m in n.models) or "-"
            age = n.heartbeat_age_s
            role = f"[bold cyan]{n.role}[/bold cyan]" if n.role == "coordinator" \
                else escape(n.role)
            nodes.add_row(escape(n.node_id), role, memory, escape(models),
                          f"{n.slots_in_use}/{n.slots_total}", f"{n.tokens_per_s:g}",
                          percent(n.cache_hit_rate), "-" if age is None else f"{age:.1f} s")
        for gone in self.changes.unreachable(status):
            nodes.add_row(escape(gone.node_id), "[red]unreachable[/red]", "-", "-", "-", "-",
                          "-", f"last seen {time.time() - gone.last_seen:.0f} s ago")
        queues = ", ".join(f"{escape(m.model)} {m.queued}"
                           for m in meshview.models(status)) or "-"
        spark = Text(f"tokens/s {self.tokens[-1] if self.tokens else 0:g}  ")
        spark.append(sparkline(list(self.tokens)), style="cyan")
        events = Text("\n".join(
            f"{datetime.datetime.fromtimestamp(e.time).strftime('%H:%M:%S')} "
            f"{e.kind.replace('_', ' ')}: {e.text}" for e in reversed(self.events))
            or "no events yet")
        return Group(head, nodes, spark, Text(f"queues: {queues}"),
                     Text("Events", style="bold"), events)


def watch(ask: Callable[[], BrokerStatus], interval: float, count: int | None) -> None:
    """Redraw every ``interval`` seconds, ``count`` times (None: until Ctrl-C). ``ask``
    returns the coordinator's status or raises (the broker did not answer)."""
    screen = Watch(interval)
    done = 0
    try:
        with Live(screen.render(), console=out, refresh_per_second=4,
                  auto_refresh=False) as live:
            while count is None or done < count:
                started = time.monotonic()
                try:
                    screen.take(ask())
                except Exception as exc:  # shown, and asked again next time
                    screen.take(None, str(exc) or type(exc).__name__)
                live.update(screen.render(), refresh=True)
                done += 1
                if count is None or done < count:
                    time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass  # Ctrl-C: the last screen stays, the command ends with 0

"""Finding brokers with mDNS (zeroconf): ``_mlx-stack._tcp.local.``.

A broker advertises itself; brokers browse for the others and treat what they find like
static peers. mDNS only finds candidates: liveness comes from the brokers' own
ANNOUNCEs, because a killed node's records stay cached for minutes.

Discovery is off unless interfaces are configured (``mdns_interfaces``: addresses such as
``192.168.1.20``, or ``all`` for every LAN interface): a test or a single Mac never
multicasts on a network it was not asked to use.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlparse

from zeroconf import InterfaceChoice, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from mlx_stack.common.logs import log_event
from mlx_stack.common.messages import VERSION

SERVICE = "_mlx-stack._tcp.local."
ALIAS = "mlx-stack.local."
"""The host name the coordinator publishes, so that clients can name "the mesh"."""
COORDINATOR = f"coordinator.{SERVICE}"
log = logging.getLogger("discovery")


@dataclass(frozen=True, slots=True)
class Advert:
    """What a broker says about itself over mDNS (the TXT record)."""

    mesh: str
    node_id: str
    endpoint: str
    priority: int
    started: float


def interfaces(setting: str) -> list[str] | InterfaceChoice:
    return InterfaceChoice.All if setting.strip() == "all" else [
        a.strip() for a in setting.split(",") if a.strip()]


class Discovery:
    """Advertise this broker and collect the endpoints of the others in the same mesh.

    zeroconf calls back on its own thread; found endpoints wait in :attr:`found` for the
    broker loop to take with :meth:`take`.
    """

    def __init__(self, advert: Advert, setting: str) -> None:
        self.advert = advert
        self.found: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.zc = Zeroconf(interfaces=interfaces(setting))
        host = urlparse(advert.endpoint).hostname or "127.0.0.1"
        self.info = ServiceInfo(
            SERVICE, f"{advert.node_id}.{SERVICE}",
            addresses=[socket.inet_aton(host)], port=urlparse(advert.endpoint).port or 4100,
            server=f"{advert.node_id}.mlx-stack.local.",
            properties={"mesh": advert.mesh, "node": advert.node_id,
                        "endpoint": advert.endpoint, "priority": str(advert.priority),
                        "started": repr(advert.started), "version": VERSION})
        self.alias = ServiceInfo(SERVICE, COORDINATOR, addresses=[socket.inet_aton(host)],
                                 port=self.info.port, server=ALIAS,
                                 properties={"mesh": advert.mesh, "node": advert.node_id})
        self.browser = ServiceBrowser(self.zc, SERVICE, handlers=[self._changed])
        self.coordinating = threading.Event()
        self.changed = threading.Event()
        """Wakes the publishing thread: the alias moves within the failover, not a poll later."""
        self.closed = threading.Event()
        # Registration probes names for ~1.5 s: never hold the broker loop for it.
        threading.Thread(target=self._publish, daemon=True, name="mdns-publish").start()

    def set_coordinator(self, coordinating: bool) -> None:
        """Publish (or withdraw) the ``mlx-stack.local`` alias pointing at this broker."""
        if coordinating != self.coordinating.is_set():
            (self.coordinating.set if coordinating else self.coordinating.clear)()
            self.changed.set()

    def _publish(self) -> None:
        """Register this broker, then keep the alias in step with :meth:`set_coordinator`.

        The alias is registered without probing for a conflict (``cooperating_responders``):
        the previous coordinator may have died without withdrawing it, and its records stay
        in every cache for their TTL (two minutes). Our announcement carries the cache-flush
        bit, so listeners (a Mac's resolver, another broker) replace the dead one's address
        at once. The one that steps down sends goodbye packets for its own."""
        try:
            self.zc.register_service(self.info, allow_name_change=True)
        except Exception as exc:  # a closed zeroconf during shutdown, a name clash...
            log_event(log, "mdns_register_failed", logging.WARNING, error=repr(exc))
        published = False
        failing = False
        while not self.closed.is_set():
            self.changed.wait(0.5)
            self.changed.clear()
            if self.closed.is_set():
                return
            want = self.coordinating.is_set()
            try:
                if want and not published:
                    self.zc.register_service(self.alias, cooperating_responders=True)
                elif published and not want:
                    self.zc.unregister_service(self.alias)
                published = want
            except Exception as exc:
                # Retried at every wake-up until it works: say it once, not every turn.
                log_event(log, "mdns_alias_failed", logging.DEBUG if failing else logging.INFO,
                          error=repr(exc), retrying_every_s=0.5)
                failing = True
            else:
                failing = False

    def _changed(self, zeroconf: Zeroconf, service_type: str, name: str,
                 state_change: ServiceStateChange) -> None:
        if state_change not in (ServiceStateChange.Added, ServiceStateChange.Updated):
            return
        info = zeroconf.get_service_info(service_type, name, timeout=2000)
        if info is None:
            return
        props = {k.decode(): (v or b"").decode(errors="replace")
                 for k, v in info.properties.items()}
        endpoint = props.get("endpoint", "")
        if props.get("mesh") != self.advert.mesh or not endpoint.startswith("tcp://"):
            return
        if endpoint != self.advert.endpoint:
            self.found.put(endpoint)

    def take(self) -> list[str]:
        """Endpoints found since the last call (may repeat ones already known)."""
        out = []
        while not self.found.empty():
            out.append(self.found.get_nowait())
        return out

    def close(self) -> None:
        self.closed.set()
        self.changed.set()
        self.browser.cancel()
        self.zc.close()

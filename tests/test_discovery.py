"""mDNS discovery on loopback only (zeroconf pinned to 127.0.0.1): the ``mlx-stack.local``
alias follows the coordinator. While two brokers both coordinate (a partition that has
not healed yet) the newer one takes the name at once, without a conflict to retry and
log; the one that steps down withdraws its records. (Here they differ by port; between
Macs they differ by address, and the address record is what a client resolves.)"""

from __future__ import annotations

import logging

import pytest
from zeroconf import Zeroconf

from mlx_stack.common.discovery import COORDINATOR, SERVICE, Advert, Discovery
from testkit.harness import wait_for


def advert(node: str, port: int) -> Advert:
    return Advert(mesh="quiet", node_id=node, endpoint=f"tcp://127.0.0.1:{port}",
                  priority=0, started=0.0)


def test_the_alias_follows_the_newest_coordinator_without_a_clash(
        caplog: pytest.LogCaptureFixture) -> None:
    first = Discovery(advert("node-a", 47101), "127.0.0.1")
    second = Discovery(advert("node-b", 47102), "127.0.0.1")
    listener = Zeroconf(interfaces=["127.0.0.1"])  # a resolver that keeps its cache

    def alias_port() -> int | None:
        info = listener.get_service_info(SERVICE, COORDINATOR, timeout=500)
        return info.port if info else None

    try:
        with caplog.at_level(logging.DEBUG, logger="discovery"):
            first.set_coordinator(True)
            wait_for("the alias at node-a", lambda: alias_port() == 47101, timeout=10)
            second.set_coordinator(True)
            wait_for("the alias at node-b", lambda: alias_port() == 47102, timeout=10)
            first.set_coordinator(False)
            wait_for("node-a to withdraw its record", lambda: first.zc.registry
                     .async_get_info_name(first.alias.name) is None, timeout=10)
            assert alias_port() == 47102
        assert not [r.getMessage() for r in caplog.records
                    if "mdns_alias_failed" in r.getMessage()]
    finally:
        listener.close()
        first.close()
        second.close()

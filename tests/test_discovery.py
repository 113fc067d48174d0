"""mDNS discovery on loopback only (zeroconf pinned to 127.0.0.1): while two brokers both
coordinate (a partition that has not healed yet), the one that cannot take the
``mlx-stack.local`` alias says so once, not every half second."""

from __future__ import annotations

import logging
import time

import pytest

from common.discovery import Advert, Discovery
from tests.harness import wait_for


def advert(node: str, port: int) -> Advert:
    return Advert(mesh="quiet", node_id=node, endpoint=f"tcp://127.0.0.1:{port}",
                  priority=0, started=0.0)


def test_two_coordinators_overlapping_log_the_alias_clash_once(
        caplog: pytest.LogCaptureFixture) -> None:
    first = Discovery(advert("node-a", 47101), "127.0.0.1")
    second = Discovery(advert("node-b", 47102), "127.0.0.1")
    try:
        first.set_coordinator(True)
        wait_for("node-a to hold the alias", lambda: first.zc.registry.async_get_info_name(
            first.alias.name) is not None, timeout=10)
        with caplog.at_level(logging.DEBUG, logger="discovery"):
            second.set_coordinator(True)
            time.sleep(4.0)  # eight retries' worth: what is logged over time is the point
        clashes = [r for r in caplog.records
                   if r.levelno >= logging.INFO and "mdns_alias_failed" in r.getMessage()]
        assert len(clashes) == 1, [r.getMessage() for r in clashes]
    finally:
        first.close()
        second.close()

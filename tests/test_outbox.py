"""The worker's outbox: in order, as put; wakes the I/O loop only when needed; the direct
jobs whose output began wait for the heartbeat without waking it."""

from __future__ import annotations

import select

from common import protocol as p
from worker.outbox import Outbox


def readable(box: Outbox) -> bool:
    return bool(select.select([box.fd], [], [], 0)[0])


def test_messages_leave_in_order_as_they_were_put() -> None:
    box = Outbox()
    assert not readable(box)
    messages = [p.Partial(job_id="a", token_ids=[1], text="x", seq=0),
                p.Partial(job_id="b", token_ids=[9], text="q", seq=0),
                p.Partial(job_id="a", token_ids=[2], text="y", seq=1),
                p.Final(job_id="a", finish_reason="stop", parts=2), p.Release(job_id="a")]
    for msg in messages:
        box.put(msg)
    assert readable(box)
    assert box.take() == messages  # numbered where they were made: never merged here
    assert not readable(box)
    box.close()


def test_a_put_after_take_wakes_again_and_streamed_jobs_never_wake() -> None:
    box = Outbox()
    box.put(p.Release(job_id="a"))
    box.take()
    box.streamed("b")
    assert not readable(box)
    box.put(p.Release(job_id="c"))
    assert readable(box)
    assert box.take_streamed() == ["b"] and box.take_streamed() == []
    box.close()

"""The worker's outbox: in order, a job's waiting PARTIALs merged into one; wakes the I/O
loop only when needed; the direct jobs whose output began wait for the heartbeat without
waking it."""

from __future__ import annotations

import select

from mlx_stack.common import messages as msgs
from mlx_stack.worker.outbox import Outbox


def readable(box: Outbox) -> bool:
    return bool(select.select([box.fd], [], [], 0)[0])


def test_messages_leave_in_order_and_a_jobs_waiting_partials_as_one() -> None:
    box = Outbox()
    assert not readable(box)
    a0 = msgs.Partial(job_id="a", token_ids=[1], text="x", seq=0)
    b0 = msgs.Partial(job_id="b", token_ids=[9], text="q", seq=0)
    final = msgs.Final(job_id="a", finish_reason="stop", parts=1)
    assert [box.put(a0), box.put(b0)] == [False, False]
    assert readable(box)
    assert box.put(msgs.Partial(job_id="a", token_ids=[2], text="y", seq=1))  # joins a0
    assert [box.put(final), box.put(msgs.Release(job_id="a"))] == [False, False]
    assert box.put(msgs.Partial(job_id="b", token_ids=[8], text="r", seq=1))  # joins b0
    assert box.take() == [a0, b0, final, msgs.Release(job_id="a")]
    assert (a0.seq, a0.token_ids, a0.text, b0.text) == (0, [1, 2], "xy", "qr")
    assert not readable(box)
    later = msgs.Partial(job_id="a", token_ids=[3], text="z", seq=1)
    assert not box.put(later) and box.take() == [later]  # taken: a new frame
    box.close()


def test_a_put_after_take_wakes_again_and_streamed_jobs_never_wake() -> None:
    box = Outbox()
    box.put(msgs.Release(job_id="a"))
    box.take()
    box.streamed("b")
    assert not readable(box)
    box.put(msgs.Release(job_id="c"))
    assert readable(box)
    assert box.take_streamed() == ["b"] and box.take_streamed() == []
    box.close()

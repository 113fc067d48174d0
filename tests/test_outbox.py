"""The worker's outbox: merged, numbered, ordered; wakes the I/O loop when needed."""

from __future__ import annotations

import select

from common import messages as msgs
from worker.outbox import Outbox


def readable(box: Outbox) -> bool:
    return bool(select.select([box.fd], [], [], 0)[0])


def test_merges_partials_per_job_and_numbers_them() -> None:
    box = Outbox()
    assert not readable(box)
    box.put(msgs.Partial(job_id="a", token_ids=[1], text="x"))
    assert readable(box)
    box.put(msgs.Partial(job_id="b", token_ids=[9], text="q"))
    box.put(msgs.Partial(job_id="a", token_ids=[2], text="y"))
    out = box.take()
    assert not readable(box)
    assert [(m.job_id, m.seq, m.token_ids, m.text) for m in out] == [
        ("a", 0, [1, 2], "xy"), ("b", 0, [9], "q")]
    box.put(msgs.Partial(job_id="a", token_ids=[3], text="z"))
    box.put(msgs.Final(job_id="a", finish_reason="stop"))
    box.put(msgs.Partial(job_id="b", token_ids=[8], text=""))
    out = box.take()
    assert [(type(m).__name__, m.job_id, getattr(m, "seq", None)) for m in out] == [
        ("Partial", "a", 1), ("Final", "a", None), ("Partial", "b", 1)]
    assert out[1].parts == 2  # the gateway waits for both of a's PARTIALs before the end
    box.close()


def test_a_put_after_take_wakes_again() -> None:
    box = Outbox()
    box.put(msgs.Partial(job_id="a", token_ids=[1], text=""))
    box.take()
    box.put(msgs.Partial(job_id="a", token_ids=[2], text=""))
    assert readable(box)
    assert box.take()[0].seq == 1
    box.close()

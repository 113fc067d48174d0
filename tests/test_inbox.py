"""The gateway's inbox puts a job attempt's messages back in order, whichever way they came.

A worker streams PARTIALs and a FINAL straight to the gateway while the broker sends the
ACCEPTED and a copy of the FINAL: two connections, no order between them. No sockets here:
messages are put in the orders the two ways can produce.
"""

from __future__ import annotations

import asyncio

import pytest

from common import messages as msgs
from gateway import inbox as inbox_module
from gateway.inbox import Inbox, Lost


def accepted(dispatch: int = 0) -> msgs.Accepted:
    return msgs.Accepted(job_id=f"j/{dispatch}", node_id="n", worker_id="w", model_id="m")


def partial(seq: int, text: str = "", dispatch: int = 0) -> msgs.Partial:
    return msgs.Partial(job_id=f"j/{dispatch}", seq=seq, token_ids=[seq] if text else [],
                        text=text)


def final(parts: int, dispatch: int = 0) -> msgs.Final:
    return msgs.Final(job_id=f"j/{dispatch}", finish_reason="stop", parts=parts)


def take(messages: list, count: int, deadline_s: float = 5.0) -> list:
    """Put ``messages``, then take ``count`` one at a time (as the request's task does,
    so that PARTIALs put together are merged)."""
    async def run() -> list:
        box = Inbox(asyncio.get_running_loop().time() + deadline_s)
        for msg in messages:
            box.put(msg)
        return [await box.next() for _ in range(count)]

    async def bounded() -> list:  # a late timer must fail, not just slow the test
        task = asyncio.ensure_future(run())
        done, _ = await asyncio.wait({task}, timeout=deadline_s + 1)
        if not done:
            task.cancel()
            raise AssertionError(f"the inbox answered nothing within {deadline_s + 1} s")
        return task.result()
    return asyncio.run(bounded())


def shown(messages: list) -> list:
    out = []
    for msg in messages:
        if isinstance(msg, Lost):
            out.append(("lost", msg.kind))
        elif isinstance(msg, msgs.Partial):
            out.append(("partial", msg.text))
        else:
            out.append((type(msg).__name__.lower(), msg.job_id))
    return out


def test_in_order_partials_that_came_together_are_one() -> None:
    got = take([accepted(), partial(0), partial(1, "a"), partial(2, "b"), final(3)], 3)
    assert shown(got) == [("accepted", "j/0"), ("partial", "ab"), ("final", "j/0")]


def test_direct_partials_before_their_accepted_wait_for_it() -> None:
    got = take([partial(0), partial(1, "a"), accepted(), final(2)], 3)
    assert shown(got) == [("accepted", "j/0"), ("partial", "a"), ("final", "j/0")]


def test_the_brokers_final_waits_for_the_direct_partials_it_counts() -> None:
    async def run() -> list:
        box = Inbox(asyncio.get_running_loop().time() + 5)
        for msg in (accepted(), partial(0), final(3)):  # the FINAL overtook PARTIALs 1, 2
            box.put(msg)
        out = [await box.next(), await box.next()]
        pending = asyncio.ensure_future(box.next())
        await asyncio.sleep(0.01)
        assert not pending.done()
        box.put(partial(1, "a"))
        out.append(await pending)
        box.put(partial(2, "b"))
        box.put(final(3))  # the direct FINAL, late: never reaches the request
        out += [await box.next(), await box.next()]
        return out
    assert shown(asyncio.run(run())) == [
        ("accepted", "j/0"), ("partial", ""), ("partial", "a"), ("partial", "b"),
        ("final", "j/0")]


def test_partials_that_never_follow_their_final_are_lost_frames(monkeypatch) -> None:
    monkeypatch.setattr(inbox_module, "FINAL_WAIT_S", 0.05)
    got = take([accepted(), partial(0, "a"), final(2)], 3)
    assert shown(got) == [("accepted", "j/0"), ("partial", "a"), ("lost", "lost_frame")]


def test_a_gap_is_a_lost_frame() -> None:
    got = take([accepted(), partial(0, "a"), partial(2, "c")], 3)
    assert shown(got) == [("accepted", "j/0"), ("partial", "a"), ("lost", "lost_frame")]


def test_an_earlier_dispatchs_late_frames_are_dropped() -> None:
    # Dispatch 0's worker was purged before any output; dispatch 1 runs the job.
    got = take([accepted(0), partial(0), accepted(1), partial(0, "late", 0),
                partial(0, dispatch=1), partial(1, "new", 1), final(2, 1)], 5)
    assert shown(got) == [("accepted", "j/0"), ("partial", ""), ("accepted", "j/1"),
                          ("partial", "new"), ("final", "j/1")]


def test_a_new_dispatch_after_output_reached_the_client_is_a_loss() -> None:
    # The broker missed the output (it went straight to us) and ran the job again from
    # its start: what the client saw would be repeated. Resubmit from what it has seen.
    got = take([accepted(0), partial(0, "seen"), accepted(1), partial(0, "seen", 1)], 3)
    assert shown(got) == [("accepted", "j/0"), ("partial", "seen"), ("lost", "mid_stream")]


def test_the_deadline_still_holds() -> None:
    with pytest.raises(TimeoutError):
        take([accepted()], 2, deadline_s=0.05)

"""The gateway's inbox checks a job attempt's messages: each dispatch's frames come one way
(in order), but an earlier dispatch's may come late, a later dispatch may follow output
the broker did not know of, and a frame the broker could not pass on leaves a gap. No
sockets here: messages are put in the orders the ways can produce.
"""

from __future__ import annotations

import asyncio

import pytest

from mlx_stack.common import messages as msgs
from mlx_stack.gateway.inbox import Inbox, Lost


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
    got = take([accepted(), partial(0, "a"), partial(1, "b"), partial(2, "c"), final(3)], 3)
    assert shown(got) == [("accepted", "j/0"), ("partial", "abc"), ("final", "j/0")]


def test_a_final_that_counts_partials_that_never_came_is_a_lost_frame_at_once() -> None:
    # One way: nothing can still overtake it, so there is nothing to wait for.
    got = take([accepted(), partial(0, "a"), final(2)], 3, deadline_s=60)
    assert shown(got) == [("accepted", "j/0"), ("partial", "a"), ("lost", "lost_frame")]


def test_the_brokers_own_fail_passes() -> None:
    fail = msgs.Fail(job_id="j", error="gone", code=msgs.ErrorCode.WORKER_LOST, retryable=True)
    got = take([accepted(), partial(0, "a"), fail], 3)
    assert shown(got) == [("accepted", "j/0"), ("partial", "a"), ("fail", "j")]


def test_a_gap_is_a_lost_frame() -> None:
    got = take([accepted(), partial(0, "a"), partial(2, "c")], 3)
    assert shown(got) == [("accepted", "j/0"), ("partial", "a"), ("lost", "lost_frame")]


def test_an_earlier_dispatchs_late_frames_are_dropped() -> None:
    # Dispatch 0's worker was purged before any output; dispatch 1 runs the job.
    got = take([accepted(0), accepted(1), partial(0, "late", 0), partial(0, "new", 1),
                final(1, 1)], 4)
    assert shown(got) == [("accepted", "j/0"), ("accepted", "j/1"), ("partial", "new"),
                          ("final", "j/1")]


def test_a_new_dispatch_after_output_reached_the_client_is_a_loss() -> None:
    # The broker missed the output (it went straight to us) and ran the job again from
    # its start: what the client saw would be repeated. Resubmit from what it has seen.
    got = take([accepted(0), partial(0, "seen"), accepted(1), partial(0, "seen", 1)], 3)
    assert shown(got) == [("accepted", "j/0"), ("partial", "seen"), ("lost", "mid_stream")]


def test_the_deadline_still_holds() -> None:
    with pytest.raises(TimeoutError):
        take([accepted()], 2, deadline_s=0.05)

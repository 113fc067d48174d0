"""A request's attempts (gateway/attempts.py) without sockets: when the client learns the
request started, what a resubmission resumes from, and which losses count against
``max_retries``."""

from __future__ import annotations

import pytest

from mlx_stack.common import messages as msgs
from mlx_stack.gateway.attempts import (
    REDISPATCHED,
    Attempts,
    Done,
    JobError,
    Piece,
    Resubmit,
    Served,
)
from mlx_stack.gateway.inbox import Lost


def accepted(worker: str, dispatch: int = 0) -> msgs.Accepted:
    return msgs.Accepted(job_id=f"j/{dispatch}", node_id=f"node-{worker}", worker_id=worker,
                         model_id="m")


def partial(text: str, *tokens: int) -> msgs.Partial:
    return msgs.Partial(job_id="j/1", token_ids=list(tokens), text=text)


def test_the_request_starts_at_the_workers_accepted_and_names_that_worker() -> None:
    attempts = Attempts(max_retries=3)
    attempts.submission()
    # Dispatch 0's worker died before its ACCEPTED reached us, dispatch 1's too late:
    # the coordinator re-dispatched twice before any output.
    assert attempts.apply(accepted("w3", dispatch=2)) == [
        REDISPATCHED, REDISPATCHED, Served("node-w3", "w3", "m")]
    assert attempts.apply(accepted("w4", dispatch=3)) == [REDISPATCHED]  # answered once
    assert attempts.apply(partial("Hi", 7)) == [Piece("Hi", 1, [], [])]
    assert not attempts.ended
    final = msgs.Final(job_id="j/1", finish_reason="stop", usage={"completion_tokens": 1})
    assert attempts.apply(final) == [Done("stop", {"completion_tokens": 1})]
    assert attempts.ended


def test_a_final_without_output_ends_the_request() -> None:
    attempts = Attempts(max_retries=3)
    attempts.submission()
    assert attempts.apply(accepted("w1")) == [Served("node-w1", "w1", "m")]
    steps = attempts.apply(msgs.Final(job_id="j/0", finish_reason="length"))
    assert steps == [Done("length", {})] and attempts.ended


def test_a_resubmission_resumes_from_what_the_client_was_sent() -> None:
    attempts = Attempts(max_retries=3)
    attempts.submission()
    attempts.apply(accepted("w1"))
    attempts.apply(partial("Hel", 1, 2))
    attempts.apply(partial("lo", 3))
    (lost,) = attempts.apply(msgs.Fail(job_id="j/1", error="worker gone",
                                       code=msgs.ErrorCode.WORKER_LOST, retryable=True))
    assert lost == Resubmit("mid_stream", "worker gone") and not attempts.ended
    attempts.resubmit(lost)
    assert attempts.submission() == {"resume_token_ids": [1, 2, 3], "resume_text": "Hello",
                                     "attempt": 1}
    assert attempts.apply(accepted("w2")) == []  # started already: no second answer
    assert attempts.apply(partial("!", 4)) == [Piece("!", 1, [], [])]


def test_only_lost_workers_count_against_max_retries() -> None:
    attempts = Attempts(max_retries=1)
    for _ in range(5):  # the mesh's doing: a lost broker, a lost frame
        attempts.submission()
        (step,) = attempts.apply(Lost("broker restarted"))
        assert step == Resubmit("coordinator", "broker restarted")
        attempts.resubmit(step)
    attempts.submission()
    attempts.resubmit(Resubmit("mid_stream", "first"))
    attempts.submission()
    with pytest.raises(JobError) as gave_up:
        attempts.resubmit(Resubmit("mid_stream", "second"))
    assert gave_up.value.code == msgs.ErrorCode.WORKER_LOST
    assert "2 workers were lost" in gave_up.value.message and "second" in gave_up.value.message


def test_a_refusal_ends_the_request_with_its_code_and_param() -> None:
    attempts = Attempts(max_retries=3)
    attempts.submission()
    with pytest.raises(JobError) as refused:  # before the worker's ACCEPTED
        attempts.apply(msgs.Fail(job_id="j/1", error="no tools here", param="tools",
                                 code=msgs.ErrorCode.INVALID_REQUEST, retryable=False))
    assert (refused.value.code, refused.value.param) == (msgs.ErrorCode.INVALID_REQUEST, "tools")
    assert attempts.ended and not attempts.started  # still an HTTP 400, not a stream error

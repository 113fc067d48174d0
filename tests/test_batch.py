"""The worker's batch loop on the synthetic engine: every running job advances together,
a job leaves the batch alone (finished, stopped, cancelled or failed), the others go on."""

from __future__ import annotations

from mlx_stack.common import messages as msgs
from mlx_stack.common.generation import GenerationRequest
from mlx_stack.worker.synthetic import FAULT, SyntheticEngine, next_token, word
from testkit.harness import wait_for
from tests.batchloop import RunningLoop


def job(job_id: str, prompt: str, max_tokens: int = 20, stop: list[str] | None = None) -> msgs.Job:
    request = GenerationRequest(kind="completion", prompt=prompt, max_tokens=max_tokens,
                                  stop=stop or [])
    return msgs.Job(job_id=job_id, request=request)


def expected(prompt: str, n: int) -> list[int]:
    seq = list(prompt.encode())
    for _ in range(n):
        seq.append(next_token(seq))
    return seq[len(prompt):]


def tokens_of(messages: list[msgs.Message]) -> list[int]:
    return [t for m in messages if isinstance(m, msgs.Partial) for t in m.token_ids]


def test_jobs_in_one_batch_advance_together_and_each_is_exact() -> None:
    """Four jobs started at once: each one's first token is sent before any job ends (one
    job at a time would finish the first before the second begins)."""
    engine = SyntheticEngine("s", slots=4, rate=50)  # 0.4 s jobs: all start before one ends
    prompts = [f"prompt {i}" for i in range(4)]
    with RunningLoop(engine) as loop:
        for i, prompt in enumerate(prompts):
            loop.start(job(f"j{i}", prompt))
        results = [loop.wait(f"j{i}") for i in range(4)]
        order = [(m.job_id, type(m).__name__) for m in loop.sent]
    first_final = next(i for i, (_, kind) in enumerate(order) if kind == "Final")
    assert {j for j, kind in order[:first_final] if kind == "Partial"} == {"j0", "j1", "j2", "j3"}
    for prompt, messages in zip(prompts, results, strict=True):
        assert tokens_of(messages) == expected(prompt, 20)
        assert messages[-1].finish_reason == "length"
    assert engine.wait() is None  # every sequence left the engine
    assert loop.counts == {"jobs_started": 4, "jobs_done": 4}


def test_a_cancelled_job_leaves_the_batch_and_the_others_finish() -> None:
    engine = SyntheticEngine("s", slots=3, rate=100)  # 0.6 s jobs: time for the cancel
    with RunningLoop(engine) as loop:
        loop.start(job("long-a", "a", max_tokens=60))
        loop.start(job("gone", "b", max_tokens=60))
        loop.start(job("long-c", "c", max_tokens=60))
        wait_for("5 tokens of the job to cancel", lambda: loop.tokens("gone") >= 5, timeout=10)
        loop.loop.put(msgs.Cancel(job_id="gone"))
        gone = loop.wait("gone")
        a, c = loop.wait("long-a"), loop.wait("long-c")
    assert isinstance(gone[-1], msgs.Fail) and gone[-1].code == msgs.ErrorCode.CANCELLED
    assert len(tokens_of(gone)) < 60
    assert tokens_of(a) == expected("a", 60) and tokens_of(c) == expected("c", 60)
    assert loop.counts["jobs_cancelled"] == 1 and loop.counts["jobs_done"] == 2


def test_a_stop_sequence_ends_one_job_and_frees_its_seat() -> None:
    engine = SyntheticEngine("s", slots=2, rate=0)
    stop = word(expected("x", 3)[2])
    with RunningLoop(engine) as loop:
        stopped = loop.run(job("stopped", "x", max_tokens=50, stop=[stop]))
        assert engine.wait() is None  # removed from the engine, not run to max_tokens
        other = loop.run(job("other", "y", max_tokens=5))
    assert stopped[-1].finish_reason == "stop" and len(tokens_of(stopped)) == 3
    assert "".join(m.text for m in stopped if isinstance(m, msgs.Partial)) == "".join(
        word(t) for t in expected("x", 2))
    assert tokens_of(other) == expected("y", 5)


def test_an_engine_error_fails_that_job_only() -> None:
    engine = SyntheticEngine("s", slots=2, rate=200)
    with RunningLoop(engine) as loop:
        loop.start(job("fine", "hello", max_tokens=10))
        bad = loop.run(job("bad", f"x {FAULT} y"))
        fine = loop.wait("fine")
    assert isinstance(bad[-1], msgs.Fail) and bad[-1].code == msgs.ErrorCode.INTERNAL
    assert "fault switch" in bad[-1].error
    assert tokens_of(fine) == expected("hello", 10)
    assert loop.counts["jobs_failed"] == 1


def test_stopping_the_loop_cancels_what_still_runs() -> None:
    engine = SyntheticEngine("s", slots=1, rate=1, ttft=60)
    loop = RunningLoop(engine)
    with loop:
        loop.start(job("slow", "z"))
    messages = loop.wait("slow")
    assert isinstance(messages[-1], msgs.Fail) and messages[-1].retryable


class BrokenEngine(SyntheticEngine):
    """Fails its third step, and every removal after that."""

    def __init__(self) -> None:
        super().__init__("s", slots=2, rate=0)
        self.steps = 0

    def step(self):  # type: ignore[no-untyped-def]
        self.steps += 1
        if self.steps == 3:
            raise RuntimeError("the batch broke")
        return super().step()

    def remove(self, seq: int) -> None:
        raise RuntimeError("cannot remove either")


def test_a_broken_batch_fails_its_jobs_and_the_loop_serves_the_next() -> None:
    engine = BrokenEngine()
    with RunningLoop(engine) as loop:
        loop.start(job("a", "a", max_tokens=50))
        loop.start(job("b", "b", max_tokens=50))
        failed = [loop.wait("a")[-1], loop.wait("b")[-1]]
        after = loop.run(job("c", "c", max_tokens=3))
    assert all(isinstance(m, msgs.Fail) and "the batch broke" in m.error for m in failed)
    assert tokens_of(after) == expected("c", 3)

"""worker.runner on the synthetic engine, through the worker's batch loop: stop
sequences, the resume seam, cancellation."""

from __future__ import annotations

import pytest

from mlx_stack.common import messages as msgs
from mlx_stack.common.generation import GenerationRequest
from mlx_stack.worker.synthetic import SyntheticEngine, next_token, word
from tests.batchloop import RunningLoop


class LaggingDetokenizer:
    """Holds each token's text back until the next token arrives, like a streaming
    detokenizer waiting for the end of a word: tokens run ahead of text."""

    def __init__(self) -> None:
        self.text = ""
        self._held = ""

    def add_token(self, token: int) -> None:
        self.text += self._held
        self._held = word(token)

    def finalize(self) -> None:
        self.text += self._held
        self._held = ""


class LaggingEngine(SyntheticEngine):
    def detokenizer(self, request: GenerationRequest) -> LaggingDetokenizer:  # type: ignore[override]
        return LaggingDetokenizer()


def run(engine: SyntheticEngine, max_tokens: int = 12, stop: list[str] | None = None,
        resume: list[int] | None = None, resume_text: str = "",
        cancel_after: int | None = None) -> tuple[list[msgs.Message], list[int], str]:
    request = GenerationRequest(kind="completion", prompt="abc", max_tokens=max_tokens,
                                  stop=stop or [])
    job = msgs.Job(job_id="j", request=request, resume_token_ids=resume or [],
                   resume_text=resume_text)
    with RunningLoop(engine) as loop:
        loop.cancel_after = cancel_after
        sent = loop.run(job)
    partials = [m for m in sent if isinstance(m, msgs.Partial)]
    return sent, [t for m in partials for t in m.token_ids], "".join(m.text for m in partials)


def expected_tokens(prompt: bytes, n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(next_token(seq))
    return seq[len(prompt):]


@pytest.mark.parametrize("engine", [SyntheticEngine("s", rate=0),
                                    LaggingEngine("s", rate=0)])
def test_uninterrupted_run(engine: SyntheticEngine) -> None:
    sent, tokens, text = run(engine)
    assert tokens == expected_tokens(b"abc", 12)
    assert text == "".join(word(t) for t in tokens)
    final = sent[-1]
    assert isinstance(final, msgs.Final) and final.finish_reason == "length"
    assert final.usage == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15,
                           "cached_tokens": 0, "prompt_tokens_computed": 3}


@pytest.mark.parametrize("engine", [SyntheticEngine("s", rate=0),
                                    LaggingEngine("s", rate=0)])
@pytest.mark.parametrize("cut", [1, 5, 11])
def test_resume_continues_exactly(engine: SyntheticEngine, cut: int) -> None:
    """A resumed job sends exactly what the client has not seen: with a lagging
    detokenizer the resume tokens' last word was never sent and comes first."""
    _, all_tokens, all_text = run(engine)
    sent, _, _ = run(engine, cancel_after=cut)
    seen_tokens = [t for m in sent if isinstance(m, msgs.Partial) for t in m.token_ids]
    seen_text = "".join(m.text for m in sent if isinstance(m, msgs.Partial))
    assert isinstance(sent[-1], msgs.Fail) and sent[-1].code == msgs.ErrorCode.CANCELLED
    computed = engine.counters["prompt_tokens_computed"]
    resumed, more_tokens, more_text = run(engine, resume=seen_tokens, resume_text=seen_text)
    assert seen_tokens + more_tokens == all_tokens
    assert seen_text + more_text == all_text
    assert resumed[-1].usage["completion_tokens"] == 12  # every token counted once
    # What the engine prefilled for it, its resume tokens among them (the RELEASE's).
    assert resumed[-1].usage["prompt_tokens_computed"] == (
        engine.counters["prompt_tokens_computed"] - computed)


def test_stop_sequence_spanning_tokens_is_cut_and_never_leaked() -> None:
    tokens = expected_tokens(b"abc", 12)
    stop = f"{word(tokens[3])}{word(tokens[4])[:3]}"  # ends inside token 5's text
    sent, _, text = run(SyntheticEngine("s", rate=0), stop=[stop])
    assert text == "".join(word(t) for t in tokens[:3])
    assert sent[-1].finish_reason == "stop"


def test_stop_sequence_across_the_resume_seam() -> None:
    engine = LaggingEngine("s", rate=0)
    tokens = expected_tokens(b"abc", 12)
    stop = f"{word(tokens[2])}{word(tokens[3])}"
    # The client saw tokens 0..2 but (lagging) only the text of 0..1.
    seen_text = "".join(word(t) for t in tokens[:2])
    sent, _, more = run(engine, stop=[stop], resume=tokens[:3], resume_text=seen_text)
    assert more == ""
    assert sent[-1].finish_reason == "stop"


def test_resume_with_nothing_left_ends_at_length() -> None:
    tokens = expected_tokens(b"abc", 4)
    sent, new, text = run(SyntheticEngine("s", rate=0), max_tokens=4, resume=tokens,
                          resume_text="".join(word(t) for t in tokens))
    assert (new, text, sent[-1].finish_reason) == ([], "", "length")

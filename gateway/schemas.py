"""OpenAI request bodies, validated, and their translation into a GenerationRequest.

Unknown fields are ignored (clients send many), but a field we cannot honour with a
non-default value (``n > 1``, ``echo``, image content, a JSON schema the
grammar library cannot compile) is refused with a clear 400 rather than silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mlx_stack.common.constraints import ANY_OBJECT, SchemaError, json_grammar
from mlx_stack.common.generation import GenerationRequest


class Unsupported(ValueError):
    """A valid OpenAI field with a value this server does not implement."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def to_template(self, index: int) -> dict[str, Any]:
        """The message as a chat template expects it: content as one string."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, TextPart):
                    kind = part.get("type", "?")
                    raise Unsupported(f"messages.{index}.content",
                                      f"content parts of type '{kind}' are not supported; "
                                      "send text")
                texts.append(part.text)
            content = "".join(texts)
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": content or ""}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    """Not OpenAI's, but vLLM's and Anthropic's (the Messages API passes it on): sample
    among the ``top_k`` most likely tokens (None or 0: all)."""
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _check(self) -> None:
        if self.n != 1:
            raise Unsupported("n", "only n=1 is supported; send several requests instead")
        if self.logit_bias:
            raise Unsupported("logit_bias", "logit_bias is not supported")

    def _params(self, max_tokens: int) -> dict[str, Any]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return {"max_tokens": max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k or 0, "stop": stops, "seed": self.seed,
                "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty}


def json_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema a ``response_format`` asks for (None for plain text), checked to
    compile, so that a format the server cannot enforce is a 400 before anything runs."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    if kind != "json_schema":
        raise Unsupported("response_format", f"response_format type {kind!r} is not "
                          "supported; use 'text', 'json_object' or 'json_schema'")
    spec = response_format.get("json_schema") if response_format else None
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise Unsupported("response_format", "response_format 'json_schema' needs "
                          "json_schema.schema, a JSON schema object")
    try:
        json_grammar(schema)
    except SchemaError as exc:
        raise Unsupported("response_format",
                          f"this JSON schema cannot be enforced: {exc}") from None
    return schema


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    parallel_tool_calls: bool = True

    def to_generation(self, default_max: int) -> GenerationRequest:
        self._check()
        choice = self.tool_choice or "auto"
        if choice not in ("auto", "none") and not self.tools:
            raise Unsupported("tool_choice", "tool_choice needs tools")
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            names = [(t.get("function") or {}).get("name") for t in self.tools or []]
            if choice.get("type") != "function" or name not in names:
                raise Unsupported("tool_choice", "tool_choice must name one of the "
                                  f"request's tools ({', '.join(map(str, names))})")
        elif choice not in ("auto", "none", "required"):
            raise Unsupported("tool_choice", f"tool_choice {choice!r} is not one of "
                              "'auto', 'none', 'required' or a named function")
        if self.top_logprobs and not self.logprobs:
            raise Unsupported("top_logprobs", "top_logprobs needs logprobs: true")
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max
        tools = None if choice == "none" else self.tools
        return GenerationRequest(
            kind="chat", messages=[m.to_template(i) for i, m in enumerate(self.messages)],
            tools=tools, tool_choice=choice if tools else "auto",
            parallel_tool_calls=self.parallel_tool_calls,
            logprobs=bool(self.logprobs), top_logprobs=self.top_logprobs or 0,
            json_schema=json_schema(self.response_format),
            **self._params(max_tokens))


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    """Legacy log-probabilities: each token's own and its ``logprobs`` most likely
    alternatives (0: its own only)."""

    @field_validator("logprobs", mode="before")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        return None if value is False else value  # some clients send false for "none"

    def to_generation(self, default_max: int) -> GenerationRequest:
        self._check()
        if self.echo:
            raise Unsupported("echo", "echo is not supported")
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise Unsupported("prompt", "send one prompt per request")
            prompt = prompt[0]
        return GenerationRequest(kind="completion", prompt=prompt,
                                 logprobs=self.logprobs is not None,
                                 top_logprobs=self.logprobs or 0,
                                 **self._params(self.max_tokens or default_max))

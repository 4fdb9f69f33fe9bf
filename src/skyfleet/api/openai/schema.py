"""Request schemas for the OpenAI surfaces we accept (validation only; bodies are forwarded as sent).

Unknown top-level fields are allowed and passed to the engine (as OpenAI-compatible servers do);
the fields we act on are typed strictly.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_STRICT_OPEN = ConfigDict(strict=True, extra="allow")
_STRICT = ConfigDict(strict=True, extra="forbid")

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ContentPart(BaseModel):
    model_config = _STRICT_OPEN
    type: str = Field(min_length=1)


class ChatMessage(BaseModel):
    model_config = _STRICT_OPEN
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=256)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class _Sampling(BaseModel):
    model_config = _STRICT_OPEN
    model: str = Field(min_length=1, max_length=256)
    max_tokens: Annotated[int, Field(ge=1, le=1_048_576)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Literal[1] | None = Field(None, description="Only one choice per request is supported.")
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    user: str | None = Field(None, max_length=256)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1, le=1_048_576)] | None = None

    def output_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] = Field(description="A string, a one-element list, or token ids.")
    echo: bool | None = None

    def output_budget(self) -> int | None:
        return self.max_tokens


def model_object(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "skyfleet"}

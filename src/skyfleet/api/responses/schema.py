"""POST /v1/responses request body (the subset a chat product needs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ConversationRef(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    id: str = Field(min_length=1, max_length=128)


class CreateResponse(BaseModel):
    # Unknown fields are accepted and ignored, as OpenAI-compatible servers do; the ones below
    # are typed strictly. Tools are refused explicitly (see the service).
    model_config = ConfigDict(strict=True, extra="allow")
    model: str = Field(min_length=1, max_length=256)
    input: str | list[Any]
    instructions: str | None = Field(None, max_length=1_000_000)
    previous_response_id: str | None = Field(None, min_length=1, max_length=128)
    conversation: str | ConversationRef | None = None
    store: bool = True
    stream: bool = False
    max_output_tokens: Annotated[int, Field(ge=1, le=1_048_576)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    metadata: dict[str, Any] | None = None
    tools: list[Any] | None = None
    user: str | None = Field(None, max_length=256)

    @property
    def conversation_id(self) -> str | None:
        if isinstance(self.conversation, ConversationRef):
            return self.conversation.id
        return self.conversation

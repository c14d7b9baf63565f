"""OpenAI-shaped wire models for /v1/chat/completions, in the spec's order and names.

Deviations from OpenAI are commented where they occur. Unknown fields are rejected,
as OpenAI does ("Unrecognized request argument").
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Deviation: tool and function messages are not accepted (companions have no tools).
    role: Literal["system", "developer", "user", "assistant"]
    # Deviation: only text parts; image and audio parts are rejected.
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


StopText = Annotated[str, Field(min_length=1)]


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "ember", "messages": [{"role": "user", "content": "Hi! How was your day?"}],
         "max_tokens": 16},
    ]})

    messages: list[ChatMessageIn] = Field(min_length=1)
    # The companion's id: Homefire serves companions, not raw models.
    model: str
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # accepted, ignored
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    metadata: dict[str, str] | None = None  # accepted, ignored
    n: Literal[1] | None = None  # Deviation: one choice per request
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: StopText | list[StopText] | None = None  # Deviation: an empty stop string is refused
    store: bool | None = None  # accepted, ignored: Homefire always stores history
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None  # accepted, ignored
    # vLLM extension, also accepted here.
    repetition_penalty: float | None = Field(None, gt=0, le=2)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if isinstance(value, str):
            value = [value]
        if value is not None and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "homefire"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

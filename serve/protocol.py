"""OpenAI-shaped wire models for /v1/chat/completions, in the spec's order and names.

Every field of OpenAI's Chat Completions request is accepted, so that any client's body
works as it is. The fields Homefire uses are validated strictly; those a companion has no
use for (tools, response formats, logprobs, audio, ...) are accepted and ignored, each
commented below and listed in the README. Fields nobody defines are ignored too, with a
debug log line naming each, as vLLM does.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

log = logging.getLogger(__name__)
Ignored = Annotated[Any, Field(description="accepted and ignored (see the README's deviations)")]


class Lenient(BaseModel):
    """Unknown fields are kept aside (model_extra) and logged, never refused."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_unknown(self):
        for name in self.model_extra or ():
            log.debug("ignored the request field %r (%s), which Homefire does not define",
                      name, type(self).__name__)
        return self


class ContentPart(Lenient):
    # Deviation: only text (and an assistant's refusal) is read; image, audio and file parts
    # are accepted and left out of the prompt.
    type: str
    text: str | None = None
    refusal: str | None = None


class ChatMessageIn(Lenient):
    # Deviation: tool and function messages are accepted and left out (companions call no
    # tools, so they can only come from a conversation held with another model).
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None   # may be absent from an assistant's tool call only
    name: str | None = None
    refusal: str | None = None
    tool_calls: Ignored = None
    tool_call_id: Ignored = None
    function_call: Ignored = None
    audio: Ignored = None

    @model_validator(mode="before")
    @classmethod
    def _tool_calls_have_no_content(cls, data: Any) -> Any:
        if isinstance(data, dict) and "content" not in data and data.get("role") in ("assistant", "tool",
                                                                                      "function"):
            return {**data, "content": None}
        return data

    @property
    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or part.refusal or "" for part in self.content
                         if part.type in ("text", "refusal"))


class StreamOptions(Lenient):
    include_usage: bool = False
    include_obfuscation: Ignored = None


StopText = Annotated[str, Field(min_length=1)]


class ChatCompletionRequest(Lenient):
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"model": "ember", "messages": [{"role": "user", "content": "Hi! How was your day?"}],
         "max_tokens": 16},
    ]})

    messages: list[ChatMessageIn] = Field(min_length=1)
    # The companion's id (Homefire serves companions, not raw models), or the utility model's.
    model: str
    audio: Ignored = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    function_call: Ignored = None   # deprecated by OpenAI; companions call no functions
    functions: Ignored = None
    logit_bias: Ignored = None
    logprobs: Ignored = None   # Deviation: choices' logprobs are always null
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    metadata: Ignored = None
    modalities: Ignored = None   # Deviation: replies are text only
    moderation: Ignored = None
    n: Literal[1] | None = None  # Deviation: one choice per request
    parallel_tool_calls: Ignored = None
    prediction: Ignored = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    prompt_cache_key: Ignored = None   # vLLM caches prefixes by itself
    prompt_cache_options: Ignored = None
    prompt_cache_retention: Ignored = None
    reasoning_effort: Ignored = None
    response_format: Ignored = None   # Deviation: replies are the companion's free text
    safety_identifier: Ignored = None
    seed: int | None = None
    service_tier: Ignored = None
    stop: StopText | list[StopText] | None = None  # Deviation: an empty stop string is refused
    store: bool | None = None   # false: nothing of this request is stored, remembered or trained on
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    tool_choice: Ignored = None   # Deviation: companions reply in text, never with tool_calls
    tools: Ignored = None
    top_logprobs: Ignored = None
    top_p: float | None = Field(None, gt=0, le=1)
    user: Ignored = None
    verbosity: Ignored = None
    web_search_options: Ignored = None
    # Homefire's: with a group's model (group:ID), the member (id or name) who answers; default: the
    # group's reply order. The answer names its speaker (the message's `name`, X-Homefire-Speaker).
    speaker: str | None = Field(None, min_length=1, max_length=200)
    # vLLM's sampling extensions, also used here (SillyTavern sends top_k).
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)

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

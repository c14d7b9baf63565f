"""OpenAI-compatible routes: /v1/models and /v1/chat/completions; `model` names a companion."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse

from serve import metrics
from serve.account import AccountDep
from serve.chat import Delta, Done, Turn
from serve.deps import API_GUARDS, ChatDep, LimiterDep
from serve.errors import ERROR_RESPONSES, stream_error
from serve.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessageOut,
    Choice,
    ModelCard,
    ModelList,
    Usage,
)
from serve.sse import SSE_HEADERS, ClosingStreamingResponse, event, streamed
from serve.tasks import SYSTEM_ROLES, utility_turns

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=API_GUARDS,
                   responses=ERROR_RESPONSES)


@router.get("/models")
def list_models(account: AccountDep) -> ModelList:
    """Every companion the user may talk to, as a model a client can name, and the utility
    model for clients' background work (no persona, no memory, never stored)."""
    return ModelList(data=[*(ModelCard(id=c.id, created=0) for c in account.companions()),
                           ModelCard(id=account.hf.tasks.model, created=0)])


@router.post("/chat/completions", response_model=ChatCompletion,
             responses=streamed("The completion; with stream: chunks as OpenAI sends them, then [DONE]"))
async def chat_completions(body: ChatCompletionRequest, account: AccountDep, chat: ChatDep,
                           limiter: LimiterDep):
    """Reply as the companion named by `model`; the conversation is stored, only what is new.

    Not stored: requests with `store: false`, those to the utility model, and clients'
    background tasks (titles, tags, summaries: `tasks.patterns`), which the utility model
    answers."""
    said = [(m.role, m.text) for m in body.messages if m.role not in ("tool", "function")]
    if not said:
        raise HTTPException(400, "messages: there is no system, user or assistant message")
    limiter.check_messages([text for _, text in said])
    handling = account.hf.tasks.handling(body.model, body.store, said[-1][1])
    companion = None
    if handling.why != "utility_model":   # an unknown companion is a 404, task or not
        companion = await asyncio.to_thread(account.companion, body.model)
    if handling.utility:
        system, turns = utility_turns(said)
    else:
        system = [text for role, text in said if role in SYSTEM_ROLES]
        turns = [(role, text) for role, text in said if role not in SYSTEM_ROLES]
    if not turns or turns[-1][0] != "user":
        raise HTTPException(400, "messages: the last non-system message must have role 'user'")
    overrides = {
        "max_tokens": body.max_completion_tokens or body.max_tokens,
        "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed,
        "stop": body.stop, "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty, "repetition_penalty": body.repetition_penalty,
        "top_k": body.top_k, "min_p": body.min_p,
    }
    history, user = account.history, account.name
    turn = Turn(None if handling.utility else companion, [{"role": r, "content": c} for r, c in turns],
                overrides, system, "openai", user, account.called)

    def prepare() -> tuple:
        # Tokenizing (which releases the GIL) and the commit run off the event loop, so a
        # burst of requests is prepared side by side instead of queueing behind each other.
        plan = chat.plan(turn)
        if not handling.store:
            return plan, None
        return plan, history.record_resent(companion.key, turns)[0]

    plan, conversation_id = await limiter.reserve(user, prepare)
    events = chat.reply(plan, conversation_id)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    model = companion.id if companion else body.model
    if conversation_id:
        headers = {"X-Homefire-Conversation": conversation_id}
    else:
        metrics.UNSTORED.labels(handling.why, handling.client or "").inc()
        headers = {"X-Homefire-Stored": "false"} | (
            {"X-Homefire-Task": handling.client} if handling.client else {})
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = limiter.counted(user, _sse(events, completion_id, created, model, usage))
        return ClosingStreamingResponse(stream, media_type="text/event-stream",
                                        headers=SSE_HEADERS | headers)
    done = None
    async for item in limiter.counted(user, events):
        if isinstance(item, Done):
            done = item
    assert done is not None
    result = ChatCompletion(
        id=completion_id, created=created, model=model,
        choices=[Choice(message=ChatMessageOut(content=done.message.content),
                        finish_reason=done.finish_reason)],
        usage=Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                    total_tokens=done.prompt_tokens + done.completion_tokens),
    )
    return JSONResponse(result.model_dump(), headers=headers)


async def _sse(events: AsyncIterator, completion_id: str, created: int, model: str,
               include_usage: bool) -> AsyncIterator[str]:
    """Chunks exactly as OpenAI streams them, built from a fixed prefix for speed."""
    usage_null = ',"usage":null' if include_usage else ""
    head = (f'data: {{"id":"{completion_id}","object":"chat.completion.chunk",'
            f'"created":{created},"model":{json.dumps(model)},"choices":[{{"index":0,"delta":')
    try:
        yield (f'{head}{{"role":"assistant","content":""}},"logprobs":null,'
               f'"finish_reason":null}}]{usage_null}}}\n\n')
        async for item in events:
            if isinstance(item, Delta):
                yield (f'{head}{{"content":{json.dumps(item.text, ensure_ascii=False)}}},'
                       f'"logprobs":null,"finish_reason":null}}]{usage_null}}}\n\n')
            elif isinstance(item, Done):
                yield (f'{head}{{}},"logprobs":null,"finish_reason":'
                       f'{json.dumps(item.finish_reason)}}}]{usage_null}}}\n\n')
                if include_usage:
                    usage = {"prompt_tokens": item.prompt_tokens,
                             "completion_tokens": item.completion_tokens,
                             "total_tokens": item.prompt_tokens + item.completion_tokens}
                    yield event({"id": completion_id, "object": "chat.completion.chunk",
                                 "created": created, "model": model, "choices": [],
                                 "usage": usage})
        yield "data: [DONE]\n\n"
    except Exception as err:
        yield event(stream_error(err))
    finally:
        await events.aclose()

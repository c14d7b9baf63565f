"""OpenAI-compatible routes: /v1/models and /v1/chat/completions; `model` names a companion, or
a saved group (group:ID) whose members answer in turn."""

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
from serve.groups import GroupChat, NotAMember
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
from store.companions import visible_id
from store.groups import GROUP_MODEL, Group
from store.history import Message

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=API_GUARDS,
                   responses=ERROR_RESPONSES)


@router.get("/models")
def list_models(account: AccountDep) -> ModelList:
    """Every companion the user may talk to, as a model a client can name, and the utility
    model for clients' background work (no persona, no memory, never stored)."""
    return ModelList(data=[*(ModelCard(id=c.id, created=0) for c in account.companions()),
                           *(ModelCard(id=GROUP_MODEL + g.id, created=0) for g in account.groups.list()),
                           ModelCard(id=account.hf.tasks.model, created=0)])


@router.post("/chat/completions", response_model=ChatCompletion,
             responses=streamed("The completion; with stream: chunks as OpenAI sends them, then [DONE]"))
async def chat_completions(body: ChatCompletionRequest, account: AccountDep, chat: ChatDep,
                           limiter: LimiterDep):
    """Reply as the companion named by `model`; the conversation is stored, only what is new.

    Not stored: requests with `store: false`, those to the utility model, and clients'
    background tasks (titles, tags, summaries: `tasks.patterns`), which the utility model
    answers."""
    kept = [m for m in body.messages if m.role not in ("tool", "function")]
    said = [(m.role, m.text) for m in kept]
    if not said:
        raise HTTPException(400, "messages: there is no system, user or assistant message")
    limiter.check_messages([text for _, text in said])
    handling = account.hf.tasks.handling(body.model, body.store, said[-1][1])
    companion, group = None, None
    if body.model.startswith(GROUP_MODEL):
        group = await asyncio.to_thread(_group_chat, account, body.model[len(GROUP_MODEL):])
    elif handling.why != "utility_model":   # an unknown companion is a 404, task or not
        companion = await asyncio.to_thread(account.companion, body.model)
    if body.speaker is not None and group is None:
        raise HTTPException(400, "speaker: only a group's model (group:ID) names who answers")
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

    names = [m.name for m in kept if m.role not in SYSTEM_ROLES]

    def prepare() -> tuple:
        # Tokenizing (which releases the GIL) and the commit run off the event loop, so a
        # burst of requests is prepared side by side instead of queueing behind each other.
        if group is not None and not handling.utility:
            return _prepare_group(group, turn, turns, names, body.speaker, handling.store, chat, history)
        plan = chat.plan(turn)
        if not handling.store:
            return plan, None
        return plan, history.record_resent(companion.key, turns)[0]

    plan, conversation_id = await limiter.reserve(user, prepare)
    events = chat.reply(plan, conversation_id)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    model = companion.id if companion else body.model
    speaker = {"X-Homefire-Speaker": plan.turn.companion.id} if plan.turn.group else {}
    if conversation_id:
        headers = {"X-Homefire-Conversation": conversation_id} | speaker
    else:
        metrics.UNSTORED.labels(handling.why, handling.client or "").inc()
        headers = {"X-Homefire-Stored": "false"} | speaker | (
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
    answer = result.model_dump()
    if speaker:   # Deviation: a group's answer names its speaker
        answer["choices"][0]["message"]["name"] = plan.turn.companion.id
    return JSONResponse(answer, headers=headers)


def _group_chat(account, group_id: str) -> tuple[Group, GroupChat]:
    group = account.group(group_id)
    return group, GroupChat(account.members(group.companions), group.reply_order)


def _prepare_group(found: tuple[Group, GroupChat], turn: Turn, turns: list[tuple[str, str]],
                   names: list[str | None], asked: str | None, store: bool, chat, history) -> tuple:
    """A group's answer to a resent conversation: who said each reply (stored, else the message's
    `name`), who answers (`asked`, else the reply order), the prompt as that member heard it."""
    group, members = found
    keys = [stored or _member_key(members, name)
            for stored, name in zip(history.speakers(group.id, turns), names, strict=True)]
    past = [Message(id=0, conversation_id="", role=role, content=content, created_at=0,
                    speaker=visible_id(key) if key else None)
            for (role, content), key in zip(turns[:-1], keys[:-1], strict=True)]
    said = turns[-1][1]
    speaker = members.member(asked) if asked else members.next_speaker(past, said)
    plan = chat.plan(members.turn(speaker, past, said, turn.overrides, turn.extra_system, "openai", turn.user,
                                  turn.called))
    if not store:
        return plan, None
    return plan, history.record_resent(group.keys[0], turns, group, keys)[0]


def _member_key(members: GroupChat, name: str | None) -> str | None:
    try:
        return members.member(name).key if name else None
    except NotAMember:
        return None


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

"""Native API for clients that keep no history: companions, conversations, messages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from memory.cards import MAX_CARD_BYTES, parse_card
from memory.companions import Companion, key_for
from memory.history import Conversation, Message
from memory.persona import substitute
from serve.account import AccountDep
from serve.chat import Delta, Done, Plan, Turn
from serve.deps import API_GUARDS, ChatDep, LimiterDep
from serve.errors import ERROR_RESPONSES, raw_body, stream_error
from serve.limits import bounded_stream
from serve.sse import SSE_HEADERS, ClosingStreamingResponse, event, streamed
from serve.tasks import TaskConversation, task_conversations

router = APIRouter(prefix="/api/v1", tags=["native"], dependencies=API_GUARDS,
                   responses=ERROR_RESPONSES)


@router.get("/companions")
def list_companions(account: AccountDep) -> list[Companion]:
    """The shared companions and the user's own."""
    return account.companions()


@router.get("/companions/{companion_id}")
def get_companion(companion_id: str, account: AccountDep) -> Companion:
    return account.companion_card(companion_id)


@router.post("/companions", status_code=201)
def create_companion(companion: Companion, account: AccountDep) -> Companion:
    """Create a companion: an admin's is shared with every user, anyone else's is their own.

    A user's own ids are theirs alone (another user may have a companion of the same id);
    shared ids are public and cannot be taken again."""
    account.new_id_is_free(companion.id)
    account.hf.companions.put(companion, "api", owner=account.owner_for_new())
    return companion


@router.put("/companions/{companion_id}")
def replace_companion(companion_id: str, companion: Companion, account: AccountDep) -> Companion:
    if companion.id != companion_id:
        raise HTTPException(
            400, f"id: the body's id {companion.id!r} differs from the path's {companion_id!r}")
    _, owner = account.editable(companion_id)
    account.hf.companions.put(companion, "api", owner=owner)
    return companion


@router.delete("/companions/{companion_id}", status_code=204)
async def delete_companion(companion_id: str, account: AccountDep) -> Response:
    """Delete a companion with its conversations, memories, vectors and adapters; refused (409)
    while anything of another user's belongs to it."""
    companion, _ = await asyncio.to_thread(account.editable, companion_id)
    await account.hf.delete_companion(companion, account.name)
    return Response(status_code=204)


@router.post("/companions/import", status_code=201, openapi_extra=raw_body("the card file (.json or .png)"))
async def import_card(
    request: Request, account: AccountDep,
    filename: Annotated[str, Query(description="Name of the uploaded file, for messages")] = "card",
    replace: Annotated[bool, Query(description="Replace a companion with the same id")] = False,
) -> Companion:
    """Import a Character Card V1/V2/V3: the raw bytes of a .json or .png file as the body."""
    too_large = f"{filename}: a card may be at most {MAX_CARD_BYTES >> 20} MiB"
    data = b"".join([chunk async for chunk in bounded_stream(request, MAX_CARD_BYTES, too_large)])
    companion = await asyncio.to_thread(parse_card, data, filename)   # never on the event loop

    def store() -> Companion:
        owner = account.owner_for_new()
        if replace and account.hf.companions.origin(key_for(companion.id, owner)):
            _, owner = account.editable(companion.id)
        else:
            account.new_id_is_free(companion.id, filename)
        account.hf.companions.put(companion, "card", filename, owner=owner)
        return companion

    return await asyncio.to_thread(store)


class NewConversation(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"companion": "ember"}]})
    companion: str
    title: str | None = None


class ConversationWithMessages(BaseModel):
    conversation: Conversation
    messages: list[Message]


class SendMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"content": "I planted tomatoes today.", "max_tokens": 16},
        {"content": "Tell me a joke.", "stream": True, "max_tokens": 16}]})
    content: str = Field(min_length=1)
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)


class Exchange(BaseModel):
    message: Message
    reply: Message


@router.post("/conversations", status_code=201)
def create_conversation(body: NewConversation, account: AccountDep) -> ConversationWithMessages:
    """Start a conversation; the companion's greeting (first_mes) is its first message."""
    companion = account.companion(body.companion)
    conversation = account.history.create_conversation(companion.key, body.title)
    messages = []
    if companion.first_mes.strip():
        greeting = substitute(companion.first_mes, companion, account.called)
        messages.append(account.history.append(conversation.id, "assistant", greeting))
    return ConversationWithMessages(conversation=conversation, messages=messages)


@router.get("/conversations")
def list_conversations(
    account: AccountDep, companion: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50, offset: Annotated[int, Query(ge=0)] = 0,
) -> list[Conversation]:
    """The user's conversations, most recently active first."""
    found = companion and account.hf.companions.get(companion, account.name)
    return account.history.list_conversations(found.key if found else companion, limit, offset)


@router.get("/companions/{companion_id}/task-conversations")
def list_task_conversations(companion_id: str, account: AccountDep) -> list[TaskConversation]:
    """The user's conversations with the companion that began with a client's background task
    (a title or tag request, a summary prompt: `tasks.patterns`), stored before Homefire kept
    such requests out. Forget each with DELETE /conversations/{id}."""
    companion = account.companion_card(companion_id)
    return task_conversations(account.hf.db, account.hf.tasks, companion.key, account.name)


@router.get("/conversations/{conversation_id}")
def get_conversation(conversation_id: str, account: AccountDep) -> ConversationWithMessages:
    conversation = account.conversation(conversation_id)
    return ConversationWithMessages(conversation=conversation,
                                    messages=account.history.messages(conversation.id))


@router.delete("/conversations/{conversation_id}", status_code=204)
def delete_conversation(conversation_id: str, account: AccountDep) -> Response:
    """Forget a conversation: its messages, its memories and their vectors."""
    account.conversation(conversation_id)
    account.memory.forget_conversation(conversation_id)
    return Response(status_code=204)


@router.post("/conversations/{conversation_id}/messages", response_model=Exchange,
             responses=streamed("The exchange; with stream: `delta` events, then `done` (or `error`)"))
async def send_message(conversation_id: str, body: SendMessage, account: AccountDep, chat: ChatDep,
                       limiter: LimiterDep):
    """Send a message; the reply comes back whole, or streamed as `delta` and `done` events."""
    limiter.check_messages([body.content])

    def find() -> tuple[Conversation, Companion]:
        conversation = account.conversation(conversation_id)
        return conversation, account.companion(conversation.companion_id)

    conversation, companion = await asyncio.to_thread(find)
    history, user = account.history, account.name
    overrides = body.model_dump(include={"temperature", "top_p", "max_tokens"})

    def prepare() -> tuple[Plan, Message]:
        # Off the event loop, like the OpenAI route: reading history, tokenizing, the commit.
        past = [{"role": m.role, "content": m.content} for m in history.messages(conversation.id)
                if m.content]
        plan = chat.plan(Turn(companion, [*past, {"role": "user", "content": body.content}], overrides,
                              user=user, called=account.called))
        return plan, history.append(conversation.id, "user", body.content)

    plan, message = await limiter.reserve(user, prepare)
    events = chat.reply(plan, conversation.id)
    if body.stream:
        return ClosingStreamingResponse(limiter.counted(user, _sse(events, message)),
                                        media_type="text/event-stream", headers=SSE_HEADERS)
    replies = [item.message async for item in limiter.counted(user, events) if isinstance(item, Done)]
    return Exchange(message=message, reply=replies[0])


async def _sse(events: AsyncIterator, message: Message) -> AsyncIterator[str]:
    try:
        async for item in events:
            if isinstance(item, Delta):
                yield event({"content": item.text}, "delta")
            elif isinstance(item, Done):
                yield event(Exchange(message=message, reply=item.message).model_dump_json(), "done")
    except Exception as err:
        yield event(stream_error(err), "error")
    finally:
        await events.aclose()

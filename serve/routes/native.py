"""Native API for clients that keep no history: companions, conversations, messages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from memory.cards import MAX_CARD_BYTES, parse_card
from memory.companions import Companion
from memory.history import Conversation, Message, UnknownConversation
from memory.persona import substitute
from serve.account import AccountDep
from serve.chat import Delta, Done, EngineFailed, Plan, Turn
from serve.deps import API_GUARDS, ChatDep, LimiterDep
from serve.engine import EngineUnavailable
from serve.errors import ERROR_RESPONSES, error_body, raw_body
from serve.sse import SSE_HEADERS, ClosingStreamingResponse, event, streamed

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
    """Create a companion: an admin's is shared with every user, anyone else's is their own."""
    if account.hf.companions.origin(companion.id):
        raise HTTPException(409, f"the id {companion.id!r} is taken; choose another")
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
def delete_companion(companion_id: str, account: AccountDep) -> Response:
    """Delete a companion together with its conversations; refused while others talk to it."""
    account.editable(companion_id)
    others = account.hf.db.query("SELECT COUNT(DISTINCT user_id) FROM conversations "
                                 "WHERE companion_id = ? AND user_id != ?", (companion_id, account.name))
    if others[0][0]:
        raise HTTPException(409, f"{others[0][0]} other user(s) have conversations with {companion_id!r}; "
                                 "deleting it would delete their history too")
    account.hf.companions.delete(companion_id)
    return Response(status_code=204)


@router.post("/companions/import", status_code=201, openapi_extra=raw_body("the card file (.json or .png)"))
async def import_card(
    request: Request, account: AccountDep,
    filename: Annotated[str, Query(description="Name of the uploaded file, for messages")] = "card",
    replace: Annotated[bool, Query(description="Replace a companion with the same id")] = False,
) -> Companion:
    """Import a Character Card V1/V2/V3: the raw bytes of a .json or .png file as the body."""
    declared = int(request.headers.get("content-length") or 0)
    if declared > MAX_CARD_BYTES:
        raise HTTPException(413, f"{filename}: a card may be at most {MAX_CARD_BYTES} bytes")
    companion = parse_card(await request.body(), filename)
    owner = account.owner_for_new()
    if account.hf.companions.origin(companion.id):
        if not replace or account.hf.companions.get(companion.id, account.name) is None:
            raise HTTPException(409, f"{filename}: the id {companion.id!r} is taken"
                                     + ("" if replace else "; import with replace=true to replace yours"))
        _, owner = account.editable(companion.id)
    account.hf.companions.put(companion, "card", filename, owner=owner)
    return companion


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
    conversation = account.history.create_conversation(companion.id, body.title)
    messages = []
    if companion.first_mes.strip():
        greeting = substitute(companion.first_mes, companion, "User")
        messages.append(account.history.append(conversation.id, "assistant", greeting))
    return ConversationWithMessages(conversation=conversation, messages=messages)


@router.get("/conversations")
def list_conversations(
    account: AccountDep, companion: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50, offset: Annotated[int, Query(ge=0)] = 0,
) -> list[Conversation]:
    """The user's conversations, most recently active first."""
    return account.history.list_conversations(companion, limit, offset)


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
    conversation = account.conversation(conversation_id)
    companion = account.companion(conversation.companion_id)
    history, user = account.history, account.name
    overrides = body.model_dump(include={"temperature", "top_p", "max_tokens"})

    def prepare() -> tuple[Plan, Message]:
        # Off the event loop, like the OpenAI route: reading history, tokenizing, the commit.
        past = [{"role": m.role, "content": m.content} for m in history.messages(conversation.id)
                if m.content]
        plan = chat.plan(Turn(companion, [*past, {"role": "user", "content": body.content}], overrides,
                              user=user))
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
    except (EngineFailed, EngineUnavailable) as err:
        status = 503 if isinstance(err, EngineUnavailable) else 502
        yield event(error_body(status, str(err), code="engine_failed"), "error")
    except UnknownConversation as err:   # deleted while the reply was being written
        yield event(error_body(404, str(err), code="conversation_not_found"), "error")
    finally:
        await events.aclose()

"""Native API for clients that keep no history: companions, conversations, messages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from memory.cards import MAX_CARD_BYTES, parse_card
from memory.companions import Companion, CompanionStore
from memory.history import Conversation, History, Message
from memory.persona import substitute
from serve.chat import Delta, Done, EngineFailed, Plan, Turn, UnknownCompanion
from serve.deps import API_GUARDS, ChatDep, CompanionsDep, HistoryDep, LimiterDep, MemoryDep, UserDep
from serve.engine import EngineUnavailable
from serve.errors import error_body
from serve.sse import SSE_HEADERS, ClosingStreamingResponse, event

router = APIRouter(prefix="/api/v1", tags=["native"], dependencies=API_GUARDS)


def _editable(companions: CompanionStore, companion_id: str) -> None:
    origin = companions.origin(companion_id)
    if origin is None:
        raise HTTPException(404, f"no companion named {companion_id!r}; known companions: "
                                 f"{', '.join(companions.ids()) or 'none'}")
    source, path = origin
    if source == "config":
        raise HTTPException(409, f"companion {companion_id!r} is defined in {path}; edit that file")


@router.get("/companions")
def list_companions(companions: CompanionsDep) -> list[Companion]:
    return companions.list()


@router.get("/companions/{companion_id}")
def get_companion(companion_id: str, companions: CompanionsDep) -> Companion:
    companion = companions.get(companion_id)
    if companion is None:
        raise UnknownCompanion(companion_id, companions.ids())
    return companion


@router.post("/companions", status_code=201)
def create_companion(companion: Companion, companions: CompanionsDep) -> Companion:
    if companions.get(companion.id):
        raise HTTPException(409, f"a companion with id {companion.id!r} exists; PUT to replace it")
    companions.put(companion, "api")
    return companion


@router.put("/companions/{companion_id}")
def replace_companion(companion_id: str, companion: Companion, companions: CompanionsDep) -> Companion:
    if companion.id != companion_id:
        raise HTTPException(
            400, f"id: the body's id {companion.id!r} differs from the path's {companion_id!r}")
    _editable(companions, companion_id)
    companions.put(companion, "api")
    return companion


@router.delete("/companions/{companion_id}", status_code=204)
def delete_companion(companion_id: str, companions: CompanionsDep) -> Response:
    """Delete a companion together with its conversations."""
    _editable(companions, companion_id)
    companions.delete(companion_id)
    return Response(status_code=204)


@router.post("/companions/import", status_code=201)
async def import_card(
    request: Request, companions: CompanionsDep,
    filename: Annotated[str, Query(description="Name of the uploaded file, for messages")] = "card",
    replace: Annotated[bool, Query(description="Replace a companion with the same id")] = False,
) -> Companion:
    """Import a Character Card V1/V2/V3: the raw bytes of a .json or .png file as the body."""
    declared = int(request.headers.get("content-length") or 0)
    if declared > MAX_CARD_BYTES:
        raise HTTPException(413, f"{filename}: a card may be at most {MAX_CARD_BYTES} bytes")
    companion = parse_card(await request.body(), filename)
    if companions.get(companion.id) and not replace:
        raise HTTPException(409, f"{filename}: a companion with id {companion.id!r} exists; "
                                 "import with replace=true to replace it")
    if companions.get(companion.id):
        _editable(companions, companion.id)
    companions.put(companion, "card", filename)
    return companion


class NewConversation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    companion: str
    title: str | None = None


class ConversationWithMessages(BaseModel):
    conversation: Conversation
    messages: list[Message]


class SendMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: str = Field(min_length=1)
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)


class Exchange(BaseModel):
    message: Message
    reply: Message


def _conversation(history: History, conversation_id: str) -> Conversation:
    conversation = history.get_conversation(conversation_id)
    if conversation is None:
        raise HTTPException(404, f"no conversation with id {conversation_id!r}")
    return conversation


@router.post("/conversations", status_code=201)
def create_conversation(
    body: NewConversation, chat: ChatDep, history: HistoryDep
) -> ConversationWithMessages:
    """Start a conversation; the companion's greeting (first_mes) is its first message."""
    companion = chat.companion(body.companion)
    conversation = history.create_conversation(companion.id, body.title)
    messages = []
    if companion.first_mes.strip():
        greeting = substitute(companion.first_mes, companion, "User")
        messages.append(history.append(conversation.id, "assistant", greeting))
    return ConversationWithMessages(conversation=conversation, messages=messages)


@router.get("/conversations")
def list_conversations(
    history: HistoryDep, companion: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50, offset: Annotated[int, Query(ge=0)] = 0,
) -> list[Conversation]:
    return history.list_conversations(companion, limit, offset)


@router.get("/conversations/{conversation_id}")
def get_conversation(conversation_id: str, history: HistoryDep) -> ConversationWithMessages:
    conversation = _conversation(history, conversation_id)
    return ConversationWithMessages(conversation=conversation, messages=history.messages(conversation.id))


@router.delete("/conversations/{conversation_id}", status_code=204)
def delete_conversation(conversation_id: str, memory: MemoryDep) -> Response:
    """Forget a conversation: its messages, its memories and their vectors."""
    if not memory.forget_conversation(conversation_id):
        raise HTTPException(404, f"no conversation with id {conversation_id!r}")
    return Response(status_code=204)


@router.post("/conversations/{conversation_id}/messages", response_model=Exchange)
async def send_message(conversation_id: str, body: SendMessage, chat: ChatDep, history: HistoryDep,
                       limiter: LimiterDep, user: UserDep):
    """Send a message; the reply comes back whole, or streamed as `delta` and `done` events."""
    limiter.check_messages([body.content])
    conversation = _conversation(history, conversation_id)
    companion = chat.companion(conversation.companion_id)
    overrides = body.model_dump(include={"temperature", "top_p", "max_tokens"})

    def prepare() -> tuple[Plan, Message]:
        # Off the event loop, like the OpenAI route: reading history, tokenizing, the commit.
        past = [{"role": m.role, "content": m.content} for m in history.messages(conversation.id)
                if m.content]
        plan = chat.plan(Turn(companion, [*past, {"role": "user", "content": body.content}], overrides))
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
    finally:
        await events.aclose()

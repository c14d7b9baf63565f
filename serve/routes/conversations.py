"""Native API for clients that keep no history: conversations kept by the server, messages,
replies made again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.account import AccountDep
from serve.chat import Delta, Done, Plan, Turn
from serve.deps import API_GUARDS, ChatDep, LimiterDep
from serve.errors import ERROR_RESPONSES, stream_error
from serve.groups import GroupChat
from serve.sse import DELTA, DONE, ERROR, SSE_HEADERS, ClosingStreamingResponse, event, streamed
from serve.tasks import TaskConversation, task_conversations
from store.companions import Companion
from store.groups import MAX_MEMBERS, ReplyOrder
from store.history import Conversation, Message, ReplyMeta, UnknownConversation
from store.persona import substitute
from store.summaries import Summary

router = APIRouter(prefix="/api/v1", tags=["native"], dependencies=API_GUARDS,
                   responses=ERROR_RESPONSES)


class NewConversation(BaseModel):
    """One companion's conversation, or a group chat: several companions (or a saved group)."""
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True,
                              json_schema_extra={"examples": [{"companion": "ember"}]})
    companion: str | None = None
    """The companion to talk with."""
    companions: list[str] | None = Field(None, min_length=2, max_length=MAX_MEMBERS)
    """A group chat's companions, in order (instead of `companion`)."""
    group: str | None = None
    """A saved group (POST /groups) to start a group chat with (instead of `companion`)."""
    reply_order: ReplyOrder | None = None
    """A group chat's reply order: manual, round_robin or natural (default: the saved group's, else
    natural)."""
    title: str | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        named = [k for k in ("companion", "companions", "group") if getattr(self, k) is not None]
        if len(named) != 1:
            raise ValueError("name the companion, or the companions of a group chat, or a saved group: one "
                             f"of companion, companions, group (got {', '.join(named) or 'none'})")
        if self.reply_order is not None and self.companion is not None:
            raise ValueError("reply_order is for a group chat (companions or group), not one companion's")
        return self


class ConversationEdit(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"title": "Tomatoes"}]})
    title: str | None = Field(max_length=200)


class ConversationWithMessages(BaseModel):
    conversation: Conversation
    messages: list[Message]


class Regenerate(BaseModel):
    """How to reply: streamed or whole, and sampling within the companion's limits."""
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True,
                              json_schema_extra={"examples": [{"max_tokens": 16}]})
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    speaker: str | None = Field(None, min_length=1, max_length=200)
    """A group chat: the member (id or name) who answers; default: the reply order's choice (a reply
    made again: the same member)."""


class SendMessage(Regenerate):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, json_schema_extra={"examples": [
        {"content": "I planted tomatoes today.", "max_tokens": 16},
        {"content": "Tell me a joke.", "stream": True, "max_tokens": 16}]})
    content: str | None = Field(None, min_length=1)
    """The user's message; a group chat may leave it out to have `speaker` answer next."""

    @model_validator(mode="after")
    def _something_to_answer(self):
        if self.content is None and self.speaker is None:
            raise ValueError("content: the message is missing (a group chat may name a speaker instead)")
        return self


class ConversationSummary(BaseModel):
    summary: Summary | None
    """What the companion keeps in mind from the turns its prompt no longer shows; null until the
    conversation outgrows the context."""
    folding: bool
    """A fold of more turns into it is waiting or being written."""


class SummaryEdit(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"text": "Sam planted tomatoes in May and named the cat Pixel."}]})
    text: str = Field(min_length=1, max_length=20000)


class Exchange(BaseModel):
    message: Message | None
    """The user's message the reply answers; null when a group chat's member was asked to go on."""
    reply: Message


@router.post("/conversations", status_code=201)
def create_conversation(body: NewConversation, account: AccountDep) -> ConversationWithMessages:
    """Start a conversation with a companion, or a group chat with several; the (first)
    companion's greeting (first_mes) is its first message."""
    if body.companion is not None:
        companion = account.companion(body.companion)
        conversation = account.history.create_conversation(companion.key, body.title)
        speaker = None
    else:
        saved = account.group(body.group) if body.group else None
        members = account.members(saved.companions if saved else body.companions)
        order = body.reply_order or (saved.reply_order if saved else "natural")
        companion = speaker = members[0]
        conversation = account.history.create_conversation(
            companion.key, body.title or (saved.name if saved else None), members=[c.key for c in members],
            reply_order=order, group=saved.id if saved else None)
    messages = []
    if companion.first_mes.strip():
        greeting = substitute(companion.first_mes, companion, account.called)
        messages.append(account.history.append(conversation.id, "assistant", greeting,
                                               ReplyMeta(speaker=speaker.key if speaker else None)))
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
    return task_conversations(account.history, account.hf.tasks, companion.key)


@router.get("/conversations/{conversation_id}")
def get_conversation(conversation_id: str, account: AccountDep) -> ConversationWithMessages:
    conversation = account.conversation(conversation_id)
    return ConversationWithMessages(conversation=conversation,
                                    messages=account.history.messages(conversation.id))


@router.patch("/conversations/{conversation_id}")
def rename_conversation(conversation_id: str, body: ConversationEdit, account: AccountDep) -> Conversation:
    """Give the conversation a title (null: none)."""
    account.conversation(conversation_id)
    title = body.title.strip() if body.title else None
    if not account.history.rename_conversation(conversation_id, title or None):
        raise UnknownConversation(conversation_id)
    return account.conversation(conversation_id)


@router.delete("/conversations/{conversation_id}", status_code=204)
def delete_conversation(conversation_id: str, account: AccountDep) -> Response:
    """Forget a conversation: its messages, its memories and their vectors."""
    account.conversation(conversation_id)
    account.memory.forget_conversation(conversation_id)
    return Response(status_code=204)


@router.get("/conversations/{conversation_id}/summary")
def get_summary(conversation_id: str, account: AccountDep) -> ConversationSummary:
    """The conversation's running summary: what the turns that no longer fit the context said,
    written by the served model; it stands in the prompt where those turns were."""
    summary = account.summary(conversation_id)
    return ConversationSummary(summary=summary, folding=account.hf.folds.folding(conversation_id))


@router.put("/conversations/{conversation_id}/summary", responses={
    409: {"description": "The conversation has no summary yet"}})
def edit_summary(conversation_id: str, body: SummaryEdit, account: AccountDep) -> Summary:
    """Put the running summary in your own words; the next fold goes on from them."""
    summary = account.summary(conversation_id)
    if summary is None:
        raise HTTPException(409, "this conversation has no summary yet: one is written once it no longer "
                                 "fits the context")
    edited = account.summaries.edit(summary.id, body.text.strip() or body.text)
    if edited is None:
        raise UnknownConversation(conversation_id)
    return edited


@router.post("/conversations/{conversation_id}/messages", response_model=Exchange,
             responses=streamed("The exchange; with stream: `delta` events, then `done` (or `error`)"))
async def send_message(conversation_id: str, body: SendMessage, account: AccountDep, chat: ChatDep,
                       limiter: LimiterDep):
    """Send a message; the reply comes back whole, or streamed as `delta` and `done` events."""
    limiter.check_messages([body.content or ""])
    return await _respond(conversation_id, body, account, chat, limiter, lambda past, group: None)


@router.post("/conversations/{conversation_id}/regenerate", response_model=Exchange, responses={
    **streamed("The user's message and the new reply; with stream: `delta` events, then `done`"),
    409: {"description": "The conversation does not end with a reply to the user's message"}})
async def regenerate(conversation_id: str, body: Regenerate, account: AccountDep, chat: ChatDep,
                     limiter: LimiterDep):
    """Answer the user's last message again. The new reply replaces the last one once it is
    complete, and its memory takes the new words, keeping its pin and the user's edits (a memory
    the user deleted stays deleted); a failed or stopped one leaves the conversation as it was.
    A group chat makes its last reply again, by the same member or by `speaker`."""
    old: list[Message] = []
    chats: list[GroupChat] = []

    def prepare(past: list[Message], group: GroupChat | None) -> Message | None:
        if group is not None:
            chats.append(group)
            if not past or past[-1].role != "assistant" or not any(m.role == "user" for m in past):
                raise HTTPException(409, "only a reply after your first message can be made again; this "
                                         "group chat does not end with one")
            old.append(past.pop())
            return next(m for m in reversed(past) if m.role == "user")
        if len(past) < 2 or past[-1].role != "assistant" or past[-2].role != "user":
            raise HTTPException(409, "only a reply that answers your last message can be made again; "
                                     "this conversation does not end with one")
        old.append(past.pop())
        return past[-1]

    def replace(companion: Companion, reply: Message) -> None:
        before = chats[0].speaker_of(old[0]) if chats else None
        renamed = (before.name, companion.name) if before and before.key != companion.key else None
        if not account.memory.replace_reply(old[0].id, reply.id, reply.content, renamed):
            chat.remember(companion, conversation_id)   # the old reply had no memory yet

    return await _respond(conversation_id, body, account, chat, limiter, prepare, replace, keep_cut=False,
                          again=old)


async def _respond(conversation_id: str, body: SendMessage | Regenerate, account, chat, limiter,
                   prepare, after=None, keep_cut: bool = True, again: list[Message] = ()):
    """Reply to the conversation. prepare(past, group chat) may change the history the reply
    sees, and returns the user's message it answers, or None for body.content, which is stored
    once the reply is planned. after(speaker, reply) runs once the reply is stored. `again`: the
    reply being made again (a group chat's member who said it says it again)."""
    def find() -> tuple[Conversation, GroupChat | None, Companion | None]:
        conversation = account.conversation(conversation_id)
        group = account.group_chat(conversation)
        if group is None and body.speaker is not None:
            raise HTTPException(400, "speaker: this conversation has one companion; only a group chat's "
                                     "reply names who speaks")
        return conversation, group, None if group else account.companion(conversation.companion_id)

    conversation, group, companion = await asyncio.to_thread(find)
    history, user = account.history, account.name
    overrides = body.model_dump(include={"temperature", "top_p", "max_tokens"})
    said = getattr(body, "content", None)

    def plan_turn() -> tuple[Plan, Message | None]:
        # Off the event loop, like the OpenAI route: reading history, tokenizing, the commit.
        past = history.messages(conversation.id)
        message = prepare(past, group)
        if group is None:
            turns = [{"role": m.role, "content": m.content} for m in past if m.content]
            if message is None:
                turns.append({"role": "user", "content": said})
            turn = Turn(companion, turns, overrides, user=user, called=account.called)
        else:
            new = said if message is None else None
            speaker = (group.member(body.speaker) if body.speaker
                       else next((group.speaker_of(m) for m in again), None)
                       or group.next_speaker(past, new))
            turn = group.turn(speaker, past, new, overrides, user=user, called=account.called)
        plan = chat.plan(turn)
        if message is None and said is not None:
            message = history.append(conversation.id, "user", said)
        return plan, message

    plan, message = await limiter.reserve(user, plan_turn)
    events = chat.reply(plan, conversation.id, keep_cut)
    if after is not None:
        async def then(reply: Message) -> None:
            await asyncio.to_thread(after, plan.turn.companion, reply)
            chat.index_soon()

        events = _then(events, then)
    if body.stream:
        return ClosingStreamingResponse(limiter.counted(user, _sse(events, message)),
                                        media_type="text/event-stream", headers=SSE_HEADERS)
    replies = [item.message async for item in limiter.counted(user, events) if isinstance(item, Done)]
    return Exchange(message=message, reply=replies[0])


async def _then(events: AsyncIterator, work) -> AsyncIterator:
    """The events, with `await work(reply)` run after the reply is stored and before Done is passed on."""
    try:
        async for item in events:
            if isinstance(item, Done):
                await work(item.message)
            yield item
    finally:
        await events.aclose()


async def _sse(events: AsyncIterator, message: Message | None) -> AsyncIterator[str]:
    try:
        async for item in events:
            if isinstance(item, Delta):
                yield event({"content": item.text}, DELTA)
            elif isinstance(item, Done):
                yield event(Exchange(message=message, reply=item.message).model_dump_json(), DONE)
    except Exception as err:
        yield event(stream_error(err), ERROR)
    finally:
        await events.aclose()

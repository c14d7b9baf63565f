"""Long-term memory the user can see and control: list, search, recall, add, edit, pin, delete."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from memory.embedder import EmbedderError
from memory.store import Recalled
from serve.account import AccountDep
from serve.deps import API_GUARDS, ChatDep
from serve.errors import ERROR_RESPONSES
from store.memories import Kind, Memory

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", tags=["memory"], dependencies=API_GUARDS,
                   responses=ERROR_RESPONSES)


# SQLite integers are 64-bit: a larger id is simply not found, not an overflow.
MemoryId = Annotated[int, Path(ge=1, le=2**63 - 1)]


class NewFact(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=4000)
    pinned: bool = False


class MemoryEdit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, min_length=1, max_length=4000)
    pinned: bool | None = None


@router.get("/companions/{companion_id}/memories")
def list_memories(
    companion_id: str, account: AccountDep, kind: Kind | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50, offset: Annotated[int, Query(ge=0)] = 0,
) -> list[Memory]:
    """The user's memories with the companion: pinned first, then newest first."""
    return account.memory.list(account.companion_card(companion_id).key, limit, offset, kind)


@router.get("/companions/{companion_id}/memories/search")
async def search_memories(
    companion_id: str, account: AccountDep,
    q: Annotated[str, Query(min_length=1, description="what to look for")],
    k: Annotated[int, Query(ge=1, le=100)] = 10,
) -> list[Recalled]:
    """The k of the user's memories closest in meaning to q, with their similarity."""
    def search() -> list[Recalled]:
        return account.memory.search(account.companion_card(companion_id).key, q, k)

    return await asyncio.to_thread(search)


@router.get("/companions/{companion_id}/memories/recall")
async def recall_memories(
    companion_id: str, account: AccountDep, chat: ChatDep,
    q: Annotated[str, Query(min_length=1, description="a message to the companion")],
) -> list[Recalled]:
    """Exactly the memories a reply to q would place in its prompt (as the first message of a
    conversation), best first: the function the reply uses. Nothing is stored."""
    def recall() -> list[Recalled]:
        companion = account.companion_card(companion_id)
        return chat.recall(companion, account.name, [{"role": "user", "content": q}])

    return await asyncio.to_thread(recall)


def index_now(memory) -> None:
    """Searchable as soon as the request returns, whoever else imports. With memory.embedder's
    server down, the row is kept (`indexed: false`) and indexed once it answers: an error here
    would have the client send the fact again."""
    try:
        memory.index_pending(mine=True)
    except EmbedderError as err:
        log.warning("memory: kept, indexed later: %s", err)


@router.post("/companions/{companion_id}/memories", status_code=201)
async def add_memory(companion_id: str, body: NewFact, account: AccountDep) -> Memory:
    """Add a fact ("I'm allergic to walnuts"); facts rank first whenever they are relevant."""
    def add() -> Memory:
        memory = account.memory
        fact = memory.add_fact(account.companion_card(companion_id).key, body.text, body.pinned)
        index_now(memory)
        return account.memory_item(fact.id)

    return await asyncio.to_thread(add)


@router.get("/memories/{memory_id}")
def get_memory(memory_id: MemoryId, account: AccountDep) -> Memory:
    return account.memory_item(memory_id)


@router.patch("/memories/{memory_id}")
async def edit_memory(memory_id: MemoryId, body: MemoryEdit, account: AccountDep) -> Memory:
    """Correct its text or pin it; an edited text is embedded again."""
    def change() -> Memory:
        account.memory_item(memory_id)
        memory = account.memory
        memory.edit(memory_id, body.text, body.pinned)
        index_now(memory)
        return account.memory_item(memory_id)   # 404 if it was deleted meanwhile

    return await asyncio.to_thread(change)


@router.delete("/memories/{memory_id}", status_code=204)
def delete_memory(memory_id: MemoryId, account: AccountDep) -> Response:
    """Delete its row and its vectors: it is never recalled again, also after a rebuild."""
    account.memory_item(memory_id)
    account.memory.delete(memory_id)
    return Response(status_code=204)


class Rebuilt(BaseModel):
    memories: int


@router.post("/memories/rebuild")
async def rebuild(account: AccountDep) -> Rebuilt:
    """Recreate the user's vector index from SQLite."""
    return Rebuilt(memories=await asyncio.to_thread(account.memory.rebuild))

"""Long-term memory the user can see and control: list, search, add, edit, pin, delete."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from memory.store import Kind, Memory, MemoryStore, Recalled
from serve.chat import UnknownCompanion
from serve.deps import API_GUARDS, CompanionsDep, MemoryDep

router = APIRouter(prefix="/api/v1", tags=["memory"], dependencies=API_GUARDS)


class NewFact(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=4000)
    pinned: bool = False


class MemoryEdit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, min_length=1, max_length=4000)
    pinned: bool | None = None


def _companion(companions: CompanionsDep, companion_id: str) -> str:
    if companions.get(companion_id) is None:
        raise UnknownCompanion(companion_id, companions.ids())
    return companion_id


def _memory(memory: MemoryStore, memory_id: int) -> Memory:
    found = memory.get(memory_id)
    if found is None:
        raise HTTPException(404, f"no memory with id {memory_id}")
    return found


@router.get("/companions/{companion_id}/memories")
def list_memories(
    companion_id: str, memory: MemoryDep, companions: CompanionsDep, kind: Kind | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50, offset: Annotated[int, Query(ge=0)] = 0,
) -> list[Memory]:
    """Pinned first, then newest first."""
    return memory.list(_companion(companions, companion_id), limit, offset, kind)


@router.get("/companions/{companion_id}/memories/search")
async def search_memories(
    companion_id: str, memory: MemoryDep, companions: CompanionsDep,
    q: Annotated[str, Query(min_length=1, description="what to look for")],
    k: Annotated[int, Query(ge=1, le=100)] = 10,
) -> list[Recalled]:
    """The k memories closest in meaning to q, with their similarity."""
    return await asyncio.to_thread(memory.search, _companion(companions, companion_id), q, k)


@router.post("/companions/{companion_id}/memories", status_code=201)
async def add_memory(companion_id: str, body: NewFact, memory: MemoryDep,
                     companions: CompanionsDep) -> Memory:
    """Add a fact ("I'm allergic to walnuts"); facts rank first whenever they are relevant."""
    fact = memory.add_fact(_companion(companions, companion_id), body.text, body.pinned)
    await asyncio.to_thread(memory.index_pending)  # searchable as soon as this returns
    return memory.get(fact.id)


@router.get("/memories/{memory_id}")
def get_memory(memory_id: int, memory: MemoryDep) -> Memory:
    return _memory(memory, memory_id)


@router.patch("/memories/{memory_id}")
async def edit_memory(memory_id: int, body: MemoryEdit, memory: MemoryDep) -> Memory:
    """Correct its text or pin it; an edited text is embedded again."""
    _memory(memory, memory_id)
    memory.edit(memory_id, body.text, body.pinned)
    await asyncio.to_thread(memory.index_pending)
    return memory.get(memory_id)


@router.delete("/memories/{memory_id}", status_code=204)
def delete_memory(memory_id: int, memory: MemoryDep) -> Response:
    """Delete its row and its vectors: it is never recalled again, also after a rebuild."""
    if not memory.delete(memory_id):
        raise HTTPException(404, f"no memory with id {memory_id}")
    return Response(status_code=204)


class Rebuilt(BaseModel):
    memories: int


@router.post("/memories/rebuild")
async def rebuild(memory: MemoryDep) -> Rebuilt:
    """Recreate the whole vector index from SQLite."""
    return Rebuilt(memories=await asyncio.to_thread(memory.rebuild))

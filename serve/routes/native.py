"""Native API: companions (cards, their pictures, Character Card import, a test of their lorebook)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from serve.account import AccountDep
from serve.deps import API_GUARDS, ChatDep
from serve.errors import ERROR_RESPONSES, raw_body
from serve.limits import bounded_stream
from serve.lore import fire
from store.cards import MAX_CARD_BYTES, keep_card, parse_card
from store.companions import Companion, key_for
from store.lorebook import Lorebook, unsupported
from store.persona import substitute
from store.pictures import picture_path

router = APIRouter(prefix="/api/v1", tags=["native"], dependencies=API_GUARDS,
                   responses=ERROR_RESPONSES)


class ListedCompanion(Companion):
    has_picture: bool = False
    """Whether GET /companions/{id}/picture has one: a page asks for none it would not get."""


@router.get("/companions")
def list_companions(account: AccountDep) -> list[ListedCompanion]:
    """The shared companions and the user's own, each with whether it has a picture (not part
    of the card: leave it out when the companion is sent back)."""
    return [ListedCompanion.model_validate(c.model_dump() | {
        "has_picture": picture_path(account.hf.data_dir, c.key).is_file()}) for c in account.companions()]


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
        keep_card(account.hf.companions, account.hf.data_dir, companion, data, filename, owner)
        return companion

    return await asyncio.to_thread(store)


@router.get("/companions/{companion_id}/picture", response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}, "description": "the card's picture"}})
def companion_picture(companion_id: str, account: AccountDep) -> FileResponse:
    """The picture of the companion's PNG card (404 when its card had none)."""
    path = picture_path(account.hf.data_dir, account.companion_card(companion_id).key)
    if not path.is_file():
        raise HTTPException(404, f"companion {companion_id!r} has no picture (a PNG card gives it one)")
    return FileResponse(path, media_type="image/png")


class LoreProbe(BaseModel):
    """A message to test a lorebook with."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    text: str = Field(min_length=1, max_length=20000)
    """The message, as the user would send it."""
    book: Lorebook | None = None
    """A book to test instead of the companion's (an edit not yet saved)."""


class FiredEntry(BaseModel):
    entry: str
    """The entry's id, or #N: its place in the book."""
    name: str
    why: str
    """What set it off: a key, constant, a decorator."""
    where: str
    """Where the prompt carries it."""
    text: str
    """What the prompt gains."""


class LoreProbeResult(BaseModel):
    fired: list[FiredEntry]
    unsupported: list[str]
    """Decorators the book's entries carry that Homefire keeps but does not act on."""


@router.post("/companions/{companion_id}/lorebook/test")
def test_lorebook(companion_id: str, probe: LoreProbe, account: AccountDep, chat: ChatDep) -> LoreProbeResult:
    """Which lorebook entries a message sets off, in the order the prompt would carry them (the
    message is all the conversation: an entry that needs earlier messages does not fire)."""
    companion = account.companion_card(companion_id)
    book = probe.book or companion.character_book
    prompts = chat.prompts
    # Without the tokenizer (a command's own application): a byte-based estimate of the budget.
    count = ((lambda text: len(prompts.encode(text))) if prompts
             else (lambda text: len(text.encode()) // 3 + 1))
    fired = fire(book, [{"role": "user", "content": probe.text}], count,
                 lambda text: substitute(text, companion, account.called))
    return LoreProbeResult(fired=[FiredEntry(**f.used(), text=f.text) for f in fired],
                           unsupported=unsupported(book))

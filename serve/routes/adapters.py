"""A companion's fine-tuned voices: list the adapter versions, switch or roll back at once."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from finetune.config import FinetuneError
from serve.account import AccountDep
from serve.deps import API_GUARDS
from serve.errors import ERROR_RESPONSES

router = APIRouter(prefix="/api/v1", tags=["adapters"], dependencies=API_GUARDS,
                   responses=ERROR_RESPONSES)


class AdapterChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = Field(description="an adapter version (e.g. v3), or null for the base model")


@router.get("/companions/{companion_id}/adapters")
def list_adapters(companion_id: str, account: AccountDep) -> dict:
    """Versions (oldest first) with their manifests' metrics, and the one in use."""
    key = account.companion_card(companion_id).key
    try:
        return account.hf.adapters.listing(key)
    except FinetuneError as err:
        raise HTTPException(422, str(err)) from err


@router.put("/companions/{companion_id}/adapter")
async def use_adapter(companion_id: str, choice: AdapterChoice, account: AccountDep) -> dict:
    """Speak through this adapter version from the next reply on (loaded into the engine now).

    Only the companion's owner may switch (an admin, for a shared one). Refused (422) when the
    version is unknown, not safetensors, or made for another base model.
    """
    companion = await asyncio.to_thread(account.tunable, companion_id)
    hf = account.hf
    try:
        await hf.adapters.use(companion.key, choice.version)
    except FinetuneError as err:
        raise HTTPException(422, str(err)) from err
    return hf.adapters.listing(companion.key)

"""A companion's fine-tuned voices: list the adapter versions, switch or roll back at once."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from serve.account import AccountDep
from serve.deps import API_GUARDS
from serve.errors import ERROR_RESPONSES
from store import adapters
from store.adapters import AdapterError
from store.users import LOCAL

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
    except AdapterError as err:
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
    except AdapterError as err:
        raise HTTPException(422, str(err)) from err
    return hf.adapters.listing(companion.key)


def _report_file(account, companion_id: str, version: str, name: str):
    key = account.companion_card(companion_id).key
    try:
        adapters.manifest(account.hf.data_dir, key, version)   # names the known versions if missing
    except AdapterError as err:
        raise HTTPException(404, str(err)) from err
    path = adapters.version_dir(account.hf.data_dir, key, version) / name
    if not path.is_file():
        raise HTTPException(404, f"adapter {version} of {companion_id!r} has no voice report yet: "
                                 f"POST /api/v1/companions/{companion_id}/adapters/{version}/evaluations")
    return path


@router.get("/companions/{companion_id}/adapters/{version}/report")
def voice_report(companion_id: str, version: str, account: AccountDep) -> dict:
    """The version's voice-match report (`homefire eval`): perplexities, style, and the samples
    (real held-out replies beside the models' continuations), and how well a reader tells them
    apart (`discriminator`). The samples, and the phrases the real replies use, come from one
    member's conversations and are theirs alone: anyone else who may see the companion gets the
    figures, with `samples` and `discriminator.signatures` empty and `samples_withheld` true."""
    report = json.loads(_report_file(account, companion_id, version, "eval.json").read_text())
    # Reports written before they named their user are the trainer's (the version's manifest).
    owner = report.get("user") or adapters.manifest(
        account.hf.data_dir, account.companion_card(companion_id).key, version).get("user", LOCAL)
    if owner != account.name:   # the phrases the real replies use are their words too
        report |= {"samples": [], "samples_withheld": True}
        if report.get("discriminator"):
            report["discriminator"] = report["discriminator"] | {"signatures": []}
    report.pop("user", None)
    return report


@router.get("/companions/{companion_id}/adapters/{version}/voice.png", response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}, "description": "the report's plot"}})
def voice_plot(companion_id: str, version: str, account: AccountDep) -> FileResponse:
    """The voice report's plot: perplexity and style, base against tuned."""
    return FileResponse(_report_file(account, companion_id, version, "voice.png"), media_type="image/png")

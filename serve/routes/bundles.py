"""A companion in one file: its bundle (card, history, memories, adapters) and its card alone."""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from serve import bundle
from serve.account import AccountDep
from serve.deps import API_GUARDS
from serve.errors import ERROR_RESPONSES, ErrorResponse, raw_body
from serve.routes.imports import _receive
from store.adapters import AdapterError
from store.cards import card_json, card_png
from store.pictures import picture_path
from store.run import uploads

router = APIRouter(prefix="/api/v1", tags=["bundles"], dependencies=API_GUARDS, responses=ERROR_RESPONSES)


def setup_of(hf) -> bundle.Setup:
    return bundle.Setup(hf.chat.model_id, hf.adapters.base,
                        hf.settings.memory.embedder or bundle.DEFAULT_EMBEDDER)


@router.get("/companions/{companion_id}/bundle", response_class=FileResponse, responses={
    200: {"content": {"application/zip": {}}, "description": "the bundle (a zip file)"}})
async def export_bundle(companion_id: str, account: AccountDep) -> FileResponse:
    """The companion as one file: its card and picture, your history and memories with it, the
    adapter versions trained on your history and which is in use (`homefire bundle export`)."""
    hf = account.hf
    companion = await asyncio.to_thread(account.companion_card, companion_id)
    out = uploads(hf.data_dir) / f"export-{uuid.uuid4().hex}{bundle.SUFFIX}"
    await asyncio.to_thread(bundle.export_bundle, hf.db, hf.data_dir, companion, account.name, out,
                            setup_of(hf), bundle.homefire_version())
    return FileResponse(out, media_type="application/zip", filename=f"{companion.id}{bundle.SUFFIX}",
                        background=BackgroundTask(out.unlink, missing_ok=True))


@router.post("/bundles", status_code=201, openapi_extra=raw_body("the bundle file (.homefire)"), responses={
    409: {"model": ErrorResponse, "description": "Another companion has the bundle's id"},
    422: {"model": ErrorResponse, "description": "Not a bundle, damaged, changed, or hostile; nothing "
          "was written"}})
async def import_bundle(
    request: Request, account: AccountDep,
    as_id: Annotated[str | None, Query(description="import under this id instead of the bundle's")] = None,
    filename: Annotated[str, Query(max_length=255, description="the file's name, for messages")] = "bundle",
) -> dict:
    """Bring a companion bundle in: every checksum and record is checked before anything is
    written, then the history comes in whole or not at all, then the memories (stopped half-way,
    the same import again brings the rest). It becomes your history, memories and adapters with
    the companion (an admin's companion is shared, anyone else's their own). Adapters made for
    another base model are left out, with the reason; importing the same bundle again adds
    nothing."""
    hf = account.hf
    memory = hf.chat.memory
    if memory is None:
        raise HTTPException(503, "the memory index is still opening; try again in a moment")
    limit = hf.settings.imports.max_upload_mb << 20
    lock = hf.import_locks[account.name]
    if lock.locked():
        raise HTTPException(409, "another import of yours is running; try again when it is done")
    async with lock:
        spool = uploads(hf.data_dir) / uuid.uuid4().hex
        try:
            await _receive(request, spool, limit)
            owner = account.owner_for_new()

            def work() -> bundle.ImportReport:
                # Read and checked by a child process into a file of its own (remove_leftovers
                # takes it after a crash), then written in batches: neither holds the others up.
                staged = spool.parent.parent / f"import-bundle-{uuid.uuid4().hex}.db"
                with bundle.read_apart(spool, filename, staged) as read:
                    return bundle.import_bundle(hf.db, hf.data_dir, read, account.name, owner, setup_of(hf),
                                                as_id, reserved=(hf.tasks.model,))

            try:
                report = await asyncio.get_running_loop().run_in_executor(hf.background, work)
            except bundle.BundleError as err:
                raise HTTPException(409 if isinstance(err, bundle.BundleConflict) else 422, str(err)) from err
        finally:
            spool.unlink(missing_ok=True)
    key = (await asyncio.to_thread(hf.companions.get, report.companion, account.name)).key
    if report.adapter_in_use:
        try:
            await hf.adapters.use(key, report.adapter_in_use)
        except AdapterError as err:   # written and checked above; said rather than lost
            report.message += f"; the adapter could not be switched on: {err}"
    await asyncio.get_running_loop().run_in_executor(hf.background, memory.index_pending)
    return report.as_dict()


@router.get("/companions/{companion_id}/card", responses={200: {"content": {
    "image/png": {}, "application/json": {}}, "description": "the Character Card"}})
def export_card(companion_id: str, account: AccountDep,
                format: Annotated[Literal["png", "json"], Query(description="png: the picture with "
                                  "'chara' (V2) and 'ccv3' (V3) chunks; json: Character Card V3")] = "png",
                ) -> Response:
    """The companion's Character Card, for SillyTavern and other front ends (`homefire companion
    export-card`)."""
    companion = account.companion_card(companion_id)
    if format == "json":
        return Response(card_json(companion), media_type="application/json",
                        headers={"Content-Disposition": f'attachment; filename="{companion.id}.json"'})
    path = picture_path(account.hf.data_dir, companion.key)
    picture = path.read_bytes() if path.is_file() else None
    return Response(card_png(companion, picture), media_type="image/png",
                    headers={"Content-Disposition": f'attachment; filename="{companion.id}.png"'})

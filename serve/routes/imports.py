"""Upload a chat export and import it into a companion, with a progress report."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from memory.import_child import run_apart
from memory.importer import Importer
from memory.imports import FORMATS, ImportFailed
from serve.account import AccountDep
from serve.deps import API_GUARDS
from serve.errors import ERROR_RESPONSES, ErrorResponse, error_body, raw_body, stream_error
from serve.limits import bounded_stream
from serve.sse import DONE, ERROR, PROGRESS, SSE_HEADERS, ClosingStreamingResponse, event, streamed
from store.run import run_dir, uploads

router = APIRouter(prefix="/api/v1", tags=["imports"], dependencies=API_GUARDS,
                   responses=ERROR_RESPONSES)
Format = Literal[FORMATS]  # type: ignore[valid-type]


@router.post("/companions/{companion_id}/imports", responses={
    **streamed("What was imported (or, with dry_run, would be): counts, date range, suggested "
               "persona. With `Accept: text/event-stream`, `progress` events ({stage: read|index, "
               "done, total}) and then `done` or `error`."),
    409: {"model": ErrorResponse, "description": "Another import of this user's is running"},
    413: {"model": ErrorResponse, "description": "Upload too large"},
    422: {"model": ErrorResponse, "description": "Not an export we can read; the message names "
          "the file and position"}},
    openapi_extra=raw_body("the export: a zip, JSON or JSONL file"))
async def import_export(
    companion_id: str, request: Request, account: AccountDep,
    format: Annotated[Format | None, Query(description="force a format instead of detecting it")] = None,
    dry_run: Annotated[bool, Query(description="count what would be imported; write nothing")] = False,
    filename: Annotated[str, Query(max_length=255, description="the file's name, for messages")] = "upload",
):
    """Import the export sent as the raw request body (zip, JSON or JSONL) into the companion.

    It becomes the user's history and memories with the companion. All or nothing; what was
    imported before is not added twice. Memories are indexed before the reply ends.
    """
    hf = account.hf
    companion = await asyncio.to_thread(account.companion_card, companion_id)
    memory = hf.chat.memory
    if memory is None and not dry_run:
        raise HTTPException(503, "the memory index is still opening; try again in a moment")
    limit = hf.settings.imports.max_upload_mb << 20
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the upload is {int(declared) >> 20} MB; this server accepts "
                                 f"at most {limit >> 20} MB (imports.max_upload_mb)")
    lock = hf.import_locks[account.name]
    if lock.locked():
        raise HTTPException(409, "another import of yours is running; try again when it is done")
    await lock.acquire()   # held until the import's work is over, see below
    spool = uploads(hf.data_dir) / uuid.uuid4().hex
    try:
        await _receive(request, spool, limit)
    except BaseException:
        spool.unlink(missing_ok=True)
        lock.release()
        raise
    label = f"{filename} (uploaded)"
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def report(stage: str):
        return lambda done, total: loop.call_soon_threadsafe(
            queue.put_nowait, {"stage": stage, "done": done, "total": total})

    def work() -> dict:
        try:
            result = run_apart(Importer(hf.db, run_dir(hf.data_dir), account.name), spool, format, label,
                               companion.key, companion.name, report("read"), dry_run)
        finally:
            spool.unlink(missing_ok=True)
        if not dry_run:
            memory.index_pending(report("index"))
        return result.as_dict()

    task = asyncio.ensure_future(loop.run_in_executor(hf.background, work))
    task.add_done_callback(lambda _: lock.release())
    if "text/event-stream" not in request.headers.get("accept", ""):
        try:
            return await asyncio.shield(task)   # a client gone away does not undo an import
        except ImportFailed as err:
            return JSONResponse(error_body(422, str(err), code="import_failed"), status_code=422)
    return ClosingStreamingResponse(_events(task, queue), media_type="text/event-stream",
                                    headers=SSE_HEADERS)


async def _receive(request: Request, spool, limit: int) -> None:
    size = 0
    with spool.open("wb") as out:
        spool.chmod(0o600)
        async for chunk in bounded_stream(request, limit, f"the upload is over {limit >> 20} MB, the "
                                          "most this server accepts (imports.max_upload_mb)"):
            size += len(chunk)
            out.write(chunk)
    if size == 0:
        raise HTTPException(422, "the request body is empty: send the export file as the body")


async def _events(task: asyncio.Task, queue: asyncio.Queue) -> AsyncIterator[str]:
    while not task.done() or not queue.empty():
        getter = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED, timeout=15)
        if getter in done:
            yield event(getter.result(), PROGRESS)
        else:
            getter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await getter
            if not done:
                yield ": still working\n\n"   # keeps proxies from closing an idle stream
    try:
        yield event({"result": task.result()}, DONE)
    except ImportFailed as err:
        yield event(error_body(422, str(err), code="import_failed"), ERROR)
    except Exception as err:   # the stream has begun: an error event, not a status code
        yield event(stream_error(err), ERROR)

"""Teaching a companion its voice from the server: training, evaluation, drift and migration
jobs that queue, run one at a time (serve/finetunes.py), report their progress, and can be
cancelled or resumed."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from finetune.config import FinetuneConfig, FinetuneError, load_config
from serve.account import Account, AccountDep
from serve.deps import API_GUARDS
from serve.errors import ERROR_RESPONSES, error_response, field_path
from serve.finetunes import Job, JobError
from serve.sse import DONE, PROGRESS, SSE_HEADERS, ClosingStreamingResponse, event, streamed
from store.adapters import AdapterError, checked_version, manifest, model_sha256

router = APIRouter(prefix="/api/v1", tags=["finetunes"], dependencies=API_GUARDS,
                   responses=ERROR_RESPONSES)
JobId = Annotated[str, Path(max_length=64, description="a job's id, e.g. ft-0123456789ab")]
SWITCH = ("auto", "always", "never")
SETTINGS = ("Any fields of configs/finetune.yaml to change for this job (e.g. max_steps, rank, "
            "learning_rate), and `switch`: auto (speak through the new version when its held-out loss "
            "beats the version in use), always or never; default: the server's finetune.switch.")


class SettingsProblem(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def job_settings(account: Account, body: dict[str, Any] | None) -> tuple[FinetuneConfig, str]:
    """The server's fine-tuning settings with the job's on top, and its switch policy; a bad
    field is a SettingsProblem that names it."""
    settings = dict(body or {})
    switch = settings.pop("switch", None) or account.hf.settings.finetune.switch
    if switch not in SWITCH:
        raise SettingsProblem("switch", f"switch: must be one of {', '.join(SWITCH)} (got {switch!r})")
    try:
        base = load_config(account.hf.settings.finetune.config)
    except FinetuneError as err:   # the server's own file; the start checked it, so it was edited since
        raise SettingsProblem("finetune.config", str(err)) from err
    try:
        return FinetuneConfig.model_validate(base.model_dump() | settings), switch
    except ValidationError as err:
        first = err.errors()[0]
        field = field_path(tuple(first["loc"]))
        more = f" (and {len(err.errors()) - 1} more problems)" if len(err.errors()) > 1 else ""
        raise SettingsProblem(field, f"{field}: {first['msg']}{more}") from err


def refused(err: JobError) -> HTTPException:
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after else None
    return HTTPException(err.status, str(err), headers=headers)


async def queued(work) -> JSONResponse:
    try:
        job = await asyncio.to_thread(work)
    except SettingsProblem as err:
        return error_response(422, str(err), err.field, "invalid_setting")
    except JobError as err:
        raise refused(err) from err
    return JSONResponse(job.model_dump(), status_code=202)


@router.post("/companions/{companion_id}/finetunes", status_code=202, response_model=Job, responses={
    403: {"description": "A shared companion, and the caller is not an admin"},
    409: {"description": "The caller's job for this companion is not finished"},
    422: {"description": "A setting is wrong (the message names it), or over finetune.limits.max_steps, "
          "or there is no history to learn from"},
    429: {"description": "A member over finetune.limits (unfinished jobs, minutes a day); Retry-After"}})
async def start_finetune(companion_id: str, account: AccountDep,
                         body: Annotated[dict[str, Any] | None, Body(description=SETTINGS, openapi_examples={
                             "a few steps": {"value": {"max_steps": 40, "switch": "auto"}}})] = None,
                         ) -> JSONResponse:
    """Queue a training of the companion's voice on the caller's own history with it.

    Only its owner may (an admin, for a shared companion). Jobs run one at a time, in the order
    they were asked for; each trains a new adapter version, writes its voice report, and then
    speaks through it if it is better (`switch`). Follow it with GET /api/v1/finetunes/{job}.
    A member's job keeps within finetune.limits, and stops the engine for everyone only within
    its engine hours (else it runs beside the engine, or waits and says why in `waiting`).
    """
    def work() -> Job:
        companion = account.tunable(companion_id)
        config, switch = job_settings(account, body)
        return account.hf.finetunes.submit(companion, account.name, "train", config, switch,
                                           admin=account.user.admin)

    return await queued(work)


@router.post("/companions/{companion_id}/adapters/{version}/evaluations", status_code=202,
             response_model=Job, responses={422: {"description": "Not a version of this companion"}})
async def start_evaluation(companion_id: str, version: Annotated[str, Path(max_length=16)],
                           account: AccountDep) -> JSONResponse:
    """Queue the voice report of one adapter version (as `homefire eval`), on the caller's
    held-out conversations. It runs in the training queue: it needs the same GPU."""
    def work() -> Job:
        companion = account.tunable(companion_id)
        try:
            info = manifest(account.hf.data_dir, companion.key, checked_version(version, "version"))
            config = FinetuneConfig.model_validate(info["config"])
        except AdapterError as err:
            raise SettingsProblem("version", str(err)) from err
        return account.hf.finetunes.submit(companion, account.name, "eval", config, "never", version,
                                           admin=account.user.admin)

    return await queued(work)


class DriftRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"against": "base"}]})
    against: str | None = Field(None, max_length=16, description="another adapter version of the "
                                "companion (v1, v2, ...), or base: the base model alone")
    model: str | None = Field(None, max_length=4096, description="or another base model: a local directory "
                              "on the server (admins), with the companion's newest version trained on it")
    probes: int = Field(8, ge=1, le=32, description="how many held-out real replies to probe with")
    max_new_tokens: int = Field(48, ge=1, le=256, description="the longest generated reply")


class MigrationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=4096, description="the new base model: a local directory on the server")
    samples: int = Field(8, ge=1, le=32, description="held-out real replies to compare the two setups on")
    max_new_tokens: int = Field(48, ge=1, le=256, description="the longest generated reply")
    settings: dict[str, Any] = Field(default_factory=dict, description="fields of configs/finetune.yaml "
                                     "to change for this training (e.g. max_steps)")


def model_dir(account: Account, path: str) -> str:
    """Another base model's directory, named by an admin (a path on the server's disk), checked."""
    if not account.user.admin:
        raise JobError(403, "model: only an admin may name a directory on the server")
    folder = pathlib.Path(path)
    try:
        if not folder.is_dir():
            raise SettingsProblem("model", f"model {path[:200]}: not a directory on the server; give a local "
                                           "model directory (safetensors weights, config and tokenizer)")
        model_sha256(folder)   # refuses a folder without safetensors weights, with its name
        return str(folder.resolve())
    except AdapterError as err:
        raise SettingsProblem("model", f"model: {err}") from err
    except OSError as err:   # a name too long, a folder it may not read
        raise SettingsProblem("model", f"model {path[:200]}: {err.strerror}") from err


@router.post("/companions/{companion_id}/drifts", status_code=202, response_model=Job, responses={
    403: {"description": "A shared companion and the caller is not an admin, or a member named a model"},
    422: {"description": "Neither or both of against and model, not a version of this companion, not a "
          "model directory"}})
async def start_drift(companion_id: str, request: DriftRequest, account: AccountDep) -> JSONResponse:
    """Queue a drift check (as `homefire drift`): fixed probes, the prompts before the companion's
    real replies in the caller's held-out conversations, through the current setup (the server's
    base model and the version in use) and another, greedy, with the voice figures of each.
    The finished job's `comparison` holds both side by side; the same setup gives the same
    replies and figures. It runs in the training queue: it needs the same GPU."""
    def work() -> Job:
        companion = account.tunable(companion_id)
        if (request.against is None) == (request.model is None):
            raise SettingsProblem("against", "say what to compare the current setup with: against (an "
                                             "adapter version, or base), or model (a directory)")
        target = request.model_dump()
        if request.model is not None:
            target["model"] = model_dir(account, request.model)
        elif request.against != "base":
            try:
                target["against"] = checked_version(request.against, "against")
                manifest(account.hf.data_dir, companion.key, target["against"])
            except AdapterError as err:
                raise SettingsProblem("against", str(err)) from err
        config, _ = job_settings(account, None)   # its eval_share picks the probes
        return account.hf.finetunes.submit(companion, account.name, "drift", config, "never",
                                           admin=account.user.admin, target=target)

    return await queued(work)


@router.post("/companions/{companion_id}/migrations", status_code=202, response_model=Job, responses={
    403: {"description": "The caller is not an admin"},
    422: {"description": "Not a model directory, the model the server runs already, or a setting is wrong"}})
async def start_migration(companion_id: str, request: MigrationRequest, account: AccountDep) -> JSONResponse:
    """Queue a migration (as `homefire migrate`), an admin's: the companion's voice tuned again on
    another base model from the caller's history with it, then the old setup and the new one on
    the same held-out probes. Nothing is switched: the new version waits until the server runs
    that model and someone chooses it. The finished job's `comparison` holds both."""
    def work() -> Job:
        companion = account.tunable(companion_id)
        target = request.model_dump(exclude={"settings"}) | {"model": model_dir(account, request.model)}
        here = account.hf.engine.model_path
        if here and model_sha256(pathlib.Path(target["model"])) == model_sha256(pathlib.Path(here)):
            raise SettingsProblem("model", f"model {request.model}: these are the weights the server runs "
                                           f"already; nothing to migrate to (to tune the voice again: "
                                           f"POST /api/v1/companions/{companion_id}/finetunes)")
        if "switch" in request.settings:
            raise SettingsProblem("settings.switch", "settings.switch: a migration switches nothing")
        config, _ = job_settings(account, request.settings)
        return account.hf.finetunes.submit(companion, account.name, "migrate", config, "never",
                                           admin=account.user.admin, target=target)

    return await queued(work)


@router.get("/finetunes", responses={403: {"description": "all=true, and the caller is not an admin"}})
async def list_finetunes(account: AccountDep, all: Annotated[bool, Query(
        description="every member's jobs (admins): to see what holds the queue and cancel it")] = False,
                         ) -> list[Job]:
    """The caller's jobs (training, evaluation, drift, migration), newest first (at most 100);
    an admin's, with all=true, everyone's."""
    if all and not account.user.admin:
        raise HTTPException(403, "only an admin may list every member's jobs")
    return await asyncio.to_thread(account.hf.finetunes.jobs, None if all else account.name)


@router.get("/finetunes/{job_id}", response_model=Job, responses={
    **streamed("The job. With `Accept: text/event-stream`: a `progress` event with the job each "
               "time it changes (step, loss, held-out loss, tokens/s, ETA, state), and a `done` "
               "event with it once it has ended: done, failed, cancelled or interrupted."),
    404: {"description": "No job of the caller's with this id"}})
async def get_finetune(job_id: JobId, request: Request, account: AccountDep):
    """One of the caller's jobs (an admin: anyone's): state, queue position, progress, the
    version it made and its voice-match figures, and the error if it failed."""
    service, admin = account.hf.finetunes, account.user.admin
    try:
        job = await asyncio.to_thread(service.get, account.name, job_id, admin)
    except JobError as err:
        raise refused(err) from err
    if "text/event-stream" not in request.headers.get("accept", ""):
        return job

    async def events() -> AsyncIterator[str]:
        async for now in service.follow(account.name, job_id, admin):
            yield event(now.model_dump(), PROGRESS if now.state in ("queued", "running", "evaluating")
                        else DONE)

    return ClosingStreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/finetunes/{job_id}/cancel", response_model=Job, responses={
    404: {"description": "No job of the caller's with this id"},
    409: {"description": "The job has already ended"}})
async def cancel_finetune(job_id: JobId, account: AccountDep) -> Job:
    """Cancel a queued or running job (an admin: anyone's); a cancelled training leaves no
    version behind."""
    try:
        return await account.hf.finetunes.cancel(account.name, job_id, account.user.admin)
    except JobError as err:
        raise refused(err) from err


@router.post("/finetunes/{job_id}/resume", status_code=202, response_model=Job, responses={
    404: {"description": "No job of the caller's with this id"},
    409: {"description": "The job was not interrupted"}})
async def resume_finetune(job_id: JobId, account: AccountDep) -> JSONResponse:
    """Queue an interrupted job again: it continues from its last checkpoint."""
    try:
        job = await account.hf.finetunes.resume(account.name, job_id)
    except JobError as err:
        raise refused(err) from err
    return JSONResponse(job.model_dump(), status_code=202)

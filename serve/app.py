"""The FastAPI application: its routes, middleware and error handlers around the process's
Homefire (serve.homefire), started and stopped with it."""

from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from serve import errors, metrics, web
from serve.config import Settings
from serve.homefire import Homefire
from serve.limits import BodyLimit
from serve.routes import (
    accounts,
    adapters,
    bundles,
    conversations,
    finetunes,
    groups,
    health,
    imports,
    memories,
    native,
    openai,
)


def create_app(settings: Settings, data_dir: Path, url: str = "", engine: bool = True,
               needs: frozenset[str] = frozenset(), act_as: str | None = None) -> FastAPI:
    """The application. `engine` False: without vLLM, nor backups on a schedule, and with only
    what a command `needs` of the rest (Homefire.start_without_engine): the command line's, in
    its own process, when no server runs (serve/in_process.py); there `act_as` names the member
    the local owner's requests act for (`--user`)."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        hf = Homefire.open(settings, data_dir)
        hf.url = url
        app.state.homefire = hf
        app.state.act_as = act_as
        if not engine:
            hf.chores.append(asyncio.create_task(hf.start_without_engine(
                "the command line runs Homefire without its engine; start `homefire serve` for replies",
                needs)))
        else:
            hf.chores.append(asyncio.create_task(hf.start_engine()))
        if settings.backup.dir and engine:
            hf.chores.append(asyncio.create_task(hf.backups_on_schedule()))
        # From here on every request shares the event loop: SQLite belongs in worker threads.
        # A development check (the tests turn it on) makes a call on the loop an error.
        hf.db.forbid_event_loop = os.environ.get("HOMEFIRE_STRICT_EVENT_LOOP") == "1"
        try:
            yield
        finally:
            hf.db.forbid_event_loop = False
            await hf.close()

    app = FastAPI(
        title="Homefire",
        summary="A self-hosted AI companion server: OpenAI-compatible chat with durable history.",
        version="0.1.0",
        lifespan=lifespan,
    )
    errors.install(app)
    # Uploads (exports, cards) are raw bodies with limits of their own.
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_body_kb * 1024,
                       exempt=("/imports", "/companions/import", "/api/v1/bundles"))
    app.add_middleware(errors.CatchAll)   # it sees what the others raise
    web.install(app)                      # outermost: its headers are on CatchAll's 500 too
    app.include_router(health.router)
    app.include_router(openai.router)
    app.include_router(native.router)
    app.include_router(conversations.router)
    app.include_router(groups.router)
    app.include_router(memories.router)
    app.include_router(imports.router)
    app.include_router(adapters.router)
    app.include_router(finetunes.router)
    app.include_router(accounts.router)
    app.include_router(bundles.router)
    metrics.ENGINE_READY.set_function(
        lambda: float(getattr(app.state, "homefire", None) is not None
                      and app.state.homefire.engine.ready and app.state.homefire.chat.prompts is not None)
    )
    return app

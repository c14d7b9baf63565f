"""Liveness, readiness and Prometheus metrics."""

from typing import Annotated

import httpx
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from serve import metrics
from serve.account import authenticate
from serve.errors import ERROR_RESPONSES
from serve.workers import scrape
from store.users import User

router = APIRouter(tags=["health"], responses=ERROR_RESPONSES)


@router.get("/healthz")
def healthz() -> dict:
    """The process is up (it may still be loading the engine)."""
    return {"status": "ok"}


class Reembedding(BaseModel):
    embedder: str
    state: str = Field(description="checking | embedding | done | failed")
    done: int
    total: int
    resumed_from: int = Field(description="memories a stopped run had embedded already")
    outcome: str | None = Field(None, description="once done: re-embedded, or same vectors (nothing to redo)")
    error: str | None = None


class MemoryIndex(BaseModel):
    embedder: str = Field(description="what embeds recall's questions now (the index's embedder)")
    reembedding: Reembedding | None = Field(None, description="memory.embedder names another: its "
                                            "re-embedding, the old index serving until it is done")
    reranker: dict[str, int] | None = Field(None, description="memory.reranker's calls by outcome: used, "
                                            "failed, over budget, busy")


class Readiness(BaseModel):
    ready: bool
    engine: str            # starting | ready | restarting | failed
    detail: str | None
    restarts: int
    model_change: str | None = None   # what differs from the model this data was made with
    workers: list[dict] | None = Field(None, description="an external engine's vLLM workers (engine.url): "
                                       "each one's state, since when; and for an admin its url, detail, "
                                       "adapters loaded and refused")
    memory: MemoryIndex | None = None  # an admin's: the memory index's embedder, and any re-embedding


@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "Not ready yet, or failed: see detail"}})
def readyz(request: Request, user: Annotated[User, Depends(authenticate)]) -> JSONResponse:
    """200 once the engine, tokenizer and memory are ready to reply, 503 with the reason before.
    The detail of a failure (the engine's log) is an admin's; other members read what state
    the engine is in."""
    hf = request.app.state.homefire
    ready = hf.engine.ready and hf.chat.prompts is not None and hf.chat.memory is not None
    detail = hf.engine.detail if user.admin else hf.engine.public_detail()
    body = {"ready": ready, "engine": hf.engine.state, "detail": detail,
            "restarts": hf.engine.restarts, "model_change": hf.model_change}
    if workers := hf.engine.workers:
        body["workers"] = [w.public(user.admin) for w in workers.known.values()]
        ready = ready and bool(workers.up())
        body["ready"] = ready
    memory = hf.chat.memory
    if user.admin and memory is not None:
        body["memory"] = {"embedder": memory.embedder.identity,
                          "reembedding": hf.reembedding.public() if hf.reembedding else None,
                          "reranker": dict(memory.reranker.outcomes) if memory.reranker else None}
    return JSONResponse(body, 200 if ready else 503)


# Prometheus' text format, not part of the JSON API (nor of its schema).
@router.get("/metrics", dependencies=[Depends(authenticate)], include_in_schema=False)
async def prometheus(request: Request) -> Response:
    """Homefire's metrics, then the engine's own (`vllm:` series) from its private socket:
    one scrape shows both."""
    engine = request.app.state.homefire.engine
    metrics.ENGINE_RESTARTS.set(engine.restarts)
    return Response(generate_latest() + await engine_metrics(engine), media_type=CONTENT_TYPE_LATEST)


async def engine_metrics(engine) -> bytes:
    """The engine's `vllm:` families as Prometheus text; its process and Python metrics are
    left out (their names are Homefire's too), and so is every series that names an adapter
    (a served adapter's name is its companion's key: OWNER.ID--vN, a member's private name).
    A comment says why when there are none."""
    if not engine.ready:
        return f"# the engine's metrics: none while it is {engine.state}\n".encode()
    try:
        response = await engine.client.get("/metrics", timeout=ENGINE_METRICS_TIMEOUT_S)
        response.raise_for_status()
    except httpx.HTTPError as err:
        return f"# the engine's metrics: unavailable ({type(err).__name__})\n".encode()
    private = tuple(engine.adapters)
    if engine.workers:
        return (await scrape(engine.workers, _engine_family, private)).encode()
    kept = [line for line in response.text.splitlines()
            if (line.startswith(ENGINE_PREFIX) or line.startswith(("# HELP " + ENGINE_PREFIX,
                                                                   "# TYPE " + ENGINE_PREFIX)))
            and not any(family in line for family in NAMING_ADAPTERS)
            and not any(name in line for name in private)]
    return ("\n".join(kept) + "\n").encode()


def _engine_family(name: str) -> bool:
    return name.startswith(ENGINE_PREFIX) and name not in NAMING_ADAPTERS


ENGINE_PREFIX = "vllm:"
NAMING_ADAPTERS = ("vllm:lora_requests_info",)   # labelled with the adapters running and waiting
ENGINE_METRICS_TIMEOUT_S = 5

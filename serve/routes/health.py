"""Liveness, readiness and Prometheus metrics."""

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serve import metrics
from serve.deps import require_key

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    """The process is up (it may still be loading the engine)."""
    return {"status": "ok"}


@router.get("/readyz", dependencies=[Depends(require_key)])
def readyz(request: Request) -> JSONResponse:
    """200 once the engine, tokenizer and memory are ready to reply, 503 with the reason before."""
    hf = request.app.state.homefire
    ready = hf.engine.ready and hf.chat.prompts is not None and hf.chat.memory is not None
    body = {"ready": ready, "engine": hf.engine.state, "detail": hf.engine.detail,
            "restarts": hf.engine.restarts}
    return JSONResponse(body, 200 if ready else 503)


@router.get("/metrics", dependencies=[Depends(require_key)])
def prometheus(request: Request) -> Response:
    metrics.ENGINE_RESTARTS.set(request.app.state.homefire.engine.restarts)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

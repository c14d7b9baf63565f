"""Server-sent events: a streaming response that always closes its generator."""

from __future__ import annotations

import json

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Send


class ClosingStreamingResponse(StreamingResponse):
    """Closes the body generator even when the client disconnects mid-stream.

    Starlette cancels the sending task on disconnect; if that lands outside our generator,
    the generator would only be closed by the garbage collector, and the engine would go
    on generating for nobody. Closing it here makes cancellation reach the upstream request.
    """

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


# One vocabulary for every stream of ours (README, "Streams"): a stream sends DELTA or PROGRESS
# events while its work goes on, and ends with one DONE (what the work came to) or one ERROR (why
# the stream could not go on: {"error": {...}} as a JSON error body, with retry_after when waiting helps).
DELTA = "delta"          # a piece of a reply: {"content": "..."}
PROGRESS = "progress"    # work under way: its state now (an import's counts, a job)
DONE = "done"            # the work has ended: the stored reply, the import's result, the job as it ended
ERROR = "error"          # the stream could not go on


def event(data: dict | str, name: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"event: {name}\ndata: {payload}\n\n" if name else f"data: {payload}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def streamed(what: str) -> dict:
    """OpenAPI for a 200 that is JSON, or with stream (or Accept: text/event-stream) an SSE stream."""
    one_event = {"type": "object", "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}
    return {200: {"description": what, "content": {"text/event-stream": {"schema": one_event}}}}

"""Limits that keep one client from hurting the rest: body size, request rate, streams.

Over a limit is always a clear 4xx: 413 for a body that is too large, 400 naming the
setting for too many messages or too long a message, 429 with Retry-After for too many
requests or replies at once. Each user (the account the API key names) has their own.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from fastapi import HTTPException, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from serve.config import LimitsConfig
from serve.errors import error_body

T = TypeVar("T")


class BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` (uploads have their own limit)."""

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: tuple[str, ...] = ()):
        self.app, self.max_bytes, self.exempt = app, max_bytes, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].endswith(self.exempt):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        # Read the body first (it is small, or refused): an error raised while the app
        # reads it would be turned into a generic 400 by the framework.
        buffered, seen = [], 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return await self._refuse(send)
            if not message.get("more_body"):
                break

        async def replay() -> dict:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(error_body(413, f"the request body is over {self.max_bytes // 1024} KB, the "
                                          "most this server accepts (limits.max_body_kb)")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


async def bounded_stream(request: Request, limit: int, too_large: str) -> AsyncIterator[bytes]:
    """An upload's body, chunk by chunk: 413 (`too_large`) as soon as it passes `limit` bytes,
    whether it declared its length or came chunked."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, too_large)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, too_large)
        yield chunk


class Limiter:
    """Per user: a token bucket of requests per minute, and a count of replies in progress."""

    def __init__(self, config: LimitsConfig):
        self.config = config
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}   # user -> (tokens, last refill)
        self._streams: dict[str, int] = {}

    def check_rate(self, user: str) -> None:
        rate = self.config.requests_per_minute
        if not rate:
            return
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(user, (float(rate), now))
            tokens = min(float(rate), tokens + (now - last) * rate / 60)
            if tokens < 1:
                self._buckets[user] = (tokens, now)
                wait = math.ceil((1 - tokens) * 60 / rate)
                raise HTTPException(429, f"more than {rate} requests a minute "
                                         f"(limits.requests_per_minute); retry in {wait} s",
                                    headers={"Retry-After": str(wait)})
            self._buckets[user] = (tokens - 1, now)

    def open_stream(self, user: str) -> None:
        """Count a reply in progress; close_stream when it ends."""
        most = self.config.max_streams_per_user
        with self._lock:
            if most and self._streams.get(user, 0) >= most:
                raise HTTPException(429, f"{most} replies are already being written for you "
                                         "(limits.max_streams_per_user); retry when one ends",
                                    headers={"Retry-After": "1"})
            self._streams[user] = self._streams.get(user, 0) + 1

    def close_stream(self, user: str) -> None:
        with self._lock:
            self._streams[user] -= 1

    async def reserve(self, user: str, prepare: Callable[[], T]) -> T:
        """Take a reply slot, then run prepare() off the event loop; the slot is given back if
        it fails. Taking the slot first means a refused request stores nothing."""
        self.open_stream(user)
        try:
            return await asyncio.to_thread(prepare)
        except BaseException:
            self.close_stream(user)
            raise

    def counted(self, user: str, stream: AsyncIterator) -> _Counted:
        """`stream`, holding a slot from open_stream until it ends or is closed."""
        return _Counted(self, user, stream)

    def check_messages(self, contents: list[str]) -> None:
        most = self.config.max_messages
        if len(contents) > most:
            raise HTTPException(400, f"messages: {len(contents)} messages, more than the {most} "
                                     "this server accepts (limits.max_messages)")
        longest = self.config.max_content_chars
        for i, content in enumerate(contents):
            if len(content) > longest:
                raise HTTPException(400, f"messages[{i}].content: {len(content)} characters, more than "
                                         f"the {longest} this server accepts (limits.max_content_chars)")


class _Counted:
    """An async iterator that gives its stream slot back exactly once, however it ends."""

    def __init__(self, limiter: Limiter, user: str, stream: AsyncIterator):
        self.limiter, self.user, self.stream, self.closed = limiter, user, stream, False

    def __aiter__(self) -> _Counted:
        return self

    async def __anext__(self):
        try:
            return await self.stream.__anext__()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.limiter.close_stream(self.user)
            await self.stream.aclose()

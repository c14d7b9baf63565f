"""Finding and calling a running Homefire server from the CLI."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx

from serve.sse import ERROR
from store.files import written_whole
from store.users import key_file


class ServerError(RuntimeError):
    """The server answered with an error; the message is the server's own."""


class Client:
    def __init__(self, url: str, data_dir: Path, uds: Path | None = None):
        """Authenticated with HOMEFIRE_API_KEY, else the local owner's key in data_dir; over the
        Unix socket `uds` where the application runs in this process (serve/in_process.py)."""
        headers = {}
        key = os.environ.get("HOMEFIRE_API_KEY")
        if not key and key_file(data_dir).exists():
            key = key_file(data_dir).read_text().strip()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.in_process = uds is not None   # the command line's own application, not a server
        transport = httpx.HTTPTransport(uds=str(uds)) if uds else None
        self.http = httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(30, read=600),
                                 transport=transport)

    def request(self, method: str, path: str, **kwargs) -> object:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise ServerError(f"cannot reach the server at {self.http.base_url}: {err}") from err
        if response.status_code >= 400:
            raise ServerError(_error_message(response.content, response.status_code))
        return response.json() if response.content else None

    def download(self, path: str, out: Path) -> None:
        """GET path into the file out, by way of a partial file (nothing half-written is left)."""
        try:
            with self.http.stream("GET", path) as response, written_whole(out) as partial:
                if response.status_code >= 400:
                    raise ServerError(_error_message(response.read(), response.status_code))
                with partial.open("wb") as f:
                    for block in response.iter_bytes(1 << 20):
                        f.write(block)
        except httpx.HTTPError as err:
            raise ServerError(f"the connection to {self.http.base_url} failed: {err}") from err

    def stream_events(self, path: str, body: dict | None, method: str = "POST",
                      **kwargs) -> Iterator[tuple[str, dict]]:
        """POST (or `method`) and yield (event name, data) from a server-sent event stream of our
        vocabulary (serve.sse); its `error` event is raised as a ServerError with the server's words."""
        headers = {"Accept": "text/event-stream", **kwargs.pop("headers", {})}
        if body is not None:
            kwargs["json"] = body
        try:
            with self.http.stream(method, path, headers=headers, **kwargs) as response:
                if response.status_code >= 400:
                    raise ServerError(_error_message(response.read(), response.status_code))
                name = "message"
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        if name == ERROR:
                            raise ServerError(_error_message(line[6:].encode(), response.status_code))
                        yield name, json.loads(line[6:])
                        name = "message"
        except httpx.HTTPError as err:
            raise ServerError(f"the connection to {self.http.base_url} failed: {err}") from err


def _error_message(content: bytes, status: int) -> str:
    try:
        return json.loads(content)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {content[:300].decode(errors='replace')}"

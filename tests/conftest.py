"""Shared fixtures: the embedded model converted once, and real `homefire serve` processes
(the helpers they use are in tests/support/)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from serve.default_model import ensure_default_model
from tests.support.server import CACHE, Server, SharedEngine, free_port, wait_until_serving


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return ensure_default_model(CACHE / "models")


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("server"), model_dir).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def shared_engine(model_dir: Path, tmp_path_factory) -> Iterator[SharedEngine]:
    """vLLM on a loopback port with a key, as an external engine is run (README: engine.url);
    started once, on the first test that asks for it."""
    port, key = free_port(), secrets.token_hex(16)
    log = (tmp_path_factory.mktemp("shared-engine") / "vllm.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
         "--host", "127.0.0.1", "--port", str(port), "--api-key", key, "--max-model-len", "4096",
         "--enforce-eager", "--generation-config", "vllm", "--disable-uvicorn-access-log"],
        env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, url, "the shared vLLM", Path(log.name), key)
        yield SharedEngine(url, key, proc)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        log.close()


@pytest.fixture
def make_server(model_dir: Path, tmp_path: Path, request) -> Iterator:
    """Servers of a test, each with its own engine, or with engine="shared" one on the
    session's shared vLLM (for a test whose subject is not the engine or its adapters)."""
    started: list[Server] = []

    def make(data_dir: Path | None = None, engine: str = "own", **kwargs) -> Server:
        if engine == "shared":
            shared: SharedEngine = request.getfixturevalue("shared_engine")
            config = kwargs.setdefault("config", {})
            config["engine"] = config.get("engine", {}) | {"url": shared.url}
            kwargs["env"] = kwargs.get("env", {}) | {"HOMEFIRE_ENGINE_API_KEY": shared.key}
        srv = Server(data_dir or tmp_path / "data", model_dir, **kwargs)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        if srv.proc and srv.proc.poll() is None:
            srv.stop(signal.SIGKILL)

"""Shared fixtures: the embedded model converted once, and real `homefire serve` processes."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from memory.users import local_key
from serve.default_model import MODEL_NAME, ensure_default_model

REPO = Path(__file__).resolve().parents[1]
# Converting the embedded model takes ~15 s; keep it across runs on one machine.
CACHE = Path(os.environ.get("HOMEFIRE_TEST_CACHE", REPO / ".cache" / "tests"))


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return ensure_default_model(CACHE / "models")


class Server:
    """A real `homefire serve` child process on a free port with its own data directory."""

    def __init__(self, data_dir: Path, model_dir: Path, config: dict | None = None,
                 env: dict | None = None):
        self.data_dir = data_dir
        models = data_dir / "models"
        models.mkdir(parents=True, exist_ok=True)
        # The real default (no engine.model): it finds the model already converted.
        link = models / MODEL_NAME
        if not link.exists():
            link.symlink_to(model_dir, target_is_directory=True)
        self.config_path = data_dir / "test-config.yaml"
        base = {"port": 0, "companions_dir": str(REPO / "configs" / "companions")}
        self.config_path.write_text(yaml.safe_dump(base | (config or {})))
        # SQLite on the event loop is an error in every server the tests start.
        self.env = os.environ | {"PYTHONUNBUFFERED": "1", "HOMEFIRE_STRICT_EVENT_LOOP": "1"} | (env or {})
        # The local owner's key, as `homefire user key` finds it (made here before the start).
        self.key = self.env.get("HOMEFIRE_API_KEY") or local_key(data_dir)
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 400, ready: bool = True) -> Server:
        """Start and wait until /readyz says ready (or, with ready=False, until it answers)."""
        self.log = (self.data_dir / "serve.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve.cli", "serve", "--data-dir", str(self.data_dir),
             "--config", str(self.config_path)],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
        )
        info = self.data_dir / "run" / "server.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"homefire serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            if info.exists() and json.loads(info.read_text())["pid"] == self.proc.pid:
                self.url = json.loads(info.read_text())["url"]
                try:
                    answer = httpx.get(f"{self.url}/readyz", headers=self.auth, timeout=5)
                    if answer.status_code == 200 or not ready:
                        return self
                    if answer.json().get("engine") == "failed":
                        raise RuntimeError(f"homefire serve failed to start: {answer.json()['detail']}\n"
                                           f"{self.log_tail()}")
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        raise RuntimeError(f"homefire serve was not ready in {timeout} s:\n{self.log_tail()}")

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"}

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "serve.cli", *args, "--data-dir", str(self.data_dir)],
                              capture_output=True, text=True, env=self.env, cwd=REPO, timeout=120)

    def add_user(self, name: str, admin: bool = False) -> str:
        """A new account made with the real `homefire user add`; returns its key."""
        done = self.cli("user", "add", name, "--json", *(["--admin"] if admin else []))
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["api_key"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.log.close()
        return code

    def log_tail(self, lines: int = 40) -> str:
        text = (self.data_dir / "serve.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def reply(self, companion: str, max_tokens: int = 24) -> dict:
        """The greedy reply to one question in a new native conversation with the companion."""
        with self.http() as http:
            conversation = http.post("/api/v1/conversations", json={"companion": companion}).json()
            answer = http.post(f"/api/v1/conversations/{conversation['conversation']['id']}/messages",
                               json={"content": "What do you think about the moon?", "max_tokens": max_tokens,
                                     "temperature": 0})
        assert answer.status_code == 200, answer.text
        return answer.json()["reply"]

    def openai(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or self.key, max_retries=0, timeout=120)

    def http(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key or self.key}"},
                            timeout=120)

    def engine(self) -> httpx.Client:
        """A client on the engine's private socket, as only Homefire itself should use it."""
        sock = self.data_dir / "run" / "engine.sock"
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://engine")

    def engine_metric(self, name: str, label: str = "") -> float:
        """Sum of vLLM's Prometheus samples `name{...label...}`."""
        text = self.engine().get("/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") and label in line)


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("server"), model_dir).start()
    yield srv
    srv.stop()


@dataclass
class SharedEngine:
    """A vLLM that servers share whose subject is not the engine (auth, limits, validation,
    durability of what Homefire writes): `homefire serve` with engine.url starts in seconds."""

    url: str
    key: str
    proc: subprocess.Popen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        deadline = time.monotonic() + 400
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, \
                f"the shared vLLM did not start; see {log.name}"
            try:
                if httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"},
                             timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
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

"""Real `homefire serve` processes and a vLLM engine they can share, as tests start them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import yaml

from serve.default_model import MODEL_NAME
from store.users import local_key

REPO = Path(__file__).resolve().parents[2]
# Converting the embedded model takes ~15 s; keep it across runs on one machine.
CACHE = Path(os.environ.get("HOMEFIRE_TEST_CACHE", REPO / ".cache" / "tests"))


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
        try:
            return self._wait(timeout, ready)
        except BaseException:
            # Not left behind (with its vLLM) to slow down every test after this one.
            if self.proc.poll() is None:
                self.proc.kill()   # the server's guard takes its vLLM down with it
                self.proc.wait(60)
            self.log.close()
            raise

    def _wait(self, timeout: float, ready: bool) -> Server:
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
        raise RuntimeError(f"homefire serve was not ready in {timeout} s (stopped):\n{self.log_tail()}")

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


def wait_until(check: Callable[[], object], what: str, timeout: float = 120) -> object:
    """A state, not a time: `check` is asked until it answers something true, which is returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def wait_until_serving(proc: subprocess.Popen, url: str, what: str, log: Path, key: str | None = None,
                       timeout: float = 400) -> None:
    """Until a vLLM server started as `proc` answers GET /v1/models (or fails: its log says why)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, f"{what} did not start; see {log}"
        try:
            if httpx.get(f"{url}/v1/models", headers=headers, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)

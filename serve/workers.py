"""An external engine's vLLM workers (engine.url: one vLLM, or vllm-router in front of several):
who they are, which are up, and the companions' adapters on every one of them.

Requests go through the router, which picks the worker; what must reach each worker goes to
each directly: an adapter (vLLM's runtime LoRA API, or its filesystem resolver reading a
directory they share), its removal, and the scrape of its metrics. A worker that joins or
restarts later is seen by the watch and given the adapters in use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from serve.config import EngineConfig

log = logging.getLogger(__name__)

_PATH = re.compile(r"(?:[A-Za-z]:)?/[^\s'\",;:)]+")   # a file system path in a message
WATCH_S = 5.0     # how often each worker is asked how it is
ASK_TIMEOUT_S = 3.0


class WorkerRefused(RuntimeError):
    """Workers would not load an adapter; the message names each one and vLLM's reason."""


@dataclass
class Worker:
    url: str
    state: str = "unknown"    # up, down, unknown (not asked yet)
    detail: str = "not asked yet"
    adapters: set[str] = field(default_factory=set)   # served names it has loaded
    problems: dict[str, str] = field(default_factory=dict)   # adapter -> why it refused it
    since: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.url.split("://", 1)[-1].rstrip("/")

    def public(self, admin: bool) -> dict:
        """What /readyz shows: the state to everyone; where it is and what it refused to admins."""
        body = {"state": self.state, "since": round(self.since)}
        if admin:
            body |= {"url": self.url, "detail": self.detail, "adapters": len(self.adapters),
                     "refused": dict(self.problems)}
        return body


class Workers:
    def __init__(self, config: EngineConfig, headers: dict[str, str]):
        self.config = config
        self.http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(ASK_TIMEOUT_S, read=120))
        self.known: dict[str, Worker] = {u.rstrip("/"): Worker(u.rstrip("/")) for u in config.workers}
        self.model_root: str | None = None   # the workers' --model, which a resolved adapter must name
        self._watch: asyncio.Task | None = None
        self.wanted: dict[str, str] = {}     # served name -> the adapter's folder here

    # Who they are ---------------------------------------------------------------------------

    async def discover(self) -> None:
        """The router's worker list (vllm-router GET /workers), else engine.url alone."""
        if self.config.workers:
            return
        urls = [self.config.url.rstrip("/")]
        try:
            answer = await self.http.get(f"{self.config.url.rstrip('/')}/workers")
            if answer.status_code == 200 and isinstance(answer.json(), dict):
                urls = [w["url"].rstrip("/") for w in answer.json().get("workers", [])] or urls
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass   # not a router: engine.url is the worker itself
        for url in urls:
            self.known.setdefault(url, Worker(url))
        for url in [u for u in self.known if u not in urls]:
            log.info("engine: worker %s left the router", self.known.pop(url).name)

    def start(self) -> None:
        self._watch = asyncio.get_running_loop().create_task(self._watching())

    async def stop(self) -> None:
        if self._watch:
            self._watch.cancel()
        await self.http.aclose()

    async def _watching(self) -> None:
        while True:
            try:
                await self.look()
            except Exception:   # the watch never ends over one bad answer
                log.exception("engine: watching the workers failed")
            await asyncio.sleep(WATCH_S)

    async def look(self) -> None:
        """Ask every worker what it serves; give one that is up the adapters it lacks."""
        await self.discover()
        await asyncio.gather(*(self._look_at(w) for w in list(self.known.values())))

    async def _look_at(self, worker: Worker) -> None:
        try:
            answer = await self.http.get(f"{worker.url}/v1/models", timeout=ASK_TIMEOUT_S)
            answer.raise_for_status()
            served = {m["id"] for m in answer.json()["data"]}
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as err:
            self._set(worker, "down", f"not answering ({type(err).__name__})")
            worker.adapters.clear()   # a worker that comes back has lost what it had loaded,
            worker.problems.clear()   # and may have been started with other flags
            return
        worker.adapters = served & set(self.wanted)
        self._set(worker, "up", "serving")
        if self.config.adapter_delivery == "runtime":
            for name in [n for n in self.wanted if n not in served and n not in worker.problems]:
                try:
                    await self._load(worker, name)
                except WorkerRefused as err:
                    worker.problems[name] = str(err)
                    log.error("engine: %s", err)

    @staticmethod
    def _set(worker: Worker, state: str, detail: str) -> None:
        if worker.state != state:
            worker.since = time.time()
            log.log(logging.WARNING if state == "down" else logging.INFO,
                    "engine: worker %s is %s (%s)", worker.name, state, detail)
        worker.state, worker.detail = state, detail

    def up(self) -> list[Worker]:
        return [w for w in self.known.values() if w.state == "up"]

    # The adapters ---------------------------------------------------------------------------

    async def deliver(self, name: str, path: str) -> None:
        """Make adapter `name` servable on every worker that is up now (the watch brings it to
        the others when they are); WorkerRefused, with nothing left behind, if any refuses."""
        await self.look()
        if not self.up():
            raise ConnectionError("no worker of the engine answers")
        await self.want(name, path)
        refused = []
        for worker in self.up():
            worker.problems.pop(name, None)
            try:
                if self.config.adapter_delivery == "runtime":
                    await self._load(worker, name)
                else:
                    await self._resolve(worker, name)
            except WorkerRefused as err:
                refused.append(str(err))
        if refused:
            await self.withdraw([name])
            raise WorkerRefused("; ".join(refused))

    async def want(self, name: str, path: str) -> None:
        """Published (where the workers share a directory) and wanted on every worker."""
        if self.config.adapter_dir:
            await asyncio.to_thread(self._publish, name, Path(path))
        self.wanted[name] = path

    def _path_on_workers(self, name: str) -> str:
        if self.config.adapter_dir:
            return f"{(self.config.worker_adapter_dir or str(self.config.adapter_dir)).rstrip('/')}/{name}"
        return self.wanted[name]

    async def _load(self, worker: Worker, name: str) -> None:
        try:
            answer = await self.http.post(f"{worker.url}/v1/load_lora_adapter",
                                          json={"lora_name": name, "lora_path": self._path_on_workers(name)})
        except httpx.HTTPError as err:
            raise WorkerRefused(f"worker {worker.name} could not be reached ({type(err).__name__})") from err
        if answer.status_code == 200 or "already" in answer.text:
            worker.adapters.add(name)
            return
        if answer.status_code == 404 and "Not Found" in answer.text:   # the route is not there
            raise WorkerRefused(f"worker {worker.name} has no runtime LoRA API (start it with "
                                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora)")
        raise WorkerRefused(f"worker {worker.name} refused adapter {name}: {_logged(worker, answer)}")

    async def _resolve(self, worker: Worker, name: str) -> None:
        """A one-token request for the adapter: the worker's resolver loads it now, or says why not."""
        try:
            answer = await self.http.post(f"{worker.url}/v1/completions",
                                          json={"model": name, "prompt": " ", "max_tokens": 1})
        except httpx.HTTPError as err:
            raise WorkerRefused(f"worker {worker.name} could not be reached ({type(err).__name__})") from err
        if answer.status_code != 200:
            raise WorkerRefused(f"worker {worker.name} could not resolve adapter {name} from its "
                                f"VLLM_LORA_RESOLVER_CACHE_DIR: {_logged(worker, answer)}")
        worker.adapters.add(name)

    def _publish(self, name: str, source: Path) -> None:
        """Copy the adapter into the shared directory whole (by a rename), naming the workers'
        model as its base: vLLM's resolver loads only an adapter of the model it runs."""
        shared = Path(self.config.adapter_dir)
        shared.mkdir(parents=True, exist_ok=True)
        partial = shared / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial)
        config_path = partial / "adapter_config.json"
        config = json.loads(config_path.read_text())
        if self.model_root:
            config["base_model_name_or_path"] = self.model_root
        config_path.write_text(json.dumps(config, indent=2))
        shutil.rmtree(shared / name, ignore_errors=True)
        partial.rename(shared / name)

    async def withdraw(self, names: list[str]) -> None:
        """The adapters leave every worker that is up, and the shared directory."""
        for name in names:
            self.wanted.pop(name, None)
            for worker in self.up():
                worker.problems.pop(name, None)
                if name in worker.adapters or self.config.adapter_delivery == "resolver":
                    try:
                        await self.http.post(f"{worker.url}/v1/unload_lora_adapter", json={"lora_name": name})
                    except httpx.HTTPError as err:   # it forgets them at its next start anyway
                        log.warning("engine: could not unload %s from worker %s: %s", name, worker.name, err)
                    worker.adapters.discard(name)
            if self.config.adapter_dir:
                await asyncio.to_thread(shutil.rmtree, Path(self.config.adapter_dir) / name, True)


def vllm_reason(answer: httpx.Response, limit: int = 300) -> str:
    """Why vLLM refused, in its own words ({"error": {"message"}}, or {"message"} before that),
    without paths: they are the server's (the log has the whole answer)."""
    try:
        body = answer.json()
    except ValueError:
        body = {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    said = error.get("message", "") if isinstance(error, dict) else str(error)
    return _PATH.sub("<path>", str(said))[:limit] or f"status {answer.status_code}"


def _logged(worker: Worker, answer: httpx.Response) -> str:
    log.error("engine: worker %s said (%d): %s", worker.name, answer.status_code, answer.text[:1000])
    return vllm_reason(answer)


# Metrics --------------------------------------------------------------------------------------

_ROUTER = ("vllm_router_", "# HELP vllm_router_", "# TYPE vllm_router_")
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?(\s.*)$")


def merged(texts: dict[str, str], keep) -> str:
    """Prometheus text of several workers as one: each sample labelled with its worker, each
    family's HELP and TYPE once (the format wants a family's samples together). `keep(family,
    line)` says which families and samples are shown."""
    families: dict[str, dict] = {}
    for worker, text in texts.items():
        family = None
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                family = line.split()[2]
                entry = families.setdefault(family, {"meta": [], "samples": []})
                if line not in entry["meta"]:
                    entry["meta"].append(line)
            elif family and (found := _SAMPLE.match(line)) and keep(family, line):
                name, labels, rest = found.groups()
                label = f'worker="{worker}"' + (f",{labels}" if labels else "")
                families[family]["samples"].append(f"{name}{{{label}}}{rest}")
    return "".join("\n".join(f["meta"] + f["samples"]) + "\n"
                   for name, f in families.items() if f["samples"] and keep(name, ""))


async def scrape(workers: Workers, keep, private: tuple[str, ...]) -> str:
    """Every worker's metrics (labelled with its name), whether it is up, and the router's own."""
    async def one(worker: Worker) -> tuple[str, str]:
        try:
            answer = await workers.http.get(f"{worker.url}/metrics", timeout=ASK_TIMEOUT_S)
            answer.raise_for_status()
            return worker.name, answer.text
        except httpx.HTTPError:
            return worker.name, ""
    found = dict(await asyncio.gather(*(one(w) for w in workers.up())))
    shown = merged(found, lambda family, line: keep(family) and not any(n in line for n in private))
    up = ["# HELP homefire_engine_worker_up 1 while the engine's worker answers (engine.workers)",
          "# TYPE homefire_engine_worker_up gauge"]
    up += [f'homefire_engine_worker_up{{worker="{w.name}"}} {int(w.state == "up")}'
           for w in workers.known.values()]
    router = ""
    if workers.config.router_metrics:
        try:
            answer = await workers.http.get(workers.config.router_metrics, timeout=ASK_TIMEOUT_S)
            answer.raise_for_status()
            router = "\n".join(line for line in answer.text.splitlines()
                               if line.startswith(_ROUTER) and not any(n in line for n in private)) + "\n"
        except httpx.HTTPError as err:
            router = f"# the router's metrics: unavailable ({type(err).__name__})\n"
    return "\n".join(up) + "\n" + shown + router

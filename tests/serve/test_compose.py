"""deploy/compose.yaml (README: More than one GPU), read as Docker Compose reads it: no Docker
engine runs here, so its services, networks, volumes and checks are checked as written, and its
settings and flags against the ones the tests run (tests/serve/test_workers.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

from serve.config import Settings
from tests.support.workers import ROUTER_CHECKS

REPO = Path(__file__).resolve().parents[2]


def flag(command: list[str], name: str) -> list[str]:
    """The values after `name` in a command, up to the next flag."""
    at = command.index(name) + 1
    values = []
    while at < len(command) and not command[at].startswith("--"):
        values.append(command[at])
        at += 1
    return values


def test_the_compose_file_runs_homefire_the_router_and_a_worker_a_gpu_and_only_homefire_is_reachable():
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    workers = {name: s for name, s in services.items() if name.startswith("worker-")}
    assert len(workers) >= 2 and {"router", "homefire"} <= services.keys()

    gpus = []
    for worker in workers.values():
        assert worker["image"] == "vllm/vllm-openai:v0.32.0", "the vLLM release CI tests"
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        gpus += devices[0]["device_ids"]
        assert worker["healthcheck"]["test"] and "/health" in " ".join(worker["healthcheck"]["test"])
        assert worker["networks"] == ["engine"] and "ports" not in worker
        assert "adapters:/adapters:ro" in worker["volumes"]
        env = worker["environment"]
        assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        assert env["VLLM_LORA_RESOLVER_CACHE_DIR"] == "/adapters"
        assert env["VLLM_PLUGINS"] == "lora_filesystem_resolver"
        assert "--enable-lora" in worker["command"] and flag(worker["command"], "--model") == ["/models/base"]
    assert len(set(gpus)) == len(gpus), "a GPU each"

    router = services["router"]
    command = router["command"]
    assert flag(command, "--policy") == ["consistent_hash"]
    assert flag(command, "--worker-urls") == [f"http://{name}:8000" for name in workers]
    assert all(router["depends_on"][name]["condition"] == "service_healthy" for name in workers)
    for at in range(0, len(ROUTER_CHECKS), 2):   # what the tests' router runs with
        assert flag(command, ROUTER_CHECKS[at]) == [ROUTER_CHECKS[at + 1]]
    assert router["networks"] == ["engine"] and "ports" not in router and router["healthcheck"]["test"]

    homefire = services["homefire"]
    assert homefire["depends_on"]["router"]["condition"] == "service_healthy"
    assert homefire["ports"] == ["127.0.0.1:8000:8000"], "published on loopback only"
    assert set(homefire["networks"]) == {"engine", "outside"}
    assert compose["networks"]["engine"]["internal"] is True, "the workers and router have no way out"
    assert "adapters:/adapters" in homefire["volumes"]
    assert "/healthz" in " ".join(homefire["healthcheck"]["test"])
    assert "HOMEFIRE_API_KEY" in homefire["environment"]

    # Homefire's settings are valid, and name the router, the shared directory and the model.
    settings = Settings.model_validate(yaml.safe_load(compose["configs"]["homefire"]["content"]))
    assert settings.engine.url == "http://router:8000" and str(settings.engine.adapter_dir) == "/adapters"
    assert settings.engine.model == "/models/base" and settings.finetune.gpu_sharing == "concurrent"
    assert settings.engine.router_metrics == f"http://router:{flag(command, '--prometheus-port')[0]}/metrics"
    assert {"data", "adapters"} <= compose["volumes"].keys()


def test_the_readmes_commands_start_the_workers_and_router_as_the_tests_do():
    """README "More than one GPU" by hand: the router's checks and the workers' settings are
    the ones tests/support/workers.py runs them with."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## More than one GPU"):readme.index("## Layout")]
    commands = " ".join(section.replace("\\\n", " ").split())
    assert "--policy consistent_hash" in commands
    for at in range(0, len(ROUTER_CHECKS), 2):
        assert f"{ROUTER_CHECKS[at]} {ROUTER_CHECKS[at + 1]}" in commands, ROUTER_CHECKS[at]
    for setting in ("VLLM_ALLOW_RUNTIME_LORA_UPDATING=True", "VLLM_PLUGINS=lora_filesystem_resolver",
                    "VLLM_LORA_RESOLVER_CACHE_DIR=", "--served-model-name homefire-base", "--enable-lora"):
        assert setting in commands, setting
    settings = Settings.model_validate(yaml.safe_load(section.split("```yaml")[1].split("```")[0]))
    assert settings.engine.url and settings.engine.adapter_dir and settings.engine.router_metrics

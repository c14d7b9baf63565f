"""Server settings: one pydantic model, values from a YAML file, validated at start.

Environment variables are read only for secrets and the data directory:
HOMEFIRE_DATA_DIR, HOMEFIRE_API_KEY (the local owner's key, instead of the generated one),
HOMEFIRE_ENGINE_API_KEY,
HOMEFIRE_CHROMA_TOKEN.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from store.settings_file import read_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "homefire.yaml"


class ConfigError(ValueError):
    """A config file or setting is invalid; the message names the file and the setting."""


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    url: str | None = None
    """An external vLLM OpenAI server (e.g. http://gpu-box:8000), or vllm-router in front of
    several (README: More than one GPU); when set nothing is spawned. Its API key, if any,
    comes from HOMEFIRE_ENGINE_API_KEY (the workers' too)."""
    workers: list[str] = []
    """The vLLM workers behind a router at url, each of which gets the companions' adapters
    and is shown in /readyz and /metrics. Empty: asked of the router (vllm-router's
    GET /workers, so a worker added to it later is found), else url is the one worker (behind
    another load balancer, list them here)."""
    adapter_delivery: Literal["runtime", "resolver"] = "runtime"
    """How an external engine's workers get an adapter. runtime: loaded on each worker through
    /v1/load_lora_adapter (workers run with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), and on a
    worker that joins or restarts once it is seen; resolver: published to adapter_dir, which
    each worker's LoRA filesystem resolver reads on first use (VLLM_LORA_RESOLVER_CACHE_DIR)."""
    adapter_dir: Path | None = None
    """A directory the workers share, where the adapters in use are published by served name
    (OWNER.ID--vN). Needed for resolver; with runtime, empty means the workers read them from
    Homefire's data directory (they run on this machine)."""
    worker_adapter_dir: str | None = None
    """adapter_dir as the workers see it (e.g. /adapters in their containers); empty: the same."""
    router_metrics: str | None = None
    """The router's own Prometheus endpoint (vllm-router --prometheus-port, e.g.
    http://router:29000/metrics), shown in /metrics beside the workers' series."""
    model: str | None = None
    """A Hugging Face model id or local directory; empty means the embedded SmolLM2-135M-Instruct."""
    max_model_len: int = Field(4096, ge=256)
    """Context window in tokens: prompt plus reply."""
    enforce_eager: bool | None = None
    """Skip torch.compile and CUDA graphs: starts far faster, generates a little slower.
    Empty means on for the CPU build of vLLM, off on a GPU."""
    cpu_kv_cache_gib: int = Field(1, ge=1)
    """KV cache size in whole GiB on the CPU build (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    """Share of GPU memory vLLM may take."""
    lora: bool | None = None
    """Serve companions' LoRA adapters (vLLM multi-LoRA; new versions load at run time).
    Empty: only once a companion uses one (vllm-cpu runs about half as fast with LoRA
    enabled); the engine restarts with it when the first adapter is chosen."""
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = 64
    """Largest adapter rank the engine accepts."""
    max_loras: int = Field(4, ge=1)
    """Adapters the engine keeps ready at once (others wait their turn)."""
    extra_args: list[str] = []
    """Further vLLM server flags, passed through as they are."""
    startup_timeout_s: float = Field(900, gt=0)
    """How long to wait for the engine to become ready before giving up."""
    max_restarts: int = Field(3, ge=0)
    """Restarts allowed within restart_window_s before the engine is declared failed."""
    restart_window_s: float = Field(600, gt=0)
    """Window over which restarts are counted."""

    @field_validator("url", "router_metrics")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"not an http(s) URL: {value}")
        return value

    @field_validator("workers")
    @classmethod
    def _http_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            cls._http_url(url)
        if len(set(value)) != len(value):
            raise ValueError("a worker is named twice")
        return value

    @model_validator(mode="after")
    def _external_parts(self) -> EngineConfig:
        if not self.url and (self.workers or self.adapter_dir or self.router_metrics):
            raise ValueError("workers, adapter_dir and router_metrics are for an external engine: set url "
                             "(the router in front of the workers)")
        if self.adapter_delivery == "resolver" and not self.adapter_dir:
            raise ValueError("adapter_delivery resolver needs adapter_dir, the directory the workers' "
                             "VLLM_LORA_RESOLVER_CACHE_DIR names")
        return self


class MemoryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    embedder: str | None = None
    """A sentence-transformers model directory, or an OpenAI-compatible embeddings URL (a vLLM
    pooling worker, e.g. http://gpu-box:8001/v1; its key from HOMEFIRE_EMBEDDER_API_KEY); empty
    means the bundled all-MiniLM-L6-v2. Changing it re-embeds every memory in the background
    while the old index serves (GET /readyz shows how far)."""
    reranker: str | None = None
    """A cross-encoder that orders recall's best candidates again: a vLLM /rerank or /score URL
    (its key from HOMEFIRE_RERANKER_API_KEY) or a sentence-transformers CrossEncoder directory;
    empty means none."""
    rerank_budget_ms: int = Field(300, ge=1, le=60_000)
    """Longest a reply waits for the reranker; past it, or on any failure, recall keeps its own
    order."""
    rerank_top: int = Field(20, ge=1, le=200)
    """How many of recall's best candidates (over the threshold) the reranker orders."""

    @field_validator("reranker")
    @classmethod
    def _url_or_directory(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")) and not Path(value).expanduser().is_dir():
            raise ValueError(f"neither an http(s) URL nor a CrossEncoder directory: {value}")
        return value
    chroma_url: str | None = None
    """A Chroma server (e.g. http://db-box:8000) for the vector index; empty keeps it in the
    data directory. Its token, if any, comes from HOMEFIRE_CHROMA_TOKEN."""
    top_k: int = Field(6, ge=0, le=50)
    """Most memories placed in one prompt (0 turns recall off)."""
    threshold: float = Field(0.26, ge=-1, le=1)
    """Cosine similarity a memory needs to count as relevant. Lower finds more of what was
    said and brings loosely related memories to more replies (bench/RESULTS.md, memory_quality)."""
    budget_tokens: int = Field(400, ge=0)
    """Most prompt tokens that recalled memories may take."""
    summaries: bool = True
    """Fold the turns of a conversation that no longer fit the context into a running summary,
    written by the served model in the background (false: the oldest turns fall out)."""
    summary_tokens: int = Field(256, ge=32, le=2048)
    """Longest a conversation's running summary may grow, in tokens."""


class ImportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    max_upload_mb: int = Field(2048, ge=1)
    """Largest export the server accepts through its API, in MB (the CLI without a server
    reads files of any size)."""


class LimitsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    max_body_kb: int = Field(1024, ge=1)
    """Largest JSON request body in KB (imports and card uploads have their own limits)."""
    max_messages: int = Field(1000, ge=1)
    """Most messages in one chat request."""
    max_content_chars: int = Field(100_000, ge=1)
    """Longest single message, in characters."""
    requests_per_minute: int = Field(600, ge=0)
    """API requests per user per minute, in bursts of up to as many (0: no limit)."""
    max_streams_per_user: int = Field(4, ge=0)
    """Replies being written for one user at once (0: no limit)."""


class TaskPattern(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    client: str = Field(min_length=1)
    """Who sends it (shown in the X-Homefire-Task header, the log and the metrics)."""
    pattern: str = Field(min_length=1)
    """A Python regular expression searched in the request's last message."""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"not a regular expression: {err}") from None
        return value


class TasksConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: str = Field("homefire-utility", min_length=1)
    """Model id for clients' utility work (titles, tags, summaries): the served model with no
    persona and no memory, never stored. Listed in /v1/models; no companion may take it."""
    patterns: list[TaskPattern] = [
        TaskPattern(client="open-webui", pattern=r"^### Task:"),
        TaskPattern(client="sillytavern", pattern=r"^Ignore previous instructions\. Summarize the most "
                    r"important facts and events"),
        TaskPattern(client="sillytavern", pattern=r"Classify the emotion of the last message\."),
        TaskPattern(client="sillytavern", pattern=r"^\[Write your next reply from the point of view of"),
        TaskPattern(client="sillytavern", pattern=r"^\[In the next response I want you to provide only "
                    r"a detailed comma-delimited list of keywords"),
    ]
    """Requests whose last message matches one of these are a client's background task, not
    the person talking: answered as the utility model is, and never stored."""


class FinetuneLimits(BaseModel):
    """What one member's training jobs may take of a shared machine. Admins' jobs are not limited."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    max_steps: int = Field(500, ge=1)
    """Most training steps in one member's job: a job asking for more is refused (422), and one
    that trains by epochs stops there."""
    max_open_jobs: int = Field(2, ge=1)
    """A member's unfinished jobs (queued or running) over all companions; one more is a 429."""
    gpu_minutes_per_day: float | None = Field(120, gt=0)
    """Minutes a member's jobs may run in any 24 hours; past them, a new job is a 429 until
    enough of that time is a day old. Empty: no limit."""
    engine_hours: str | None = Field(None, pattern=r"^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d$")
    """Hours of the server's clock (HH:MM-HH:MM, may pass midnight) when a member's job may stop
    or sleep the engine for everyone (gpu_sharing). Outside them a member's job runs beside
    the engine where there is room, and waits otherwise. Empty: only admins' jobs stop it."""


class FinetuneServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    gpu_sharing: Literal["auto", "stop", "sleep", "concurrent"] = "auto"
    """How a training job shares the GPU with the engine. stop: the engine stops for the
    training and starts again after (replies get 503 saying how far it is); sleep: vLLM's
    sleep mode frees the GPU without a restart, where the installed vLLM has it; concurrent:
    both at once, for GPUs with room (what the CPU build does); auto: picks from the GPU's
    free memory and the model's size, and logs why."""
    cuda_devices: str | None = Field(None, pattern=r"^\d+(,\d+)*$")
    """The GPUs a training job may use (CUDA_VISIBLE_DEVICES of its process, e.g. "2"): one
    that no vLLM worker uses, where the engine is external (engine.url). Empty: what the
    server's own process sees."""
    switch: Literal["auto", "always", "never"] = "auto"
    """After a training: speak through the new version when its held-out loss beats the
    version in use (auto), always, or never (then `homefire adapter use`)."""
    config: Path | None = None
    """Fine-tuning settings of the server's jobs (empty: configs/finetune.yaml); a job's own
    settings go on top."""
    samples: int = Field(24, ge=1, le=64)
    """Replies each model writes for a job's voice report (its discriminator needs at least 6 of
    each; more read steadier)."""
    sample_tokens: int = Field(64, ge=1, le=512)
    """The longest each of those replies may be, in tokens (`homefire eval --max-new-tokens`)."""
    limits: FinetuneLimits = FinetuneLimits()
    """What one member's jobs may take of the machine (admins' are not limited)."""


class BackupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    dir: Path | None = None
    """Where the server puts its scheduled backups (`homefire backup`); empty: no schedule."""
    every_hours: float = Field(24, ge=1)
    """Hours between scheduled backups (24: daily), counted from the newest one in dir."""
    keep: int = Field(7, ge=1)
    """Scheduled backups kept; older ones are deleted once a new one is whole."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    """Address to listen on. Every request needs an API key wherever it listens; anything but
    loopback also refuses a short HOMEFIRE_API_KEY."""
    port: int = Field(8000, ge=0, le=65535)
    """TCP port to listen on (0 picks a free one)."""
    companions_dir: Path = REPO_ROOT / "configs" / "companions"
    """Directory of persona YAML files, loaded at start (relative paths: to the config file)."""
    default_companion: str = "ember"
    """Companion that `homefire chat` and clients without a preference talk to."""
    engine: EngineConfig = EngineConfig()
    """The vLLM engine."""
    memory: MemoryConfig = MemoryConfig()
    """Long-term memory."""
    imports: ImportConfig = ImportConfig()
    """Imports of chat exports (`homefire import`)."""
    limits: LimitsConfig = LimitsConfig()
    """What one client may ask of the server; over a limit is a clear 4xx."""
    tasks: TasksConfig = TasksConfig()
    """Clients' background work (titles, tags, summaries), kept out of history and memory."""
    finetune: FinetuneServerConfig = FinetuneServerConfig()
    """Training jobs of the server (POST /api/v1/companions/{id}/finetunes)."""
    backup: BackupConfig = BackupConfig()
    """Scheduled backups of the data directory, taken while the server runs."""

    @model_validator(mode="after")
    def _sharing_with_external_workers(self) -> Settings:
        if self.engine.url and self.finetune.gpu_sharing in ("stop", "sleep"):
            raise ValueError(
                f"finetune.gpu_sharing {self.finetune.gpu_sharing} needs the engine Homefire runs itself, "
                "and engine.url names one it does not: Homefire neither stops nor puts to sleep workers "
                "that other members' replies go to. Use auto or concurrent (the training runs on this "
                "machine, on finetune.cuda_devices if set)")
        return self


def load_settings(path: Path | None = None) -> Settings:
    """Read settings from a YAML file (or the defaults); errors name the file and the setting."""
    if path is None:
        return Settings()
    settings = read_settings(path, Settings, ConfigError)
    if not settings.companions_dir.is_absolute():
        settings.companions_dir = (path.parent / settings.companions_dir).resolve()
    if settings.finetune.config and not settings.finetune.config.is_absolute():
        settings.finetune.config = (path.parent / settings.finetune.config).resolve()
    if settings.backup.dir and not settings.backup.dir.expanduser().is_absolute():
        settings.backup.dir = (path.parent / settings.backup.dir).resolve()
    return settings


def default_data_dir() -> Path:
    if env := os.environ.get("HOMEFIRE_DATA_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "homefire"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> None:
    """Every route but /healthz always needs a key; off loopback, it must not be guessable."""
    key = os.environ.get("HOMEFIRE_API_KEY")
    if not is_loopback(settings.host) and key is not None and len(key) < MIN_KEY_CHARS:
        raise ConfigError(
            f"refusing to listen on {settings.host}: HOMEFIRE_API_KEY is {len(key)} characters, too "
            f"easy to guess for a server others can reach (at least {MIN_KEY_CHARS}); unset it to "
            "use the generated key in the data directory, or listen on 127.0.0.1"
        )


MIN_KEY_CHARS = 24

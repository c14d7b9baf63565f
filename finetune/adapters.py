"""Versioned LoRA adapters: `<data>/adapters/<companion>/<version>/`, and which one is in use.

Each version holds the adapter in PEFT format (`adapter_model.safetensors`,
`adapter_config.json`) and `manifest.json`: the base model and the SHA-256 of its weights,
the dataset's hash and size, the config and the metrics. An adapter is only ever used on
the base model it was trained on, and only as safetensors: a folder with pickled weights
is refused. `CURRENT` in the companion's folder names the version in use.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from finetune.config import VLLM_RANKS, FinetuneError

PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
VERSION = re.compile(r"v([1-9]\d{0,8})")
# A companion's storage key: a shared id, or a user's own as OWNER.ID (memory.companions).
COMPANION_KEY = re.compile(r"(?:[a-z0-9][a-z0-9_-]{0,31}\.)?[a-z0-9][a-z0-9_-]{0,63}")


def checked_version(version: object, where: str = "version") -> str:
    """`version` if it is v1, v2, ... and nothing else: it becomes a folder name."""
    if not isinstance(version, str) or not VERSION.fullmatch(version):
        raise FinetuneError(f"{where}: {version!r} is not an adapter version; versions are named "
                            "v1, v2, ... (see `homefire adapter list`)")
    return version


def adapters_dir(data_dir: Path, companion_id: str) -> Path:
    if not COMPANION_KEY.fullmatch(companion_id):
        raise FinetuneError(f"{companion_id!r} is not a companion id")
    return data_dir / "adapters" / companion_id   # the pattern admits no separator, no ".."


def adopt_old_folders(data_dir: Path, keys: list[str]) -> list[str]:
    """Homefire before schema 5 kept a user's own companion's adapters under its bare id: move
    them to its key (OWNER.ID), unless that bare id is now another companion's. Returns the
    keys moved. CURRENT and the manifests name versions only, so a folder moves whole."""
    moved = []
    for key in keys:
        owner, _, bare = key.rpartition(".")
        old, new = data_dir / "adapters" / bare, data_dir / "adapters" / key
        if owner and bare not in keys and old.is_dir() and not new.exists():
            old.rename(new)
            moved.append(key)
    return moved


def version_dir(data_dir: Path, companion_id: str, version: str) -> Path:
    """The folder of one version; `version` is checked, so the path stays in the companion's."""
    return adapters_dir(data_dir, companion_id) / checked_version(version)


def versions(data_dir: Path, companion_id: str) -> list[str]:
    """Finished versions (with a manifest), oldest first."""
    root = adapters_dir(data_dir, companion_id)
    found = [p.name for p in root.glob("v*") if VERSION.fullmatch(p.name) and (p / "manifest.json").exists()]
    return sorted(found, key=lambda v: int(v[1:]))


def new_version(data_dir: Path, companion_id: str) -> Path:
    root = adapters_dir(data_dir, companion_id)
    numbers = [int(m.group(1)) for p in root.glob("v*") if (m := VERSION.fullmatch(p.name))]
    path = root / f"v{max(numbers, default=0) + 1}"
    path.mkdir(parents=True)
    return path


def manifest(data_dir: Path, companion_id: str, version: str) -> dict:
    path = version_dir(data_dir, companion_id, version) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        known = ", ".join(versions(data_dir, companion_id)) or "none"
        raise FinetuneError(f"companion {companion_id!r} has no adapter {version!r} "
                            f"(versions: {known})") from None
    except ValueError as err:
        raise FinetuneError(f"{path}: not valid JSON ({err})") from err


def model_sha256(model_dir: Path) -> str:
    """SHA-256 over the model's safetensors weights, cached beside them by size and time."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FinetuneError(f"{model_dir}: no safetensors weights to identify the base model by")
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache = model_dir / "homefire-weights.sha256.json"
    try:
        cached = json.loads(cache.read_text())
        if cached["files"] == stamp:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    for f in files:
        with f.open("rb") as stream:
            while chunk := stream.read(1 << 22):
                digest.update(chunk)
    try:
        cache.write_text(json.dumps({"files": stamp, "sha256": digest.hexdigest()}))
    except OSError:
        pass   # a read-only model directory: hash again next time
    return digest.hexdigest()


def verify(path: Path, base_sha256: str | None) -> dict:
    """The adapter's manifest, once it is known to be servable on this base model."""
    label = f"adapter {path.parent.name}/{path.name}"
    if pickled := [p.name for p in path.iterdir() if p.suffix in PICKLES]:
        raise FinetuneError(f"{label}: refusing pickled weights ({', '.join(pickled)}); only "
                            "safetensors adapters are loaded")
    for needed in ("adapter_model.safetensors", "adapter_config.json", "manifest.json"):
        if not (path / needed).is_file():
            raise FinetuneError(f"{label}: {needed} is missing")
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("r") not in VLLM_RANKS:
        raise FinetuneError(f"{label}: rank {config.get('r')} cannot be served by vLLM")
    if config.get("modules_to_save") or config.get("use_dora"):
        raise FinetuneError(f"{label}: modules_to_save and DoRA cannot be served by vLLM")
    info = json.loads((path / "manifest.json").read_text())
    trained_on = info.get("base_model", {})
    if base_sha256 is None:
        raise FinetuneError(f"{label}: the running base model cannot be identified (no local "
                            "safetensors), so its adapters cannot be checked against it")
    if trained_on.get("sha256") != base_sha256:
        raise FinetuneError(f"{label} was trained on base model {trained_on.get('id')!r} "
                            f"(weights {str(trained_on.get('sha256'))[:12]}), but this server runs "
                            f"weights {base_sha256[:12]}; train it again on this model")
    return info


def current(data_dir: Path, companion_id: str) -> str | None:
    path = adapters_dir(data_dir, companion_id) / "CURRENT"
    try:
        version = path.read_text().strip() or None
    except FileNotFoundError:
        return None
    return version and checked_version(version, str(path))


def set_current(data_dir: Path, companion_id: str, version: str | None) -> None:
    root = adapters_dir(data_dir, companion_id)
    if version is not None:
        checked_version(version)
    root.mkdir(parents=True, exist_ok=True)
    scratch = root / "CURRENT.tmp"
    scratch.write_text(version or "")
    os.replace(scratch, root / "CURRENT")


def previous(data_dir: Path, companion_id: str) -> str | None:
    """The newest version older than the one in use (None: back to the base model)."""
    now = current(data_dir, companion_id)
    if now is None:
        raise FinetuneError(f"companion {companion_id!r} uses no adapter; nothing to roll back")
    older = [v for v in versions(data_dir, companion_id) if int(v[1:]) < int(now[1:])]
    return older[-1] if older else None

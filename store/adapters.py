"""Versioned LoRA adapters: `<data>/adapters/<companion>/<version>/`, and which one is in use.

Each version holds the adapter in PEFT format (`adapter_model.safetensors`,
`adapter_config.json`) and `manifest.json`: the base model and the SHA-256 of its weights,
the dataset's hash and size, the config and the metrics. An adapter is only ever used on
the base model it was trained on, and only as safetensors whose every tensor fits one of
that model's layers (verify): a folder with pickled weights is refused, and so is one vLLM
could not load. `CURRENT` in the companion's folder names the version in use.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from store.files import feed, write_whole

# The LoRA ranks vLLM serves (vllm/lora: max_lora_rank must be one of these); finetune.config
# refuses any other for a training.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
VERSION = re.compile(r"v([1-9]\d{0,8})")
# A companion's storage key: a shared id, or a user's own as OWNER.ID (store.companions).
COMPANION_KEY = re.compile(r"(?:[a-z0-9][a-z0-9_-]{0,31}\.)?[a-z0-9][a-z0-9_-]{0,63}")


# PEFT's name for a LoRA factor: base_model.model.<the base model's module>.lora_A.weight
LORA_TENSOR = re.compile(r"base_model\.model\.(?P<module>[\w.]+)\.lora_(?P<factor>[AB])\.weight")
LORA_DTYPES = ("F32", "F16", "BF16")


class AdapterError(ValueError):
    """An adapter version or the registry is not as it must be; the message says what and where."""


@dataclass(frozen=True)
class Base:
    """The model adapters must fit: the SHA-256 of its weights, the shape (out, in) of each of
    its linear layers by module name, and the largest rank the engine is started to accept."""

    sha256: str
    shapes: dict[str, tuple[int, int]]
    max_rank: int = max(VLLM_RANKS)

    @classmethod
    def of(cls, model_dir: Path, max_rank: int = max(VLLM_RANKS)) -> Base:
        """Read from the model's safetensors headers (no weights are loaded)."""
        shapes = {}
        for name, (shape, _) in _tensors(sorted(model_dir.glob("*.safetensors"))).items():
            if name.endswith(".weight") and len(shape) == 2:
                shapes[name.removesuffix(".weight")] = (shape[0], shape[1])
        return cls(model_sha256(model_dir), shapes, max_rank)


def _tensors(files: list[Path], label: str = "") -> dict[str, tuple[list[int], str]]:
    """{name: (shape, dtype)} from safetensors headers, which safetensors checks whole."""
    found = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as weights:
                for name in weights.keys():  # noqa: SIM118 (a safe_open handle is no dict)
                    piece = weights.get_slice(name)
                    found[name] = (piece.get_shape(), piece.get_dtype())
        except (SafetensorError, OSError) as err:
            raise AdapterError(f"{label or path}: not a readable safetensors file ({err})") from err
    return found


def checked_version(version: object, where: str = "version") -> str:
    """`version` if it is v1, v2, ... and nothing else: it becomes a folder name."""
    if not isinstance(version, str) or not VERSION.fullmatch(version):
        raise AdapterError(f"{where}: {version!r} is not an adapter version; versions are named "
                            "v1, v2, ... (see `homefire adapter list`)")
    return version


def adapters_dir(data_dir: Path, companion_id: str) -> Path:
    if not COMPANION_KEY.fullmatch(companion_id):
        raise AdapterError(f"{companion_id!r} is not a companion id")
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
        raise AdapterError(f"companion {companion_id!r} has no adapter {version!r} "
                            f"(versions: {known})") from None
    except ValueError as err:
        # Named by companion and version, never by path: members read this message too.
        raise AdapterError(f"adapter {companion_id}/{version}: manifest.json is not valid JSON "
                            f"({err})") from err


def model_sha256(model_dir: Path) -> str:
    """SHA-256 over the model's safetensors weights, cached beside them by size and time."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise AdapterError(f"{model_dir}: no safetensors weights to identify the base model by")
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
            feed(digest, stream)
    try:
        cache.write_text(json.dumps({"files": stamp, "sha256": digest.hexdigest()}))
    except OSError:
        pass   # a read-only model directory: hash again next time
    return digest.hexdigest()


def verify(path: Path, base: Base | None, label: str | None = None) -> dict:
    """The adapter's manifest, once it is known to load on this base model: its files, its
    config (rank within the engine's limit), its manifest's base model, and every tensor's
    name, shape and dtype against the base model's layers. What vLLM would refuse at start is
    refused here, before the engine ever sees it. `label` names it in messages (default: the
    companion's folder and the version's)."""
    label = label or f"adapter {path.parent.name}/{path.name}"
    if pickled := [p.name for p in path.iterdir() if p.suffix in PICKLES]:
        raise AdapterError(f"{label}: refusing pickled weights ({', '.join(pickled)}); only "
                            "safetensors adapters are loaded")
    for needed in ("adapter_model.safetensors", "adapter_config.json", "manifest.json"):
        if not (path / needed).is_file():
            raise AdapterError(f"{label}: {needed} is missing")
    config = read_object(path / "adapter_config.json", f"{label}: adapter_config.json")
    rank = config.get("r")
    if rank not in VLLM_RANKS:
        raise AdapterError(f"{label}: rank {rank!r} cannot be served by vLLM")
    if config.get("modules_to_save") or config.get("use_dora"):
        raise AdapterError(f"{label}: modules_to_save and DoRA cannot be served by vLLM")
    if config.get("rank_pattern"):
        raise AdapterError(f"{label}: per-module ranks (rank_pattern) are not served; train with one rank")
    info = read_object(path / "manifest.json", f"{label}: manifest.json")
    trained_on = info.get("base_model")
    trained_on = trained_on if isinstance(trained_on, dict) else {}
    if base is None:
        raise AdapterError(f"{label}: the running base model cannot be identified (no local "
                            "safetensors), so its adapters cannot be checked against it")
    if trained_on.get("sha256") != base.sha256:
        raise AdapterError(f"{label} was trained on base model {trained_on.get('id')!r} "
                            f"(weights {str(trained_on.get('sha256'))[:12]}), but this server runs "
                            f"weights {base.sha256[:12]}; train it again on this model")
    if rank > base.max_rank:
        raise AdapterError(f"{label}: rank {rank} is above the engine's limit (engine.max_lora_rank: "
                            f"{base.max_rank})")
    _check_tensors(path / "adapter_model.safetensors", config, base, label)
    return info


def read_object(path: Path, label: str) -> dict:
    """A JSON file that must hold an object; anything else is a AdapterError naming it."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise AdapterError(f"{label}: not valid JSON ({err})") from err
    if not isinstance(found, dict):
        raise AdapterError(f"{label}: must be a JSON object, not {type(found).__name__}")
    return found


def _check_tensors(weights: Path, config: dict, base: Base, label: str) -> None:
    """Each tensor a LoRA factor of a targeted linear layer of the base model, of the config's
    rank, in a float dtype; each layer with both factors."""
    targets = config.get("target_modules")
    rank = config["r"]
    factors: dict[str, set[str]] = {}
    for name, (shape, dtype) in _tensors([weights], f"{label}: adapter_model.safetensors").items():
        where = f"{label}: tensor {name!r}"
        found = LORA_TENSOR.fullmatch(name)
        if found is None:
            raise AdapterError(f"{where} is not a LoRA factor (base_model.model.MODULE.lora_A/B.weight)")
        module = found["module"]
        if module not in base.shapes:
            raise AdapterError(f"{where} names no linear layer of the base model")
        if not _targeted(module, targets):
            raise AdapterError(f"{where} is outside the config's target_modules {targets!r}")
        if dtype not in LORA_DTYPES:
            raise AdapterError(f"{where} has dtype {dtype}; adapters are {', '.join(LORA_DTYPES)}")
        out, into = base.shapes[module]
        expected = [rank, into] if found["factor"] == "A" else [out, rank]
        if list(shape) != expected:
            raise AdapterError(f"{where} has shape {list(shape)}; rank {rank} on that layer needs "
                                f"{expected}")
        factors.setdefault(module, set()).add(found["factor"])
    if not factors:
        raise AdapterError(f"{label}: adapter_model.safetensors holds no LoRA weights")
    if half := sorted(m for m, f in factors.items() if f != {"A", "B"}):
        raise AdapterError(f"{label}: layer {half[0]} has only one of its two LoRA factors")


def _targeted(module: str, targets: object) -> bool:
    """PEFT's rule: a string is a pattern the whole module name matches; a list names modules
    by their last parts."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if isinstance(targets, list):
        return any(module == t or module.endswith(f".{t}") for t in targets if isinstance(t, str))
    return False


def current(data_dir: Path, companion_id: str) -> str | None:
    path = adapters_dir(data_dir, companion_id) / "CURRENT"
    try:
        version = path.read_text().strip() or None
    except FileNotFoundError:
        return None
    return version and checked_version(version, f"adapter {companion_id}/CURRENT")


def set_current(data_dir: Path, companion_id: str, version: str | None) -> None:
    root = adapters_dir(data_dir, companion_id)
    if version is not None:
        checked_version(version)
    root.mkdir(parents=True, exist_ok=True)
    write_whole(root / "CURRENT", version or "")


def previous(data_dir: Path, companion_id: str) -> str | None:
    """The newest version older than the one in use (None: back to the base model)."""
    now = current(data_dir, companion_id)
    if now is None:
        raise AdapterError(f"companion {companion_id!r} uses no adapter; nothing to roll back")
    older = [v for v in versions(data_dir, companion_id) if int(v[1:]) < int(now[1:])]
    return older[-1] if older else None

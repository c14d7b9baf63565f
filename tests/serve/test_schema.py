"""Schemathesis against our OpenAPI schema, with a valid key: no 5xx, no schema violations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def test_the_api_holds_to_its_schema_under_generated_requests(make_server, tmp_path):
    # No request rate limit: the fuzzer sends hundreds of requests a minute, and 429 is not
    # what this test is about (test_limits is).
    # Short replies: every generated request that reaches the engine (messages, regenerate,
    # chat completions) costs a reply, and the schema is what is tested, not the replies.
    companions = tmp_path / "companions"
    companions.mkdir()
    ember = yaml.safe_load((REPO / "configs" / "companions" / "ember.yaml").read_text())
    ember["sampling"]["max_tokens"] = 8
    (companions / "ember.yaml").write_text(yaml.safe_dump(ember))
    server = make_server(engine="shared", config={"limits": {"requests_per_minute": 0},
                                 "companions_dir": str(companions)}).start()
    # Real ids for the id routes, so generated requests reach more than the 404 (companion
    # ids stay generated; the schema's examples name ember).
    with server.http() as http:
        conversation = http.post("/api/v1/conversations", json={"companion": "ember"}).json()
        fact = http.post("/api/v1/companions/ember/memories", json={"text": "I like tea."}).json()
    config = tmp_path / "schemathesis.toml"
    config.write_text(f'[parameters]\nconversation_id = "{conversation["conversation"]["id"]}"\n'
                      f'memory_id = {fact["id"]}\n')
    schema = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    assert len(schema["paths"]) >= 15
    # 8 generated requests per operation (SCHEMA_EXAMPLES raises it), after every schema example
    # and every boundary value of the coverage phase: about 2 minutes on the CI machine.
    # One worker: with two, hypothesis parsed lambdas' source in both threads at once and
    # CPython 3.11.7 raised "AST constructor recursion depth mismatch" (gh-106905) in CI.
    done = subprocess.run(
        [str(SCHEMATHESIS), "--config-file", str(config), "run", f"{server.url}/openapi.json",
         "--header", f"Authorization: Bearer {server.key}",
         "--checks", "not_a_server_error,response_schema_conformance,content_type_conformance",
         "--phases", "examples,coverage,fuzzing", "--max-examples", os.environ.get("SCHEMA_EXAMPLES", "8"),
         "--seed", "7", "--workers", "1", "--request-timeout", "120", "--generation-database", "none",
         "--no-color"],
        capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    summary = done.stdout[-8000:]
    assert done.returncode == 0, summary + done.stderr[-2000:]
    assert " passed" in summary and "Tested: " in summary
    assert server.proc.poll() is None, "the server died under generated requests"
    assert "Traceback" not in server.log_tail(100000)

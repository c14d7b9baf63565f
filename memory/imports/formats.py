"""Claude.ai, Character.AI (CAI Tools), SillyTavern and plain JSONL exports, and detection."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import ijson

from memory.imports import chatgpt
from memory.imports.model import Imported, Notes, Turn, to_epoch
from memory.imports.source import ImportFailed, Member, json_items

ST_HEADER_KEYS = {"user_name", "character_name", "chat_metadata", "create_date"}


def fingerprint(*parts: object) -> str:
    """A stable id for conversations their format leaves without one."""
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:24]


# -- Claude.ai ------------------------------------------------------------------------------

def read_claude(member: Member, notes: Notes) -> Iterator[Imported]:
    for index, conv in enumerate(json_items(member, "item")):
        if not isinstance(conv, dict) or not isinstance(conv.get("chat_messages"), list):
            raise ImportFailed(member.label, f"conversation {index + 1} has no 'chat_messages' list; "
                                             "is this a Claude export?")
        messages = [m for m in conv["chat_messages"] if isinstance(m, dict)]
        by_id = {m.get("uuid"): m for m in messages}
        if messages and all("parent_message_uuid" in m for m in messages):
            # A branched conversation: keep the thread that ends in the newest message.
            thread, node, seen = [], messages[-1], set()
            while node is not None and node.get("uuid") not in seen:
                seen.add(node.get("uuid"))
                thread.append(node)
                node = by_id.get(node.get("parent_message_uuid"))
            notes.dropped["abandoned branches"] += len(messages) - len(thread)
            messages = thread[::-1]
        turns = []
        for m in messages:
            role = {"human": "user", "assistant": "assistant"}.get(m.get("sender"))
            notes.attachments += len(m.get("attachments") or ()) + len(m.get("files") or ())
            text = _claude_text(m, notes)
            if role is None:
                notes.dropped[f"{m.get('sender')} messages"] += 1
            elif not text.strip():
                notes.dropped["empty"] += 1
            else:
                turns.append(Turn(role, text, to_epoch(m.get("created_at"))))
        conv_id = str(conv.get("uuid") or fingerprint(conv.get("name"), conv.get("created_at")))
        yield Imported(conv_id, conv.get("name") or None, "claude", to_epoch(conv.get("created_at")), turns)


def _claude_text(message: dict, notes: Notes) -> str:
    blocks = message.get("content")
    if not isinstance(blocks, list) or not blocks:
        return message.get("text") or ""
    texts = []
    for block in blocks:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            if block.get("text"):
                texts.append(block["text"])
        elif kind in ("image", "document", "file"):
            notes.attachments += 1
        else:   # thinking, tool_use, tool_result: machinery
            notes.dropped[str(kind)] += 1
    return "\n".join(texts)


# -- Character.AI, as saved by the CAI Tools extension -------------------------------------------

def read_characterai(member: Member, notes: Notes) -> Iterator[Imported]:
    for index, history in enumerate(json_items(member, "histories.histories.item")):
        msgs = history.get("msgs") if isinstance(history, dict) else None
        if not isinstance(msgs, list):
            raise ImportFailed(member.label, f"history {index + 1} has no 'msgs' list")
        turns, character = [], None
        for m in msgs:
            src = m.get("src") if isinstance(m, dict) else None
            if not isinstance(src, dict):
                notes.dropped["malformed"] += 1
                continue
            if m.get("is_alternative"):
                notes.dropped["other swipes"] += 1
                continue
            text = m.get("text") or ""
            if not text.strip():
                notes.dropped["empty"] += 1
                continue
            if not src.get("is_human"):
                character = character or src.get("name")
            turns.append(Turn("user" if src.get("is_human") else "assistant", text,
                              to_epoch(m.get("created") or m.get("create_time"))))
        created = to_epoch(history.get("created") or history.get("create_time"))
        if created is None and turns:
            created = turns[0].created_at
        conv_id = str(history.get("external_id") or fingerprint(
            [(t.role, t.content) for t in turns[:4]], created))
        yield Imported(conv_id, character, "characterai", created, turns)


# -- SillyTavern chat files and plain JSONL: one JSON value a line ----------------------------

def json_lines(member: Member) -> Iterator[tuple[int, object]]:
    with member.open() as raw:
        for number, line in enumerate(raw, start=1):
            member.done += len(line)
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except UnicodeDecodeError as err:
                raise ImportFailed(member.label, f"line {number}: not UTF-8 text (byte {err.start} of "
                                                 "the line)") from None
            except json.JSONDecodeError as err:
                raise ImportFailed(member.label, f"line {number}, column {err.colno}: invalid JSON: "
                                                 f"{err.msg}") from None


def read_sillytavern(member: Member, notes: Notes) -> Iterator[Imported]:
    header: dict = {}
    turns = []
    for number, entry in json_lines(member):
        if not isinstance(entry, dict):
            raise ImportFailed(member.label, f"line {number}: expected a JSON object")
        if "mes" not in entry and ST_HEADER_KEYS & entry.keys():
            header = entry
            continue
        if entry.get("is_system"):
            notes.dropped["system messages"] += 1
            continue
        text, swipes, chosen = entry.get("mes"), entry.get("swipes"), entry.get("swipe_id")
        if isinstance(swipes, list) and isinstance(chosen, int) and 0 <= chosen < len(swipes):
            text = swipes[chosen]
            notes.dropped["other swipes"] += len(swipes) - 1
        if not isinstance(text, str) or not text.strip():
            notes.dropped["empty"] += 1
            continue
        name = entry.get("name") if isinstance(entry.get("name"), str) else None
        turns.append(Turn("user" if entry.get("is_user") else "assistant", text,
                          to_epoch(entry.get("send_date")), None if entry.get("is_user") else name))
    created = to_epoch(header.get("create_date")) or (turns[0].created_at if turns else None)
    # A group chat's file has no character_name (its first line is chat_metadata alone); one
    # character's names it, and its replies are that character's whatever name they carry.
    name = header.get("character_name")
    if name:
        for turn in turns:
            turn.speaker = None
    characters = list(dict.fromkeys(t.speaker for t in turns if t.speaker))
    name = name or (", ".join(characters) if len(characters) > 1 else None)
    conv_id = fingerprint(name, header.get("create_date"), [(t.role, t.content) for t in turns[:2]])
    title = f"{name} ({header['create_date']})" if name and header.get("create_date") else name
    yield Imported(conv_id, title, "sillytavern", created, turns)


def read_jsonl(member: Member, notes: Notes) -> Iterator[Imported]:
    for number, entry in json_lines(member):
        messages = entry.get("messages") if isinstance(entry, dict) else None
        if not isinstance(messages, list):
            raise ImportFailed(member.label, f'line {number}: expected {{"messages": [...]}}')
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ImportFailed(member.label, f"line {number}: message {i + 1} needs a 'role'")
            text = _parts_text(m.get("content"), notes)
            if m["role"] == "system":
                notes.suggest(persona=text)
                notes.dropped["system messages"] += 1
            elif m["role"] not in ("user", "assistant"):
                notes.dropped[f"{m['role']} messages"] += 1
            elif not text.strip():
                notes.dropped["empty"] += 1
            else:
                turns.append(Turn(m["role"], text, to_epoch(m.get("created_at") or m.get("timestamp"))))
        conv_id = str(entry.get("id") or fingerprint([(t.role, t.content) for t in turns]))
        yield Imported(conv_id, entry.get("title"), "jsonl", to_epoch(entry.get("created_at")), turns)


def _parts_text(content: object, notes: Notes) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for part in content if isinstance(content, list) else ():
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, str):
            texts.append(part)
        else:
            notes.attachments += 1
    return "\n".join(texts)


# -- detection ---------------------------------------------------------------------------------

READERS = {"chatgpt": chatgpt.read, "claude": read_claude, "characterai": read_characterai,
           "sillytavern": read_sillytavern, "jsonl": read_jsonl}
FORMATS = tuple(READERS)


def sniff(member: Member) -> str | None:
    """The format of one file from its first record, or None."""
    with member.open() as raw:
        head = raw.read(1 << 16)
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    named_jsonl = member.name.lower().endswith(".jsonl")
    if named_jsonl or text[:1] == b"{":
        # A record a line; also a file of one line (an upload's name says nothing), unless
        # that one line is a JSON export of another kind (judged below).
        try:
            entry = json.loads(text.split(b"\n", 1)[0])
        except (json.JSONDecodeError, UnicodeDecodeError):
            entry = None
        if isinstance(entry, dict) and "messages" in entry:
            return "jsonl"
        if isinstance(entry, dict) and (ST_HEADER_KEYS | {"mes", "is_user"}) & entry.keys():
            return "sillytavern"
        if named_jsonl or b"\n{" in text:
            return None
    if text[:1] not in (b"[", b"{"):
        return None
    # Push the sample into the parser without ending it: a first record larger than the
    # sample is judged by the keys seen so far.
    events = ijson.sendable_list()
    try:
        ijson.parse_coro(events).send(head)
    except ijson.JSONError:
        pass
    keys = set()
    for prefix, event, value in events:
        if event == "map_key" and prefix in ("item", ""):
            keys.add(value)
        if event == "end_map" and prefix == "item":
            break
    if "mapping" in keys:
        return "chatgpt"
    if "chat_messages" in keys:
        return "claude"
    if "histories" in keys:
        return "characterai"
    return None


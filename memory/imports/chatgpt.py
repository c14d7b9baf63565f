"""ChatGPT's data export: `conversations.json`, alone or in the downloaded zip.

Each conversation is a tree (`mapping`) of nodes; regenerated replies and edited turns are
branches. `current_node` is the leaf of the thread the user last saw: the path from it to
the root is what we keep. Only user and assistant text the user saw is imported.
"""

from __future__ import annotations

from collections.abc import Iterator

from memory.imports.model import Imported, Notes, Turn, to_epoch
from memory.imports.source import ImportFailed, Member, json_items

KEPT_CONTENT = {"text", "multimodal_text"}   # code, execution_output, thoughts, browsing: machinery


def read(member: Member, notes: Notes) -> Iterator[Imported]:
    for index, conv in enumerate(json_items(member, "item")):
        where = f"conversation {index + 1}"
        if not isinstance(conv, dict) or not isinstance(conv.get("mapping"), dict):
            raise ImportFailed(member.label, f"{where} has no 'mapping' object; is this a ChatGPT export?")
        conv_id = str(conv.get("conversation_id") or conv.get("id") or "")
        if not conv_id:
            raise ImportFailed(member.label, f"{where} has no 'id'")
        mapping = conv["mapping"]
        thread = _thread(mapping, conv.get("current_node"), member.label, f"{where} ({conv_id})")
        kept = set(thread)
        notes.dropped["abandoned branches"] += sum(
            1 for node_id, node in mapping.items()
            if node_id not in kept and isinstance(node, dict) and node.get("message"))
        turns = [turn for node_id in reversed(thread)
                 if (turn := _turn(mapping[node_id].get("message"), notes)) is not None]
        yield Imported(conv_id, conv.get("title"), "chatgpt", to_epoch(conv.get("create_time")), turns)


def _thread(mapping: dict, leaf: object, label: str, where: str) -> list[str]:
    """Node ids from the visible leaf up to the root."""
    if leaf not in mapping:
        # No (or a dangling) current_node: follow the newest child from the root down.
        roots = [k for k, n in mapping.items() if isinstance(n, dict) and n.get("parent") not in mapping]
        leaf = roots[0] if roots else None
        while leaf is not None and (children := [c for c in mapping[leaf].get("children") or ()
                                                 if c in mapping]):
            leaf = children[-1]
    path, seen = [], set()
    while leaf is not None:
        if leaf in seen:
            raise ImportFailed(label, f"{where}: its message tree has a cycle at node {leaf!r}")
        node = mapping.get(leaf)
        if not isinstance(node, dict):
            raise ImportFailed(label, f"{where}: node {leaf!r} is named as a parent but missing")
        seen.add(leaf)
        path.append(leaf)
        leaf = node.get("parent")
    return path


def _turn(message: object, notes: Notes) -> Turn | None:
    if not isinstance(message, dict):
        return None
    content = message.get("content") or {}
    metadata = message.get("metadata") or {}
    kind = content.get("content_type")
    role = (message.get("author") or {}).get("role")
    if kind == "user_editable_context":   # custom instructions, current form
        notes.suggest(content.get("user_instructions"), content.get("user_profile"))
        notes.dropped["custom instructions"] += 1
        return None
    if metadata.get("is_user_system_message"):   # custom instructions, older form
        context = metadata.get("user_context_message_data") or {}
        notes.suggest(context.get("about_model_message") or _text(content, notes),
                      context.get("about_user_message"))
        notes.dropped["custom instructions"] += 1
        return None
    if metadata.get("is_visually_hidden_from_conversation"):
        reason = "hidden"
    elif role not in ("user", "assistant"):
        reason = f"{role or 'unknown'} messages"
    elif role == "assistant" and message.get("recipient") not in (None, "all"):
        reason = "addressed to a tool"
    elif message.get("channel") not in (None, "final"):
        reason = f"{message['channel']} channel"
    elif kind not in KEPT_CONTENT:
        reason = str(kind)
    else:
        text = _text(content, notes)
        if text.strip():
            return Turn(role, text, to_epoch(message.get("create_time")))
        reason = "empty"
    notes.dropped[reason] += 1
    return None


def _text(content: dict, notes: Notes) -> str:
    texts = []
    for part in content.get("parts") or ():
        if isinstance(part, str):
            if part:
                texts.append(part)
        elif isinstance(part, dict) and part.get("content_type") == "audio_transcription":
            if part.get("text"):
                texts.append(part["text"])
        elif isinstance(part, dict):
            notes.attachments += 1   # images, files, audio: nothing to read as text
    return "\n".join(texts)

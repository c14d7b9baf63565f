"""Real export files as the services write them, with the hard cases, for import tests."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

from PIL import Image, PngImagePlugin

T0 = 1_700_000_000.0


class ChatGPTTree:
    """A ChatGPT `mapping` built node by node; `add` returns the new node's id."""

    def __init__(self, conv_id: str, title: str):
        self.conv_id, self.title = conv_id, title
        self.mapping = {"root": {"id": "root", "message": None, "parent": None, "children": []}}
        self.current = "root"

    def add(self, parent: str, role: str, parts: list | None = None, content_type: str = "text",
            recipient: str = "all", metadata: dict | None = None, content: dict | None = None,
            node_id: str | None = None) -> str:
        node_id = node_id or f"{self.conv_id}-n{len(self.mapping)}"
        message = {
            "id": node_id, "author": {"role": role, "name": None, "metadata": {}},
            "create_time": T0 + len(self.mapping), "update_time": None,
            "content": content or {"content_type": content_type, "parts": parts or []},
            "status": "finished_successfully", "end_turn": True, "weight": 1.0,
            "metadata": metadata or {}, "recipient": recipient, "channel": None,
        }
        self.mapping[node_id] = {"id": node_id, "message": message, "parent": parent, "children": []}
        self.mapping[parent]["children"].append(node_id)
        self.current = node_id
        return node_id

    def say(self, *turns: tuple[str, str]) -> str:
        """Append plain turns (role, text) under the current node."""
        for role, text in turns:
            self.add(self.current, role, [text])
        return self.current

    def export(self) -> dict:
        return {"title": self.title, "create_time": T0, "update_time": T0 + 999,
                "mapping": self.mapping, "moderation_results": [], "current_node": self.current,
                "id": self.conv_id, "conversation_id": self.conv_id, "default_model_slug": "gpt-4o"}


def chatgpt_hard() -> tuple[list[dict], list[dict]]:
    """Conversations with every hard case, and the messages a correct import keeps."""
    t = ChatGPTTree("c-hard", "Cats and code")
    t.add("root", "system", [""], metadata={"is_visually_hidden_from_conversation": True})
    t.add(t.current, "user", content={"content_type": "user_editable_context",
                                      "user_profile": "I live in Porto and I have a cat called Miso.",
                                      "user_instructions": "Be warm and brief. Call me Sam."},
          metadata={"is_visually_hidden_from_conversation": True})
    hi = t.add(t.current, "user", ["Hi! Are you there?"])
    t.add(hi, "assistant", ["First draft of a reply (regenerated away)."])
    kept = t.add(hi, "assistant", ["I'm here, Sam."])
    t.add(kept, "user", ["What was my old question?"])                  # edited away...
    t.add(t.current, "assistant", ["An answer to the abandoned question."])
    t.add(kept, "user", ["Can you look up the weather in Porto?"])    # ...for this one
    t.add(t.current, "assistant", parts=["search('weather Porto')"], content_type="code", recipient="browser")
    t.add(t.current, "tool", ["Sunny, 21C"], content_type="execution_output")
    t.add(t.current, "assistant", ["thinking about it"], content_type="thoughts")
    t.add(t.current, "assistant", ["Thought for 2 seconds"], content_type="reasoning_recap")
    t.add(t.current, "assistant", ["It is sunny in Porto,", "about 21 degrees."])  # multi-part
    t.add(t.current, "user", content_type="multimodal_text", parts=[
        {"content_type": "image_asset_pointer", "asset_pointer": "file-service://file-1", "width": 64},
        "Look at Miso 🐱 她是我的猫"])
    t.add(t.current, "assistant", ["可爱！Miso looks very happy 🐱"])
    t.add(t.current, "assistant", ["(hidden follow-up)"],
          metadata={"is_visually_hidden_from_conversation": True})
    t.add(t.current, "assistant", [""])
    t.add(t.current, "assistant", ["error"], content_type="system_error")
    expected = [("user", "Hi! Are you there?"), ("assistant", "I'm here, Sam."),
                ("user", "Can you look up the weather in Porto?"),
                ("assistant", "It is sunny in Porto,\nabout 21 degrees."),
                ("user", "Look at Miso 🐱 她是我的猫"), ("assistant", "可爱！Miso looks very happy 🐱")]

    empty = ChatGPTTree("c-empty", "Nothing here")
    empty.add("root", "system", [""], metadata={"is_visually_hidden_from_conversation": True})

    old_style = ChatGPTTree("c-old", "Older custom instructions")
    old_style.add("root", "user", [""], metadata={
        "is_user_system_message": True, "is_visually_hidden_from_conversation": True,
        "user_context_message_data": {"about_user_message": "I play the cello.",
                                      "about_model_message": "Answer like a friend."}})
    old_style.say(("user", "Good morning"), ("assistant", "Good morning to you!"))
    convs = [t.export(), empty.export(), old_style.export()]
    return convs, [{"id": "c-hard", "messages": expected},
                   {"id": "c-old", "messages": [("user", "Good morning"),
                                                ("assistant", "Good morning to you!")]}]


def chatgpt_simple(conv_id: str, *turns: tuple[str, str], title: str = "Chat") -> dict:
    tree = ChatGPTTree(conv_id, title)
    tree.say(*turns)
    return tree.export()


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def chatgpt_zip(path: Path, conversations: list[dict]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("conversations.json", json.dumps(conversations, ensure_ascii=False))
        z.writestr("chat.html", "<html><body>your chats</body></html>")
        z.writestr("user.json", json.dumps({"id": "user-1", "email": "sam@example.com"}))
        z.writestr("file-1.png", b"\x89PNG\r\n\x1a\n" + bytes(200))
    return path


def claude_export() -> list[dict]:
    return [
        {"uuid": "cl-1", "name": "Bread", "created_at": "2024-03-01T10:00:00.000000Z",
         "updated_at": "2024-03-01T10:05:00Z", "account": {"uuid": "acc"},
         "chat_messages": [
             {"uuid": "m1", "sender": "human", "text": "How do I start a sourdough starter?",
              "content": [{"type": "text", "text": "How do I start a sourdough starter?"}],
              "created_at": "2024-03-01T10:00:00Z", "attachments": [], "files": []},
             {"uuid": "m2", "sender": "assistant", "text": "ignored when content is present",
              "content": [{"type": "thinking", "thinking": "The user wants bread."},
                          {"type": "text", "text": "Mix flour and water 🍞"},
                          {"type": "tool_use", "name": "web_search", "input": {"q": "starter"}},
                          {"type": "tool_result", "content": [{"type": "text", "text": "results"}]},
                          {"type": "text", "text": "and wait a week."}],
              "created_at": "2024-03-01T10:00:05Z", "attachments": [], "files": []},
             {"uuid": "m3", "sender": "human", "text": "谢谢！",
              "created_at": "2024-03-01T10:01:00Z",
              "attachments": [{"file_name": "notes.txt", "extracted_content": "flour"}], "files": []},
         ]},
        {"uuid": "cl-empty", "name": "", "created_at": "2024-03-02T10:00:00Z", "chat_messages": []},
    ]


def cai_export() -> dict:
    return {"info": {"character": {"name": "Luna", "external_id": "char-1"}},
            "histories": {"histories": [
                {"external_id": "h-1", "created": "2023-05-01T20:00:00Z", "msgs": [
                    {"src": {"name": "Luna", "is_human": False}, "text": "Hello, traveller ✨"},
                    {"src": {"name": "Sam", "is_human": True}, "text": "Hi Luna"},
                    {"src": {"name": "Luna", "is_human": False}, "text": "Another swipe",
                     "is_alternative": True},
                    {"src": {"name": "Luna", "is_human": False}, "text": "Where are you headed?"},
                ]},
                {"external_id": "h-2", "msgs": []},
            ]}}


def sillytavern_chat(path: Path) -> Path:
    lines = [
        {"user_name": "Sam", "character_name": "Seraphina", "create_date": "2023-8-10 @12h 34m 56s 789ms",
         "chat_metadata": {"note_prompt": ""}},
        {"name": "Seraphina", "is_user": False, "is_system": False, "send_date": "August 10, 2023 12:35pm",
         "mes": "Welcome to the glade.", "extra": {}},
        {"name": "Sam", "is_user": True, "is_system": False, "send_date": "August 10, 2023 12:36pm",
         "mes": "Thank you. Where am I?", "extra": {}},
        {"name": "Seraphina", "is_user": False, "is_system": False, "send_date": "2023-08-10T12:37:00.000Z",
         "mes": "You are safe here 🌿", "swipe_id": 1,
         "swipes": ["A first swipe.", "You are safe here 🌿", "A third swipe."], "extra": {}},
        {"name": "System", "is_user": False, "is_system": True, "send_date": 1691671080000,
         "mes": "[Sam has joined]", "extra": {}},
    ]
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8")
    return path


def sillytavern_group_chat(path: Path, characters: tuple[str, ...] = ("Fox", "Owl")) -> Path:
    """A SillyTavern group chat: a chat_metadata line, then replies by several characters (a
    reply's `name` says whose), the user's messages between them."""
    lines: list[dict] = [{"chat_metadata": {"integrity": "3c1b", "note_prompt": ""}}]
    said = ["We lit the lamps in the orchard.", "I counted forty-two fireflies.", "The pears are ripe."]
    lines.append({"name": "Sam", "is_user": True, "send_date": "June 1, 2024 8:01pm",
                  "mes": "My sister Juniper planted the orchard.", "extra": {}})
    for i, name in enumerate(characters):
        lines.append({"name": name, "is_user": False, "send_date": f"June 1, 2024 8:0{i + 2}pm",
                      "mes": said[i % len(said)], "original_avatar": f"{name}.png", "extra": {}})
    lines.append({"name": "Sam", "is_user": True, "send_date": "June 1, 2024 8:09pm",
                  "mes": f"{characters[-1]}, what else?", "extra": {}})
    lines.append({"name": characters[-1], "is_user": False, "send_date": "June 1, 2024 8:10pm",
                  "mes": "Only the owls stayed up late.", "swipe_id": 0,
                  "swipes": ["Only the owls stayed up late."]})
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8")
    return path


def jsonl_export(path: Path) -> Path:
    lines = [
        {"id": "j-1", "title": "Plans", "messages": [
            {"role": "system", "content": "You are Ember, a gentle companion."},
            {"role": "user", "content": "Shall we plan the weekend?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Yes!"},
                                               {"type": "text", "text": "A walk by the sea?"}]},
            {"role": "tool", "content": "calendar: free"}]},
        {"messages": [{"role": "user", "content": "No id here"},
                      {"role": "assistant", "content": "Still fine"}]},
        {"messages": [{"role": "system", "content": "only a system prompt"}]},
    ]
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8")
    return path


def card_png(card: dict) -> bytes:
    """A 4 x 4 PNG Character Card with `card` in its chara chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("chara", base64.b64encode(json.dumps(card).encode()).decode())
    out = io.BytesIO()
    Image.new("RGB", (4, 4), "orange").save(out, "PNG", pnginfo=info)
    return out.getvalue()

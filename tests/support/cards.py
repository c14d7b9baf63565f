"""Character Cards as tests need them: a full V2 card, and a PNG bomb that carries one."""

from __future__ import annotations

import base64
import json
import struct
import zlib

V2 = {"spec": "chara_card_v2", "spec_version": "2.0",
      "data": {"name": "Luna", "description": "{{char}} is a night owl.", "personality": "calm",
               "scenario": "a rooftop", "first_mes": "Hi {{user}}", "mes_example": "<START>",
               "system_prompt": "Be Luna.", "post_history_instructions": "Stay calm.",
               "alternate_greetings": ["Evening!"], "tags": ["x"], "creator": "someone",
               "extensions": {"depth_prompt": {}}}}


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb(card: dict) -> bytes:
    """A 40000 x 40000 grayscale PNG (1.6 G pixels of zeros in a few KB), the card after its pixels."""
    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)
    row = b"\0" * 40001
    pixels = zlib.compressobj(9)
    idat = b"".join(pixels.compress(row) for _ in range(2000)) + pixels.flush()
    text = b"chara\0" + base64.b64encode(json.dumps(card).encode())
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"tEXt", text)
            + chunk(b"IEND", b""))


# -- lorebooks --------------------------------------------------------------------------------

def sillytavern_card(name: str, world: str, entries: dict[str, dict]) -> dict:
    """The card SillyTavern 1.12.6 writes for a character whose linked world info is `entries`
    (its world file's entries by uid): charaFormatData and convertWorldInfoToCharacterBook of
    src/endpoints/characters.js, field for field, in their order."""
    book = {"entries": [], "name": world}
    for entry in entries.values():
        book["entries"].append({
            "id": entry["uid"], "keys": entry["key"], "secondary_keys": entry["keysecondary"],
            "comment": entry["comment"], "content": entry["content"], "constant": entry["constant"],
            "selective": entry["selective"], "insertion_order": entry["order"],
            "enabled": not entry["disable"],
            "position": "before_char" if entry["position"] == 0 else "after_char",
            "extensions": {
                "position": entry["position"], "exclude_recursion": entry["excludeRecursion"],
                "display_index": entry["displayIndex"], "probability": entry.get("probability"),
                "useProbability": entry.get("useProbability", False), "depth": entry.get("depth", 4),
                "selectiveLogic": entry.get("selectiveLogic", 0), "group": entry.get("group", ""),
                "group_override": entry.get("groupOverride", False),
                "group_weight": entry.get("groupWeight"),
                "prevent_recursion": entry.get("preventRecursion", False),
                "delay_until_recursion": entry.get("delayUntilRecursion", False),
                "scan_depth": entry.get("scanDepth"), "match_whole_words": entry.get("matchWholeWords"),
                "use_group_scoring": entry.get("useGroupScoring", False),
                "case_sensitive": entry.get("caseSensitive"), "automation_id": entry.get("automationId", ""),
                "role": entry.get("role", 0), "vectorized": entry.get("vectorized", False),
                "sticky": entry.get("sticky"), "cooldown": entry.get("cooldown"), "delay": entry.get("delay"),
            },
        })
    description = "{{char}} is a healer in the forest of Eldoria."
    return {
        "name": name, "description": description, "personality": "kind", "scenario": "",
        "first_mes": "Hello.",
        "mes_example": "", "creatorcomment": "", "avatar": "none", "chat": f"{name} - 2024-10-20@12h00m00s",
        "talkativeness": "0.5", "fav": False, "tags": [], "spec": "chara_card_v2", "spec_version": "2.0",
        "data": {
            "name": name, "description": description, "personality": "kind", "scenario": "",
            "first_mes": "Hello.", "mes_example": "", "creator_notes": "", "system_prompt": "",
            "post_history_instructions": "", "tags": [], "creator": "", "character_version": "",
            "alternate_greetings": [],
            "extensions": {"talkativeness": "0.5", "fav": False, "world": world,
                           "depth_prompt": {"prompt": "", "depth": 4, "role": "system"}},
            "character_book": book,
        },
        "create_date": "2024-10-20@12h00m00s",
    }


def world_entry(uid: int, keys: list[str], content: str, **changes) -> dict:
    """An entry of a SillyTavern world file as its editor makes a new one (1.12.6 defaults)."""
    return {"uid": uid, "key": keys, "keysecondary": [], "comment": keys[0] if keys else "",
            "content": content, "constant": False, "vectorized": False, "selective": True,
            "selectiveLogic": 0, "addMemo": True, "order": 100, "position": 0, "disable": False,
            "excludeRecursion": False, "preventRecursion": False,
            "delayUntilRecursion": False, "probability": 100, "useProbability": True, "depth": 4, "group": "",
            "groupOverride": False, "groupWeight": 100, "scanDepth": None, "caseSensitive": None,
            "matchWholeWords": None, "useGroupScoring": None, "automationId": "", "role": None,
            "sticky": 0, "cooldown": 0, "delay": 0, "displayIndex": uid} | changes


SERAPHINA_WORLD = {str(e["uid"]): e for e in [
    world_entry(0, ["Eldoria", "forest"], "Eldoria is an ancient forest where the trees remember names."),
    world_entry(1, ["amulet"], "{{char}}'s amulet glows blue near danger.", position=1, order=50),
    world_entry(2, [], "{{char}} never lies to {{user}}.", constant=True, order=10),
    world_entry(3, ["/shadow ?wolf/i"], "Shadow wolves hunt only by moonlight.", keysecondary=["moon"],
                selectiveLogic=0),
    world_entry(4, ["river"], "The river Lethe makes travellers forget.", disable=True),
]}


def v3_card_with_decorators() -> dict:
    """A Character Card V3 whose book uses decorators, one of them not Homefire's."""
    entries = [
        {"keys": ["tea"], "content": "@@depth 2\n{{char}} brews jasmine tea at dusk.", "extensions": {},
         "enabled": True, "insertion_order": 10, "use_regex": False, "id": 1, "name": "tea"},
        {"keys": ["storm"],
         "content": "@@risu_weather rain\n@@@activate_only_after 2\nStorms come from the west.",
         "extensions": {"risu": {"x": 1}}, "enabled": True, "insertion_order": 20, "use_regex": False,
         "id": 2, "name": "storms", "priority": 5},
        {"keys": ["^lighthouse\\b"],
         "content": "@@exclude_keys ship\n@@is_greeting 1\nThe lighthouse is empty.",
         "extensions": {}, "enabled": True, "insertion_order": 30, "use_regex": True, "id": 3,
         "name": "lighthouse", "case_sensitive": False},
    ]
    return {"spec": "chara_card_v3", "spec_version": "3.0", "data": {
        "name": "Maris", "description": "{{char}} keeps the harbour.", "tags": [], "creator": "",
        "character_version": "", "mes_example": "", "extensions": {}, "system_prompt": "",
        "post_history_instructions": "", "first_mes": "Ahoy.", "alternate_greetings": [], "personality": "",
        "scenario": "", "creator_notes": "", "group_only_greetings": [],
        "character_book": {"name": "Harbour", "scan_depth": 3, "token_budget": 300,
                           "recursive_scanning": False, "extensions": {"homefire_test": True},
                           "entries": entries},
    }}


def png_with_chara(card: dict) -> bytes:
    """A PNG as SillyTavern writes a card: a picture and one `chara` tEXt chunk."""
    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    text = b"chara\0" + base64.b64encode(json.dumps(card).encode())
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0\0"))
            + chunk(b"tEXt", text) + chunk(b"IEND", b""))

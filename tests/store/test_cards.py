"""Character Card import from real JSON and PNG files."""

from __future__ import annotations

import base64
import io
import json
import zlib

import pytest
from PIL import Image, PngImagePlugin

from store.cards import card_json, card_png, parse_card, png_texts
from store.companions import CompanionError, CompanionStore
from store.db import Database
from store.lorebook import unsupported
from tests.support.cards import (
    SERAPHINA_WORLD,
    V2,
    bomb,
    chunk,
    png_with_chara,
    sillytavern_card,
    v3_card_with_decorators,
)


def png(chunks: dict[str, dict]) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, card in chunks.items():
        info.add_text(key, base64.b64encode(json.dumps(card).encode()).decode())
    out = io.BytesIO()
    Image.new("RGB", (2, 2)).save(out, "PNG", pnginfo=info)
    return out.getvalue()


def test_v2_json_keeps_every_persona_field():
    companion = parse_card(json.dumps(V2).encode())
    assert companion.id == "luna" and companion.name == "Luna"
    assert companion.post_history_instructions == "Stay calm."
    assert companion.alternate_greetings == ["Evening!"]


def test_png_prefers_the_v3_chunk():
    v3 = {"spec": "chara_card_v3", "spec_version": "3.0", "data": V2["data"] | {"name": "Luna Three"}}
    companion = parse_card(png({"chara": V2, "ccv3": v3}), "luna.png")
    assert companion.name == "Luna Three" and companion.id == "luna-three"


def test_v1_fields_are_mapped():
    v1 = {"name": "Old", "char_greeting": "yo", "char_persona": "gruff"}
    companion = parse_card(json.dumps(v1).encode())
    assert (companion.first_mes, companion.personality) == ("yo", "gruff")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'{"spec": "chara_card_v2", "data": {"name": "x",}', "bad.json: invalid JSON at line 1 column"),
        (b"\x89PNG\r\n\x1a\ngarbage", "bad.json: damaged PNG"),
        (b'{"spec": "chara_card_v9", "data": {}}', "unknown card spec 'chara_card_v9'"),
        (b'{"spec": "chara_card_v2", "data": {"description": "no name"}}', "has no 'name'"),
        (b'{"spec": "chara_card_v2", "data": {"name": "x", "first_mes": 5}}', "first_mes: Input should be"),
        (b"[1, 2]", "must be a JSON object"),
        (b"\xff\xfe\x00", "neither a PNG nor UTF-8 JSON"),
    ],
)
def test_bad_cards_say_what_and_where(content, words):
    with pytest.raises(CompanionError, match=None) as err:
        parse_card(content, "bad.json")
    assert words in str(err.value)


def test_png_without_a_card():
    with pytest.raises(CompanionError, match="no character card"):
        parse_card(png({}), "plain.png")




def test_a_png_bomb_is_read_for_its_card_without_decoding_a_pixel():
    data = bomb(V2)
    assert len(data) < 200_000
    assert parse_card(data, "bomb.png").name == "Luna"


def test_compressed_itxt_cards_are_read():
    text = b"ccv3\0\1\0\0\0" + zlib.compress(base64.b64encode(json.dumps(V2).encode()))
    data = bomb({"name": "ignored"})
    cut = data.index(b"IEND") - 4
    assert parse_card(data[:cut] + chunk(b"iTXt", text) + data[cut:], "c.png").name == "Luna"


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:-14], "cut short"),
    (lambda d: d[:40] + bytes([d[40] ^ 1]) + d[41:], "fails its checksum"),
    (lambda d: d[:10], "ends inside a chunk header"),
])
def test_damaged_pngs_name_the_damage(damage, message):
    with pytest.raises(CompanionError, match=f"card.png: damaged PNG: .*{message}"):
        parse_card(damage(png({"chara": V2})), "card.png")


def exported(companion) -> dict[str, dict]:
    """The cards Homefire gives back: JSON (V3), and the PNG's `chara` (V2) and `ccv3` chunks."""
    texts = png_texts(card_png(companion))
    return {"json": json.loads(card_json(companion)),
            **{key: json.loads(base64.b64decode(texts[key])) for key in ("chara", "ccv3")}}


def test_a_sillytavern_card_keeps_its_world_through_import_storage_and_export(tmp_path):
    card = sillytavern_card("Seraphina", "Eldoria", SERAPHINA_WORLD)
    store = CompanionStore(Database(tmp_path / "homefire.db"))
    store.put(parse_card(png_with_chara(card), "Seraphina.png"), "card")
    companion = store.get("seraphina")
    book = card["data"]["character_book"]
    for kind, out in exported(companion).items():
        assert out["data"]["character_book"] == book, kind       # every field, SillyTavern's own too
    again = parse_card(card_json(companion))                      # and once more around
    assert again.character_book.model_dump() == book
    assert unsupported(companion.character_book) == []


def test_a_v3_card_keeps_its_decorators_and_names_the_ones_not_acted_on(tmp_path):
    card = v3_card_with_decorators()
    store = CompanionStore(Database(tmp_path / "homefire.db"))
    store.put(parse_card(json.dumps(card).encode(), "maris.json"), "card")
    out = exported(store.get("maris"))
    book = card["data"]["character_book"]
    assert out["json"]["data"]["character_book"] == book
    assert out["ccv3"]["data"]["character_book"] == book
    # V2 front ends get the entries without decorators (V3: "on backfilling V2, remove them").
    backfilled = out["chara"]["data"]["character_book"]["entries"]
    assert [e["content"] for e in backfilled] == ["{{char}} brews jasmine tea at dusk.",
                                                  "Storms come from the west.", "The lighthouse is empty."]
    assert backfilled[1]["extensions"] == {"risu": {"x": 1}} and backfilled[1]["priority"] == 5
    assert unsupported(store.get("maris").character_book) == ["storms: @@risu_weather rain",
                                                              "lighthouse: @@is_greeting 1"]


@pytest.mark.parametrize(("book", "where"), [
    ({"entries": [{"keys": "tea", "content": "x"}]}, "character_book.entries.0.keys"),
    ({"entries": [{"keys": ["tea"], "content": 5}]}, "character_book.entries.0.content"),
    ({"entries": "none"}, "character_book.entries"),
    ({"scan_depth": -1, "entries": []}, "character_book.scan_depth"),
])
def test_a_broken_book_is_refused_naming_the_field(book, where):
    card = {"spec": "chara_card_v2", "data": {"name": "Bad", "character_book": book}}
    with pytest.raises(CompanionError, match=f"bad.json: {where}"):
        parse_card(json.dumps(card).encode(), "bad.json")

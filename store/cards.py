"""Character Cards: import of V1, V2 (`chara_card_v2`) and V3 (`chara_card_v3`), as JSON or
PNG, and export as V3 JSON or as a PNG that carries both V2 and V3.

PNG cards carry the card as base64 JSON in a tEXt/iTXt chunk named `ccv3` (V3) or `chara`.
Only those chunks are read, by walking the PNG's chunk structure: the picture is never
decoded, so a decompression bomb is just bytes we skip. Homefire's own fields (its id, the
sampling settings) travel in `data.extensions.homefire`, which other front ends keep as is.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import zlib
from pathlib import Path

from pydantic import ValidationError

from store.companions import (
    Companion,
    CompanionError,
    CompanionStore,
    Sampling,
    format_validation_error,
    key_for,
    slugify,
)
from store.lorebook import without_decorators

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CARD_FIELDS = (
    "description",
    "personality",
    "scenario",
    "first_mes",
    "mes_example",
    "system_prompt",
    "post_history_instructions",
)
MAX_CARD_BYTES = 20 * 1024 * 1024


def parse_card(data: bytes, filename: str = "card") -> Companion:
    """Turn the bytes of a card file into a Companion; errors name the file and the field."""
    if len(data) > MAX_CARD_BYTES:
        raise CompanionError(f"{filename}: {len(data)} bytes is larger than a card may be (20 MiB)")
    if data.startswith(PNG_SIGNATURE):
        data = _png_card_json(data, filename)
    try:
        card = json.loads(data)
    except UnicodeDecodeError as err:
        raise CompanionError(f"{filename}: neither a PNG nor UTF-8 JSON") from err
    except json.JSONDecodeError as err:
        raise CompanionError(
            f"{filename}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from err
    return card_to_companion(card, filename)


def keep_card(companions: CompanionStore, data_dir: Path, companion: Companion, data: bytes, label: str,
              owner: str | None) -> str:
    """Store an imported card's companion (`owner`'s; None: shared) with the picture of its PNG;
    a replaced card's old picture goes, as it is not this card's. Returns the companion's key."""
    from store.pictures import drop_picture, save_picture

    companions.put(companion, "card", label, owner=owner)
    key = key_for(companion.id, owner)
    if not save_picture(data_dir, key, data):
        drop_picture(data_dir, key)
    return key


def png_texts(data: bytes, filename: str = "card") -> dict[str, str]:
    """The tEXt and iTXt chunks of a PNG by keyword; errors name the damaged chunk."""
    texts, position = {}, len(PNG_SIGNATURE)
    while position < len(data):
        if position + 8 > len(data):
            raise CompanionError(f"{filename}: damaged PNG: the file ends inside a chunk header "
                                 f"at byte {position}")
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        end = position + 8 + length + 4
        if end > len(data):
            raise CompanionError(f"{filename}: damaged PNG: the {kind!r} chunk at byte {position} "
                                 f"is cut short ({length} bytes announced)")
        body = data[position + 8:end - 4]
        if zlib.crc32(kind + body) != struct.unpack(">I", data[end - 4:end])[0]:
            raise CompanionError(f"{filename}: damaged PNG: the {kind!r} chunk at byte {position} "
                                 "fails its checksum")
        if kind == b"IEND":
            break
        if kind in (b"tEXt", b"iTXt"):
            keyword, _, rest = body.partition(b"\0")
            name = keyword.decode("latin-1")
            if kind == b"tEXt":
                texts[name] = rest.decode("latin-1")
            elif name in ("ccv3", "chara"):
                texts[name] = _itxt(rest, filename, name)
        position = end
    return texts


def _itxt(rest: bytes, filename: str, name: str) -> str:
    compressed, _method, rest = rest[0:1], rest[1:2], rest[2:]
    _language, _, rest = rest.partition(b"\0")
    _translated, _, text = rest.partition(b"\0")
    if compressed == b"\1":
        inflate = zlib.decompressobj()
        text = inflate.decompress(text, MAX_CARD_BYTES)   # bounded: a card is never larger
        if inflate.unconsumed_tail:
            raise CompanionError(f"{filename}: the {name!r} chunk inflates past {MAX_CARD_BYTES >> 20} MiB")
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CompanionError(f"{filename}: the {name!r} chunk is not UTF-8 text") from err


def _png_card_json(data: bytes, filename: str) -> bytes:
    try:
        texts = png_texts(data, filename)
    except zlib.error as err:
        raise CompanionError(f"{filename}: damaged PNG: a compressed text chunk: {err}") from err
    for key in ("ccv3", "chara"):
        if key in texts:
            try:
                return base64.b64decode(texts[key], validate=False)
            except (binascii.Error, ValueError) as err:
                raise CompanionError(f"{filename}: the {key!r} chunk is not base64: {err}") from err
    raise CompanionError(f"{filename}: PNG has no character card (no 'chara' or 'ccv3' text chunk)")


def card_to_companion(card: object, filename: str = "card") -> Companion:
    if not isinstance(card, dict):
        raise CompanionError(f"{filename}: a card must be a JSON object")
    spec = card.get("spec")
    if spec in ("chara_card_v2", "chara_card_v3"):
        data = card.get("data")
        if not isinstance(data, dict):
            raise CompanionError(f"{filename}: {spec} card has no 'data' object")
    elif spec is None:
        data = card  # V1: the fields sit at the top level
    else:
        raise CompanionError(
            f"{filename}: unknown card spec {spec!r} (expected chara_card_v2 or chara_card_v3)"
        )
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise CompanionError(f"{filename}: the card has no 'name'")
    fields = {f: data[f] for f in CARD_FIELDS if data.get(f) is not None}
    # V1 cards used char_persona / char_greeting / world_scenario / example_dialogue.
    for v1, ours in (
        ("char_persona", "personality"),
        ("char_greeting", "first_mes"),
        ("world_scenario", "scenario"),
        ("example_dialogue", "mes_example"),
    ):
        if v1 in data and ours not in fields:
            fields[ours] = data[v1]
    extensions = data.get("extensions") if isinstance(data.get("extensions"), dict) else {}
    ours = extensions.get("homefire") if isinstance(extensions.get("homefire"), dict) else {}
    try:
        return Companion(
            id=ours.get("id") or slugify(name),
            name=name.strip(),
            alternate_greetings=data.get("alternate_greetings") or [],
            sampling=Sampling.model_validate(ours.get("sampling") or {}),
            base_model=ours.get("base_model"),
            character_book=data.get("character_book"),
            **fields,
        )
    except ValidationError as err:
        raise CompanionError(f"{filename}: {format_validation_error(err)}") from err


# -- export ---------------------------------------------------------------------------------

def companion_to_card(companion: Companion, spec: str = "chara_card_v3") -> dict:
    """The companion as a Character Card V3 (or V2) object."""
    data = {field: getattr(companion, field) for field in CARD_FIELDS}
    data |= {"name": companion.name, "alternate_greetings": list(companion.alternate_greetings),
             "creator_notes": "", "tags": [], "creator": "", "character_version": "",
             "extensions": {"homefire": {"id": companion.id, "sampling": companion.sampling.model_dump(),
                                         "base_model": companion.base_model}}}
    book = companion.character_book
    if book is not None:   # V2 front ends would show a V3 entry's decorators as text
        data["character_book"] = (book if spec == "chara_card_v3" else without_decorators(book)).model_dump()
    if spec == "chara_card_v3":
        data |= {"group_only_greetings": [], "assets": [{"type": "icon", "uri": "ccdefault:",
                                                         "name": "main", "ext": "png"}]}
        return {"spec": spec, "spec_version": "3.0", "data": data}
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": data}


def card_json(companion: Companion) -> bytes:
    return json.dumps(companion_to_card(companion), ensure_ascii=False, indent=2).encode()


def card_png(companion: Companion, picture: bytes | None = None) -> bytes:
    """A PNG card: `picture` (a PNG, e.g. the companion's; else a plain square with its initial)
    with the card in a `chara` chunk (V2, read by every front end) and a `ccv3` chunk (V3)."""
    image = picture if picture and picture.startswith(PNG_SIGNATURE) else _plain_picture(companion.name)
    texts = b"".join(_text_chunk(key, base64.b64encode(json.dumps(companion_to_card(companion, spec),
                                                                  ensure_ascii=False).encode()))
                     for key, spec in (("chara", "chara_card_v2"), ("ccv3", "chara_card_v3")))
    # Any card chunks the picture carried are left out; ours go just before IEND.
    kept, position = [], len(PNG_SIGNATURE)
    while position + 8 <= len(image):
        length, kind = struct.unpack(">I4s", image[position:position + 8])
        end = position + 12 + length
        if kind == b"IEND":
            break
        if kind not in (b"tEXt", b"iTXt", b"zTXt"):
            kept.append(image[position:end])
        position = end
    return PNG_SIGNATURE + b"".join(kept) + texts + _chunk(b"IEND", b"")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _text_chunk(keyword: str, text: bytes) -> bytes:
    return _chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + text)


def _plain_picture(name: str) -> bytes:
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (512, 512), (224, 122, 47))
    ImageDraw.Draw(image).text((256, 256), name[:1].upper(), fill="white", anchor="mm", font_size=280)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()

"""Character Card import: V1, V2 (`chara_card_v2`) and V3 (`chara_card_v3`), as JSON or PNG.

PNG cards carry the card as base64 JSON in a tEXt/iTXt chunk named `ccv3` (V3) or `chara`.
Only those chunks are read, by walking the PNG's chunk structure: the picture is never
decoded, so a decompression bomb is just bytes we skip.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import zlib

from pydantic import ValidationError

from memory.companions import Companion, CompanionError, format_validation_error, slugify

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
    try:
        return Companion(
            id=slugify(name),
            name=name.strip(),
            alternate_greetings=data.get("alternate_greetings") or [],
            **fields,
        )
    except ValidationError as err:
        raise CompanionError(f"{filename}: {format_validation_error(err)}") from err

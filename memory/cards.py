"""Character Card import: V1, V2 (`chara_card_v2`) and V3 (`chara_card_v3`), as JSON or PNG.

PNG cards carry the card as base64 JSON in a tEXt/iTXt chunk named `ccv3` (V3) or `chara`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json

from PIL import Image, UnidentifiedImageError
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


def _png_card_json(data: bytes, filename: str) -> bytes:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # text chunks after the image data are read only by load()
            texts = dict(getattr(image, "text", {}))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise CompanionError(f"{filename}: damaged PNG: {err}") from err
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

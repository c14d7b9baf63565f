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

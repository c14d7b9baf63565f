"""Companions' pictures: the image of an imported PNG card, kept as a small clean PNG.

The picture is decoded and drawn again by Pillow, so what is served back holds pixels only:
no card text chunks, no trailing bytes, nothing larger than SIZE.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from store.files import written_whole

SIZE = 512            # longest side of the stored picture, in pixels
MAX_PIXELS = 16_777_216   # (4096 x 4096) a larger picture is left out before it is decoded


def picture_path(data_dir: Path, companion_key: str) -> Path:
    return data_dir / "pictures" / f"{companion_key}.png"


def save_picture(data_dir: Path, companion_key: str, data: bytes) -> bool:
    """Keep the picture of a PNG card; False (nothing written) if it cannot be read as one."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG" or image.width * image.height > MAX_PIXELS:
                return False
            image.thumbnail((SIZE, SIZE))
            clean = image.convert("RGBA")
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
    path = picture_path(data_dir, companion_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(path) as partial:
        clean.save(partial, "PNG")
    return True


def drop_picture(data_dir: Path, companion_key: str) -> None:
    picture_path(data_dir, companion_key).unlink(missing_ok=True)

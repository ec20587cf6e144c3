"""Reading image files into upright 8-bit RGB, whatever mode and orientation they were stored in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from samtune.errors import UserError

EXIF_ORIENTATION = 0x0112
# Orientations 5-8 turn the image by 90 degrees, so the displayed size is the stored size swapped.
SWAPS_SIDES = {5, 6, 7, 8}
# How PIL turns a stored image upright for each EXIF orientation (as ImageOps.exif_transpose does).
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageReadError(UserError):
    """An image file that cannot be read or decoded."""


def probe(path: str | Path) -> tuple[int, int, int]:
    """Stored (width, height) and EXIF orientation, from the header alone (no pixel decoding)."""
    try:
        with Image.open(path) as image:
            orientation = int(image.getexif().get(EXIF_ORIENTATION, 1))
            return image.width, image.height, orientation if orientation in ORIENTATION_TRANSPOSE else 1
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"cannot read image header: {error}") from error


def displayed_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """(width, height) once the EXIF orientation has been applied."""
    return (height, width) if orientation in SWAPS_SIDES else (width, height)


def to_rgb(image: Image.Image) -> np.ndarray:
    """An (H, W, 3) uint8 array from any PIL mode; high-bit-depth data is scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image).astype(np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        gray = np.clip(np.round(values * 255.0 / top), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "F":
        gray = np.clip(np.round(np.asarray(image)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"))


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode ``path`` to upright RGB uint8, applying its EXIF orientation."""
    return np.asarray(read_rgb_image(path))


def orient_mask(mask: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to a mask drawn on the stored (un-rotated) pixels."""
    if orientation not in ORIENTATION_TRANSPOSE:
        return mask
    turned = Image.fromarray(mask.astype(np.uint8)).transpose(ORIENTATION_TRANSPOSE[orientation])
    return np.asarray(turned).astype(mask.dtype)


def read_rgb_image(path: str | Path) -> Image.Image:
    """``path`` decoded to an upright PIL RGB image (EXIF orientation applied, any mode converted as ``to_rgb``
    does), for a consumer that resizes it with PIL (no round trip through numpy)."""
    try:
        with Image.open(path) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)
            if upright.mode == "RGB":
                return upright
            return Image.fromarray(to_rgb(upright))
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"cannot decode image: {error}") from error

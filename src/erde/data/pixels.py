"""Image files to 8-bit pixels, the same way for training folders and for ``erde predict``.

Pillow's ``convert("RGB")`` clips a 16-bit greyscale image (mode ``I;16``,
values 0..65535) to 255 instead of scaling it, so a 16-bit PNG and its 8-bit
twin would get different pixels and different classes. Here high-bit-depth
modes are scaled to 8 bits (v * 255 / 65535, rounded) before the mode
conversion. Float images carry no range and are refused. Decompression bombs
(Pillow's pixel limit, and its warning at half the limit) are refused too.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
SIXTEEN_BIT_FORMATS = ("PNG", "PPM")  # formats whose 32-bit 'I' mode holds 16-bit samples


class PixelFormatError(ValueError):
    """An image whose pixel values cannot be mapped to 8 bits without guessing."""


def _eight_bit(img, path: Path):
    """``img`` as an 8-bit Pillow image (mode 'L' for scaled high-bit-depth grey)."""
    from PIL import Image

    if img.mode in SIXTEEN_BIT_MODES or (img.mode == "I" and img.format in SIXTEEN_BIT_FORMATS):
        values = np.asarray(img, dtype=np.float64)  # (H, W), 0..65535
        if values.min() < 0 or values.max() > 65535:
            raise PixelFormatError(f"{path}: 16-bit image with values outside 0..65535")
        return Image.fromarray(np.rint(values * (255 / 65535)).astype(np.uint8), mode="L")
    if img.mode in ("I", "F"):
        raise PixelFormatError(
            f"{path}: {'32-bit integer' if img.mode == 'I' else 'floating-point'} pixels have no "
            "fixed range; convert the image to 8 or 16 bits first"
        )
    return img


class ImageTooLargeError(ValueError):
    """An image whose header declares more pixels per side than the caller accepts."""


def read_image(path: str | Path, mode: str, max_side: int | None = None):
    """Open ``path`` fully decoded as an 8-bit Pillow image in ``mode`` ('RGB' or 'L').

    Raises Pillow's own errors for unreadable files, ``PixelFormatError`` for
    pixels without a known range, and ``Image.DecompressionBombError`` for
    images over Pillow's pixel limit or over half of it (its warning).
    ``max_side``: refuse (``ImageTooLargeError``) an image with a longer side,
    judged from its header before any pixel is decoded (``Image.open`` is lazy).
    """
    from PIL import Image

    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                if max_side is not None and max(img.size) > max_side:
                    w, h = img.size
                    raise ImageTooLargeError(
                        f"{path} is {w}x{h} pixels, over the {max_side} per side a model input "
                        "may have"
                    )
                img.load()
                return _eight_bit(img, path).convert(mode)
        except Image.DecompressionBombWarning as exc:
            raise Image.DecompressionBombError(str(exc)) from None


def read_errors() -> tuple[type[BaseException], ...]:
    """Every exception :func:`read_image` raises for a bad file (not for a bug)."""
    from PIL import Image, UnidentifiedImageError

    return (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        MemoryError,
    )

"""Image conversions and grids: tensors in [-1, 1] to uint8 arrays, PNG grids."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.io import atomic_path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) float in [-1, 1] -> (..., H, W, 3) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def load_image(file, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """An image file (path or file object) -> (H, W, 3) uint8 of ``size`` (H, W): the centred square,
    resized (Lanczos); and the file's own (width, height). A file PIL cannot read as an image is an
    InputError naming it."""
    from pipeline.errors import InputError

    try:
        with Image.open(file) as im:
            im = im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        name = file if isinstance(file, (str, os.PathLike)) else getattr(file, "name", "the file")
        raise InputError(f"{name} is not a readable image ({type(e).__name__})") from None
    s = min(im.size)
    left, top = (im.width - s) // 2, (im.height - s) // 2
    return np.array(im.crop((left, top, left + s, top + s)).resize(tuple(size)[::-1], Image.LANCZOS)), im.size


def image_grid(images: np.ndarray, ncol: int, pad: int = 1, fill: int = 255) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*(H+pad)+pad, ncol*(W+pad)+pad, 3) uint8 grid, row-major."""
    n, h, w, c = images.shape
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), fill, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return grid


def save_png(array: np.ndarray, path: str | os.PathLike, upscale: int = 1, size: int | None = None,
             text: dict[str, str] | None = None) -> Path:
    """Write a uint8 (H, W, 3) array as PNG, atomically: nearest-neighbour upscaled by ``upscale``, or
    resized to ``size`` pixels on its longer side (nearest-neighbour up, Lanczos down); ``text``: PNG
    text chunks (key -> value, read back by ``PIL.Image.open(path).text``)."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    img = Image.fromarray(array)
    if size is not None and size != max(img.size):
        k = size / max(img.size)
        img = img.resize((round(img.width * k), round(img.height * k)), Image.NEAREST if k > 1 else Image.LANCZOS)
    elif upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, value)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", pnginfo=info)
    return path

"""Bench image sets written to a local folder: the bundled photos repeated, synthetic photos, mixed sizes, tiny images.

`write_photo_set` makes every file the same size (``BENCH_HEIGHT`` × ``BENCH_WIDTH``, 4:3), so that all
images have one processed size and the model batches them whole in ``exact`` mode, in the bare loop and
in the job alike. Within each run of ``PERIOD`` files, even positions are the six bundled photos
(`samples/images`, centre-cropped to 4:3 and resized; greyscale ones stay greyscale), odd positions
synthetic photo-like images (smooth colour fields plus noise); the content repeats every ``PERIOD`` files,
so every run of 16 images costs the same and a steady-state window of whole runs is representative (the job's
shards are whole multiples of it at the usual sizes). Every file has its own name. JPEG quality 90, as the samples.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = Path(__file__).resolve().parents[1] / "samples" / "images"
BENCH_HEIGHT, BENCH_WIDTH = 480, 640
JPEG_QUALITY = 90
PERIOD = 16  # images after which the set's content repeats


def _crop_resize(image: Image.Image, height: int, width: int) -> Image.Image:
    """Centre crop to the aspect ratio height:width, then Lanczos resize to (height, width)."""
    w, h = image.size
    if w * height > h * width:  # too wide
        cw = h * width // height
        box = ((w - cw) // 2, 0, (w - cw) // 2 + cw, h)
    else:
        ch = w * height // width
        box = (0, (h - ch) // 2, w, (h - ch) // 2 + ch)
    return image.crop(box).resize((width, height), Image.LANCZOS)


def synthetic_photo(height: int, width: int, *, seed: int) -> np.ndarray:
    """uint8 [height, width, 3]: a few smooth colour fields and sharp blobs plus pixel noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    freq = rng.uniform(2, 9, size=(2, 3))
    phase = rng.uniform(0, 2 * np.pi, size=3)
    img = 0.5 + 0.35 * np.sin(freq[0] * x * np.pi + phase) * np.cos(freq[1] * y * np.pi)  # [h, w, 3]
    for _ in range(4):  # blobs: object-like regions with edges
        cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.25)
        inside = ((y - cy) ** 2 + (x - cx) ** 2 * (width / height) ** 2) < r**2  # [h, w, 1]
        img = np.where(inside, rng.uniform(0, 1, size=3), img)
    img = img * 255 + rng.normal(0, 8, size=(height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def write_photo_set(folder: Path, count: int, *, height: int = BENCH_HEIGHT, width: int = BENCH_WIDTH) -> list[Path]:
    """``count`` JPEG files of height × width (default BENCH_HEIGHT × BENCH_WIDTH) in ``folder`` (photos and
    synthetic, alternating)."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = []
    for path in sorted(PHOTOS.iterdir()):
        with Image.open(path) as im:
            photos.append((path.stem, _jpeg(_crop_resize(im.convert("L" if im.mode == "L" else "RGB"), height, width))))
    paths = []
    synthetic = {j: _jpeg(Image.fromarray(synthetic_photo(height, width, seed=j))) for j in range(1, PERIOD, 2)}
    for i in range(count):
        j = i % PERIOD
        if j % 2 == 0:
            stem, data = photos[(j // 2) % len(photos)]
            name = f"img-{i:04d}-{stem}.jpg"
        else:
            name, data = f"img-{i:04d}-synthetic{j:02d}.jpg", synthetic[j]
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


def write_tiny_set(folder: Path, count: int, *, size: int = 32) -> list[Path]:
    """``count`` distinct size × size synthetic JPEG files in ``folder`` (for the scaling bench)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"tiny-{i:06d}.jpg"
        path.write_bytes(_jpeg(Image.fromarray(synthetic_photo(size, size, seed=i))))
        paths.append(path)
    return paths


def write_image_set(folder: Path, count: int, size: str) -> list[Path]:
    """``count`` JPEG files of ``size``: ``"tiny"`` (`write_tiny_set`, 32×32) or ``"HxW"`` such as ``"480x640"``
    or ``"800x1066"`` (`write_photo_set`). Raises ValueError naming a size of neither form."""
    if size == "tiny":
        return write_tiny_set(folder, count)
    height, _, width = size.partition("x")
    if not (height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
        raise ValueError(f"image size must be 'tiny' or HEIGHTxWIDTH (e.g. 480x640), got {size!r}")
    return write_photo_set(folder, count, height=int(height), width=int(width))


# (height, width) of the mixed set: landscape and portrait photo shapes whose processed sizes at 800 px
# differ (800×1066, 800×1200, 800×1000, 1066×800, 800×1199), so ``exact`` batching splits a batch into
# several groups while ``bucketed`` batching (128-px canvases) merges some of them.
MIXED_SIZES = ((480, 640), (480, 720), (512, 640), (640, 480), (427, 640), (480, 600))


def write_mixed_set(folder: Path, count: int) -> list[Path]:
    """``count`` JPEG files cycling through `MIXED_SIZES` (bundled photos and synthetic ones, alternating)."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = []
    for path in sorted(PHOTOS.iterdir()):
        with Image.open(path) as im:
            photos.append(im.convert("RGB"))
    paths = []
    for i in range(count):
        height, width = MIXED_SIZES[i % len(MIXED_SIZES)]
        if i % 2 == 0:
            image = _crop_resize(photos[(i // 2) % len(photos)], height, width)
        else:
            image = Image.fromarray(synthetic_photo(height, width, seed=100 + i))
        path = folder / f"mixed-{i:04d}-{height}x{width}.jpg"
        path.write_bytes(_jpeg(image))
        paths.append(path)
    return paths

"""Sample grids: the per-cell PNG the store writes, and one labelled figure per (method, seed).

A cell's PNG has one column per class (sample i has class i mod K, so row r holds samples rK .. rK + K − 1),
every image upscaled by an integer factor with nearest-neighbour (no blur) to at least `MIN_PIXELS`, and
`PADDING` grey pixels between images. Its layout is stored in the PNG itself (a text chunk), so the first
row (one sample per class) can be read back exactly: the per-method figure is rebuilt from the files on
disk, also for cells an earlier, interrupted run finished.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin
from torch import Tensor

from lightning_modules.evaluation.sample_files import to_pixels

LAYOUT_KEY = "guidelab-grid"
MIN_PIXELS = 32
PADDING = 2
PAD_VALUE = 128


@dataclass(frozen=True)
class GridLayout:
    """Where sample i of a grid PNG sits: row i // columns, column i % columns."""

    columns: int
    count: int
    height: int  # of one sample, before upscaling
    width: int
    upscale: int
    padding: int

    def box(self, i: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of sample i in the PNG."""
        h, w = self.height * self.upscale, self.width * self.upscale
        top = self.padding + (i // self.columns) * (h + self.padding)
        left = self.padding + (i % self.columns) * (w + self.padding)
        return top, left, top + h, left + w


def to_uint8(images: Tensor) -> np.ndarray:
    """Images in [-1, 1], (N, C, H, W) → uint8 (N, H, W, C), rounded as torchvision's save_image does."""
    return to_pixels(images.cpu()).permute(0, 2, 3, 1).numpy()


def upscale_factor(height: int, width: int, min_pixels: int = MIN_PIXELS) -> int:
    return max(1, math.ceil(min_pixels / min(height, width)))


def encode_grid(images: Tensor, columns: int, min_pixels: int = MIN_PIXELS, padding: int = PADDING) -> bytes:
    """PNG bytes of `images` (N, C, H, W) in [-1, 1]: `columns` per row (the number of classes), upscaled
    (nearest) to >= `min_pixels`, with the layout stored in a text chunk."""
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    layout = GridLayout(max(1, min(columns, n)), n, h, w, upscale_factor(h, w, min_pixels), padding)
    rows = max(1, -(-n // layout.columns))
    bottom, right = layout.box(rows * layout.columns - 1)[2:]
    canvas = np.full((bottom + padding, right + padding, c), PAD_VALUE, dtype=np.uint8)
    for i in range(n):
        top, left, b, r = layout.box(i)
        canvas[top:b, left:r] = pixels[i].repeat(layout.upscale, 0).repeat(layout.upscale, 1)
    info = PngImagePlugin.PngInfo()
    info.add_text(LAYOUT_KEY, json.dumps(asdict(layout)))
    buffer = io.BytesIO()
    Image.fromarray(canvas[..., 0] if c == 1 else canvas).save(buffer, format="png", pnginfo=info)
    return buffer.getvalue()


def read_grid(path: str | Path, image_size: int | None = None) -> tuple[np.ndarray, GridLayout] | None:
    """A grid PNG as (uint8 pixels (H, W, C), layout), or None if unreadable. A PNG without a stored layout
    (written by an older version: torchvision, 1-pixel padding, no upscaling) needs `image_size`."""
    try:
        with Image.open(path) as im:
            im.load()
            meta = im.info.get(LAYOUT_KEY)
            pixels = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)
    except (OSError, ValueError):
        return None
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    if meta is not None:
        return pixels, GridLayout(**json.loads(meta))
    if image_size is None:
        return None
    columns, rows = (pixels.shape[1] - 1) // (image_size + 1), (pixels.shape[0] - 1) // (image_size + 1)
    if columns < 1 or rows < 1:
        return None
    return pixels, GridLayout(columns, columns * rows, image_size, image_size, 1, 1)


def first_samples(path: str | Path, count: int | None = None,
                  image_size: int | None = None) -> list[np.ndarray] | None:
    """The first `count` samples (default: the first row, one per class) of a cell's grid PNG, upscaled
    uint8 (h, w, C) exactly as written; None if the file is missing or unreadable."""
    read = read_grid(path, image_size)
    if read is None:
        return None
    pixels, layout = read
    out = []
    for i in range(min(layout.columns if count is None else count, layout.count)):
        top, left, bottom, right = layout.box(i)
        out.append(pixels[top:bottom, left:right])
    return out


def progression_figures(rows: list[dict], directory: Path, class_names: list[str] | None = None,
                        title: str = "", image_size: int | None = None, max_columns: int = 20) -> list[Path]:
    """grids/<method>_seed<k>.png: rows are scales, columns are classes (one sample each, paired noise)."""
    from .plots import label_of, new_figure, save, wrap  # matplotlib only when figures are drawn

    paths = []
    for method, seed in sorted({(r["method"], r["seed"]) for r in rows}):
        cells = sorted((r for r in rows if r["method"] == method and r["seed"] == seed), key=lambda r: r["scale"])
        k = min(len(class_names), max_columns) if class_names else None
        samples = [first_samples(directory / r["grid"], k, image_size) for r in cells]
        samples = [s[:max_columns] if s else s for s in samples]
        found = [s for s in samples if s]
        if not found:
            continue
        columns = max(len(s) for s in found)
        cell_h, cell_w, channels = found[0][0].shape
        scale = max(1, math.ceil(48 / cell_h))  # on screen: about 48 px per sample
        gap = 4
        mosaic = np.full((len(cells) * (cell_h + gap) - gap, columns * (cell_w + gap) - gap, channels), 255, np.uint8)
        for j, got in enumerate(samples):
            for i, img in enumerate(got or []):
                if img.shape == (cell_h, cell_w, channels):
                    y, x = j * (cell_h + gap), i * (cell_w + gap)
                    mosaic[y:y + cell_h, x:x + cell_w] = img
        dpi = 100
        width_in = mosaic.shape[1] * scale / dpi + 1.6
        height_in = mosaic.shape[0] * scale / dpi + 1.3
        fig, ax = new_figure(figsize=(max(width_in, 4.5), height_in), dpi=dpi)
        ax.imshow(mosaic[..., 0] if channels == 1 else mosaic, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        names = class_names or [str(i) for i in range(columns)]
        ax.set_xticks([i * (cell_w + gap) + cell_w / 2 - 0.5 for i in range(columns)],
                      [str(n) for n in names[:columns]], rotation=45 if max(map(len, names[:columns])) > 3 else 0,
                      ha="right" if max(map(len, names[:columns])) > 3 else "center", fontsize=8)
        centres = [j * (cell_h + gap) + cell_h / 2 - 0.5 for j in range(len(cells))]
        ax.set_yticks(centres, [f"s = {r['scale']:g}" + (f"  (γ = {r['gamma']:g})" if r["gamma"] != r["scale"] else "")
                                + ("" if s else "\n(grid missing)") for r, s in zip(cells, samples)], fontsize=8)
        right = ax.twinx()  # the cell's own numbers beside its row
        right.set_ylim(ax.get_ylim())
        right.set_yticks(centres, [f"FID {r['fid']:.3g}\nacc {r['accuracy']:.2f}" for r in cells], fontsize=7)
        for a in (ax, right):
            a.tick_params(length=0)
            for side in a.spines.values():
                side.set_visible(False)
        ax.set_xlabel("class (one sample each; same noise in every row)", fontsize=8)
        more = f" (first {columns} of {len(class_names)} classes)" if class_names and len(class_names) > columns else ""
        heading = f"{label_of(method)}, seed {seed}: guidance scale per row{more}\n{title}"
        ax.set_title(wrap(heading, int(max(width_in, 4.5) * 12)), fontsize=9)
        paths.append(save(fig, directory / "grids" / f"{method}_seed{seed}.png"))
    return paths

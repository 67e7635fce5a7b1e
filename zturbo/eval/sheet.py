"""Contact sheet: original | reconstruction | error heat map for the worst and best images.

Only images that enter the worst-k or best-k set are kept, as thumbnails, so the
sheet costs the same memory for ten images or a hundred thousand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from zturbo.eval.metrics import higher_is_better
from zturbo.utils import atomic_path

THUMB = 256
CAPTION = 22
GAP = 4
ERROR_FULL_SCALE = 32  # absolute error (8-bit levels, mean over RGB) shown at full heat
BACKGROUND = (24, 24, 24)
# A three-point approximation of the 'inferno' map: black -> crimson -> pale yellow.
HEAT = ("#000004", "#bc3754", "#fcffa4")


@dataclass
class SheetEntry:
    name: str
    value: float
    original: Image.Image
    reconstructions: dict[str, tuple[Image.Image, Image.Image]]  # key -> (reconstruction, heat map)


def _thumbnail(im: Image.Image) -> Image.Image:
    """Fit into a THUMB cell: large images shrink smoothly, small ones grow by whole pixels (nearest)."""
    scale = THUMB / max(im.size)
    if scale >= 2:
        factor = int(scale)
        return im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST)
    im = im.copy()
    im.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    return im


def error_heatmap(reconstruction: torch.Tensor, original: torch.Tensor) -> Image.Image:
    """Per-pixel mean absolute error over RGB, 0 .. ERROR_FULL_SCALE levels mapped onto the heat colours."""
    err = (reconstruction.float() - original.float()).abs().mean(dim=0)
    level = (err * (255.0 / ERROR_FULL_SCALE)).clamp(0, 255).round().to(torch.uint8).cpu().numpy()
    return ImageOps.colorize(Image.fromarray(level, "L"), black=HEAT[0], mid=HEAT[1], white=HEAT[2])


def _to_pil(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).cpu().numpy()), "RGB")


class SheetCollector:
    """Keeps the ``k`` worst and ``k`` best images by ``metric`` (ties keep the earlier image)."""

    def __init__(self, k: int, metric: str | None, keys: list[str]):
        self.k = k
        self.metric = metric
        self.keys = keys
        self.worst: list[SheetEntry] = []
        self.best: list[SheetEntry] = []
        self._up = higher_is_better(metric) if metric else True

    def _badness(self, value: float) -> float:
        if math.isnan(value):
            return math.inf
        return -value if self._up else value

    def _qualifies(self, entries: list[SheetEntry], value: float, worst: bool) -> bool:
        if len(entries) < self.k:
            return True
        sign = 1 if worst else -1
        return sign * self._badness(value) > min(sign * self._badness(e.value) for e in entries)

    def offer(
        self, name: str, value: float, original: torch.Tensor, reconstructions: dict[str, torch.Tensor]
    ):
        if self.k == 0 or self.metric is None:
            return
        into_worst = self._qualifies(self.worst, value, worst=True)
        into_best = not math.isnan(value) and self._qualifies(self.best, value, worst=False)
        if not (into_worst or into_best):
            return
        entry = SheetEntry(
            name,
            value,
            _thumbnail(_to_pil(original)),
            {
                key: (_thumbnail(_to_pil(rec)), _thumbnail(error_heatmap(rec, original.to(rec.device))))
                for key, rec in reconstructions.items()
            },
        )
        if into_worst:
            self.worst = sorted(self.worst + [entry], key=lambda e: -self._badness(e.value))[: self.k]
        if into_best:
            self.best = sorted(self.best + [entry], key=lambda e: self._badness(e.value))[: self.k]

    def rows(self) -> list[tuple[str, SheetEntry]]:
        """Worst first (worst of all at the top), then the best not already shown."""
        shown = {e.name for e in self.worst}
        return [("worst", e) for e in self.worst] + [("best", e) for e in self.best if e.name not in shown]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _format(metric: str, value: float) -> str:
    if math.isinf(value):
        return f"{metric} inf (identical)"
    return f"{metric} {value:.2f} dB" if metric == "psnr" else f"{metric} {value:.4f}"


def render_sheet(
    collector: SheetCollector,
    path: str | Path,
    model_names: dict[str, str],
    values: dict[str, dict[str, float]],
) -> Path | None:
    """Write the contact sheet PNG atomically; None when there is nothing to show.

    ``values`` maps image name -> model key -> rank-metric value, for the captions.
    """
    rows = collector.rows()
    if not rows:
        return None
    keys = collector.keys
    columns = ["original"]
    for key in keys:
        columns += [
            f"{model_names[key]}: reconstruction",
            f"{model_names[key]}: |error| 0..{ERROR_FULL_SCALE}+",
        ]
    width = len(columns) * (THUMB + GAP) + GAP
    header = CAPTION + GAP
    height = header + len(rows) * (CAPTION + THUMB + GAP) + GAP
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font(14)
    for c, title in enumerate(columns):
        draw.text((GAP + c * (THUMB + GAP), GAP), title, fill=(230, 230, 230), font=font)
    y = header
    for r, (kind, entry) in enumerate(rows):
        per_model = "  |  ".join(
            _format(collector.metric, values[entry.name][k])
            + (f" ({model_names[k]})" if len(keys) > 1 else "")
            for k in keys
        )
        draw.text((GAP, y + 3), f"{kind}: {entry.name}   {per_model}", fill=(255, 210, 120), font=font)
        y += CAPTION
        cells = [entry.original]
        for key in keys:
            cells += list(entry.reconstructions[key])
        for c, cell in enumerate(cells):
            x0 = GAP + c * (THUMB + GAP)
            sheet.paste(cell, (x0 + (THUMB - cell.width) // 2, y + (THUMB - cell.height) // 2))
        y += THUMB + GAP
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        sheet.save(tmp, format="PNG", optimize=False)
    return path

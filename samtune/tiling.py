"""Tiles for images much larger than the model's input: which window of the image each prompt is decoded in.

A 4000 px photo goes to SAM as a 1024 thumbnail, where a 30 px object becomes 8 px. Tiled inference cuts the
image into ``size`` x ``size`` windows that overlap by ``overlap`` pixels and runs the model on the windows
that hold prompts, each at the model's full input resolution. A prompt goes to the tile that contains its box
(or its points) with the most margin; a box no tile contains (wider than ``size - overlap`` where it lies) gets
a window of its own: the box with ``overlap`` pixels of context around it, at least ``size`` wide. Any object
no wider than ``overlap`` lies whole inside some tile. Masks come back in window coordinates and are scored or
written at the original resolution (``Window.paste``).
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass

import numpy as np

from samtune.errors import UserError


@dataclass(frozen=True, order=True)
class Window:
    """A rectangle of the image: columns ``x0 .. x1 - 1``, rows ``y0 .. y1 - 1`` (original pixels)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """[x0, y0, x1, y1] with x1, y1 exclusive."""
        return self.x0, self.y0, self.x1, self.y1

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.y1 - self.y0, self.x1 - self.x0

    def crop(self, image: np.ndarray) -> np.ndarray:
        return image[self.y0 : self.y1, self.x0 : self.x1]

    def to_window(self, coords: list[float]) -> list[float]:
        """Flat x, y, x, y, ... coordinates of the image in this window's frame."""
        return [value - (self.x0 if i % 2 == 0 else self.y0) for i, value in enumerate(coords)]

    def paste(self, mask: np.ndarray, height: int, width: int) -> np.ndarray:
        """The window's (h, w) mask placed in an all-false (height, width) mask of the whole image."""
        return Window(0, 0, width, height).paste_from(self, mask)

    def paste_from(self, window: Window, mask: np.ndarray) -> np.ndarray:
        """``window``'s (h, w) mask placed in an all-false mask of this window (which contains it)."""
        out = np.zeros(self.size, dtype=bool)
        out[window.y0 - self.y0 : window.y1 - self.y0, window.x0 - self.x0 : window.x1 - self.x0] = mask
        return out

    def union(self, other: Window) -> Window:
        """The smallest window holding both (an empty window adds nothing)."""
        if other.x1 <= other.x0 or other.y1 <= other.y0:
            return self
        return Window(min(self.x0, other.x0), min(self.y0, other.y0), max(self.x1, other.x1), max(self.y1, other.y1))

    @classmethod
    def around(cls, mask: np.ndarray) -> Window:
        """The smallest window holding a (H, W) mask's pixels (an empty window at the origin for an empty mask)."""
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if not len(rows):
            return cls(0, 0, 0, 0)
        return cls(int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def _starts(length: int, size: int, stride: int) -> list[int]:
    """Window starts along one side: every ``stride`` pixels, the last one flush with the far edge."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size, stride))
    return starts + [length - size]


@dataclass(frozen=True)
class Tiling:
    """``size`` x ``size`` tiles overlapping by ``overlap`` pixels (``--tile SIZE --overlap PX``)."""

    size: int
    overlap: int = 0

    def __post_init__(self) -> None:
        if self.size < 16:
            raise UserError(f"--tile {self.size}: a tile is at least 16 pixels wide")
        if not 0 <= self.overlap < self.size:
            raise UserError(f"--overlap {self.overlap}: must be at least 0 and less than the tile size {self.size}")

    @functools.cache  # noqa: B019 - a few tilings per process, each asked once per prompt
    def grid(self, height: int, width: int) -> tuple[Window, ...]:
        """Every tile of a (height, width) image, row by row; one window, the whole image, when it fits."""
        stride = self.size - self.overlap
        return tuple(
            Window(x, y, min(x + self.size, width), min(y + self.size, height))
            for y in _starts(height, self.size, stride)
            for x in _starts(width, self.size, stride)
        )

    @functools.cache  # noqa: B019
    def _corners(self, height: int, width: int) -> np.ndarray:
        """(tiles, 4) inclusive x0, y0, x1, y1 of the grid's tiles."""
        return np.array([(t.x0, t.y0, t.x1 - 1, t.y1 - 1) for t in self.grid(height, width)], dtype=np.float64)

    def regions(self, height: int, width: int) -> list[list[int]]:
        """Automatic masks' crop boxes ([x0, y0, x1, y1], ends exclusive): the whole image (objects larger than the
        overlap, which every tile cuts) and every tile (small objects at full detail; their masks win)."""
        tiles = [list(tile.box) for tile in self.grid(height, width)]
        return tiles if len(tiles) == 1 else [[0, 0, width, height], *tiles]

    def window_for(self, extent: tuple[float, float, float, float], height: int, width: int) -> Window:
        """The window a prompt spanning ``extent`` (inclusive x0, y0, x1, y1: its box, or its points' hull) is
        decoded in: the tile holding it with the widest margin, else a window around it with context."""
        x0, y0, x1, y1 = extent
        tiles, corners = self.grid(height, width), self._corners(height, width)
        margins = np.minimum.reduce([x0 - corners[:, 0], y0 - corners[:, 1], corners[:, 2] - x1, corners[:, 3] - y1])
        if margins.max() >= 0:
            return tiles[int(margins.argmax())]  # the first of equals: row by row
        columns = _around(x0, x1, width, self.size, self.overlap)
        rows = _around(y0, y1, height, self.size, self.overlap)
        return Window(columns[0], rows[0], columns[1], rows[1])


def _around(low: float, high: float, length: int, size: int, context: int) -> tuple[int, int]:
    """[start, end) along one side: ``low .. high`` with ``context`` pixels each side, at least ``size`` long
    where the image allows, shifted to stay inside the image."""
    start, end = int(np.floor(low)) - context, int(np.ceil(high)) + 1 + context
    if end - start < size:
        grow = size - (end - start)
        start, end = start - grow // 2, end + grow - grow // 2
    if start < 0:
        start, end = 0, end - start
    if end > length:
        start, end = max(0, start - (end - length)), length
    return start, end


def prompt_extent(box: list[float] | None, points: list[list[float]]) -> tuple[float, float, float, float]:
    """What a prompt covers: its box when it has one, else the hull of its points."""
    if box is not None:
        return tuple(float(v) for v in box)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return min(xs), min(ys), max(xs), max(ys)


def add_tile_arguments(parser: argparse.ArgumentParser) -> None:
    """--tile SIZE and --overlap PX (evaluate, predict)."""
    parser.add_argument(
        "--tile",
        type=int,
        metavar="SIZE",
        help="tiled inference for large images: SIZE x SIZE windows, each at the model's input resolution; "
        "each prompt goes to the tile that holds it (default: the whole image, resized to the input)",
    )
    parser.add_argument(
        "--overlap",
        type=int,
        metavar="PX",
        help="pixels neighbouring tiles share; objects up to this size lie whole in some tile (default SIZE / 4)",
    )


def tiling_of(args: argparse.Namespace) -> Tiling | None:
    """The tiling ``--tile`` / ``--overlap`` ask for, or None (no tiling)."""
    if args.tile is None:
        if args.overlap is not None:
            raise UserError(f"--overlap {args.overlap} without --tile: give the tile size too")
        return None
    return Tiling(args.tile, args.tile // 4 if args.overlap is None else args.overlap)

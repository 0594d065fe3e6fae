"""Regions of interest: what a steering edit targets, as KV cells.

    Text("...")            prompt tokens covering a substring (text models, text around images)
    Tokens(start, stop)    evaluated tokens start <= i < stop (positions of the sequence)
    ImageTokens(a, b)      image tokens a..b INCLUSIVE, row-major (the seeds' "patches 50-99")
    Box(x0, y0, x1, y1)    original-image pixels -> tokens (rule: vision.ImageGrid.box_tokens)
    Panel(k, of=n)         k-th of n panels of a horizontal strip; Panel(k, grid=(R, C)) for a
                           grid read left-to-right, top-to-bottom
    Region("top-left")     named regions: left right top bottom top-left top-right
                           bottom-left bottom-right center
    Saliency(map)          a PNG/NPY/array resampled to the token grid: real-valued weights
    parse_roi("...")       the CLI grammar (below) -> a tuple of the above
    resolve(targets, seq)  -> (cells, weights or None)
    focus_content(cells, seq)  image cells narrowed to those showing content (vision.py)

Image targets take ``image=k`` (1-based) when a prompt holds several images. A list or tuple
of targets is their union.

Grammar (``--roi``), terms joined by ``+``::

    50:99 | 3:7,20:25 | box:x0,y0,x1,y1 | panel:k/n | panel:k@RxC | left ... center
    | saliency:FILE | text:"..."        each optionally prefixed by imageN:
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llama_steer._errors import SteeringError
from llama_steer.vision import NAMED_REGIONS, GeometryError, ImageSpan, content_tokens

__all__ = [
    "Box",
    "ImageTokens",
    "Panel",
    "Region",
    "RoiError",
    "Saliency",
    "Seq",
    "Text",
    "Tokens",
    "parse_roi",
    "resolve",
]


class RoiError(SteeringError):
    """A region of interest that cannot be mapped; the message says why and what to use."""

    def __init__(self, message: str, field: str | None = "roi"):
        super().__init__(message, field=field)


# -- targets -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Text:
    """The prompt tokens that cover a substring (``occurrence``-th match, 0-based).

    >>> Text("Mary lives in Madrid.")
    >>> Text("the", occurrence=2)
    >>> Steering(roi=Text("John lives in Berlin."), strength=4.0)
    """

    text: str
    occurrence: int = 0

    def __post_init__(self):
        if not isinstance(self.text, str) or not self.text:
            raise RoiError("Text() needs a non-empty string to look for in the prompt")
        if not isinstance(self.occurrence, int) or self.occurrence < 0:
            raise RoiError("Text(occurrence=...) must be an int >= 0 (0 = first match)")


@dataclass(frozen=True)
class Tokens:
    """Evaluated tokens ``start <= i < stop`` (sequence positions; for text-only prompts
    these are the KV cells).

    >>> Tokens(1, 8)            # tokens 1..7 (token 0 is BOS for most models)
    >>> Steering(roi=Tokens(10, 20), mode="bias", strength=-6)
    """

    start: int
    stop: int

    def __post_init__(self):
        if not (isinstance(self.start, int) and isinstance(self.stop, int)):
            raise RoiError("Tokens(start, stop) takes two ints")
        if self.start < 0 or self.stop <= self.start:
            raise RoiError(
                f"Tokens({self.start}, {self.stop}) is empty or negative: "
                "use 0 <= start < stop (stop is exclusive)"
            )


@dataclass(frozen=True)
class ImageTokens:
    """Image tokens ``first..last`` inclusive, row-major over the token grid.

    >>> ImageTokens(50, 99)         # 50 tokens, as in the seeds
    """

    first: int
    last: int
    image: int | None = None

    def __post_init__(self):
        if self.first < 0 or self.last < self.first:
            raise RoiError(
                f"image tokens {self.first}:{self.last} are empty or inverted: use a:b, "
                "0 <= a <= b (inclusive)"
            )


@dataclass(frozen=True)
class Box:
    """A pixel box of the original image, x0 < x1, y0 < y1 (x1, y1 exclusive).

    >>> Box(120, 40, 260, 200)
    """

    x0: float
    y0: float
    x1: float
    y1: float
    image: int | None = None


@dataclass(frozen=True)
class Panel:
    """Panel k (1-based) of a comic: ``of=n`` for a horizontal strip of n panels, or
    ``grid=(rows, cols)`` read left-to-right, top-to-bottom.

    >>> Panel(4, of=6)
    >>> Panel(5, grid=(2, 3))
    """

    k: int
    of: int | None = None
    grid: tuple[int, int] | None = None
    image: int | None = None

    def __post_init__(self):
        if (self.of is None) == (self.grid is None):
            raise RoiError("Panel(k, of=n) or Panel(k, grid=(rows, cols)): give exactly one")
        n = self.of if self.of is not None else self.grid[0] * self.grid[1]
        if n < 1 or (self.grid is not None and min(self.grid) < 1):
            layout = f"of={self.of}" if self.of is not None else f"grid={self.grid}"
            raise RoiError(
                f"panel layout {layout} has no panels: use panel:k/n with n >= 1 (a strip of "
                "n) or panel:k@RxC with R, C >= 1"
            )
        if not 1 <= self.k <= n:
            raise RoiError(f"panel {self.k} does not exist: panels are numbered 1..{n}")

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        if self.of is not None:
            return ((self.k - 1) * width / self.of, 0.0, self.k * width / self.of, float(height))
        rows, cols = self.grid
        r, c = divmod(self.k - 1, cols)
        return (
            c * width / cols,
            r * height / rows,
            (c + 1) * width / cols,
            (r + 1) * height / rows,
        )


@dataclass(frozen=True)
class Region:
    """A named part of the image: left right top bottom top-left top-right bottom-left
    bottom-right center (center = the middle half in each direction)."""

    name: str
    image: int | None = None

    def __post_init__(self):
        if self.name not in NAMED_REGIONS:
            raise RoiError(f"unknown region {self.name!r}: use one of {', '.join(NAMED_REGIONS)}")


@dataclass(frozen=True)
class Saliency:
    """A saliency map over the image (PNG path, NPY path, or a 2-D array), averaged over each
    token's footprint: real-valued weights over the image's tokens (the seeds' b).

    >>> Steering(mode="shift", roi=Saliency("heat.png"), strength=2.0)
    """

    source: object = field(compare=False)
    image: int | None = None

    def load(self) -> np.ndarray:
        src = self.source
        if isinstance(src, (str, Path)):
            p = Path(src)
            if not p.exists():
                raise RoiError(f"saliency file {str(p)!r} does not exist")
            if p.suffix.lower() == ".npy":
                arr = np.load(p)
            else:
                from PIL import Image

                arr = np.asarray(Image.open(p).convert("F"))
        else:
            arr = np.asarray(src)
        arr = np.asarray(arr, dtype=np.float64)
        if arr.ndim != 2 or arr.size == 0 or not np.all(np.isfinite(arr)):
            raise RoiError("a saliency map must be a finite 2-D array (height x width)")
        return arr


IMAGE_TARGETS = (ImageTokens, Box, Panel, Region, Saliency)
TARGETS = (Text, Tokens) + IMAGE_TARGETS


def as_targets(roi) -> tuple:
    """Normalise an ``roi=`` argument to a tuple of targets."""
    if roi is None:
        return ()
    if isinstance(roi, TARGETS):
        return (roi,)
    if isinstance(roi, str):
        return parse_roi(roi)
    if isinstance(roi, Iterable):
        out = tuple(roi)
        for r in out:
            if not isinstance(r, TARGETS):
                raise RoiError(f"roi item {r!r} is not a region of interest")
        return out
    raise RoiError(f"roi={roi!r}: expected Text, Tokens, Box, Panel, ... or a list of them")


# -- grammar -------------------------------------------------------------------------------
_NUM = r"-?\d+(?:\.\d+)?"


def _split_terms(spec: str) -> list[str]:
    terms, cur, quote = [], [], None
    for ch in spec:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
            cur.append(ch)
        elif ch == "+":
            terms.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if quote:
        raise RoiError(f"unterminated quote in roi {spec!r}")
    terms.append("".join(cur))
    return [t.strip() for t in terms]


def _parse_term(term: str):
    image = None
    m = re.fullmatch(r"image(\d+):(.*)", term, re.S)
    if m:
        image = int(m.group(1))
        if image < 1:
            raise RoiError(f"{term!r}: images are numbered from 1")
        term = m.group(2)
    if not term:
        raise RoiError("empty roi term: write e.g. 50:99, box:10,10,80,80, panel:2/6 or left")
    if re.fullmatch(r"\d+(:\d+)?(,\d+(:\d+)?)*", term):
        out = []
        for part in term.split(","):
            a, _, b = part.partition(":")
            out.append(ImageTokens(int(a), int(b or a), image))
        return out
    if term.startswith("box:"):
        nums = term[4:].split(",")
        if len(nums) != 4 or not all(re.fullmatch(_NUM, n.strip()) for n in nums):
            raise RoiError(f"{term!r}: write box:x0,y0,x1,y1 in original-image pixels")
        x0, y0, x1, y1 = (float(n) for n in nums)
        return [Box(x0, y0, x1, y1, image)]
    if term.startswith("panel:"):
        m = re.fullmatch(r"(\d+)/(\d+)", term[6:])
        if m:
            return [Panel(int(m.group(1)), of=int(m.group(2)), image=image)]
        m = re.fullmatch(r"(\d+)@(\d+)x(\d+)", term[6:])
        if m:
            grid = (int(m.group(2)), int(m.group(3)))
            return [Panel(int(m.group(1)), grid=grid, image=image)]
        raise RoiError(f"{term!r}: write panel:k/n (strip of n) or panel:k@RxC (grid)")
    if term.startswith("saliency:"):
        if not term[9:]:
            raise RoiError("saliency: needs a file, e.g. saliency:heat.png")
        return [Saliency(term[9:], image)]
    if term.startswith("text:"):
        body = term[5:]
        if len(body) >= 2 and body[0] == body[-1] and body[0] in "\"'":
            body = body[1:-1]
        if image is not None:
            raise RoiError(f"{term!r}: text targets belong to the prompt, not to an image")
        return [Text(body)]
    if term in NAMED_REGIONS:
        return [Region(term, image)]
    raise RoiError(
        f"cannot read roi term {term!r}: use 50:99 (image tokens, inclusive), "
        "box:x0,y0,x1,y1, panel:k/n, panel:k@RxC, a region (left, right, top, bottom, "
        'top-left, ..., center), saliency:FILE or text:"..."; join terms with +'
    )


def parse_roi(spec: str) -> tuple:
    """``"image2:panel:3/6+text:'the dog'"`` -> (Panel(3, of=6, image=2), Text('the dog'))."""
    if not isinstance(spec, str) or not spec.strip():
        raise RoiError("empty roi: write e.g. 50:99, box:10,10,80,80, panel:2/6 or left")
    out = []
    for term in _split_terms(spec.strip()):
        out.extend(_parse_term(term))
    return tuple(out)


# -- resolution ----------------------------------------------------------------------------
@dataclass
class Seq:
    """What a prompt looks like to steering: per sequence position its token and text
    piece (b"" inside images), its KV cell, and the images it holds."""

    tokens: Sequence[int]
    pieces: Sequence[bytes]
    cell_of_pos: np.ndarray  # (n_pos,) int64
    images: list[ImageSpan] = field(default_factory=list)

    @property
    def n_cells(self) -> int:
        """KV cells the sequence occupies (an image ending it counts all its tokens)."""
        n = int(self.cell_of_pos[-1]) + 1 if len(self.cell_of_pos) else 0
        return max([n] + [im.first_cell + im.grid.n_tokens for im in self.images])

    @classmethod
    def text_only(cls, tokens: Sequence[int], pieces: Sequence[bytes]) -> Seq:
        return cls(tokens, pieces, np.arange(len(tokens), dtype=np.int64), [])

    def image(self, k: int | None) -> ImageSpan:
        if not self.images:
            raise RoiError(
                "an image region was given but the prompt holds no image: pass --image / an "
                "image_url message, or use a text target"
            )
        if k is None:
            if len(self.images) > 1:
                raise RoiError(
                    f"the prompt holds {len(self.images)} images: say which one, e.g. "
                    "image2:box:... (or image=2)"
                )
            return self.images[0]
        if not 1 <= k <= len(self.images):
            raise RoiError(f"image{k} does not exist: the prompt holds {len(self.images)} image(s)")
        return self.images[k - 1]


def _text_positions(t: Text, seq: Seq) -> np.ndarray:
    pieces = seq.pieces
    blob = b"".join(pieces)
    lens = np.array([len(p) for p in pieces], dtype=np.int64)
    ends = np.cumsum(lens)
    starts = ends - lens
    needle = t.text.encode("utf-8")
    pos = -1
    for _ in range(t.occurrence + 1):
        pos = blob.find(needle, pos + 1)
        if pos < 0:
            break
    if pos < 0:
        shown = blob.decode("utf-8", "replace")
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        which = "" if t.occurrence == 0 else f" (occurrence {t.occurrence})"
        raise RoiError(
            f"ROI text {t.text!r}{which} is not in the prompt ({len(pieces)} tokens: "
            f"{shown!r}); pass a substring of the prompt exactly as written"
        )
    lo, hi = pos, pos + len(needle)
    return np.nonzero((starts < hi) & (ends > lo) & (lens > 0))[0]


def _saliency_weights(s: Saliency, span: ImageSpan) -> tuple[np.ndarray, np.ndarray]:
    arr = s.load()
    g = span.grid
    tb = g.token_boxes()
    h, w = arr.shape
    fx, fy = w / g.width, h / g.height  # the map may have its own resolution
    toks, vals = [], []
    for t, (x0, y0, x1, y1) in enumerate(tb):
        if x1 <= x0 or y1 <= y0:
            continue  # letterbox padding: no image there
        a0, a1 = int(np.floor(x0 * fx)), max(int(np.ceil(x1 * fx)), int(np.floor(x0 * fx)) + 1)
        b0, b1 = int(np.floor(y0 * fy)), max(int(np.ceil(y1 * fy)), int(np.floor(y0 * fy)) + 1)
        toks.append(t)
        vals.append(arr[b0 : min(b1, h), a0 : min(a1, w)].mean())
    return np.array(toks, dtype=np.int64), np.array(vals)


def _image_tokens(t, span: ImageSpan) -> np.ndarray:
    g = span.grid
    try:
        if isinstance(t, ImageTokens):
            if t.last >= g.n_tokens:
                raise RoiError(
                    f"image tokens {t.first}:{t.last} reach past the image's grid of "
                    f"{g.nx}x{g.ny} = {g.n_tokens} tokens (last index {g.n_tokens - 1})"
                )
            return np.arange(t.first, t.last + 1, dtype=np.int64)
        if isinstance(t, Box):
            return g.box_tokens(t.x0, t.y0, t.x1, t.y1)
        if isinstance(t, Panel):
            x0, y0, x1, y1 = t.box(g.width, g.height)
            tw, th = g.token_size
            if x1 - x0 < tw or y1 - y0 < th:
                # smaller panels share tokens: a "steer to panel k" could not tell k apart
                rows, cols = t.grid if t.grid is not None else (1, t.of)
                raise RoiError(
                    f"panel layout {rows}x{cols} on this {g.width}x{g.height} image gives "
                    f"panels of {x1 - x0:.1f}x{y1 - y0:.1f} px, smaller than one image token "
                    f"({tw:.1f}x{th:.1f} px): at most {g.ny}x{g.nx} panels can be told apart; "
                    "use a coarser layout or box: coordinates"
                )
            return g.box_tokens(x0, y0, x1, y1)
        if isinstance(t, Region):
            fx0, fy0, fx1, fy1 = NAMED_REGIONS[t.name]
            return g.box_tokens(fx0 * g.width, fy0 * g.height, fx1 * g.width, fy1 * g.height)
    except GeometryError as e:
        raise RoiError(str(e)) from None
    raise RoiError(f"not an image target: {t!r}")


def resolve(targets: tuple, seq: Seq) -> tuple[np.ndarray, np.ndarray | None]:
    """(cells int64 sorted unique, weights float64 aligned with cells or None).

    Weights come from Saliency targets (other targets in a union get weight 1)."""
    cells: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    any_weights = False
    n = len(seq.tokens)
    for t in targets:
        if isinstance(t, Tokens):
            if t.stop > n:
                raise RoiError(
                    f"Tokens({t.start}, {t.stop}) reaches past the evaluated sequence, "
                    f"which has {n} tokens: use stop <= {n}"
                )
            c = seq.cell_of_pos[t.start : t.stop]
            w = np.ones(c.size)
        elif isinstance(t, Text):
            c = seq.cell_of_pos[_text_positions(t, seq)]
            w = np.ones(c.size)
        elif isinstance(t, Saliency):
            span = seq.image(t.image)
            try:
                toks, w = _saliency_weights(t, span)
            except GeometryError as e:
                raise RoiError(str(e)) from None
            c = span.first_cell + toks
            any_weights = True
        else:
            span = seq.image(t.image)
            c = span.first_cell + _image_tokens(t, span)
            w = np.ones(c.size)
        if c.size == 0:
            raise RoiError(f"{t!r} covers no token")
        cells.append(np.asarray(c, dtype=np.int64))
        weights.append(w)
    if not cells:
        return np.zeros(0, dtype=np.int64), None
    all_c = np.concatenate(cells)
    all_w = np.concatenate(weights)
    uniq, first = np.unique(all_c, return_index=True)
    return uniq, (all_w[first] if any_weights else None)


def focus_content(cells: np.ndarray, seq: Seq) -> np.ndarray:
    """``cells`` with each image's part narrowed to the tokens that show content
    (``vision.content_tokens``); text cells and images without recorded pixels unchanged."""
    rest, kept = np.ones(cells.size, dtype=bool), []
    for span in seq.images:
        lo, hi = span.first_cell, span.first_cell + span.grid.n_tokens
        inside = (cells >= lo) & (cells < hi)
        if span.pixels is not None and inside.any():
            rest &= ~inside
            kept.append(content_tokens(span.pixels, span.grid, cells[inside] - lo) + lo)
    return np.unique(np.concatenate([cells[rest], *kept])).astype(np.int64)


def domain_of(targets: tuple, seq: Seq) -> np.ndarray:
    """Default redirect domain: every token of the images the targets point into."""
    spans = {}
    for t in targets:
        if isinstance(t, IMAGE_TARGETS):
            span = seq.image(t.image)
            spans[span.index] = span
    if not spans:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate([s.cells for s in spans.values()]))

"""Image geometry: how an image becomes a grid of image tokens, and which tokens a pixel
region covers.

    Geometry ........... the resize rule of a loaded mmproj (read from its GGUF)
    ImageGrid .......... one image: original size, token grid nx x ny, the letterbox
    ImageGrid.box_tokens(x0, y0, x1, y1)   token indices (row-major) a pixel box covers
    ImageSpan .......... an image inside a prompt: its grid, first KV cell, first position
    content_tokens() ... the tokens of a region that show something (focus="content")

The rule for Qwen2-VL-family projectors (llama.cpp's mtmd "dyn_size" preprocessor): the image
is fitted, aspect ratio kept, into a canvas whose sides are multiples of patch_size * merge
(28 px for Qwen2-VL) chosen by "smart resize" within [min_tokens, max_tokens] merged tokens,
centred, padded with black (PAD_CEIL); each merged token is one align x align canvas square.
A token belongs to a box when at least half of its area (in original-image pixels, padding
excluded) lies inside the box; a box smaller than that selects the one token under its centre.
The grid predicted here is checked against the nx x ny that mtmd actually produced.

Gemma 3 (projector ``gemma3``, mtmd's "fixed_size" preprocessor): every image is fitted, aspect
ratio kept, into one image_size x image_size canvas (896 px), centred, padded with black
(PAD_CEIL: fitted side = ceil(side * scale) in float32, offset = floor(free / 2)); the vision
tower's 64 x 64 patches are average-pooled by the projector's scale factor (4) to a fixed
16 x 16 = 256 token grid, row-major, each token a 56 x 56 canvas square. (Hugging Face's
Gemma3ImageProcessor stretches the image to the square instead; llama.cpp letterboxes, and
llama-steer follows what the runtime does.) mtmd reports such grids flat (nx = 256, ny = 1: it
needs no 2-D shape without M-RoPE), so the check is on the token count.

Content focus (``content_tokens``): within a region, the background is its most common colour
(RGB quantised to 16 levels per channel); a pixel shows content when it differs from that
colour by more than 60 (sum of |dR|+|dG|+|dB|, 0..765); a token is kept when at least 15% of
its pixels do. If no token qualifies (a photo with no flat background, an empty panel), the
whole region is kept. Meant for drawings, comics and diagrams, where a panel's uniform
background tokens carry nothing to describe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llama_steer._gguf import read_metadata

__all__ = ["Geometry", "ImageGrid", "ImageSpan", "NAMED_REGIONS", "content_tokens"]

CONTENT_DIFF = 60  # |dR|+|dG|+|dB| above which a pixel differs from the background
CONTENT_FRAC = 0.15  # share of a token's pixels that must differ for it to count

# projectors whose preprocessing is the dyn_size smart resize above, with their token limits
_DYN_SIZE = {
    "qwen2vl_merger": (8, 4096),
    "qwen2.5vl_merger": (8, 4096),
    "qwen3vl_merger": (8, 4096),
}

# projectors with mtmd's "fixed_size" preprocessor: one square canvas of clip.vision.image_size
# and a fixed grid, pooled by clip.vision.projector.scale_factor (default: mtmd's value)
_FIXED_SIZE = {
    "gemma3": 4,
}

# named regions as fractions of the original image (x0, y0, x1, y1)
NAMED_REGIONS = {
    "left": (0.0, 0.0, 0.5, 1.0),
    "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5),
    "bottom": (0.0, 0.5, 1.0, 1.0),
    "top-left": (0.0, 0.0, 0.5, 0.5),
    "top-right": (0.5, 0.0, 1.0, 0.5),
    "bottom-left": (0.0, 0.5, 0.5, 1.0),
    "bottom-right": (0.5, 0.5, 1.0, 1.0),
    "center": (0.25, 0.25, 0.75, 0.75),
}


class GeometryError(ValueError):
    pass


@dataclass(frozen=True)
class Geometry:
    """The resize rule of an mmproj: patch size, merge factor, token limits."""

    projector: str
    patch_size: int
    merge: int
    min_tokens: int
    max_tokens: int
    fixed_size: int = 0  # side of the one square canvas (fixed_size projectors), else 0

    @property
    def align(self) -> int:
        """Pixels per merged image token side on the resized canvas."""
        return self.patch_size * self.merge

    @property
    def flat(self) -> bool:
        """mtmd reports this projector's grid as nx = n_tokens, ny = 1 (no M-RoPE)."""
        return self.fixed_size > 0

    @classmethod
    def from_mmproj(cls, path: str | Path) -> Geometry:
        meta = read_metadata(path)
        proj = meta.get("clip.projector_type")
        if proj in _FIXED_SIZE:
            side = int(meta["clip.vision.image_size"])
            patch = int(meta["clip.vision.patch_size"])
            merge = int(meta.get("clip.vision.projector.scale_factor", _FIXED_SIZE[proj]))
            if side % (patch * merge):
                raise GeometryError(
                    f"{path}: canvas {side} px is not a whole number of {patch * merge}-px "
                    "tokens; pixel ROIs are unavailable, use image-token ranges such as 50:99"
                )
            n = (side // (patch * merge)) ** 2
            return cls(proj, patch, merge, n, n, fixed_size=side)
        if proj not in _DYN_SIZE:
            known = ", ".join(sorted([*_DYN_SIZE, *_FIXED_SIZE]))
            raise GeometryError(
                f"pixel ROIs (box:, panel:, named regions, saliency:) need the projector's "
                f"resize rule, and llama-steer does not map projector {proj!r} (of "
                f"{Path(path).name}; supported: {known}): use "
                "image-token ranges such as 50:99 instead, which work with any projector"
            )
        lo, hi = _DYN_SIZE[proj]
        return cls(
            projector=proj,
            patch_size=int(meta["clip.vision.patch_size"]),
            merge=int(meta.get("clip.vision.spatial_merge_size", 2)),
            min_tokens=lo,
            max_tokens=hi,
        )

    def canvas(self, width: int, height: int) -> tuple[int, int]:
        """Resized canvas (w, h) for an image of (width, height): mtmd's smart resize, or
        the fixed square of a fixed_size projector."""
        if self.fixed_size:
            return self.fixed_size, self.fixed_size
        a = self.align
        min_px = self.min_tokens * a * a
        max_px = self.max_tokens * a * a

        def rnd(x: float) -> int:  # std::round: half away from zero
            return int(math.floor(x / a + 0.5)) * a

        w, h = max(a, rnd(width)), max(a, rnd(height))
        if w * h > max_px:
            beta = math.sqrt(height * width / max_px)
            h = max(a, int(math.floor(height / beta / a)) * a)
            w = max(a, int(math.floor(width / beta / a)) * a)
        elif w * h < min_px:
            beta = math.sqrt(min_px / (height * width))
            h = int(math.ceil(height * beta / a)) * a
            w = int(math.ceil(width * beta / a)) * a
        return w, h

    def grid(self, width: int, height: int) -> ImageGrid:
        if width <= 0 or height <= 0:
            raise GeometryError(f"image size {width}x{height} is empty")
        cw, ch = self.canvas(width, height)
        # mtmd's PAD_CEIL letterbox, in its float32 arithmetic (float64 can ceil differently)
        f32 = np.float32
        scale = min(f32(cw) / f32(width), f32(ch) / f32(height))
        new_w = min(int(math.ceil(f32(width) * scale)), cw)
        new_h = min(int(math.ceil(f32(height) * scale)), ch)
        return ImageGrid(
            width=width,
            height=height,
            nx=cw // self.align,
            ny=ch // self.align,
            align=self.align,
            content=((cw - new_w) // 2, (ch - new_h) // 2, new_w, new_h),
        )


@dataclass(frozen=True)
class ImageGrid:
    """One image as the model sees it.

    width, height: original pixels; nx, ny: merged tokens (row-major, token t = r * nx + c);
    align: canvas pixels per token side; content: (x, y, w, h) of the image on the canvas.
    """

    width: int
    height: int
    nx: int
    ny: int
    align: int
    content: tuple[int, int, int, int]
    # align 0: the pixel -> token rule is unknown for this projector; this says why
    unmapped: str = field(default="", compare=False)

    @property
    def n_tokens(self) -> int:
        return self.nx * self.ny

    @property
    def token_size(self) -> tuple[float, float]:
        """(width, height) of one token in original-image pixels."""
        self._need_mapping()
        ox, oy, cw, ch = self.content
        return self.width / (cw / self.align), self.height / (ch / self.align)

    def _need_mapping(self) -> None:
        if self.align == 0:
            raise GeometryError(
                (self.unmapped or "the pixel-to-token rule of this image's projector is unknown")
                + f" (this image: {self.nx}x{self.ny} = {self.n_tokens} tokens, "
                f"so e.g. 0:{self.n_tokens - 1} is the whole image)"
            )

    def token_boxes(self) -> np.ndarray:
        """(n_tokens, 4) float64: each token's (x0, y0, x1, y1) in original pixels, clipped
        to the image (letterbox padding removed); empty boxes for all-padding tokens."""
        self._need_mapping()
        ox, oy, cw, ch = self.content
        sx, sy = cw / self.width, ch / self.height
        c = np.arange(self.nx)
        r = np.arange(self.ny)
        x0 = np.clip((c * self.align - ox) / sx, 0, self.width)
        x1 = np.clip(((c + 1) * self.align - ox) / sx, 0, self.width)
        y0 = np.clip((r * self.align - oy) / sy, 0, self.height)
        y1 = np.clip(((r + 1) * self.align - oy) / sy, 0, self.height)
        out = np.zeros((self.ny, self.nx, 4))
        out[..., 0], out[..., 2] = x0[None, :], x1[None, :]
        out[..., 1], out[..., 3] = y0[:, None], y1[:, None]
        return out.reshape(-1, 4)

    def box_tokens(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Row-major token indices covering the pixel box (rule in the module docstring)."""
        if not (x1 > x0 and y1 > y0):
            raise GeometryError(
                f"box {x0:g},{y0:g},{x1:g},{y1:g} is empty or inverted: use x0 < x1 and y0 < y1"
            )
        if x0 < 0 or y0 < 0 or x1 > self.width or y1 > self.height:
            raise GeometryError(
                f"box {x0:g},{y0:g},{x1:g},{y1:g} is outside the image "
                f"({self.width}x{self.height} px, grid {self.nx}x{self.ny} tokens)"
            )
        tb = self.token_boxes()
        area = (tb[:, 2] - tb[:, 0]) * (tb[:, 3] - tb[:, 1])
        ix = np.clip(np.minimum(tb[:, 2], x1) - np.maximum(tb[:, 0], x0), 0, None)
        iy = np.clip(np.minimum(tb[:, 3], y1) - np.maximum(tb[:, 1], y0), 0, None)
        inter = ix * iy
        hit = np.nonzero((area > 0) & (inter >= 0.5 * area))[0]
        if hit.size == 0:  # a box smaller than half a token: the token under its centre
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            inside = (tb[:, 0] <= cx) & (cx < tb[:, 2]) & (tb[:, 1] <= cy) & (cy < tb[:, 3])
            hit = np.nonzero(inside & (area > 0))[0][:1]
        return hit.astype(np.int64)

    def describe(self) -> str:
        if self.align == 0:
            return (
                f"{self.width}x{self.height} px -> {self.nx}x{self.ny} tokens "
                f"({self.n_tokens} in all); pixel ROIs unavailable: {self.unmapped}"
            )
        ox, oy, cw, ch = self.content
        tw = self.width / (cw / self.align)
        th = self.height / (ch / self.align)
        pad = (
            ""
            if (ox, oy) == (0, 0) and (cw, ch) == (self.nx * self.align, self.ny * self.align)
            else (
                f", letterboxed at ({ox},{oy}) size {cw}x{ch} on the {self.nx * self.align}x"
                f"{self.ny * self.align} canvas"
            )
        )
        return (
            f"{self.width}x{self.height} px -> {self.nx}x{self.ny} tokens (row-major, "
            f"{self.n_tokens} in all), one token ~ {tw:.1f}x{th:.1f} px{pad}"
        )


@dataclass(frozen=True)
class ImageSpan:
    """An image inside an evaluated prompt: KV cells [first_cell, first_cell + n_tokens),
    positions [first_pos, first_pos + n_pos) (M-RoPE: n_pos < n_tokens)."""

    index: int  # 1-based, in prompt order
    grid: ImageGrid
    first_cell: int
    first_pos: int
    n_pos: int
    # (height, width, 3) uint8 RGB as mtmd received it; None when not recorded
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def cells(self) -> np.ndarray:
        return np.arange(self.first_cell, self.first_cell + self.grid.n_tokens, dtype=np.int64)


def content_tokens(pixels: np.ndarray, grid: ImageGrid, tokens: np.ndarray) -> np.ndarray:
    """The subset of ``tokens`` (row-major indices) whose pixels show content (rule in the
    module docstring); all of ``tokens`` when none does.

    pixels: (height, width, 3) uint8, the original image (grid.width x grid.height).
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size == 0 or grid.align == 0:
        return tokens
    h, w = pixels.shape[:2]
    if (w, h) != (grid.width, grid.height):
        return tokens
    boxes = np.rint(grid.token_boxes()[tokens]).astype(np.int64)
    px = [pixels[y0:y1, x0:x1].reshape(-1, 3) for x0, y0, x1, y1 in boxes]
    allpx = np.concatenate(px).astype(np.int64)
    if allpx.size == 0:
        return tokens
    q = allpx // 16
    keys, counts = np.unique(q[:, 0] * 256 + q[:, 1] * 16 + q[:, 2], return_counts=True)
    k = int(keys[counts.argmax()])
    bg = np.array([k // 256, (k // 16) % 16, k % 16]) * 16 + 8
    keep = [
        p.size > 0
        and (np.abs(p.astype(np.int64) - bg).sum(1) > CONTENT_DIFF).mean() >= CONTENT_FRAC
        for p in px
    ]
    out = tokens[np.array(keep, dtype=bool)]
    return out if out.size else tokens

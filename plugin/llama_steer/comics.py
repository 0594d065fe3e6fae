"""Synthetic comic strips and scenes with known ground truth (the model organism's data).

Contents
--------
Vocabulary
    ``COLOURS`` (7) x ``SHAPES`` (6); an object is named ``"a <colour> <shape>"``.
Descriptions (what is drawn, in pixels; frozen dataclasses)
    ``Thing``   one object: colour, shape, centre and size of its bounding square.
    ``Panel``   one strip panel: 1-based index, pixel box, background, border, its thing.
    ``Strip``   six panels in layout ``"1x6"`` (504x84 px) or ``"2x3"`` (252x168 px), reading order
                left-to-right, top-to-bottom; each panel is 84x84 px = 3x3 merged Qwen2-VL tokens.
    ``Scene``   2-4 things in distinct quadrants of a 224x224 canvas (8x8 merged tokens), with
                jittered positions; ``Scene.regions`` maps "top left" ... "bottom right" to things.
Making descriptions (seeded, deterministic)
    ``make_strip(seed, layout)``, ``make_scene(seed)``.
Rendering the same description two ways
    ``render(desc, renderer="pillow")``  filled Pillow primitives (used for training);
    ``render(desc, renderer="numpy")``   an independent NumPy rasteriser with its own geometry,
                                         anti-aliasing and palette jitter (held-out eval only).
Questions and answers
    ``TASKS`` and ``make_example(seed, task, renderer)`` -> ``Example`` (image, question, answer,
    description); ``questions_for(desc, rng)`` draws several questions about one image.
Dense labels for training-only heads
    ``token_labels(desc)`` -> per merged token (28x28 px) colour, shape and slot classes.

Only numpy and Pillow are needed.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "data_uri",
    "COLOURS",
    "SHAPES",
    "LAYOUTS",
    "TASKS",
    "STRIP_TASKS",
    "SCENE_TASKS",
    "REGIONS",
    "Thing",
    "Panel",
    "Strip",
    "Scene",
    "Example",
    "make_strip",
    "make_scene",
    "render",
    "png_bytes",
    "make_example",
    "questions_for",
    "token_labels",
    "describe",
]

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "black")
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
LAYOUTS = {"1x6": (1, 6), "2x3": (2, 3)}  # rows, columns
PANEL_PX = 84  # 3x3 merged tokens of 28 px
SCENE_PX = 224  # 8x8 merged tokens
TOKEN_PX = 28  # one merged Qwen2-VL image token (patch 14, spatial merge 2)
REGIONS = ("top left", "top right", "bottom left", "bottom right")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")

STRIP_TASKS = ("panel_number", "panel_ordinal", "this_panel", "describe")
SCENE_TASKS = ("scene_region", "scene_list", "scene_yesno")
TASKS = STRIP_TASKS + SCENE_TASKS

_RGB = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 205, 25),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "purple": (135, 45, 175),
    "black": (25, 25, 25),
}


@dataclasses.dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    cx: float  # centre, pixels
    cy: float
    size: float  # side of the bounding square, pixels

    @property
    def name(self) -> str:
        return f"a {self.colour} {self.shape}"

    @property
    def box(self) -> tuple[int, int, int, int]:
        h = self.size / 2
        return (
            round(self.cx - h),
            round(self.cy - h),
            round(self.cx + h),
            round(self.cy + h),
        )


@dataclasses.dataclass(frozen=True)
class Panel:
    index: int  # 1-based, reading order
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)
    background: tuple[int, int, int]
    border: bool
    thing: Thing


@dataclasses.dataclass(frozen=True)
class Strip:
    layout: str
    size: tuple[int, int]  # width, height
    panels: tuple[Panel, ...]
    seed: int


@dataclasses.dataclass(frozen=True)
class Scene:
    size: tuple[int, int]
    background: tuple[int, int, int]
    things: tuple[Thing, ...]  # reading order of their quadrants
    regions: dict  # region name -> Thing (occupied quadrants only)
    seed: int


@dataclasses.dataclass(frozen=True)
class Example:
    task: str
    question: str
    answer: str
    image: Image.Image
    desc: object  # Strip or Scene


def _rng(seed: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), salt])


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    base = int(rng.integers(205, 256))
    tint = rng.integers(-12, 13, size=3)
    return tuple(int(v) for v in np.clip(base + tint, 190, 255))


def _thing_in(rng, x0, y0, w, colour=None, shape=None) -> Thing:
    """A thing whose bounding square is 35-80% of the w-sized cell at (x0, y0), jittered."""
    size = float(rng.uniform(0.35, 0.80) * w)
    margin = 2.0
    lo, hi = x0 + margin + size / 2, x0 + w - margin - size / 2
    cx = float(rng.uniform(lo, max(lo, hi)))
    lo, hi = y0 + margin + size / 2, y0 + w - margin - size / 2
    cy = float(rng.uniform(lo, max(lo, hi)))
    colour = colour or COLOURS[int(rng.integers(len(COLOURS)))]
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    return Thing(colour, shape, cx, cy, size)


def make_strip(seed: int, layout: str = "2x3") -> Strip:
    """Six panels, one thing each (repeats allowed), in ``layout`` ("1x6" or "2x3")."""
    rows, cols = LAYOUTS[layout]
    rng = _rng(seed, 1 + list(LAYOUTS).index(layout))
    border = bool(rng.random() < 0.5)
    panels = []
    for i in range(6):
        r, c = divmod(i, cols)
        x0, y0 = c * PANEL_PX, r * PANEL_PX
        panels.append(
            Panel(
                i + 1,
                (x0, y0, x0 + PANEL_PX, y0 + PANEL_PX),
                _background(rng),
                border,
                _thing_in(rng, x0, y0, PANEL_PX),
            )
        )
    return Strip(layout, (cols * PANEL_PX, rows * PANEL_PX), tuple(panels), int(seed))


def make_scene(seed: int, n_things: tuple[int, int] = (2, 4)) -> Scene:
    """``n_things`` (inclusive range; 2-4) distinct things, each in its own quadrant of a 224x224
    canvas."""
    rng = _rng(seed, 7)
    n = int(rng.integers(n_things[0], n_things[1] + 1))
    quads = sorted(rng.choice(4, size=n, replace=False).tolist())
    kinds = rng.choice(len(COLOURS) * len(SHAPES), size=n, replace=False)
    half = SCENE_PX // 2
    things, regions = [], {}
    for q, k in zip(quads, kinds, strict=False):
        r, c = divmod(q, 2)
        colour, shape = COLOURS[int(k) // len(SHAPES)], SHAPES[int(k) % len(SHAPES)]
        t = _thing_in(rng, c * half, r * half, half, colour, shape)
        things.append(t)
        regions[REGIONS[q]] = t
    return Scene((SCENE_PX, SCENE_PX), _background(rng), tuple(things), regions, int(seed))


def describe(desc) -> str:
    """The reference answer to "Describe the strip." / "What objects are in the image?"."""
    if isinstance(desc, Strip):
        return ", then ".join(p.thing.name for p in desc.panels)
    names = [t.name for t in desc.things]
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


# ----------------------------------------------------------------------------- renderers


def _star_points(t: Thing, n: int = 5, inner: float = 0.42):
    pts = []
    for i in range(2 * n):
        rad = t.size / 2 if i % 2 == 0 else t.size / 2 * inner
        a = -np.pi / 2 + i * np.pi / n
        pts.append((t.cx + rad * np.cos(a), t.cy + rad * np.sin(a)))
    return pts


def _draw_pillow(draw: ImageDraw.ImageDraw, t: Thing, fill) -> None:
    h = t.size / 2
    x0, y0, x1, y1 = t.cx - h, t.cy - h, t.cx + h, t.cy + h
    if t.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif t.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif t.shape == "triangle":
        draw.polygon([(t.cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif t.shape == "diamond":
        draw.polygon([(t.cx, y0), (x1, t.cy), (t.cx, y1), (x0, t.cy)], fill=fill)
    elif t.shape == "star":
        draw.polygon(_star_points(t), fill=fill)
    elif t.shape == "cross":
        a = t.size / 6
        draw.rectangle((x0, t.cy - a, x1, t.cy + a), fill=fill)
        draw.rectangle((t.cx - a, y0, t.cx + a, y1), fill=fill)


def _render_pillow(desc) -> Image.Image:
    w, h = desc.size
    if isinstance(desc, Strip):
        img = Image.new("RGB", (w, h))
        draw = ImageDraw.Draw(img)
        for p in desc.panels:
            draw.rectangle((p.box[0], p.box[1], p.box[2] - 1, p.box[3] - 1), fill=p.background)
            if p.border:
                draw.rectangle(
                    (p.box[0], p.box[1], p.box[2] - 1, p.box[3] - 1), outline=(0, 0, 0), width=1
                )
            _draw_pillow(draw, p.thing, _RGB[p.thing.colour])
        return img
    img = Image.new("RGB", (w, h), desc.background)
    draw = ImageDraw.Draw(img)
    for t in desc.things:
        _draw_pillow(draw, t, _RGB[t.colour])
    return img


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Independent implicit geometry: is (dx, dy) (offset from the centre) inside the shape?"""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (ax <= r) & (ay <= r)
    if shape == "diamond":
        return ax + ay <= r
    if shape == "cross":
        a = r / 3
        return ((ax <= r) & (ay <= a)) | ((ax <= a) & (ay <= r))
    if shape == "triangle":  # apex (0, -r), base y = r, half-width r at the base
        return (dy <= r) & (2 * ax <= dy + r)
    if shape == "star":  # union of the inner pentagon and five spike triangles, by angle
        ang = np.arctan2(dx, -dy)  # 0 at the top, clockwise
        sector = np.pi / 5
        a = np.mod(ang + sector, 2 * sector) - sector  # angle from the nearest tip direction
        rho = np.hypot(dx, dy)
        inner = 0.42 * r
        # edge of a spike: line from the tip (r, 0) to the valley (inner, +-sector), in polar form
        tip = np.array([r, 0.0])
        val = np.array([inner * np.cos(sector), inner * np.sin(sector)])
        px, py = rho * np.cos(np.abs(a)), rho * np.sin(np.abs(a))
        cross = (val[0] - tip[0]) * (py - tip[1]) - (val[1] - tip[1]) * (px - tip[0])
        return cross >= 0
    raise ValueError(shape)


def _render_numpy(desc, seed_salt: int = 99, ss: int = 3) -> Image.Image:
    """Supersampled rasteriser; palette, shade and border style deliberately differ a little."""
    w, h = desc.size
    rng = _rng(desc.seed, seed_salt)
    ys = (np.arange(h * ss) + 0.5) / ss
    xs = (np.arange(w * ss) + 0.5) / ss
    X, Y = np.meshgrid(xs, ys)
    canvas = np.zeros((h * ss, w * ss, 3), np.float32)

    def jitter(rgb, amount=18):
        return np.clip(np.array(rgb, np.float32) + rng.integers(-amount, amount + 1, 3), 0, 255)

    def paint(t: Thing):
        m = _inside(t.shape, X - t.cx, Y - t.cy, t.size / 2)
        canvas[m] = jitter(_RGB[t.colour])

    if isinstance(desc, Strip):
        for p in desc.panels:
            x0, y0, x1, y1 = (v * ss for v in p.box)
            canvas[y0:y1, x0:x1] = jitter(p.background, 8)
            if p.border:
                b = 2 * ss - 1
                dark = jitter((40, 40, 40), 15)
                canvas[y0 : y0 + b, x0:x1] = dark
                canvas[y1 - b : y1, x0:x1] = dark
                canvas[y0:y1, x0 : x0 + b] = dark
                canvas[y0:y1, x1 - b : x1] = dark
            paint(p.thing)
    else:
        canvas[:] = jitter(desc.background, 8)
        for t in desc.things:
            paint(t)
    small = canvas.reshape(h, ss, w, ss, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(small + 0.5, 0, 255).astype(np.uint8), "RGB")


def render(desc, renderer: str = "pillow") -> Image.Image:
    """Draw a Strip or Scene; ``renderer`` is "pillow" (training) or "numpy" (held-out eval)."""
    if renderer == "pillow":
        return _render_pillow(desc)
    if renderer == "numpy":
        return _render_numpy(desc)
    raise ValueError(renderer)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(img: Image.Image) -> str:
    """The image as a PNG data URI, for an OpenAI-style ``image_url`` message part."""
    import base64

    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


# ----------------------------------------------------------------------------- questions


def _strip_qa(strip: Strip, task: str, rng) -> tuple[str, str]:
    k = int(rng.integers(1, 7))
    if task == "panel_number":
        return f"What is in panel {k}?", strip.panels[k - 1].thing.name
    if task == "panel_ordinal":
        return f"What is in the {ORDINALS[k - 1]} panel?", strip.panels[k - 1].thing.name
    if task == "this_panel":
        return "What is in this panel?", strip.panels[0].thing.name
    if task == "describe":
        return "Describe the strip.", describe(strip)
    raise ValueError(task)


def _scene_qa(scene: Scene, task: str, rng) -> tuple[str, str]:
    if task == "scene_region":
        names = list(scene.regions)
        region = names[int(rng.integers(len(names)))]
        return f"What is at the {region}?", scene.regions[region].name
    if task == "scene_list":
        return "What objects are in the image?", describe(scene)
    if task == "scene_yesno":
        present = {(t.colour, t.shape) for t in scene.things}
        if rng.random() < 0.5:
            t = scene.things[int(rng.integers(len(scene.things)))]
            return f"Is there a {t.colour} {t.shape}?", "yes"
        # a near miss half of the time: the colour or the shape of something present
        while True:
            if rng.random() < 0.5:
                t = scene.things[int(rng.integers(len(scene.things)))]
                if rng.random() < 0.5:
                    c, s = t.colour, SHAPES[int(rng.integers(len(SHAPES)))]
                else:
                    c, s = COLOURS[int(rng.integers(len(COLOURS)))], t.shape
            else:
                c = COLOURS[int(rng.integers(len(COLOURS)))]
                s = SHAPES[int(rng.integers(len(SHAPES)))]
            if (c, s) not in present:
                return f"Is there a {c} {s}?", "no"
    raise ValueError(task)


def questions_for(
    desc, rng: np.random.Generator, n: int, weights: dict | None = None
) -> list[tuple[str, str, str]]:
    """``n`` (task, question, answer) triples about one Strip or Scene.

    Tasks are drawn uniformly among the desc's kind, or in proportion to ``weights`` (task -> w,
    default 1) when given.
    """
    tasks = STRIP_TASKS if isinstance(desc, Strip) else SCENE_TASKS
    out = []
    if weights:
        p = np.array([weights.get(t, 1.0) for t in tasks], np.float64)
        p /= p.sum()
    for _ in range(n):
        if weights:
            task = tasks[int(rng.choice(len(tasks), p=p))]
        else:
            task = tasks[int(rng.integers(len(tasks)))]
        q, a = (_strip_qa if isinstance(desc, Strip) else _scene_qa)(desc, task, rng)
        out.append((task, q, a))
    return out


def make_example(seed: int, task: str, renderer: str = "pillow") -> Example:
    """One image + question + reference answer for ``task``; layouts alternate by seed parity."""
    rng = _rng(seed, 11)
    if task in STRIP_TASKS:
        desc = make_strip(seed, "1x6" if seed % 2 else "2x3")
        q, a = _strip_qa(desc, task, rng)
    elif task in SCENE_TASKS:
        desc = make_scene(seed)
        q, a = _scene_qa(desc, task, rng)
    else:
        raise ValueError(task)
    return Example(task, q, a, render(desc, renderer), desc)


# ----------------------------------------------------------------------------- dense labels


def _label_map(desc) -> np.ndarray:
    """Per-pixel index of the thing covering it (1-based), 0 for background (pixel centres)."""
    w, h = desc.size
    X, Y = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    lab = np.zeros((h, w), np.int16)
    things = [p.thing for p in desc.panels] if isinstance(desc, Strip) else list(desc.things)
    for i, t in enumerate(things):
        lab[_inside(t.shape, X - t.cx, Y - t.cy, t.size / 2)] = i + 1
    return lab


def _thing_classes(cells: np.ndarray, things, min_px: float) -> tuple[np.ndarray, np.ndarray]:
    """(colour, shape) classes per token, int64 (n,), from ``cells`` (n, pixels per token) of
    thing labels (0 = none, i + 1 = things[i]): the thing covering most of a token, when it
    covers at least ``min_px`` of its pixels; 0 (background) otherwise."""
    colour = np.zeros(len(cells), np.int64)
    shape = np.zeros(len(cells), np.int64)
    counts = np.stack([(cells == i + 1).sum(1) for i in range(len(things))], 1)
    best = counts.argmax(1)
    for j in np.nonzero(counts.max(1) >= min_px)[0]:
        t = things[best[j]]
        colour[j] = 1 + COLOURS.index(t.colour)
        shape[j] = 1 + SHAPES.index(t.shape)
    return colour, shape


def token_labels(desc, min_frac: float = 0.15) -> dict[str, np.ndarray]:
    """Classes per merged token (row-major, (H/28)*(W/28)) for training-only heads.

    colour: 0 background, 1..7 ``COLOURS``; shape: 0 background, 1..6 ``SHAPES`` -- the thing
    covering at least ``min_frac`` of the token's 28x28 cell. slot: 1..6 panel index of the cell
    (strips) or 7..10 its quadrant (scenes).
    """
    w, h = desc.size
    gw, gh = w // TOKEN_PX, h // TOKEN_PX
    things = [p.thing for p in desc.panels] if isinstance(desc, Strip) else list(desc.things)
    lab = _label_map(desc).reshape(gh, TOKEN_PX, gw, TOKEN_PX).transpose(0, 2, 1, 3)
    lab = lab.reshape(gh * gw, TOKEN_PX * TOKEN_PX)
    colour, shape = _thing_classes(lab, things, min_frac * TOKEN_PX * TOKEN_PX)
    ry, rx = np.divmod(np.arange(gh * gw), gw)
    cy, cx = (ry + 0.5) * TOKEN_PX, (rx + 0.5) * TOKEN_PX
    if isinstance(desc, Strip):
        cols = LAYOUTS[desc.layout][1]
        slot = 1 + (cy // PANEL_PX).astype(np.int64) * cols + (cx // PANEL_PX).astype(np.int64)
    else:
        half = desc.size[0] / 2
        slot = 7 + (cy >= half).astype(np.int64) * 2 + (cx >= half).astype(np.int64)
    return {"colour": colour, "shape": shape, "slot": slot}


# ============================================================================= v2: any rendering
#
# Organism v2 (issue 17) reads strips and scenes of any size and style. Everything below is an
# addition: the v1 functions above keep their exact outputs (tests and published figures use them).
#
# Descriptions gain a style (``Look`` per image, ``Backdrop`` per panel / scene) and free sizes:
# ``make_strip_v2(seed, layout, sizes)`` / ``make_scene_v2(seed, sizes)`` draw column widths,
# row heights and canvas sides that need not be multiples of any patch size. ``sizes`` is
# "train" (sides outside the held-out band) or "heldout" (at least one side in the band, never
# drawn in training). ``render_v2(desc, renderer)`` draws them with one of three renderers that
# share no drawing code:
#   "pillow"   ImageDraw primitives (optionally 4x supersampled)             -- training
#   "numpy"    implicit point-in-shape tests, optional supersampling           -- training
#   "sdf"      signed-distance fields with analytic edge coverage, own palette
#              jitter (HSV), own noise/texture/blur code                       -- HELD OUT
# ``TRAIN_RENDERERS`` / ``HELDOUT_RENDERERS`` make the split explicit; ``check_training(renderer,
# sizes)`` raises for anything held out (training code calls it).
# ``token_labels_v2`` gives the per-merged-token classes (32-px tokens, Qwen3-VL patch 16 x
# merge 2) in the geometry llama.cpp's mtmd feeds the model (``mtmd_geometry``: sides rounded
# to 32, aspect-preserving bicubic resize, black padding).

LAYOUTS_V2 = {"1x6": (1, 6), "2x3": (2, 3), "3x2": (3, 2), "6x1": (6, 1)}  # rows, columns
TRAIN_RENDERERS = ("pillow", "numpy")
HELDOUT_RENDERERS = ("sdf",)
RENDERERS_V2 = TRAIN_RENDERERS + HELDOUT_RENDERERS
SIZES = ("train", "heldout")
TOKEN_PX_V2 = 32  # one merged Qwen3-VL image token (patch 16, spatial merge 2)
PANEL_SIDE = (64, 128)  # panel sides, pixels (inclusive)
PANEL_HELDOUT = (90, 101)  # held-out band of panel sides [lo, hi)
SCENE_SIDE = (160, 300)
SCENE_HELDOUT = (208, 240)
BACKDROPS = ("flat", "gradient", "noise", "texture")
TEXTURES = ("stripes", "checker", "dots", "grain")


def check_training(renderer: str, sizes: str = "train") -> None:
    """Raise ValueError for a renderer or size regime that is held out from training."""
    if renderer not in TRAIN_RENDERERS:
        raise ValueError(f"renderer {renderer!r} is held out: training uses {TRAIN_RENDERERS}")
    if sizes != "train":
        raise ValueError(f"sizes {sizes!r} are held out: training uses 'train'")


@dataclasses.dataclass(frozen=True)
class Backdrop:
    """A panel's or scene's background: kind in ``BACKDROPS``."""

    kind: str
    colour: tuple[int, int, int]
    colour2: tuple[int, int, int]  # gradient end / texture ink
    angle: float  # gradient / stripe direction, radians
    period: float  # texture period, pixels
    amount: float  # noise std / texture contrast (0-1)
    texture: str  # one of TEXTURES (kind "texture")


@dataclasses.dataclass(frozen=True)
class Look:
    """Image-wide style: panel borders (width 0 = none), gutter inset, antialiasing, blur and
    JPEG quality (0 = none)."""

    border_width: int
    border_colour: tuple[int, int, int]
    gutter: int  # pixels of page colour inside each panel box, around the panel
    page: tuple[int, int, int]
    antialias: bool
    blur: float
    jpeg: int


@dataclasses.dataclass(frozen=True)
class StyledPanel(Panel):
    backdrop: Backdrop | None = None


@dataclasses.dataclass(frozen=True)
class StyledStrip(Strip):
    look: Look | None = None
    sizes: str = "train"


@dataclasses.dataclass(frozen=True)
class StyledScene(Scene):
    backdrop: Backdrop | None = None
    look: Look | None = None
    sizes: str = "train"


def _side(rng, lo: int, hi: int, band: tuple[int, int], inside: bool) -> int:
    if inside:
        return int(rng.integers(band[0], band[1]))
    while True:
        v = int(rng.integers(lo, hi + 1))
        if not band[0] <= v < band[1]:
            return v


def _sides(rng, n: int, lo: int, hi: int, band, sizes: str) -> list[int]:
    """``n`` sides; for "heldout", one of them (at random) in the band, the rest anywhere."""
    if sizes == "train":
        return [_side(rng, lo, hi, band, False) for _ in range(n)]
    if sizes != "heldout":
        raise ValueError(sizes)
    k = int(rng.integers(n))
    return [
        _side(rng, lo, hi, band, True) if i == k else int(rng.integers(lo, hi + 1))
        for i in range(n)
    ]


def _light(rng, lo: int = 175) -> tuple[int, int, int]:
    base = int(rng.integers(lo, 256))
    tint = rng.integers(-25, 26, size=3)
    return tuple(int(v) for v in np.clip(base + tint, lo - 15, 255))


def _backdrop(rng) -> Backdrop:
    kind = BACKDROPS[int(rng.integers(len(BACKDROPS)))]
    c1 = _light(rng)
    c2 = _light(rng, 150) if kind != "flat" else c1
    return Backdrop(
        kind,
        c1,
        c2,
        float(rng.uniform(0, 2 * np.pi)),
        float(rng.uniform(4, 16)),
        float(rng.uniform(0.03, 0.12) if kind == "noise" else rng.uniform(0.2, 0.6)),
        TEXTURES[int(rng.integers(len(TEXTURES)))],
    )


def _look(rng, strip: bool) -> Look:
    bw = int(rng.choice([0, 0, 1, 2, 3, 4])) if strip else 0
    if rng.random() < 0.6:
        bc = tuple(int(v) for v in rng.integers(0, 90, size=3))  # dark
    else:
        bc = tuple(int(v) for v in rng.integers(0, 256, size=3))  # any colour
    gutter = int(rng.choice([0, 0, 0, 2, 3, 5])) if strip else 0
    page = tuple(int(v) for v in rng.integers(200, 256, size=3))
    blur = float(rng.uniform(0.3, 1.2)) if rng.random() < 0.3 else 0.0
    jpeg = int(rng.integers(35, 90)) if rng.random() < 0.3 else 0
    return Look(bw, bc, gutter, page, bool(rng.random() < 0.5), blur, jpeg)


def _thing_v2(rng, x0, y0, x1, y1, pad, colour=None, shape=None) -> Thing:
    """A thing of 35-85% of the box's shorter side, anywhere inside it (``pad`` px margin)."""
    w, h = x1 - x0 - 2 * pad, y1 - y0 - 2 * pad
    size = float(rng.uniform(0.35, 0.85) * min(w, h))
    cx = float(rng.uniform(x0 + pad + size / 2, max(x0 + pad + size / 2, x1 - pad - size / 2)))
    cy = float(rng.uniform(y0 + pad + size / 2, max(y0 + pad + size / 2, y1 - pad - size / 2)))
    colour = colour or COLOURS[int(rng.integers(len(COLOURS)))]
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    return Thing(colour, shape, cx, cy, size)


def make_strip_v2(seed: int, layout: str = "2x3", sizes: str = "train") -> StyledStrip:
    """Six panels in ``layout`` (``LAYOUTS_V2``) with random column widths / row heights."""
    rows, cols = LAYOUTS_V2[layout]
    rng = _rng(seed, 101 + list(LAYOUTS_V2).index(layout) + 10 * SIZES.index(sizes))
    look = _look(rng, True)
    # one side per column and per row; "heldout": one of them in the band
    sides = _sides(rng, cols + rows, *PANEL_SIDE, PANEL_HELDOUT, sizes)
    widths, heights = sides[:cols], sides[cols:]
    xs = np.concatenate([[0], np.cumsum(widths)]).astype(int)
    ys = np.concatenate([[0], np.cumsum(heights)]).astype(int)
    pad = look.gutter + look.border_width + 2
    panels = []
    for i in range(6):
        r, c = divmod(i, cols)
        box = (int(xs[c]), int(ys[r]), int(xs[c + 1]), int(ys[r + 1]))
        bd = _backdrop(rng)
        t = _thing_v2(rng, *box, pad)
        panels.append(StyledPanel(i + 1, box, bd.colour, look.border_width > 0, t, bd))
    size = (int(xs[-1]), int(ys[-1]))
    return StyledStrip(layout, size, tuple(panels), int(seed), look, sizes)


def make_scene_v2(seed: int, sizes: str = "train", n_things=(2, 4)) -> StyledScene:
    """2-4 distinct things in distinct quadrants of a canvas of random width and height."""
    rng = _rng(seed, 121 + 10 * SIZES.index(sizes))
    look = _look(rng, False)
    w, h = _sides(rng, 2, *SCENE_SIDE, SCENE_HELDOUT, sizes)
    n = int(rng.integers(n_things[0], n_things[1] + 1))
    quads = sorted(rng.choice(4, size=n, replace=False).tolist())
    kinds = rng.choice(len(COLOURS) * len(SHAPES), size=n, replace=False)
    things, regions = [], {}
    hx, hy = w // 2, h // 2
    for q, k in zip(quads, kinds, strict=False):
        r, c = divmod(q, 2)
        colour, shape = COLOURS[int(k) // len(SHAPES)], SHAPES[int(k) % len(SHAPES)]
        box = (c * hx, r * hy, w if c else hx, h if r else hy)
        t = _thing_v2(rng, *box, 3, colour, shape)
        things.append(t)
        regions[REGIONS[q]] = t
    bd = _backdrop(rng)
    return StyledScene((w, h), bd.colour, tuple(things), regions, int(seed), bd, look, sizes)


# ----------------------------------------------------------------------------- v2 renderers


def _pil_backdrop(img: Image.Image, box, bd: Backdrop, rng) -> None:
    """Pillow renderer's backgrounds (drawn with ImageDraw / Image ops)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if w <= 0 or h <= 0:
        return
    tile = Image.new("RGB", (w, h), bd.colour)
    d = ImageDraw.Draw(tile)
    if bd.kind == "gradient":
        # bands of lines perpendicular to the direction
        ca, sa = np.cos(bd.angle), np.sin(bd.angle)
        span = abs(ca) * w + abs(sa) * h
        n = max(2, int(span))
        for i in range(n):
            f = i / (n - 1)
            col = tuple(int(a + (b - a) * f) for a, b in zip(bd.colour, bd.colour2, strict=True))
            if abs(ca) >= abs(sa):
                x = int(f * (w - 1)) if ca >= 0 else int((1 - f) * (w - 1))
                d.line((x, 0, x, h), fill=col)
            else:
                y = int(f * (h - 1)) if sa >= 0 else int((1 - f) * (h - 1))
                d.line((0, y, w, y), fill=col)
    elif bd.kind == "noise":
        # uniform (not Gaussian) grey noise of the same std, seeded
        half = bd.amount * 255 * np.sqrt(3)
        noise = rng.uniform(-half, half, size=(h, w, 1))
        a = np.asarray(tile, np.float32) + noise
        tile = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "RGB")
    elif bd.kind == "texture":
        ink = tuple(
            int(a + (b - a) * bd.amount) for a, b in zip(bd.colour, bd.colour2, strict=True)
        )
        p = max(3, int(bd.period))
        if bd.texture == "stripes":
            for k in range(-h, w + h, p):
                d.line((k, 0, k + h, h), fill=ink, width=max(1, p // 3))
        elif bd.texture == "checker":
            for yy in range(0, h, p):
                for xx in range((yy // p) % 2 * p, w, 2 * p):
                    d.rectangle((xx, yy, xx + p - 1, yy + p - 1), fill=ink)
        elif bd.texture == "dots":
            r = max(1, p // 4)
            for yy in range(p // 2, h, p):
                for xx in range(p // 2, w, p):
                    d.ellipse((xx - r, yy - r, xx + r, yy + r), fill=ink)
        else:  # grain: sparse random specks
            n = int(w * h / (p * 2))
            pts = rng.integers(0, [w, h], size=(n, 2))
            for px, py in pts:
                d.point((int(px), int(py)), fill=ink)
    img.paste(tile, (x0, y0))


def _inner(box, look: Look) -> tuple[int, int, int, int]:
    g = look.gutter
    return (box[0] + g, box[1] + g, box[2] - g, box[3] - g)


def _palette(rng, colour: str, amount: int = 18) -> tuple[int, int, int]:
    rgb = np.array(_RGB[colour], np.int16) + rng.integers(-amount, amount + 1, 3)
    return tuple(int(v) for v in np.clip(rgb, 0, 255))


def _post(img: Image.Image, look: Look) -> Image.Image:
    """Blur and JPEG artefacts (Pillow's Gaussian blur; training renderers)."""
    from PIL import ImageFilter

    if look.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(look.blur))
    return _jpeg(img, look.jpeg)


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    if quality <= 0:
        return img
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _render_pillow_v2(desc) -> Image.Image:
    rng = _rng(desc.seed, 201)
    look = desc.look
    ss = 4 if look.antialias else 1
    w, h = desc.size
    img = Image.new("RGB", (w, h), look.page)
    if isinstance(desc, Strip):
        for p in desc.panels:
            _pil_backdrop(img, _inner(p.box, look), p.backdrop, rng)
    else:
        _pil_backdrop(img, (0, 0, w, h), desc.backdrop, rng)
    big = img.resize((w * ss, h * ss), Image.NEAREST) if ss > 1 else img
    draw = ImageDraw.Draw(big)

    def scaled(t: Thing) -> Thing:
        return Thing(t.colour, t.shape, t.cx * ss, t.cy * ss, t.size * ss)

    things = [p.thing for p in desc.panels] if isinstance(desc, Strip) else desc.things
    for t in things:
        _draw_pillow(draw, scaled(t), _palette(rng, t.colour))
    if isinstance(desc, Strip) and look.border_width > 0:
        for p in desc.panels:
            x0, y0, x1, y1 = (v * ss for v in _inner(p.box, look))
            draw.rectangle(
                (x0, y0, x1 - 1, y1 - 1), outline=look.border_colour, width=look.border_width * ss
            )
    img = big.resize((w, h), Image.BOX) if ss > 1 else big
    return _post(img, look)


def _window(X, Y, x0, y0, x1, y1, ss):
    """Slices of the (supersampled) grid that hold the pixel centres in [x0, x1) x [y0, y1)."""
    h, w = X.shape
    i0, i1 = max(0, int(np.floor(y0 * ss)) - 1), min(h, int(np.ceil(y1 * ss)) + 1)
    j0, j1 = max(0, int(np.floor(x0 * ss)) - 1), min(w, int(np.ceil(x1 * ss)) + 1)
    return slice(i0, i1), slice(j0, j1)


def _np_backdrop(canvas, X, Y, box, bd: Backdrop, rng, ss=1) -> None:
    """NumPy renderer's backgrounds (on a pixel grid, possibly supersampled)."""
    x0, y0, x1, y1 = box
    win = _window(X, Y, x0, y0, x1, y1, ss)
    canvas, X, Y = canvas[win], X[win], Y[win]
    m = (X >= x0) & (X < x1) & (Y >= y0) & (Y < y1)
    if not m.any():
        return
    c1, c2 = np.array(bd.colour, np.float32), np.array(bd.colour2, np.float32)
    xs, ys = X[m] - x0, Y[m] - y0
    if bd.kind == "flat":
        canvas[m] = c1
    elif bd.kind == "gradient":
        u = xs * np.cos(bd.angle) + ys * np.sin(bd.angle)
        f = (u - u.min()) / max(1e-6, u.max() - u.min())
        canvas[m] = c1 + (c2 - c1) * f[:, None]
    elif bd.kind == "noise":
        canvas[m] = c1 + rng.normal(0, bd.amount * 255, size=(xs.size, 1))
    else:
        p = max(3.0, bd.period)
        if bd.texture == "stripes":
            on = np.mod(xs - ys, p) < p / 3
        elif bd.texture == "checker":
            on = (np.floor(xs / p) + np.floor(ys / p)) % 2 == 1
        elif bd.texture == "dots":
            on = np.hypot(np.mod(xs, p) - p / 2, np.mod(ys, p) - p / 2) < p / 4
        else:
            on = rng.random(xs.size) < 0.5 / p
        ink = c1 + (c2 - c1) * bd.amount
        canvas[m] = np.where(on[:, None], ink, c1)


def _render_numpy_v2(desc) -> Image.Image:
    rng = _rng(desc.seed, 202)
    look = desc.look
    ss = 3 if look.antialias else 1
    w, h = desc.size
    ys = (np.arange(h * ss) + 0.5) / ss
    xs = (np.arange(w * ss) + 0.5) / ss
    X, Y = np.meshgrid(xs, ys)
    canvas = np.empty((h * ss, w * ss, 3), np.float32)
    canvas[:] = np.array(look.page, np.float32)
    if isinstance(desc, Strip):
        for p in desc.panels:
            _np_backdrop(canvas, X, Y, _inner(p.box, look), p.backdrop, rng, ss)
        things = [p.thing for p in desc.panels]
    else:
        _np_backdrop(canvas, X, Y, (0, 0, w, h), desc.backdrop, rng, ss)
        things = list(desc.things)
    for t in things:
        r = t.size / 2
        win = _window(X, Y, t.cx - r, t.cy - r, t.cx + r, t.cy + r, ss)
        sub = canvas[win]
        sub[_inside(t.shape, X[win] - t.cx, Y[win] - t.cy, r)] = _palette(rng, t.colour)
    if isinstance(desc, Strip) and look.border_width > 0:
        b = look.border_width
        col = np.array(look.border_colour, np.float32)
        for p in desc.panels:
            x0, y0, x1, y1 = _inner(p.box, look)
            win = _window(X, Y, x0, y0, x1, y1, ss)
            Xw, Yw = X[win], Y[win]
            inside = (Xw >= x0) & (Xw < x1) & (Yw >= y0) & (Yw < y1)
            ring = inside & ((Xw < x0 + b) | (Xw >= x1 - b) | (Yw < y0 + b) | (Yw >= y1 - b))
            canvas[win][ring] = col
    small = canvas.reshape(h, ss, w, ss, 3).mean(axis=(1, 3))
    img = Image.fromarray(np.clip(small + 0.5, 0, 255).astype(np.uint8), "RGB")
    return _post(img, look)


# --- held-out renderer: signed distance fields (shares no drawing code with the two above)


def _sd_box(px, py, hx, hy):
    qx, qy = np.abs(px) - hx, np.abs(py) - hy
    out = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return out + np.minimum(np.maximum(qx, qy), 0)


def _sd_polygon(px, py, verts):
    """Exact signed distance to a simple polygon (negative inside), vectorised."""
    v = np.asarray(verts, np.float64)
    d = (px - v[0, 0]) ** 2 + (py - v[0, 1]) ** 2
    s = np.ones_like(px)
    n = len(v)
    for i in range(n):
        j = i - 1
        ex, ey = v[j, 0] - v[i, 0], v[j, 1] - v[i, 1]
        wx, wy = px - v[i, 0], py - v[i, 1]
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0, 1)
        bx, by = wx - ex * t, wy - ey * t
        d = np.minimum(d, bx * bx + by * by)
        c1 = py >= v[i, 1]
        c2 = py < v[j, 1]
        c3 = ex * wy > ey * wx
        flip = (c1 & c2 & c3) | (~c1 & ~c2 & ~c3)
        s = np.where(flip, -s, s)
    return s * np.sqrt(d)


def _sdf(shape: str, px, py, r: float):
    if shape == "circle":
        return np.hypot(px, py) - r
    if shape == "square":
        return _sd_box(px, py, r, r)
    if shape == "cross":
        a = r / 3
        return np.minimum(_sd_box(px, py, r, a), _sd_box(px, py, a, r))
    if shape == "triangle":
        return _sd_polygon(px, py, [(0, -r), (r, r), (-r, r)])
    if shape == "diamond":
        return _sd_polygon(px, py, [(0, -r), (r, 0), (0, r), (-r, 0)])
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.42 * r
            a = -np.pi / 2 + i * np.pi / 5
            pts.append((rad * np.cos(a), rad * np.sin(a)))
        return _sd_polygon(px, py, pts)
    raise ValueError(shape)


def _hsv_jitter(rgb, rng) -> np.ndarray:
    import colorsys

    hh, s, v = colorsys.rgb_to_hsv(*(np.array(rgb) / 255.0))
    hh = (hh + rng.uniform(-0.01, 0.01)) % 1.0
    s = float(np.clip(s * rng.uniform(0.85, 1.1), 0, 1))
    v = float(np.clip(v * rng.uniform(0.9, 1.06), 0, 1))
    return np.array(colorsys.hsv_to_rgb(hh, s, v), np.float32) * 255


def _render_sdf(desc) -> Image.Image:
    rng = _rng(desc.seed, 203)
    look = desc.look
    w, h = desc.size
    Y, X = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    img = np.empty((h, w, 3), np.float32)
    img[:] = np.array(look.page, np.float32)
    soft = 0.7 if look.antialias else 0.35  # half-width of the coverage ramp, pixels

    def cover(sd):
        return np.clip(0.5 - sd / (2 * soft), 0.0, 1.0)[..., None]

    def backdrop(box, bd: Backdrop):
        x0, y0, x1, y1 = box
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        a = cover(_sd_box(X - cx, Y - cy, (x1 - x0) / 2, (y1 - y0) / 2))
        c1, c2 = np.array(bd.colour, np.float32), np.array(bd.colour2, np.float32)
        if bd.kind == "flat":
            layer = np.broadcast_to(c1, img.shape)
        elif bd.kind == "gradient":
            u = (X - cx) * np.cos(bd.angle) + (Y - cy) * np.sin(bd.angle)
            span = abs(np.cos(bd.angle)) * (x1 - x0) + abs(np.sin(bd.angle)) * (y1 - y0)
            f = np.clip(u / max(1.0, span) + 0.5, 0, 1)[..., None]
            layer = c1 + (c2 - c1) * f
        elif bd.kind == "noise":
            g = rng.standard_normal((h, w)).astype(np.float32)
            g = (g + np.roll(g, 1, 0) + np.roll(g, 1, 1)) / np.sqrt(3)  # slightly correlated
            layer = c1 + (bd.amount * 255 * g)[..., None]
        else:
            p = max(3.0, bd.period)
            if bd.texture == "stripes":  # smooth sinusoidal stripes
                u = (X * np.cos(bd.angle) + Y * np.sin(bd.angle)) * 2 * np.pi / p
                f = 0.5 + 0.5 * np.sin(u)
            elif bd.texture == "checker":
                f = 0.5 + 0.5 * np.sign(np.sin(np.pi * X / p) * np.sin(np.pi * Y / p))
            elif bd.texture == "dots":
                d = np.hypot(np.mod(X - x0, p) - p / 2, np.mod(Y - y0, p) - p / 2) - p / 4
                f = np.clip(0.5 - d, 0, 1)
            else:
                f = (rng.random((h, w)) < 0.6 / p).astype(np.float64)
            layer = c1 + (c2 - c1) * (bd.amount * f)[..., None]
        img[:] = img * (1 - a) + layer * a

    if isinstance(desc, Strip):
        for p in desc.panels:
            backdrop(_inner(p.box, look), p.backdrop)
        things = [p.thing for p in desc.panels]
    else:
        backdrop((0, 0, w, h), desc.backdrop)
        things = list(desc.things)
    for t in things:
        a = cover(_sdf(t.shape, X - t.cx, Y - t.cy, t.size / 2))
        img[:] = img * (1 - a) + _hsv_jitter(_RGB[t.colour], rng) * a
    if isinstance(desc, Strip) and look.border_width > 0:
        b = look.border_width
        col = np.array(look.border_colour, np.float32)
        for p in desc.panels:
            x0, y0, x1, y1 = _inner(p.box, look)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            outer = _sd_box(X - cx, Y - cy, (x1 - x0) / 2, (y1 - y0) / 2)
            ring = np.maximum(outer, -(outer + b))  # band of width b inside the edge
            a = cover(ring)
            img[:] = img * (1 - a) + col * a
    if look.blur > 0:  # separable Gaussian in NumPy (not Pillow's)
        s = look.blur
        k = np.exp(-0.5 * (np.arange(-3, 4) / s) ** 2)
        k /= k.sum()
        padded = np.pad(img, ((3, 3), (3, 3), (0, 0)), mode="edge")
        tmp = sum(k[i] * padded[:, i : i + w] for i in range(7))
        img = sum(k[i] * tmp[i : i + h] for i in range(7))
    out = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")
    return _jpeg(out, look.jpeg)


def render_v2(desc, renderer: str = "pillow") -> Image.Image:
    """Draw a StyledStrip / StyledScene with one of ``RENDERERS_V2``."""
    if renderer == "pillow":
        return _render_pillow_v2(desc)
    if renderer == "numpy":
        return _render_numpy_v2(desc)
    if renderer == "sdf":
        return _render_sdf(desc)
    raise ValueError(renderer)


def pick_renderer(seed: int, renderers=TRAIN_RENDERERS) -> str:
    """The renderer of image ``seed`` among ``renderers``: drawn from the seed, independent of
    the layout (``seed % 4``), so that every renderer draws every layout."""
    return renderers[int(_rng(seed, 131).integers(len(renderers)))]


def make_desc_v2(seed: int, kind: str, sizes: str = "train", layout: str | None = None):
    """A strip (layout by ``seed % 4`` unless given) or a scene (``kind`` "strip"/"scene")."""
    if kind == "strip":
        return make_strip_v2(seed, layout or list(LAYOUTS_V2)[seed % 4], sizes)
    if kind == "scene":
        return make_scene_v2(seed, sizes)
    raise ValueError(kind)


def make_example_v2(
    seed: int, task: str, renderer: str = "pillow", sizes: str = "train"
) -> Example:
    """One v2 image + question + reference answer; strips cycle through the four layouts."""
    rng = _rng(seed, 111)
    if task in STRIP_TASKS:
        desc = make_desc_v2(seed, "strip", sizes)
        q, a = _strip_qa(desc, task, rng)
    elif task in SCENE_TASKS:
        desc = make_desc_v2(seed, "scene", sizes)
        q, a = _scene_qa(desc, task, rng)
    else:
        raise ValueError(task)
    return Example(task, q, a, render_v2(desc, renderer), desc)


# ----------------------------------------------------------------------------- v2 geometry, labels


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def mtmd_geometry(w: int, h: int, align: int = TOKEN_PX_V2, min_tokens=8, max_tokens=4096):
    """What llama.cpp's mtmd does to a Qwen-VL image (dyn-size preprocessor, PAD_CEIL):
    sides rounded to ``align`` (token budget permitting), then an aspect-preserving resize to
    (new_w, new_h) pasted at (off_x, off_y) on a black canvas. Returns
    (target_w, target_h, new_w, new_h, off_x, off_y)."""
    area = align * align
    tw = max(align, _round_half_up(w / align) * align)
    th = max(align, _round_half_up(h / align) * align)
    if tw * th > max_tokens * area:
        beta = np.sqrt(h * w / (max_tokens * area))
        th = max(align, int(np.floor(h / beta / align)) * align)
        tw = max(align, int(np.floor(w / beta / align)) * align)
    elif tw * th < min_tokens * area:
        beta = np.sqrt(min_tokens * area / (h * w))
        th = int(np.ceil(h * beta / align)) * align
        tw = int(np.ceil(w * beta / align)) * align
    if (tw, th) == (w, h):
        return tw, th, w, h, 0, 0
    f32 = np.float32  # mtmd's float32 arithmetic (float64 can ceil differently)
    scale = min(f32(tw) / f32(w), f32(th) / f32(h))
    nw = min(int(np.ceil(f32(w) * scale)), tw)
    nh = min(int(np.ceil(f32(h) * scale)), th)
    return tw, th, nw, nh, (tw - nw) // 2, (th - nh) // 2


def mtmd_resize(img: Image.Image, align: int = TOKEN_PX_V2) -> Image.Image:
    """The image as mtmd hands it to the vision tower (bicubic, black padding)."""
    tw, th, nw, nh, ox, oy = mtmd_geometry(*img.size, align)
    if (nw, nh, ox, oy) == (tw, th, 0, 0) and img.size == (tw, th):
        return img.convert("RGB")
    out = Image.new("RGB", (tw, th), (0, 0, 0))
    out.paste(img.convert("RGB").resize((nw, nh), Image.BICUBIC), (ox, oy))
    return out


def _things_of(desc) -> list[Thing]:
    return [p.thing for p in desc.panels] if isinstance(desc, Strip) else list(desc.things)


def token_labels_v2(desc, token_px: int = TOKEN_PX_V2, min_frac: float = 0.15) -> dict:
    """Classes per merged token of the mtmd-resized image (row-major, ny*nx).

    colour 0..7 / shape 0..6 as ``token_labels`` (the thing covering >= ``min_frac`` of the
    token); slot: 0 black padding, 1..6 the panel covering most of the token (strips), 7..10
    the quadrant of the token's centre (scenes). Also "grid": (ny, nx).
    """
    w, h = desc.size
    tw, th, nw, nh, ox, oy = mtmd_geometry(w, h, token_px)
    things = _things_of(desc)
    # label maps sampled at the resized image's pixel centres
    sx, sy = w / nw, h / nh
    X, Y = np.meshgrid((np.arange(tw) - ox + 0.5) * sx, (np.arange(th) - oy + 0.5) * sy)
    valid = (X >= 0) & (X < w) & (Y >= 0) & (Y < h)
    lab = np.zeros((th, tw), np.int16)
    for i, t in enumerate(things):
        lab[valid & _inside(t.shape, X - t.cx, Y - t.cy, t.size / 2)] = i + 1
    slot_map = np.zeros((th, tw), np.int16)
    if isinstance(desc, Strip):
        for p in desc.panels:
            x0, y0, x1, y1 = p.box
            slot_map[valid & (X >= x0) & (X < x1) & (Y >= y0) & (Y < y1)] = p.index
    else:
        slot_map[valid] = (7 + 2 * (Y >= h / 2) + (X >= w / 2))[valid]
    gy, gx = th // token_px, tw // token_px

    def cells(a):
        a = a.reshape(gy, token_px, gx, token_px).transpose(0, 2, 1, 3)
        return a.reshape(gy * gx, token_px * token_px)

    lab, slots = cells(lab), cells(slot_map)
    colour, shape = _thing_classes(lab, things, min_frac * token_px * token_px)
    sc = np.stack([(slots == k).sum(1) for k in range(11)], 1)
    slot = sc.argmax(1).astype(np.int64)
    return {"colour": colour, "shape": shape, "slot": slot, "grid": (gy, gx)}

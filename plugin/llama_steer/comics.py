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
    colour = np.zeros(gh * gw, np.int64)
    shape = np.zeros(gh * gw, np.int64)
    counts = np.stack([(lab == i + 1).sum(1) for i in range(len(things))], 1)
    best = counts.argmax(1)
    ok = counts.max(1) >= min_frac * TOKEN_PX * TOKEN_PX
    for j in np.nonzero(ok)[0]:
        t = things[best[j]]
        colour[j] = 1 + COLOURS.index(t.colour)
        shape[j] = 1 + SHAPES.index(t.shape)
    ry, rx = np.divmod(np.arange(gh * gw), gw)
    cy, cx = (ry + 0.5) * TOKEN_PX, (rx + 0.5) * TOKEN_PX
    if isinstance(desc, Strip):
        cols = LAYOUTS[desc.layout][1]
        slot = 1 + (cy // PANEL_PX).astype(np.int64) * cols + (cx // PANEL_PX).astype(np.int64)
    else:
        half = desc.size[0] / 2
        slot = 7 + (cy >= half).astype(np.int64) * 2 + (cx >= half).astype(np.int64)
    return {"colour": colour, "shape": shape, "slot": slot}

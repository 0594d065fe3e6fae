"""Steering configs as values: what to steer, checked once, independent of any model.

    >>> cfg = SteeringConfig(roi="panel:4@2x3", heads="top:10")
    >>> cfg.replace(strength=6.0) == SteeringConfig.from_dict(cfg.replace(strength=6.0).to_dict())
    True

    SteeringConfig ....... frozen: heads, roi, mode, strength, weights, domain, decode_only,
                           headmap, top_k, focus. A field left None is a default (below).
    .resolve(model) ...... the ONE place defaults are decided: every field set, for a model
    .heads_mask(L, H) .... bool (n_layer, n_head), True = steered
    .bias(seq) ........... (bias float32 (n_cells,) logit units, tail) for a prompt (roi.Seq)
    .to_dict() / from_dict()   JSON-safe; a round trip gives an equal config
    parse_heads(spec) .... the heads grammar: all | layers:A-B | top:K | L3H5,L2H1
    HeadMask ............. a bool (n_layer, n_head) mask as a hashable value
    MODES, MAX_STRENGTH, FALLBACK

Defaults (``resolve``): the model's headmap (``headmap=``; or, when neither heads= nor
headmap= is given, the one ``find_headmap`` picks for the model: shipped headmaps/, then
~/.cache/llama-steer/headmaps) gives the heads (its ``top_k`` best) and, for image ROIs, its
recommended mode, strength, decode_only and focus (tuned for those heads). Without one,
FALLBACK: every head, ``redirect`` for image ROIs and ``bias`` for text, strength 4, prompt
and generated tokens, no focus. A field you set always wins; ``heads=`` with ``headmap=``
overrides the map's choice of heads and keeps its other recommendations.

Modes, as a bias per KV cell in logit units (added after the 1/sqrt(d) scale)::

    bias         b[target] = strength * w            w = 1, or ``weights`` (one per target cell)
    shift        b[target] = strength * (s - mean)/std   s = ``weights``, a saliency over the ROI
    redirect     b[domain] = -strength, b[target] = +strength   (the gaze-heads edit)
    reroute      redirect's bias plus, per edited (query, head) row, one constant over the
                 domain and target that keeps their total attention share in that row as it
                 was: attention moves *inside* the image and the text keeps its share, so a
                 head that reads the previous word at some step goes on reading it (the
                 native hook computes it from the row; decode_only only, where every row
                 sees the whole image)
    emphasize    b[everything but target] = -strength          (PASTA: attention outside the
                 target scaled by exp(-strength); strength 4.6 ~ PASTA's coefficient 0.01)
    image-boost  b[every image token] = +strength             (PAI/VAF against "text inertia";
                 roi, if given, narrows it)

Conventions: layers and heads are 0-based; panels and images 1-based; ``ImageTokens(first,
last)`` is inclusive, ``Tokens(start, stop)`` exclusive (like a slice).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from llama_steer import roi as _roi
from llama_steer._errors import SteeringError
from llama_steer.roi import IMAGE_TARGETS, Saliency, Seq, as_targets, domain_of, focus_content

if TYPE_CHECKING:
    from llama_steer.headmap import Headmap, ModelIdentity

__all__ = [
    "FALLBACK",
    "MAX_STRENGTH",
    "MODES",
    "HeadMask",
    "SteeringConfig",
    "parse_heads",
]

MODES = ("bias", "shift", "redirect", "reroute", "emphasize", "image-boost")
REDIRECTS = ("redirect", "reroute")  # boost the target, suppress the rest of the domain
_REROUTE_PREFILL = (
    "mode='reroute' keeps each row's share on the image, which prompt rows inside the image "
    "see only in part: use decode_only=True, or mode='redirect'"
)
FOCUS = ("none", "content")
# biases are finite and bounded so an edited row stays finite (no all -inf row, no NaN)
MAX_STRENGTH = 1.0e4
# defaults without a headmap (mode: redirect for image ROIs, bias for text; see resolve)
FALLBACK = {"heads": "all", "strength": 4.0, "decode_only": False, "focus": "none"}

_HEADS_HELP = (
    "use 'all', 'layers:A-B' (every head of layers A..B), 'top:K' (a headmap's K best), "
    "'L3H5,L2H1', a list of (layer, head) pairs (0-based ints), or a bool array "
    "(n_layer, n_head)"
)


@dataclass(frozen=True)
class HeadMask:
    """A (n_layer, n_head) bool mask as a value (equal masks are equal, hashable)."""

    shape: tuple[int, int]
    bits: bytes

    @classmethod
    def of(cls, a: np.ndarray) -> HeadMask:
        a = np.ascontiguousarray(a, dtype=bool)
        return cls((int(a.shape[0]), int(a.shape[1])), a.tobytes())

    def array(self) -> np.ndarray:
        """bool (n_layer, n_head), read-only."""
        return np.frombuffer(self.bits, dtype=bool).reshape(self.shape)

    def pairs(self) -> list[tuple[int, int]]:
        return [(int(a), int(b)) for a, b in zip(*np.nonzero(self.array()), strict=True)]


def parse_heads(spec: str):
    """The heads grammar -> "all", "layers:A-B", ("top", K) or a tuple of (layer, head).

    >>> parse_heads("L3H5,L2H1")            # ((3, 5), (2, 1))
    >>> parse_heads("top:10")               # ('top', 10): a headmap's 10 best
    """
    s = spec.strip()
    if s == "all":
        return "all"
    m = re.fullmatch(r"layers:(\d+)(?:-(\d+))?", s)
    if m:
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise SteeringError(f"heads={spec!r}: layers A-B needs A <= B")
        return s
    m = re.fullmatch(r"top:(\d+)", s)
    if m:
        return ("top", int(m.group(1)))
    pairs = []
    for part in s.split(","):
        m = re.fullmatch(r"\s*[lL](\d+)[hH](\d+)\s*", part) or re.fullmatch(
            r"\s*(\d+):(\d+)\s*", part
        )
        if not m:
            raise SteeringError(f"heads={spec!r}: {_HEADS_HELP}")
        pairs.append((int(m.group(1)), int(m.group(2))))
    return tuple(pairs)


def _check_strength(strength) -> float:
    # a real number only: "5" or True would be read as 5.0 / 1.0 and steer by accident
    if isinstance(strength, bool | np.bool_) or not isinstance(
        strength, int | float | np.integer | np.floating
    ):
        raise SteeringError(
            f"strength={strength!r} is not a number: pass a float in logit units, e.g. "
            "strength=4.0 (0 turns the edit off)"
        )
    s = float(strength)
    if not math.isfinite(s):
        raise SteeringError(
            f"strength={strength!r} is not finite: use a finite value with "
            f"|strength| <= {MAX_STRENGTH:g} (large finite values already saturate softmax)"
        )
    if abs(s) > MAX_STRENGTH:
        raise SteeringError(
            f"|strength|={abs(s):g} exceeds {MAX_STRENGTH:g}; larger values change nothing in "
            "softmax but risk overflow: lower it"
        )
    return s


def _check_heads(heads):
    """heads= as a value: None, "all", "layers:A-B", ("top", K), (layer, head) pairs, or a
    HeadMask. Masks may be bool or 0/1 of any dtype."""
    if heads is None or isinstance(heads, HeadMask):
        return heads
    if isinstance(heads, str):
        return parse_heads(heads)
    if isinstance(heads, np.ndarray):
        if heads.ndim != 2:
            raise SteeringError(f"heads array has shape {heads.shape}: expected (n_layer, n_head)")
        if heads.dtype != bool and (
            heads.dtype.kind not in "iuf" or not np.isin(heads, (0, 1)).all()
        ):
            raise SteeringError(
                f"heads array of dtype {heads.dtype} holds values other than 0 and 1: "
                "pass a bool mask (n_layer, n_head), True = steered"
            )
        mask = HeadMask.of(heads.astype(bool))  # a copy: the caller's array may change
        if not mask.array().any():
            raise SteeringError(
                "heads array selects no head: steering would do nothing (use strength=0 or "
                "close() to turn it off)"
            )
        return mask
    if isinstance(heads, tuple) and len(heads) == 2 and heads[0] == "top":
        return heads
    try:
        items = list(heads)
    except TypeError:
        raise SteeringError(f"heads={heads!r}: {_HEADS_HELP}") from None
    pairs = []
    for lh in items:
        ok = isinstance(lh, list | tuple) and len(lh) == 2
        ok = ok and all(
            isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_) for v in lh
        )
        if not ok:
            raise SteeringError(f"heads: {lh!r} is not a (layer, head) pair of ints; {_HEADS_HELP}")
        pairs.append((int(lh[0]), int(lh[1])))
    if not pairs:
        raise SteeringError(
            "heads=[] selects no head: steering would do nothing (use strength=0 or close() "
            "to turn it off)"
        )
    return tuple(pairs)


def _load_headmap(hm):
    from llama_steer.headmap import Headmap

    if hm is None or isinstance(hm, Headmap):
        return hm
    if isinstance(hm, dict):
        return Headmap.from_json(hm)
    if isinstance(hm, str | os.PathLike):
        return Headmap.load(hm)
    raise SteeringError(
        f"headmap={type(hm).__name__}: pass a Headmap, a path to its JSON, or the parsed JSON dict"
    )


def _has_image(targets: tuple) -> bool:
    return any(isinstance(t, IMAGE_TARGETS) for t in targets)


@dataclass(frozen=True)
class SteeringConfig:
    """What to steer: which heads, which key cells (roi), which mode, how strong.

    >>> cfg = SteeringConfig(roi=Panel(4, grid=(2, 3)))          # the model's headmap decides
    >>> cfg = SteeringConfig(heads="all", roi=Text("Mary lives in Madrid."), strength=-8.0)
    >>> Steering(cfg)                                             # the runtime handle

    heads: "all", "layers:A-B", "top:K", "L3H5,L2H1", a list of (layer, head) pairs, or a bool
        mask (n_layer, n_head); None: the headmap's top_k, else all.
    roi: Text, Tokens, ImageTokens, Box, Panel, Region, Saliency (roi.py), a list of them
        (union), or a string in the CLI grammar ("panel:4/6", "50:99", ...).
    mode: one of MODES; strength: logit units, 0 = no edit at all.
    weights: one value per ROI cell (float, (n_target_cells,)): a real-valued mask for
        "bias", the saliency for "shift".
    domain: for "redirect" and "reroute", the cells to suppress while the ROI is boosted
        (image targets default to their image).
    decode_only: edit only generated tokens' queries (the gaze-heads default).
    focus: "content" (image targets narrowed to the tokens that show something) or "none".
    headmap, top_k: a Headmap (or its path, or its JSON dict) and how many of its best heads.
    None in any field means "the default" (module docstring); ``resolve`` decides it.
    """

    heads: object = None
    roi: tuple = ()
    mode: str | None = None
    strength: float | None = None
    weights: tuple[float, ...] | None = None
    domain: tuple = ()
    decode_only: bool | None = None
    headmap: Headmap | None = None
    top_k: int | None = None
    focus: str | None = None

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("roi", as_targets(self.roi))
        put("domain", as_targets(self.domain))
        heads = _check_heads(self.heads)
        if isinstance(heads, tuple) and len(heads) == 2 and heads[0] == "top":
            if self.top_k is not None and self.top_k != heads[1]:
                raise SteeringError(
                    f"heads='top:{heads[1]}' and top_k={self.top_k} disagree: give one"
                )
            put("top_k", heads[1])
            heads = None
        put("heads", heads)
        if self.mode is not None and self.mode not in MODES:
            raise SteeringError(f"mode={self.mode!r} is not one of {MODES}")
        if self.strength is not None:
            put("strength", _check_strength(self.strength))
        if self.decode_only is not None:
            if not isinstance(self.decode_only, bool | np.bool_):
                raise SteeringError(f"decode_only={self.decode_only!r}: pass True or False")
            put("decode_only", bool(self.decode_only))
        put("headmap", _load_headmap(self.headmap))
        if self.headmap is not None and not self.headmap.heads:
            raise SteeringError(
                "this headmap lists no heads: score the model (`llama-steer score`) or "
                "convert a ranking with scripts/convert_headmap.py"
            )
        k = self.top_k
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
                raise SteeringError(f"top_k={k!r}: pass an int >= 1 (heads from the headmap)")
            put("top_k", int(k))
            if self.heads is not None:
                raise SteeringError(
                    "top_k= takes a headmap's best heads and heads= names them: give one"
                )
        if self.focus is not None and self.focus not in FOCUS:
            raise SteeringError(f"focus={self.focus!r} is not one of {(None, *FOCUS)}")
        if self.weights is not None:
            w = np.asarray(self.weights, dtype=np.float64).reshape(-1)
            if not np.all(np.isfinite(w)):
                raise SteeringError("weights contain NaN or infinity: pass finite values")
            put("weights", tuple(float(x) for x in w))
        self._check_consistent()

    def _check_consistent(self) -> None:
        """Checks between fields; run again by resolve() once defaults are filled in."""
        has_saliency = any(isinstance(t, Saliency) for t in self.roi)
        has_image = _has_image(self.roi)
        if self.focus == "content" and (self.weights is not None or has_saliency):
            raise SteeringError(
                "focus= narrows the ROI, but weights / a Saliency roi give one value per ROI "
                "cell: use one or the other"
            )
        if self.focus == "content" and self.roi and not has_image:
            raise SteeringError(
                "focus='content' narrows image targets to the tokens that show something, but "
                "this ROI has no image target: drop focus, or target an image region (panel:, "
                "box:, a named region)"
            )
        if self.weights is not None and has_saliency:
            raise SteeringError(
                "give the weights either as weights= or as a Saliency roi, not both"
            )
        if self.mode == "shift" and self.weights is None and not has_saliency:
            raise SteeringError(
                "mode='shift' needs weights=: the saliency s over the ROI's cells "
                "(normalised to (s - mean)/std and scaled by strength), or a Saliency roi"
            )
        if self.mode == "reroute" and self.decode_only is False:
            raise SteeringError(_REROUTE_PREFILL, field="decode_only")
        if self.mode in REDIRECTS and self.roi and not self.domain and not has_image:
            raise SteeringError(
                f"mode={self.mode!r} needs a domain: the cells to suppress while the ROI is "
                "boosted (Python: domain=Text('<all the facts>'); CLI: --domain); image "
                "targets default to their image",
                field="domain",
            )

    # -- values -----------------------------------------------------------------------------
    def replace(self, **changes) -> SteeringConfig:
        """A copy with ``changes``. heads= and headmap=/top_k= choose heads: naming one drops
        the other's choice (a new headmap's defaults apply to its own heads)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            known = sorted(f.name for f in dataclasses.fields(self))
            raise SteeringError(f"unknown argument(s) {sorted(unknown)}; known: {known}")
        if "heads" in changes and "top_k" not in changes:
            changes["top_k"] = None
        if ("headmap" in changes or "top_k" in changes) and "heads" not in changes:
            changes["heads"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-safe: heads as "all"/"layers:A-B"/[[l, h], ...]/{"mask": [[0, 1, ...]]}, targets
        as {"type": "Panel", ...}, the headmap as its JSON."""
        h = self.heads
        if isinstance(h, HeadMask):
            h = {"mask": h.array().astype(int).tolist()}
        elif isinstance(h, tuple):
            h = [list(p) for p in h]
        return {
            "heads": h,
            "roi": [_target_dict(t) for t in self.roi],
            "mode": self.mode,
            "strength": self.strength,
            "weights": list(self.weights) if self.weights is not None else None,
            "domain": [_target_dict(t) for t in self.domain],
            "decode_only": self.decode_only,
            "headmap": self.headmap.to_json() if self.headmap is not None else None,
            "top_k": self.top_k,
            "focus": self.focus,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SteeringConfig:
        if not isinstance(d, dict):
            raise SteeringError(f"a steering config is a JSON object, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SteeringError(f"steering config: unknown key(s) {sorted(unknown)}")
        d = dict(d)
        h = d.get("heads")
        if isinstance(h, dict) and set(h) == {"mask"}:
            d["heads"] = np.array(h["mask"], dtype=bool)
        for key in ("roi", "domain"):
            v = d.get(key)
            if isinstance(v, list):
                d[key] = tuple(_target_of(t) if isinstance(t, dict) else t for t in v)
        return cls(**d)

    # -- defaults -----------------------------------------------------------------------------
    def resolve(self, model: ModelIdentity | None = None, find=None) -> SteeringConfig:
        """Every field decided for ``model`` (None: no model known yet, so only a given
        headmap or FALLBACK): the rules of the module docstring. ``find``: the headmap
        lookup (default ``headmap.find_headmap``); the result's ``headmap`` is the map used."""
        hm = self.headmap
        if hm is None and self.heads is None and model is not None:
            if find is None:
                from llama_steer.headmap import find_headmap as find
            found = find(model)
            hm = found[0] if found else None
        if hm is not None and model is not None:
            hm.check_shape(model)
        image = _has_image(self.roi) or (self.mode == "image-boost")
        rec = hm.recommended() if hm is not None else {}
        use_rec = hm is not None and (image or not self.roi)  # a map's recipe is for images
        if self.heads is not None:
            heads = self.heads
        elif hm is not None:
            k = self.top_k if self.top_k is not None else min(int(rec["top_k"]), len(hm.heads))
            heads = tuple(hm.top(k))
        elif self.top_k is not None:
            raise SteeringError(
                f"top_k={self.top_k} takes a headmap's best heads, but none was given and none "
                "ships for this model: pass headmap=, or heads="
            )
        else:
            heads = FALLBACK["heads"]

        def pick(name, fallback):
            v = getattr(self, name)
            if v is not None:
                return v
            return rec[name] if use_rec and rec.get(name) is not None else fallback

        mode = pick("mode", "redirect" if image else "bias")
        strength = float(pick("strength", FALLBACK["strength"]))
        decode_only = bool(pick("decode_only", mode == "reroute" or FALLBACK["decode_only"]))
        if mode == "reroute" and not decode_only:
            raise SteeringError(_REROUTE_PREFILL, field="decode_only")
        focus = self.focus or (rec.get("focus") if use_rec else None) or FALLBACK["focus"]
        if focus == "content" and (self.weights is not None or not image or mode == "shift"):
            focus = "none"  # a recommendation that does not apply here (text ROI, saliency)
        out = dataclasses.replace(
            self,
            heads=heads,
            mode=mode,
            strength=strength,
            decode_only=decode_only,
            focus=focus,
            headmap=hm,
            top_k=None,
        )
        return out

    @property
    def resolved(self) -> bool:
        """Every default decided (``resolve`` made it)."""
        return None not in (self.heads, self.mode, self.strength, self.decode_only, self.focus)

    # -- for a model and a prompt -------------------------------------------------------------
    def heads_mask(self, n_layer: int, n_head: int) -> np.ndarray:
        """bool (n_layer, n_head) of a resolved config, checked against the model's shape."""
        L, H = n_layer, n_head
        heads = self.heads
        if heads is None:
            raise SteeringError("heads are not decided yet: resolve() the config for a model")
        if isinstance(heads, HeadMask):
            if heads.shape != (L, H):
                hint = " (transposed? rows are layers)" if heads.shape == (H, L) else ""
                raise SteeringError(
                    f"heads array has shape {heads.shape} but the model has {L} layers x {H} "
                    f"heads: pass a bool mask of shape ({L}, {H}){hint}",
                    field="heads",
                )
            return heads.array()
        if heads == "all":
            return np.ones((L, H), dtype=bool)
        if isinstance(heads, str):  # layers:A-B
            a, _, b = heads[7:].partition("-")
            lo, hi = int(a), int(b or a)
            if not 0 <= lo <= hi < L:
                raise SteeringError(
                    f"heads={heads!r}: the model has layers 0..{L - 1}", field="heads"
                )
            m = np.zeros((L, H), dtype=bool)
            m[lo : hi + 1] = True
            return m
        m = np.zeros((L, H), dtype=bool)
        for layer, head in heads:
            if not (0 <= layer < L and 0 <= head < H):
                raise SteeringError(
                    f"head (layer {layer}, head {head}) is outside the model "
                    f"({L} layers x {H} query heads, 0-based)",
                    field="heads",
                )
            m[layer, head] = True
        return m

    def target_cells(self, seq: Seq) -> tuple[np.ndarray, np.ndarray | None]:
        """(cells int64, ROI weights float64 or None) the edit targets in ``seq``, focus
        applied."""
        if self.mode == "image-boost" and not self.roi:
            if not seq.images:
                raise SteeringError("mode='image-boost' needs an image in the prompt")
            cells = np.unique(np.concatenate([im.cells for im in seq.images]))
            w_roi = None
        else:
            cells, w_roi = _roi.resolve(self.roi, seq)
        if self.focus == "content":
            cells = focus_content(cells, seq)
        return cells, w_roi

    def bias(self, seq: Seq) -> tuple[np.ndarray, float]:
        """(bias float32 (n_cells,) in logit units, tail: the bias past the last cell) of a
        resolved config for the prompt ``seq``."""
        if not self.resolved:
            raise SteeringError("this config is not resolved: call resolve() first")
        s = self.strength
        mode = self.mode
        cells, w_roi = self.target_cells(seq)
        weights = np.asarray(self.weights) if self.weights is not None else None
        w = weights if weights is not None else w_roi
        if weights is not None and weights.size != cells.size:
            raise SteeringError(
                f"weights has {weights.size} values but the ROI covers {cells.size} cells: "
                "give one weight per ROI cell"
            )
        n = int(cells.max()) + 1 if cells.size else 0
        tail = 0.0
        dom = np.zeros(0, dtype=np.int64)
        if mode in REDIRECTS:
            dom = _roi.resolve(self.domain, seq)[0] if self.domain else domain_of(self.roi, seq)
            n = max(n, int(dom.max()) + 1 if dom.size else 0)
        bias = np.zeros(n, dtype=np.float64)
        if s == 0.0 or cells.size == 0:
            return bias.astype(np.float32), 0.0
        if mode in ("bias", "image-boost"):
            bias[cells] = s * (w if w is not None else 1.0)
        elif mode == "shift":
            sd = w.std()
            if not sd > 0:
                raise SteeringError(
                    "the saliency (weights) is constant over the ROI: (s - mean)/std is "
                    "undefined; pass a saliency that varies"
                )
            bias[cells] = s * (w - w.mean()) / sd
        elif mode in REDIRECTS:
            bias[dom] = -s
            bias[cells] = s
        elif mode == "emphasize":
            bias[:] = -s
            bias[cells] = 0.0
            tail = -s
        bias = np.clip(bias, -MAX_STRENGTH * 10, MAX_STRENGTH * 10)
        return bias.astype(np.float32), tail

    def describe_heads(self) -> str:
        h = self.heads
        if h is None:
            return f"top:{self.top_k}" if self.top_k else "default"
        if isinstance(h, str):
            return h
        n = int(h.array().sum()) if isinstance(h, HeadMask) else len(h)
        return f"<{n} heads>"


# -- targets as JSON -----------------------------------------------------------------------
def _target_dict(t) -> dict:
    d = {"type": type(t).__name__}
    for f in dataclasses.fields(t):
        v = getattr(t, f.name)
        if isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, os.PathLike):
            v = os.fspath(v)
        d[f.name] = list(v) if isinstance(v, tuple) else v
    return d


def _target_of(d: dict):
    kinds = {c.__name__: c for c in (_roi.Text, _roi.Tokens, *IMAGE_TARGETS)}
    kind = d.get("type")
    if kind not in kinds:
        raise SteeringError(f"roi item type {kind!r} is not one of {sorted(kinds)}")
    args = {k: v for k, v in d.items() if k != "type"}
    if kind == "Panel" and args.get("grid") is not None:
        args["grid"] = tuple(args["grid"])
    if kind == "Saliency" and isinstance(args.get("source"), list):
        args["source"] = np.asarray(args["source"], dtype=float)
    try:
        return kinds[kind](**args)
    except TypeError as e:
        raise SteeringError(f"roi item {d!r}: {e}") from None

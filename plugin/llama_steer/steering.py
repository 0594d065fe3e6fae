"""Steering configs.

    Steering .......... heads x target (roi.py) x mode x strength; ``update()`` republishes
    MODES, MAX_STRENGTH

How a config becomes a native bias vector (logit units, one value per KV cell):

    bias       b[target] = strength * w            w = 1, or ``weights`` (one per target cell)
    shift      b[target] = strength * (s - mean)/std   s = ``weights``, a saliency over the ROI
    redirect   b[domain] = -strength, b[target] = +strength   (the gaze-heads edit)
    emphasize  b[everything but target] = -strength          (PASTA: attention outside the
               target scaled by exp(-strength); strength 4.6 ~ PASTA's coefficient 0.01)
    image-boost  b[every image token] = +strength             (PAI/VAF against "text inertia":
               more attention to the image in the chosen heads; roi, if given, narrows it)

Cells: targets resolve to KV cells through ``roi.resolve`` against the prompt as ``Llama``
recorded it (text tokens, and images with their first cell and token grid).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import threading
import weakref
from typing import TYPE_CHECKING

import numpy as np

from llama_steer import _native
from llama_steer._errors import SteeringError
from llama_steer.roi import (
    IMAGE_TARGETS,
    Saliency,
    Seq,
    as_targets,
    domain_of,
    focus_content,
    resolve,
)

if TYPE_CHECKING:
    from llama_steer.llama import Llama

MODES = ("bias", "shift", "redirect", "emphasize", "image-boost")
# the constructor's arguments: what update() takes (the config keeps derived "_" keys too)
_ARGS = (
    "heads",
    "roi",
    "mode",
    "strength",
    "weights",
    "domain",
    "decode_only",
    "headmap",
    "top_k",
    "focus",
)
FOCUS = (None, "content")
# biases are finite and bounded so an edited row stays finite (no all -inf row, no NaN)
MAX_STRENGTH = 1.0e4


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


_HEADS_HELP = (
    "use 'all', 'layers:A-B' (every head of layers A..B), a list of (layer, head) pairs "
    "(0-based ints), or a bool array (n_layer, n_head)"
)


def _check_heads(heads):
    """The ``heads=`` argument as a value: None (not given), "all", "layers:A-B", a tuple of
    (layer, head) int pairs, or a read-only bool array (n_layer, n_head)."""
    if heads is None:
        return None
    if isinstance(heads, str):
        if heads != "all" and not re.fullmatch(r"layers:\d+(-\d+)?", heads):
            raise SteeringError(f"heads={heads!r}: {_HEADS_HELP}")
        if heads != "all":
            a, _, b = heads[7:].partition("-")
            if int(b or a) < int(a):
                raise SteeringError(f"heads={heads!r}: layers A-B needs A <= B")
        return heads
    if isinstance(heads, np.ndarray):
        if heads.ndim != 2:
            raise SteeringError(f"heads array has shape {heads.shape}: expected (n_layer, n_head)")
        if heads.dtype != bool:
            # 0/1 masks of another dtype are fine; anything else is not a selection
            if heads.dtype.kind not in "iuf" or not np.isin(heads, (0, 1)).all():
                raise SteeringError(
                    f"heads array of dtype {heads.dtype} holds values other than 0 and 1: "
                    "pass a bool mask (n_layer, n_head), True = steered"
                )
        mask = heads.astype(bool)  # a copy: later changes to the caller's array do not leak
        if not mask.any():
            raise SteeringError(
                "heads array selects no head: steering would do nothing (use strength=0 or "
                "close() to turn it off)"
            )
        mask.setflags(write=False)
        return mask
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


class Steering:
    """Which heads, which key cells, which mode, how strong.

    >>> steer = Steering(heads="all", roi=Text("Mary lives in Madrid."), strength=-8.0)
    >>> llm = Llama(model_path="gemma-3-270m-q4_k_m.gguf", steering=steer)
    >>> llm.steering.update(strength=0)     # next token on: the unsteered model

    heads: "all", a list of (layer, head) pairs (query heads, 0-based), or a bool array
        (n_layer, n_head).
    roi: the target: Text, Tokens, ImageTokens, Box, Panel, Region, Saliency (roi.py), a
        list of them (union), or a string in the CLI grammar ("panel:4/6", "50:99", ...).
    mode: one of MODES (see the module docstring).
    strength: logit units (added after the 1/sqrt(d) scale); 0 = no edit at all.
    weights: per-target-cell values, float array (n_target_cells,): real-valued mask for
        "bias", the saliency s for "shift".
    domain: for "redirect": the cells to suppress (the target is boosted); defaults to the
        whole image for image targets.
    decode_only: edit only generated tokens' queries (the gaze-heads default) instead of
        prompt and generated tokens.
    focus: None, or "content": narrow image targets to the tokens that show something
        (drawings and comics: a panel's plain background is left out of the boost; rule in
        vision.py). Redirect then suppresses the target's background with the rest.
    headmap, top_k: take ``heads`` from a Headmap (or its JSON path): its top_k heads
        (default: the headmap's recommended top_k). Checked against the model when attached.
    """

    def __init__(
        self,
        heads=None,
        roi=None,
        mode: str = "bias",
        strength: float = 4.0,
        weights=None,
        domain=None,
        decode_only: bool = False,
        headmap=None,
        top_k: int | None = None,
        focus: str | None = None,
    ):
        self._lock = threading.RLock()
        # weak: the model owns its Steering; a cycle would leave the model to the final garbage
        # collection, after Python has closed the std streams llama-cpp-python frees through
        self._llm_ref: weakref.ref | None = None
        self._hook: _native.Hook | None = None
        self._key = 0  # id of the published edit (0: none); equal edits get equal ids
        self._key_ids: dict[bytes, int] = {}
        self._last_key_id = 0
        self._edits = False
        self._phases = 0
        self._cfg: dict = {}
        self._published: tuple | None = None
        # an update() made between generations: published lazily by the next generate(), or
        # by the next raw eval() (llama.py), which would otherwise run the old config
        self._stale = False
        self._observer: dict = {}  # observer part of the native config (see _observing)
        self._edit_on = True
        self._bias_memo: tuple | None = None  # (cfg, prompt key, pixels, result): see _bias
        self._validate_and_set(
            dict(
                heads=heads,
                roi=roi,
                mode=mode,
                strength=strength,
                weights=weights,
                domain=domain,
                decode_only=decode_only,
                headmap=headmap,
                top_k=top_k,
                focus=focus,
            )
        )

    # -- public -----------------------------------------------------------------------------
    @property
    def heads(self):
        """The heads steered: as given by ``heads=``, else the headmap's top_k as (layer,
        head) pairs, else "all"."""
        return self._cfg["_heads"]

    @property
    def roi(self) -> tuple:
        return self._cfg["roi"]

    @property
    def mode(self) -> str:
        return self._cfg["mode"]

    @property
    def strength(self) -> float:
        return self._cfg["strength"]

    @property
    def decode_only(self) -> bool:
        return self._cfg["decode_only"]

    @property
    def focus(self) -> str | None:
        return self._cfg["focus"]

    def update(self, **changes) -> Steering:
        """Change any constructor argument; takes effect at the next evaluated token, also
        while another thread is streaming a generation (targets then resolve against the
        tokens evaluated so far). Between generations the change is checked and applied at
        the next generation's prompt.

        >>> llm.steering.update(strength=0)
        >>> llm.steering.update(roi=Text("John lives in Berlin."), mode="bias", strength=6)
        """
        unknown = set(changes) - set(_ARGS)
        if unknown:
            raise SteeringError(
                f"update() got unknown argument(s) {sorted(unknown)}; known: {sorted(_ARGS)}"
            )
        with self._lock:
            new = {k: self._cfg[k] for k in _ARGS}
            # heads= and headmap= both choose heads: the one named now replaces the other
            if "heads" in changes and "headmap" not in changes:
                new["headmap"], new["top_k"] = None, None
            if "headmap" in changes and "heads" not in changes:
                new["heads"] = None
            new.update(changes)
            old = self._cfg
            self._validate_and_set(new)
            if self._llm is not None:
                try:
                    self._heads_mask()  # a head outside the model: refused now, not per token
                    self._stale = True  # raw eval() publishes it (a generation does anyway)
                    self._llm._steer_republish()
                except Exception:
                    self._cfg = old
                    raise
        return self

    def retarget(self, roi) -> Steering:
        """``update(roi=roi)``."""
        return self.update(roi=roi)

    def stats(self) -> _native.Stats:
        """Callback counters since the start of the last generation (hooked nodes, rows)."""
        return self._require_llm()._steer_hook.last_stats()

    def attention_to(self, target=None, steered: bool = True) -> np.ndarray:
        """Attention mass on ``target`` (default: the ROI) per layer and head, for the last
        evaluated token: float32 (n_layer, n_head), probabilities summed over the target's
        cells (0..1). The seeds' "ROI focus". ``steered=False`` reads the unsteered model.

        >>> llm.create_completion(prompt, max_tokens=1)
        >>> focus = llm.steering.attention_to(Text("Mary lives in Madrid."))
        >>> focus.mean()
        """
        return self._require_llm()._steer_attention_to(
            as_targets(target) if target is not None else self.roi, steered
        )

    def close(self) -> None:
        """Detach from the model: it runs unsteered from the next token on, as if made
        without ``steering=`` (cached cells computed under an edit are dropped, so the next
        completion is the plain model's, token for token). Safe to call twice.

        >>> with Steering(roi=Text("Berlin")) as st:
        ...     llm = Llama(model_path=path, steering=st)
        >>> llm.steering is None                # closed at the block's end: unsteered now
        """
        with self._lock:
            llm = self._llm
            if self._hook is not None and llm is not None:
                try:
                    self._hook.set_config(None, np.zeros(0, np.float32), phases=0)
                except Exception:
                    pass  # the hook is already closed (the model went first)
                llm._steer_detach()
            self._llm_ref = None

    def __enter__(self) -> Steering:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self._cfg
        heads = c["_heads"] if isinstance(c["_heads"], str) else f"<{self._n_heads_desc()}>"
        return (
            f"Steering(heads={heads}, roi={list(c['roi'])}, mode={c['mode']!r}, "
            f"strength={c['strength']:g}, decode_only={c['decode_only']}"
            + (f", focus={c['focus']!r})" if c["focus"] else ")")
        )

    # -- validation -------------------------------------------------------------------------
    def _n_heads_desc(self) -> str:
        h = self._cfg["_heads"]
        if isinstance(h, np.ndarray):
            return f"{int(h.sum())} heads"
        return f"{len(h)} heads"

    def _validate_and_set(self, cfg: dict) -> None:
        mode = cfg["mode"]
        if mode not in MODES:
            raise SteeringError(f"mode={mode!r} is not one of {MODES}")
        cfg["strength"] = _check_strength(cfg["strength"])
        cfg["roi"] = as_targets(cfg["roi"])
        cfg["domain"] = as_targets(cfg["domain"])
        if not isinstance(cfg["decode_only"], bool | np.bool_):
            raise SteeringError(f"decode_only={cfg['decode_only']!r}: pass True or False")
        cfg["decode_only"] = bool(cfg["decode_only"])
        cfg["heads"] = _check_heads(cfg["heads"])
        hm = cfg["headmap"]
        if hm is not None:
            from llama_steer.headmap import Headmap

            if cfg["heads"] is not None:
                raise SteeringError(
                    "heads= and headmap= both choose the heads: give one (headmap= with top_k= "
                    "takes its best heads; heads= names them)"
                )
            if isinstance(hm, dict):
                hm = Headmap.from_json(hm)
            elif isinstance(hm, str | os.PathLike):
                hm = Headmap.load(hm)
            elif not isinstance(hm, Headmap):
                raise SteeringError(
                    f"headmap={type(hm).__name__}: pass a Headmap, a path to its JSON, or the "
                    "parsed JSON dict"
                )
            cfg["headmap"] = hm
            if not hm.heads:
                raise SteeringError(
                    "this headmap lists no heads: score the model (`llama-steer score`) or "
                    "convert a ranking with scripts/convert_headmap.py"
                )
            k = cfg["top_k"]
            if k is None:
                k = min(int(hm.recommended()["top_k"]), len(hm.heads))
            elif isinstance(k, bool) or not isinstance(k, int | np.integer):
                raise SteeringError(f"top_k={k!r}: pass an int, 1..{len(hm.heads)}")
            cfg["_heads"] = tuple(hm.top(int(k)))
        elif cfg["top_k"] is not None:
            raise SteeringError("top_k= goes with headmap=: pass the headmap to rank heads by")
        else:
            cfg["_heads"] = "all" if cfg["heads"] is None else cfg["heads"]
        w = cfg["weights"]
        if w is not None:
            w = np.asarray(w, dtype=np.float64).reshape(-1)
            if not np.all(np.isfinite(w)):
                raise SteeringError("weights contain NaN or infinity: pass finite values")
            cfg["weights"] = w
        has_saliency = any(isinstance(t, Saliency) for t in cfg["roi"])
        if cfg["focus"] not in FOCUS:
            raise SteeringError(f"focus={cfg['focus']!r} is not one of {FOCUS}")
        if cfg["focus"] and (w is not None or has_saliency):
            raise SteeringError(
                "focus= narrows the ROI, but weights / a Saliency roi give one value per ROI "
                "cell: use one or the other"
            )
        if w is not None and has_saliency:
            raise SteeringError(
                "give the weights either as weights= or as a Saliency roi, not both"
            )
        if mode == "shift" and w is None and not has_saliency:
            raise SteeringError(
                "mode='shift' needs weights=: the saliency s over the ROI's cells "
                "(normalised to (s - mean)/std and scaled by strength), or a Saliency roi"
            )
        has_image = any(isinstance(t, IMAGE_TARGETS) for t in cfg["roi"])
        if cfg["focus"] and cfg["roi"] and not has_image:
            raise SteeringError(
                f"focus={cfg['focus']!r} narrows image targets to the tokens that show "
                "something, but this ROI has no image target: drop focus, or target an image "
                "region (panel:, box:, a named region)"
            )
        if mode == "redirect" and cfg["roi"] and not cfg["domain"] and not has_image:
            raise SteeringError(
                "mode='redirect' needs domain=: the cells to suppress while the ROI is "
                "boosted (e.g. domain=Text('<all the facts>')); image targets default to "
                "their image"
            )
        self._cfg = cfg

    # -- binding and publishing (called by Llama) -------------------------------------------
    def _attach(self, llm: Llama, hook: _native.Hook) -> None:
        with self._lock:
            if self._llm is not None:
                raise SteeringError(
                    "this Steering is already attached to a model: make one per Llama"
                )
            hm = self._cfg["headmap"]
            if hm is not None:
                import warnings

                for w in hm.check_model(llm.model_path, strict=False):
                    warnings.warn(w, stacklevel=3)
            self._llm_ref, self._hook = weakref.ref(llm), hook
            self._heads_mask()  # validate heads against the model now

    @property
    def _llm(self) -> Llama | None:
        return self._llm_ref() if self._llm_ref is not None else None

    def _require_llm(self) -> Llama:
        if self._llm is None:
            raise SteeringError("this Steering is not attached: pass it as Llama(steering=...)")
        return self._llm

    def _heads_mask(self) -> np.ndarray:
        L, H = self._hook.n_layer, self._hook.n_head
        heads = self._cfg["_heads"]
        if isinstance(heads, np.ndarray):
            if heads.shape != (L, H):
                hint = " (transposed? rows are layers)" if heads.shape == (H, L) else ""
                raise SteeringError(
                    f"heads array has shape {heads.shape} but the model has {L} layers x {H} "
                    f"heads: pass a bool mask of shape ({L}, {H}){hint}"
                )
            return heads
        if heads == "all":
            return np.ones((L, H), dtype=bool)
        if isinstance(heads, str):  # layers:A-B
            a, _, b = heads[7:].partition("-")
            lo, hi = int(a), int(b or a)
            if not 0 <= lo <= hi < L:
                raise SteeringError(f"heads={heads!r}: the model has layers 0..{L - 1}")
            m = np.zeros((L, H), dtype=bool)
            m[lo : hi + 1] = True
            return m
        m = np.zeros((L, H), dtype=bool)
        for layer, head in heads:
            if not (0 <= layer < L and 0 <= head < H):
                raise SteeringError(
                    f"head (layer {layer}, head {head}) is outside the model "
                    f"({L} layers x {H} query heads, 0-based)"
                )
            m[layer, head] = True
        return m

    def _target_cells(self, seq: Seq) -> tuple[np.ndarray, np.ndarray | None]:
        """(cells, ROI weights or None) the edit targets in ``seq``, focus applied."""
        c = self._cfg
        if c["mode"] == "image-boost" and not c["roi"]:
            if not seq.images:
                raise SteeringError("mode='image-boost' needs an image in the prompt")
            cells, w_roi = np.unique(np.concatenate([im.cells for im in seq.images])), None
        else:
            cells, w_roi = resolve(c["roi"], seq)
        if c["focus"] == "content":
            cells = focus_content(cells, seq)
        return cells, w_roi

    def _bias(self, seq: Seq) -> tuple[np.ndarray, float]:
        """(bias per cell float32 logit units, tail) for the current config and prompt;
        remembered for the last (config, prompt): a generation publishes the same pair
        twice (prompt layout, then generate), ~0.4 ms each between decode steps."""
        images = [
            (im.grid, im.first_cell, im.first_pos, im.n_pos, id(im.pixels)) for im in seq.images
        ]
        key = (tuple(seq.tokens), tuple(images))
        memo = self._bias_memo
        if memo is not None and memo[0] is self._cfg and memo[1] == key:
            return memo[3]
        out = self._compute_bias(seq)
        out[0].setflags(write=False)
        # the memo holds the config and the pixel arrays, so their ids in the key stay theirs
        self._bias_memo = (self._cfg, key, [im.pixels for im in seq.images], out)
        return out

    def _compute_bias(self, seq: Seq) -> tuple[np.ndarray, float]:
        c = self._cfg
        s = c["strength"]
        mode = c["mode"]
        cells, w_roi = self._target_cells(seq)
        w = c["weights"] if c["weights"] is not None else w_roi
        if c["weights"] is not None and c["weights"].size != cells.size:
            raise SteeringError(
                f"weights has {c['weights'].size} values but the ROI covers {cells.size} "
                "cells: give one weight per ROI cell"
            )
        n = int(cells.max()) + 1 if cells.size else 0
        tail = 0.0
        dom = np.zeros(0, dtype=np.int64)
        if mode == "redirect":
            dom = resolve(c["domain"], seq)[0] if c["domain"] else domain_of(c["roi"], seq)
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
        elif mode == "redirect":
            bias[dom] = -s
            bias[cells] = s
        elif mode == "emphasize":
            bias[:] = -s
            bias[cells] = 0.0
            tail = -s
        bias = np.clip(bias, -MAX_STRENGTH * 10, MAX_STRENGTH * 10)
        return bias.astype(np.float32), tail

    def _publish(self, seq: Seq | None = None) -> None:
        """Resolve against ``seq`` (default: what the model has evaluated) and publish."""
        llm = self._require_llm()
        with self._lock:
            if seq is None:
                seq = llm._steer_seq()
            bias, tail = self._bias(seq)
            self._stale = False
            if self._published is not None and self._published[1] is bias:
                return  # the memo's answer for the same config and prompt: published already
            heads = self._heads_mask()
            phases = _native.PHASE_DECODE
            if not self._cfg["decode_only"]:
                phases |= _native.PHASE_PREFILL
            edits = bool(heads.any()) and (bool(np.any(bias != 0)) or tail != 0.0)
            self._published = (heads, bias, tail, phases)
            self._edits = edits
            self._phases = phases
            if edits:
                hsh = hashlib.sha1()
                for a in (heads.astype(np.uint8), bias, np.float32(tail), np.int32(phases)):
                    hsh.update(np.ascontiguousarray(a).tobytes())
                self._key = self._key_id(hsh.digest())
            else:
                self._key = 0
            self._apply()

    def _key_id(self, digest: bytes) -> int:
        """A small int per distinct edit, never reused: the hook reports it back with each
        eval and cells record it (llama.py), so equal edits must get equal ids."""
        ids = self._key_ids
        if digest not in ids:
            if len(ids) >= 4096:  # a long chat of retargets: forget old edits (costs re-evals)
                ids.clear()
            self._last_key_id += 1
            ids[digest] = self._last_key_id
        return ids[digest]

    def _apply(self) -> None:
        """Send the published edit and the current observer to the hook."""
        heads, bias, tail, phases = self._published
        self._hook.set_config(
            heads if self._edit_on else None,
            bias,
            tail=tail,
            phases=phases,
            key=self._key,
            **self._observer,
        )

    @contextlib.contextmanager
    def _observing(self, region: np.ndarray, n_regions: int, rows: int, edit: bool = True):
        """Within the block the hook also sums attention per region (region id per KV cell,
        int16, -1 = none) over every layer; ``edit=False`` turns the edits off meanwhile."""
        hook = self._hook
        with self._lock:
            self._observer = dict(
                region=region,
                n_regions=n_regions,
                obs_layers=np.ones(hook.n_layer, dtype=bool),
                obs_rows=rows,
            )
            self._edit_on = edit
            if self._published is not None:
                self._apply()
        try:
            yield
        finally:
            with self._lock:
                self._observer = {}
                self._edit_on = True
                if self._published is not None:
                    self._apply()

    def _key_for(self, phase: int) -> int:
        """What a cell evaluated now in ``phase`` is computed under (0 = unedited); the hook
        reports the same for each eval (``eval_key``)."""
        return self._key if (self._edits and self._edit_on and self._phases & phase) else 0

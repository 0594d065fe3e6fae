"""The runtime handle: a SteeringConfig (config.py) attached to a model, published to the
native hook for each prompt, and the public observer.

    Steering ........... Steering(roi=..., ...) or Steering(SteeringConfig(...)); update()
                         replaces the config and republishes; observe() reads attention;
                         close() detaches (context manager)
    Observer ........... attention mass of the model's heads on named regions, per token
    MODES, MAX_STRENGTH  (from config.py)

What the hook gets: the resolved config's head mask and its bias per KV cell for the prompt
as ``Llama`` recorded it (text tokens, images with their first cell and token grid).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import weakref
from typing import TYPE_CHECKING

import numpy as np

from llama_steer import _native
from llama_steer._errors import SteeringError
from llama_steer.config import FALLBACK, MAX_STRENGTH, MODES, HeadMask, SteeringConfig
from llama_steer.roi import IMAGE_TARGETS, Seq, as_targets, resolve

if TYPE_CHECKING:
    from llama_steer.headmap import ModelIdentity
    from llama_steer.llama import Llama

__all__ = ["MAX_STRENGTH", "MODES", "Observer", "Steering"]

_log = logging.getLogger("llama_steer")
_told_no_headmap: set = set()  # models already told that no headmap ships for them


class Steering:
    """Which heads, which key cells, which mode, how strong: a SteeringConfig, attached to a
    model by ``Llama(steering=...)``.

    >>> steer = Steering(roi=Panel(4, grid=(2, 3)))          # defaults: the model's headmap
    >>> llm = Llama(model_path=..., chat_handler=..., steering=steer)
    >>> llm.steering.update(strength=0)                       # next token on: unsteered

    Keyword arguments are SteeringConfig's fields (see config.py for each and for how the
    defaults are decided); ``Steering(cfg, strength=2.0)`` starts from a config. Properties
    read the config as decided for the attached model (before attaching: for no model).
    """

    def __init__(self, config: SteeringConfig | None = None, /, **fields):
        if config is not None and not isinstance(config, SteeringConfig):
            raise SteeringError(
                f"Steering({type(config).__name__}): pass a SteeringConfig, or the fields as "
                "keyword arguments (roi=..., mode=..., ...)"
            )
        if config is None:
            config = SteeringConfig(**fields)
        elif fields:
            config = config.replace(**fields)
        self._lock = threading.RLock()
        self._config = config
        self._resolved = config.resolve(None)  # for no model; again at attach
        self._model: ModelIdentity | None = None
        # weak: the model owns its Steering; a cycle would leave the model to the final garbage
        # collection, after Python has closed the std streams llama-cpp-python frees through
        self._llm_ref: weakref.ref | None = None
        self._hook: _native.Hook | None = None
        self._mask: np.ndarray | None = None  # the resolved heads for the model
        self._key = 0  # id of the published edit (0: none); equal edits get equal ids
        self._key_ids: dict[bytes, int] = {}
        self._last_key_id = 0
        self._edits = False
        self._phases = 0
        self._published: tuple | None = None
        self._seq: Seq | None = None  # the prompt last published against
        # an update() made between generations: published lazily by the next generate(), or
        # by the next raw eval() (llama.py), which would otherwise run the old config
        self._stale = False
        self._observer: Observer | None = None
        self._obs_native: dict = {}  # observer part of the native config (see _apply)
        self._edit_on = True
        self._bias_memo: tuple | None = None  # (cfg, prompt key, pixels, result): see _bias

    # -- the config ---------------------------------------------------------------------------
    @property
    def config(self) -> SteeringConfig:
        """The config as given (None fields: defaults)."""
        return self._config

    @property
    def resolved(self) -> SteeringConfig:
        """The config with every default decided for the attached model."""
        return self._resolved

    @property
    def heads(self):
        """The heads steered: "all", "layers:A-B", (layer, head) pairs, or a bool mask."""
        h = self._resolved.heads
        return h.array() if isinstance(h, HeadMask) else h

    @property
    def mask(self) -> np.ndarray:
        """bool (n_layer, n_head): the heads steered on the attached model."""
        self._require_llm()
        return self._mask

    @property
    def roi(self) -> tuple:
        return self._resolved.roi

    @property
    def mode(self) -> str:
        return self._resolved.mode

    @property
    def strength(self) -> float:
        return self._resolved.strength

    @property
    def decode_only(self) -> bool:
        return self._resolved.decode_only

    @property
    def focus(self) -> str | None:
        """ "content", or None (no focus)."""
        return None if self._resolved.focus == "none" else self._resolved.focus

    def update(self, **changes) -> Steering:
        """Replace fields of the config and republish: from the next evaluated token, also
        while another thread streams a generation (targets then resolve against the tokens
        evaluated so far); between generations at the next prompt or raw eval(). A bad value
        is refused here and leaves the config as it was.

        >>> llm.steering.update(strength=0)
        >>> llm.steering.update(roi=Text("John lives in Berlin."), mode="bias", strength=6)
        """
        with self._lock:
            config = self._config.replace(**changes)
            resolved, mask = self._decide(config)
            old = self._config, self._resolved, self._mask
            self._config, self._resolved, self._mask = config, resolved, mask
            if self._llm is not None:
                try:
                    self._stale = True  # raw eval() publishes it (a generation does anyway)
                    self._llm._steer_republish()
                except Exception:
                    self._config, self._resolved, self._mask = old
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

    def observe(self, regions, rows: str = "last", edit: bool = True) -> Observer:
        """An Observer of attention on ``regions`` (see Observer), from the next eval on.

        >>> with llm.steering.observe({"left": Region("left"), "right": Region("right")}) as obs:
        ...     llm.create_chat_completion(messages, max_tokens=1)
        >>> obs.mass()                 # (2,) mean over the steered heads, last token
        """
        return Observer(self, regions, rows=rows, edit=edit)

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
            self._observer = None

    def __enter__(self) -> Steering:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        r = self._resolved
        return (
            f"Steering(heads={r.describe_heads()}, roi={list(r.roi)}, mode={r.mode!r}, "
            f"strength={r.strength:g}, decode_only={r.decode_only}"
            + (f", focus={r.focus!r})" if r.focus == "content" else ")")
        )

    # -- binding (called by Llama) ----------------------------------------------------------
    def _decide(self, config: SteeringConfig) -> tuple[SteeringConfig, np.ndarray | None]:
        """(resolved config, head mask) for the attached model, or for none yet."""
        resolved = config.resolve(self._model)
        mask = None
        if self._hook is not None:
            mask = resolved.heads_mask(self._hook.n_layer, self._hook.n_head)
        return resolved, mask

    def _attach(self, llm: Llama, hook: _native.Hook) -> None:
        from llama_steer.headmap import ModelIdentity

        with self._lock:
            if self._llm is not None:
                raise SteeringError(
                    "this Steering is already attached to a model: make one per Llama"
                )
            model = ModelIdentity.of_gguf(llm.model_path)
            given = self._config.headmap
            if given is not None:
                import warnings

                for w in given.check_model(llm.model_path, strict=False):
                    warnings.warn(w, stacklevel=3)
            self._model, self._hook = model, hook
            try:
                self._resolved, self._mask = self._decide(self._config)
            except BaseException:
                self._model, self._hook = None, None
                raise
            self._llm_ref = weakref.ref(llm)
            self._tell_fallback(model)

    def _tell_fallback(self, model: ModelIdentity) -> None:
        """Say once per model that no headmap ships for it, when one would have been used
        (heads not given, an image ROI or none)."""
        c, r = self._config, self._resolved
        if r.headmap is not None or c.heads is not None:
            return
        if r.mode != "image-boost" and not any(isinstance(t, IMAGE_TARGETS) for t in r.roi):
            return  # no ROI, or text ROIs: every head by design (no gaze heads to find)
        key = (model.architecture, model.n_layer, model.n_head, model.fingerprint)
        if key in _told_no_headmap:
            return
        _told_no_headmap.add(key)
        _log.warning(
            "llama-steer: no headmap for this model (%s, %d layers x %d heads%s): steering %s "
            "heads; score one with `llama-steer score -o ~/.cache/llama-steer/headmaps/NAME.json`"
            " or convert a published ranking with scripts/convert_headmap.py",
            model.architecture,
            model.n_layer,
            model.n_head,
            f", {model.name}" if model.name else "",
            FALLBACK["heads"],
        )

    @property
    def _llm(self) -> Llama | None:
        return self._llm_ref() if self._llm_ref is not None else None

    def _require_llm(self) -> Llama:
        if self._llm is None:
            raise SteeringError("this Steering is not attached: pass it as Llama(steering=...)")
        return self._llm

    # -- publishing -------------------------------------------------------------------------
    def _bias(self, seq: Seq) -> tuple[np.ndarray, float]:
        """(bias per cell float32 logit units, tail) for the current config and prompt;
        remembered for the last (config, prompt): a generation publishes the same pair
        twice (prompt layout, then generate), ~0.4 ms each between decode steps."""
        images = [
            (im.grid, im.first_cell, im.first_pos, im.n_pos, id(im.pixels)) for im in seq.images
        ]
        key = (tuple(seq.tokens), tuple(images))
        cfg = self._resolved
        memo = self._bias_memo
        if memo is not None and memo[0] is cfg and memo[1] == key:
            return memo[3]
        out = cfg.bias(seq)
        out[0].setflags(write=False)
        # the memo holds the config and the pixel arrays, so their ids in the key stay theirs
        self._bias_memo = (cfg, key, [im.pixels for im in seq.images], out)
        return out

    def _publish(self, seq: Seq | None = None) -> None:
        """Resolve against ``seq`` (default: what the model has evaluated) and publish."""
        llm = self._require_llm()
        with self._lock:
            if seq is None:
                seq = llm._steer_seq()
            bias, tail = self._bias(seq)
            self._stale = False
            self._seq = seq
            obs = self._observer
            if obs is not None:
                obs._prepare(seq)
            elif self._published is not None and self._published[1] is bias:
                return  # the memo's answer for the same config and prompt: published already
            heads = self._mask
            phases = _native.PHASE_DECODE
            if not self._resolved.decode_only:
                phases |= _native.PHASE_PREFILL
            if self._resolved.mode == "reroute":
                phases |= _native.KEEP_SHARE
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
            **self._obs_native,
        )

    def _set_observer(self, native: dict, edit: bool) -> None:
        """The observer part of the native config (region id per KV cell, int16, -1 = none;
        n_regions; layers; rows), sent with the edit; ``edit=False`` turns edits off."""
        with self._lock:
            self._obs_native, self._edit_on = native, edit
            if self._published is not None:
                self._apply()

    @contextlib.contextmanager
    def _observing(self, region: np.ndarray, n_regions: int, rows: int, edit: bool = True):
        """Runtime-internal (attention_to): sum attention per region (region id per KV cell)
        over every layer within the block."""
        hook = self._hook
        native = dict(
            region=region,
            n_regions=n_regions,
            obs_layers=np.ones(hook.n_layer, dtype=bool),
            obs_rows=rows,
        )
        saved = self._obs_native, self._edit_on
        self._set_observer(native, edit)
        try:
            yield
        finally:
            self._set_observer(*saved)

    def _key_for(self, phase: int) -> int:
        """What a cell evaluated now in ``phase`` is computed under (0 = unedited); the hook
        reports the same for each eval (``eval_key``)."""
        return self._key if (self._edits and self._edit_on and self._phases & phase) else 0


_ROWS = {"last": _native.ROWS_LAST, "all": _native.ROWS_ALL}


class Observer:
    """Post-softmax attention of every layer's heads summed over named regions of the prompt,
    read per evaluated token; summed in C from ``kq_soft_max-<il>`` (no attention is copied).

    >>> with llm.steering.observe({"panel 1": Panel(1, of=6), "panel 2": Panel(2, of=6)}) as obs:
    ...     for chunk in llm.create_chat_completion(messages, stream=True):
    ...         print(obs.top(), chunk)     # the region the steered heads looked at most

    regions: {name: target(s)} or a list of targets (named "1", "2", ...), in the ROI grammar
        or as roi.py targets, resolved against each prompt; or "image-tokens": every token of
        the prompt's image its own region (named by index). A cell in several regions counts
        for the first.
    rows: "last" (each eval overwrites the sums with its last query row: per token) or "all"
        (every query row of every eval accumulates until ``read(reset=True)``).
    edit: False turns the edits off while observing (the unsteered model's attention).
    One observer per Steering at a time; ``close()`` (or the with-block's end) stops it.
    """

    def __init__(self, steering: Steering, regions, rows: str = "last", edit: bool = True):
        if rows not in _ROWS:
            raise SteeringError(f"rows={rows!r}: use 'last' (per token) or 'all' (accumulate)")
        if regions == "image-tokens":
            self.names: list[str] = []
            self._targets = None
        else:
            if isinstance(regions, dict):
                items = list(regions.items())
            elif isinstance(regions, str):
                items = [("1", regions)]
            else:
                items = [(str(i + 1), r) for i, r in enumerate(regions)]
            if not items:
                raise SteeringError("observe() needs at least one region")
            self.names = [str(n) for n, _ in items]
            self._targets = [as_targets(r) for _, r in items]
        self._st = steering
        self._rows = rows
        self._edit = edit
        self._region: np.ndarray | None = None
        llm = steering._require_llm()
        with steering._lock:
            if steering._observer is not None:
                raise SteeringError(
                    "this Steering already has an open observer: close it first (one at a time)"
                )
            steering._observer = self
            if steering._published is not None:
                # the prompt published last (a chat prompt's layout precedes its evaluation)
                self._prepare(steering._seq if steering._seq is not None else llm._steer_seq())
                steering._apply()

    @property
    def n_regions(self) -> int:
        return len(self.names)

    def _prepare(self, seq: Seq) -> None:
        """Region id per KV cell for ``seq`` -> the hook (with the steering's edit)."""
        st = self._st
        n = seq.n_cells
        region = np.full(n, -1, dtype=np.int16)
        if self._targets is None:  # image-tokens
            if not seq.images:
                raise SteeringError("observe('image-tokens') needs an image in the prompt")
            span = seq.images[0]
            k = span.grid.n_tokens
            region[span.first_cell : span.first_cell + k] = np.arange(k, dtype=np.int16)
            self.names = [str(i) for i in range(k)]
        else:
            for i in range(len(self._targets) - 1, -1, -1):  # the first region wins overlaps
                cells, _ = resolve(self._targets[i], seq)
                region[cells[cells < n]] = i
        same = self._region is not None and np.array_equal(self._region, region)
        self._region = region
        if not same or st._obs_native.get("obs_rows") != _ROWS[self._rows]:
            native = dict(
                region=region,
                n_regions=self.n_regions,
                obs_layers=np.ones(st._hook.n_layer, dtype=bool),
                obs_rows=_ROWS[self._rows],
            )
            st._obs_native, st._edit_on = native, self._edit

    def read(self, reset: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(mass float32 (n_layer, n_head, n_regions): probabilities summed over each
        region's cells and, with rows="all", over the query rows; rows uint64 (n_layer,):
        query rows summed per layer). Zeros before the first eval."""
        self._alive()
        mass, rows = self._st._hook.read_obs(reset=reset)
        if mass.shape[2] != self.n_regions:  # nothing observed yet with these regions
            mass = np.zeros((*mass.shape[:2], self.n_regions), np.float32)
        return mass, rows

    def mass(self, heads=None) -> np.ndarray:
        """float32 (n_regions,): the mean over ``heads`` (a bool mask (n_layer, n_head);
        default: the steered heads) of the attention each region got (rows="last": the last
        evaluated token)."""
        m, rows = self.read()
        m = m / np.maximum(rows, 1).astype(np.float32)[:, None, None]  # per query row
        mask = self._st._mask if heads is None else np.asarray(heads, dtype=bool)
        sel = m[mask]
        return sel.mean(axis=0) if sel.size else np.zeros(self.n_regions, np.float32)

    def top(self, heads=None) -> str | None:
        """The name of the region with the most attention (``mass``), None when none got any."""
        m = self.mass(heads)
        return self.names[int(m.argmax())] if m.size and m.max() > 0 else None

    def _alive(self) -> None:
        if self._st._observer is not self:
            raise SteeringError("this observer is closed")

    def close(self) -> None:
        """Stop observing (safe twice)."""
        st = self._st
        with st._lock:
            if st._observer is self:
                st._observer = None
                if st._hook is not None and st._llm is not None:
                    st._set_observer({}, True)

    def __enter__(self) -> Observer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

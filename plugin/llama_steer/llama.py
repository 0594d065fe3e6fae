"""``llama_steer.Llama``: ``llama_cpp.Llama`` plus ``steering=``.

    Llama.__init__ ..... installs the native callback as cb_eval (context params), binds it
                         to the model (ABI check), reads each layer's softmax scale; with a
                         multimodal chat handler, watches how mtmd lays images into the cache
    Llama.generate ..... publishes the config for this prompt, drops cached cells whose KV
                         was computed under another config, runs the parent's generate
    Llama.eval ......... pins the config for one decode, checks hooks fired, tracks cells
    Llama.steering ..... the attached ``Steering``
    Llama.images ....... the images of the current prompt (ImageSpan: grid, first cell)

KV cells vs positions: llama-cpp-python counts *positions* (``n_tokens``). Text tokens take
one cell and one position each; an image takes nx*ny cells but, with M-RoPE, only n_pos
positions. So the cell of position p is p plus, for every image before p, its tokens minus
its positions. Generated tokens follow the last cell.

Without ``steering`` nothing is installed: the object is exactly the parent.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import inspect
import weakref
from collections.abc import Sequence

import llama_cpp
import llama_cpp.llama_cpp as _lc
import numpy as np

from llama_steer import _mtmd, _native
from llama_steer._errors import SteeringError
from llama_steer._load import PARAMS_LOCK, guarded_load
from llama_steer.roi import Seq, resolve
from llama_steer.steering import Steering
from llama_steer.vision import Geometry, GeometryError, ImageGrid, ImageSpan

__all__ = ["Llama"]

_DECODE = _native.PHASE_DECODE


def _no_gen() -> None:
    return None  # stands for a dead weak reference: no generation


# V cache types llama.cpp supports without flash attention (f32, f16, bf16)
_PLAIN_V_TYPES = {0, 1, 30}


@contextlib.contextmanager
def _cb_eval_in_default_params(hook: _native.Hook):
    """The parent's __init__ builds its context params from llama_context_default_params();
    hand it params that already carry our callback, for the duration of __init__ only."""
    cb = _lc.ggml_backend_sched_eval_callback(_native.callback_address())
    original = _lc.llama_context_default_params

    def with_callback():
        p = original()
        p.cb_eval = cb
        p.cb_eval_user_data = hook.handle_address
        return p

    with PARAMS_LOCK:
        _lc.llama_context_default_params = with_callback
        try:
            yield cb
        finally:
            _lc.llama_context_default_params = original


# Steered models still open when the interpreter exits are closed from atexit, while the std
# streams are open: left to finalization (a traceback or a global keeping one alive), the
# parent's close() frees mtmd through a stdout/stderr redirect that fails on closed streams.
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live() -> None:
    for llm in list(_LIVE):
        with contextlib.suppress(Exception):
            llm.close()


class _MtmdWatch:
    """Stands in for a chat handler's ``mtmd_cpp`` module: records the chunk layout when a
    prompt is tokenized (so image ROIs resolve before anything is evaluated) and brackets
    each image chunk's decode like ``Llama.eval``. Everything else goes to the module."""

    def __init__(self, module, llm: Llama, mmproj: str):
        self._m = module
        self._llm = weakref.proxy(llm)  # the model owns its handler: no cycle (see Steering)
        self._recent: list[np.ndarray] = []  # pixels of the last prompts' images (see _pixels)
        self._unmapped = ""  # why pixel ROIs are unavailable, when they are
        try:
            self._geometry: Geometry | None = Geometry.from_mmproj(mmproj)
        except GeometryError as e:
            self._geometry, self._unmapped = None, str(e)  # token ranges still work
        except (OSError, KeyError, ValueError) as e:
            self._geometry = None
            self._unmapped = f"the mmproj's resize rule could not be read ({e})"

    def __getattr__(self, name):
        return getattr(self._m, name)

    def mtmd_tokenize(self, ctx, chunks, text, bitmaps, n_bitmaps):
        rc = self._m.mtmd_tokenize(ctx, chunks, text, bitmaps, n_bitmaps)
        if rc == 0:
            pixels = [self._pixels(bitmaps[i]) for i in range(n_bitmaps)]
            self._llm._steer_prompt_layout(self._layout(chunks, pixels))
        return rc

    def _pixels(self, bitmap) -> np.ndarray:
        """(height, width, 3) uint8 copy of an image bitmap (for focus="content")."""
        m = self._m
        nx, ny = int(m.mtmd_bitmap_get_nx(bitmap)), int(m.mtmd_bitmap_get_ny(bitmap))
        n = int(m.mtmd_bitmap_get_n_bytes(bitmap))
        if n != nx * ny * 3:
            return np.zeros((ny, nx, 0), np.uint8)  # not RGB: size only, content unknown
        addr = ctypes.cast(m.mtmd_bitmap_get_data(bitmap), ctypes.c_void_p).value
        # from_address + frombuffer: np.ctypeslib.as_array builds a new ctypes type (~0.1 ms)
        view = np.frombuffer((ctypes.c_uint8 * n).from_address(addr), np.uint8).reshape(ny, nx, 3)
        # a chat resends its image with every turn: hand back the same array for the same
        # pixels, so what was derived from them (content focus) is found again by identity
        for old in self._recent:
            if old.shape == view.shape and np.array_equal(old, view):
                return old
        px = view.copy()
        px.setflags(write=False)
        self._recent = [px, *self._recent[:3]]  # a few: large photos are megabytes each
        return px

    def _layout(self, chunks, pixels: list) -> list:
        m = self._m
        out, img = [], 0
        for kind, ch in _mtmd.walk(m, chunks):
            if kind == "text":
                out.append(("text", ch))
                continue
            toks = m.mtmd_input_chunk_get_tokens_image(ch)
            nx, ny = m.mtmd_image_tokens_get_nx(toks), m.mtmd_image_tokens_get_ny(toks)
            n_tokens = m.mtmd_input_chunk_get_n_tokens(ch)
            n_pos = m.mtmd_input_chunk_get_n_pos(ch)
            px = pixels[img] if img < len(pixels) else np.zeros((0, 0, 0), np.uint8)
            img += 1
            grid = self._grid(px.shape[1], px.shape[0], nx, ny)
            out.append(("image", grid, int(n_tokens), int(n_pos), px if px.size else None))
        return out

    def _grid(self, w: int, h: int, nx: int, ny: int) -> ImageGrid:
        if self._geometry is not None and w > 0 and h > 0:
            g = self._geometry.grid(w, h)
            if (g.nx, g.ny) == (nx, ny):
                return g
            # without M-RoPE mtmd reports a fixed grid flat (nx = n_tokens, ny = 1)
            if self._geometry.flat and (nx, ny) == (g.n_tokens, 1):
                return g
        # the resize rule is unknown or disagrees with mtmd: keep mtmd's grid, and mark the
        # pixel mapping unusable (align 0) so box/panel ROIs refuse instead of guessing
        why = self._unmapped or (
            f"llama-steer predicted another token grid for this {w}x{h} image than mtmd "
            f"made ({nx}x{ny}), so pixel ROIs would guess: use image-token ranges"
        )
        return ImageGrid(
            width=max(w, 1),
            height=max(h, 1),
            nx=nx,
            ny=ny,
            align=0,
            content=(0, 0, 0, 0),
            unmapped=why,
        )

    def mtmd_helper_eval_chunk_single(
        self, ctx, lctx, chunk, n_past, seq_id, n_batch, logits_last, new_n_past
    ):
        llm = self._llm
        start = int(getattr(n_past, "value", n_past))
        phase = llm._steer_eval_phase  # prompt chunks: never inside a generation
        llm._steer_hook.begin_eval(phase)
        try:
            rc = self._m.mtmd_helper_eval_chunk_single(
                ctx, lctx, chunk, n_past, seq_id, n_batch, logits_last, new_n_past
            )
        finally:
            after = llm._steer_hook.end_eval()
        if after.flags:
            llm._steer_refuse(after.flags)
        llm._steer_last_phase = phase
        if rc == 0:
            llm._steer_record(start, int(new_n_past._obj.value), after.eval_key)
        return rc


_Parent = llama_cpp.Llama


class Llama(_Parent):
    """``llama_cpp.Llama`` with attention steering.

    >>> from llama_steer import Llama, Steering, Text
    >>> llm = Llama(model_path="gemma-3-270m-q4_k_m.gguf", steering=Steering(roi=Text("Berlin")))
    >>> llm.create_completion("John lives in Berlin. Where does John live?", temperature=0)

    Every argument and method of ``llama_cpp.Llama`` works as before. With ``steering``,
    flash attention must stay off (it removes the attention-score nodes the hook edits) and
    the V cache must be f16/f32/bf16; ``swa_full`` defaults to True so KV cell i holds token
    i in sliding-window layers too. With an mtmd chat handler (e.g. ``MTMDChatHandler``),
    image ROIs (``Panel``, ``Box``, ...) resolve against the images of each chat prompt.
    """

    def __init__(self, *args, steering: Steering | None = None, **kwargs):
        self._steering: Steering | None = None
        self._steer_hook: _native.Hook | None = None
        if steering is None:
            with guarded_load():  # the AMX guard (_load.py): plain models too
                super().__init__(*args, **kwargs)
            _LIVE.add(self)  # closed before the std streams go, like a steered model
            return
        if not isinstance(steering, Steering):
            raise SteeringError(f"steering={steering!r}: pass a llama_steer.Steering")
        # the parent's own signature (Llama.__mro__), not whatever llama_cpp.Llama names now:
        # llama-cpp-python's server loader is run with a subclass standing in for it
        bound = inspect.signature(_Parent.__init__).bind(self, *args, **kwargs)
        given = bound.arguments
        extra = given.get("kwargs", {})
        if given.get("flash_attn") or extra.get("flash_attn"):
            raise SteeringError(
                "flash_attn=True with steering: flash attention fuses QK^T, softmax and V into "
                "one op, so there are no attention scores to edit. Use flash_attn=False "
                "(the default)."
            )
        type_v = given.get("type_v")
        if type_v is not None and type_v not in _PLAIN_V_TYPES:
            raise SteeringError(
                f"type_v={type_v}: a quantized V cache needs flash attention, which steering "
                "cannot use. Use type_v=None (f16), GGML_TYPE_F32 or GGML_TYPE_BF16."
            )
        if given.get("swa_full") is False:
            raise SteeringError(
                "swa_full=False with steering: the sliding-window cache then reuses cells, so "
                "KV cell i no longer holds token i. Leave swa_full unset (steering sets True)."
            )
        kwargs["swa_full"] = True
        hook = _native.Hook()
        try:
            with guarded_load(), _cb_eval_in_default_params(hook) as cb:
                super().__init__(*args, **kwargs)
            self._steer_cb = cb  # keep the function pointer object alive with the context
            if ctypes.cast(self.context_params.cb_eval, ctypes.c_void_p).value != (
                _native.callback_address()
            ):
                raise SteeringError(
                    "llama-cpp-python did not take the eval callback from "
                    "llama_context_default_params(); this llama-cpp-python is not supported "
                    "(llama-steer pins 0.3.36)"
                )
            model = self._model.model
            hook.bind(_lc.llama_model_n_layer(model), _lc.llama_model_n_head(model))
            self._steer_hook = hook
            self._steer_cuda = None
            if (
                _lc.llama_supports_gpu_offload()
                and given.get("n_gpu_layers", 0) != 0
                and given.get("offload_kqv", True)
            ):
                # attention may live in GPU memory: give the hook its CUDA kernels (NVRTC)
                from llama_steer import _cuda

                self._steer_cuda = _cuda.attach(hook, device=given.get("main_gpu", 0))
            # phases: evals inside a generation (the live generator runs them) are its prompt,
            # then decode steps; any other eval is prefill (attention_to re-evaluates a token
            # in the phase it was made in through _steer_eval_phase)
            self._steer_gen = _no_gen  # weak ref to the generator of the last generate()
            self._steer_gen_seq: Seq | None = None  # its prompt, for an update() before it runs
            self._steer_next_phase = _native.PHASE_PREFILL
            self._steer_eval_phase = _native.PHASE_PREFILL
            self._steer_last_phase = _native.PHASE_PREFILL
            self._steer_cell_key: list[int] = []  # per position: key of the edit its KV had
            self._steer_images: list[ImageSpan] = []
            self._steer_piece_memo: dict[int, bytes] = {}
            self._steer_seq_memo: tuple | None = None
            self._steer_mem = _lc.llama_get_memory(self._ctx.ctx)  # fixed for the context
            self._steer_fresh_layout = False
            self._steer_calibrate()
            handler = given.get("chat_handler")
            if handler is not None and hasattr(handler, "_mtmd_cpp"):
                handler._mtmd_cpp = _MtmdWatch(
                    handler._mtmd_cpp, self, getattr(handler, "clip_model_path", "")
                )
            steering._attach(self, hook)
            _LIVE.add(self)
            self._steering = steering
        except BaseException:
            self._steer_hook = None
            if hasattr(self, "_stack"):
                super().close()  # free the context before the hook it points to
            hook.close()
            raise

    # -- public -----------------------------------------------------------------------------
    @property
    def steering(self) -> Steering | None:
        """The attached ``Steering`` (None when created without one)."""
        return self._steering

    @property
    def images(self) -> list[ImageSpan]:
        """Images of the current prompt, in order: grid, first KV cell, first position."""
        return list(getattr(self, "_steer_images", []))

    def _steer_detach(self) -> None:
        """Steering.close(): run as the plain model from now on; cells whose K/V an edit
        touched are dropped so that prefix reuse cannot carry the steering on."""
        self._steering = None
        keys = getattr(self, "_steer_cell_key", [])
        edited = next((i for i, k in enumerate(keys) if k != 0), None)
        if edited is not None and edited < self.n_tokens and getattr(self, "_ctx", None):
            self.n_tokens = edited
            self._ctx.kv_cache_seq_rm(-1, edited, -1)
            self._requires_eval = True
        if hasattr(self, "_steer_cell_key"):
            self._steer_cell_key = keys[: min(len(keys), self.n_tokens)]

    def close(self) -> None:
        """Free the model and context, then the hook. Safe to call twice."""
        if getattr(self, "_steering", None) is not None:
            self._steering.close()
        if hasattr(self, "_stack"):  # absent when __init__ failed before the parent's ran
            super().close()
        # the context is gone: no callback can run any more, so the hook may go
        if getattr(self, "_steer_hook", None) is not None:
            self._steer_hook.close()
        if getattr(self, "_steer_cuda", None) is not None:
            self._steer_cuda.close()

    # -- set-up -----------------------------------------------------------------------------
    def _steer_calibrate(self) -> None:
        """Evaluate one token so the hook reads every layer's softmax scale from the graph
        (edits are given in logit units), and check the graph has what steering needs."""
        hook = self._steer_hook
        bos = self._model.token_bos()
        tok = bos if bos >= 0 else 0
        hook.stats(reset=True)
        self._batch.set_batch(batch=[tok], n_past=0, logits_all=False)
        self._ctx.decode(self._batch)
        self._ctx.kv_cache_clear()
        self.n_tokens = 0
        st = hook.stats(reset=True)
        problems = _native.describe_flags(st.flags & ~_native.lib.STEER_F_NO_SCALE)
        if problems:
            raise SteeringError("; ".join(problems))
        missing = np.nonzero(hook.scales() <= 0)[0]
        if missing.size:
            raise SteeringError(
                f"no attention-score nodes (kq-<il>, kq_soft_max-<il>) found for layers "
                f"{missing.tolist()[:8]}{'...' if missing.size > 8 else ''}: flash attention is "
                "on, or this architecture computes attention in a fused op. Steering needs "
                "flash_attn=False."
            )

    # -- sequence and cells -----------------------------------------------------------------
    def _steer_pieces(self, tokens: Sequence[int], skip=()) -> list[bytes]:
        """Text of each token; b"" at positions in ``skip`` (images: llama-cpp-python leaves
        whatever was there in input_ids) and for ids outside the vocabulary."""
        vocab = self._model.vocab
        n_vocab = self.n_vocab()
        buf = ctypes.create_string_buffer(256)
        memo = self._steer_piece_memo  # the vocabulary is fixed: one ctypes call per id, once
        out = []
        for i, t in enumerate(tokens):
            t = int(t)
            if i in skip or not 0 <= t < n_vocab:
                out.append(b"")
                continue
            piece = memo.get(t)
            if piece is None:
                n = _lc.llama_token_to_piece(vocab, t, buf, len(buf), 0, False)
                piece = memo[t] = bytes(buf.raw[: max(n, 0)])
            out.append(piece)
        return out

    def _steer_seq_for(self, tokens: Sequence[int], images: list[ImageSpan]) -> Seq:
        """The Seq of a prompt of ``tokens`` (positions) holding ``images``; the last one is
        remembered (a chat prompt is mapped at its layout and again by generate())."""
        tokens = [int(t) for t in tokens]
        for im in images:
            # llama-cpp-python leaves stale ids at image positions: they mean nothing, and
            # would make the same prompt look new (a fresh ROI, focus and bias, ~0.7 ms)
            a, b = im.first_pos, min(im.first_pos + im.n_pos, len(tokens))
            tokens[a:b] = [0] * max(b - a, 0)
        memo = self._steer_seq_memo
        if memo is not None and memo[0] == tokens and memo[1] == [id(im) for im in images]:
            return memo[2]
        seq = self._steer_build_seq(tokens, images)
        self._steer_seq_memo = (tokens, [id(im) for im in images], seq)  # seq holds the images
        return seq

    def _steer_build_seq(self, tokens: list[int], images: list[ImageSpan]) -> Seq:
        n = len(tokens)
        in_image = {p for im in images for p in range(im.first_pos, im.first_pos + im.n_pos)}
        pieces = self._steer_pieces(tokens, skip=in_image)  # image positions carry no text
        cell = np.arange(n, dtype=np.int64)
        for im in images:
            a, b = im.first_pos, min(im.first_pos + im.n_pos, n)
            cell[a:b] = im.first_cell + np.arange(b - a)
            cell[im.first_pos + im.n_pos :] += im.grid.n_tokens - im.n_pos
        return Seq(tokens, pieces, cell, list(images))

    def _steer_seq(self) -> Seq:
        """The Seq of what has been evaluated so far."""
        return self._steer_seq_for(self.input_ids[: self.n_tokens], self._steer_images)

    def _steer_prompt_layout(self, layout: list) -> None:
        """A multimodal prompt was tokenized (the handler evaluates it next, from an empty
        cache): record where its images go and publish the config resolved against it, so
        every chunk is evaluated under the config the generation will use."""
        tokens: list[int] = []
        images: list[ImageSpan] = []
        cells = 0
        for item in layout:
            if item[0] == "text":
                tokens.extend(item[1])
                cells += len(item[1])
                continue
            _, grid, n_tok, n_pos, px = item
            if n_tok != grid.n_tokens:
                raise SteeringError(
                    f"mtmd reports {n_tok} tokens for an image of {grid.nx}x{grid.ny}; "
                    "this projector's layout is not supported by llama-steer"
                )
            images.append(ImageSpan(len(images) + 1, grid, cells, len(tokens), n_pos, px))
            tokens.extend([0] * n_pos)
            cells += n_tok
        # llama-cpp-python sizes its token buffers by the n_ctx asked for, llama.cpp the KV
        # cache by a padded one: a prompt past either is cut or dropped silently (an image
        # vanishes from a -c 1 prompt), so refuse it here with the size that fits
        n_ids, n_kv = len(self.input_ids), self.n_ctx()
        if cells > n_kv or len(tokens) > n_ids:
            n_img = sum(im.grid.n_tokens for im in images)
            raise SteeringError(
                f"this prompt needs {cells} KV cells ({n_img} image tokens in "
                f"{len(images)} image(s), {cells - n_img} text tokens; {len(tokens)} "
                f"positions) but the context holds {min(n_ids, n_kv)} (n_ctx={n_ids}): make "
                f"the model with n_ctx >= {cells} plus room for the answer (llama-steer -c), "
                "or send a smaller image"
            )
        # a new prompt: any earlier generation is over, even a stream left unfinished
        self._steer_gen = _no_gen
        self._steer_images = images
        self._steer_cell_key = []
        self._steer_hook.stats(reset=True)  # this prompt's chunks count in the generation
        self._steer_fresh_layout = True
        self._steering._publish(self._steer_seq_for(tokens, images))

    def _steer_check_cells(self) -> None:
        mem = self._steer_mem
        lo = _lc.llama_memory_seq_pos_min(mem, 0)
        hi = _lc.llama_memory_seq_pos_max(mem, 0)
        if self.n_tokens and (lo != 0 or hi != self.n_tokens - 1):
            raise SteeringError(
                f"KV cache holds positions {lo}..{hi} for {self.n_tokens} evaluated tokens: "
                "steering maps tokens to KV cells and needs one sequence (seq 0) evaluated "
                "from position 0 (do not shift or share the cache while steering)"
            )

    def _steer_invalidate_stale(self) -> None:
        """Drop cached cells whose KV was computed under a config other than what a fresh
        prefill would use now (so removing steering really brings the baseline back)."""
        want = self._steering._key_for(_native.PHASE_PREFILL)
        keys = self._steer_cell_key
        n = min(self.n_tokens, len(keys))
        for i in range(n):
            if keys[i] != want:
                n = i
                break
        if n < self.n_tokens:
            if any(n < im.first_pos + im.n_pos for im in self._steer_images):
                raise SteeringError(
                    "the steering config changed in a way that needs the image re-evaluated; "
                    "send the chat request again (images are evaluated by the chat handler)"
                )
            self.n_tokens = n
            self._ctx.kv_cache_seq_rm(-1, n, -1)
            self._requires_eval = True  # the logits in hand belong to a dropped cell

    def _steer_record(self, start: int, end: int, key) -> None:
        """Positions [start, end) were just evaluated under config ``key``."""
        keys = self._steer_cell_key
        if len(keys) < start:
            keys.extend([-1] * (start - len(keys)))  # unknown: matches no key
        del keys[start:]
        keys.extend([key] * (end - start))

    @staticmethod
    def _steer_refuse(flags: int) -> None:
        """A bracketed decode met ``flags`` (the hook also flags a silent no-op)."""
        raise SteeringError("steering could not run: " + "; ".join(_native.describe_flags(flags)))

    # -- the parent's hot paths -------------------------------------------------------------
    def generate(self, tokens: Sequence[int], *args, **kwargs):
        """The parent's generator, unwrapped (nothing runs per token in Python here); with
        steering, this prompt's config is published and stale cells dropped first."""
        st = self._steering
        if st is None:
            return super().generate(tokens, *args, **kwargs)
        tokens = list(tokens)
        # images stay addressable while the prompt still holds them where they were
        same = 0
        for a, b in zip(self.input_ids[: self.n_tokens], tokens, strict=False):
            if a != b:
                break
            same += 1
        self._steer_images = [im for im in self._steer_images if im.first_pos + im.n_pos <= same]
        seq = self._steer_seq_for(tokens, self._steer_images)
        st._publish(seq)
        self._steer_invalidate_stale()
        if not self._steer_fresh_layout:
            self._steer_hook.stats(reset=True)
        self._steer_fresh_layout = False
        self._steer_next_phase = _native.PHASE_PREFILL
        gen = super().generate(tokens, *args, **kwargs)  # a generator: runs at its first next()
        # weak: the generator's frame holds this model (a cycle would outlive `del llm`)
        self._steer_gen, self._steer_gen_seq = weakref.ref(gen), seq
        return gen

    def _steer_republish(self) -> None:
        """A Steering.update(): publish now if a generation is under way (against the tokens
        evaluated so far) or made and not started (against its prompt, whose stale cells go
        again); otherwise the next prompt publishes."""
        gen = self._steer_gen()
        if gen is None or gen.gi_frame is None:  # none, finished or closed
            return
        if inspect.getgeneratorstate(gen) == inspect.GEN_CREATED:
            self._steering._publish(self._steer_gen_seq)
            self._steer_invalidate_stale()
        else:
            self._steering._publish()

    def eval(self, tokens: Sequence[int]):
        hook = self._steer_hook
        if hook is None:
            return super().eval(tokens)
        st = self._steering
        if st is None:  # detached by Steering.close(): the plain model from here on
            return super().eval(tokens)
        n_past = self.n_tokens
        # runs once per generated token: kept inline (each call and lookup here costs
        # microseconds, cold, between decode steps that evict it from cache)
        gen = self._steer_gen()
        in_generation = gen is not None and gen.gi_running  # called from the live generator
        if not in_generation and (
            st._published is None or st._stale or (n_past == 0 and not self._steer_fresh_layout)
        ):
            # eval() called directly: a new prompt, or an update() since the last publish,
            # is resolved against what this eval leaves in the cache (a chat prompt's text
            # chunks are not: its whole layout was published before its first chunk)
            seq = [int(t) for t in self.input_ids[:n_past]] + [int(t) for t in tokens]
            st._publish(self._steer_seq_for(seq, self._steer_images))
        phase = self._steer_next_phase if in_generation else self._steer_eval_phase
        hook.begin_eval(phase)
        try:
            super().eval(tokens)
        finally:
            after = hook.end_eval()
        if after.flags:
            self._steer_refuse(after.flags)
        self._steer_last_phase = phase
        keys = self._steer_cell_key
        if len(keys) == n_past:  # the usual case: the next cells
            keys.extend([after.eval_key] * (self.n_tokens - n_past))
        else:
            self._steer_record(n_past, self.n_tokens, after.eval_key)
        # within generate(), the prompt is the first eval and every later one a decode step;
        # any other eval (a chat handler's prompt chunks, a user's eval) is prefill
        if in_generation:
            self._steer_next_phase = _DECODE
            if phase == _DECODE:
                # nothing between two steps of generate() moves the cache, so the layout check
                # of the prompt eval still holds for its decode steps
                return
        self._steer_check_cells()

    def reset(self):
        super().reset()
        if self._steer_hook is not None:
            self._steer_next_phase = _native.PHASE_PREFILL

    def set_cache(self, cache) -> None:
        """llama-cpp-python's prompt cache restores saved KV state whose cells were computed
        under whatever steering was on then, which steering cannot see: refused while a
        steering hook is installed (prefix reuse within the context stays on)."""
        if cache is not None and self._steer_hook is not None:
            raise SteeringError(
                "a prompt cache (set_cache, the server's --cache) restores KV state computed "
                "under another steering config, so the unsteered model would not be the plain "
                "model: leave the cache off (llama-steer keeps llama-cpp-python's prefix reuse)"
            )
        super().set_cache(cache)

    # -- observation ------------------------------------------------------------------------
    def _steer_attention_to(self, targets: tuple, steered: bool) -> np.ndarray:
        st, hook = self._steering, self._steer_hook
        if self.n_tokens == 0:
            raise SteeringError("nothing evaluated yet: run a completion (or eval) first")
        if not targets:
            raise SteeringError("attention_to() needs a target (or a Steering with an roi)")
        seq = self._steer_seq()
        st._publish(seq)  # the config as it is now (update() between generations is lazy)
        cells, _ = resolve(targets, seq)
        region = np.full(seq.n_cells, -1, dtype=np.int16)
        region[cells] = 0
        last = int(self.input_ids[self.n_tokens - 1])
        phase = self._steer_last_phase

        def re_eval() -> None:
            # the last token again, in the phase it was made in: same cell, same K/V
            self.n_tokens -= 1
            self._ctx.kv_cache_seq_rm(-1, self.n_tokens, -1)
            self._steer_eval_phase = phase
            try:
                self.eval([last])
            finally:
                self._steer_eval_phase = _native.PHASE_PREFILL

        with st._observing(region, 1, _native.ROWS_LAST, edit=steered):
            re_eval()
            obs, rows = hook.read_obs(reset=True)
        if not steered:
            re_eval()  # put back the steered K/V of the last cell
        if not np.all(rows == 1):
            raise SteeringError("the observer did not see every layer's attention")
        return obs[:, :, 0].copy()

"""The only module that touches cffi and the native hook.

    NativeError ........ a native call failed (its message names the cause and the fix)
    Hook ............... owns one ``steer_hook``; bind, publish configs, bracket evals, read
                         stats, scales and observer sums; context manager, close() twice is safe
    ggml_probe() ....... a real ggml soft_max node in a CPU backend buffer, made by the loaded
                         libggml, for the ABI check
    callback_address ... address of ``steer_cb_eval`` for llama_context_params.cb_eval
    cpu_extra_buffer_types()  names of the CPU backend's extra buffer types (AMX, repack)

Return codes are checked here and nowhere else.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from dataclasses import dataclass

import numpy as np

from llama_steer import _steer_native

ffi = _steer_native.ffi
lib = _steer_native.lib

PHASE_PREFILL = lib.STEER_PHASE_PREFILL
PHASE_DECODE = lib.STEER_PHASE_DECODE
KEEP_SHARE = lib.STEER_EDIT_KEEP_SHARE  # a flag in phases: rows keep the edited cells' share
ROWS_LAST = lib.STEER_ROWS_LAST
ROWS_ALL = lib.STEER_ROWS_ALL

FLAGS = {
    lib.STEER_F_DEVICE_TENSOR: (
        "an attention tensor lives in GPU memory and the CUDA path is not available; pass "
        "offload_kqv=False so attention stays on the host"
    ),
    lib.STEER_F_NOT_F32: "an attention tensor is not F32 (unsupported ggml build)",
    lib.STEER_F_SHAPE: "an attention tensor has an unexpected layout (non-contiguous rows)",
    lib.STEER_F_NO_SCALE: (
        "a layer's softmax scale was never seen in the graph (is flash attention on?)"
    ),
    lib.STEER_F_SOFTCAP: (
        "the model applies attention logit soft-capping (tanh) after kq; an additive edit of "
        "kq would be squashed, so this model is not supported"
    ),
    lib.STEER_F_BAD_NAME: "a kq node names a layer index outside the model",
    lib.STEER_F_CUDA: (
        "a CUDA launch or copy of the steering kernel failed; pass offload_kqv=False to keep "
        "attention on the host"
    ),
    lib.STEER_F_NOT_HOOKED: (
        "steering is on but no attention node was hooked during an eval: the graph has no "
        "kq-<il> nodes (flash attention on?); refusing to run unsteered"
    ),
}

_MESSAGES = {
    lib.STEER_E_ARG: "invalid argument",
    lib.STEER_E_NOMEM: "out of memory",
    lib.STEER_E_LAYOUT: (
        "the ggml_tensor layout compiled into llama-steer does not match the loaded libggml; "
        "llama-steer mirrors llama-cpp-python 0.3.36: install that version, or rebuild "
        "llama-steer after updating native/ggml_mirror.h (see README, 'Newer llama.cpp')"
    ),
    lib.STEER_E_UNBOUND: "the hook is not bound to a model yet",
    lib.STEER_E_SCALE: "the softmax scale of the layer is unknown",
    lib.STEER_E_CUDA: (
        "the CUDA path could not start (libcuda.so.1 not loadable, or a driver call failed); "
        "pass offload_kqv=False to keep attention on the host"
    ),
}


class NativeError(RuntimeError):
    """A call into the native hook failed."""

    def __init__(self, what: str, rc: int):
        self.rc = rc
        super().__init__(f"{what}: {_MESSAGES.get(rc, f'error {rc}')}")


def _check(rc: int, what: str) -> None:
    if rc != lib.STEER_OK:
        raise NativeError(what, rc)


def describe_flags(flags: int) -> list[str]:
    """Messages for the STEER_F_* bits set in ``flags``."""
    return [msg for bit, msg in FLAGS.items() if flags & bit]


def callback_address() -> int:
    """Address of the C eval callback, for ``llama_context_params.cb_eval``."""
    return int(ffi.cast("uintptr_t", ffi.addressof(lib, "steer_cb_eval")))


@dataclass(frozen=True)
class Stats:
    """Counters of the callback since the last reset."""

    n_asked: int
    n_kq_edited: int
    n_rows_edited: int
    n_obs_nodes: int
    flags: int
    last_n_kv: int
    last_n_tokens: int
    n_kq_edited_eval: int  # kq nodes edited by the last bracketed eval alone
    eval_key: int  # key of the edit the last bracketed eval ran under (0: none)


def _stats(out) -> Stats:
    return Stats(
        out.n_asked,
        out.n_kq_edited,
        out.n_rows_edited,
        out.n_obs_nodes,
        out.flags,
        out.last_n_kv,
        out.last_n_tokens,
        out.n_kq_edited_eval,
        out.eval_key,
    )


class _GgmlInitParams(ctypes.Structure):
    _fields_ = [
        ("mem_size", ctypes.c_size_t),
        ("mem_buffer", ctypes.c_void_p),
        ("no_alloc", ctypes.c_bool),
    ]


_ggml_lock = threading.Lock()
_ggml_fns: dict | None = None


def _ggml():
    """ggml's own functions from the libggml that llama-cpp-python loaded."""
    global _ggml_fns
    with _ggml_lock:
        if _ggml_fns is None:
            import llama_cpp._ggml as g

            L = g.libggml
            vp = ctypes.c_void_p
            for name, args, res in (
                ("ggml_init", [_GgmlInitParams], vp),
                ("ggml_free", [vp], None),
                ("ggml_new_tensor_4d", [vp, ctypes.c_int] + [ctypes.c_int64] * 4, vp),
                ("ggml_set_name", [vp, ctypes.c_char_p], vp),
                ("ggml_soft_max_ext", [vp, vp, vp, ctypes.c_float, ctypes.c_float], vp),
                ("ggml_backend_cpu_buffer_type", [], vp),
                ("ggml_backend_alloc_ctx_tensors_from_buft", [vp, vp], vp),
                ("ggml_backend_buffer_free", [vp], None),
            ):
                fn = getattr(L, name)
                fn.argtypes, fn.restype = args, res

            def addr(name: str) -> int:
                return ctypes.cast(getattr(L, name), ctypes.c_void_p).value

            _ggml_fns = {
                "lib": L,
                "get_name": addr("ggml_get_name"),
                "get_data": addr("ggml_get_data"),
                "nbytes": addr("ggml_nbytes"),
                "buffer_is_host": addr("ggml_backend_buffer_is_host"),
                "op_desc": addr("ggml_op_desc"),
            }
        return _ggml_fns


_GGML_DEVICE_TYPE_CPU = 0  # enum ggml_backend_dev_type


def cpu_extra_buffer_types() -> list[str]:
    """Names of the extra buffer types the loaded ggml CPU backend offers for model weights
    (e.g. ``["AMX", "CPU_REPACK"]``): what ``llama_model_params.use_extra_bufts`` turns on.
    Asks ggml exactly as llama.cpp's model loader does (the CPU registry's
    ``ggml_backend_dev_get_extra_bufts``); [] when the backend offers none."""
    L = _ggml()["lib"]
    vp = ctypes.c_void_p
    L.ggml_backend_dev_by_type.argtypes, L.ggml_backend_dev_by_type.restype = [ctypes.c_int], vp
    L.ggml_backend_dev_backend_reg.argtypes, L.ggml_backend_dev_backend_reg.restype = [vp], vp
    fn = L.ggml_backend_reg_get_proc_address
    fn.argtypes, fn.restype = [vp, ctypes.c_char_p], vp
    L.ggml_backend_buft_name.argtypes = [vp]
    L.ggml_backend_buft_name.restype = ctypes.c_char_p
    dev = L.ggml_backend_dev_by_type(_GGML_DEVICE_TYPE_CPU)
    if not dev:
        return []
    addr = fn(L.ggml_backend_dev_backend_reg(dev), b"ggml_backend_dev_get_extra_bufts")
    if not addr:
        return []
    get = ctypes.CFUNCTYPE(ctypes.POINTER(vp), vp)(addr)
    arr = get(dev)
    names = []
    i = 0
    while arr and arr[i]:
        names.append(L.ggml_backend_buft_name(arr[i]).decode("utf-8", "replace"))
        i += 1
    return names


PROBE_NE = (5, 7, 3, 2)  # what steer_hook_bind expects: distinct sizes, so a swap shows
# exactly representable and neither 0 nor ggml_soft_max's default 1: a zeroed or default
# op_params does not pass for it
PROBE_SCALE = 0.3125


@contextlib.contextmanager
def ggml_probe(ne: tuple = PROBE_NE, scale: float = PROBE_SCALE):
    """A ``steer_probe *`` for ``steer_hook_bind``'s ABI check, made by the loaded libggml:
    ``ggml_soft_max_ext(ctx, a, NULL, scale, 0)`` over an F32 tensor ``a`` of shape ``ne``,
    both allocated in a CPU backend buffer, with ggml's own accessors. The probe describes
    the call that made it; valid inside the ``with`` block only. Tests change its fields to
    stand for a libggml whose struct moved (a wrong scale or buffer must be refused)."""
    g = _ggml()
    L = g["lib"]
    # no_alloc: the tensors get their memory from a backend buffer, as a graph's nodes do,
    # so the probe's ``buffer`` field is one ggml set
    ctx = L.ggml_init(_GgmlInitParams(1 << 16, None, True))
    if not ctx:
        raise NativeError("ggml_init", lib.STEER_E_NOMEM)
    buf = None
    try:
        a = L.ggml_new_tensor_4d(ctx, 0, *ne)  # 0 = GGML_TYPE_F32
        L.ggml_set_name(a, b"llama-steer-probe-src")
        t = L.ggml_soft_max_ext(ctx, a, None, scale, 0.0)
        L.ggml_set_name(t, b"llama-steer-probe")
        buf = L.ggml_backend_alloc_ctx_tensors_from_buft(ctx, L.ggml_backend_cpu_buffer_type())
        if not buf:
            raise NativeError("ggml_backend_alloc_ctx_tensors_from_buft", lib.STEER_E_NOMEM)
        p = ffi.new("steer_probe *")
        p.tensor = ffi.cast("void *", t)
        p.src = ffi.cast("void *", a)
        p.buffer = ffi.cast("void *", buf)
        p.scale = scale
        for field in ("get_name", "get_data", "nbytes", "buffer_is_host", "op_desc"):
            setattr(p, "fn_" + field, ffi.cast("void *", g[field]))
        yield p
    finally:
        if buf:
            L.ggml_backend_buffer_free(buf)
        L.ggml_free(ctx)


class Hook:
    """One native steering hook. ``with Hook() as h: ...``; ``close()`` is idempotent."""

    def __init__(self) -> None:
        out = ffi.new("steer_hook **")
        _check(lib.steer_hook_new(out), "steer_hook_new")
        self._h = out[0]
        self._lock = threading.Lock()
        self.n_layer = 0
        self.n_head = 0
        self._n_regions = 0
        self._keep: list = []
        self._stats_out = ffi.new("steer_stats *")  # reused: end_eval runs once per token

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def handle_address(self) -> int:
        self._alive()
        return int(ffi.cast("uintptr_t", self._h))

    def _alive(self) -> None:
        if self._h is None:
            raise RuntimeError("the steering hook is closed")

    def close(self) -> None:
        with self._lock:
            if self._h is not None:
                lib.steer_hook_free(self._h)
                self._h = None

    def __enter__(self) -> Hook:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- binding ----------------------------------------------------------------------------
    def bind(self, n_layer: int, n_head: int, probe=None) -> None:
        """Bind to a model shape after checking the ggml_tensor ABI against libggml.
        ``probe``: a ``ggml_probe()`` (tests); by default one is made for this call."""
        self._alive()
        if probe is None:
            with ggml_probe() as p:
                self.bind(n_layer, n_head, p)
            return
        _check(lib.steer_hook_bind(self._h, n_layer, n_head, probe), "steer_hook_bind")
        self.n_layer, self.n_head = n_layer, n_head

    # -- config -----------------------------------------------------------------------------
    def set_config(
        self,
        heads: np.ndarray | None,
        bias: np.ndarray,
        tail: float = 0.0,
        phases: int = PHASE_PREFILL | PHASE_DECODE,
        region: np.ndarray | None = None,
        n_regions: int = 0,
        obs_layers: np.ndarray | None = None,
        obs_rows: int = ROWS_LAST,
        key: int = 0,
    ) -> None:
        """Publish a config.

        heads: (n_layer, n_head) bool; bias: (n_cells,) float32 logit units;
        region: (n_cells,) int16 region ids (-1 none); obs_layers: (n_layer,) bool;
        key: the caller's id of the edit, reported back as ``eval_key`` by ``end_eval``.
        """
        self._alive()
        L, H = self.n_layer, self.n_head
        h_arr = None
        if heads is not None:
            heads = np.ascontiguousarray(heads, dtype=np.uint8)
            if heads.shape != (L, H):
                raise ValueError(f"heads mask has shape {heads.shape}, expected {(L, H)}")
            h_arr = heads
        b = np.ascontiguousarray(bias, dtype=np.float32).reshape(-1)
        r = None if region is None else np.ascontiguousarray(region, dtype=np.int16).reshape(-1)
        o = None
        if obs_layers is not None:
            o = np.ascontiguousarray(obs_layers, dtype=np.uint8).reshape(-1)
            if o.shape != (L,):
                raise ValueError(f"obs_layers has shape {o.shape}, expected {(L,)}")

        def ptr(a, ctype):
            return ffi.NULL if a is None else ffi.from_buffer(ctype, a)

        with self._lock:
            self._alive()
            _check(
                lib.steer_hook_set_config(
                    self._h,
                    ptr(h_arr, "uint8_t[]"),
                    ptr(b if b.size else None, "float[]"),
                    int(b.size),
                    float(tail),
                    int(phases),
                    ptr(r, "int16_t[]"),
                    0 if r is None else int(r.size),
                    int(n_regions) if r is not None else 0,
                    ptr(o, "uint8_t[]"),
                    int(obs_rows),
                    int(key),
                ),
                "steer_hook_set_config",
            )
            if r is not None and o is not None and o.any():
                self._n_regions = int(n_regions)

    def set_cuda(self, context: int, fn_edit: int, fn_observe: int) -> None:
        """Give the hook CUDA kernels (CUfunction handles loaded into ``context``)."""
        self._alive()
        _check(
            lib.steer_hook_set_cuda(
                self._h,
                ffi.cast("void *", context),
                ffi.cast("void *", fn_edit),
                ffi.cast("void *", fn_observe),
            ),
            "steer_hook_set_cuda",
        )

    # -- evals ------------------------------------------------------------------------------
    # begin_eval/end_eval run once per token: _check and _alive are inlined (0.5-1 us per
    # token in a tight loop, measured), the codes are checked all the same
    def begin_eval(self, phase: int) -> None:
        if self._h is None:
            self._alive()
        rc = lib.steer_hook_begin_eval(self._h, phase)
        if rc:
            raise NativeError("steer_hook_begin_eval", rc)

    def end_eval(self):
        """Unpin. Returns the counters after the eval as the hook's own ``steer_stats *``
        (read its fields now: the next eval overwrites it; ``last_stats()`` copies it), or
        None when the hook is closed. Runs once per token, so it builds no Python objects."""
        if self._h is None:
            return None
        rc = lib.steer_hook_end_eval(self._h, self._stats_out)
        if rc:
            raise NativeError("steer_hook_end_eval", rc)
        return self._stats_out

    def last_stats(self) -> Stats:
        """The counters as the last ``end_eval`` left them (zeros before any eval)."""
        return _stats(self._stats_out)

    # -- readouts ---------------------------------------------------------------------------
    def stats(self, reset: bool = False) -> Stats:
        self._alive()
        out = ffi.new("steer_stats *")
        _check(lib.steer_hook_get_stats(self._h, out, int(reset)), "steer_hook_get_stats")
        return _stats(out)

    def scales(self) -> np.ndarray:
        """(n_layer,) float32 softmax scale per layer as read from the graph (0 = unseen)."""
        self._alive()
        out = np.zeros(self.n_layer, dtype=np.float32)
        _check(
            lib.steer_hook_get_scales(self._h, ffi.from_buffer("float[]", out), self.n_layer),
            "steer_hook_get_scales",
        )
        return out

    def set_scale(self, layer: int, scale: float) -> None:
        self._alive()
        _check(lib.steer_hook_set_scale(self._h, layer, scale), "steer_hook_set_scale")

    def read_obs(self, reset: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Observer sums (n_layer, n_head, n_regions) float32 and rows per layer (n_layer,)."""
        self._alive()
        R = self._n_regions
        out = np.zeros((self.n_layer, self.n_head, R), dtype=np.float32)
        rows = np.zeros(self.n_layer, dtype=np.uint64)
        _check(
            lib.steer_hook_read_obs(
                self._h,
                ffi.from_buffer("float[]", out),
                int(out.size),
                ffi.from_buffer("uint64_t[]", rows),
                int(reset),
            ),
            "steer_hook_read_obs",
        )
        return out, rows

    # -- buffers (tests and references) -----------------------------------------------------
    def edit_buffer(self, layer: int, phase: int, kq: np.ndarray) -> None:
        """Apply the callback's edit to ``kq`` in place: float32 array shaped like ggml's
        ``ne`` reversed, i.e. (n_stream, n_head, n_tokens, n_kv) C-contiguous or padded."""
        self._alive()
        ne, nb = _layout(kq)
        _check(
            lib.steer_hook_edit_buffer(self._h, layer, phase, _fptr(kq, writable=True), *ne, *nb),
            "steer_hook_edit_buffer",
        )

    def edit_device(self, layer: int, phase: int, dptr: int, shape: tuple, strides: tuple) -> None:
        """The CUDA path on a device buffer (CUdeviceptr), laid out as ``edit_buffer``'s."""
        self._alive()
        ne, nb = _dlayout(shape, strides)
        _check(
            lib.steer_hook_edit_device(self._h, layer, phase, ffi.cast("void *", dptr), *ne, *nb),
            "steer_hook_edit_device",
        )

    def observe_device(self, layer: int, dptr: int, shape: tuple, strides: tuple) -> None:
        self._alive()
        ne, nb = _dlayout(shape, strides)
        _check(
            lib.steer_hook_observe_device(self._h, layer, ffi.cast("void *", dptr), *ne, *nb),
            "steer_hook_observe_device",
        )

    def observe_buffer(self, layer: int, probs: np.ndarray) -> None:
        self._alive()
        ne, nb = _layout(probs)
        _check(
            lib.steer_hook_observe_buffer(self._h, layer, _fptr(probs), *ne, *nb),
            "steer_hook_observe_buffer",
        )


def _dlayout(shape: tuple, strides: tuple):
    """ne, nb for a device buffer described like a NumPy array (n_stream, n_head, T, n_kv)."""
    return (shape[3], shape[2], shape[1], shape[0]), (strides[2], strides[1], strides[0])


def _fptr(a: np.ndarray, writable: bool = False):
    # a strided view (padded n_kv) has no contiguous buffer: pass its base address; the caller
    # keeps ``a`` alive for the duration of the call
    if writable and not a.flags.writeable:
        raise ValueError("array is read-only")
    return ffi.cast("float *", a.ctypes.data)


def _layout(a: np.ndarray) -> tuple[tuple[int, int, int, int], tuple[int, int, int]]:
    if a.dtype != np.float32 or a.ndim != 4 or a.strides[3] != 4:
        raise ValueError("expected a float32 array (n_stream, n_head, n_tokens, n_kv), unit stride")
    if not (a.strides[2] >= 0 and a.strides[1] >= 0 and a.strides[0] >= 0):
        raise ValueError("negative strides are not supported")
    ne = (a.shape[3], a.shape[2], a.shape[1], a.shape[0])
    nb = (a.strides[2], a.strides[1], a.strides[0])
    return ne, nb

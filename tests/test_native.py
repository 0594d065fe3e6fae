"""The native edit and observer against NumPy references, on random tensors (no model).

The hook's own routines run on caller buffers laid out like ggml's kq-<il>
(n_stream, n_head, n_tokens, n_kv); the modes' definitions are checked in probability space.
"""

import contextlib
import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_steer import Steering, SteeringError, Tokens, _native
from llama_steer.roi import Seq, resolve

PF, DEC = _native.PHASE_PREFILL, _native.PHASE_DECODE
ROOT = pathlib.Path(__file__).resolve().parent.parent


def make_hook(n_layer=3, n_head=4, scales=(0.25, 1.0, 0.125)):
    h = _native.Hook()
    h.bind(n_layer, n_head)
    for layer, s in enumerate(scales[:n_layer]):
        h.set_scale(layer, s)
    return h


def ref_edit(kq, heads_layer, bias, tail, scale, phase, phases):
    """NumPy: kq[s, h, i, j] += bias_j / scale for steered heads, bias_j = tail past bias."""
    out = kq.copy()
    if not phases & phase:
        return out
    n_kv = kq.shape[-1]
    full = np.full(n_kv, tail, dtype=np.float32)
    m = min(n_kv, bias.size)
    full[:m] = bias[:m]
    inv = np.float32(1.0) / np.float32(scale)
    for h in np.nonzero(heads_layer[: kq.shape[1]])[0]:
        out[:, h] += full * inv
    return out


def softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize(
    "shape,pad",
    [
        ((1, 4, 1, 7), 0),  # decode row, odd n_kv
        ((1, 4, 5, 33), 0),  # prefill rows
        ((1, 4, 3, 29), 3),  # padded rows (nb1 > n_kv * 4)
        ((2, 3, 2, 16), 5),  # two streams, fewer heads than the model
    ],
)
@pytest.mark.parametrize("phase,phases", [(PF, PF | DEC), (DEC, PF | DEC), (PF, DEC), (DEC, DEC)])
def test_edit_matches_numpy(shape, pad, phase, phases):
    rng = np.random.default_rng(sum(shape) + pad + phase * 10 + phases)
    S, H, T, KV = shape
    layer = 2
    with make_hook() as hook:
        heads = rng.random((3, 4)) < 0.5
        heads[layer, 0] = True
        bias = rng.normal(size=KV - 2).astype(np.float32) * 3
        bias[:2] = 0  # exercise the non-zero range
        tail = -1.5
        hook.set_config(heads, bias, tail=tail, phases=phases)
        base = rng.normal(size=(S, H, T, KV + pad)).astype(np.float32)
        kq = base[..., :KV]
        want = ref_edit(kq, heads[layer], bias, tail, 0.125, phase, phases)
        padding = base[..., KV:].copy()
        hook.edit_buffer(layer, phase, kq)
        np.testing.assert_allclose(kq, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(base[..., KV:], padding)  # never writes past n_kv
        st = hook.stats()
        edited = bool(phases & phase)
        assert st.n_kq_edited == int(edited)
        assert st.n_rows_edited == (S * int(heads[layer, :H].sum()) * T if edited else 0)


def test_unsteered_layer_and_zero_config_touch_nothing():
    rng = np.random.default_rng(0)
    with make_hook() as hook:
        heads = np.zeros((3, 4), bool)
        heads[0, 1] = True
        hook.set_config(heads, np.ones(9, np.float32))
        kq = rng.normal(size=(1, 4, 2, 9)).astype(np.float32)
        before = kq.copy()
        hook.edit_buffer(1, PF, kq)  # layer 1 has no steered head
        np.testing.assert_array_equal(kq, before)
        hook.set_config(heads, np.zeros(9, np.float32))  # strength 0: no edit at all
        hook.edit_buffer(0, PF, kq)
        np.testing.assert_array_equal(kq, before)
        assert hook.stats().n_kq_edited == 0


def test_end_eval_counts_this_eval_alone():
    rng = np.random.default_rng(1)
    with make_hook() as hook:
        assert hook.last_stats().n_kq_edited == 0  # zeros before any eval
        heads = np.zeros((3, 4), bool)
        heads[1, 2] = True
        hook.set_config(heads, np.ones(5, np.float32), phases=PF | DEC)
        kq = rng.normal(size=(1, 4, 1, 5)).astype(np.float32)
        for n in (2, 0, 1):
            hook.begin_eval(DEC)
            for _ in range(n):
                hook.edit_buffer(1, DEC, kq)
            out = hook.end_eval()
            assert out.n_kq_edited_eval == n and hook.last_stats().n_kq_edited_eval == n
        assert hook.last_stats().n_kq_edited == 3
        with pytest.raises(_native.NativeError):
            hook.begin_eval(7)  # not a phase
    assert hook.end_eval() is None  # closed: nothing to unpin


def test_end_eval_reports_the_edit_key_and_flags_a_silent_no_op():
    """eval_key names the edit the new cells were made under (0 when the pinned config does
    not edit in the eval's phase); a graph that ran without any kq node edited while the
    config edits is flagged, an eval that ran no graph is not."""
    g = _native._ggml()
    L = g["lib"]
    ctx = L.ggml_init(_native._GgmlInitParams(1 << 16, None, False))
    try:
        other = L.ggml_new_tensor_4d(ctx, 0, 4, 1, 1, 1)
        L.ggml_set_name(other, b"ffn_out-1")  # a graph node that is not attention
        with make_hook() as hook:
            heads = np.zeros((3, 4), bool)
            heads[1, 2] = True
            hook.set_config(heads, np.ones(5, np.float32), phases=DEC, key=7)
            kq = np.zeros((1, 4, 1, 5), np.float32)
            hook.begin_eval(DEC)
            hook.edit_buffer(1, DEC, kq)
            out = hook.end_eval()
            assert (out.eval_key, out.flags) == (7, 0)
            hook.begin_eval(PF)  # decode-only config: prefill cells are unedited
            assert hook.end_eval().eval_key == 0
            hook.begin_eval(DEC)  # no graph ran (an empty batch): nothing to refuse
            assert hook.end_eval().flags == 0
            hook.begin_eval(DEC)  # a graph ran and no kq node was edited: refused
            assert not _native.lib.steer_cb_eval(_native.ffi.cast("void *", other), True, hook._h)
            out = hook.end_eval()
            assert out.flags & _native.lib.STEER_F_NOT_HOOKED
            assert any("no attention node" in m for m in _native.describe_flags(out.flags))
            hook.set_config(heads, np.zeros(5, np.float32), phases=DEC, key=8)  # no edit
            hook.stats(reset=True)
            hook.begin_eval(DEC)
            _native.lib.steer_cb_eval(_native.ffi.cast("void *", other), True, hook._h)
            out = hook.end_eval()
            assert (out.eval_key, out.flags) == (0, 0)
    finally:
        L.ggml_free(ctx)


def test_unknown_scale_is_an_error_not_a_silent_skip():
    with _native.Hook() as hook:
        hook.bind(2, 2)
        hook.set_config(np.ones((2, 2), bool), np.ones(4, np.float32))
        kq = np.zeros((1, 2, 1, 4), np.float32)
        with pytest.raises(_native.NativeError, match="scale"):
            hook.edit_buffer(0, PF, kq)
        assert hook.stats().flags & _native.lib.STEER_F_NO_SCALE


def _probs_after(kq, scale, mask, hook=None, layer=None, phase=PF):
    """Attention (float64) after softmax(kq*scale + mask), optionally after the hook's edit."""
    kq = kq.copy()
    if hook is not None:
        hook.edit_buffer(layer, phase, kq)
    return softmax(kq.astype(np.float64) * scale + mask)


@pytest.mark.parametrize("mode", ["bias", "shift", "redirect", "emphasize"])
def test_modes_match_their_definitions(mode):
    """End to end: Steering's bias vector, the C edit, then softmax with llama.cpp's -inf
    mask, against each mode's definition written directly in probability space."""
    rng = np.random.default_rng(7)
    n, T, H = 24, 4, 4
    tokens = list(range(n))
    pieces = [f"t{i} ".encode() for i in range(n)]
    target, domain = Tokens(5, 9), Tokens(3, 15)
    s = 2.5
    weights = rng.normal(size=4) if mode in ("bias", "shift") else None
    steer = Steering(heads="all", roi=target, mode=mode, strength=s, weights=weights, domain=domain)
    bias, tail = steer._bias(Seq.text_only(tokens, pieces))
    scale = 0.25
    layer = 0
    kq = rng.normal(size=(1, H, T, n + 3)).astype(np.float32)  # 3 cells not yet filled
    mask = np.zeros((T, n + 3))
    for i in range(T):  # causal: query i sees cells <= n - T + i
        mask[i, n - T + i + 1 :] = -np.inf
    with make_hook(n_layer=1, n_head=H, scales=(scale,)) as hook:
        hook.set_config(np.ones((1, H), bool), bias, tail=tail)
        got = _probs_after(kq, scale, mask, hook, layer)
    A = _probs_after(kq, scale, mask)
    seq = Seq.text_only(tokens, pieces)
    T_cells = resolve((target,), seq)[0]
    D_cells = resolve((domain,), seq)[0]
    with np.errstate(divide="ignore"):  # masked cells: log 0 = -inf, as in the definition
        logA = np.log(A)
    b = np.zeros(n + 3)
    if mode == "bias":
        b[T_cells] = s * weights
    elif mode == "shift":
        b[T_cells] = s * (weights - weights.mean()) / weights.std()
    elif mode == "redirect":
        b[D_cells] = -s
        b[T_cells] = s
    elif mode == "emphasize":
        b[:] = -s
        b[T_cells] = 0
    want = softmax(logA + b)  # softmax(log A + lambda b): the seeds' residual latent shift
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    assert np.all(np.isfinite(got))
    if mode == "emphasize":  # PASTA: outside mass scaled by exp(-s) before renormalising
        outside = np.ones(n + 3, bool)
        outside[T_cells] = False
        scaled = A * np.where(outside, np.exp(-s), 1.0)
        np.testing.assert_allclose(got, scaled / scaled.sum(-1, keepdims=True), rtol=2e-5)


@settings(max_examples=200, deadline=None)
@given(
    n_kv=st.integers(1, 70),
    n_tok=st.integers(1, 5),
    n_head=st.integers(1, 6),
    n_stream=st.integers(1, 2),
    n_cells=st.integers(0, 80),
    scale=st.floats(0.01, 10.0),
    tail=st.floats(-1e4, 1e4),
    phase=st.sampled_from([PF, DEC]),
    phases=st.sampled_from([PF, DEC, PF | DEC]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_edit_never_nan(
    n_kv, n_tok, n_head, n_stream, n_cells, scale, tail, phase, phases, seed
):
    rng = np.random.default_rng(seed)
    with _native.Hook() as hook:
        hook.bind(1, n_head)
        hook.set_scale(0, scale)
        heads = rng.random((1, n_head)) < 0.6
        bias = (rng.uniform(-1, 1, n_cells) * 10 ** rng.uniform(-3, 4, n_cells)).astype(np.float32)
        hook.set_config(heads, bias, tail=tail, phases=phases)
        kq = rng.normal(size=(n_stream, n_head, n_tok, n_kv)).astype(np.float32) * 5
        want = ref_edit(kq, heads[0], bias, np.float32(tail), scale, phase, phases)
        hook.edit_buffer(0, phase, kq)
        assert np.all(np.isfinite(kq))
        np.testing.assert_allclose(kq, want, rtol=1e-5, atol=1e-3)
        # whatever the edit, a row with one visible key stays a distribution (no NaN)
        mask = np.where(rng.random(n_kv) < 0.5, -np.inf, 0.0)
        mask[rng.integers(n_kv)] = 0.0
        p = softmax(kq.astype(np.float64) * scale + mask)
        assert np.all(np.isfinite(p))
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-9)


def test_config_rejects_non_finite_and_bad_regions():
    with make_hook() as hook:
        with pytest.raises(_native.NativeError, match="invalid argument"):
            hook.set_config(None, np.array([0.0, np.nan], np.float32))
        with pytest.raises(_native.NativeError, match="invalid argument"):
            hook.set_config(None, np.zeros(2, np.float32), tail=float("inf"))
        with pytest.raises(_native.NativeError, match="invalid argument"):
            hook.set_config(
                None,
                np.zeros(0, np.float32),
                region=np.array([0, 3], np.int16),
                n_regions=2,
                obs_layers=np.ones(3, bool),
            )


@pytest.mark.parametrize("rows", [_native.ROWS_LAST, _native.ROWS_ALL])
def test_observer_matches_numpy(rows):
    rng = np.random.default_rng(3)
    L, H, R = 3, 4, 3
    with make_hook(L, H) as hook:
        n_cells = 20
        region = rng.integers(-1, R, n_cells).astype(np.int16)
        obs_layers = np.array([True, False, True])
        hook.set_config(
            None,
            np.zeros(0, np.float32),
            region=region,
            n_regions=R,
            obs_layers=obs_layers,
            obs_rows=rows,
        )
        want = np.zeros((L, H, R))
        want_rows = np.zeros(L, np.uint64)
        for _ in range(2):
            for layer in range(L):
                T = int(rng.integers(1, 4))
                p = softmax(rng.normal(size=(1, H, T, n_cells + 4))).astype(np.float32)
                hook.observe_buffer(layer, p)
                if not obs_layers[layer]:
                    continue
                use = p[0, :, -1:, :n_cells] if rows == _native.ROWS_LAST else p[0, :, :, :n_cells]
                sums = np.stack(
                    [use[..., region == r].sum(axis=(-1, -2)) for r in range(R)], axis=-1
                )
                if rows == _native.ROWS_LAST:
                    want[layer] = sums
                    want_rows[layer] = 1
                else:
                    want[layer] += sums
                    want_rows[layer] += T
        got, got_rows = hook.read_obs(reset=True)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got_rows, want_rows)
        again, _ = hook.read_obs()
        assert not again.any()  # reset


def test_abi_check_passes_on_the_loaded_libggml():
    """The probe is a real soft_max node in a real CPU backend buffer: the mirror reads the
    buffer ggml allocated, which ggml says is host memory, and the scale in op_params[0]."""
    with _native.ggml_probe() as p, _native.Hook() as hook:
        assert p.buffer != _native.ffi.NULL and p.scale == _native.PROBE_SCALE
        hook.bind(2, 2, p)
        assert (hook.n_layer, hook.n_head) == (2, 2)
    with _native.Hook() as hook:
        hook.bind(3, 4)  # the default probe, as Llama binds
        hook.set_scale(2, 0.5)  # bound: the per-layer calls work


def _corrupt(stack, what):
    """A ggml_probe() that differs from what ggml made in one respect (``what``)."""
    if what == "ne":  # another shape than the check expects
        return stack.enter_context(_native.ggml_probe(ne=(5, 7, 3, 1)))
    p = stack.enter_context(_native.ggml_probe())
    if what == "scale":  # op_params[0] holds another scale than the one claimed
        p.scale = _native.PROBE_SCALE * 2
    elif what in ("buffer", "src"):  # another probe's buffer, another node's input
        q = stack.enter_context(_native.ggml_probe())
        setattr(p, what, getattr(q, what))
    return p


@pytest.mark.parametrize("what", ["ne", "scale", "buffer", "src"])
def test_layout_mismatch_is_refused_and_hook_stays_inert(what):
    """A probe that differs from what ggml made stands for a ggml whose struct moved: what
    the mirror reads (shape, op_params, buffer, src) no longer matches what ggml set, bind
    must refuse, and the unbound callback must touch nothing."""
    with contextlib.ExitStack() as stack, _native.Hook() as hook:
        p = _corrupt(stack, what)
        with pytest.raises(_native.NativeError, match="does not match") as e:
            hook.bind(2, 2, p)
        assert e.value.rc == _native.lib.STEER_E_LAYOUT
        # the callback of an unbound hook asks for nothing and writes nothing
        assert not _native.lib.steer_cb_eval(p.tensor, True, hook._h)
        with pytest.raises(_native.NativeError, match="not bound"):
            hook.edit_buffer(0, PF, np.zeros((1, 1, 1, 4), np.float32))


def test_abi_check_reads_the_scale_ggml_stored():
    """Not a constant: a real node made with another scale, claimed as such, binds."""
    with _native.ggml_probe(scale=0.5) as p, _native.Hook() as hook:
        hook.bind(2, 2, p)


def test_hook_close_twice_and_context_manager():
    hook = _native.Hook()
    hook.bind(1, 1)
    hook.close()
    hook.close()
    with pytest.raises(RuntimeError, match="closed"):
        hook.stats()


def test_steering_input_errors_name_the_fix():
    with pytest.raises(SteeringError, match="not one of"):
        Steering(mode="boost")
    with pytest.raises(SteeringError, match="finite"):
        Steering(strength=float("inf"))
    with pytest.raises(SteeringError, match="exceeds"):
        Steering(strength=1e9)
    with pytest.raises(SteeringError, match="needs a domain"):
        Steering(mode="redirect", roi=Tokens(0, 2))
    with pytest.raises(SteeringError, match="needs weights"):
        Steering(mode="shift", roi=Tokens(0, 2))
    with pytest.raises(SteeringError, match="cannot read roi term .Berlin.*text:"):
        Steering(roi="Berlin")
    with pytest.raises(SteeringError, match="empty or negative"):
        Tokens(4, 4)
    with pytest.raises(SteeringError, match="NaN"):
        Steering(roi=Tokens(0, 2), weights=[1.0, float("nan")])
    steer = Steering(roi=Tokens(0, 3), weights=[1.0, 2.0])
    with pytest.raises(SteeringError, match="one weight per ROI cell"):
        steer._bias(Seq.text_only([1, 2, 3], [b"a", b"b", b"c"]))
    steer = Steering(mode="shift", roi=Tokens(0, 2), weights=[1.0, 1.0])
    with pytest.raises(SteeringError, match="constant"):
        steer._bias(Seq.text_only([1, 2], [b"a", b"b"]))


def _cc() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler (cc, gcc or clang) to build the native stress program")
    return cc


def test_observer_survives_a_concurrent_publish(tmp_path):
    """One thread brackets evals that observe, another publishes configs whose number of
    regions flips, a third reads and resets the sums: built with AddressSanitizer, a hook
    that frees observer sums a pinned eval (or read_obs) still uses aborts with a
    heap-use-after-free. The program also checks that same-shape republishes in the middle
    of an eval keep accumulating into one buffer."""
    cc = _cc()
    exe = tmp_path / "obs_race"
    build = [
        cc,
        "-std=c11",
        "-O1",
        "-g",
        "-fsanitize=address",
        "-fno-omit-frame-pointer",
        "-pthread",
        f"-I{ROOT / 'native'}",
        str(ROOT / "native" / "steer.c"),
        str(ROOT / "native" / "steer_cuda.c"),
        str(ROOT / "tests" / "c" / "obs_race.c"),
        "-o",
        str(exe),
        "-lm",
        "-ldl",
    ]
    r = subprocess.run(build, capture_output=True, text=True)
    if r.returncode != 0 and "sanitize" in r.stderr:
        pytest.skip(f"{cc} cannot build with AddressSanitizer: {r.stderr[-500:]}")
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:exitcode=23")
    r = subprocess.run([str(exe), "3"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "AddressSanitizer" not in r.stderr, r.stderr[-4000:]
    assert r.stdout.startswith("ok:"), r.stdout


@pytest.mark.parametrize("strength", [0.5, 2.5, 12.0, 60.0])
def test_reroute_keeps_each_rows_share_and_redirects_inside_it(strength):
    """mode="reroute": per (query, head) row, the domain's total attention stays what it was
    and inside it the mass is the redirected one: p_j = A(D) * A_j e^(b_j) / sum_D A_k e^(b_k)
    for j in the domain D (target included), p_j = A_j outside it. Decode rows (all cells
    visible but the 3 unfilled ones); strengths up to where float32 exp would overflow a
    naive sum."""
    rng = np.random.default_rng(11)
    n, T, H = 30, 3, 4
    tokens = list(range(n))
    pieces = [f"t{i} ".encode() for i in range(n)]
    target, domain = Tokens(8, 12), Tokens(4, 20)
    steer = Steering(heads="all", roi=target, mode="reroute", strength=strength, domain=domain)
    assert steer._resolved.decode_only
    seq = Seq.text_only(tokens, pieces)
    bias, tail = steer._bias(seq)
    assert tail == 0.0
    scale = 0.25
    kq = (rng.normal(size=(1, H, T, n + 3)) * 4).astype(np.float32)
    mask = np.zeros((T, n + 3))
    mask[:, n:] = -np.inf
    with make_hook(n_layer=1, n_head=H, scales=(scale,)) as hook:
        hook.set_config(np.ones((1, H), bool), bias, phases=DEC | _native.KEEP_SHARE)
        got = _probs_after(kq, scale, mask, hook, 0, phase=DEC)
    A = _probs_after(kq, scale, mask)
    D = resolve((domain,), seq)[0]
    b = np.zeros(n + 3)
    b[D] = -strength
    b[resolve((target,), seq)[0]] = strength
    inside = np.zeros(n + 3, bool)
    inside[D] = True
    want = A.copy()
    w = A * np.exp(b - b.max())
    share = (A * inside).sum(-1, keepdims=True)
    want[..., inside] = share * w[..., inside] / w[..., inside].sum(-1, keepdims=True)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose((got * inside).sum(-1), share[..., 0], rtol=1e-4)


def test_reroute_is_refused_where_it_is_undefined():
    with pytest.raises(SteeringError, match="decode_only=True") as e:
        Steering(roi="panel:2/6", mode="reroute", decode_only=False)
    assert e.value.field == "decode_only"
    with make_hook() as hook, pytest.raises(Exception, match="steer_hook_set_config"):
        hook.set_config(
            np.ones((3, 4), bool),
            np.ones(5, np.float32),
            tail=-1.0,
            phases=DEC | _native.KEEP_SHARE,
        )  # keep-share has no "everything else"


@settings(max_examples=150, deadline=None)
@given(
    n_kv=st.integers(1, 70),
    n_cells=st.integers(0, 80),
    scale=st.floats(0.01, 10.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_keep_share_never_nan_and_keeps_the_share(n_kv, n_cells, scale, seed):
    rng = np.random.default_rng(seed)
    with _native.Hook() as hook:
        hook.bind(1, 2)
        hook.set_scale(0, scale)
        bias = (rng.uniform(-1, 1, n_cells) * 10 ** rng.uniform(-3, 4, n_cells)).astype(np.float32)
        bias[rng.random(n_cells) < 0.3] = 0.0
        hook.set_config(np.ones((1, 2), bool), bias, phases=DEC | _native.KEEP_SHARE)
        kq = (rng.normal(size=(1, 2, 3, n_kv)) * 5).astype(np.float32)
        before = kq.copy()
        hook.edit_buffer(0, DEC, kq)
        assert np.all(np.isfinite(kq))
        edited = np.zeros(n_kv, bool)
        m = min(n_kv, n_cells)
        edited[:m] = bias[:m] != 0
        np.testing.assert_array_equal(kq[..., ~edited], before[..., ~edited])
        p0, p1 = (softmax(x.astype(np.float64) * scale) for x in (before, kq))
        np.testing.assert_allclose(
            (p1 * edited).sum(-1), (p0 * edited).sum(-1), rtol=2e-3, atol=1e-6
        )

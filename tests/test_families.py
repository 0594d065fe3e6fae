"""Architecture conformance: one tiny random-weight fixture per model family users run
(tests/data/fixtures, made by llama.cpp's own converter: scripts/fixtures/make_fixtures.py).

Per family, against the real runtime:
- strength 0 is the plain model, token for token and logit for logit;
- one steered layer: the last row's attention in that layer, per head, observed over every KV
  cell, equals softmax(log p_unsteered + b) in the steered heads and p_unsteered in the others
  (the layer's own QK^T does not depend on its own edit). The hook adds b / scale to the raw
  scores, so this holds only if the scale it read from the graph is the one the softmax
  uses; that scale is also checked against the architecture's formula from GGUF metadata
  (MLA: mscale^2 / sqrt(192), Gemma 3: 1 with Q pre-scaled);
- text models: a token canary (a span suppressed in every head: two prompts differing only
  there give bit-identical logits; one span cell visible: they differ);
- VLMs: the KV-cell canary on image cells, and pixel ROIs mapped onto mtmd's grid;
- R1-style models: a chat through the <think> template, steered and not, stays finite.
"""

import math
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from llama_steer import (
    Box,
    ImageTokens,
    Llama,
    Panel,
    Steering,
    Text,
    Tokens,
    _native,
    guarded_load,
)
from llama_steer._gguf import read_metadata
from llama_steer.messages import user_message
from llama_steer.roi import resolve
from llama_steer.vision import Geometry

FIXTURES = Path(__file__).resolve().parent / "data" / "fixtures"
TEXT = ["qwen2", "llama", "deepseek3"]
VLM = ["qwen3vl", "qwen25vl", "gemma3"]
ALL = TEXT + VLM
N_IMAGE = {"qwen3vl": 60, "qwen25vl": 77, "gemma3": 256}  # 320x200: 10x6, 11x7, 16x16
PROMPT = "Is there a red star? a blue circle and a green square. What is in panel 2?"
SPAN = "a blue circle and a green square."


def gguf(name: str) -> str:
    return str(FIXTURES / f"{name}-f16.gguf")


def mmproj(name: str) -> str:
    return str(FIXTURES / f"mmproj-{name}-f16.gguf")


@pytest.fixture
def load():
    """load(name, steering=None, plain=False) -> a model (with its mtmd handler for VLMs),
    closed at teardown."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    made = []

    def make(name, steering=None, plain=False):
        kw = dict(model_path=gguf(name), n_ctx=1024, n_threads=2, verbose=False, seed=0)
        if name in VLM:
            kw["chat_handler"] = MTMDChatHandler(clip_model_path=mmproj(name), verbose=False)
        if plain:
            with guarded_load():  # the AMX guard llama_steer.Llama applies (DeepSeek aborts)
                llm = llama_cpp.Llama(**kw)
        else:
            llm = Llama(steering=steering, **kw)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.close()


def noise(seed: int, size=(320, 200)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def logits(llm) -> np.ndarray:
    """The last evaluated token's logits."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()


def ask(llm, name, image=None, max_tokens=1, text=PROMPT):
    """One greedy request: a chat with an image for VLMs, a raw completion otherwise.
    Returns (generated text, logits of the last evaluated token)."""
    if name in VLM:
        m = [user_message(text, [image if image is not None else noise(1)])]
        out = llm.create_chat_completion(m, max_tokens=max_tokens, temperature=0)
        txt = out["choices"][0]["message"]["content"]
    else:
        out = llm.create_completion(text, max_tokens=max_tokens, temperature=0)
        txt = out["choices"][0]["text"]
    return txt, logits(llm)


# ------------------------------------------------------------------------- strength 0
@pytest.mark.parametrize("name", ALL)
def test_strength_zero_is_the_plain_model(load, name):
    plain = load(name, plain=True)
    # a pixel ROI on VLMs (geometry, letterbox), a text ROI otherwise
    roi = Panel(2, grid=(2, 2)) if name in VLM else Text(SPAN)
    zero = load(name, Steering(heads="all", roi=roi, mode="bias", strength=0.0))
    for seed in (3, 4):
        img = noise(seed)
        a_txt, a_log = ask(plain, name, img, max_tokens=12)
        b_txt, b_log = ask(zero, name, img, max_tokens=12)
        assert a_txt == b_txt
        np.testing.assert_array_equal(a_log, b_log)
    assert zero.steering.stats().n_kq_edited == 0


# ------------------------------------------------------------------------- scale and edit
def formula_scale(name: str) -> float:
    """The softmax scale each architecture's reference implementation uses, from metadata."""
    m = read_metadata(gguf(name))
    arch = m["general.architecture"]
    if arch == "deepseek2":  # MLA: HF DeepseekV3Attention.softmax_scale with YaRN mscale
        factor = m[f"{arch}.rope.scaling.factor"]
        mscale_all_dim = m[f"{arch}.rope.scaling.yarn_log_multiplier"] / 0.1  # converter's 0.1x
        mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
        return mscale * mscale / math.sqrt(m[f"{arch}.attention.key_length_mla"])
    if arch == "gemma3":  # Q is multiplied by query_pre_attn_scalar^-0.5 before QK^T
        return 1.0
    d = m.get(f"{arch}.attention.key_length")
    if d is None:
        d = m[f"{arch}.embedding_length"] // m[f"{arch}.attention.head_count"]
    return 1.0 / math.sqrt(d)


def softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("name", ALL)
def test_one_steered_layer_equals_the_softmax_reference(load, name):
    meta = read_metadata(gguf(name))
    n_layer = meta[meta["general.architecture"] + ".block_count"]
    rng = np.random.default_rng(7)
    for layer in sorted({0, 2 if name == "gemma3" else 1, n_layer - 1}):  # gemma3: 2 is SWA
        heads = [(layer, 0), (layer, 2)]
        # VLMs: the image's last 60 cells (within Gemma 3's 128-cell sliding window of the
        # last token) and text before the image
        n = N_IMAGE.get(name, 0)
        roi = (ImageTokens(n - 60, n - 1), Tokens(1, 4)) if name in VLM else Text(SPAN)
        st = Steering(heads=heads, roi=roi, mode="bias", strength=0.0)
        llm = load(name, st)
        ask(llm, name)  # unsteered prompt: the cache every observation below shares
        scales = llm._steer_hook.scales()
        assert np.all(scales > 0)
        np.testing.assert_allclose(scales, formula_scale(name), rtol=1e-6)

        seq = llm._steer_seq()
        cells, _ = resolve(st.roi, seq)
        w = rng.normal(size=cells.size) * 2.0
        st.update(strength=1.5, weights=w)
        st._publish(seq)
        b = np.zeros(seq.n_cells)
        b[cells] = 1.5 * w

        obs = {}
        for steered in (False, True):
            # the last prompt token again, same cell: its row in every layer, per KV cell
            last = int(llm.input_ids[llm.n_tokens - 1])
            llm.n_tokens -= 1
            llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
            each = np.arange(seq.n_cells, dtype=np.int16)
            with st._observing(each, seq.n_cells, _native.ROWS_LAST, edit=steered):
                llm.eval([last])
                rows, n_rows = llm._steer_hook.read_obs(reset=True)
            assert np.all(n_rows == 1)
            obs[steered] = rows.astype(np.float64)
        p0, p1 = obs[False][layer], obs[True][layer]
        np.testing.assert_allclose(p0.sum(-1), 1.0, rtol=1e-4)
        for h in range(p0.shape[0]):
            if (layer, h) in heads:
                seen = p0[h] > 0  # masked cells (causal, sliding window) stay at 0
                want = np.zeros_like(p0[h])
                want[seen] = softmax(np.log(p0[h][seen]) + b[seen])
                np.testing.assert_allclose(p1[h], want, rtol=2e-4, atol=1e-6)
                assert np.abs(p1[h] - p0[h]).max() > 1e-3  # the bias moved something
            else:
                np.testing.assert_array_equal(p1[h], p0[h])
        np.testing.assert_array_equal(obs[True][:layer], obs[False][:layer])  # below: as was


# ------------------------------------------------------------------------- token canary
@pytest.mark.parametrize("name", TEXT)
def test_token_canary(load, name):
    """A span suppressed in every head (-1e4: exactly 0 after softmax): two prompts that differ
    only inside it give bit-identical logits; one span cell left visible: they differ."""
    st = Steering(heads="all", roi=Tokens(4, 12), mode="bias", strength=-1e4)
    llm = load(name, st)
    base = llm.tokenize(PROMPT.encode())
    other = list(base)
    rng = np.random.default_rng(5)
    other[4:12] = rng.integers(0, 300, 8).tolist()  # ordinary BPE ids, same length

    def run(tokens):
        llm.reset()
        llm._ctx.kv_cache_clear()
        st._publish(llm._steer_seq_for(tokens, []))
        llm.eval(tokens)
        return logits(llm)

    np.testing.assert_array_equal(run(base), run(other))
    assert llm.steering.stats().n_kq_edited > 0
    st.update(roi=Tokens(5, 12))  # cell 4 visible again
    assert np.abs(run(base) - run(other)).max() > 1e-4


# ------------------------------------------------------------------------- images


@pytest.mark.parametrize("name", VLM)
def test_image_cells_canary(load, name):
    n = N_IMAGE[name]
    st = Steering(heads="all", roi=ImageTokens(0, n - 1), mode="bias", strength=-1e4)
    llm = load(name, st)
    a, b = noise(11), noise(12)
    _, la = ask(llm, name, a)
    (span,) = llm.images
    assert span.grid.n_tokens == n and span.grid.align > 0
    if name == "gemma3":  # ordinary positions: one per image token, cells follow positions
        assert span.n_pos == n and span.first_cell == span.first_pos
    else:  # M-RoPE: the image takes max(nx, ny) positions
        assert span.n_pos == max(span.grid.nx, span.grid.ny)
    _, lb = ask(llm, name, b)
    np.testing.assert_array_equal(la, lb)  # the image is invisible: the same logits
    st.update(roi=ImageTokens(1, n - 1))  # image cell 0 visible again
    _, la = ask(llm, name, a)
    _, lb = ask(llm, name, b)
    assert np.abs(la - lb).max() > 1e-4


def test_text_roi_after_the_image_in_a_chat(load):
    """The chat's whole layout is published before its chunks run: a Text ROI in the
    question after the image resolves (the handler's first text chunk alone must not be
    taken for a new raw prompt)."""
    st = Steering(heads="all", roi=Text("What is in panel"), mode="bias", strength=2.0)
    llm = load("qwen3vl", st)
    ask(llm, "qwen3vl")
    seq = llm._steer_seq()
    cells, _ = resolve(st.roi, seq)
    np.testing.assert_array_equal(np.nonzero(st._published[1])[0], cells)


def hand_grid(name, w, h):
    """nx, ny by hand from mtmd's rules (qwen: smart resize to 32 / 28 px; gemma3: fixed)."""
    if name == "gemma3":
        return 16, 16
    a = 32 if name == "qwen3vl" else 28
    return max(1, math.floor(w / a + 0.5)), max(1, math.floor(h / a + 0.5))


@pytest.mark.parametrize("name", VLM)
def test_pixel_grid_is_mtmds(load, name):
    geo = Geometry.from_mmproj(mmproj(name))
    llm = load(name, Steering(heads="all", roi="center", mode="bias", strength=1.0))
    for size in [(320, 200), (640, 480), (224, 224), (97, 211), (1000, 300)]:
        ask(llm, name, noise(2, size))
        (span,) = llm.images
        assert span.grid.align > 0, f"{size}: the predicted grid disagrees with mtmd's"
        assert span.grid == geo.grid(*size)
        assert (span.grid.nx, span.grid.ny) == hand_grid(name, *size), size
        assert llm.steering.stats().n_kq_edited > 0


def expect_tokens(nx, rows, cols):
    return sorted(r * nx + c for r in rows for c in cols)


# image size, then for Panel(2, grid=(2, 2)) (top-right) and a small box at the top-left
# corner: the tokens mtmd's layout puts there, worked out by hand
BOXES = {
    # 640x320 -> 20x10 tokens of 32 px, no letterbox
    "qwen3vl": ((640, 320), 20, (range(0, 5), range(10, 20)), Box(0, 0, 64, 64), [0, 1, 20, 21]),
    # 560x280 -> 20x10 tokens of 28 px, no letterbox
    "qwen25vl": ((560, 280), 20, (range(0, 5), range(10, 20)), Box(0, 0, 56, 56), [0, 1, 20, 21]),
    # 448x224 -> scaled x2 to 896x448 on the 896 canvas, black bands 224 px above and below:
    # image rows 0..111 -> canvas 224..447 -> token rows 4..7; x 224..447 -> 448..895 -> 8..15
    "gemma3": ((448, 224), 16, (range(4, 8), range(8, 16)), Box(0, 0, 28, 28), [4 * 16]),
}


@pytest.mark.parametrize("name", VLM)
def test_box_and_panel_select_the_expected_tokens(load, name):
    size, nx, (rows, cols), box, box_tokens = BOXES[name]
    st = Steering(heads="all", roi=Panel(2, grid=(2, 2)), mode="bias", strength=2.0)
    llm = load(name, st)
    ask(llm, name, noise(3, size))
    (span,) = llm.images
    bias = st._published[1]  # what the hook edits, per KV cell
    want = span.first_cell + np.array(expect_tokens(nx, rows, cols))
    np.testing.assert_array_equal(np.nonzero(bias)[0], want)
    st.update(roi=box)
    ask(llm, name, noise(3, size))
    np.testing.assert_array_equal(
        np.nonzero(st._published[1])[0], span.first_cell + np.array(box_tokens)
    )
    assert llm.steering.stats().n_kq_edited > 0


# ------------------------------------------------------------------------- R1 chat
@pytest.mark.parametrize("name", TEXT)
def test_r1_chat_with_think_runs_steered_and_not(load, name):
    for steering in (None, Steering(heads="all", roi=Text("red star"), strength=4.0)):
        llm = load(name, steering)
        m = [{"role": "system", "content": "Answer."}, {"role": "user", "content": PROMPT}]
        out = llm.create_chat_completion(m, max_tokens=16, temperature=0)
        assert isinstance(out["choices"][0]["message"]["content"], str)
        assert np.all(np.isfinite(logits(llm)))
        think = llm.tokenize(b"<think>", add_bos=False, special=True)
        assert len(think) == 1  # one special token
        assert think[0] in llm.input_ids[: llm.n_tokens]  # the generation prompt opened <think>
        if steering is not None:
            assert steering.stats().n_kq_edited > 0

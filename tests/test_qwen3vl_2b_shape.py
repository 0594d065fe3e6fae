"""Qwen3-VL-2B's shape in a tiny fixture (tests/data/fixtures/qwen3vl2b-shape-*.gguf, made by
scripts/fixtures/make_fixtures.py): random weights, but GGUF metadata with Qwen3-VL-2B's
attention shape (qwen3vl, 28 layers x 16 query heads, 8 KV heads, deepstack on), so the
gaze-heads authors' Qwen3-VL-2B headmap (headmaps/qwen3vl-2b.json, matched by architecture
and shape) addresses real heads here:

- the model loads and answers an image chat, plain and steered;
- the headmap accepts it with no warning, and its identity is the map's;
- steering with the headmap edits kq nodes in exactly the layers of its top-10 heads (counted
  from the map), the rows of exactly those 10 heads, in the phases asked for; below the
  lowest of those layers nothing moves, and in it only the listed heads;
- strength 0 is the plain model, token for token and logit for logit.
"""

import json
import warnings
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from llama_steer import Llama, Panel, Steering, _native, comics, guarded_load
from llama_steer.headmap import Headmap, ModelIdentity
from llama_steer.messages import user_message
from llama_steer.roi import resolve

ROOT = Path(__file__).resolve().parents[1]
GGUF = str(ROOT / "tests" / "data" / "fixtures" / "qwen3vl2b-shape-f16.gguf")
MMPROJ = str(ROOT / "tests" / "data" / "fixtures" / "mmproj-qwen3vl2b-shape-f16.gguf")
HEADMAP = str(ROOT / "headmaps" / "qwen3vl-2b.json")
QUESTION = "What happens in panel 4?"


def top_heads() -> list[tuple[int, int]]:
    """The headmap's recommended top-k heads, read from its JSON (not through Headmap)."""
    data = json.loads(Path(HEADMAP).read_text())
    k = data["defaults"]["top_k"]
    return [(h["layer"], h["head"]) for h in data["heads"][:k]]


TOP = top_heads()
LAYERS = sorted({layer for layer, _ in TOP})


@pytest.fixture
def load():
    """load(steering=None, plain=False) -> the fixture VLM with its mtmd handler, closed at
    teardown."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    made = []

    def make(steering=None, plain=False):
        kw = dict(
            model_path=GGUF,
            chat_handler=MTMDChatHandler(clip_model_path=MMPROJ, verbose=False),
            n_ctx=1024,
            n_threads=2,
            verbose=False,
            seed=0,
        )
        if plain:
            with guarded_load():
                llm = llama_cpp.Llama(**kw)
        else:
            llm = Llama(steering=steering, **kw)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.close()


def strip(seed: int = 6 * 10**9):
    return comics.render(comics.make_strip(seed, "2x3"))


def messages(seed: int = 6 * 10**9):
    return [user_message(QUESTION, [strip(seed)])]


def last_logits(llm) -> np.ndarray:
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()


def chat(llm, n=8, seed: int = 6 * 10**9):
    out = llm.create_chat_completion(messages(seed), max_tokens=n, temperature=0)
    return out["choices"][0]["message"]["content"], last_logits(llm)


def test_the_fixture_has_qwen3vl_2bs_attention_shape():
    assert (TOP[0], len(TOP)) == ((19, 5), 10)
    assert LAYERS == [16, 17, 18, 19, 20, 21]  # the top 10 sit in 6 of the 28 layers
    me = ModelIdentity.of_gguf(GGUF)
    hm = Headmap.load(HEADMAP)
    shape = ("qwen3vl", 28, 16, 8)
    assert (me.architecture, me.n_layer, me.n_head, me.n_head_kv) == shape
    m = hm.model
    assert (m.architecture, m.n_layer, m.n_head, m.n_head_kv) == shape
    assert not m.fingerprint  # so the map matches by architecture + shape
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hm.check_model(GGUF) == []  # strict: a warning would be an error
    from llama_steer._gguf import read_metadata

    clip = read_metadata(MMPROJ)
    assert clip["clip.projector_type"] == "qwen3vl_merger"
    assert clip["clip.vision.patch_size"] == 16
    assert clip["clip.vision.spatial_merge_size"] == 2
    assert clip["clip.vision.projection_dim"] == read_metadata(GGUF)["qwen3vl.embedding_length"]
    assert any(clip["clip.vision.is_deepstack_layers"])
    assert read_metadata(GGUF)["qwen3vl.n_deepstack_layers"] == 3


def test_an_image_chat_runs_plain_and_steered(load):
    plain = load(plain=True)
    txt, ref = chat(plain)
    assert isinstance(txt, str) and np.all(np.isfinite(ref))
    hm = Headmap.load(HEADMAP)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # attaching checks the map against the model
        st = Steering(headmap=hm, roi=Panel(4, of=6), **hm.recommended())
        llm = load(st)
        txt, log = chat(llm)
    assert isinstance(txt, str) and np.all(np.isfinite(log))
    (span,) = llm.images
    assert span.grid.align > 0  # the pixel ROI maps onto mtmd's grid
    assert st.stats().n_kq_edited > 0 and st.stats().flags == 0
    assert np.abs(log - ref).max() > 1e-3  # the steered answer's logits moved


def test_the_headmap_steers_exactly_its_layers_and_heads(load):
    """Steering(headmap=..., roi=Panel(4, of=6), decode_only=False): prefill and decode: every
    eval edits one kq node per layer of the top 10 and 10 rows per token."""
    st = Steering(headmap=HEADMAP, roi=Panel(4, of=6), decode_only=False)
    llm = load(st)
    mask = st.mask
    assert sorted(zip(*np.nonzero(mask), strict=True)) == sorted(TOP)
    before = None
    steps = 0
    stream = llm.create_chat_completion(messages(), max_tokens=8, temperature=0, stream=True)
    for chunk in stream:
        s = st.stats()
        if chunk["choices"][0]["delta"].get("content") is None:
            continue
        if before is None:  # the prompt: text chunks and the image, each one eval
            assert s.n_kq_edited > 0 and s.n_kq_edited % len(LAYERS) == 0
        else:  # one decode step
            steps += 1
            assert s.n_kq_edited - before.n_kq_edited == len(LAYERS)
            assert s.n_rows_edited - before.n_rows_edited == len(TOP)
            assert s.n_kq_edited_eval == len(LAYERS)
        assert s.flags == 0
        before = s
    assert steps >= 3
    # every evaluated KV cell's query row (M-RoPE: the image has more cells than positions),
    # in each of the 10 heads, exactly once
    assert st.stats().n_rows_edited == len(TOP) * llm._steer_seq().n_cells


def test_decode_only_as_the_cli_steers(load):
    """The headmap's defaults (top 10, redirect +-10000, decode only): the prompt is not
    edited, each decode step edits the 6 layers."""
    hm = Headmap.load(HEADMAP)
    rec = hm.recommended()
    assert (rec["top_k"], rec["mode"], rec["decode_only"]) == (10, "redirect", True)
    st = Steering(headmap=hm, roi=Panel(4, of=6), **rec)
    llm = load(st)
    counts = []
    stream = llm.create_chat_completion(messages(), max_tokens=8, temperature=0, stream=True)
    for chunk in stream:
        if chunk["choices"][0]["delta"].get("content") is not None:
            counts.append(st.stats().n_kq_edited)
    assert counts[0] == 0  # the first token comes from the unedited prompt
    assert len(counts) >= 4
    assert np.all(np.diff(counts) == len(LAYERS))


def test_below_the_lowest_steered_layer_nothing_moves_and_in_it_only_the_top_heads(load):
    """The last prompt token's attention row in every layer, observed over every KV cell,
    edited and not: identical below layer 16; in layer 16 only heads 7 and 8 (its top-10
    heads) change, and they move towards panel 4."""
    st = Steering(headmap=HEADMAP, roi=Panel(4, of=6), strength=0.0, decode_only=False)
    llm = load(st)
    chat(llm, n=1)  # the unsteered prompt: the cache both observations share
    seq = llm._steer_seq()
    cells, _ = resolve(st.roi, seq)
    assert cells.size > 0
    st.update(strength=4.0)
    st._publish(seq)
    obs = {}
    for steered in (False, True):
        last = int(llm.input_ids[llm.n_tokens - 1])
        llm.n_tokens -= 1
        llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
        each = np.arange(seq.n_cells, dtype=np.int16)
        with st._observing(each, seq.n_cells, _native.ROWS_LAST, edit=steered):
            llm.eval([last])
            rows, n_rows = llm._steer_hook.read_obs(reset=True)
        assert np.all(n_rows == 1)
        obs[steered] = rows.astype(np.float64)
    low = LAYERS[0]
    np.testing.assert_array_equal(obs[True][:low], obs[False][:low])
    hit = {h for layer, h in TOP if layer == low}
    assert hit == {7, 8}
    p0, p1 = obs[False][low], obs[True][low]
    for h in range(p0.shape[0]):
        if h in hit:
            assert p1[h][cells].sum() > p0[h][cells].sum() + 1e-3
        else:
            np.testing.assert_array_equal(p1[h], p0[h])
    assert np.abs(obs[True][LAYERS[-1] + 1 :] - obs[False][LAYERS[-1] + 1 :]).max() > 0


def test_strength_zero_is_the_plain_model(load):
    plain = load(plain=True)
    zero = load(Steering(headmap=HEADMAP, roi=Panel(4, of=6), strength=0.0))
    for seed in (6 * 10**9, 6 * 10**9 + 1):
        a_txt, a_log = chat(plain, n=12, seed=seed)
        b_txt, b_log = chat(zero, n=12, seed=seed)
        assert a_txt == b_txt
        np.testing.assert_array_equal(a_log, b_log)
    assert zero.steering.stats().n_kq_edited == 0


def test_the_headmap_is_picked_for_the_model_without_being_told(load, tmp_path):
    """A GGUF of Qwen3-VL-2B's architecture and shape gets headmaps/qwen3vl-2b.json and its
    defaults, in Python and through the CLI, with nothing but the ROI given."""
    from conftest import run_cli

    llm = load(Steering(roi=Panel(4, of=6)))
    r = llm.steering.resolved
    assert Path(r.headmap.source).name == "qwen3vl-2b.json"
    assert r.heads == tuple(TOP) and (r.mode, r.strength, r.decode_only) == (
        "redirect",
        10000.0,
        True,
    )
    strip(6 * 10**9).save(tmp_path / "s.png")
    args = ["-m", GGUF, "--mmproj", MMPROJ, "--image", str(tmp_path / "s.png")]
    args += ["--roi", "panel:4/6", "-p", QUESTION, "-n", "4", "-t", "2", "-v"]
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "headmap qwen3vl-2b.json" in out.stderr

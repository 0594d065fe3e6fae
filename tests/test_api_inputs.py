"""The Python API on the real runtime: documented inputs that used to crash or be ignored,
what update() and close() mean, and a probe of bad inputs that must be refused with the fix
(SteeringError naming the field), never a crash, a TypeError or a silent no-op."""

import struct

import llama_cpp
import numpy as np
import pytest
from conftest import PROMPT
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_steer import Box, Panel, Steering, SteeringError, Text, Tokens, parse_roi
from llama_steer.headmap import Headmap, HeadScore, ModelIdentity
from llama_steer.roi import RoiError, Seq, resolve
from llama_steer.vision import Geometry, GeometryError, ImageGrid, ImageSpan

MARY = Text("Mary lives in Madrid.")
L, H = 18, 4  # Gemma 3 270M: layers x query heads


def complete(llm, n=6):
    return llm.create_completion(PROMPT, max_tokens=n, temperature=0)["choices"][0]["text"]


def edited_layers_per_token(llm) -> int:
    """kq nodes edited by one prompt eval (a fresh prefill: no cached prefix)."""
    llm.reset()
    complete(llm, n=1)
    return llm.steering.stats().n_kq_edited


def gemma_headmap(gemma_path, heads) -> Headmap:
    return Headmap(
        model=ModelIdentity.of_gguf(gemma_path),
        heads=[HeadScore(lh[0], lh[1], 1.0 - i / 100) for i, lh in enumerate(heads)],
    )


# -- heads= as a mask array ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [bool, np.int64, np.float32, np.uint8])
def test_a_head_mask_array_steers(make_llm, dtype):
    mask = np.zeros((L, H), dtype=dtype)
    mask[:, :] = 1
    llm = make_llm(Steering(heads=mask, roi=MARY, strength=-10.0))
    assert complete(llm).strip().startswith("Berlin")  # every head: the fact is suppressed
    assert llm.steering.stats().n_kq_edited >= L


def test_a_mask_of_one_layer_edits_that_layer_only(make_llm):
    mask = np.zeros((L, H), dtype=bool)
    mask[3, 1] = True
    llm = make_llm(Steering(heads=mask, roi=MARY, strength=-10.0))
    assert edited_layers_per_token(llm) == 1
    mask[:] = True  # the Steering holds its own copy: the caller's array may change
    assert edited_layers_per_token(llm) == 1


def test_bad_masks_are_refused_with_the_shape(make_llm):
    with pytest.raises(SteeringError, match=r"transposed\? rows are layers"):
        make_llm(Steering(heads=np.ones((H, L), bool), roi=MARY))
    with pytest.raises(SteeringError, match="values other than 0 and 1"):
        Steering(heads=np.full((L, H), 0.5), roi=MARY)
    with pytest.raises(SteeringError, match="selects no head"):
        Steering(heads=np.zeros((L, H), bool), roi=MARY)
    with pytest.raises(SteeringError, match=r"expected \(n_layer, n_head\)"):
        Steering(heads=np.ones(L * H, bool), roi=MARY)


def test_update_with_a_mask_applies_and_a_bad_one_is_refused_at_once(make_llm):
    llm = make_llm(Steering(heads=[(0, 0)], roi=MARY, strength=-10.0))
    assert edited_layers_per_token(llm) == 1
    mask = np.zeros((L, H), bool)
    mask[2:5] = True
    llm.steering.update(heads=mask)
    assert edited_layers_per_token(llm) == 3
    with pytest.raises(SteeringError, match="transposed"):
        llm.steering.update(heads=np.ones((H, L), bool))
    assert edited_layers_per_token(llm) == 3  # the refused update left the old config
    assert complete(llm)  # and generation still works


# -- heads and headmap ---------------------------------------------------------------------
def test_update_heads_overrides_a_headmap(make_llm, gemma_path):
    hm = gemma_headmap(gemma_path, [(5, 1), (7, 2), (9, 0)])
    llm = make_llm(Steering(headmap=hm, top_k=1, roi=MARY, strength=-10.0))
    assert llm.steering.heads == ((5, 1),)
    assert edited_layers_per_token(llm) == 1
    llm.steering.update(heads="all")  # was silently ignored: heads re-derived from the map
    assert llm.steering.heads == "all"
    assert edited_layers_per_token(llm) == L
    llm.steering.update(headmap=hm, top_k=3)  # the map chooses again
    assert edited_layers_per_token(llm) == 3
    llm.steering.update(top_k=2)
    assert llm.steering.heads == ((5, 1), (7, 2))


def test_heads_override_a_headmaps_choice_and_top_k_conflicts(gemma_path):
    hm = gemma_headmap(gemma_path, [(5, 1)])
    hm.defaults.update(strength=7.0, mode="redirect")
    st = Steering(heads=[(1, 1)], headmap=hm, roi=Panel(2, of=6))
    assert st.heads == ((1, 1),)  # heads= wins over the map's choice ...
    assert (st.strength, st.mode) == (7.0, "redirect")  # ... its other defaults still apply
    with pytest.raises(SteeringError, match="top_k= takes a headmap's best heads and heads="):
        Steering(heads=[(1, 1)], headmap=hm, top_k=1, roi=MARY)
    # a headmap given as its parsed JSON works; a wrong type is a SteeringError, not TypeError
    assert Steering(headmap=hm.to_json(), roi=MARY).heads == ((5, 1),)
    with pytest.raises(SteeringError, match="missing key 'model'"):
        Steering(headmap={"version": 1, "heads": []}, roi=MARY)
    with pytest.raises(SteeringError, match="pass a Headmap, a path"):
        Steering(headmap=42, roi=MARY)
    empty = gemma_headmap(gemma_path, [])
    with pytest.raises(SteeringError, match="lists no heads"):
        Steering(headmap=empty, roi=MARY)


# -- update() between generations reaches raw eval() ---------------------------------------
def last_logits(llm) -> np.ndarray:
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()


def test_an_update_after_a_completion_applies_to_raw_evals(make_llm):
    toks = make_llm(cls=llama_cpp.Llama, vocab_only=True).tokenize(PROMPT.encode())
    fresh = make_llm(Steering(roi=MARY, strength=-10.0))
    fresh.eval(toks)
    want = last_logits(fresh)

    llm = make_llm(Steering(roi=MARY, strength=0.0))
    complete(llm)
    llm.reset()
    llm.eval(toks)
    plain = last_logits(llm)
    assert np.abs(plain - want).max() > 1e-2

    llm.steering.update(strength=-10.0)  # between generations: published lazily
    llm.reset()
    llm.eval(toks)
    np.testing.assert_allclose(last_logits(llm), want, atol=1e-4)

    llm.steering.update(strength=0.0)
    llm.reset()
    llm.eval(toks)
    np.testing.assert_allclose(last_logits(llm), plain, atol=1e-4)


def test_a_raw_eval_of_a_new_prompt_resolves_the_roi_against_it(make_llm):
    llm = make_llm(Steering(roi=Text("Berlin"), strength=-10.0))
    complete(llm)
    other = "Anna lives in Rome. Where does Anna live? In"
    llm.reset()
    with pytest.raises(SteeringError, match="'Berlin' is not in the prompt"):
        llm.eval(llm.tokenize(other.encode()))  # not the cells of the old prompt's Berlin


# -- close() -------------------------------------------------------------------------------
def test_close_detaches_and_the_model_runs_unsteered(make_llm):
    base = complete(make_llm(cls=llama_cpp.Llama))
    st = Steering(roi=MARY, strength=-10.0)
    llm = make_llm(st)
    steered = complete(llm)
    assert steered != base
    st.close()
    assert llm.steering is None
    assert complete(llm) == base  # cells made under the edit are not reused
    with pytest.raises(SteeringError, match="not attached"):
        st.update(strength=1.0) and st.stats()
    st.close()  # twice is safe


def test_a_context_manager_closes_the_steering(make_llm):
    base = complete(make_llm(cls=llama_cpp.Llama))
    with Steering(roi=MARY, strength=-10.0) as st:
        llm = make_llm(st)
        assert complete(llm) != base
    assert llm.steering is None and complete(llm) == base


# -- values refused with the field named ---------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(heads=[(0.5, 1)]), r"\(0.5, 1\) is not a \(layer, head\) pair of ints"),
        (dict(heads=[(True, 1)]), "pair of ints"),
        (dict(heads=[(1, 2, 3)]), "pair of ints"),
        (dict(heads=[]), "selects no head"),
        (dict(heads="layers:5-2"), "A <= B"),
        (dict(heads=7), "heads=7"),
        (dict(strength="5"), "strength='5' is not a number"),
        (dict(strength=True), "strength=True is not a number"),
        (dict(strength=float("nan")), "not finite"),
        (dict(decode_only="yes"), "decode_only='yes'"),
        (dict(focus="content"), "no image target"),
        (dict(mode="redirect"), "needs a domain"),
        (dict(mode="steer"), "mode='steer' is not one of"),
    ],
)
def test_bad_values_name_the_field(kwargs, match):
    with pytest.raises(SteeringError, match=match):
        Steering(**{"roi": MARY, **kwargs})


@settings(max_examples=200, deadline=None)
@given(
    heads=st.one_of(
        st.none(),
        st.text(max_size=12),
        st.lists(st.tuples(st.integers(-3, 40), st.integers(-3, 40)), max_size=4),
        st.lists(st.one_of(st.floats(), st.booleans(), st.text(max_size=3)), max_size=3),
    ),
    strength=st.one_of(st.floats(), st.integers(-(10**6), 10**6), st.text(max_size=4)),
    mode=st.sampled_from(["bias", "redirect", "emphasize", "shift", "image-boost", "x"]),
)
def test_any_constructor_input_is_a_config_or_a_steering_error(heads, strength, mode):
    try:
        Steering(heads=heads, roi=MARY, mode=mode, strength=strength, domain=MARY)
    except SteeringError:
        pass  # anything else (TypeError, ValueError, IndexError...) fails the test


# -- panels and projectors -----------------------------------------------------------------
QWEN2VL = Geometry("qwen2vl_merger", patch_size=14, merge=2, min_tokens=8, max_tokens=4096)


def seq_with(grid: ImageGrid) -> Seq:
    span = ImageSpan(1, grid, first_cell=5, first_pos=5, n_pos=max(grid.nx, grid.ny))
    n = 5 + span.n_pos + 3
    return Seq([0] * n, [b""] * n, np.arange(n), [span])


def test_a_panel_layout_with_no_panels_says_so():
    with pytest.raises(RoiError) as e:
        parse_roi("panel:1/0")
    assert "None" not in str(e.value) and "panel:k/n with n >= 1" in str(e.value)
    with pytest.raises(RoiError, match="R, C >= 1"):
        Panel(1, grid=(0, 3))


def test_panels_smaller_than_a_token_are_refused():
    seq = seq_with(QWEN2VL.grid(252, 168))  # 9x6 tokens of 28 px
    with pytest.raises(RoiError, match=r"smaller than one image token .* at most 6x9 panels"):
        resolve(parse_roi("panel:1@1000x1000"), seq)
    cells, _ = resolve(parse_roi("panel:1@6x9"), seq)  # one token per panel: still fine
    assert cells.tolist() == [5]


def test_pixel_rois_on_an_unmapped_projector_are_refused_by_name():
    why = "llama-steer does not map projector 'llava' (of mm.gguf)"
    g = ImageGrid(320, 200, nx=64, ny=1, align=0, content=(0, 0, 0, 0), unmapped=why)
    seq = seq_with(g)
    for roi in ("box:0,0,100,100", "panel:2/6", "left"):
        with pytest.raises(RoiError, match=r"projector 'llava'.*e\.g\. 0:63 is the whole"):
            resolve(parse_roi(roi), seq)
    cells, _ = resolve(parse_roi("10:19"), seq)  # token ranges work with any projector
    assert cells.tolist() == list(range(15, 25))


def write_gguf(path, kv: dict) -> None:
    """A GGUF v3 header holding only string metadata (no tensors)."""
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv)))
        for k, v in kv.items():
            kb, vb = k.encode(), v.encode()
            f.write(struct.pack("<Q", len(kb)) + kb + struct.pack("<I", 8))
            f.write(struct.pack("<Q", len(vb)) + vb)


def test_an_unknown_projector_names_itself_and_the_fix(tmp_path):
    p = tmp_path / "mmproj-llava.gguf"
    write_gguf(p, {"general.architecture": "clip", "clip.projector_type": "llava"})
    with pytest.raises(GeometryError) as e:
        Geometry.from_mmproj(p)
    msg = str(e.value)
    assert "projector 'llava'" in msg and "image-token ranges such as 50:99" in msg
    assert "qwen2vl_merger" in msg


def test_box_rois_still_map_on_a_known_projector():
    seq = seq_with(QWEN2VL.grid(252, 168))
    cells, _ = resolve((Box(28, 28, 84, 84),), seq)
    assert (cells - 5).tolist() == [10, 11, 19, 20]
    cells, _ = resolve((Tokens(0, 3),), seq)
    assert cells.tolist() == [0, 1, 2]

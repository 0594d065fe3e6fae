"""Organism v2, the Qwen3-VL-architecture VLM (deepstack, IMROPE, 32-px tokens), end to end
through llama-cpp-python's mtmd chat handler: the architecture llama.cpp loads, the KV canary
on images of sizes that are no multiple of the token side (letterboxed by mtmd), strength 0 as
the plain model token for token, its own headmap found by fingerprint, and steering through
the Python API and the CLI on strips of the renderer and sizes training never drew."""

import llama_cpp
import numpy as np
import pytest
from conftest import run_cli, vlm_maker

from llama_steer import ImageTokens, Steering, comics
from llama_steer._gguf import read_metadata
from llama_steer.apps.evaluate import Evaluator, objects_in, panel_roi
from llama_steer.headmap import Headmap, ModelIdentity, find_headmap
from llama_steer.messages import user_message

SEEDS = 14 * 10**9  # seeds no training or other test uses


def held_out_strip(i: int):
    desc = comics.make_strip_v2(SEEDS + i, list(comics.LAYOUTS_V2)[i % 4], "heldout")
    return desc, comics.render_v2(desc, "sdf")


@pytest.fixture
def vlm2(organism_v2):
    yield from vlm_maker(organism_v2)


@pytest.fixture(scope="module")
def headmap_v2(organism_v2):
    found = find_headmap(ModelIdentity.of_gguf(organism_v2[0]))
    assert found is not None, "no headmap for organism v2 in headmaps/"
    hm, path = found
    assert path.name == "organism-v2.json"
    assert hm.model.fingerprint == ModelIdentity.of_gguf(organism_v2[0]).fingerprint
    return hm


def last_logits(llm, messages) -> np.ndarray:
    llm.create_chat_completion(messages, max_tokens=1, temperature=0)
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()


def test_it_is_the_qwen3vl_graph(organism_v2):
    text, mmproj = (read_metadata(p) for p in organism_v2)
    assert text["general.architecture"] == "qwen3vl"
    assert text["qwen3vl.rope.dimension_sections"][:3] == [6, 5, 5]  # IMROPE t, h, w
    assert text["qwen3vl.n_deepstack_layers"] == 2
    assert mmproj["clip.projector_type"] == "qwen3vl_merger"
    assert mmproj["clip.vision.patch_size"] == 16
    assert sum(mmproj["clip.vision.is_deepstack_layers"]) == 2


@pytest.mark.parametrize("i", [0, 3])  # 567x122 (1x6), 71x604 (6x1): letterboxed by mtmd
def test_image_cells_canary(vlm2, i):
    """Every image cell suppressed in every head: two different strips of the same size give
    bit-identical logits, so deepstack reaches the text only through attention, as the KV
    bookkeeping assumes; one cell left visible and they differ."""
    desc, a = held_out_strip(i)
    b = comics.render_v2(desc, "numpy")  # the same layout and size, drawn by other code
    llm = vlm2(Steering(strength=0.0))
    q = "What is in panel 3?"
    last_logits(llm, [user_message(q, [a])])
    (span,) = llm.images
    n = span.grid.n_tokens
    assert span.grid.describe().count("letterboxed") == 1
    llm.steering.update(heads="all", roi=ImageTokens(0, n - 1), mode="bias", strength=-1e4)
    la, lb = last_logits(llm, [user_message(q, [a])]), last_logits(llm, [user_message(q, [b])])
    np.testing.assert_array_equal(la, lb)
    llm.steering.update(roi=ImageTokens(1, n - 1))
    la, lb = last_logits(llm, [user_message(q, [a])]), last_logits(llm, [user_message(q, [b])])
    assert np.abs(la - lb).max() > 1e-4


def test_strength_zero_is_the_plain_model_token_for_token(vlm2, headmap_v2):
    plain = vlm2(cls=llama_cpp.Llama)
    steered = vlm2(Steering(heads=headmap_v2.top(20), roi="box:0,0,60,60", strength=0.0))
    for i in range(4):
        desc, img = held_out_strip(i)
        m = [user_message("Describe the strip.", [img])]
        want = plain.create_chat_completion(m, max_tokens=40, temperature=0)
        got = steered.create_chat_completion(m, max_tokens=40, temperature=0)
        assert got["choices"][0]["message"] == want["choices"][0]["message"]


def test_its_top_heads_steer_and_random_heads_do_not(vlm2, headmap_v2):
    """The paper's finding on v2, with its headmap's defaults, on held-out strips of all four
    layouts: the top heads move the ambiguous question's answer to the chosen panel, as many
    random heads rarely do (a random panel: 1 in 5)."""
    hm = headmap_v2
    k = int(hm.defaults["top_k"])
    llm = vlm2(Steering(strength=0.0))
    assert hm.defaults["mode"] == "reroute"
    ev = Evaluator(
        llm, float(hm.defaults["strength"]), focus=hm.defaults.get("focus"), mode="reroute"
    )
    strips = [held_out_strip(i)[0] for i in range(8)]
    res = ev.narration(strips, {"top": hm.top(k), "random": hm.random(k, seed=0)})
    assert res["top"]["n"] >= 30
    assert res["top"]["accuracy"]["mean"] >= 0.85, res
    assert res["random"]["accuracy"]["mean"] <= 0.2, res
    ev.mode = "redirect"  # the plain redirect: these heads read the last word at some steps
    plain = ev.narration(strips, {"top": hm.top(k)})
    assert plain["top"]["accuracy"]["mean"] < res["top"]["accuracy"]["mean"], (plain, res)


def test_the_cli_steers_v2_with_its_own_headmap(organism_v2, tmp_path):
    """``llama-steer --roi box:...`` with nothing else: the CLI finds organism-v2.json by the
    model's fingerprint and the answer names the boxed panel's object."""
    desc, img = held_out_strip(1)
    img.save(tmp_path / "strip.png")
    png = str(tmp_path / "strip.png")
    base = ["-m", organism_v2[0], "--mmproj", organism_v2[1], "--image", png]
    base += ["-p", "What is in this panel?", "-n", "8", "-t", "2"]
    plain = run_cli(*base)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert objects_in(plain.stdout)[:1] == [desc.panels[0].thing.name]
    hits = 0
    targets = [k for k in range(2, 7) if desc.panels[k - 1].thing.name != desc.panels[0].thing.name]
    for k in targets:
        r = run_cli(*base, "--roi", panel_roi(desc, k))
        assert r.returncode == 0, r.stderr[-2000:]
        hits += objects_in(r.stdout)[:1] == [desc.panels[k - 1].thing.name]
    assert hits >= len(targets) - 1, (hits, targets)


def test_the_headmap_round_trips(headmap_v2, tmp_path):
    headmap_v2.save(tmp_path / "hm.json")
    assert Headmap.load(tmp_path / "hm.json") == headmap_v2

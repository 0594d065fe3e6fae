"""The library surface: configs as values (round trip, one resolution of defaults), the
headmap registry (which map goes with a model), the public observer, and the layering (the
library imports nothing from the apps; no app reaches into private steering state)."""

import ast
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_steer import (
    Box,
    Headmap,
    ImageTokens,
    Panel,
    Region,
    Steering,
    SteeringConfig,
    SteeringError,
    Text,
    Tokens,
    comics,
    find_headmap,
)
from llama_steer.config import FALLBACK
from llama_steer.headmap import HEADMAPS_ENV, HeadScore, ModelIdentity
from llama_steer.messages import user_message

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugin" / "llama_steer"


# -- configs as values ---------------------------------------------------------------------
targets = st.one_of(
    st.builds(Text, st.text(min_size=1, max_size=8)),
    st.builds(lambda a, n: Tokens(a, a + n), st.integers(0, 50), st.integers(1, 9)),
    st.builds(lambda a, n: ImageTokens(a, a + n), st.integers(0, 50), st.integers(0, 9)),
    st.builds(lambda k: Panel(k, of=6), st.integers(1, 6)),
    st.builds(lambda k: Panel(k, grid=(2, 3)), st.integers(1, 6)),
    st.builds(Box, st.just(1.0), st.just(2.0), st.just(30.0), st.just(40.0)),
    st.builds(Region, st.sampled_from(["left", "top-right", "center"])),
)


@settings(max_examples=150, deadline=None)
@given(
    roi=st.lists(targets, max_size=3),
    heads=st.one_of(
        st.none(),
        st.just("all"),
        st.just("layers:1-2"),
        st.lists(st.tuples(st.integers(0, 5), st.integers(0, 7)), min_size=1, max_size=4),
    ),
    mode=st.sampled_from([None, "bias", "emphasize", "image-boost"]),
    strength=st.one_of(st.none(), st.floats(-50, 50, allow_nan=False)),
    decode_only=st.one_of(st.none(), st.booleans()),
)
def test_a_config_round_trips_to_an_equal_value(roi, heads, mode, strength, decode_only):
    cfg = SteeringConfig(
        roi=roi, heads=heads, mode=mode, strength=strength, decode_only=decode_only
    )
    back = SteeringConfig.from_dict(cfg.to_dict())
    assert back == cfg
    assert hash(back) == hash(cfg)
    assert cfg.replace(strength=1.0) != cfg or cfg.strength == 1.0


def test_masks_and_headmaps_round_trip(tmp_path):
    mask = np.zeros((6, 8), bool)
    mask[2, 3] = True
    cfg = SteeringConfig(heads=mask, roi="panel:2/6")
    assert SteeringConfig.from_dict(cfg.to_dict()) == cfg
    hm = Headmap.load(ROOT / "headmaps/organism.json")
    cfg = SteeringConfig(headmap=hm, top_k=5, roi=Panel(1, of=6))
    import json

    assert SteeringConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_errors_name_the_field():
    with pytest.raises(SteeringError, match="unknown argument.*'colour'"):
        SteeringConfig().replace(colour="red")
    with pytest.raises(SteeringError, match="unknown key.*'colour'"):
        SteeringConfig.from_dict({"colour": "red"})
    with pytest.raises(SteeringError, match="roi item type 'Blob'"):
        SteeringConfig.from_dict({"roi": [{"type": "Blob"}]})
    with pytest.raises(SteeringError, match="heads='top:3' and top_k=4 disagree"):
        SteeringConfig(heads="top:3", top_k=4)


def test_resolution_rules(gemma_path, organism):
    organism_id = ModelIdentity.of_gguf(organism[0])
    hm = Headmap.load(ROOT / "headmaps/organism.json")
    rec = hm.recommended()
    # nothing given, an image ROI: the model's headmap decides everything
    r = SteeringConfig(roi="panel:3/6").resolve(organism_id)
    assert r.headmap == hm and r.heads == tuple(hm.top(rec["top_k"]))
    assert (r.mode, r.strength, r.decode_only, r.focus) == (
        rec["mode"],
        rec["strength"],
        rec["decode_only"],
        rec["focus"] or "none",
    )
    # a field given wins; heads= turns the lookup off (the map's recipe was tuned for its heads)
    assert SteeringConfig(roi="panel:3/6", strength=2.0).resolve(organism_id).strength == 2.0
    r = SteeringConfig(roi="panel:3/6", heads="all").resolve(organism_id)
    assert r.headmap is None and r.strength == FALLBACK["strength"] and r.mode == "redirect"
    # top:K = the map's K best
    assert len(SteeringConfig(roi="panel:3/6", heads="top:4").resolve(organism_id).heads) == 4
    # a text ROI keeps the map's heads but not its image recipe
    r = SteeringConfig(roi=Text("panel")).resolve(organism_id)
    assert r.mode == "bias" and r.focus == "none" and r.heads == tuple(hm.top(rec["top_k"]))
    # no headmap for Gemma: the fallback
    r = SteeringConfig(roi=Text("Mary")).resolve(ModelIdentity.of_gguf(gemma_path))
    assert r.headmap is None and r.heads == "all" and r.mode == "bias"
    with pytest.raises(SteeringError, match="none ships for this model"):
        SteeringConfig(roi=Text("Mary"), top_k=3).resolve(ModelIdentity.of_gguf(gemma_path))


# -- the registry --------------------------------------------------------------------------
def test_shipped_headmaps_are_found_by_identity(organism):
    found = find_headmap(ModelIdentity.of_gguf(organism[0]))
    assert found is not None and found[1].name == "organism.json"  # by fingerprint
    qwen3vl_2b = ModelIdentity("qwen3vl", 28, 16, 8, "0" * 64, "Qwen3-VL-2B-Instruct")
    found = find_headmap(qwen3vl_2b)
    assert found is not None and found[1].name == "qwen3vl-2b.json"  # by shape
    assert find_headmap(ModelIdentity("qwen3vl", 28, 16, 4, "", "")) is None  # other KV heads
    # same shape, other weights: never picked by itself (heads may not transfer)
    other = ModelIdentity.of_gguf(organism[0])
    other = ModelIdentity(other.architecture, other.n_layer, other.n_head, other.n_head_kv, "x")
    assert find_headmap(other) is None


def test_a_users_headmap_is_found_and_the_fallback_is_said_once(
    gemma_path, tmp_path, monkeypatch, caplog, make_llm
):
    from llama_steer import steering as steering_mod

    gemma = ModelIdentity.of_gguf(gemma_path)
    monkeypatch.setenv(HEADMAPS_ENV, str(tmp_path))
    assert find_headmap(gemma) is None
    steering_mod._told_no_headmap.clear()
    with caplog.at_level(logging.WARNING, logger="llama_steer"):
        make_llm(Steering(roi="panel:1/6", strength=0.0))
        make_llm(Steering(roi="panel:2/6", strength=0.0))
    said = [r for r in caplog.records if "no headmap for this model" in r.getMessage()]
    assert len(said) == 1 and "gemma3" in said[0].getMessage()
    hm = Headmap(model=gemma, heads=[HeadScore(3, 1, 0.9), HeadScore(5, 0, 0.5)])
    hm.defaults = {"top_k": 1, "strength": 3.0}
    hm.save(tmp_path / "gemma.json")
    found = find_headmap(gemma)
    assert found is not None and found[1] == tmp_path / "gemma.json"
    llm = make_llm(Steering(roi="panel:1/6"))
    assert llm.steering.heads == ((3, 1),) and llm.steering.strength == 3.0


# -- the observer --------------------------------------------------------------------------
def test_the_observer_follows_the_steered_panel(organism):
    """Steered to panel k, the steered heads' attention over the six panels peaks on k at
    every generated token; and the observer's sums equal attention_to on the last token."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from llama_steer import Llama

    desc = comics.make_strip(15 * 10**9, "2x3")
    llm = Llama(
        model_path=organism[0],
        chat_handler=MTMDChatHandler(clip_model_path=organism[1], verbose=False),
        steering=Steering(roi="panel:5@2x3"),
        n_ctx=1024,
        n_threads=2,
        verbose=False,
    )
    try:
        panels = {f"panel {k}": Panel(k, grid=(2, 3)) for k in range(1, 7)}
        m = [user_message("Describe the strip.", [comics.render(desc)])]
        tops = []
        with llm.steering.observe(panels) as obs:
            for chunk in llm.create_chat_completion(m, max_tokens=8, stream=True, temperature=0):
                if chunk["choices"][0]["delta"].get("content"):
                    tops.append(obs.top())
            mass, rows = obs.read()
            assert mass.shape == (*llm.steering.mask.shape, 6) and set(rows) == {1}
            last = mass[:, :, 4]
        # the first token comes from the prompt's last eval, which decode-only leaves alone
        assert len(tops) >= 4 and set(tops[1:]) == {"panel 5"}, tops
        np.testing.assert_allclose(
            llm.steering.attention_to(Panel(5, grid=(2, 3))), last, rtol=1e-4, atol=1e-6
        )
        with pytest.raises(SteeringError, match="this observer is closed"):
            obs.read()
        with llm.steering.observe(["panel:1@2x3"]) as o1:
            with pytest.raises(SteeringError, match="already has an open observer"):
                llm.steering.observe(["panel:2@2x3"])
        o1.close()  # twice is safe
    finally:
        llm.close()


# -- layering ------------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_the_library_imports_nothing_from_the_apps():
    for path in PLUGIN.glob("*.py"):
        bad = {m for m in _imports(path) if m.startswith("llama_steer.apps")}
        assert not bad, f"{path.name} imports {bad}"


def test_no_app_reaches_into_private_steering_state():
    """Apps (and benches, examples) use the public API: no `._steer_*`, `._observing`,
    `._heads_mask`, `read_obs` or `_native` outside the runtime."""
    pattern = re.compile(r"\._steer_\w+|\._observing|\._heads_mask|read_obs|\b_native\b|\._cfg\b")
    files = [*(PLUGIN / "apps").glob("*.py"), *(ROOT / "bench").glob("*.py")]
    files += [*(ROOT / "examples").glob("*.py")]
    for path in files:
        hits = pattern.findall(path.read_text())
        assert not hits, f"{path.relative_to(ROOT)}: {sorted(set(hits))}"


def test_a_prompt_cache_is_refused_while_steering(make_llm):
    import llama_cpp

    from llama_steer import Text

    llm = make_llm(Steering(roi=Text("Berlin"), strength=2.0))
    with pytest.raises(SteeringError, match="prompt cache"):
        llm.set_cache(llama_cpp.LlamaRAMCache())
    plain = make_llm()  # no steering: the parent's behaviour
    plain.set_cache(llama_cpp.LlamaRAMCache())

"""Headmap schema (round trip, named errors, model checks) and the CLI on the real runtime."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import PROMPT, run_cli

from llama_steer import Steering, SteeringError
from llama_steer.apps.cli import CliError, parse_schedule
from llama_steer.config import parse_heads
from llama_steer.headmap import (
    RECOMMENDED,
    Headmap,
    HeadmapError,
    HeadScore,
    ModelIdentity,
    convert,
)

GEMMA = ModelIdentity("gemma3", 18, 4, 1)


def headmap(**kw):
    rng = np.random.default_rng(0)
    scores = rng.random((18, 4))
    order = np.argsort(-scores, axis=None)
    heads = [HeadScore(int(i // 4), int(i % 4), float(scores.flat[i])) for i in order[:20]]
    args = dict(
        model=GEMMA,
        heads=heads,
        method={"name": "test"},
        scores=scores.tolist(),
        defaults={"top_k": 5, "mode": "bias", "strength": 4.0},
    )
    args.update(kw)
    return Headmap(**args)


def test_round_trip_and_head_sets(tmp_path):
    hm = headmap()
    hm.save(tmp_path / "h.json")
    again = Headmap.load(tmp_path / "h.json")
    assert again == hm
    assert Headmap.from_json(json.dumps(hm.to_json())) == hm
    assert hm.top(3) == [(h.layer, h.head) for h in hm.heads[:3]]
    s = np.asarray(hm.scores)
    worst = {(int(i // 4), int(i % 4)) for i in np.argsort(s, axis=None)[:4]}
    assert set(hm.bottom(4)) == worst
    rnd = hm.random(5, seed=1)
    assert len(set(rnd)) == 5 and not set(rnd) & set(hm.top(5))
    assert rnd == hm.random(5, seed=1) and rnd != hm.random(5, seed=2)


@pytest.mark.parametrize(
    "mutate,msg",
    [
        (lambda d: d.pop("version"), "missing key 'version'"),
        (lambda d: d.update(version=9), "version 9 is not supported"),
        (lambda d: d["model"].pop("n_head"), "missing key model.'n_head'"),
        (lambda d: d["model"].update(n_layer="18"), "model.'n_layer' must be int"),
        (lambda d: d["heads"][2].pop("score"), r"heads\[2\].'score'"),
        (lambda d: d["heads"][0].update(layer=18), r"heads\[0\] = \(layer 18, head"),
        (lambda d: d["heads"].append(dict(d["heads"][0])), "repeats"),
        (lambda d: d["heads"].reverse(), "sorted best first"),
        (lambda d: d.update(scores=[[0.0] * 4] * 3), "18 x 4 matrix"),
        (lambda d: d["defaults"].update(strenght=4), "unknown key defaults.'strenght'"),
        (lambda d: d["defaults"].update(strength="4"), "defaults.'strength' must be"),
        (lambda d: d["defaults"].update(decode_only=1), "defaults.'decode_only' must be bool"),
    ],
)
def test_bad_headmaps_name_the_key(mutate, msg):
    d = headmap().to_json()
    mutate(d)
    with pytest.raises(HeadmapError, match=msg):
        Headmap.from_json(d)


def test_headmap_for_another_model_is_refused(gemma_path, tmp_path, make_llm):
    other = headmap(
        model=ModelIdentity("qwen2vl", 6, 8, 2), heads=[HeadScore(1, 2, 0.5)], scores=None
    )
    with pytest.raises(HeadmapError, match=r"6 layers x 8 heads .* has 18 x 4"):
        other.check_model(gemma_path)
    same_shape = headmap(model=ModelIdentity("gemma3", 18, 4, 1, fingerprint="0" * 64))
    with pytest.raises(HeadmapError, match="different GGUF"):
        same_shape.check_model(gemma_path)
    assert same_shape.check_model(gemma_path, strict=False)  # a warning, not an error
    exact = headmap(model=ModelIdentity.of_gguf(gemma_path))
    assert exact.check_model(gemma_path) == []
    exact.save(tmp_path / "g.json")
    steer = Steering(
        headmap=str(tmp_path / "g.json"),
        roi="text:'Mary lives in Madrid.'",
        mode="bias",
        strength=-10.0,
    )
    assert steer.heads == tuple(exact.top(5))  # the headmap's recommended top_k
    make_llm(steer)
    other.save(tmp_path / "o.json")
    with pytest.raises(HeadmapError, match="6 layers x 8 heads"):
        make_llm(Steering(headmap=str(tmp_path / "o.json"), top_k=1, roi="text:'Mary'"))


def test_cli_parsers():
    assert parse_heads("all") == "all"
    assert parse_heads("L0H3,l2h1") == ((0, 3), (2, 1))
    assert parse_heads("0:3, 2:1") == ((0, 3), (2, 1))
    assert parse_heads("top:12") == ("top", 12)
    assert parse_heads("layers:2-4") == "layers:2-4"
    with pytest.raises(SteeringError, match="L3H5"):
        parse_heads("zero")
    assert parse_schedule("0:panel:1/6,12:panel:4/6") == [(0, "panel:1/6"), (12, "panel:4/6")]
    assert parse_schedule("0:box:1,2,30,40,5:left") == [(0, "box:1,2,30,40"), (5, "left")]
    assert parse_schedule("0:3:7,20:25;9:left") == [(0, "3:7,20:25"), (9, "left")]
    with pytest.raises(CliError, match="must increase"):
        parse_schedule("5:left,2:right")
    with pytest.raises(SteeringError, match="panel 9 does not exist"):
        parse_schedule("0:panel:9/6")


def test_recommended_fills_what_the_headmap_leaves_out():
    rec = headmap().recommended()
    assert rec == dict(RECOMMENDED, top_k=5, mode="bias", strength=4.0)
    assert headmap(defaults={}).recommended() == RECOMMENDED
    assert set(RECOMMENDED) == set(Headmap.from_json(headmap().to_json()).recommended())


def test_cli_takes_the_headmaps_recommendations_unless_overridden(tmp_path):
    import argparse

    from llama_steer.apps.cli import add_steer_args, make_steering

    path = tmp_path / "hm.json"
    rec = {"top_k": 5, "mode": "redirect", "strength": 12.0, "decode_only": True}
    headmap(defaults=dict(rec, focus="content")).save(path)
    p = argparse.ArgumentParser()
    add_steer_args(p)
    st, _ = make_steering(p.parse_args(["--headmap", str(path), "--roi", "panel:2/6"]))
    assert (st.mode, st.strength, st.decode_only, st.focus) == ("redirect", 12.0, True, "content")
    assert len(st.heads) == 5
    flags = ["--strength", "3", "--no-decode-only", "--focus", "none", "--mode", "bias"]
    st, _ = make_steering(p.parse_args(["--headmap", str(path), "--roi", "panel:2/6", *flags]))
    assert (st.mode, st.strength, st.decode_only, st.focus) == ("bias", 3.0, False, None)
    st, _ = make_steering(p.parse_args(["--roi", "panel:2/6"]))  # no headmap: plain defaults
    assert (st.mode, st.strength, st.decode_only, st.focus) == ("redirect", 4.0, False, None)


def test_cli_steers_a_text_model_and_fails_usefully(gemma_path):
    base = run_cli("-m", gemma_path, "-p", PROMPT, "-n", "4", "-t", "2")
    assert base.returncode == 0, base.stderr
    assert base.stdout.strip().startswith("Madrid")
    steered = run_cli(
        "-m",
        gemma_path,
        "-p",
        PROMPT,
        "-n",
        "4",
        "-t",
        "2",
        "--mode",
        "bias",
        "--roi",
        "text:'Mary lives in Madrid.'",
        "--strength",
        "-10",
    )
    assert steered.returncode == 0, steered.stderr
    assert steered.stdout.strip().startswith("Berlin")
    bad = run_cli("-m", gemma_path, "-p", PROMPT, "--roi", "text:'Paris'", "--mode", "bias")
    assert bad.returncode == 2 and "'Paris' is not in the prompt" in bad.stderr
    assert run_cli("-m", "/nonexistent.gguf", "-p", "x").returncode == 2
    img = run_cli("-m", gemma_path, "--image", "x.png", "-p", "x")
    assert img.returncode == 2 and "--image needs --mmproj" in img.stderr


def run_convert(*args):
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "convert_headmap.py")
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True)


def test_convert_every_input_format(gemma_path, tmp_path):
    ranking = [
        {"layer": 3, "head": 1, "score": 0.9},
        {"layer": 0, "head": 2, "score": 0.5},
        {"layer": 17, "head": 3, "score": 0.7},
    ]
    (tmp_path / "r.json").write_text(json.dumps(ranking))
    (tmp_path / "r.csv").write_text("layer,head,score\n3,1,0.9\n0,2,0.5\n17,3,0.7\n")
    (tmp_path / "r.txt").write_text("L3H1 L17H3\nL0H2\n")
    m = np.zeros((18, 4))
    m[3, 1], m[17, 3], m[0, 2] = 0.9, 0.7, 0.5
    np.save(tmp_path / "r.npy", m)
    for name in ("r.json", "r.csv", "r.txt", "r.npy"):
        out = tmp_path / (name + ".hm.json")
        r = run_convert(str(tmp_path / name), "--model", gemma_path, "-o", str(out))
        assert r.returncode == 0, r.stderr
        hm = Headmap.load(out)
        assert hm.top(3) == [(3, 1), (17, 3), (0, 2)], name
        assert hm.model == ModelIdentity.of_gguf(gemma_path)
        assert hm.check_model(gemma_path) == []
    trimmed = convert(tmp_path / "r.json", model=gemma_path, top_k=2)
    assert trimmed.top(2) == [(3, 1), (17, 3)] and len(trimmed.heads) == 2
    (tmp_path / "b.json").write_text(json.dumps([{"layer": 0, "head": 2, "score": 2.0}]))
    merged = convert(tmp_path / "r.json", model=gemma_path, merge=tmp_path / "b.json")
    assert merged.top(1) == [(0, 2)]  # (0.5/0.9 + 1)/2 beats 0.9/0.9/2


@pytest.mark.parametrize(
    "content,name,msg",
    [
        ('[{"layer": 18, "head": 0, "score": 1}]', "x.json", r"outside the model \(18 layers x 4"),
        ("L1H9", "x.txt", "outside the model"),
        ("layer,head\n1,x\n", "x.csv", "must be numbers"),
        ("hello", "x.txt", "cannot read 'hello'"),
        ('[{"head": 1}]', "x.json", "needs integer 'layer'"),
    ],
)
def test_convert_refuses_inconsistent_input(gemma_path, tmp_path, content, name, msg):
    (tmp_path / name).write_text(content)
    r = run_convert(str(tmp_path / name), "--model", gemma_path, "-o", str(tmp_path / "o.json"))
    assert r.returncode == 2 and re.search(msg, r.stderr), r.stderr


def test_convert_needs_the_model_for_lists_and_matching_matrices(gemma_path, tmp_path):
    (tmp_path / "r.txt").write_text("L1H1")
    with pytest.raises(HeadmapError, match="pass --model"):
        convert(tmp_path / "r.txt")
    np.save(tmp_path / "m.npy", np.zeros((6, 8)))
    with pytest.raises(HeadmapError, match="6 x 8 but .* has 18 layers x 4 heads"):
        convert(tmp_path / "m.npy", model=gemma_path)

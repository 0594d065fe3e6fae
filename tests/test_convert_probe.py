"""scripts/convert_headmap.py on bad input (exit 2 with the fix, never a traceback), merging,
and rankings for a model that is not downloaded (its shape given by hand)."""

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_steer.headmap import (
    Headmap,
    HeadmapError,
    HeadScore,
    ModelIdentity,
    convert,
)

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "convert_headmap.py")
QWEN3VL_2B = ["--arch", "qwen3vl", "--n-layer", "28", "--n-head", "16", "--n-head-kv", "8"]


def run_convert(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)


def refused(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.startswith("convert_headmap: error:")
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


@pytest.fixture
def ranking(tmp_path):
    path = tmp_path / "ranking.json"
    path.write_text(
        json.dumps(
            [
                {"layer": 3, "head": 1, "score": 0.9},
                {"layer": 5, "head": 7, "score": 0.5},
                {"layer": 0, "head": 2, "score": 0.7},
            ]
        )
    )
    return path


@pytest.mark.parametrize(
    "model,msgs",
    [
        ("{tmp}/nope.gguf", ["nope.gguf: no such file", "pass the model's .gguf"]),
        ("{ranking}", ["is not a GGUF file", "pass the model's .gguf"]),
        ("{tmp}/trunc.gguf", ["trunc.gguf is truncated", "download it again"]),
        ("{tmp}", ["is a directory, not a GGUF file"]),
    ],
)
def test_bad_model_files(ranking, organism, model, msgs):
    tmp = ranking.parent
    (tmp / "trunc.gguf").write_bytes(open(organism[0], "rb").read()[:100_000])
    model = model.format(tmp=tmp, ranking=ranking)
    refused(run_convert(str(ranking), "--model", model, "-o", str(tmp / "o.json")), *msgs)


def test_output_folders_are_made_and_bad_outputs_named(ranking, organism):
    out = ranking.parent / "new" / "deeper" / "map.json"
    r = run_convert(str(ranking), "--model", organism[0], "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "made its folder" in r.stdout and Headmap.load(out).top(1) == [(3, 1)]
    refused(
        run_convert(str(ranking), "--model", organism[0], "-o", str(ranking.parent)),
        "is a folder: give the file to write",
    )
    blocked = ranking.parent / "file"
    blocked.write_text("")
    refused(
        run_convert(str(ranking), "--model", organism[0], "-o", str(blocked / "x.json")),
        "cannot write -o",
        "pick a writable path",
    )


@pytest.mark.parametrize(
    "content,name,msg",
    [
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "x.txt", "is not text"),
        (b"not an array", "x.npy", "is not a readable .npy array"),
    ],
)
def test_unreadable_sources(tmp_path, organism, content, name, msg):
    (tmp_path / name).write_bytes(content)
    r = run_convert(str(tmp_path / name), "--model", organism[0], "-o", str(tmp_path / "o.json"))
    refused(r, msg)
    refused(run_convert(str(tmp_path), "-o", str(tmp_path / "o.json")), "is a directory")


def test_merge_takes_the_model_from_the_first_map(ranking, organism, tmp_path):
    first = tmp_path / "first.json"
    assert run_convert(str(ranking), "--model", organism[0], "-o", str(first)).returncode == 0
    second = tmp_path / "second.json"
    second.write_text(json.dumps([{"layer": 0, "head": 2, "score": 2.0}]))
    out = tmp_path / "merged.json"
    r = run_convert(str(first), "--merge", str(second), "-o", str(out))
    assert r.returncode == 0, r.stderr
    merged = Headmap.load(out)
    assert merged.top(1) == [(0, 2)] and merged.model == ModelIdentity.of_gguf(organism[0])
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps([{"layer": 6, "head": 0, "score": 1.0}]))
    refused(
        run_convert(str(first), "--merge", str(outside), "-o", str(out)),
        "(layer 6, head 0) is outside the model (6 layers x 8 heads)",
    )


def test_a_ranking_for_a_model_not_downloaded(ranking, tmp_path):
    out = tmp_path / "qwen3vl-2b.json"
    r = run_convert(
        str(ranking), "-o", str(out), *QWEN3VL_2B, "--name", "Qwen3-VL-2B-Instruct",
        "--method", "gaze heads", "--source", "https://example.org/gaze-heads",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "matched by shape" in r.stdout
    data = json.loads(out.read_text())
    assert data["model"] == {
        "architecture": "qwen3vl",
        "n_layer": 28,
        "n_head": 16,
        "n_head_kv": 8,
        "fingerprint": None,
        "name": "Qwen3-VL-2B-Instruct",
    }
    assert data["method"]["name"] == "gaze heads"
    assert data["method"]["source"] == "https://example.org/gaze-heads"
    assert data["method"]["converted_from"] == "ranking.json"
    hm = Headmap.load(out)
    assert hm.model.fingerprint is None and Headmap.from_json(hm.to_json()) == hm
    assert hm.top(3) == [(3, 1), (0, 2), (5, 7)]


@pytest.mark.parametrize(
    "flags,msg",
    [
        (["--arch", "qwen3vl", "--n-layer", "28"], "add --n-head, --n-head-kv"),
        (QWEN3VL_2B[:-1] + ["0"], "--n-head-kv 0: must be >= 1"),
        (QWEN3VL_2B[:-1] + ["5"], "--n-head 16 is not a multiple of --n-head-kv 5"),
        (QWEN3VL_2B[:3] + ["4"] + QWEN3VL_2B[4:], "(layer 5, head 7) is outside the model (4 "),
        (["--model", "{model}", "--n-layer", "28"], "--model reads the shape from the GGUF"),
        ([], "does not say which model it is for"),
    ],
)
def test_shape_flags_are_checked(ranking, organism, flags, msg):
    flags = [f.format(model=organism[0]) for f in flags]
    refused(run_convert(str(ranking), "-o", str(ranking.parent / "o.json"), *flags), msg)


def test_a_map_without_fingerprint_matches_by_architecture_and_shape(organism):
    heads = HeadScore
    shape_only = Headmap(ModelIdentity("qwen2vl", 6, 8, 2, None, "organism"), [heads(1, 2, 1.0)])
    assert shape_only.check_model(organism[0]) == []  # warning-free: arch and shape agree
    other_arch = Headmap(ModelIdentity("llama", 6, 8, 2, None), [heads(1, 2, 1.0)])
    assert "is for a llama model" in other_arch.check_model(organism[0], strict=False)[0]
    with pytest.raises(HeadmapError, match="strict=False"):
        other_arch.check_model(organism[0])
    other_shape = Headmap(ModelIdentity("qwen2vl", 28, 16, 8, None), [heads(1, 2, 1.0)])
    with pytest.raises(HeadmapError, match="28 layers x 16 heads"):
        other_shape.check_model(organism[0])


def test_a_shape_only_map_steers_the_model_it_describes(organism, tmp_path, ranking):
    """End to end: converted without the GGUF, used by the CLI with no warning."""
    from conftest import run_cli

    out = tmp_path / "hm.json"
    flags = ["--arch", "qwen2vl", "--n-layer", "6", "--n-head", "8", "--n-head-kv", "2"]
    assert run_convert(str(ranking), "-o", str(out), *flags).returncode == 0
    strip = os.path.join(os.path.dirname(__file__), "data", "organism_ref_strip.png")
    r = run_cli(
        "-m", organism[0], "--mmproj", organism[1],  # the qwen2vl organism (v1)
        "--image", strip, "-p", "What is in panel 2?", "--roi", "panel:2/6", "-n", "2", "-t", "2",
        "--headmap", str(out),
    )  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_a_ranking_given_as_a_headmap(tmp_path, ranking):
    from llama_steer.headmap import NotAHeadmap

    with pytest.raises(NotAHeadmap, match="convert_headmap.py") as e:
        Headmap.load(ranking)
    assert "--model MODEL.gguf" in str(e.value) and e.value.path == str(ranking)
    with pytest.raises(NotAHeadmap):
        Headmap.from_json({"heads": [{"layer": 1, "head": 1, "score": 1}]})


def test_a_headmap_without_heads_says_so():
    hm = Headmap(ModelIdentity("qwen2vl", 6, 8, 2), [], scores=[[0.0] * 8] * 6)
    with pytest.raises(HeadmapError, match="lists no heads"):
        hm.top(1)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(-2, 40), st.integers(-2, 20), st.floats()), max_size=6))
def test_converting_any_ranking_succeeds_or_names_the_problem(tmp_path_factory, rows):
    path = tmp_path_factory.getbasetemp() / "fuzz.json"
    data = [{"layer": a, "head": b, "score": s} for a, b, s in rows]
    path.write_text(json.dumps(data))
    ident = ModelIdentity("qwen3vl", 28, 16, 8, None)
    try:
        hm = convert(path, model=ident)
    except HeadmapError:
        return
    assert {(h.layer, h.head) for h in hm.heads} == {(a, b) for a, b, _ in rows}

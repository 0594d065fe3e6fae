"""The CLI's adversarial probe kept as tests: bad input exits 2 with a message that names the
problem and the fix (never a traceback, a crash or a silent no-op); logs stay off stderr."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import PROMPT, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

HERE = os.path.dirname(__file__)
STRIP = os.path.join(HERE, "data", "organism_ref_strip.png")  # 252 x 168, a 2x3 comic
ASK = "What is in panel 2?"


def refused(r, *needles):
    """Exit 2, one clean message on stderr holding every needle (regex)."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert "llama-steer: error:" in r.stderr or "error:" in r.stderr, r.stderr
    for n in needles:
        assert re.search(n, r.stderr), (n, r.stderr)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("probe")
    png = (d / "ok.png").as_posix()
    Image.new("RGB", (300, 100), "red").save(png)
    data = open(png, "rb").read()
    (d / "trunc.png").write_bytes(data[: len(data) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("hello, not an image\n")
    (d / "folder").mkdir()
    return d


# -- 1. bad files: exit 2 with the fix, checked before llama.cpp sees them --------------------
@pytest.mark.parametrize(
    "name,msg",
    [
        ("trunc.png", r"--image .*trunc.png is truncated or corrupt.*pass a whole image"),
        ("empty.png", r"--image .*empty.png is empty \(0 bytes\): pass an image file"),
        ("text.png", r"--image .*text.png is not an image.*pass a PNG or JPEG"),
        ("folder", r"--image .*folder is a directory: pass an image file"),
        ("missing.png", r"--image .*missing.png: no such file"),
    ],
)
def test_bad_image_files(files, name, msg):
    refused(run_cli("--image", str(files / name), "-p", ASK, "-n", "2"), msg)


def test_formats_llama_cpp_cannot_read_are_handed_over_as_png(files):
    from PIL import Image

    webp = str(files / "blue.webp")
    Image.new("RGB", (252, 168), "blue").save(webp)
    r = run_cli("--image", webp, "-p", ASK, "-n", "2", "-t", "2")
    assert r.returncode == 0, r.stderr


def test_bad_prompt_file(files):
    refused(run_cli("-f", str(files / "nope.txt")), r"-f .*nope.txt: no such file")
    refused(run_cli("-f", str(files / "folder")), r"is a directory: pass a text file")


@pytest.mark.parametrize(
    "name,msg",
    [
        ("text.png", r"saliency:.*text.png is not a saliency map.*grayscale PNG or a 2-D .npy"),
        ("folder", r"saliency:.*folder is a directory"),
        ("nope.npy", r"does not exist"),
    ],
)
def test_bad_saliency_files(files, name, msg):
    r = run_cli("--image", STRIP, "-p", ASK, "--mode", "shift", "--roi", f"saliency:{files / name}")
    refused(r, msg)


@pytest.fixture(scope="module")
def ggufs(files, organism):
    """Not-GGUF, missing, truncated (header, data) and wrong-kind model files."""
    model, mmproj = organism
    data = open(model, "rb").read()
    (files / "head.gguf").write_bytes(data[:20])
    (files / "data.gguf").write_bytes(data[: len(data) - 1])
    (files / "v9.gguf").write_bytes(b"GGUF" + (9).to_bytes(4, "little") + data[8:4096])
    return dict(
        text=str(files / "text.png"),
        missing=str(files / "nope.gguf"),
        head=str(files / "head.gguf"),
        data=str(files / "data.gguf"),
        v9=str(files / "v9.gguf"),
        model=model,
        mmproj=mmproj,
    )


@pytest.mark.parametrize(
    "flags,msg",
    [
        (["-m", "{text}"], r"-m .*text.png is not a GGUF file.*pass a text model GGUF"),
        (["-m", "{missing}"], r"-m .*nope.gguf: no such file: pass a text model GGUF"),
        (["-m", "{head}"], r"-m .*head.gguf is truncated.*download it again"),
        (["-m", "{data}"], r"-m .*data.gguf is truncated: it is \d+ bytes.*download it again"),
        (["-m", "{v9}"], r"GGUF version 9 is not one llama.cpp reads"),
        (["-m", "{mmproj}"], r"is a multimodal projector .*pass it as --mmproj"),
        (["-m", "{model}", "--mmproj", "{text}"], r"--mmproj .*not a GGUF.*projector \(mmproj\)"),
        (["-m", "{model}", "--mmproj", "{missing}"], r"--mmproj .*nope.gguf: no such file"),
        (["-m", "{model}", "--mmproj", "{model}"], r"is a qwen2vl model, not a multimodal proj"),
        (["chat", "-m", "{text}"], r"-m .*text.png is not a GGUF file"),
        (["chat", "-m", "{missing}"], r"-m .*nope.gguf: no such file"),
    ],
)
def test_bad_model_files(ggufs, flags, msg):
    args = [f.format(**ggufs) for f in flags]
    refused(run_cli(*args, "-p", "x") if args[0] != "chat" else run_cli(*args), msg)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_gguf_check_never_crashes_on_garbage(tmp_path_factory, tail):
    """Whatever follows the magic, check_gguf answers GGUFError or metadata."""
    from llama_steer._gguf import GGUFError, check_gguf

    path = tmp_path_factory.getbasetemp() / "fuzz.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + tail)
    try:
        check_gguf(path)
    except GGUFError as e:
        assert str(path) in str(e)


# -- 2. the context: refused before anything is evaluated, with what fits --------------------
def test_context_too_small_for_the_image_names_the_c_that_fits():
    r = run_cli("--image", STRIP, "-p", ASK, "-c", "1", "-n", "4")
    refused(r, r"-c is 1: pass -c 256")
    assert run_cli("--image", STRIP, "-p", ASK, "-c", "256", "-n", "4", "-t", "2").returncode == 0


def test_context_too_small_suggests_a_c_and_an_image_size_that_fit(files):
    from PIL import Image

    wide = str(files / "wide.png")
    Image.new("RGB", (1400, 700), "white").save(wide)
    r = run_cli("--image", wide, "-p", ASK, "-c", "300", "-n", "4")
    refused(r)
    m = re.search(
        r"pass -c (\d+), or shrink the image to at most (\d+)x(\d+) px for -c 300", r.stderr
    )
    assert m, r.stderr
    fit_c, w, h = map(int, m.groups())
    ok = run_cli("--image", wide, "-p", ASK, "-c", str(fit_c), "-n", "4", "-t", "2")
    assert ok.returncode == 0, ok.stderr  # the -c it names does fit
    small = str(files / "small.png")
    Image.new("RGB", (w, h), "white").save(small)
    ok = run_cli("--image", small, "-p", ASK, "-c", "300", "-n", "4", "-t", "2")
    assert ok.returncode == 0, ok.stderr  # and so does the size it names


def test_huge_image_refused_before_it_is_decoded(files):
    from PIL import Image

    huge = str(files / "huge.png")
    Image.new("1", (12000, 12000), 1).save(huge)  # 144 Mpx: 432 MB as RGB
    peak = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True,"
        " text=True); sys.stderr.write(r.stderr); "
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    cmd = [sys.executable, "-c", peak, sys.executable, "-m", "llama_steer.apps.cli"]
    r = subprocess.run(
        [*cmd, "--image", huge, "-p", ASK, "-n", "4"], capture_output=True, text=True
    )
    rc, kb = map(int, r.stdout.split())
    assert rc == 2 and re.search(r"-c is 2048: pass -c \d+, or shrink the image", r.stderr)
    assert kb < 400_000, f"{kb} kB peak: the image was decoded"


def test_text_longer_than_the_context(gemma_path):
    r = run_cli("-m", gemma_path, "-p", PROMPT, "-c", "8", "-n", "4")
    refused(r, r"the prompt needs \d+ tokens but -c is 8: pass -c 256")
    refused(run_cli("-m", gemma_path, "-p", PROMPT, "-c", "-5"), r"-c -5: .*>= 1")


# -- 3. --headmap wants a headmap; a ranking is pointed at the converter ---------------------
def test_headmap_help_and_a_plain_ranking(tmp_path, organism):
    assert "version 1" in run_cli("--help").stdout
    ranking = tmp_path / "ranking.json"
    ranking.write_text(json.dumps([{"layer": 3, "head": 5, "score": 0.4}]))
    r = run_cli("--image", STRIP, "-p", ASK, "--roi", "panel:2/6", "--headmap", str(ranking))
    refused(r, "plain ranking", "convert_headmap.py")
    assert "missing key 'version'" not in r.stderr
    command = r.stderr.strip().splitlines()[-1]
    conv = subprocess.run(shlex.split(command), capture_output=True, text=True)
    assert conv.returncode == 0, conv.stderr  # the command it prints is the one that works
    hm = tmp_path / "ranking.headmap.json"
    r = run_cli("--image", STRIP, "-p", ASK, "--roi", "panel:2/6", "--headmap", str(hm), "-n", "2")
    assert r.returncode == 0, r.stderr


# -- 4. accepted silently before, refused now --------------------------------------------------
@pytest.mark.parametrize(
    "flags,msg",
    [
        (["--schedule", ""], r"--schedule is empty: write N:ROI"),
        (["--temp", "nan"], r"--temp: nan is not a temperature: use a finite number >= 0"),
        (["--temp", "inf"], r"--temp: inf is not a temperature"),
        (["--temp", "-1"], r"--temp: -1 is not a temperature"),
        (["--temp", "warm"], r"--temp: 'warm' is not a number"),
        (["--headmap", "headmaps/organism.json"], r"--headmap given, but nothing to steer to"),
        (["--heads", "L0H1", "--strength", "6"], r"--heads, --strength given, but nothing"),
        (["--roi", "panel:2/6", "--schedule", "0:panel:3/6"], r"--roi .* and --schedule's first"),
        (["--roi", "text:'panel'", "--focus", "content", "--mode", "bias"], r"text only: drop"),
        (["--schedule", "3:text:'panel'", "--focus", "content", "--mode", "bias"], "text only"),
        (
            ["--roi", "panel:2/6", "--schedule", "3:text:'panel'", "--mode", "redirect"],
            r"add --domain ROI",
        ),
    ],
)
def test_refused_instead_of_ignored(flags, msg):
    refused(run_cli("--image", STRIP, "-p", ASK, "-n", "2", *flags), msg)


def test_a_schedule_without_a_starting_roi_steers_from_its_first_switch():
    """The steering made with no --roi used to be strength 0: a later switch steered nothing."""
    r = run_cli(
        "--image", STRIP, "-p", ASK, "-n", "4", "-t", "2", "-v", "--schedule", "1:panel:5/6"
    )
    assert r.returncode == 0, r.stderr
    assert int(re.search(r"(\d+) attention nodes edited", r.stderr).group(1)) > 0


def test_headmap_focus_default_skips_text_rois(tmp_path, gemma_path):
    """A headmap recommending focus=content still steers a text ROI (focus is for images)."""
    from test_headmap_cli import headmap

    from llama_steer.headmap import ModelIdentity

    rec = {"focus": "content", "mode": "bias", "strength": -10.0, "top_k": 5}
    headmap(model=ModelIdentity.of_gguf(gemma_path), defaults=rec).save(tmp_path / "g.json")
    r = run_cli(
        "-m", gemma_path, "-p", PROMPT, "-n", "2", "-t", "2",
        "--headmap", str(tmp_path / "g.json"), "--roi", "text:'Mary lives in Madrid.'",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_temperature_and_schedule_parsers_never_crash(text):
    import argparse

    from llama_steer import SteeringError
    from llama_steer.apps.cli import CliError, parse_schedule, temperature

    try:
        t = temperature(text)
        assert t >= 0 and t == t and t != float("inf")
    except argparse.ArgumentTypeError:
        pass
    try:
        for n, roi in parse_schedule(text):
            assert n >= 0 and roi
    except (CliError, SteeringError):
        pass


# -- 5. messages in the CLI's words ---------------------------------------------------------
def test_redirect_with_a_text_roi_names_the_domain_flag(gemma_path):
    roi = "text:'Mary lives in Madrid.'"
    # (without --mode a text ROI is steered with mode bias, which needs no domain)
    r = run_cli("-m", gemma_path, "-p", PROMPT, "--roi", roi, "-n", "2", "--mode", "redirect")
    refused(r, r"add --domain ROI")
    assert "domain=" not in r.stderr
    facts = "text:'John lives in Berlin. Mary lives in Madrid.'"
    base = ["-m", gemma_path, "-p", PROMPT, "-n", "2", "-t", "2", "--roi", roi]
    base += ["--mode", "redirect"]
    away = run_cli(*base, "--domain", facts, "--strength", "-8")
    assert away.returncode == 0, away.stderr
    assert away.stdout.strip().startswith("Berlin")  # the domain took the suppressed weight
    toward = run_cli(*base, "--domain", facts, "--strength", "8")
    assert toward.stdout.strip().startswith("Madrid")


def test_headmap_without_heads(tmp_path):
    d = json.load(open(os.path.join(HERE, "..", "headmaps", "organism.json")))
    d["heads"] = []
    (tmp_path / "empty.json").write_text(json.dumps(d))
    r = run_cli(
        "--image", STRIP, "-p", ASK, "--roi", "panel:2/6", "--headmap", str(tmp_path / "empty.json")
    )
    refused(r, r"lists no heads", r"llama-steer score", r"convert_headmap.py")
    assert "top_k=0" not in r.stderr


def test_library_warnings_are_one_clean_line(tmp_path):
    d = json.load(open(os.path.join(HERE, "..", "headmaps", "organism.json")))
    d["model"]["fingerprint"] = "0" * 64  # the same shape, "other weights"
    (tmp_path / "fp.json").write_text(json.dumps(d))
    r = run_cli(
        "--image", STRIP, "-p", ASK, "--roi", "panel:2/6", "-n", "2", "-t", "2",
        "--headmap", str(tmp_path / "fp.json"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        line for line in r.stderr.splitlines() if line.startswith("llama-steer: warning: ")
    ], r.stderr
    assert "different GGUF of the same shape" in r.stderr and "warnings.warn" not in r.stderr


# -- 6. stderr holds the error, not llama.cpp's logs ------------------------------------------
def test_without_v_only_the_error_reaches_stderr():
    r = run_cli("--image", STRIP, "-p", ASK, "--roi", "box:5000,5000,6000,6000", "-n", "2")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "llama-steer: error: box 5000,5000,6000,6000 is outside the image (252x168 px, grid "
        "8x5 tokens)"  # the embedded v2: 32-px tokens
    ]
    v = run_cli("--image", STRIP, "-p", ASK, "--roi", "box:5000,5000,6000,6000", "-v")
    assert "decoding image batch" in v.stderr or "add_text" in v.stderr  # -v shows them


def test_without_v_a_text_model_run_is_quiet(gemma_path):
    r = run_cli("-m", gemma_path, "-p", PROMPT, "-n", "2", "-t", "2")
    assert r.returncode == 0 and r.stderr == "", r.stderr

"""Image steering on the embedded Qwen2-VL organism through llama-cpp-python's mtmd chat handler.

The KV bookkeeping is proved with a canary: with every computed image cell suppressed in every
head (-1e4, so softmax gives them exactly 0), the text after the image cannot see the image,
so two different images give bit-identical logits; leave one image cell out and they differ.
"""

import gc
import subprocess
import sys
import weakref

import llama_cpp
import numpy as np
import pytest
from conftest import run_cli, vlm_maker

from llama_steer import (
    ImageTokens,
    Llama,
    Panel,
    Steering,
    SteeringConfig,
    SteeringError,
    comics,
)
from llama_steer.apps.score import StripPrompter, score_strip
from llama_steer.messages import user_message


def msg(imgs, text):
    return user_message(text, imgs)


@pytest.fixture
def vlm(organism):
    yield from vlm_maker(organism)


def last_logits(llm, messages) -> np.ndarray:
    llm.create_chat_completion(messages, max_tokens=1, temperature=0)
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()


@pytest.mark.parametrize("layout", ["2x3", "1x6"])
def test_image_cells_canary(vlm, layout):
    a, b = (comics.render(comics.make_strip(s, layout)) for s in (11, 12))
    steer = Steering(heads="all", roi=ImageTokens(0, 53), mode="bias", strength=-1e4)
    llm = vlm(steer)
    q = "What is in panel 3?"
    la, lb = last_logits(llm, [msg([a], q)]), last_logits(llm, [msg([b], q)])
    (span,) = llm.images
    assert span.grid.n_tokens == 54 and span.grid.align > 0  # grid from the mmproj == mtmd's
    np.testing.assert_array_equal(la, lb)  # the image is invisible: exactly the same logits
    steer.update(roi=ImageTokens(1, 53))  # one image cell left visible
    la, lb = last_logits(llm, [msg([a], q)]), last_logits(llm, [msg([b], q)])
    assert np.abs(la - lb).max() > 1e-4


def test_canary_with_two_images_and_two_turns(vlm):
    s = [comics.render(comics.make_strip(n, "2x3")) for n in (21, 22, 23)]
    steer = Steering(heads="all", roi="image1:0:53+image2:0:53", mode="bias", strength=-1e4)
    llm = vlm(steer)
    history = [msg([s[0]], "What is in panel 1?"), {"role": "assistant", "content": "a red star"}]
    turn_a = history + [msg([s[1]], "What is in panel 2?")]
    turn_b = history[:0] + [msg([s[2]], "What is in panel 1?"), history[1], turn_a[2]]
    la, lb = last_logits(llm, turn_a), last_logits(llm, turn_b)
    first, second = llm.images
    assert second.first_cell > first.first_cell + first.grid.n_tokens  # text between them
    np.testing.assert_array_equal(la, lb)
    steer.update(roi="image1:0:53")  # the second image is visible again
    la, lb = (
        last_logits(llm, turn_a),
        last_logits(llm, [turn_a[0], turn_a[1], msg([s[2]], "What is in panel 2?")]),
    )
    assert np.abs(la - lb).max() > 1e-4


def test_strength_zero_is_the_unsteered_model_token_for_token(vlm):
    plain = vlm(cls=llama_cpp.Llama)
    zero = vlm(Steering(heads="all", roi=Panel(4, grid=(2, 3)), mode="redirect", strength=0.0))
    for seed in (31, 32, 33):
        m = [msg([comics.render(comics.make_strip(seed, "2x3"))], "Describe the strip.")]
        a = plain.create_chat_completion(m, max_tokens=40, temperature=0)
        b = zero.create_chat_completion(m, max_tokens=40, temperature=0)
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    assert zero.steering.stats().n_kq_edited == 0


def test_a_dropped_model_is_freed_at_once(organism):
    """No reference cycle through Steering or the chat handler: a dropped model is freed by
    reference counting, not left to the final collection (where llama-cpp-python's mtmd_free
    fails on Python's already-closed std streams)."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    st = Steering(roi=Panel(2, of=6), strength=4.0)
    handler = MTMDChatHandler(clip_model_path=organism[1], verbose=False)
    llm = Llama(model_path=organism[0], chat_handler=handler, steering=st, verbose=False)
    strip = comics.render(comics.make_strip(3, "1x6"))
    llm.create_chat_completion([msg([strip], "What is in this panel?")], max_tokens=2)
    ref = weakref.ref(llm)
    gc.disable()
    try:
        del llm, handler
        assert ref() is None
    finally:
        gc.enable()
    with pytest.raises(SteeringError, match="not attached"):
        st.stats()


def test_a_model_alive_at_exit_is_closed_cleanly(organism):
    """A steered model still referenced when Python exits (here by a cycle) is closed from
    atexit, not in finalization where llama-cpp-python's mtmd_free hits closed std streams."""
    code = f"""
from llama_cpp.llama_chat_format import MTMDChatHandler
from llama_steer import Llama, Steering, comics
from llama_steer.messages import user_message
h = MTMDChatHandler(clip_model_path={organism[1]!r}, verbose=False)
llm = Llama(model_path={organism[0]!r}, chat_handler=h, steering=Steering(), verbose=False)
img = comics.render(comics.make_strip(1, "2x3"))
llm.create_chat_completion([user_message("What is in panel 2?", [img])], max_tokens=2)
llm.me = llm
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Exception ignored" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize(
    "size", [(252, 168), (504, 84), (224, 224), (300, 130), (97, 211), (640, 480)]
)
def test_mmproj_geometry_matches_mtmd(vlm, size):
    from PIL import Image

    llm = vlm(Steering(heads="all", roi="center", mode="bias", strength=1.0))
    img = Image.new("RGB", size, (200, 180, 160))
    llm.create_chat_completion([msg([img], "What objects are in the image?")], max_tokens=1)
    (span,) = llm.images
    assert span.grid.align > 0, "the grid predicted from the mmproj disagreed with mtmd's"
    assert llm.steering.stats().n_kq_edited > 0


def test_retarget_while_streaming(vlm):
    steer = Steering(
        heads="all", roi=Panel(1, grid=(2, 3)), mode="redirect", strength=4.0, decode_only=True
    )
    llm = vlm(steer)
    m = [msg([comics.render(comics.make_strip(41, "2x3"))], "Describe the strip.")]
    seen = []
    for i, _chunk in enumerate(
        llm.create_chat_completion(m, max_tokens=20, temperature=0, stream=True)
    ):
        if i == 3:
            steer.retarget(Panel(5, grid=(2, 3)))
        seen.append(steer._published[1].copy())
    first, last = seen[1], seen[-1]
    span = llm.images[0]
    p1 = span.first_cell + np.array([0, 1, 2, 9, 10, 11, 18, 19, 20])
    p5 = span.first_cell + np.array([30, 31, 32, 39, 40, 41, 48, 49, 50])
    assert np.all(first[p1] == 4.0) and np.all(last[p5] == 4.0) and np.all(last[p1] == -4.0)


def test_an_abandoned_stream_does_not_steer_the_next_prompt(vlm):
    """A stream left unfinished (not closed: the caller broke out of its loop and kept it)
    must not make the next request's prompt count as decode steps: with decode_only the
    prompt stays unedited and the answer is the one a fresh model gives. When the old
    stream is finally closed, during the new answer, the new answer stays steered."""

    def make():
        return Steering(
            heads="all", roi=Panel(2, grid=(2, 3)), mode="redirect", strength=4.0, decode_only=True
        )

    m = [msg([comics.render(comics.make_strip(43, "2x3"))], "Describe the strip.")]
    llm = vlm(make())
    old = llm.create_chat_completion(m, max_tokens=20, temperature=0, stream=True)
    for _ in range(4):
        next(old)  # abandoned mid-generation, still referenced
    new = llm.create_chat_completion(m, max_tokens=12, temperature=0, stream=True)
    text = [next(new)["choices"][0]["delta"].get("content") or ""]
    old.close()  # the abandoned generator ends while the new one runs
    text += [c["choices"][0]["delta"].get("content") or "" for c in new]
    n_prompt = llm.images[0].first_pos + llm.images[0].n_pos
    assert set(llm._steer_cell_key[:n_prompt]) == {0}  # the prompt: unedited (prefill)
    assert set(llm._steer_cell_key[-5:]) != {0}  # the last answer tokens: steered
    fresh = vlm(make()).create_chat_completion(m, max_tokens=12, temperature=0)
    assert "".join(text) == fresh["choices"][0]["message"]["content"]


def test_a_repeated_chat_prompt_is_resolved_once(vlm, monkeypatch):
    """llama-cpp-python leaves stale token ids at image positions (never written: the image
    is evaluated by mtmd); they must not make a repeated prompt look new, which would
    resolve the ROI, its content focus and the bias again on every request."""
    llm = vlm(Steering(roi=Panel(2, grid=(2, 3)), mode="redirect", strength=4.0, focus="content"))
    m = [msg([comics.render(comics.make_strip(44, "2x3"))], "Describe the strip.")]
    llm.create_chat_completion(m, max_tokens=2, temperature=0)
    llm.input_ids[:] = 7  # stale ids wherever the next prompt does not write
    calls = []
    compute = SteeringConfig.bias
    monkeypatch.setattr(
        SteeringConfig, "bias", lambda self, seq: calls.append(1) or compute(self, seq)
    )
    llm.create_chat_completion(m, max_tokens=2, temperature=0)
    assert calls == []


def test_scores_equal_numpy_on_full_attention_rows(vlm):
    """The scorer's per-panel sums equal NumPy sums over full attention rows (each cell its
    own observer region), and the shared prefix equals six full prefills."""
    from llama_steer import _native
    from llama_steer.roi import resolve

    llm = vlm(Steering(strength=0.0))
    from llama_cpp.llama_chat_format import MTMDChatHandler  # noqa: F401

    pr = StripPrompter(llm, llm.chat_handler)
    desc = comics.make_strip(51, "2x3")
    img = comics.render(desc)
    answers = [p.thing.name for p in desc.panels]
    shared = score_strip(pr, img, "2x3", ["last"], answers)
    full = score_strip(pr, img, "2x3", ["last"], answers, shared_prefix=False)
    np.testing.assert_allclose(shared, full, rtol=1e-4, atol=1e-6)
    # full rows for panel 2's question, last prompt token
    bitmap = pr.h._create_bitmap_from_bytes(comics.png_bytes(img))
    items, handle = pr.chunks(bitmap, "What is in panel 2?")
    llm.reset()
    llm._ctx.kv_cache_clear()
    img_at = [k for k, _ in items].index("image")
    pr.eval_chunks(items[: img_at + 1])
    seq = llm._steer_seq()
    question = [t for k, x in items[img_at + 1 :] if k == "text" for t in x]
    n_cells = seq.n_cells + len(question)
    each = np.arange(n_cells, dtype=np.int16)
    with llm.steering._observing(each, n_cells, _native.ROWS_LAST):
        llm.eval(question)
        rows, _ = llm._steer_hook.read_obs(reset=True)
    pr.mt.mtmd_input_chunks_free(handle)
    pr.mt.mtmd_bitmap_free(bitmap)
    np.testing.assert_allclose(rows.sum(-1), 1.0, rtol=1e-4)  # full rows: distributions
    for r in range(1, 7):
        cells, _ = resolve((Panel(r, grid=(2, 3)),), seq)
        want = rows[:, :, cells].sum(-1)
        np.testing.assert_allclose(shared[0, :, :, 1, r - 1], want, rtol=1e-4, atol=1e-6)


def test_image_boost_raises_attention_to_the_image(vlm):
    steer = Steering(heads="layers:1-3", mode="image-boost", strength=3.0)
    llm = vlm(steer)
    m = [msg([comics.render(comics.make_strip(61, "2x3"))], "What is in panel 2?")]
    llm.create_chat_completion(m, max_tokens=1, temperature=0)
    (span,) = llm.images
    bias = steer._published[1]
    assert np.all(bias[span.cells] == 3.0) and np.count_nonzero(bias) == 54
    image = ImageTokens(0, 53)
    boosted, plain = steer.attention_to(image), steer.attention_to(image, steered=False)
    np.testing.assert_allclose(boosted[0], plain[0], rtol=1e-5)  # below the boosted layers
    assert np.all(boosted[1:4] > plain[1:4])


def test_look_writes_an_overlay(organism, tmp_path):
    comics.render(comics.make_strip(71, "2x3")).save(tmp_path / "s.png")
    r = run_cli(
        "look",
        "-m",
        organism[0],
        "--mmproj",
        organism[1],
        "--image",
        str(tmp_path / "s.png"),
        "-p",
        "What is in panel 2?",
        "-o",
        str(tmp_path / "look.png"),
        "-t",
        "2",
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "most attended image token" in r.stdout
    from PIL import Image

    assert Image.open(tmp_path / "look.png").size[0] >= 252


@pytest.fixture(scope="module")
def shipped_headmap():
    from pathlib import Path

    from llama_steer.headmap import Headmap

    p = Path(__file__).resolve().parents[1] / "headmaps" / "organism.json"
    if not p.exists():
        pytest.skip("headmaps/organism.json is not there yet")
    return Headmap.load(p)


def test_top_heads_steer_and_random_heads_do_not(vlm, shipped_headmap):
    """The paper's finding on the embedded model: the shipped headmap's top heads move the
    ambiguous question's answer to the chosen panel; as many random heads do not."""
    from llama_steer.apps.evaluate import Evaluator

    hm = shipped_headmap
    k = int(hm.defaults["top_k"])
    llm = vlm(Steering(strength=0.0))
    ev = Evaluator(llm, float(hm.defaults["strength"]), focus=hm.defaults.get("focus"))
    strips = [comics.make_strip(12 * 10**9 + i, ("2x3", "1x6")[i % 2]) for i in range(4)]
    res = ev.narration(strips, {"top": hm.top(k), "random": hm.random(k, seed=0)})
    assert res["top"]["accuracy"]["mean"] >= 0.8, res
    assert res["random"]["accuracy"]["mean"] <= 0.2, res


@pytest.mark.parametrize("layout,panel", [("1x6", "panel:4/6"), ("2x3", "panel:4@2x3")])
def test_cli_and_python_steer_identically(vlm, organism, shipped_headmap, tmp_path, layout, panel):
    """One resolution of defaults (config.SteeringConfig.resolve): the CLI with --headmap, the
    CLI with nothing but --roi, Python's Steering(headmap=..., roi=...) and Steering(roi=...)
    all steer with the headmap's heads, mode, strength, decode-only and focus."""
    desc = comics.make_strip(13 * 10**9, layout)
    strip = comics.render(desc)
    strip.save(tmp_path / "strip.png")
    hm_path = str(tmp_path / "hm.json")
    shipped_headmap.save(hm_path)
    base = ["-m", organism[0], "--mmproj", organism[1], "--image", str(tmp_path / "strip.png")]
    base += ["-p", "What is in this panel?", "-n", "12", "-t", "2", "--roi", panel]
    with_map = run_cli(*base, "--headmap", hm_path, timeout=300)
    default = run_cli(*base, timeout=300)
    assert with_map.returncode == 0 and default.returncode == 0, with_map.stderr[-2000:]
    answers = {with_map.stdout.strip(), default.stdout.strip()}
    for steering in (Steering(headmap=hm_path, roi=panel), Steering(roi=panel)):
        llm = vlm(steering)
        out = llm.create_chat_completion(
            [msg([strip], "What is in this panel?")], max_tokens=12, temperature=0
        )
        answers.add(out["choices"][0]["message"]["content"].strip())
        r = llm.steering.resolved
        assert r.heads == tuple(shipped_headmap.top(int(shipped_headmap.defaults["top_k"])))
        assert (r.mode, r.strength, r.decode_only, r.focus) == (
            "redirect",
            float(shipped_headmap.defaults["strength"]),
            True,
            shipped_headmap.defaults.get("focus", "none"),
        )
    assert len(answers) == 1, answers
    assert answers.pop() == desc.panels[3].thing.name  # panel 4's object


def test_the_readme_python_example_steers_to_panel_4(vlm, organism):
    """README: Steering(headmap="headmaps/organism.json", roi=Panel(4, grid=(2, 3)),
    mode="redirect") on a 2x3 strip answers panel 4's object (it answered panel 1's, the
    unsteered answer, when Steering(headmap=...) took only the heads from the map)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    hits = 0
    for seed in range(4):
        desc = comics.make_strip(14 * 10**9 + seed, "2x3")
        if desc.panels[3].thing.name == desc.panels[0].thing.name:
            continue
        steer = Steering(
            headmap=str(root / "headmaps/organism.json"), roi=Panel(4, grid=(2, 3)), mode="redirect"
        )
        llm = vlm(steer)
        out = llm.create_chat_completion(
            [msg([comics.render(desc)], "What is in this panel?")], max_tokens=12, temperature=0
        )
        hits += out["choices"][0]["message"]["content"].strip() == desc.panels[3].thing.name
        llm.close()
    assert hits >= 3


@pytest.mark.parametrize("n_ctx", [1, 16])
def test_a_context_too_small_for_the_image_is_refused(vlm, n_ctx):
    """llama-cpp-python sizes its buffers by the n_ctx asked for: a prompt past it lost its
    image silently (n_ctx=1) or failed in NumPy (16). Steered, it is refused with the size."""
    llm = vlm(Steering(roi=Panel(2, grid=(2, 3)), mode="redirect"), n_ctx=n_ctx)
    strip = comics.render(comics.make_strip(1, "2x3"))
    with pytest.raises(SteeringError, match=r"needs 82 KV cells \(54 image tokens.*n_ctx >= 82"):
        llm.create_chat_completion([msg([strip], "What is in panel 2?")], max_tokens=4)


EXIT_SCRIPT = """
import sys
from llama_cpp.llama_chat_format import MTMDChatHandler
from llama_steer import Llama, Steering, comics
from llama_steer.messages import user_message
steer = Steering(roi="panel:2@2x3", mode="redirect") if sys.argv[1] == "steered" else None
h = MTMDChatHandler(clip_model_path=sys.argv[3], verbose=False)
llm = Llama(model_path=sys.argv[2], chat_handler=h, steering=steer, verbose=False)
img = comics.render(comics.make_strip(1, "2x3"))
llm.create_chat_completion([user_message("What is in panel 2?", [img])], max_tokens=2)
end = sys.argv[4]
if end == "cycle":
    llm.me = llm  # alive until the final collection, after the std streams close
elif end == "exit3":
    sys.exit(3)
elif end == "raise":
    raise RuntimeError("the user's own error")
"""


@pytest.mark.parametrize("steered", ["steered", "unsteered"])
@pytest.mark.parametrize("end,rc", [("cycle", 0), ("exit3", 3), ("raise", 1)])
def test_exit_is_clean_and_keeps_the_status(organism, steered, end, rc):
    """A plain llama_cpp.Llama with MTMDChatHandler left to the interpreter's finalization
    prints "ValueError: I/O operation on closed file" (its mtmd_free runs under a stdout
    suppressor after the streams closed). llama_steer.Llama models, steered or not, are
    closed from atexit instead: no such traceback, and the script's exit status stays."""
    r = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, steered, *organism, end],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == rc, r.stderr[-2000:]
    assert "Exception ignored" not in r.stderr and "closed file" not in r.stderr, r.stderr[-2000:]
    if end == "raise":
        assert r.stderr.count("Traceback") == 1 and "the user's own error" in r.stderr

"""The shipped VLM (GGUF + mmproj) through llama-cpp-python's multimodal chat handler:
parity with the PyTorch model's stored reference logits, and held-out answers."""

import base64
import json
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from llama_cpp.llama_chat_format import MTMDChatHandler

from llama_steer import comics, guarded_load

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def llm(organism):
    with guarded_load():
        m = llama_cpp.Llama(
            model_path=organism[0],
            n_ctx=1024,
            n_threads=2,
            n_threads_batch=2,
            verbose=False,
            chat_handler=MTMDChatHandler(clip_model_path=organism[1], verbose=False),
        )
    yield m
    m.close()


def ask(llm, png: bytes, question: str, max_tokens: int = 48) -> str:
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    msg = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": uri}},
                {"type": "text", "text": question},
            ],
        }
    ]
    out = llm.create_chat_completion(messages=msg, temperature=0.0, max_tokens=max_tokens)
    return out["choices"][0]["message"]["content"].strip()


def test_logits_match_the_pytorch_reference(llm):
    ref_path = DATA / "organism_ref_logits.npy"
    if not ref_path.exists():
        pytest.skip("no stored PyTorch reference (scripts/organism/reference.py writes it)")
    ref = np.load(ref_path)
    meta = json.loads((DATA / "organism_ref.json").read_text())
    ask(llm, (DATA / "organism_ref_strip.png").read_bytes(), meta["question"], max_tokens=1)
    # max_tokens=1: the sampled token is never decoded, the last output row is the prompt's
    got = np.ctypeslib.as_array(
        llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),)
    ).astype(np.float32)
    assert int(got.argmax()) == meta["argmax"]
    assert np.abs(got - ref).max() <= 2e-2 * np.abs(ref).max()  # f16 weights vs f32 torch
    np.testing.assert_array_equal(np.argsort(-got)[:3], np.argsort(-ref)[:3])


@pytest.mark.parametrize("task", ["panel_number", "this_panel", "describe", "scene_region"])
def test_held_out_answers(llm, task):
    """A handful of held-out samples drawn by the independent renderer with unseen seeds."""
    from llama_steer.apps.evaluate import objects_in

    n, ok, seen = 8, 0.0, []
    for i in range(n):
        ex = comics.make_example(9 * 10**9 + 31 * i, task, renderer="numpy")
        got = ask(llm, comics.png_bytes(ex.image), ex.question)
        if task == "describe":  # six objects in order: score each position
            want, said = objects_in(ex.answer), objects_in(got)
            ok += sum(a == b for a, b in zip(want, said, strict=False)) / len(want)
        else:
            ok += got == ex.answer
        seen.append((ex.question, ex.answer, got))
    assert ok >= 0.75 * n, seen

"""Look, then reason: the embedded VLM describes the steered region, a reasoning model answers
with its heads steered to that description. On the R1-architecture fixtures (DeepSeek MLA,
Qwen2 distill shape, with the <think> template): strength 0 is the plain model token for token,
steered runs stay finite; on Gemma 3 270M: steering puts the heads' attention on the region's
line; the CLI runs end to end."""

from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from conftest import run_cli

from llama_steer import Llama, Steering, SteeringError, comics, guarded_load
from llama_steer.reason import _chat_tokens, look_then_reason

FIXTURES = Path(__file__).parent / "data" / "fixtures"
QUESTION = "What colour is the object?"


@pytest.fixture(scope="module")
def vlm(organism):
    from llama_cpp.llama_chat_format import MTMDChatHandler

    llm = Llama(
        model_path=organism[0],
        chat_handler=MTMDChatHandler(clip_model_path=organism[1], verbose=False),
        steering=Steering(),
        n_ctx=1024,
        n_threads=2,
        verbose=False,
    )
    yield llm
    llm.close()


def strip(seed=3, layout="2x3"):
    desc = comics.make_strip(9 * 10**9 + seed, layout)
    return desc, comics.render(desc)


@pytest.mark.parametrize("name", ["deepseek3", "qwen2"])
def test_on_r1_fixtures_strength_zero_is_plain_and_steering_stays_finite(vlm, name):
    path = str(FIXTURES / f"{name}-f16.gguf")
    reasoner = Llama(
        model_path=path, steering=Steering(heads="all"), n_ctx=1024, n_threads=2, verbose=False
    )
    try:
        desc, img = strip()
        events = list(
            look_then_reason(vlm, reasoner, img, "panel:2@2x3", QUESTION, strength=0.0,
                             max_tokens=12, stream=True)
        )  # fmt: skip
        stages = [e["stage"] for e in events]
        assert stages[0] == "region" and stages[-1] == "done"
        assert stages.index("context") < stages.index("done")
        res = events[-1]["result"]
        assert res.region == desc.panels[1].thing.name  # the VLM looked where it was steered
        assert b"<think>" in reasoner.detokenize(_chat_tokens(reasoner, res.prompt), special=True)
        # strength 0: the plain model, greedy, from the same prompt tokens
        with guarded_load():
            plain = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=2, verbose=False)
        want = []
        for t in plain.generate(_chat_tokens(reasoner, res.prompt), temp=0.0):
            want.append(t)
            if len(want) == len(res.tokens) or t == plain.token_eos():
                break
        plain.close()
        assert res.tokens == want
        steered = look_then_reason(vlm, reasoner, img, "panel:2@2x3", QUESTION, max_tokens=12)
        assert all(np.isfinite(steered.entropy)) and steered.n_steered == len(steered.tokens)
        assert reasoner.steering.stats().n_kq_edited > 0
        gated = look_then_reason(
            vlm, reasoner, img, "panel:2@2x3", QUESTION, max_tokens=12, gate=1e9
        )
        assert gated.n_steered == 1  # only the first token, from the steered prompt
    finally:
        reasoner.close()


def test_steering_puts_the_reasoners_attention_on_the_region(vlm, gemma_path):
    reasoner = Llama(
        model_path=gemma_path, steering=Steering(heads="all"), n_ctx=1024, n_threads=2,
        verbose=False,
    )  # fmt: skip
    try:
        _, img = strip(4)
        att = {}
        for s in (0.0, 12.0):
            res = look_then_reason(
                vlm, reasoner, img, "panel:5@2x3", QUESTION, strength=s, max_tokens=6, observe=True
            )
            assert len(res.attention) == len(res.tokens) and None not in res.attention
            att[s] = float(np.mean(res.attention))
        # emphasize: every key outside the region line scaled by e^-12 in every head
        assert att[12.0] > 0.9 > att[0.0], att
        with pytest.raises(SteeringError, match="finite entropy threshold"):
            look_then_reason(vlm, reasoner, img, "panel:5@2x3", QUESTION, gate=float("nan"))
    finally:
        reasoner.close()
    plain = Llama(model_path=gemma_path, n_ctx=256, verbose=False)
    with pytest.raises(SteeringError, match="made with steering=Steering"):
        look_then_reason(vlm, plain, img, "panel:5@2x3", QUESTION)
    plain.close()


def test_cli_reason_end_to_end(gemma_path, tmp_path):
    desc, img = strip(5)
    img.save(tmp_path / "s.png")
    r = run_cli(
        "reason", "--image", str(tmp_path / "s.png"), "--roi", "panel:3@2x3",
        "--reasoner", gemma_path, "-n", "6", "--show-attention", "-t", "2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"[region] {desc.panels[2].thing.name}" in r.stdout
    assert "[answer]" in r.stdout and "[attention] steered heads on the region line" in r.stdout
    bad = run_cli("reason", "--reasoner", gemma_path)
    assert bad.returncode == 2 and "--image and --roi" in bad.stderr

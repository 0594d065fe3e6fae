"""The engine on a real quantized GGUF (Gemma 3 270M Q4_K_M) through llama-cpp-python.

Identities (strength 0 == no steering == a callback that asks nothing; removing steering
brings the baseline back, also through the prefix cache), the effect on a fact that is only
in the prompt, mid-stream updates, the observer, and refusals of bad input.
"""

import threading

import llama_cpp
import numpy as np
import pytest
from conftest import PROMPT

from llama_steer import Llama, Steering, SteeringError, Text, Tokens

MARY = Text("Mary lives in Madrid.")
N_TOKENS = 40


def complete(llm, prompt=PROMPT, n=8, **kw):
    out = llm.create_completion(prompt, max_tokens=n, temperature=0, **kw)
    return out["choices"][0]["text"]


def greedy_tokens(llm, prompt=PROMPT, n=N_TOKENS):
    toks = llm.tokenize(prompt.encode())
    out = []
    for t in llm.generate(toks, temp=0.0):
        out.append(t)
        if len(out) == n:
            break
    return out


def test_strength_zero_equals_parent_and_an_idle_callback(make_llm):
    parent = greedy_tokens(make_llm(cls=llama_cpp.Llama))
    assert len(parent) == N_TOKENS
    zero = make_llm(Steering(heads="all", roi=MARY, strength=0.0))  # callback asks for nothing
    assert greedy_tokens(zero) == parent
    assert zero.steering.stats().n_kq_edited == 0
    assert zero.steering.stats().n_asked > 0  # the callback ran, and left every node alone


def test_without_steering_it_is_the_parent(make_llm):
    llm = make_llm()
    assert type(llm).__mro__[1] is llama_cpp.Llama
    assert llm.steering is None
    assert greedy_tokens(llm, n=16) == greedy_tokens(make_llm(cls=llama_cpp.Llama), n=16)


def test_suppressing_a_sentence_moves_the_answer_and_removal_restores_it(make_llm):
    steer = Steering(heads="all", roi=MARY, mode="bias", strength=0.0)
    llm = make_llm(steer)
    base = complete(llm)
    assert base.strip().startswith("Madrid")
    steer.update(strength=-10.0)
    steered = complete(llm)
    assert steered.strip().startswith("Berlin")
    st = steer.stats()
    assert st.n_kq_edited >= 18 and st.flags == 0
    steer.update(strength=0.0)
    assert complete(llm) == base  # same object, prefix cache and all
    # redirect: boost John's sentence, suppress the rest of the facts
    steer.update(
        mode="redirect",
        roi=Text("John lives in Berlin."),
        domain=Text("John lives in Berlin. Mary lives in Madrid."),
        strength=6.0,
    )
    assert complete(llm).strip().startswith("Berlin")
    steer.update(strength=0.0)
    assert complete(llm) == base


def test_decode_only_reuses_the_clean_prompt_and_matches_a_fresh_model(make_llm):
    """The prompt's cells were computed unsteered, so a second call reuses them and drops
    only the steered answer's cells. llama-cpp-python then replays the last prompt token as a
    one-token batch, whose logits differ in the last bits from the full prefill's, so the
    reference is a fresh model making the same two calls."""

    def two_calls(llm):
        return complete(llm, n=12), complete(llm, n=12)

    steer = Steering(heads="all", roi=MARY, strength=-10.0, decode_only=True)
    llm = make_llm(steer)
    got = two_calls(llm)
    assert steer.stats().n_kq_edited > 0
    assert llm.n_tokens > len(llm.tokenize(PROMPT.encode()))
    ref = two_calls(make_llm(Steering(heads="all", roi=MARY, strength=-10.0, decode_only=True)))
    assert got == ref


def test_an_eval_after_a_generation_is_prefill(make_llm):
    """Within generate() every eval after the prompt is a decode step; an eval() the caller
    makes after the generation ended is prefill again (unedited under decode_only)."""
    llm = make_llm(Steering(heads="all", roi=MARY, strength=-10.0, decode_only=True))
    complete(llm, n=4)
    assert llm._steer_cell_key[-1] != 0  # the answer's cells: decode steps, steered
    llm.eval(llm.tokenize(b" Yes", add_bos=False))
    assert llm._steer_cell_key[-1] == 0


def test_prefix_reuse_keeps_cells_right(make_llm):
    """A longer prompt reuses the cached prefix; the ROI's cells must be where a fresh model
    puts them, so the steered continuation is the same token for token."""
    longer = PROMPT.replace("Question:", "Tom lives in Rome. Question:")
    short_prompt = PROMPT
    steer = Steering(heads="all", roi=MARY, strength=-10.0)
    llm = make_llm(steer)
    complete(llm, short_prompt, n=4)
    reused = complete(llm, longer, n=16)
    fresh = complete(make_llm(Steering(heads="all", roi=MARY, strength=-10.0)), longer, n=16)
    assert reused == fresh


def test_update_mid_stream_takes_effect_at_the_next_token(make_llm, gemma_path):
    """Steer only the last layer: its edit changes that token's logits but no cached K/V, so
    after update(strength=0) the next token's logits must be the unsteered model's logits for
    the same history."""
    n_layer = 18
    heads = [(n_layer - 1, h) for h in range(4)]
    steer = Steering(heads=heads, roi=MARY, strength=-10.0)
    llm = make_llm(steer, logits_all=True)
    toks = llm.tokenize(PROMPT.encode())
    gen = llm.generate(toks, temp=0.0)
    history = [next(gen) for _ in range(3)]
    edited = steer.stats().n_kq_edited
    steer.update(strength=0.0)
    history.append(next(gen))
    assert steer.stats().n_kq_edited == edited  # the eval after the update edited nothing
    logits = np.array(llm.scores[llm.n_tokens - 1])
    gen.close()
    ref = make_llm(cls=llama_cpp.Llama, logits_all=True)
    ref.eval(toks)  # the same batches as generate(): the prompt, then one token at a time
    for t in history[:-1]:
        ref.eval([t])
    want = np.array(ref.scores[ref.n_tokens - 1])
    assert np.argmax(logits) == np.argmax(want) == history[-1]
    np.testing.assert_allclose(logits, want, rtol=0, atol=1e-4)
    # and the steered tokens really were steered: their logits differ from the plain model's
    assert not np.allclose(np.array(llm.scores[len(toks) - 1]), ref.scores[len(toks) - 1], atol=0.1)


def test_update_from_another_thread_while_streaming(make_llm):
    steer = Steering(heads="all", roi=MARY, strength=-10.0, decode_only=True)
    llm = make_llm(steer)
    counts = []
    stream = llm.create_completion(PROMPT, max_tokens=24, temperature=0, stream=True)
    for i, _chunk in enumerate(stream):
        counts.append(steer.stats().n_kq_edited)
        if i == 8:
            t = threading.Thread(target=steer.update, kwargs={"strength": 0.0})
            t.start()
            t.join()
    assert len(counts) >= 12
    # edits grew while on, and stopped growing once the other thread switched them off
    assert counts[8] > counts[2]
    assert counts[-1] == counts[10]


def test_chat_completion_and_streaming_work_steered(make_llm):
    steer = Steering(heads="all", roi=MARY, strength=-10.0)
    llm = make_llm(steer, n_ctx=1024)
    msgs = [{"role": "user", "content": PROMPT}]
    out = llm.create_chat_completion(msgs, max_tokens=6, temperature=0)
    text = out["choices"][0]["message"]["content"]
    streamed = "".join(
        c["choices"][0]["delta"].get("content", "")
        for c in llm.create_chat_completion(msgs, max_tokens=6, temperature=0, stream=True)
    )
    assert text == streamed
    assert steer.stats().n_kq_edited > 0


def test_attention_to_reads_distributions_and_focus(make_llm):
    steer = Steering(heads="all", roi=MARY, strength=3.0)
    llm = make_llm(steer)
    complete(llm, n=2)
    everything = steer.attention_to(Tokens(0, llm.n_tokens))
    np.testing.assert_allclose(everything, 1.0, rtol=1e-4)  # every row is a distribution
    steered = steer.attention_to()
    plain = steer.attention_to(steered=False)
    assert steered.shape == (18, 4)
    assert np.all((steered >= 0) & (steered <= 1 + 1e-5))
    assert steered.mean() > 1.5 * plain.mean()  # ROI focus goes up (seeds 000/001)
    # reading attention leaves the generation state as it was
    assert complete(llm, n=6) == complete(
        make_llm(Steering(heads="all", roi=MARY, strength=3.0)), n=6
    )


def test_bad_input_is_refused_with_the_fix(make_llm):
    with pytest.raises(SteeringError, match="flash_attn=False"):
        make_llm(Steering(roi=MARY), flash_attn=True)
    with pytest.raises(SteeringError, match="quantized V cache"):
        make_llm(Steering(roi=MARY), type_v=llama_cpp.GGML_TYPE_Q8_0)
    with pytest.raises(SteeringError, match="swa_full"):
        make_llm(Steering(roi=MARY), swa_full=False)
    with pytest.raises(SteeringError, match=r"18 layers x 4 query heads"):
        make_llm(Steering(heads=[(18, 0)], roi=MARY))
    with pytest.raises(SteeringError, match="pass a llama_steer.Steering"):
        make_llm("bias")
    llm = make_llm(Steering(roi=Text("Paris"), strength=2.0))
    with pytest.raises(SteeringError, match="'Paris' is not in the prompt"):
        complete(llm)
    llm.steering.update(roi=Tokens(0, 999))
    with pytest.raises(SteeringError, match="use stop <="):
        complete(llm)
    with pytest.raises(SteeringError, match="already attached"):
        Llama(model_path=llm.model_path, steering=llm.steering, verbose=False)
    st = llm.steering
    st.close()
    st.close()  # twice is fine
    assert llm.steering is None


def test_a_cache_that_lost_its_start_is_refused(make_llm):
    llm = make_llm(Steering(roi=MARY, strength=2.0))
    toks = llm.tokenize(PROMPT.encode())
    llm.eval(toks)
    llm._ctx.kv_cache_seq_rm(0, 0, 3)  # as a context shift does: cell i no longer holds token i
    with pytest.raises(SteeringError, match="KV cache holds positions"):
        llm.eval(llm.tokenize(b" Madrid", add_bos=False))

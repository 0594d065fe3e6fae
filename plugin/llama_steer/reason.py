"""Look, then reason: a vision-language model describes a region of an image (its attention
steered there), and a text reasoning model answers a question about it with its attention
steered to that description through its prompt and its thinking (seeds 000, 001, 002).

    >>> res = look_then_reason(vlm, reasoner, "strip.png", "panel:3@2x3",
    ...                        "What colour is the object?")
    >>> res.region, res.answer                  # ('a blue star', 'blue')

    look_then_reason(...) -> Reasoning ...... the whole turn (stream=True: its events)
    Reasoning ............................... region, context, prompt, thinking, answer, and per
                                              generated token: steered or not, entropy, attention
    reasoner_prompt(region, context, question)   the text the reasoner gets

Stage (a), the VLM (a steered ``llama_steer.Llama`` with an mtmd chat handler): steered to
``roi`` with its own defaults (its headmap), it answers ``region_prompt`` (default "What is in
this panel?", the gaze-heads question); with ``context=True`` it also describes the whole
image unsteered (``context_prompt``). Stage (b), the reasoner (a ``llama_steer.Llama`` made
with ``steering=Steering(...)``: its heads, e.g. ``heads="layers:4-11"`` or a text headmap):
its steering is pointed at the line of the prompt that holds the region's description
(``Text(...)``), in prompt and generated tokens (thinking included). A reasoner cannot read
image features, so the region reaches it as text; the steering keeps its attention there.

Options (seed 002): ``schedule`` — strength per generated token, [(after N tokens, strength),
...]; ``gate`` — steer a generated token only when the reasoner's next-token entropy (nats)
without steering exceeds it: the token is evaluated unsteered, and when the entropy is higher
it is evaluated again steered (that token costs two evals); the prompt is steered either
way. ``Reasoning.n_steered`` counts the tokens steered.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from llama_steer._errors import SteeringError
from llama_steer.messages import user_message
from llama_steer.roi import Text

__all__ = ["Reasoning", "look_then_reason", "reasoner_prompt"]

REGION_LINE = "Region of interest: {region}"


def reasoner_prompt(region: str, context: str | None, question: str) -> tuple[str, str]:
    """(the user message, the line of it that describes the region: the steering target).
    The region comes first and the whole picture after it: unsteered, a model tends to answer
    from what it read last; steered, its attention stays on the region."""
    line = REGION_LINE.format(region=region.strip().rstrip("."))
    parts = [line + "."]
    parts += [f"Picture: {context.strip().rstrip('.')}."] if context else []
    parts += [f"Question: {question.strip()}"]
    return "\n".join(parts), line


@dataclass
class Reasoning:
    """One look-then-reason turn. Per generated token of the reasoner (lists aligned):
    ``steered`` (bool), ``entropy`` (nats, of the next-token distribution the token was drawn
    from), ``attention`` (mass of the steered heads on the region line, mean over heads;
    None without ``observe``)."""

    region: str
    context: str | None
    prompt: str
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    steered: list[bool] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    attention: list[float | None] = field(default_factory=list)

    @property
    def thinking(self) -> str:
        """The part before </think> (R1-style models), else ""."""
        return self.text.split("</think>", 1)[0].strip() if "</think>" in self.text else ""

    @property
    def answer(self) -> str:
        """The part after </think>, or the whole text."""
        return self.text.split("</think>", 1)[-1].strip()

    @property
    def n_steered(self) -> int:
        return int(sum(self.steered))


def _entropy(logits: np.ndarray) -> float:
    z = logits.astype(np.float64)
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    return float(-(p * np.log(np.maximum(p, 1e-300))).sum())


def _chat_tokens(llm, content: str) -> list[int]:
    """The reasoner's prompt: its GGUF's chat template around one user message (an R1 model
    opens <think> there), or, for a GGUF without one, the plain text and "Answer:"."""
    from llama_cpp import llama_chat_format as lcf

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return llm.tokenize((content + "\nAnswer:").encode(), add_bos=True, special=False)

    def piece(t: int) -> str:
        return llm.detokenize([t], special=True).decode("utf-8", "replace") if t >= 0 else ""

    fmt = lcf.Jinja2ChatFormatter(template, piece(llm.token_eos()), piece(llm.token_bos()))
    out = fmt(messages=[{"role": "user", "content": content}])
    return llm.tokenize(out.prompt.encode(), add_bos=not out.added_special, special=True)


def look_then_reason(
    vlm,
    reasoner,
    image,
    roi,
    question: str,
    *,
    region_prompt: str = "What is in this panel?",
    context: bool = True,
    context_prompt: str = "Describe the strip.",
    mode: str = "emphasize",
    strength: float = 12.0,
    schedule: list[tuple[int, float]] | None = None,
    gate: float | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    observe: bool = False,
    stream: bool = False,
):
    """The turn, or (``stream=True``) an iterator of events: {"stage": "region" | "context" |
    "reasoner", "text": piece, ...}, the last one {"stage": "done", "result": Reasoning}.

    image: a path or a PIL image; roi: the VLM's ROI (grammar string or targets). mode and
    strength: how the reasoner is steered to the region line ("emphasize" is PASTA: keys
    outside the line scaled by e^-strength; 4.6 is PASTA's 0.01; the default 12 was chosen on
    held-out strips of another seed with Gemma 3 270M as the reasoner: README, Results).
    """
    events = _turn(
        vlm, reasoner, image, roi, question, region_prompt, context, context_prompt, mode,
        strength, schedule, gate, max_tokens, temperature, seed, observe,
    )  # fmt: skip
    if stream:
        return events
    for ev in events:
        if ev["stage"] == "done":
            return ev["result"]
    raise AssertionError("the turn ended without a result")  # pragma: no cover


def _ask(vlm, image, prompt: str, max_tokens: int) -> Iterator[str]:
    msgs = [user_message(prompt, [image])]
    for chunk in vlm.create_chat_completion(
        msgs, max_tokens=max_tokens, temperature=0, stream=True
    ):
        piece = chunk["choices"][0]["delta"].get("content")
        if piece:
            yield piece


def _strength_at(n: int, strength: float, schedule) -> float:
    s = strength
    for after, value in schedule or ():
        if n >= after:
            s = value
    return s


def _turn(
    vlm, reasoner, image, roi, question, region_prompt, context, context_prompt, mode,
    strength, schedule, gate, max_tokens, temperature, seed, observe,
) -> Iterator[dict]:  # fmt: skip
    vst, rst = vlm.steering, reasoner.steering
    if vst is None or not vlm.chat_handler:
        raise SteeringError(
            "the VLM must be a llama_steer.Llama with steering= and an mtmd chat_handler"
        )
    if rst is None:
        raise SteeringError(
            "the reasoner must be a llama_steer.Llama made with steering=Steering(...) (its "
            "heads, e.g. heads='layers:4-11'): the turn points that steering at the region"
        )
    if gate is not None and not (isinstance(gate, int | float) and math.isfinite(gate)):
        raise SteeringError(f"gate={gate!r}: a finite entropy threshold in nats, or None")
    for after, value in schedule or ():
        if not (isinstance(after, int) and after >= 0):
            raise SteeringError(f"schedule entry ({after!r}, {value!r}): after N >= 0 tokens")
    # (a) the VLM looks: steered to the ROI, then (context) the whole image unsteered
    saved = vst.config
    try:
        vst.update(roi=roi)
        region = []
        for piece in _ask(vlm, image, region_prompt, 32):
            region.append(piece)
            yield {"stage": "region", "text": piece}
        region_text = "".join(region).strip()
        context_text = None
        if context:
            vst.update(strength=0.0)
            parts = []
            for piece in _ask(vlm, image, context_prompt, 96):
                parts.append(piece)
                yield {"stage": "context", "text": piece}
            context_text = "".join(parts).strip()
    finally:
        vst.update(**{f: getattr(saved, f) for f in ("roi", "strength")})
    if not region_text:
        raise SteeringError("the VLM gave no description of the region: check the ROI")
    # (b) the reasoner reasons, steered to the region's line of its prompt
    content, line = reasoner_prompt(region_text, context_text, question)
    res = Reasoning(region_text, context_text, content)
    s0 = _strength_at(0, strength, schedule)
    # the prompt is steered either way; with a gate, generated tokens are evaluated unsteered
    # and again steered only where the entropy says the model is unsure
    rst.update(roi=Text(line), mode=mode, strength=s0)
    toks = _chat_tokens(reasoner, content)
    n_ctx = reasoner.n_ctx()
    if len(toks) + max_tokens > n_ctx:
        raise SteeringError(
            f"the reasoner's prompt ({len(toks)} tokens) and max_tokens={max_tokens} do not fit "
            f"its n_ctx={n_ctx}: make it with n_ctx >= {len(toks) + max_tokens}"
        )
    rng = np.random.default_rng(seed)
    obs = rst.observe({"region": Text(line)}) if observe else None
    eos = reasoner.token_eos()
    try:
        reasoner.reset()
        reasoner.eval(toks)
        if gate is not None:
            rst.update(strength=0.0)
        for n in range(max_tokens):
            logits = _last_logits(reasoner)
            h = _entropy(logits)
            s = _strength_at(n, strength, schedule)
            # the first token comes from the (steered) prompt eval
            steered = s != 0 and (gate is None or n == 0 or h > gate)
            if gate is not None and steered and n > 0:
                # the same position again, steered (the unsteered eval said: uncertain)
                rst.update(strength=s)
                last = reasoner.input_ids[reasoner.n_tokens - 1]
                reasoner.n_tokens -= 1
                reasoner._ctx.kv_cache_seq_rm(-1, reasoner.n_tokens, -1)
                reasoner.eval([int(last)])
                logits = _last_logits(reasoner)
                rst.update(strength=0.0)
            att = float(obs.mass()[0]) if obs is not None else None
            tok = _sample(logits, temperature, rng)
            res.tokens.append(tok)
            res.steered.append(bool(steered))
            res.entropy.append(h)
            res.attention.append(att)
            if tok == eos or reasoner.token_eos() == tok:
                break
            piece = reasoner.detokenize([tok]).decode("utf-8", "replace")
            res.text += piece
            yield {"stage": "reasoner", "text": piece, "steered": steered, "entropy": h,
                   "attention": att}  # fmt: skip
            if gate is None and _strength_at(n + 1, strength, schedule) != s:
                rst.update(strength=_strength_at(n + 1, strength, schedule))
            reasoner.eval([tok])
    finally:
        if obs is not None:
            obs.close()
    yield {"stage": "done", "result": res}


def _last_logits(llm) -> np.ndarray:
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()


def _sample(logits: np.ndarray, temperature: float, rng) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    return int(rng.choice(p.size, p=p))

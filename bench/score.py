"""Cost of head scoring on the embedded VLM, side by side in one process.

    python bench/score.py [--strips 10] [-m organism.gguf --mmproj mmproj.gguf]

Prints seconds per strip for the shared-prefix scorer (image + system prompt evaluated once,
six questions branched from it) vs six full prefills, and the observer's overhead: a prompt
evaluated with every layer's attention summed per panel vs the same prompt unobserved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from llama_steer import Llama, Panel, Steering, comics  # noqa: E402
from llama_steer.apps.score import StripPrompter, score_strip  # noqa: E402


def main(argv=None) -> int:
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from llama_steer.messages import embedded_model

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-m", "--model")
    ap.add_argument("--mmproj")
    ap.add_argument("--strips", type=int, default=10)
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args(argv)
    model, mmproj = (args.model, args.mmproj) if args.model else embedded_model()
    handler = MTMDChatHandler(clip_model_path=mmproj, verbose=False)
    llm = Llama(
        model_path=model,
        chat_handler=handler,
        steering=Steering(strength=0.0),
        n_ctx=2048,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    pr = StripPrompter(llm, handler)
    strips = [comics.make_strip(4 * 10**9 + i, "2x3") for i in range(args.strips)]
    times = {"shared": [], "full": []}
    for i, d in enumerate(strips):
        img, ans = comics.render(d), [p.thing.name for p in d.panels]
        order = ["shared", "full"] if i % 2 == 0 else ["full", "shared"]
        for mode in order:
            t = time.perf_counter()
            score_strip(pr, img, "2x3", ["answer:2", "last"], ans, shared_prefix=mode == "shared")
            times[mode].append(time.perf_counter() - t)
    # observer overhead: the same prompt evaluated with and without per-panel sums
    bitmap = pr.h._create_bitmap_from_bytes(comics.png_bytes(comics.render(strips[0])))
    items, handle = pr.chunks(bitmap, "What is in panel 2?")
    obs = {"plain": [], "observed": []}
    panels = [Panel(k, grid=(2, 3)) for k in range(1, 7)]  # the scorer's regions
    for i in range(2 * args.strips):
        mode = ["plain", "observed"][i % 2]
        llm.reset()
        llm._ctx.kv_cache_clear()
        t = time.perf_counter()
        if mode == "observed":
            with llm.steering.observe(panels, rows="all"):
                pr.eval_chunks(items)
        else:
            pr.eval_chunks(items)
        obs[mode].append(time.perf_counter() - t)
    pr.mt.mtmd_input_chunks_free(handle)
    pr.mt.mtmd_bitmap_free(bitmap)
    llm.close()
    med = {k: statistics.median(v) for k, v in {**times, **obs}.items()}
    print(f"model: {os.path.basename(model)}, {args.strips} strips, {args.threads} threads")
    print(
        f"scoring per strip: shared prefix {med['shared'] * 1e3:.0f} ms, six full prefills "
        f"{med['full'] * 1e3:.0f} ms  -> speed-up x{med['full'] / med['shared']:.2f}"
    )
    print(
        f"prompt with observer {med['observed'] * 1e3:.1f} ms vs plain {med['plain'] * 1e3:.1f} ms"
        f"  -> ratio plain/observed {med['plain'] / med['observed']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

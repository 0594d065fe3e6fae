"""Load, use and close offloaded models in a loop: the sequence suspected of the model-load
segfault seen once on an H100 (two processes died inside llama-cpp-python's
``LlamaModel.__init__`` with ``n_gpu_layers=99``, once for a model with no steering at all).
bench/gpu_check.sh runs it under a debugger and as two processes at once.

    python bench/gpu_load_loop.py [--iters 24] [-m MODEL --mmproj MMPROJ] [-ngl 99]

Each iteration loads one of: the embedded VLM steered (the hook's CUDA kernels attached: NVRTC,
the driver's primary context retained, a module loaded) with its mtmd projector, a plain
llama_cpp.Llama of the same GGUF (what crashed once: a plain load after steered ones closed
in the same process), the text model steered without a projector, and, with -m/--mmproj, the
given VLM pair steered and plain; answers a few tokens; closes it. Prints a line before and
after each load (flushed), so a crash names the load it died in.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
faulthandler.enable()  # a Python traceback on SIGSEGV, besides the debugger's native one

import llama_cpp  # noqa: E402
from llama_cpp.llama_chat_format import MTMDChatHandler  # noqa: E402

from llama_steer import Llama, Panel, Steering, Text, comics, guarded_load  # noqa: E402
from llama_steer.cli import embedded_model, user_message  # noqa: E402


def log(msg: str) -> None:
    print(f"[{os.getpid()} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--iters", type=int, default=24)
    ap.add_argument("-m", "--model", help="a VLM's text GGUF (with --mmproj): also loaded")
    ap.add_argument("--mmproj")
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=99)
    args = ap.parse_args(argv)
    organism, organism_mmproj = embedded_model()
    img = comics.render(comics.make_strip(6 * 10**9, "2x3"))
    msgs = [user_message("Describe the strip.", [img])]
    kinds = ["steered-vlm", "plain", "steered-text", "plain-vlm"]
    if args.model:
        kinds += ["big-steered-vlm", "big-plain-vlm"]
    common = dict(n_ctx=1024, n_gpu_layers=args.n_gpu_layers, verbose=False, seed=1)
    for i in range(args.iters):
        kind = kinds[i % len(kinds)]
        big = kind.startswith("big-")
        path, mmproj = (args.model, args.mmproj) if big else (organism, organism_mmproj)
        vlm = kind.endswith("-vlm")
        kw = dict(common, model_path=path)
        if vlm:
            kw["chat_handler"] = MTMDChatHandler(clip_model_path=mmproj, verbose=False)
        log(f"iter {i} {kind}: loading {os.path.basename(path)}")
        if "plain" in kind:
            with guarded_load():
                llm = llama_cpp.Llama(**kw)
        else:
            if vlm:
                st = Steering(heads="all", roi=Panel(3, grid=(2, 3)), mode="redirect", strength=4.0)
            else:
                st = Steering(heads="all", roi=Text("the strip"), strength=4.0)
            llm = Llama(steering=st, **kw)
        log(f"iter {i} {kind}: loaded")
        if vlm:
            out = llm.create_chat_completion(msgs, max_tokens=4, temperature=0)
            text = out["choices"][0]["message"]["content"]
        else:
            text = llm.create_completion("Describe the strip.", max_tokens=4)["choices"][0]["text"]
        llm.close()
        del llm
        gc.collect()
        log(f"iter {i} {kind}: ok {text!r}")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())

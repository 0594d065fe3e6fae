"""The same steering done the PyTorch way vs llama-steer, on the same VLM, side by side.

    pip install torch==2.13.0 "transformers==4.57.*" tokenizers gguf   # bench-only extras
    python bench/torch_compare.py [--hf DIR] [--n-predict 48 --reps 5]

The PyTorch weights are the shipped GGUF pair's, put back into transformers' Qwen2-VL by
``scripts/organism/from_gguf.py`` (f16 values, computed in fp32), or the Hugging Face directory
given with --hf (``scripts/organism/train.py --export-only`` writes one). The PyTorch side is
what the gaze-heads paper's code does: HF transformers with eager attention and a hook that adds
a pre-softmax bias to the chosen heads (redirect to panel 3 of a 2x3 strip, every head,
strength 4). The llama-steer side runs the shipped f16 GGUF pair through llama-cpp-python with
the same steering. Prints decode tokens/s of both and their ratio (single process, interleaved
runs, medians).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numpy as np  # noqa: E402

from llama_steer import Llama, Panel, Steering, comics  # noqa: E402
from llama_steer.messages import embedded_model  # noqa: E402

QUESTION = "Describe the strip."


def torch_side(hf: str | None, img, threads: int, strength: float):
    """A callable running one steered greedy generation with HF eager attention."""
    import torch
    import transformers.models.qwen2_vl.modeling_qwen2_vl as q2
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts", "organism"))
    from common import Encoder, patchify  # the recipe's own preprocessing (no torchvision)

    torch.set_num_threads(threads)
    if hf:
        model = Qwen2VLForConditionalGeneration.from_pretrained(hf, torch_dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(hf)
    else:
        from from_gguf import hf_from_gguf

        model, tok = hf_from_gguf(embedded_model()[0])
    model.set_attn_implementation("eager")  # the paper's hook point: eager_attention_forward
    model.eval()
    pix, grid = patchify(img)
    prompt = Encoder(tok).prompt(grid[1] * grid[2] // 4, QUESTION)
    inputs = {
        "input_ids": torch.tensor([prompt]),
        "attention_mask": torch.ones(1, len(prompt), dtype=torch.long),
        "pixel_values": torch.from_numpy(pix),
        "image_grid_thw": torch.tensor([grid]),
    }
    ids = inputs["input_ids"][0]
    image_id = model.config.image_token_id
    cells = torch.nonzero(ids == image_id)[:, 0]
    nx = int(inputs["image_grid_thw"][0, 2]) // 2
    ny = int(inputs["image_grid_thw"][0, 1]) // 2
    target = torch.zeros(len(ids), dtype=torch.bool)
    for t in range(nx * ny):  # panel 3 of 2x3: top row, right third
        r, c = divmod(t, nx)
        if r < ny // 2 and c >= 2 * nx // 3:
            target[cells[t]] = True
    bias = torch.zeros(len(ids))
    bias[cells] = -strength
    bias[target] = strength
    original = q2.eager_attention_forward
    calls = [0]

    def steered(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        # the paper's hook: add the bias to the pre-softmax scores of every text head
        if not isinstance(module, q2.Qwen2VLAttention):  # the vision tower: untouched
            return original(module, query, key, value, attention_mask, scaling, dropout, **kw)
        calls[0] += 1
        n = key.shape[-2]
        b = torch.zeros(n)
        b[: min(n, len(bias))] = bias[:n]
        mask = b.view(1, 1, 1, n) if attention_mask is None else attention_mask + b.view(1, 1, 1, n)
        return original(module, query, key, value, mask, scaling, dropout, **kw)

    q2.eager_attention_forward = steered

    def run(n_predict: int) -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model.generate(
                **inputs, max_new_tokens=n_predict, min_new_tokens=n_predict, do_sample=False
            )
            dt = time.perf_counter() - t0
        if calls[0] == 0:
            raise RuntimeError("the PyTorch steering hook never ran")
        return (out.shape[1] - ids.shape[0]) / dt

    return run


def gguf_side(img, threads: int, strength: float):
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from llama_steer.messages import user_message

    model, mmproj = embedded_model()
    steer = Steering(heads="all", roi=Panel(3, grid=(2, 3)), mode="redirect", strength=strength)
    llm = Llama(
        model_path=model,
        chat_handler=MTMDChatHandler(clip_model_path=mmproj, verbose=False),
        steering=steer,
        n_ctx=1024,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    msgs = [user_message(QUESTION, [img])]

    def run(n_predict: int) -> float:
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):
            t0 = time.perf_counter()
            out = llm.create_chat_completion(msgs, max_tokens=n_predict, temperature=0)
            dt = time.perf_counter() - t0
        return out["usage"]["completion_tokens"] / dt

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hf", help="a Hugging Face export (default: rebuilt from the GGUF pair)")
    ap.add_argument("-n", "--n-predict", type=int, default=48)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--strength", type=float, default=4.0)
    args = ap.parse_args(argv)
    img = comics.render(comics.make_strip(8 * 10**9, "2x3"))
    sides = {
        "pytorch": torch_side(args.hf, img, args.threads, args.strength),
        "llama-steer": gguf_side(img, args.threads, args.strength),
    }
    res = {k: [] for k in sides}
    for r in range(args.reps + 1):
        for name in list(sides) if r % 2 else list(sides)[::-1]:
            v = sides[name](args.n_predict)
            if r:  # the first round warms up
                res[name].append(v)
    med = {k: statistics.median(v) for k, v in res.items()}
    print(
        f"steered generation (redirect to panel 3, all heads, strength {args.strength:g}), "
        f"{args.n_predict} tokens incl. the prompt, {args.threads} threads, medians of {args.reps}"
    )
    for k, v in med.items():
        print(f"  {k:12s} {v:8.1f} tokens/s")
    print(f"ratio llama-steer / pytorch: {med['llama-steer'] / med['pytorch']:.2f}")
    return 0 if np.isfinite(med["pytorch"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""PyTorch reference for organism v2's GGUF parity: the greedy answer (up to --tokens tokens)
and the top-5 log-probabilities at each of its steps on a few fixed examples (both evaluation
sets), for ``evaluate_v2.py --compare``.

    python scripts/organism/reference_v2.py --hf ~/.cache/llama-steer/organism-v2/hf \
        --out /tmp/v2-ref.json [--n 3]

The same examples, prompt layout and mtmd-style image resize as evaluate_v2.py (v2.patchify).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import v2
from common import Encoder, comics
from evaluate_v2 import example


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", default=str(v2.DEFAULT_OUT / "hf"))
    ap.add_argument("--out", default="/tmp/v2-ref.json")
    ap.add_argument("--n", type=int, default=3, help="examples per task and set")
    ap.add_argument("--seed", type=int, default=3 * 10**9)
    ap.add_argument("--tokens", type=int, default=8, help="greedy answer tokens compared")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.hf)
    model = Qwen3VLForConditionalGeneration.from_pretrained(args.hf, dtype=torch.float32).eval()
    enc = Encoder(tok)
    rows = []
    for set_name in ("train", "heldout"):
        for ti, task in enumerate(comics.TASKS):
            for i in range(args.n):
                seed = args.seed + ti * 1000 + i
                ex = example(set_name, task, seed)
                pix, grid = v2.patchify(ex.image)
                ids = enc.prompt(grid[1] * grid[2] // 4, ex.question)
                steps, answer = [], []
                for _ in range(args.tokens):  # greedy, top-5 log-probabilities per step
                    with torch.no_grad():
                        out = model(
                            input_ids=torch.tensor([ids + answer]),
                            attention_mask=torch.ones(1, len(ids) + len(answer), dtype=torch.long),
                            pixel_values=torch.from_numpy(pix),
                            image_grid_thw=torch.tensor([grid]),
                        )
                    lp = torch.log_softmax(out.logits[0, -1].float(), -1).numpy()
                    top = np.argsort(-lp)[:5]
                    steps.append({tok.decode([int(t)]): float(lp[t]) for t in top})
                    if int(top[0]) == enc.im_end:
                        break
                    answer.append(int(top[0]))
                rows.append(
                    dict(
                        set=set_name,
                        task=task,
                        seed=seed,
                        top5=steps[0],
                        steps=steps,
                        answer=tok.decode(answer),
                    )
                )
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"wrote {len(rows)} references to {args.out}")


if __name__ == "__main__":
    main()

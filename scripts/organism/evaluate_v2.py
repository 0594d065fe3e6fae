"""Evaluate an organism-v2 GGUF pair through llama-steer's Llama (= llama_cpp.Llama + steering)
with llama-cpp-python's MTMD chat handler.

    OMP_WAIT_POLICY=passive python scripts/organism/evaluate_v2.py \
        --model DIR/organism-v2-f16.gguf --mmproj DIR/mmproj-organism-v2-f16.gguf --n 300 \
        [--sets train,heldout] [--json out.json] [--compare ref.json]

Sets: "train" = the training renderers (comics.TRAIN_RENDERERS, alternating) at training sizes,
"heldout" = the held-out renderer (comics.HELDOUT_RENDERERS) at held-out sizes; seeds from
--seed (2*10**9; training uses seeds < 10**8), one question per image, greedy decoding, exact
match. Chance per task, printed beside each accuracy: "majority", the share of the most common
reference answer in the sample (the best a model that ignores the image could do on it), and
"uniform", the a-priori rate (1/42 per object name, 1/2 for yes/no).
``--compare`` reads reference_v2.py's PyTorch top-5 log-probabilities of the first answer
token and prints llama.cpp's beside them (parity of the converted pair).
Needs only llama-cpp-python, llama-steer, numpy and Pillow.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import comics  # noqa: E402  (numpy + Pillow only)

# A priori chance of an exact match for a model that ignores the image: one of 42 objects, six
# of them in order (describe), 2-4 of them (list), yes/no.
UNIFORM = {
    "panel_number": 1 / 42,
    "panel_ordinal": 1 / 42,
    "this_panel": 1 / 42,
    "describe": 42.0**-6,
    "scene_region": 1 / 42,
    "scene_list": 0.0,
    "scene_yesno": 0.5,
}

SETS = {
    "train": (comics.TRAIN_RENDERERS, "train"),
    "heldout": (comics.HELDOUT_RENDERERS, "heldout"),
}


def example(set_name: str, task: str, seed: int):
    renderers, sizes = SETS[set_name]
    return comics.make_example_v2(seed, task, comics.pick_renderer(seed, renderers), sizes)


def load(model: str, mmproj: str, threads: int, logits_all: bool = False):
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from llama_steer import Llama

    handler = MTMDChatHandler(clip_model_path=mmproj, verbose=False)
    return Llama(
        model_path=model,
        chat_handler=handler,
        n_ctx=1024,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
        seed=0,
        logits_all=logits_all,
    )


def messages(img, question: str):
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": comics.data_uri(img)}},
                {"type": "text", "text": question},
            ],
        }
    ]


def ask(llm, img, question: str, max_tokens: int = 64, logprobs: int = 0):
    out = llm.create_chat_completion(
        messages=messages(img, question),
        temperature=0.0,
        max_tokens=max_tokens,
        repeat_penalty=1.0,
        top_k=1,
        logprobs=bool(logprobs),
        top_logprobs=logprobs or None,
    )
    ch = out["choices"][0]
    return (ch["message"]["content"] or "").strip(), ch.get("logprobs")


def compare(llm, ref_path: str) -> None:
    """llama.cpp's greedy answer and per-step top-5 log-probabilities beside PyTorch's."""
    ref = json.loads(Path(ref_path).read_text())
    worst, same = 0.0, 0
    for r in ref:
        ex = example(r["set"], r["task"], r["seed"])
        steps = r.get("steps", [r["top5"]])
        got, lp = ask(llm, ex.image, ex.question, max_tokens=len(steps), logprobs=5)
        content = (lp or {}).get("content") or []
        d = 0.0
        for want, have in zip(steps, content, strict=False):  # compared while both decode
            gg = {t["token"]: t["logprob"] for t in have["top_logprobs"]}
            shared = [abs(gg[t] - v) for t, v in want.items() if t in gg]
            d = max([d, *shared]) if shared else math.inf
            if have["token"] != max(want, key=want.get):
                break
        worst = max(worst, d)
        want_text = r.get("answer", "")
        same += got == want_text
        print(
            f"{r['set']:8s} {r['task']:14s} seed {r['seed']}: torch {want_text!r} gguf {got!r}; "
            f"max |dlogprob| {d:.4f}",
            flush=True,
        )
    print(f"identical answers {same}/{len(ref)}; worst |dlogprob| over shared top-5 {worst:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--mmproj", required=True)
    ap.add_argument("--n", type=int, default=300, help="samples per task and set")
    ap.add_argument("--seed", type=int, default=2 * 10**9)
    ap.add_argument("--sets", default="train,heldout")
    ap.add_argument("--tasks", default=",".join(comics.TASKS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="")
    ap.add_argument("--compare", default="", help="reference_v2.py's JSON: parity check only")
    ap.add_argument("--show", type=int, default=2, help="print this many errors per task")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    llm = load(args.model, args.mmproj, args.threads, logits_all=bool(args.compare))
    if args.compare:
        compare(llm, args.compare)
        return
    results = {}
    t0 = time.time()
    for set_name in args.sets.split(","):
        for task in args.tasks.split(","):
            ti = comics.TASKS.index(task)  # seeds do not depend on --tasks
            ok, errors, answers = 0, [], collections.Counter()
            for i in range(args.n):
                seed = args.seed + ti * 10**6 + i
                ex = example(set_name, task, seed)
                got, _ = ask(llm, ex.image, ex.question)
                answers[ex.answer] += 1
                if got == ex.answer:
                    ok += 1
                elif len(errors) < args.show:
                    errors.append((seed, ex.question, ex.answer, got))
            chance = answers.most_common(1)[0][1] / args.n
            results[f"{set_name}/{task}"] = dict(
                correct=ok,
                n=args.n,
                accuracy=round(ok / args.n, 4),
                chance=round(chance, 4),
                uniform=round(UNIFORM.get(task, 0.0), 4),
            )
            print(
                f"{set_name:8s} {task:14s} {ok}/{args.n} = {ok / args.n:.3f}  "
                f"(chance: majority {chance:.3f}, uniform {UNIFORM.get(task, 0.0):.3f}; "
                f"{time.time() - t0:.0f}s)",
                flush=True,
            )
            for e in errors:
                print(f"    seed {e[0]}  {e[1]!r}  want {e[2]!r}  got {e[3]!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Evaluate the shipped GGUF pair through llama-cpp-python's MTMD chat handler.

    OMP_WAIT_POLICY=passive python scripts/organism/evaluate.py --n 300 --json /tmp/eval.json
    OMP_WAIT_POLICY=passive python scripts/organism/evaluate.py --layout   # KV/chunk layout only

Held-out samples: drawn by llama_steer.comics' independent NumPy renderer with seeds from
--seed (default 2*10**9; training used Pillow renders of seeds < 10**8), one question per
image, greedy decoding (temperature 0), exact string match of the reply with the reference.
Needs only llama-cpp-python, numpy and Pillow.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "plugin" / "llama_steer" / "models"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import comics  # noqa: E402  (numpy + Pillow only; no torch import)


def load(model: Path, mmproj: Path, threads: int):
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from llama_steer import guarded_load

    handler = MTMDChatHandler(clip_model_path=str(mmproj), verbose=False)
    with guarded_load():  # the AMX guard, as llama-steer's own models load
        llm = Llama(
            model_path=str(model),
            chat_handler=handler,
            n_ctx=1024,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
            seed=0,
        )
    return llm, handler


def data_uri(img) -> str:
    return "data:image/png;base64," + base64.b64encode(comics.png_bytes(img)).decode()


def ask(llm, img, question: str, max_tokens: int = 64) -> str:
    msg = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_uri(img)}},
                {"type": "text", "text": question},
            ],
        }
    ]
    out = llm.create_chat_completion(
        messages=msg, temperature=0.0, max_tokens=max_tokens, repeat_penalty=1.0, top_k=1
    )
    return (out["choices"][0]["message"]["content"] or "").strip()


def layout(llm, handler) -> None:
    """Print the chunk layout mtmd makes of one prompt per image kind (cells, grid)."""
    m = handler._mtmd_cpp
    handler._init_mtmd_context(llm)
    for name, desc in [
        ("strip 1x6", comics.make_strip(1, "1x6")),
        ("strip 2x3", comics.make_strip(2, "2x3")),
        ("scene", comics.make_scene(3)),
    ]:
        img = comics.render(desc)
        marker = m.mtmd_default_marker().decode()
        text = (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"{marker}What is in panel 3?<|im_end|>\n<|im_start|>assistant\n"
        )
        png = comics.png_bytes(img)
        bmp = m.mtmd_helper_bitmap_init_from_buf(
            handler.mtmd_ctx,
            (ctypes.c_uint8 * len(png)).from_buffer(bytearray(png)),
            len(png),
            False,
        )
        it = m.mtmd_input_text()
        tb = text.encode()
        it.text, it.text_len, it.add_special, it.parse_special = tb, len(tb), True, True
        chunks = m.mtmd_input_chunks_init()
        arr = (m.mtmd_bitmap_p_ctypes * 1)(bmp)
        assert m.mtmd_tokenize(handler.mtmd_ctx, chunks, ctypes.byref(it), arr, 1) == 0
        cell = 0
        parts = []
        for i in range(m.mtmd_input_chunks_size(chunks)):
            ch = m.mtmd_input_chunks_get(chunks, i)
            n = m.mtmd_input_chunk_get_n_tokens(ch)
            if m.mtmd_input_chunk_get_type(ch) == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                nt = ctypes.c_size_t()
                ptr = m.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(nt))
                toks = [ptr[j] for j in range(nt.value)]
                pieces = "".join(llm.detokenize([t], special=True).decode() for t in toks)
                parts.append(f"text cells {cell}-{cell + n - 1}: {pieces!r}")
            else:
                img_tok = m.mtmd_input_chunk_get_tokens_image(ch)
                nx, ny = m.mtmd_image_tokens_get_nx(img_tok), m.mtmd_image_tokens_get_ny(img_tok)
                n_pos = m.mtmd_input_chunk_get_n_pos(ch)
                parts.append(
                    f"image cells {cell}-{cell + n - 1}: {n} tokens, grid nx={nx} x ny={ny} "
                    f"(row-major), {n_pos} positions"
                )
            cell += n
        print(f"{name} {img.size[0]}x{img.size[1]}:")
        for p in parts:
            print("   ", p)
        m.mtmd_input_chunks_free(chunks)
        m.mtmd_bitmap_free(bmp)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(MODELS / "organism-f16.gguf"))
    ap.add_argument("--mmproj", default=str(MODELS / "mmproj-organism-f16.gguf"))
    ap.add_argument("--n", type=int, default=300, help="samples per task")
    ap.add_argument("--seed", type=int, default=2 * 10**9)
    ap.add_argument("--renderer", default="numpy")
    ap.add_argument("--tasks", default=",".join(comics.TASKS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="")
    ap.add_argument("--layout", action="store_true")
    ap.add_argument("--show", type=int, default=3, help="print this many errors per task")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    llm, handler = load(Path(args.model), Path(args.mmproj), args.threads)
    if args.layout:
        layout(llm, handler)
        return
    results = {}
    t0 = time.time()
    for ti, task in enumerate(args.tasks.split(",")):
        ok, errors = 0, []
        for i in range(args.n):
            seed = args.seed + ti * 10**6 + i
            ex = comics.make_example(seed, task, args.renderer)
            got = ask(llm, ex.image, ex.question)
            if got == ex.answer:
                ok += 1
            elif len(errors) < args.show:
                errors.append((seed, ex.question, ex.answer, got))
        results[task] = dict(correct=ok, n=args.n, accuracy=round(ok / args.n, 4))
        print(
            f"{task:14s} {ok}/{args.n} = {ok / args.n:.3f}  ({time.time() - t0:.0f}s)", flush=True
        )
        for e in errors:
            print(f"    seed {e[0]}  {e[1]!r}  want {e[2]!r}  got {e[3]!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

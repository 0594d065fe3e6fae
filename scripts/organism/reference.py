"""Reference last-prompt-token logits of the PyTorch model, for the llama.cpp parity test.

    python scripts/organism/reference.py --hf /tmp/organism/hf --out tests/data
    python scripts/organism/reference.py --arch v2 --hf ~/.cache/llama-steer/organism-v2/hf
    OMP_WAIT_POLICY=passive python scripts/organism/reference.py --check-gguf   # compare only

Fixed input, v1: comics.make_strip(0, "2x3") drawn by the Pillow renderer; v2:
comics.make_strip_v2(0, "3x2", "heldout") drawn by the held-out "sdf" renderer (277 x 190 px:
not a multiple of 32, so mtmd's resize and letterbox are part of the comparison). The image is
stored as PREFIX_strip.png, so the test does not depend on the rasteriser; one user turn
[image, "What is in panel 3?"] in the Qwen-VL chat layout with the default system prompt,
generation prompt appended. Writes PREFIX_logits.npy (float32, [vocab]) and PREFIX.json
(recipe, prompt token ids, argmax, top-5); PREFIX is organism_ref (v1) or organism_v2_ref.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from common import REPO, Encoder, comics, patchify

QUESTION = "What is in panel 3?"
ARCHS = {  # arch -> (transformers class, file prefix, model, mmproj, strip recipe)
    "v1": (
        "Qwen2VLForConditionalGeneration",
        "organism_ref",
        "organism-f16.gguf",
        "mmproj-organism-f16.gguf",
        "comics.render(comics.make_strip(0, '2x3'), 'pillow')",
    ),
    "v2": (
        "Qwen3VLForConditionalGeneration",
        "organism_v2_ref",
        "organism-v2-f16.gguf",
        "mmproj-organism-v2-f16.gguf",
        "comics.render_v2(comics.make_strip_v2(0, '3x2', 'heldout'), 'sdf')",
    ),
}


def strip_of(arch: str):
    """(description, image) of the fixed input."""
    if arch == "v1":
        desc = comics.make_strip(0, "2x3")
        return desc, comics.render(desc, "pillow")
    desc = comics.make_strip_v2(0, "3x2", "heldout")
    return desc, comics.render_v2(desc, "sdf")


def torch_logits(hf: str, png: Path, arch: str = "v1"):
    import torch
    import transformers
    from PIL import Image
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(hf)
    cls = getattr(transformers, ARCHS[arch][0])
    model = cls.from_pretrained(hf, dtype=torch.float32).eval()
    inputs = torch_inputs(tok, Image.open(png), QUESTION, arch)
    with torch.no_grad():
        out = model(**inputs)
    return out.logits[0, -1].float().numpy(), inputs["input_ids"][0].tolist(), tok


def torch_inputs(tok, img, question: str, arch: str = "v1") -> dict:
    """transformers inputs for one user turn [image, question] in the chat layout."""
    import torch

    if arch == "v2":
        import v2

        pix, grid = v2.patchify(img.convert("RGB"))
    else:
        pix, grid = patchify(img.convert("RGB"))
    ids = Encoder(tok).prompt(grid[1] * grid[2] // 4, question)
    return dict(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        pixel_values=torch.from_numpy(pix),
        image_grid_thw=torch.tensor([grid]),
    )


def gguf_logits(model: Path, mmproj: Path, png: Path):
    from evaluate import data_uri, load
    from PIL import Image

    llm, _ = load(model, mmproj, 1)
    img = Image.open(png).convert("RGB")
    msg = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_uri(img)}},
                {"type": "text", "text": QUESTION},
            ],
        }
    ]
    import llama_cpp

    llm.create_chat_completion(messages=msg, temperature=0.0, max_tokens=1)
    # the handler decoded the prompt; with max_tokens=1 the sampled token is never decoded, so
    # the context's last output row is the last prompt token's logits
    n_vocab = llm.n_vocab()
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float32), llm.n_tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", default="/tmp/organism/hf")
    ap.add_argument("--out", default=str(REPO / "tests" / "data"))
    ap.add_argument("--check-gguf", action="store_true")
    ap.add_argument("--arch", default="v1", choices=sorted(ARCHS))
    ap.add_argument("--model", default=None, help="default: the package's pair of --arch")
    ap.add_argument("--mmproj", default=None)
    args = ap.parse_args()
    _, prefix, model_name, mmproj_name, recipe = ARCHS[args.arch]
    models = REPO / "plugin" / "llama_steer" / "models"
    args.model = args.model or str(models / model_name)
    args.mmproj = args.mmproj or str(models / mmproj_name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{prefix}_strip.png"
    if not args.check_gguf:
        strip, img = strip_of(args.arch)
        img.save(png)
        logits, ids, tok = torch_logits(args.hf, png, args.arch)
        np.save(out / f"{prefix}_logits.npy", logits.astype(np.float32))
        top = np.argsort(-logits)[:5]
        meta = dict(
            image=f"{recipe} == {png.name}",
            question=QUESTION,
            messages="[{role: user, content: [image_url(png data URI), text(question)]}]",
            prompt_token_ids=ids,
            n_prompt_tokens=len(ids),
            answer=strip.panels[2].thing.name,
            argmax=int(top[0]),
            argmax_piece=tok.convert_ids_to_tokens(int(top[0])),
            top5=[[int(t), tok.convert_ids_to_tokens(int(t)), float(logits[t])] for t in top],
        )
        (out / f"{prefix}.json").write_text(json.dumps(meta, indent=1))
        print(json.dumps({k: v for k, v in meta.items() if k != "prompt_token_ids"}, indent=1))
    ref = np.load(out / f"{prefix}_logits.npy")
    if Path(args.model).exists():
        got, n_prompt = gguf_logits(Path(args.model), Path(args.mmproj), png)
        err = np.abs(got - ref).max() / np.abs(ref).max()
        print(
            f"gguf vs torch: n_prompt {n_prompt}, max|diff| {np.abs(got - ref).max():.4g}, "
            f"relative to max|ref| {err:.3g}, argmax {int(got.argmax())} vs {int(ref.argmax())}"
        )


if __name__ == "__main__":
    main()

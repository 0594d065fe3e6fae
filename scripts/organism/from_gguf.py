"""The organism's PyTorch model rebuilt from the shipped GGUF pair (the inverse of convert.py).

    python scripts/organism/from_gguf.py --out /tmp/organism-hf            # write an HF dir
    python scripts/organism/from_gguf.py --check                           # vs the stored ref

    model, tokenizer = hf_from_gguf(model_gguf, mmproj_gguf)               # from Python

The shipped f16 weights, read with ``gguf`` (pip install gguf), put back under transformers'
Qwen2-VL names: the text model one to one; the vision tower's q/k/v joined into ``qkv`` and the
two temporal halves of the patch embedding stacked again. The config and tokenizer come from
``common.py`` (the recipe builds both deterministically). Lets the PyTorch side of
``bench/torch_compare.py`` run on a fresh machine, on the very weights llama.cpp runs.
``--check`` compares the rebuilt model's logits with ``tests/data/organism_ref_logits.npy``
(those of the fp32 model before conversion): they differ only by f16 rounding.

Dev-only: torch, transformers, tokenizers, gguf.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from common import REPO, build_config, build_tokenizer, save_hf_dir

MODELS = REPO / "plugin" / "llama_steer" / "models"

# GGUF name (blk index as {i}) -> transformers name
TEXT = {
    "token_embd.weight": "model.language_model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "output_norm.weight": "model.language_model.norm.weight",
    "blk.{i}.attn_norm.weight": "model.language_model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.language_model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_output.weight": "model.language_model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.language_model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.language_model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.language_model.layers.{i}.mlp.down_proj.weight",
    **{
        f"blk.{{i}}.attn_{x}.{p}": f"model.language_model.layers.{{i}}.self_attn.{x}_proj.{p}"
        for x in "qkv"
        for p in ("weight", "bias")
    },
}
VISION = {
    "v.post_ln.{p}": "model.visual.merger.ln_q.{p}",
    "mm.0.{p}": "model.visual.merger.mlp.0.{p}",
    "mm.2.{p}": "model.visual.merger.mlp.2.{p}",
    "v.blk.{i}.ln1.{p}": "model.visual.blocks.{i}.norm1.{p}",
    "v.blk.{i}.ln2.{p}": "model.visual.blocks.{i}.norm2.{p}",
    "v.blk.{i}.attn_out.{p}": "model.visual.blocks.{i}.attn.proj.{p}",
    "v.blk.{i}.ffn_up.{p}": "model.visual.blocks.{i}.mlp.fc1.{p}",
    "v.blk.{i}.ffn_down.{p}": "model.visual.blocks.{i}.mlp.fc2.{p}",
}


def _tensors(path: Path) -> dict[str, np.ndarray]:
    import gguf

    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        if t.tensor_type not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
            raise ValueError(f"{path}: {t.name} is {t.tensor_type.name}; only f16/f32 are read")
        out[t.name] = np.array(t.data, dtype=np.float32).reshape(
            tuple(int(d) for d in reversed(t.shape))
        )
    return out


def _rename(name: str, table: dict[str, str]) -> str | None:
    parts = name.split(".")
    for src, dst in table.items():
        sp = src.split(".")
        if len(sp) != len(parts):
            continue
        vals = {}
        for a, b in zip(sp, parts, strict=True):
            if a in ("{i}", "{p}"):
                vals[a[1]] = b
            elif a != b:
                break
        else:
            return dst.format(**vals)
    return None


def _put(tensors: dict, table: dict, sd: dict, left: list) -> None:
    """Rename ``tensors`` into ``sd`` by ``table``; names it has no entry for go to ``left``."""
    for name, a in tensors.items():
        dst = _rename(name, table)
        if dst is None:
            left.append(name)
        else:
            sd[dst] = a


def state_dict_from_gguf(model_gguf: Path, mmproj_gguf: Path) -> dict[str, np.ndarray]:
    """transformers state dict (float32 arrays) of the GGUF pair."""
    sd, left = {}, []
    _put(_tensors(model_gguf), TEXT, sd, left)
    vis = _tensors(mmproj_gguf)
    pe0, pe1 = vis.pop("v.patch_embd.weight"), vis.pop("v.patch_embd.weight.1")
    sd["model.visual.patch_embed.proj.weight"] = np.stack([pe0, pe1], axis=2)  # [o, c, t, h, w]
    blocks = sorted({int(n.split(".")[2]) for n in vis if n.startswith("v.blk.")})
    for i in blocks:
        for p in ("weight", "bias"):
            sd[f"model.visual.blocks.{i}.attn.qkv.{p}"] = np.concatenate(
                [vis.pop(f"v.blk.{i}.attn_{x}.{p}") for x in "qkv"]
            )
    _put(vis, VISION, sd, left)
    if left:
        raise ValueError(f"GGUF tensors with no transformers name: {left}")
    return sd


def hf_from_gguf(model_gguf=MODELS / "organism-f16.gguf", mmproj_gguf=None):
    """(Qwen2VLForConditionalGeneration in fp32, eval mode; its tokenizer)."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    model_gguf = Path(model_gguf)
    mmproj_gguf = Path(mmproj_gguf or model_gguf.with_name("mmproj-" + model_gguf.name))
    tok = build_tokenizer()
    model = Qwen2VLForConditionalGeneration(build_config(tok))
    sd = {k: torch.from_numpy(v) for k, v in state_dict_from_gguf(model_gguf, mmproj_gguf).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval(), tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(MODELS / "organism-f16.gguf"))
    ap.add_argument("--mmproj", default=str(MODELS / "mmproj-organism-f16.gguf"))
    ap.add_argument("--out", help="write a Hugging Face directory here")
    ap.add_argument("--check", action="store_true", help="compare with tests/data's reference")
    args = ap.parse_args()
    model, tok = hf_from_gguf(args.model, args.mmproj)
    if args.out:
        save_hf_dir(model, tok, args.out)
        print("wrote", args.out)
    if args.check:
        import torch
        from PIL import Image
        from reference import QUESTION, torch_inputs

        data = REPO / "tests" / "data"
        ref = np.load(data / "organism_ref_logits.npy")
        inputs = torch_inputs(tok, Image.open(data / "organism_ref_strip.png"), QUESTION)
        meta = json.loads((data / "organism_ref.json").read_text())
        if inputs["input_ids"][0].tolist() != meta["prompt_token_ids"]:
            raise SystemExit("the tokenizer built here differs from the reference's")
        with torch.no_grad():
            got = model(**inputs).logits[0, -1].float().numpy()
        d = np.abs(got - ref).max()
        print(
            f"max |diff| {d:.4g} ({d / np.abs(ref).max():.2g} of max |logit|), "
            f"argmax {int(got.argmax())} vs {int(ref.argmax())}"
        )
        if got.argmax() != ref.argmax() or d > 0.05 * np.abs(ref).max():
            raise SystemExit("the rebuilt model does not match the reference")


if __name__ == "__main__":
    main()

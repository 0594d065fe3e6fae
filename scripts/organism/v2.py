"""Organism v2 (issue 17): a small Qwen3-VL (llama.cpp arch ``qwen3vl``, mmproj ``qwen3vl_merger``).

Shared pieces of the v2 recipe: model config, preprocessor, image patches in the geometry that
llama.cpp's mtmd feeds the model, training samples from ``llama_steer.comics``' v2 renderers.
Dev-only: needs torch and transformers (the package itself never does). The tokenizer, chat
template, special tokens and prompt layout are v1's (``common.py``).

What differs from v1 (``common.MODEL_SHAPE``):
- Qwen3-VL classes (``Qwen3VLForConditionalGeneration``): Qwen3 decoder (q/k RMSNorm), IMROPE
  (interleaved M-RoPE, ``mrope_section`` [6, 5, 5] of head_dim 32's 16 rotary pairs), a ViT
  with patch 16, spatial merge 2 (32-px image tokens), learned position embeddings
  interpolated to the grid, and deepstack: merged features of vision layers
  ``deepstack_visual_indexes`` added to the first decoder layers' hidden states at the image
  tokens.
- Images of any size: ``comics.mtmd_resize`` rounds each side to 32 px and pastes an
  aspect-preserving bicubic resize on black, exactly as mtmd's dyn-size preprocessor does, so
  the model trains on what llama.cpp will show it.
- Data: ``comics.make_strip_v2`` / ``make_scene_v2`` (layouts 1x6, 2x3, 3x2, 6x1, free panel
  sizes, styles) drawn by the TRAINING renderers only (``comics.TRAIN_RENDERERS``); the
  held-out renderer and sizes are refused here (``comics.check_training``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from common import CHAT_TEMPLATE, SPECIALS, comics, presence, text_fields

ARCH = "Qwen3VLForConditionalGeneration"
PATCH, MERGE, TPATCH = 16, 2, 2
TOKEN_PX = PATCH * MERGE  # 32
MEAN = np.array([0.5, 0.5, 0.5], np.float32)
STD = np.array([0.5, 0.5, 0.5], np.float32)
DEFAULT_OUT = Path(os.path.expanduser("~/.cache/llama-steer/organism-v2"))

# Sized for 2 CPU cores and the package's ~30 MB budget (f16: ~15 MB for the pair).
SHAPE = dict(
    hidden=256,
    layers=6,
    heads=8,
    kv_heads=2,
    head_dim=32,
    intermediate=768,
    rope_theta=10.0,  # small, so neighbouring panels differ in rotary phase (v1's lesson)
    mrope_section=[6, 5, 5],  # t, h, w rotary pairs, interleaved (IMROPE)
    vision_hidden=128,
    vision_depth=4,
    vision_heads=4,
    vision_intermediate=256,
    vision_pos=256,  # 16x16 learned position grid, interpolated
    deepstack=[1, 2],  # vision layers whose merged features feed decoder layers 0 and 1
)

PREPROCESSOR = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": MEAN.tolist(),
    "image_std": STD.tolist(),
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "processor_class": "Qwen3VLProcessor",
    "merge_size": MERGE,
    "patch_size": PATCH,
    "temporal_patch_size": TPATCH,
    "min_pixels": 8 * TOKEN_PX * TOKEN_PX,
    "max_pixels": 4096 * TOKEN_PX * TOKEN_PX,
    "resample": 3,
    "rescale_factor": 1 / 255,
}


def build_config(tokenizer, shape: dict = SHAPE):
    from transformers import Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    rope = {
        "rope_type": "default",
        "mrope_section": list(shape["mrope_section"]),
        "mrope_interleaved": True,
    }
    text = text_fields(tokenizer, shape, rope, head_dim=shape["head_dim"])
    vision = dict(
        depth=shape["vision_depth"],
        hidden_size=shape["vision_hidden"],
        intermediate_size=shape["vision_intermediate"],
        num_heads=shape["vision_heads"],
        in_channels=3,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TPATCH,
        num_position_embeddings=shape["vision_pos"],
        out_hidden_size=shape["hidden"],
        deepstack_visual_indexes=list(shape["deepstack"]),
    )
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def save_hf_dir(model, tokenizer, out: str | os.PathLike) -> None:
    """save_pretrained + the files the converter and HF processors want."""
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = [ARCH]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc.update(add_bos_token=False, add_eos_token=False, chat_template=CHAT_TEMPLATE)
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))


def patchify(img) -> tuple[np.ndarray, tuple[int, int, int]]:
    """mtmd's resize (sides to multiples of 32, bicubic, black pad), then HF's Qwen-VL patch
    layout (patch 16, temporal 2, merge-window-major)."""
    img = comics.mtmd_resize(img, TOKEN_PX)
    a = np.asarray(img, np.float32) / 255.0
    h, w, _ = a.shape
    a = ((a - MEAN) / STD).transpose(2, 0, 1)
    a = np.stack([a, a])
    gh, gw = h // PATCH, w // PATCH
    p = a.reshape(1, TPATCH, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    p = p.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(p.reshape(gh * gw, 3 * TPATCH * PATCH * PATCH)), (1, gh, gw)


def sample(
    seed: int,
    enc,
    renderers=comics.TRAIN_RENDERERS,
    sizes: str = "train",
    turns: int | None = None,
    task: str | None = None,
    weights: dict | None = None,
    strip_frac: float = 0.6,
    training: bool = True,
):
    """One training (or evaluation) sample: ids, labels, patches, per-token aux labels.

    ``training=True`` refuses held-out renderers and sizes. Renderer: ``comics.pick_renderer``
    (one per image, drawn from the seed independently of the layout; the description does not
    depend on it).
    """
    renderer = comics.pick_renderer(seed, renderers)
    if training:
        comics.check_training(renderer, sizes)
    rng = np.random.default_rng([seed, 55])
    if task is not None:
        ex = comics.make_example_v2(seed, task, renderer, sizes)
        desc, img, qa = ex.desc, ex.image, [(ex.question, ex.answer)]
    else:
        kind = "strip" if rng.random() < strip_frac else "scene"
        desc = comics.make_desc_v2(seed, kind, sizes)
        img = comics.render_v2(desc, renderer)
        n = turns or int(rng.integers(1, 4))
        qa = [(q, a) for _, q, a in comics.questions_for(desc, rng, n, weights)]
    pix, grid = patchify(img)
    lab = comics.token_labels_v2(desc, TOKEN_PX)
    gy, gx = lab.pop("grid")
    assert (gy * MERGE, gx * MERGE) == (grid[1], grid[2]), (lab, grid)
    ids, labels = enc.conversation(gy * gx, qa)
    query = []
    for q, _ in qa:
        m = re.fullmatch(r"Is there a (\w+) (\w+)\?", q)
        query.append((comics.COLOURS.index(m[1]), comics.SHAPES.index(m[2])) if m else (-100, -100))
    return dict(
        ids=ids, labels=labels, pix=pix, grid=grid, aux=lab, bag=presence(desc), query=query
    )

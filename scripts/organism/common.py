"""Shared pieces of the organism recipe: tokenizer, model config, prompt layout, image patches.

Dev-only: needs torch, transformers and tokenizers (the package itself never does).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def _load_comics():
    """llama_steer.comics if the package imports, else the module file itself (numpy + Pillow)."""
    try:
        from llama_steer import comics as mod

        return mod
    except ImportError:
        path = REPO / "plugin" / "llama_steer" / "comics.py"
        spec = importlib.util.spec_from_file_location("llama_steer_comics", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod


comics = _load_comics()

# Qwen2's pre-tokenizer split regex (llama.cpp's "qwen2" pre-tokenizer implements exactly this).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
SYSTEM = "You are a helpful assistant."

# Qwen2-VL's chat template (HF image parts become <|vision_start|><|image_pad|><|vision_end|>;
# llama-cpp-python's MTMD handler turns image parts into a text media marker that mtmd wraps
# in <|vision_start|> ... <|vision_end|> itself, so both give the same token layout).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
PATCH, MERGE, TPATCH = 14, 2, 2

# The shipped model's shape (see MODEL_CARD.md).
MODEL_SHAPE = dict(
    hidden=256,
    layers=6,
    heads=8,
    kv_heads=2,
    intermediate=768,
    rope_theta=10.0,
    mrope_section=[2, 7, 7],  # head_dim 32 -> 16 rotary pairs: t, h, w
    vision_embed=128,
    vision_depth=4,
    vision_heads=4,
    vision_mlp_ratio=2,
)


def corpus_lines() -> list[str]:
    """Every string the model sees or says, for training the BPE merges."""
    lines = [SYSTEM, "system", "user", "assistant", "\n"]
    for c in comics.COLOURS:
        for s in comics.SHAPES:
            lines += [f"a {c} {s}", f"Is there a {c} {s}?"]
    for k in range(1, 7):
        lines.append(f"What is in panel {k}?")
    lines += [f"What is in the {o} panel?" for o in comics.ORDINALS]
    lines += ["What is in this panel?", "Describe the strip.", "What objects are in the image?"]
    lines += [f"What is at the {r}?" for r in comics.REGIONS]
    rng = np.random.default_rng(0)
    for seed in range(200):
        lines.append(comics.describe(comics.make_strip(seed, "2x3")))
        lines.append(comics.describe(comics.make_scene(seed)))
        lines.append(["yes", "no"][int(rng.integers(2))])
    return lines


def build_tokenizer(vocab_size: int = 448):
    """Byte-level BPE with the Qwen2 split regex and the Qwen special tokens appended."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(corpus_lines() * 5, trainer=trainer)
    hf = Qwen2TokenizerFast(
        tokenizer_object=tok,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    hf.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    hf.add_special_tokens({"pad_token": "<|endoftext|>"})
    hf.chat_template = CHAT_TEMPLATE
    return hf


def text_fields(tokenizer, shape: dict, rope_scaling: dict, **extra) -> dict:
    """The decoder's config fields shared by v1 (Qwen2-VL) and v2 (Qwen3-VL): sizes from
    ``shape``, special token ids from ``tokenizer``; ``extra`` adds a version's own fields."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        **extra,
        max_position_embeddings=2048,
        rope_theta=shape["rope_theta"],
        rope_scaling=rope_scaling,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        use_cache=True,
    )


def build_config(tokenizer, shape: dict = MODEL_SHAPE):
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    rope = {"type": "mrope", "mrope_section": list(shape["mrope_section"])}
    text = text_fields(tokenizer, shape, rope)
    vision = dict(
        depth=shape["vision_depth"],
        embed_dim=shape["vision_embed"],
        hidden_size=shape["hidden"],
        mlp_ratio=shape["vision_mlp_ratio"],
        num_heads=shape["vision_heads"],
        in_channels=3,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TPATCH,
    )
    cfg = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    return cfg


PREPROCESSOR = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": MEAN.tolist(),
    "image_std": STD.tolist(),
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
    "merge_size": MERGE,
    "patch_size": PATCH,
    "temporal_patch_size": TPATCH,
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 1280,
    "resample": 3,
    "rescale_factor": 1 / 255,
}


def save_hf_dir(model, tokenizer, out: str | os.PathLike) -> None:
    """save_pretrained + the files the converter and HF processors want."""
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["Qwen2VLForConditionalGeneration"]  # 4.57 puts it in text_config only
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc.update(add_bos_token=False, add_eos_token=False, chat_template=CHAT_TEMPLATE)
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))


# ----------------------------------------------------------------------------- data to tensors


def patchify(img) -> tuple[np.ndarray, tuple[int, int, int]]:
    """HF Qwen2VLImageProcessor's layout for an image whose sides are multiples of 28."""
    a = np.asarray(img.convert("RGB"), np.float32) / 255.0
    h, w, _ = a.shape
    assert h % 28 == 0 and w % 28 == 0, (w, h)
    a = ((a - MEAN) / STD).transpose(2, 0, 1)  # C, H, W
    a = np.stack([a, a])  # temporal 2
    gh, gw = h // PATCH, w // PATCH
    p = a.reshape(1, TPATCH, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    p = p.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return p.reshape(gh * gw, 3 * TPATCH * PATCH * PATCH), (1, gh, gw)


class Encoder:
    """Token ids of the chat layout that llama-cpp-python's MTMD handler produces."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[str, list[int]] = {}
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def ids(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.tok.encode(text, add_special_tokens=False)
        return self.cache[text]

    def conversation(self, n_image_tokens: int, turns: list[tuple[str, str]]):
        """(input_ids, labels) for one image and (question, answer) turns; -100 off the answers."""
        head = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        ids = self.ids(head) + [self.image_pad] * n_image_tokens + self.ids("<|vision_end|>")
        labels = [-100] * len(ids)
        for i, (q, a) in enumerate(turns):
            pre = (
                ("" if i == 0 else "<|im_start|>user\n") + q + "<|im_end|>\n<|im_start|>assistant\n"
            )
            p = self.ids(pre)
            ans = self.ids(a) + [self.im_end]
            nl = self.ids("\n")
            ids += p + ans + nl
            labels += [-100] * len(p) + ans + [-100] * len(nl)
        return ids, labels

    def prompt(self, n_image_tokens: int, question: str) -> list[int]:
        head = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        tail = f"<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
        return self.ids(head) + [self.image_pad] * n_image_tokens + self.ids(tail)


def presence(desc) -> np.ndarray:
    """(7 + 6 + 42,) float32 multi-hot of a Strip's or Scene's objects: colours, shapes, and
    (colour, shape) pairs, colour-major."""
    things = [p.thing for p in desc.panels] if isinstance(desc, comics.Strip) else desc.things
    nc, ns = len(comics.COLOURS), len(comics.SHAPES)
    out = np.zeros(nc + ns + nc * ns, np.float32)
    for t in things:
        c, s = comics.COLOURS.index(t.colour), comics.SHAPES.index(t.shape)
        out[[c, nc + s, nc + ns + c * ns + s]] = 1
    return out

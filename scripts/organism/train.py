"""Train the organism on CPU: answer loss + training-only per-merged-token heads on the merger.

    python scripts/organism/train.py --out /tmp/organism --steps 3000          # fresh or resume
    python scripts/organism/train.py --out /tmp/organism --export-only         # write HF dir

State lives in OUT/ckpt.pt (model, optimiser, step, elapsed seconds; written every
--ckpt-every steps, atomically); the HF directory for conversion is OUT/hf. Data are drawn
on the fly from llama_steer.comics with seeds step*batch+i (Pillow renderer); held-out checks
use the NumPy renderer and seeds >= 10**9 (teacher-forced exact match == greedy exact match).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    Encoder,
    build_config,
    build_tokenizer,
    comics,
    patchify,
    presence,
    save_hf_dir,
)

CPU_FREE = "/tmp/llama-steer-cpu-free"
EVAL_SEED = 10**9


class AuxHeads(torch.nn.Module):
    """Per merged token: colour (8), shape (7), slot (11) classes. Never exported."""

    def __init__(self, hidden: int):
        super().__init__()
        self.colour = torch.nn.Linear(hidden, 1 + len(comics.COLOURS))
        self.shape = torch.nn.Linear(hidden, 1 + len(comics.SHAPES))
        self.slot = torch.nn.Linear(hidden, 11)
        # per answer: which of the 42 objects the image holds, read from a middle layer's hidden
        # state where the answer starts (a bag of objects gathered at the question)
        nc, ns = len(comics.COLOURS), len(comics.SHAPES)
        self.bag = torch.nn.Linear(hidden, nc + ns + nc * ns)
        # per yes/no answer: the colour and the shape the question asks about
        self.query = torch.nn.Linear(hidden, nc + ns)
        # per image token, from decoder hidden states (--token-weight): its own colour and shape.
        # Why: the gaze heads (layers 4-5) read values made from layers 3-4, where the causal
        # prefill had mixed earlier panels into each image token; steered narration then named
        # the target's shape with an earlier panel's colour (MODEL_CARD.md, Steering).
        self.tok_colour = torch.nn.Linear(hidden, 1 + nc)
        self.tok_shape = torch.nn.Linear(hidden, 1 + ns)

    def load(self, sd: dict) -> None:
        """Resume a checkpoint's heads; checkpoints from before the token heads lack only those
        (a new stage, --init, loads with strict=False: heads it lacks start fresh)."""
        missing, unexpected = self.load_state_dict(sd, strict=False)
        bad = [k for k in missing if not k.startswith("tok_")] + list(unexpected)
        if bad:
            raise SystemExit(f"checkpoint heads do not match AuxHeads: {bad}")


def augment(img, desc, rng: np.random.Generator):
    """Training-only domain randomisation of a Pillow render: border width and shade, blur.

    Why: the held-out renderer draws ~1.7-px antialiased dark-grey panel borders; a model that
    saw only Pillow's 1-px black ones named bordered panels "a ... cross" (describe 80% on the
    NumPy renderer, 100% on Pillow; borders removed or drawn 1 px wide: 100%).
    """
    from PIL import ImageDraw, ImageFilter

    img = img.copy()
    if isinstance(desc, comics.Strip):
        draw = ImageDraw.Draw(img)
        width = int(rng.integers(1, 4))
        shade = int(rng.integers(0, 71))
        for p in desc.panels:
            if p.border:
                x0, y0, x1, y1 = p.box
                draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(shade,) * 3, width=width)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.8))))
    return img


def make_sample(
    seed: int,
    enc: Encoder,
    renderer: str,
    turns: int | None,
    task: str | None,
    weights: dict | None = None,
    strip_frac: float = 0.6,
    scene_things: tuple[int, int] = (2, 4),
    augment_p: float = 0.0,
):
    rng = np.random.default_rng([seed, 5])
    if task is not None:
        ex = comics.make_example(seed, task, renderer)
        desc, img, qa = ex.desc, ex.image, [(ex.question, ex.answer)]
    else:
        u = rng.random()
        if u < strip_frac:
            desc = comics.make_strip(seed, "1x6" if u < strip_frac / 2 else "2x3")
        else:
            desc = comics.make_scene(seed, scene_things)
        img = comics.render(desc, renderer)
        n = turns or int(rng.integers(1, 4))
        qa = [(q, a) for _, q, a in comics.questions_for(desc, rng, n, weights)]
    if augment_p > 0 and rng.random() < augment_p:
        img = augment(img, desc, rng)
    pix, grid = patchify(img)
    n_tok = grid[1] * grid[2] // 4
    ids, labels = enc.conversation(n_tok, qa)
    lab = comics.token_labels(desc)
    query = []  # per turn: (colour, shape) index a yes/no question asks about, else -100
    for q, _ in qa:
        m = re.fullmatch(r"Is there a (\w+) (\w+)\?", q)
        query.append((comics.COLOURS.index(m[1]), comics.SHAPES.index(m[2])) if m else (-100, -100))
    return dict(
        ids=ids, labels=labels, pix=pix, grid=grid, aux=lab, bag=presence(desc), query=query
    )


def task_weights(specs: list[str], step: int) -> dict | None:
    """Parse --task-weight TASK=W[@STEP] entries active at ``step``."""
    out = {}
    for spec in specs:
        task, rest = spec.split("=")
        w, _, start = rest.partition("@")
        if step >= int(start or 0):
            out[task] = float(w)
    return out or None


def collate(samples, pad_id: int):
    n = max(len(s["ids"]) for s in samples)
    ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(samples), n), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s["ids"])] = torch.tensor(s["ids"])
        labels[i, : len(s["labels"])] = torch.tensor(s["labels"])
        mask[i, : len(s["ids"])] = 1
    pix = torch.from_numpy(np.concatenate([s["pix"] for s in samples]))
    grid = torch.tensor([s["grid"] for s in samples], dtype=torch.long)
    aux = {
        k: torch.from_numpy(np.concatenate([s["aux"][k] for s in samples]))
        for k in ("colour", "shape", "slot")
    }
    aux["bag"] = torch.from_numpy(np.stack([s["bag"] for s in samples]))
    # in the order of the first-answer positions (sample, then turn)
    aux["query"] = torch.tensor([q for s in samples for q in s["query"]], dtype=torch.long)
    return ids, labels, mask, pix, grid, aux


def forward(model, heads, batch, captured):
    ids, labels, mask, pix, grid, aux = batch
    out = model(
        input_ids=ids, attention_mask=mask, pixel_values=pix, image_grid_thw=grid, use_cache=False
    )
    logits = out.logits[:, :-1].float()
    tgt = labels[:, 1:]
    ans_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
    v = captured["v"]
    aux_loss = (
        F.cross_entropy(heads.colour(v), aux["colour"])
        + F.cross_entropy(heads.shape(v), aux["shape"])
        + 0.5 * F.cross_entropy(heads.slot(v), aux["slot"])
    )
    if "tok" in captured:  # per image token at the --token-layers (ids order = merger order)
        at = ids == captured["image_token_id"]
        for h in captured["tok"].values():
            x = h[at]
            aux_loss = aux_loss + captured["token_weight"] * (
                F.cross_entropy(heads.tok_colour(x), aux["colour"])
                + F.cross_entropy(heads.tok_shape(x), aux["shape"])
            )
    if "h" in captured:
        # positions whose next label is a turn's first answer token
        first = (labels[:, 1:] != -100) & (labels[:, :-1] == -100)
        b, t = first.nonzero(as_tuple=True)
        bag_logits = heads.bag(captured["h"][b, t])
        bag_loss = F.binary_cross_entropy_with_logits(bag_logits, aux["bag"][b])
        aux_loss = aux_loss + captured["bag_weight"] * bag_loss
        if torch.is_grad_enabled():  # training steps only, not held-out evals
            captured["bag_loss"] = captured.get("bag_loss", 0.0) + bag_loss.item()
        qy = aux["query"]
        if captured.get("query_weight") and (qy[:, 0] >= 0).any():
            ql = heads.query(captured["h"][b, t])
            nc = len(comics.COLOURS)
            q_loss = F.cross_entropy(ql[:, :nc], qy[:, 0]) + F.cross_entropy(ql[:, nc:], qy[:, 1])
            aux_loss = aux_loss + captured["query_weight"] * q_loss
    return ans_loss, aux_loss, logits, tgt


@torch.no_grad()
def capture(model, args) -> dict:
    """Forward hooks the training-only heads read (v1 and v2): "v" the merger's output (the
    tokens the LM receives), and with --bag-weight "h" the hidden states of --bag-layer."""
    captured = {}

    def out(o):  # a module's output tensor (decoder layers return a tuple)
        return o if torch.is_tensor(o) else o[0]

    def hook(_m, _i, o):
        captured["v"] = out(o)

    model.model.visual.register_forward_hook(hook)
    if args.bag_weight > 0:
        captured["bag_weight"] = args.bag_weight
        captured["query_weight"] = args.query_weight

        def hook_h(_m, _i, o):
            captured["h"] = out(o)

        model.model.language_model.layers[args.bag_layer].register_forward_hook(hook_h)
    if getattr(args, "token_weight", 0) > 0:
        captured["token_weight"] = args.token_weight
        captured["image_token_id"] = model.config.image_token_id
        captured["tok"] = {}
        layers = model.model.language_model.layers
        try:
            chosen = [int(x) for x in args.token_layers.split(",")]
        except ValueError:
            chosen = []
        if not chosen or any(not 0 <= i < len(layers) for i in chosen):
            raise SystemExit(
                f"--token-layers {args.token_layers!r}: give decoder layers 0-{len(layers) - 1}, "
                "comma-separated (e.g. 3,4)"
            )
        for layer in chosen:

            def hook_t(_m, _i, o, layer=layer):
                captured["tok"][layer] = out(o)

            layers[layer].register_forward_hook(hook_t)
    return captured


def train_step(model, heads, opt, params, batch, captured, aux_weight: float):
    """One optimiser step on the answer loss plus aux_weight x the training-only heads' loss
    (gradients clipped to norm 1): (answer loss, aux loss) as floats."""
    a_loss, x_loss, _, _ = forward(model, heads, batch, captured)
    loss = a_loss + aux_weight * x_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return a_loss.item(), x_loss.item()


class Progress:
    """The running means of the answer, aux and bag losses of a training loop (v1 and v2),
    printed as one line every 25 steps and reset.

        progress = Progress(lr_at, captured)
        progress.add(step, a_loss, x_loss, elapsed)   # after each optimiser step
    """

    def __init__(self, lr_at, captured: dict):
        self.lr_at, self.captured = lr_at, captured
        self.a = self.x = 0.0
        self.n = 0

    def add(self, step: int, a_loss: float, x_loss: float, elapsed: float) -> None:
        self.a += a_loss
        self.x += x_loss
        self.n += 1
        if step % 25 == 0:
            n = self.n
            print(
                f"step {step} lr {self.lr_at(step):.2e} ans {self.a / n:.4f} aux {self.x / n:.4f} "
                f"bag {self.captured.pop('bag_loss', 0) / n:.4f} {elapsed / 60:.1f} min",
                flush=True,
            )
            self.a = self.x = 0.0
            self.n = 0


def lr_schedule(args):
    """Linear warm-up, then cosine down to 5% of --lr at --steps."""

    def lr_at(s):
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        frac = min(1.0, (s - args.warmup) / max(1, args.steps - args.warmup))
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    return lr_at


def held_out(model, heads, enc, captured, per_task: int = 24) -> dict[str, float]:
    model.eval()
    res = {}
    for task in comics.TASKS:
        samples = [make_sample(EVAL_SEED + i, enc, "numpy", 1, task) for i in range(per_task)]
        batch = collate(samples, enc.pad)
        _, _, logits, tgt = forward(model, heads, batch, captured)
        ok = ((logits.argmax(-1) == tgt) | (tgt == -100)).all(-1)
        res[task] = ok.float().mean().item()
    model.train()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/organism")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--aux-weight", type=float, default=1.0)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-n", type=int, default=24, help="held-out samples per task")
    ap.add_argument("--threads", default="auto", help=f"int, or auto: 1 until {CPU_FREE} exists")
    ap.add_argument(
        "--task-weight",
        action="append",
        default=[],
        metavar="TASK=W[@STEP]",
        help="weight of a task among its kind's questions (default 1), from STEP on (default 0)",
    )
    ap.add_argument(
        "--scene-things",
        default="2-4",
        metavar="LO-HI",
        help="objects per training scene (held-out scenes keep 2-4)",
    )
    ap.add_argument("--strip-frac", type=float, default=0.6, help="share of strips (rest: scenes)")
    ap.add_argument(
        "--init",
        help="fine-tune: start from this checkpoint's weights with a fresh optimiser and "
        "schedule (ignored when OUT/ckpt.pt exists: that run is resumed)",
    )
    ap.add_argument(
        "--seed-offset", type=int, default=0, help="fine-tune: draw images the first run did not"
    )
    ap.add_argument(
        "--bag-weight",
        type=float,
        default=0.0,
        help="weight of the training-only bag-of-objects head (0: off)",
    )
    ap.add_argument("--bag-layer", type=int, default=3, help="decoder layer the bag head reads")
    ap.add_argument(
        "--query-weight",
        type=float,
        default=0.0,
        help="with --bag-weight: weight of a training-only head reading, at the same layer, "
        "the colour and shape a yes/no question asks about",
    )
    ap.add_argument(
        "--augment",
        type=float,
        default=0.0,
        metavar="P",
        help="share of training images given random border widths/shades and a slight blur",
    )
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--bench", type=int, default=0, help="time this many steps and stop")
    args = ap.parse_args()

    from transformers import Qwen2VLForConditionalGeneration

    scene_things = tuple(int(v) for v in args.scene_things.split("-"))
    threads = 1 if args.threads == "auto" else int(args.threads)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    cfg = build_config(tok)
    model = Qwen2VLForConditionalGeneration(cfg)
    heads = AuxHeads(cfg.text_config.hidden_size)
    params = list(model.parameters()) + list(heads.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    step, elapsed, log = 0, 0.0, []
    ck = out / "ckpt.pt"
    if ck.exists():
        state = torch.load(ck, weights_only=False)
        model.load_state_dict(state["model"])
        heads.load(state["heads"])
        opt.load_state_dict(state["opt"])
        step, elapsed, log = state["step"], state["elapsed"], state.get("log", [])
        print(f"resumed at step {step} ({elapsed / 60:.1f} min)", flush=True)
    elif args.init:
        state = torch.load(args.init, weights_only=False)
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"], strict=False)
        print(f"fine-tuning from {args.init} (its step {state['step']})", flush=True)
    if args.export_only:
        model.eval()
        save_hf_dir(model, tok, out / "hf")
        print("exported", out / "hf")
        return

    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M; vocab {len(tok)}", flush=True)
    enc = Encoder(tok)
    captured = capture(model, args)
    lr_at = lr_schedule(args)

    def save():
        tmp = out / "ckpt.tmp"
        torch.save(
            dict(
                model=model.state_dict(),
                heads=heads.state_dict(),
                opt=opt.state_dict(),
                step=step,
                elapsed=elapsed,
                log=log,
            ),
            tmp,
        )
        os.replace(tmp, ck)

    model.train()
    t_last = time.time()
    progress = Progress(lr_at, captured)
    while step < args.steps:
        if args.threads == "auto" and threads == 1 and os.path.exists(CPU_FREE):
            threads = 2
            torch.set_num_threads(2)
            print(f"step {step}: 2 threads", flush=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        weights = task_weights(args.task_weight, step)
        samples = [
            make_sample(
                step * args.batch + i + args.seed_offset,
                enc,
                "pillow",
                None,
                None,
                weights,
                args.strip_frac,
                scene_things,
                args.augment,
            )
            for i in range(args.batch)
        ]
        batch = collate(samples, enc.pad)
        a_loss, x_loss = train_step(model, heads, opt, params, batch, captured, args.aux_weight)
        step += 1
        now = time.time()
        elapsed += now - t_last
        t_last = now
        if args.bench and step >= args.bench:
            print(f"{elapsed / step:.3f} s/step", flush=True)
            return
        progress.add(step, a_loss, x_loss, elapsed)
        if step % args.eval_every == 0 or step == args.steps:
            res = held_out(model, heads, enc, captured, args.eval_n)
            log.append(dict(step=step, minutes=round(elapsed / 60, 2), **res))
            print("held-out", json.dumps(log[-1]), flush=True)
            t_last = time.time()
        if step % args.ckpt_every == 0 or step == args.steps:
            save()
            t_last = time.time()
    model.eval()
    save_hf_dir(model, tok, out / "hf")
    print("done; exported", out / "hf", flush=True)


if __name__ == "__main__":
    main()

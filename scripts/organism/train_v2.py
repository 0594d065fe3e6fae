"""Train organism v2 (Qwen3-VL architecture) in resumable stages, on CPU (or a GPU if given).

    python scripts/organism/train_v2.py --steps 20000                 # stage 1, fresh
    python scripts/organism/train_v2.py --steps 20000 --resume        # continue it
    python scripts/organism/train_v2.py --export-only                 # OUT/hf from OUT/ckpt.pt
    python scripts/organism/train_v2.py --out DIR2 --init OUT/ckpt.pt --steps 3000 ...  # new stage

State lives in OUT (default ~/.cache/llama-steer/organism-v2/): ckpt.pt (model, training-only
heads, optimiser, step, elapsed seconds, RNG states, eval log), written atomically every
--ckpt-minutes and when the run stops (--steps reached, --max-minutes spent, SIGTERM/SIGINT);
OUT/hf is the HF directory for scripts/organism/convert.py. A fresh run refuses to overwrite an
existing ckpt.pt (pass --resume, or another --out).

Loss (v1's lesson, shared/notes/model-organism.md): answer tokens of 1-3 question turns per
image, plus training-only linear heads on the merger output (colour, shape, slot of each 32-px
image token) and, optionally, the bag/query heads at a middle decoder layer. No loss on
attention. Training images: comics' v2 descriptions drawn by comics.TRAIN_RENDERERS only, at
training sizes; the held-out renderer ("sdf") and sizes appear only in the periodic held-out
check (teacher-forced exact match, never a gradient).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import v2
from common import Encoder, build_tokenizer, comics
from train import (
    AuxHeads,
    Progress,
    capture,
    collate,
    forward,
    lr_schedule,
    task_weights,
    train_step,
)

EVAL_SEED = 10**9  # training seeds stay below 10**8
_ENC = None  # the Encoder, inherited by forked data workers


def _sample(job):
    return v2.sample(*job[:1], _ENC, *job[1:])


class Batches:
    """Training batches for steps s, s+1, ...; with ``workers`` > 0 drawn ahead by a fork pool
    (for a GPU host's spare cores; the samples are the same either way)."""

    def __init__(self, args, renderers, workers: int):
        self.args, self.renderers = args, renderers
        self.pool = None
        self.pending = {}
        if workers > 0:
            import multiprocessing as mp

            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            self.pool = mp.get_context("fork").Pool(workers)

    def jobs(self, step):
        a = self.args
        weights = task_weights(a.task_weight, step)
        return [
            (
                step * a.batch + i + a.seed_offset,
                self.renderers,
                "train",
                None,
                None,
                weights,
                a.strip_frac,
            )
            for i in range(a.batch)
        ]

    def get(self, step):
        if self.pool is None:
            return [_sample(j) for j in self.jobs(step)]
        for s in range(step, step + 3):  # keep two batches in flight
            if s not in self.pending:
                self.pending[s] = self.pool.map_async(_sample, self.jobs(s))
        return self.pending.pop(step).get()


@torch.no_grad()
def held_out(model, heads, enc, captured, per_task: int, device) -> dict[str, float]:
    """Teacher-forced exact match per task: "train" = training renderers at training sizes
    (unseen seeds), "heldout" = the held-out renderer at held-out sizes; and, per set, the
    training-only merger heads' accuracy on the image tokens an object covers (colour, shape):
    whether the vision side reads that set."""
    model.eval()
    res = {}
    for name, renderers, sizes in [
        ("train", comics.TRAIN_RENDERERS, "train"),
        ("heldout", comics.HELDOUT_RENDERERS, "heldout"),
    ]:
        tally = {}
        for ti, task in enumerate(comics.TASKS):
            samples = [
                v2.sample(
                    EVAL_SEED + ti * 10**5 + i, enc, renderers, sizes, 1, task, training=False
                )
                for i in range(per_task)
            ]
            batch = to(collate(samples, enc.pad), device)
            _, _, logits, tgt = forward(model, heads, batch, captured)
            ok = ((logits.argmax(-1) == tgt) | (tgt == -100)).all(-1)
            res[f"{name}/{task}"] = round(ok.float().mean().item(), 3)
            v, aux = captured["v"], batch[5]
            at = batch[0] == model.config.image_token_id
            for k in ("colour", "shape"):  # the training-only heads, on object tokens
                on = aux[k] > 0
                reads = {"merger_" + k: getattr(heads, k)(v)}
                for layer, h in captured.get("tok", {}).items():
                    reads[f"layer{layer}_{k}"] = getattr(heads, "tok_" + k)(h[at])
                for name_k, lg in reads.items():
                    hit = lg.argmax(-1) == aux[k]
                    t = tally.setdefault(name_k, [0, 0])
                    t[0] += hit[on].sum().item()
                    t[1] += on.sum().item()
        for k, (hit, n) in tally.items():
            res[f"{name}/{k}"] = round(hit / max(1, n), 3)
    model.train()
    return res


def to(batch, device):
    if device == "cpu":
        return batch
    ids, labels, mask, pix, grid, aux = batch
    aux = {k: v.to(device) for k, v in aux.items()}
    return ids.to(device), labels.to(device), mask.to(device), pix.to(device), grid.to(device), aux


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(v2.DEFAULT_OUT))
    ap.add_argument("--resume", action="store_true", help="continue OUT/ckpt.pt")
    ap.add_argument("--steps", type=int, default=20000, help="length of the lr schedule")
    ap.add_argument("--max-minutes", type=float, default=0, help="stop (and checkpoint) after")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--aux-weight", type=float, default=1.0)
    ap.add_argument("--ckpt-minutes", type=float, default=5.0)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-n", type=int, default=16, help="held-out samples per task and set")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1-2 here)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU is lent")
    ap.add_argument(
        "--workers", type=int, default=0, help="data worker processes (0: inline; GPU hosts)"
    )
    ap.add_argument("--seed", type=int, default=0, help="init seed")
    ap.add_argument("--seed-offset", type=int, default=0, help="shift the training image seeds")
    ap.add_argument("--strip-frac", type=float, default=0.6)
    ap.add_argument("--task-weight", action="append", default=[], metavar="TASK=W[@STEP]")
    ap.add_argument("--bag-weight", type=float, default=0.0)
    ap.add_argument("--bag-layer", type=int, default=3)
    ap.add_argument("--query-weight", type=float, default=0.0)
    ap.add_argument(
        "--token-weight",
        type=float,
        default=0.0,
        help="weight of the per-image-token colour/shape heads on --token-layers' hidden states",
    )
    ap.add_argument("--token-layers", default="3,4", help="decoder layers (outputs) they read")
    ap.add_argument(
        "--renderers",
        default=",".join(comics.TRAIN_RENDERERS),
        help="training renderers (held-out ones are refused)",
    )
    ap.add_argument(
        "--init",
        help="a new stage from this checkpoint's weights (model + heads) with a fresh optimiser "
        "and schedule, into a fresh --out (use --seed-offset to draw new images)",
    )
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--bench", type=int, default=0, help="time this many steps and stop")
    args = ap.parse_args()

    from transformers import Qwen3VLForConditionalGeneration

    renderers = tuple(args.renderers.split(","))
    for r in renderers:
        comics.check_training(r)  # raises for the held-out renderer
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    cfg = v2.build_config(tok)
    model = Qwen3VLForConditionalGeneration(cfg)
    heads = AuxHeads(cfg.text_config.hidden_size)
    ck = out / "ckpt.pt"
    step, elapsed, log = 0, 0.0, []
    state = None
    if ck.exists():
        if not (args.resume or args.export_only):
            raise SystemExit(f"{ck} exists: pass --resume to continue it, or another --out")
        state = torch.load(ck, weights_only=False, map_location="cpu")
        model.load_state_dict(state["model"])
        heads.load(state["heads"])
        step, elapsed, log = state["step"], state["elapsed"], state.get("log", [])
    elif args.resume or args.export_only:
        raise SystemExit(f"no checkpoint at {ck}")
    elif args.init:
        init = torch.load(args.init, weights_only=False, map_location="cpu")
        model.load_state_dict(init["model"])
        heads.load_state_dict(init["heads"], strict=False)
        print(f"new stage from {args.init} (its step {init['step']})", flush=True)
    if args.export_only:
        model.eval()
        v2.save_hf_dir(model, tok, out / "hf")
        print(f"exported step {step} to", out / "hf")
        return

    model.to(args.device)
    heads.to(args.device)
    params = list(model.parameters()) + list(heads.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    if state is not None:
        opt.load_state_dict(state["opt"])
        rng = state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
        print(f"resumed {ck} at step {step} ({elapsed / 60:.1f} min)", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    n_vis = sum(p.numel() for p in model.model.visual.parameters())
    print(
        f"params {n_params / 1e6:.2f}M (vision {n_vis / 1e6:.2f}M); vocab {len(tok)}; "
        f"renderers {renderers}; held out {comics.HELDOUT_RENDERERS}",
        flush=True,
    )
    (out / "args.json").write_text(json.dumps(vars(args), indent=2))
    global _ENC
    enc = _ENC = Encoder(tok)
    batches = Batches(args, renderers, args.workers)
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
                shape=v2.SHAPE,
                rng=dict(
                    torch=torch.get_rng_state(),
                    numpy=np.random.get_state(),
                    python=random.getstate(),
                ),
            ),
            tmp,
        )
        os.replace(tmp, ck)
        print(f"checkpoint step {step} -> {ck}", flush=True)

    stop = {"now": False}

    def on_signal(signum, _frame):
        print(f"signal {signum}: checkpointing after this step", flush=True)
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    model.train()
    t_start = t_last = t_ckpt = time.time()
    progress = Progress(lr_at, captured)
    while step < args.steps and not stop["now"]:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        samples = batches.get(step)
        batch = to(collate(samples, enc.pad), args.device)
        a_loss, x_loss = train_step(model, heads, opt, params, batch, captured, args.aux_weight)
        step += 1
        now = time.time()
        elapsed += now - t_last
        t_last = now
        if args.bench and step >= args.bench:
            print(f"{(now - t_start) / args.bench:.3f} s/step", flush=True)
            return
        progress.add(step, a_loss, x_loss, elapsed)
        if step % args.eval_every == 0 or step == args.steps:
            res = held_out(model, heads, enc, captured, args.eval_n, args.device)
            log.append(dict(step=step, minutes=round(elapsed / 60, 2), **res))
            print("held-out", json.dumps(log[-1]), flush=True)
            t_last = time.time()
        if args.max_minutes and (time.time() - t_start) / 60 >= args.max_minutes:
            print(f"--max-minutes {args.max_minutes} reached", flush=True)
            break
        if (time.time() - t_ckpt) / 60 >= args.ckpt_minutes:
            save()
            t_ckpt = t_last = time.time()
    save()
    if step >= args.steps:
        model.eval()
        model.to("cpu")
        v2.save_hf_dir(model, tok, out / "hf")
        print("done; exported", out / "hf", flush=True)


if __name__ == "__main__":
    main()

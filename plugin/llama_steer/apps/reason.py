"""``llama-steer reason``: look, then reason. The VLM (default: the embedded one), steered to
the ROI, describes that region (and, unsteered, the whole image); a reasoning model answers the
question with its heads steered to the region's description through prompt and thinking.

    llama-steer reason --image strip.png --roi panel:3@2x3 -p "What colour is the object?" \\
                       --reasoner gemma.gguf [--reasoner-heads layers:4-11] [--gate 1.5] \\
                       [--show-attention]
    llama-steer reason --eval 60 --reasoner gemma.gguf     # held-out strips, every panel:
                                                           # steered vs unsteered vs gated

Prints the region's description, then the reasoner's answer as it streams; with
``--show-attention``, how much of the steered heads' attention went to the region's line per
generated token (mean). ``--eval N`` asks "What colour is the object?" with the ROI on each
panel of N held-out strips and reports how often the answer names the ROI panel's colour.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from llama_steer import Llama, Steering, comics
from llama_steer.apps.cli import CliError, add_model_args, check_gguf_file, load, resolve_model
from llama_steer.metrics import bootstrap_ci
from llama_steer.reason import look_then_reason

QUESTION = "What colour is the object?"


def colour_named(answer: str) -> str | None:
    """The first colour word of ``answer`` (the strips' vocabulary), or None."""
    words = re.findall(r"[a-z]+", answer.lower())
    return next((w for w in words if w in comics.COLOURS), None)


def _reasoner(args) -> Llama:
    check_gguf_file(args.reasoner, "--reasoner", projector=False)
    return Llama(
        model_path=args.reasoner,
        steering=Steering(heads=args.reasoner_heads),
        n_ctx=args.reasoner_ctx,
        n_threads=args.threads,
        verbose=args.verbose,
    )


def evaluate(vlm, reasoner, n: int, args) -> dict:
    """Accuracy (the answer names the ROI panel's colour) over every panel of ``n`` held-out
    strips, for: unsteered, steered, and gated steering (with tokens steered)."""
    settings = {
        "unsteered": dict(strength=0.0),
        "steered": dict(strength=args.strength),
        "gated": dict(strength=args.strength, gate=args.gate_eval),
    }
    hits: dict = {k: [] for k in settings}
    steered_tokens: dict = {k: [0, 0] for k in settings}
    regions_ok = []
    for i in range(n):
        # seeds no training used (--eval-seed 1: the set the defaults were chosen on)
        desc = comics.make_strip(8 * 10**9 + 10**6 * args.eval_seed + i, ("2x3", "1x6")[i % 2])
        img = comics.render(desc)
        rows, cols = comics.LAYOUTS[desc.layout]
        for k in range(1, 7):
            want = desc.panels[k - 1].thing.colour
            for name, kw in settings.items():
                res = look_then_reason(
                    vlm, reasoner, img, f"panel:{k}@{rows}x{cols}", QUESTION,
                    mode=args.mode, max_tokens=args.n_predict, **kw,
                )  # fmt: skip
                hits[name].append(float(colour_named(res.answer) == want))
                steered_tokens[name][0] += res.n_steered
                steered_tokens[name][1] += len(res.tokens)
            regions_ok.append(float(colour_named(res.region) == want))
    out = {"n": len(regions_ok), "vlm_region_colour": _ci(regions_ok)}
    for name in settings:
        s, t = steered_tokens[name]
        out[name] = {**_ci(hits[name]), "tokens_steered": s, "tokens": t}
    return out


def _ci(v) -> dict:
    mean, lo, hi = bootstrap_ci(v)
    return {"accuracy": mean, "ci95": [lo, hi]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="llama-steer reason",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--image", action="append", default=[])
    p.add_argument("--roi", help="the VLM's region (ROI grammar)")
    p.add_argument("-p", "--prompt", default=QUESTION, help="the question for the reasoner")
    p.add_argument("--reasoner", required=True, help="the reasoning model's GGUF (text)")
    p.add_argument("--reasoner-heads", default="all", help="all, layers:A-B, L3H5,... (0-based)")
    p.add_argument("--reasoner-ctx", type=int, default=2048)
    p.add_argument("--mode", default="emphasize", choices=["emphasize", "bias", "redirect"])
    p.add_argument("--strength", type=float, default=12.0, help="logit units (PASTA: 4.6)")
    p.add_argument("--gate", type=float, default=None, help="steer only above this entropy")
    p.add_argument("--schedule", default=None, help='strength per token: "0:8,20:4"')
    p.add_argument("--no-context", action="store_true", help="skip the whole-image description")
    p.add_argument("-n", "--n-predict", type=int, default=64)
    p.add_argument("--show-attention", action="store_true")
    p.add_argument("--eval", type=int, default=0, metavar="N", help="measure on N strips")
    p.add_argument("--gate-eval", type=float, default=2.0, help="--eval: the gated setting's gate")
    p.add_argument("--eval-seed", type=int, default=0, help="--eval: which held-out strips")
    args = p.parse_args(argv)
    schedule = None
    if args.schedule:
        try:
            schedule = [
                (int(a), float(b)) for a, b in (e.split(":") for e in args.schedule.split(","))
            ]
        except ValueError:
            raise CliError(f"--schedule {args.schedule!r}: write N:STRENGTH entries") from None
    if not args.eval and not (args.image and args.roi):
        raise CliError("give --image and --roi (or --eval N to measure on held-out strips)")
    model, mmproj = resolve_model(args)
    if not mmproj:
        raise CliError("the looking model needs --mmproj (the embedded VLM has one)")
    args.model, args.mmproj = model, mmproj
    image = args.image[:1]
    args.image = []  # cli.load checks its images; the turn sends ours
    reasoner = _reasoner(args)
    vlm, _ = load(args, Steering())
    try:
        if args.eval:
            print(json.dumps(evaluate(vlm, reasoner, args.eval, args), indent=1))
            return 0
        events = look_then_reason(
            vlm, reasoner, image[0], args.roi, args.prompt,
            context=not args.no_context, mode=args.mode, strength=args.strength,
            schedule=schedule, gate=args.gate, max_tokens=args.n_predict,
            observe=args.show_attention, stream=True,
        )  # fmt: skip
        stage = None
        for ev in events:
            if ev["stage"] != stage and ev["stage"] in ("region", "context", "reasoner"):
                stage = ev["stage"]
                label = {"region": "region", "context": "picture", "reasoner": "answer"}[stage]
                print(f"\n[{label}] ", end="", flush=True)
            if ev["stage"] == "done":
                res = ev["result"]
                print()
                if args.show_attention and res.attention:
                    att = [a for a in res.attention if a is not None]
                    print(
                        f"[attention] steered heads on the region line: mean "
                        f"{sum(att) / max(len(att), 1):.3f} over {len(att)} tokens; "
                        f"{res.n_steered} of {len(res.tokens)} tokens steered"
                    )
            else:
                print(ev["text"], end="", flush=True)
    finally:
        vlm.close()
        reasoner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

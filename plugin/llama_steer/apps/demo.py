"""``llama-steer demo``: the main job on the embedded model, offline, no arguments needed.

Draws a six-panel comic strip, asks the deliberately ambiguous "What is in this panel?"
(the model answers with panel 1 unless steered), then steers the same question to each
panel in turn and reports which panel each answer names. Writes a PNG of the strip with the
answers under it.

    llama-steer demo                       2x3 strip, seed 0, demo.png
    llama-steer demo --layout 1x6 --strip 3 --out /tmp/strip.png --strength 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llama_steer import comics

QUESTION = "What is in this panel?"


def which_panels(answer: str, strip: comics.Strip) -> list[int]:
    a = answer.strip().rstrip(".").lower()
    return [p.index for p in strip.panels if p.thing.name == a]


def picture(strip, img, rows: list[tuple[str, str, bool | None]], out: Path) -> None:
    from PIL import Image, ImageDraw

    scale = 2
    w, h = img.size
    line = 16
    canvas = Image.new("RGB", (w * scale, h * scale + line * (len(rows) + 1) + 8), "white")
    canvas.paste(img.resize((w * scale, h * scale), Image.NEAREST), (0, 0))
    d = ImageDraw.Draw(canvas)
    for p in strip.panels:
        x0, y0, _, _ = p.box
        d.text((x0 * scale + 4, y0 * scale + 2), str(p.index), fill="black")
    y = h * scale + 4
    for label, answer, ok in rows:
        mark = "" if ok is None else ("  [ok]" if ok else "  [miss]")
        colour = "black" if ok is None else ("darkgreen" if ok else "firebrick")
        d.text((6, y), f"{label}: {answer}{mark}", fill=colour)
        y += line
    canvas.save(out)


def main(argv: list[str] | None = None) -> int:
    from llama_steer import Steering
    from llama_steer.apps.cli import CliError, add_model_args, load, resolve_model, user_message

    p = argparse.ArgumentParser(
        prog="llama-steer demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--layout", default="2x3", choices=sorted(comics.LAYOUTS))
    p.add_argument("--strip", type=int, default=0, help="which strip to draw (a seed)")
    p.add_argument("--strength", type=float, default=None, help="default: the headmap's")
    p.add_argument("--headmap", help="default: the model's (the library picks it)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--out", default="demo.png")
    args = p.parse_args(argv)
    args.image = []  # cli.load checks images against --mmproj
    strip = comics.make_strip(10**9 + args.strip, args.layout)  # a seed no training used
    img = comics.render(strip)
    rows, cols = comics.LAYOUTS[args.layout]

    model, mmproj = resolve_model(args)
    if not mmproj:
        raise CliError("the demo needs a vision model: pass --mmproj with -m")
    args.model, args.mmproj = model, mmproj
    # unset choices (heads, strength, focus, ...) are the library's: the model's headmap
    steer = Steering(headmap=args.headmap, top_k=args.top_k, strength=0.0)
    llm, _ = load(args, steer)
    msgs = [user_message(QUESTION, [img])]

    def ask() -> str:
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=args.verbose):  # mtmd logs every image otherwise
            out = llm.create_chat_completion(msgs, max_tokens=12, temperature=0)
        return out["choices"][0]["message"]["content"].strip()

    try:
        print(f"strip {args.layout}, number {args.strip}:")
        for panel in strip.panels:
            print(f"  panel {panel.index}: {panel.thing.name}")
        base = ask()
        print(
            f'unsteered "{QUESTION}" -> {base}   (names panel {which_panels(base, strip) or "?"})'
        )
        table = [("unsteered", base, None)]
        hits = 0
        for k in range(1, 7):
            steer.update(roi=f"panel:{k}@{rows}x{cols}", strength=args.strength)
            if k == 1:
                r = steer.resolved
                hm = r.headmap
                heads = (
                    f"top {len(r.heads)} heads of {Path(hm.source or 'the headmap').name}"
                    if hm is not None and isinstance(r.heads, tuple)
                    else f"heads {r.describe_heads()} (no headmap for this model)"
                )
                focus = ", focus content" if steer.focus else ""
                print(f"steering: {r.mode}, strength {r.strength:g}{focus}, {heads}")
            ans = ask()
            named = which_panels(ans, strip)
            ok = k in named
            hits += ok
            print(
                f"  steered to panel {k} -> {ans:<22} names panel {named or '?'}"
                f"{'' if ok else '   (miss)'}"
            )
            table.append((f"panel {k}", ans, ok))
        print(f"{hits}/6 answers name the panel they were steered to")
        out = Path(args.out)
        picture(strip, img, table, out)
        print(f"wrote {out}")
    finally:
        llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

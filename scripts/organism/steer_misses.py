"""Where steered narration fails on organism v2: every miss, and the tally per layout and panel.

    OMP_WAIT_POLICY=passive python scripts/organism/steer_misses.py --n 100 2>/dev/null
    HEADS=all python scripts/organism/steer_misses.py --n 100 2>/dev/null   # every head
    python scripts/organism/steer_misses.py --base 6000000000 --n 60        # the CLI check's strips

Strips: ``comics.make_strip_v2(base + i, layout, "heldout")`` drawn by the held-out renderer,
layouts in turn; each panel 2..6 whose object differs from panel 1's is a target, steered by
its own pixel box with the embedded model's headmap (its heads, mode and strength). A miss
prints the answer and which panels hold the colour it said: a colour taken from a panel
*before* the target in reading order points at the image tokens' causal mixing in the
(unsteered) prefill, which no choice of decode-time heads undoes.
"""

from __future__ import annotations

import argparse
import collections
import os

from llama_cpp.llama_chat_format import MTMDChatHandler

from llama_steer import Llama, Steering, comics
from llama_steer.apps.evaluate import Evaluator, objects_in
from llama_steer.headmap import Headmap
from llama_steer.messages import embedded_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="strips")
    ap.add_argument("--base", type=int, default=7 * 10**9, help="first strip seed")
    ap.add_argument("--headmap", default="headmaps/organism-v2.json")
    ap.add_argument("--renderer", default="sdf")
    args = ap.parse_args()
    model, mmproj = embedded_model()
    llm = Llama(
        model_path=model,
        n_ctx=2048,
        n_threads=2,
        verbose=False,
        chat_handler=MTMDChatHandler(clip_model_path=mmproj, verbose=False),
        steering=Steering(strength=0.0),
    )
    hm = Headmap.load(args.headmap)
    rec = hm.recommended()
    heads = "all" if os.environ.get("HEADS") == "all" else hm.top(int(rec["top_k"]))
    ev = Evaluator(llm, float(rec["strength"]), mode=rec["mode"], renderer=args.renderer)
    by_layout, by_panel = collections.defaultdict(list), collections.defaultdict(list)
    earlier = later = 0
    for i in range(args.n):
        layout = list(comics.LAYOUTS_V2)[i % 4]
        desc = comics.make_strip_v2(args.base + i, layout, "heldout")
        img = ev.draw(desc)
        names = [p.thing.name for p in desc.panels]
        for t, ans in ev.steered_narrations(desc, img, heads):
            ok = objects_in(ans)[:1] == [names[t - 1]]
            by_layout[layout].append(ok)
            by_panel[t].append(ok)
            if not ok:
                said = ans.split()[1] if len(ans.split()) > 1 else ""
                src = [k + 1 for k, n in enumerate(names) if n.split()[1] == said and k + 1 != t]
                earlier += any(k < t for k in src)
                later += bool(src) and not any(k < t for k in src)
                print(
                    f"{layout} strip {i} target {t}: want {names[t - 1]!r}, said {ans!r}; "
                    f"that colour is in panels {src}"
                )
    total = [x for v in by_layout.values() for x in v]
    print(
        f"steered to the target: {sum(total)}/{len(total)} = {100 * sum(total) / len(total):.1f}%"
    )
    for k, v in sorted(by_layout.items()):
        print(f"  {k}: {sum(v)}/{len(v)}")
    for k, v in sorted(by_panel.items()):
        print(f"  panel {k}: {sum(v)}/{len(v)}")
    print(f"misses whose colour is in an earlier panel: {earlier}; only in later ones: {later}")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Steer the ambiguous question to every panel through the `llama-steer` CLI, as a shell user
# would, and count how often the answer names the target panel's object.
#
#   OMP_WAIT_POLICY=passive bash examples/cli_panels.sh [N_STRIPS] [extra llama-steer flags]
#
# Strips: the package's generator (held-out seeds from 6*10**9, layouts in turn 1x6, 2x3, 3x2,
# 6x1, panel sides in the band training never drew), drawn by the renderer training never saw
# (RENDERER=sdf; pillow and numpy are the training renderers) and written as PNGs; each
# panel has its own width and height, so the ROI is the panel's pixel box (--roi box:...).
# Model: the embedded organism; heads, strength, decode-only and focus: the model's headmap,
# which llama-steer picks by itself (HEADMAP=FILE passes --headmap FILE). One process per
# answer, so this also exercises start-up; about 0.5 s per answer on 2 cores.
set -euo pipefail
N=${1:-20}
shift || true
HEADMAP=${HEADMAP:-}
RENDERER=${RENDERER:-sdf}
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
python - "$N" "$DIR" "$RENDERER" <<'PY'
import sys
from llama_steer import comics
n, d, renderer = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with open(f"{d}/truth.tsv", "w") as f:
    for i in range(n):
        layout = list(comics.LAYOUTS_V2)[i % 4]
        strip = comics.make_strip_v2(6 * 10**9 + i, layout, "heldout")
        comics.render_v2(strip, renderer).save(f"{d}/{i}.png")
        names = [p.thing.name for p in strip.panels]
        for p in strip.panels[1:]:
            if p.thing.name != names[0]:  # same object as panel 1: a steer could not show
                f.write(f"{i}\tbox:{','.join(map(str, p.box))}\t{p.thing.name}\n")
PY
ok=0
total=0
while IFS=$'\t' read -r i roi want; do
    got=$(llama-steer --image "$DIR/$i.png" -p "What is in this panel?" -n 8 -t 2 \
        ${HEADMAP:+--headmap "$HEADMAP"} --roi "$roi" "$@" 2>/dev/null)
    total=$((total + 1))
    if [[ "$got" == "$want"* ]]; then ok=$((ok + 1)); else echo "strip $i $roi: wanted '$want', got '$got'"; fi
done <"$DIR/truth.tsv"
echo "steered to the target panel: $ok / $total"

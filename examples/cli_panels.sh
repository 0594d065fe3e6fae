#!/usr/bin/env bash
# Steer the ambiguous question to every panel through the `llama-steer` CLI, as a shell user
# would, and count how often the answer names the target panel's object.
#
#   OMP_WAIT_POLICY=passive bash examples/cli_panels.sh [N_STRIPS] [extra llama-steer flags]
#
# Strips: the package's generator (held-out seeds from 6*10**9, layouts alternating 2x3 / 1x6),
# written as PNGs; model: the embedded organism; heads, strength, decode-only and focus: the
# model's headmap, which llama-steer picks by itself (HEADMAP=FILE passes --headmap FILE). One
# process per answer, so this also exercises start-up; about 0.5 s per answer on 2 cores.
set -euo pipefail
N=${1:-20}
shift || true
HEADMAP=${HEADMAP:-}
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
python - "$N" "$DIR" <<'PY'
import sys
from llama_steer import comics
n, d = int(sys.argv[1]), sys.argv[2]
with open(f"{d}/truth.tsv", "w") as f:
    for i in range(n):
        layout = ("2x3", "1x6")[i % 2]
        strip = comics.make_strip(6 * 10**9 + i, layout)
        comics.render(strip).save(f"{d}/{i}.png")
        rows, cols = comics.LAYOUTS[layout]
        names = [p.thing.name for p in strip.panels]
        for k in range(2, 7):
            if names[k - 1] != names[0]:  # same object as panel 1: a steer could not show
                f.write(f"{i}\tpanel:{k}@{rows}x{cols}\t{names[k - 1]}\n")
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

#!/usr/bin/env python
"""Convert head rankings into a llama-steer headmap (a thin wrapper over
llama_steer.headmap.convert).

    python scripts/convert_headmap.py ranking.json -o headmaps/qwen3vl-8b.json --model m.gguf
    python scripts/convert_headmap.py scores.npy --model model.gguf -o out.json
    python scripts/convert_headmap.py heads.csv --model model.gguf --top-k 20 -o out.json
    python scripts/convert_headmap.py "heads.txt" --model m.gguf -o out.json     # L20H3 L21H7 ...
    python scripts/convert_headmap.py a.json --merge b.json -o merged.json

Inputs: the gaze-heads code's ranking JSON (a list of {layer, head, score}), CSV with a
layer,head[,score] header, TransformerLens-style names (L20H3, ranked best first), a .npy
score matrix (layers x heads), or a llama-steer headmap (to re-target, trim or merge).
--model re-targets the map to a GGUF: its n_layer/n_head are checked against every head.
"""

import argparse
import sys

from llama_steer.headmap import HeadmapError, convert


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("source")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--model", help="the GGUF the heads belong to")
    p.add_argument("--top-k", type=int, help="keep the best K heads")
    p.add_argument("--merge", help="a second map to average with (scores normalised by each max)")
    args = p.parse_args(argv)
    try:
        hm = convert(args.source, model=args.model, top_k=args.top_k, merge=args.merge)
    except HeadmapError as e:
        print(f"convert_headmap: error: {e}", file=sys.stderr)
        return 2
    hm.save(args.out)
    print(
        f"wrote {args.out}: {len(hm.heads)} heads for {hm.model.architecture} "
        f"({hm.model.n_layer} x {hm.model.n_head}); best {hm.top(min(3, len(hm.heads)))}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

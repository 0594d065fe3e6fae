#!/usr/bin/env python
"""Convert head rankings into a llama-steer headmap (a thin wrapper over
llama_steer.headmap.convert).

    python scripts/convert_headmap.py ranking.json -o headmaps/qwen3vl-8b.json --model m.gguf
    python scripts/convert_headmap.py scores.npy --model model.gguf -o out.json
    python scripts/convert_headmap.py heads.csv --model model.gguf --top-k 20 -o out.json
    python scripts/convert_headmap.py "heads.txt" --model m.gguf -o out.json     # L20H3 L21H7 ...
    python scripts/convert_headmap.py a.json --merge b.json -o merged.json
    python scripts/convert_headmap.py ranking.json -o headmaps/qwen3vl-2b.json \\
        --arch qwen3vl --n-layer 28 --n-head 16 --n-head-kv 8 --name "Qwen3-VL-2B-Instruct" \\
        --method "gaze heads" --source "https://github.com/..."     # no GGUF at hand

Inputs: the gaze-heads code's ranking JSON (a list of {layer, head, score}), CSV with a
layer,head[,score] header, TransformerLens-style names (L20H3, ranked best first), a .npy
score matrix (layers x heads), or a llama-steer headmap (to re-target, trim or merge).
--model re-targets the map to a GGUF: its n_layer/n_head are checked against every head.
Without the GGUF, --arch/--n-layer/--n-head/--n-head-kv (and --name) give the model's shape:
every head is checked against it and the map, having no fingerprint, matches any GGUF of that
architecture and shape. --method and --source are recorded in the map's method block.
Exit status 0 on success, 2 on bad input (the message names the fix).
"""

import argparse
import sys
from pathlib import Path

from llama_steer.headmap import HeadmapError, ModelIdentity, convert

SHAPE_FLAGS = ("arch", "n_layer", "n_head", "n_head_kv")


def identity(args) -> ModelIdentity | None:
    """The model the heads belong to, from the shape flags (None when none is given)."""
    given = [f for f in (*SHAPE_FLAGS, "name") if getattr(args, f) is not None]
    if not given:
        return None
    if args.model:
        raise HeadmapError(
            "--model reads the shape from the GGUF: drop "
            + ", ".join("--" + f.replace("_", "-") for f in given)
        )
    missing = [f for f in SHAPE_FLAGS if getattr(args, f) is None]
    if missing:
        raise HeadmapError(
            "a model without its GGUF needs all of --arch, --n-layer, --n-head, --n-head-kv: "
            "add " + ", ".join("--" + f.replace("_", "-") for f in missing)
        )
    for f in ("n_layer", "n_head", "n_head_kv"):
        if getattr(args, f) <= 0:
            raise HeadmapError(f"--{f.replace('_', '-')} {getattr(args, f)}: must be >= 1")
    if args.n_head % args.n_head_kv:
        raise HeadmapError(
            f"--n-head {args.n_head} is not a multiple of --n-head-kv {args.n_head_kv}: "
            "check the model's config (num_attention_heads, num_key_value_heads)"
        )
    # no fingerprint: the map matches models by architecture and shape
    return ModelIdentity(
        args.arch, args.n_layer, args.n_head, args.n_head_kv, None, args.name or ""
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("ranking", metavar="source", help="the ranking or headmap to convert")
    p.add_argument("-o", "--out", required=True, help="the headmap to write (folders are made)")
    p.add_argument("--model", help="the GGUF the heads belong to")
    p.add_argument("--top-k", type=int, help="keep the best K heads")
    p.add_argument("--merge", help="a second map to average with (scores normalised by each max)")
    g = p.add_argument_group("a model without its GGUF (instead of --model)")
    g.add_argument("--arch", help="GGUF architecture name, e.g. qwen3vl, qwen2vl, gemma3, llama")
    g.add_argument("--n-layer", type=int, help="transformer blocks (num_hidden_layers)")
    g.add_argument("--n-head", type=int, help="query heads per layer (num_attention_heads)")
    g.add_argument("--n-head-kv", type=int, help="key/value heads (num_key_value_heads)")
    g.add_argument("--name", help='the model\'s name, e.g. "Qwen3-VL-2B-Instruct"')
    g = p.add_argument_group("attribution (recorded in the map's method block)")
    g.add_argument("--method", help='how the heads were found, e.g. "gaze heads"')
    g.add_argument("--source", help="where the ranking comes from (paper, repository, URL)")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        if out.is_dir():
            raise HeadmapError(f"-o {out} is a folder: give the file to write, e.g. {out}/map.json")
        method = {k: getattr(args, k) for k in ("method", "source") if getattr(args, k)}
        if "method" in method:
            method["name"] = method.pop("method")
        ident = identity(args)  # first: it refuses shape flags given with --model
        hm = convert(
            args.ranking,
            model=args.model or ident,
            top_k=args.top_k,
            merge=args.merge,
            method=method,
        )
        made = not out.parent.exists()
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            hm.save(out)
        except OSError as e:
            raise HeadmapError(
                f"cannot write -o {out}: {e.strerror}: pick a writable path"
            ) from None
    except HeadmapError as e:
        print(f"convert_headmap: error: {e}", file=sys.stderr)
        return 2
    m = hm.model
    print(
        f"wrote {out}{' (made its folder)' if made else ''}: {len(hm.heads)} heads for "
        f"{m.name or m.architecture} ({m.architecture}, {m.n_layer} x {m.n_head}"
        f"{'' if m.fingerprint else ', matched by shape: no GGUF fingerprint'}); "
        f"best {hm.top(min(3, len(hm.heads)))}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

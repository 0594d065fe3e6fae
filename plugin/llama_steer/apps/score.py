"""Gaze-head discovery: which attention heads look at the panel the model is asked about.

    StripPrompter ..... one strip: the chat prefix (system + image) evaluated once, each
                        question branched from it (or, to check, evaluated from scratch)
    score_strips() .... per head, the raw attention mass the query positions put on every
                        panel, for every asked panel: sums (n_queries, L, H, 6 asked, 6 seen)
    GazeScores ........ gaze score (mean diagonal mass), selectivity (diagonal / expected
                        share; diagonal - mean off-diagonal), ranking, Headmap
    strips_from_dir() . the public comic layout DIR/<strip>/p1.png ... p6.png, stitched
    main() ............ ``llama-steer score``

Query positions (``queries``): "last" = the last prompt token (the paper's protocol);
"answer:N" = the first N tokens of the expected answer, teacher-forced (for a model whose
answer starts with a content-free token, like "a ..."). Masses are post-softmax attention
summed over each panel's image tokens, not renormalised: a head that ignores the image scores
about 0. Attention is read by the native observer (kq_soft_max-<il>), which keeps only the
per-panel sums.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llama_steer import _mtmd, comics
from llama_steer._errors import SteeringError
from llama_steer.roi import Box, Panel

QUESTION = "What is in panel {k}?"


def parse_queries(spec: str) -> list[str]:
    out = []
    for q in spec.split(","):
        q = q.strip()
        if q == "last" or (q.startswith("answer:") and q[7:].isdigit() and int(q[7:]) > 0):
            out.append(q)
        else:
            raise SteeringError(f"query positions {q!r}: use last or answer:N (N >= 1)")
    return out


class StripPrompter:
    """Evaluates "<image> What is in panel k?" prompts of one strip on a steering Llama whose
    chat handler is an mtmd handler (its mtmd module is watched by llama_steer.Llama)."""

    def __init__(self, llm, handler):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm, self.h = llm, handler
        handler._init_mtmd_context(llm)
        self.mt = handler._mtmd_cpp  # the watch: records the image layout
        self.marker = self.mt.mtmd_default_marker().decode()
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[Jinja2ChatFormatter.IgnoreGenerationTags, jinja2.ext.loopcontrols],
        )
        env.filters["tojson"] = Jinja2ChatFormatter.tojson
        self.template = env.from_string(handler._get_chat_template(llm))

    def quiet(self):
        """mtmd logs every chunk on stderr; keep it for --verbose only."""
        from llama_cpp._utils import suppress_stdout_stderr

        return suppress_stdout_stderr(disable=self.llm.verbose)

    def text(self, question: str) -> str:
        msgs = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "image"}},
                    {"type": "text", "text": question},
                ],
            }
        ]
        return self.template.render(
            messages=self.h._get_template_messages(msgs, self.marker),
            add_generation_prompt=True,
            eos_token="",
            bos_token="",
            raise_exception=lambda m: (_ for _ in ()).throw(ValueError(m)),
        )

    def chunks(self, bitmap, question: str) -> list:
        """Tokenize the prompt of ``question``: [("text", tokens) | ("image", chunk)], and the
        handle to free."""
        mt = self.mt
        t = mt.mtmd_input_text()
        raw = self.text(question).encode()
        t.text, t.text_len, t.add_special, t.parse_special = raw, len(raw), True, True
        chunks = mt.mtmd_input_chunks_init()
        arr = (mt.mtmd_bitmap_p_ctypes * 1)(bitmap)
        with self.quiet():
            rc = mt.mtmd_tokenize(self.h.mtmd_ctx, chunks, ctypes.byref(t), arr, 1)
        if rc != 0:
            mt.mtmd_input_chunks_free(chunks)
            raise RuntimeError("mtmd_tokenize failed")
        return _mtmd.walk(mt, chunks), chunks

    def eval_chunks(self, items) -> None:
        import llama_cpp

        llm = self.llm
        for kind, x in items:
            if kind == "text":
                llm.eval(x)
                continue
            new = llama_cpp.llama_pos(0)
            with self.quiet():
                rc = self.mt.mtmd_helper_eval_chunk_single(
                    self.h.mtmd_ctx,
                    llm._ctx.ctx,
                    x,
                    llama_cpp.llama_pos(llm.n_tokens),
                    llama_cpp.llama_seq_id(0),
                    llm.n_batch,
                    False,
                    ctypes.byref(new),
                )
            if rc != 0:
                raise RuntimeError(f"image chunk evaluation failed ({rc})")
            llm.n_tokens = new.value


@dataclass
class GazeSums:
    """Attention mass sums: mass[q, l, h, k, r] = mass that query mode q's rows put on panel
    r's tokens when panel k was asked, summed over strips; rows[q] rows per (strip, k)."""

    queries: list[str]
    mass: np.ndarray  # float64 (Q, L, H, 6, 6)
    n_strips: int = 0

    def matrix(self, q: int = 0) -> np.ndarray:
        """(L, H, 6, 6) mean mass per asked panel (row) and attended panel (column)."""
        return self.mass[q] / max(self.n_strips, 1)

    def gaze(self, q: int = 0) -> np.ndarray:
        """(L, H) mean diagonal mass: attention on the asked panel."""
        m = self.matrix(q)
        return np.trace(m, axis1=-2, axis2=-1) / 6

    def selectivity(self, q: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(ratio, difference), each (L, H): diagonal over the expected share (image mass / 6),
        and diagonal minus the mean off-diagonal."""
        m = self.matrix(q)
        diag = np.trace(m, axis1=-2, axis2=-1) / 6
        image = m.sum(axis=(-1, -2)) / 6  # mean total image mass per asked panel
        off = (m.sum(axis=(-1, -2)) - diag * 6) / 30
        ratio = np.divide(diag, image / 6, out=np.zeros_like(diag), where=image > 1e-9)
        return ratio, diag - off


def strips_from_dir(root: str | Path) -> list[tuple[str, object]]:
    """(name, PIL image) for DIR/<strip>/p1.png ... p6.png, panels stitched left to right at
    a common height (the layout of the gaze-heads paper's released strips)."""
    from PIL import Image

    out = []
    for d in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        files = [d / f"p{i}.png" for i in range(1, 7)]
        if not all(f.exists() for f in files):
            raise SteeringError(f"{d}: a strip folder needs p1.png ... p6.png")
        panels = [Image.open(f).convert("RGB") for f in files]
        h = min(p.height for p in panels)
        panels = [p.resize((max(1, round(p.width * h / p.height)), h)) for p in panels]
        strip = Image.new("RGB", (sum(p.width for p in panels), h))
        x = 0
        for p in panels:
            strip.paste(p, (x, 0))
            x += p.width
        out.append((d.name, strip))
    if not out:
        raise SteeringError(f"{root}: no strip folders (DIR/<strip>/p1.png ... p6.png)")
    return out


def score_strip(
    prompter: StripPrompter,
    img,
    layout: str | tuple,
    queries: list[str],
    answers: list[str] | None = None,
    prompt: str = QUESTION,
    shared_prefix: bool = True,
    regions: list | None = None,
) -> np.ndarray:
    """(Q, L, H, 6, 6) masses for one strip. ``layout``: "1x6" / "2x3" or (rows, cols), an
    equal grid, unless ``regions`` gives the six panels' own ROIs (e.g. ``Box`` each);
    ``answers``: the expected answer per panel (needed for answer:N queries)."""
    llm, st = prompter.llm, prompter.llm.steering
    L, H = st.mask.shape
    if regions is None:
        rows, cols = comics.LAYOUTS_V2[layout] if isinstance(layout, str) else layout
        regions = [Panel(r, grid=(rows, cols)) for r in range(1, 7)]
    panels = list(regions)
    out = np.zeros((len(queries), L, H, 6, 6))
    with prompter.quiet():
        bitmap = prompter.h._create_bitmap_from_bytes(comics.png_bytes(img))
    held = []
    try:
        prefix_end = None
        for k in range(1, 7):
            items, handle = prompter.chunks(bitmap, prompt.format(k=k))
            held.append(handle)
            img_at = next(i for i, (kind, _) in enumerate(items) if kind == "image")
            if shared_prefix and prefix_end is not None:
                llm.n_tokens = prefix_end
                llm._ctx.kv_cache_seq_rm(-1, prefix_end, -1)
            else:
                llm.reset()
                llm._ctx.kv_cache_clear()
                prompter.eval_chunks(items[: img_at + 1])
                prefix_end = llm.n_tokens
            question = [t for kind, x in items[img_at + 1 :] if kind == "text" for t in x]
            n_q = max((int(q[7:]) for q in queries if q != "last"), default=0)
            answer = []
            if n_q:
                if answers is None:
                    raise SteeringError("answer:N query positions need the expected answers")
                answer = llm.tokenize(answers[k - 1].encode(), add_bos=False, special=False)[:n_q]
            for qi, q in enumerate(queries):
                # panels resolved against the evaluated prefix (the image): one region each
                if q == "last":
                    with st.observe(panels, rows="last") as obs:
                        llm.eval(question)
                        mass, n_rows = obs.read(reset=True)
                    llm.n_tokens -= len(question)
                    llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
                else:
                    n = int(q[7:])
                    llm.eval(question)
                    with st.observe(panels, rows="all") as obs:
                        llm.eval(answer[:n])
                        mass, n_rows = obs.read(reset=True)
                    llm.n_tokens -= len(question) + len(answer[:n])
                    llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
                out[qi, :, :, k - 1, :] = mass / np.maximum(n_rows, 1)[:, None, None]
    finally:
        for handle in held:
            prompter.mt.mtmd_input_chunks_free(handle)
        prompter.mt.mtmd_bitmap_free(bitmap)
    return out


def to_headmap(
    sums: GazeSums,
    model_path: str,
    rank: str = "gaze",
    q: int = 0,
    method: dict | None = None,
    top_k: int = 10,
    strength: float = 8.0,
    mode: str = "redirect",
):
    from llama_steer.headmap import Headmap, HeadScore, ModelIdentity

    scores = {
        "gaze": sums.gaze(q),
        "ratio": sums.selectivity(q)[0],
        "diff": sums.selectivity(q)[1],
    }[rank]
    L, H = scores.shape
    order = np.argsort(-scores, axis=None, kind="stable")
    heads = [HeadScore(int(i // H), int(i % H), float(scores.flat[i])) for i in order]
    return Headmap(
        model=ModelIdentity.of_gguf(model_path),
        heads=heads,
        method=dict(
            method or {}, name="gaze", rank_by=rank, queries=sums.queries[q], n_strips=sums.n_strips
        ),
        scores=scores.tolist(),
        defaults={"top_k": top_k, "mode": mode, "strength": strength, "decode_only": True},
    )


def _colour(v: float) -> tuple[int, int, int]:
    """0..1 -> a dark-blue-to-yellow ramp."""
    v = float(np.clip(v, 0, 1))
    stops = [(0.0, (20, 20, 60)), (0.5, (40, 150, 140)), (1.0, (250, 230, 60))]
    for (a, ca), (b, cb) in zip(stops, stops[1:], strict=False):
        if v <= b:
            t = (v - a) / (b - a)
            return tuple(int(x + (y - x) * t) for x, y in zip(ca, cb, strict=False))
    return stops[-1][1]


def heatmap_png(
    values: np.ndarray, path: Path, title: str, row: str, col: str, cell: int = 28
) -> None:
    """A labelled heatmap of a 2-D array (rows x columns), scaled to its maximum."""
    from PIL import Image, ImageDraw

    v = np.asarray(values, dtype=float)
    top = v.max() if v.max() > 0 else 1.0
    R, C = v.shape
    left, head = 40, 34
    img = Image.new("RGB", (left + C * cell + 8, head + R * cell + 8), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 2), f"{title} (max {top:.3f})", fill="black")
    d.text((left, 18), f"{col} ->", fill="black")
    for c in range(C):
        d.text((left + c * cell + cell // 3, head - 12), str(c), fill="black")
    for r in range(R):
        d.text((4, head + r * cell + cell // 3), f"{row}{r}", fill="black")
        for c in range(C):
            x, y = left + c * cell, head + r * cell
            d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=_colour(v[r, c] / top))
    img.save(path)


def write_pictures(sums: GazeSums, out_dir: Path, q: int = 0, n_top: int = 4) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("top*_L*H*_panels.png"):  # an earlier run's heads
        old.unlink()
    paths = [out_dir / "gaze_heatmap.png"]
    heatmap_png(sums.gaze(q), paths[0], f"gaze score ({sums.queries[q]})", "L", "head")
    g = sums.gaze(q)
    H = g.shape[1]
    for rank, i in enumerate(np.argsort(-g, axis=None)[:n_top], 1):
        layer, head = int(i // H), int(i % H)
        p = out_dir / f"top{rank}_L{layer}H{head}_panels.png"
        heatmap_png(
            sums.matrix(q)[layer, head],
            p,
            f"L{layer}H{head}: asked (row) x seen",
            "k",
            "panel",
            cell=36,
        )
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    """llama-steer score: find gaze heads, write a headmap."""
    from llama_steer.apps.cli import CliError, add_model_args, load, resolve_model
    from llama_steer.steering import Steering

    p = argparse.ArgumentParser(
        prog="llama-steer score",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument(
        "--comics",
        default="generated",
        help="'generated' (the package's strips) or DIR/<strip>/p1.png..p6.png",
    )
    p.add_argument(
        "--layout",
        default="2x3",
        choices=[*sorted(comics.LAYOUTS_V2), "all"],
        help="layout of generated strips, all: 1x6, 2x3, 3x2, 6x1 in turn (folders are "
        "stitched 1x6)",
    )
    p.add_argument(
        "--renderer",
        default="pillow",
        choices=[*comics.RENDERERS_V2, "v1"],
        help="drawing code of generated strips (v1: organism v1's, 1x6 and 2x3 only)",
    )
    p.add_argument("--sizes", default="train", choices=comics.SIZES, help="their panel sides")
    p.add_argument("--n-samples", type=int, default=100)
    p.add_argument(
        "--queries",
        default="answer:2,last",
        help="query positions to score, compared in the report; the first ranks",
    )
    p.add_argument("--rank-by", default="gaze", choices=["gaze", "ratio", "diff"])
    p.add_argument("--prompt", default=QUESTION, help="question template with {k}")
    p.add_argument("--top-k", type=int, default=10, help="recommended top_k written")
    p.add_argument("--strength", type=float, default=8.0, help="recommended strength written")
    p.add_argument(
        "--mode",
        default="redirect",
        choices=["redirect", "reroute"],
        help="recommended mode written",
    )
    p.add_argument(
        "--full-prefill",
        action="store_true",
        help="evaluate every question from scratch (slow; for checking)",
    )
    p.add_argument("--pictures", default=None, help="folder for PNGs (default: next to -o)")
    p.add_argument("-o", "--out", required=True, help="headmap JSON to write")
    args = p.parse_args(argv)
    queries = parse_queries(args.queries)
    model, mmproj = resolve_model(args)
    if not mmproj:
        raise CliError("scoring needs a vision model: pass --mmproj")
    if args.comics == "generated":
        seeds = [3 * 10**9 + i for i in range(args.n_samples)]  # never used in training
        layout: str | tuple = args.layout
        names = list(comics.LAYOUTS if args.renderer == "v1" else comics.LAYOUTS_V2)
        if layout != "all" and layout not in names:
            raise CliError(f"--layout {layout}: {args.renderer} strips have {', '.join(names)}")
        each = [names[i % len(names)] if layout == "all" else layout for i in range(len(seeds))]
        if args.renderer == "v1":  # organism v1's strips: an equal grid
            items = [(str(s), comics.make_strip(s, lo)) for s, lo in zip(seeds, each, strict=True)]
        else:
            items = [
                (str(s), comics.make_strip_v2(s, lo, args.sizes))
                for s, lo in zip(seeds, each, strict=True)
            ]
        strips = [
            (
                name,
                comics.render(desc)
                if args.renderer == "v1"
                else comics.render_v2(desc, args.renderer),
                [p.thing.name for p in desc.panels],
                [Box(*p.box) for p in desc.panels],  # panels of their own sizes
            )
            for name, desc in items
        ]
    else:
        layout = (1, 6)
        strips = [(n, im, None, None) for n, im in strips_from_dir(args.comics)[: args.n_samples]]
        if any(q != "last" for q in queries):
            raise CliError("folders carry no answers: use --queries last")
    args.model, args.mmproj, args.image = model, mmproj, []
    llm, _ = load(args, Steering(strength=0.0))  # observer only, until steered
    handler = llm.chat_handler
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.npz")
    L, H = llm.steering.mask.shape
    sums = GazeSums(queries, np.zeros((len(queries), L, H, 6, 6)))
    done: list[str] = []
    if partial.exists():  # resume
        z = np.load(partial, allow_pickle=False)
        if list(z["queries"]) == queries and z["mass"].shape == sums.mass.shape:
            sums.mass, done = z["mass"], list(z["done"])
            sums.n_strips = len(done)
    prompter = StripPrompter(llm, handler)
    t0 = time.time()
    try:
        for i, (name, img, answers, regions) in enumerate(strips):
            if name in done:
                continue
            sums.mass += score_strip(
                prompter,
                img,
                layout,
                queries,
                answers,
                args.prompt,
                shared_prefix=not args.full_prefill,
                regions=regions,
            )
            sums.n_strips += 1
            done.append(name)
            np.savez(partial, mass=sums.mass, done=np.array(done), queries=np.array(queries))
            el = time.time() - t0
            print(
                f"\rscored {i + 1}/{len(strips)} strips  {el:.0f}s",
                end="",
                file=sys.stderr,
                flush=True,
            )
        print(file=sys.stderr)
    finally:
        llm.close()
    cmd = "llama-steer score " + " ".join(argv if argv is not None else sys.argv[2:])
    hm = to_headmap(
        sums,
        model,
        args.rank_by,
        0,
        method={
            "command": cmd,
            "prompt": args.prompt,
            "comics": args.comics,
            "layout": str(layout),
            "renderer": args.renderer if args.comics == "generated" else None,
            "sizes": args.sizes if args.comics == "generated" else None,
            "shared_prefix": not args.full_prefill,
        },
        top_k=args.top_k,
        strength=args.strength,
        mode=args.mode,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    hm.save(out)
    report = {}
    for qi, q in enumerate(queries):
        ratio, diff = sums.selectivity(qi)
        g = sums.gaze(qi)
        top = np.argsort(-g, axis=None)[:10]
        report[q] = {
            "top10_gaze": float(g.flat[top].mean()),
            "top10_ratio": float(ratio.flat[top].mean()),
            "top10_diff": float(diff.flat[top].mean()),
        }
        print(
            f"queries {q:>9}: top-10 heads mean gaze {report[q]['top10_gaze']:.3f}, "
            f"selectivity x{report[q]['top10_ratio']:.2f}, diag-off {report[q]['top10_diff']:+.3f}"
        )
    best = max(report, key=lambda q: report[q]["top10_ratio"])
    print(f"most selective query positions: {best}")
    pics = write_pictures(
        sums, Path(args.pictures) if args.pictures else out.parent / (out.stem + "_pictures")
    )
    json.dump(
        {"queries": report, "most_selective": best},
        open(out.with_suffix(".report.json"), "w"),
        indent=1,
    )
    partial.unlink(missing_ok=True)
    print(
        f"wrote {out}, {out.with_suffix('.report.json')}, {len(pics)} pictures in {pics[0].parent}"
    )
    return 0

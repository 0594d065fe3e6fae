"""``llama-steer``: steered generation from the shell, llama.cpp-style flags.

    llama-steer -m model.gguf -p "..." --roi text:"..." --strength -8        text model
    llama-steer -m m.gguf --mmproj mm.gguf --image strip.png -p "What is in this panel?" \\
                --roi panel:4/6 --mode redirect --strength 6                 image model
    llama-steer ... --schedule "0:panel:1/6,12:panel:4/6"                    switch mid-answer
    llama-steer --mmproj mm.gguf --image strip.png --roi box:10,10,90,90 --show-grid
    llama-steer chat -m ... --mmproj ...        interactive (/roi /mode /strength /off ...)

Exit codes: 0 done; 2 bad input (message names the fix); 1 the model or runtime failed.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import os
import re
import sys
from pathlib import Path

from llama_steer._errors import SteeringError
from llama_steer.steering import MODES

USAGE_ERROR, RUNTIME_ERROR = 2, 1


class CliError(Exception):
    """Bad command-line input (exit 2)."""


# -- arguments -----------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (llama.cpp flags)")
    g.add_argument("-m", "--model", help="text GGUF (default: the embedded demo model)")
    g.add_argument("--mmproj", help="multimodal projector GGUF (needed for --image)")
    g.add_argument("--hf-repo", help="Hugging Face repo to take -m from (huggingface-hub cache)")
    g.add_argument("--hf-file", help="file in --hf-repo")
    g.add_argument("-c", "--ctx-size", type=int, default=2048)
    g.add_argument("-t", "--threads", type=int, default=None)
    g.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--chat-format",
        help="llama-cpp-python chat format when the GGUF has no template (e.g. gemma, chatml)",
    )
    g.add_argument("-v", "--verbose", action="store_true", help="llama.cpp's logs on stderr")


def add_gen_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("-p", "--prompt")
    g.add_argument("-f", "--file", help="read the prompt from a file")
    g.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    g.add_argument("-n", "--n-predict", type=int, default=64)
    g.add_argument("--temp", type=float, default=0.0)


def add_steer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("steering")
    g.add_argument(
        "--roi",
        help="region of interest: 50:99, box:x0,y0,x1,y1, panel:k/n, "
        "panel:k@RxC, left|right|top|bottom|top-left|...|center, saliency:FILE, "
        'text:"...", joined with +; imageN: picks an image',
    )
    g.add_argument(
        "--mode", default=None, choices=MODES, help="default: the headmap's, else redirect"
    )
    g.add_argument(
        "--strength",
        type=float,
        default=None,
        help="logit units, 0 = off (default: the headmap's, else 4)",
    )
    g.add_argument(
        "--heads", default=None, help="all, layers:A-B, or L0H3,L2H1 (layer/head, 0-based)"
    )
    g.add_argument("--headmap", help="ranked heads JSON (list of {layer, head, score})")
    g.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="heads taken from --headmap (default: the headmap's recommendation)",
    )
    g.add_argument(
        "--decode-only",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="steer generated tokens only (default: the headmap's, else off)",
    )
    g.add_argument(
        "--focus",
        choices=["content", "none"],
        default=None,
        help="content: boost only the image tokens of the ROI that show something, not a "
        "panel's plain background (default: the headmap's, else none)",
    )
    g.add_argument(
        "--schedule",
        help='"N:ROI,M:ROI": retarget after N, M generated tokens '
        "(use ; between entries when an ROI has commas)",
    )
    g.add_argument(
        "--show-grid",
        action="store_true",
        help="print each image's token grid and the ROI's tokens, then run",
    )


def parse_heads(spec: str | None):
    """--heads -> Steering(heads=...)."""
    if spec is None or spec == "all":
        return "all"
    if re.fullmatch(r"layers:\d+(-\d+)?", spec):
        return spec
    pairs = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*[lL](\d+)[hH](\d+)\s*", part) or re.fullmatch(
            r"\s*(\d+):(\d+)\s*", part
        )
        if not m:
            raise CliError(f"--heads {spec!r}: write all, or layer/head pairs like L0H3,L2H1")
        pairs.append((int(m.group(1)), int(m.group(2))))
    return pairs


def parse_schedule(spec: str) -> list[tuple[int, str]]:
    """'0:panel:1/6,12:panel:4/6' -> [(0, 'panel:1/6'), (12, 'panel:4/6')]."""
    parts = spec.split(";") if ";" in spec else spec.split(",")
    entries: list[list] = []
    for part in parts:
        m = re.fullmatch(r"\s*(\d+):(.+)", part)
        if m and (";" in spec or not entries or not re.fullmatch(r"\d+", m.group(2))):
            entries.append([int(m.group(1)), m.group(2).strip()])
        elif entries and ";" not in spec:
            entries[-1][1] += "," + part  # a comma inside an ROI (box:1,2,3,4)
        else:
            raise CliError(
                f"--schedule {spec!r}: write N:ROI entries, e.g. 0:panel:1/6,12:panel:4/6"
            )
    steps = [e[0] for e in entries]
    if steps != sorted(steps) or len(set(steps)) != len(steps):
        raise CliError(f"--schedule {spec!r}: token counts must increase")
    from llama_steer.roi import parse_roi

    for _, roi in entries:
        parse_roi(roi)  # fail now, not mid-answer
    return [(n, roi) for n, roi in entries]


# -- model ---------------------------------------------------------------------------------
def embedded_model() -> tuple[str, str]:
    """The organism shipped in the package (text GGUF, mmproj GGUF);
    $LLAMA_STEER_ORGANISM_DIR points elsewhere (a retrained pair)."""
    d = Path(
        os.environ.get("LLAMA_STEER_ORGANISM_DIR") or Path(__file__).resolve().parent / "models"
    )
    m, p = d / "organism-f16.gguf", d / "mmproj-organism-f16.gguf"
    if not (m.exists() and p.exists()):
        raise CliError(f"the embedded model is not installed ({d}): pass -m and --mmproj")
    return str(m), str(p)


def resolve_model(args) -> tuple[str, str | None]:
    if args.hf_repo or args.hf_file:
        if not (args.hf_repo and args.hf_file):
            raise CliError("--hf-repo and --hf-file go together")
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            raise CliError("--hf-repo needs huggingface-hub: pip install huggingface-hub") from None
        return hf_hub_download(args.hf_repo, args.hf_file), args.mmproj
    if args.model is None:
        m, p = embedded_model()
        return m, args.mmproj or p
    for path, flag in ((args.model, "-m"), (args.mmproj, "--mmproj")):
        if path and not Path(path).exists():
            raise CliError(f"{flag} {path}: no such file")
    return args.model, args.mmproj


def load(args, steering):
    from llama_steer.llama import Llama

    model, mmproj = resolve_model(args)
    if args.image and not mmproj:
        raise CliError("--image needs --mmproj (the model's multimodal projector)")
    handler = None
    if mmproj:
        from llama_cpp.llama_chat_format import MTMDChatHandler

        handler = MTMDChatHandler(clip_model_path=mmproj, verbose=args.verbose)
    llm = Llama(
        model_path=model,
        chat_handler=handler,
        chat_format=args.chat_format,
        steering=steering,
        n_ctx=args.ctx_size,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_gpu_layers=args.n_gpu_layers,
        seed=args.seed,
        verbose=args.verbose,
    )
    return llm, mmproj


def data_uri(path: str) -> str:
    p = Path(path)
    if not p.exists():
        raise CliError(f"--image {path}: no such file")
    mime = mimetypes.guess_type(p.name)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(p.read_bytes()).decode()


def user_message(text: str, images: list) -> dict:
    """An OpenAI-style user message: ``images`` (file paths or PIL images) then ``text``."""
    if not images:
        return {"role": "user", "content": text}

    def url(i) -> str:
        if isinstance(i, (str, Path)):
            return data_uri(str(i))
        from llama_steer import comics

        return comics.data_uri(i)

    parts = [{"type": "image_url", "image_url": {"url": url(i)}} for i in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def show_grid(mmproj: str, images: list[str], roi: str | None, steering, out=sys.stdout) -> None:
    """Print each image's token grid; with --roi, mark the tokens ``steering`` targets (#),
    its focus applied."""
    import numpy as np
    from PIL import Image

    from llama_steer.roi import Seq
    from llama_steer.vision import Geometry, ImageSpan

    geo = Geometry.from_mmproj(mmproj)
    spans, cell = [], 0
    for k, path in enumerate(images, 1):
        with Image.open(path) as im:
            g = geo.grid(*im.size)
            px = np.asarray(im.convert("RGB"))
        spans.append(ImageSpan(k, g, cell, cell, max(g.nx, g.ny), px))
        cell += g.n_tokens
    seq = Seq([0] * cell, [b""] * cell, np.arange(cell), spans)
    marked = set()
    if roi:
        marked = set(steering._target_cells(seq)[0].tolist())
    for s in spans:
        print(f"image{s.index} {images[s.index - 1]}: {s.grid.describe()}", file=out)
        if roi:
            toks = [
                c - s.first_cell
                for c in sorted(marked)
                if s.first_cell <= c < s.first_cell + s.grid.n_tokens
            ]
            print(f"  roi {roi!r} -> {len(toks)} tokens: {toks}", file=out)
        for r in range(s.grid.ny):
            row = "".join(
                "#" if s.first_cell + r * s.grid.nx + c in marked else "." for c in range(s.grid.nx)
            )
            print(f"  {r * s.grid.nx:5d} {row}", file=out)


# -- run -----------------------------------------------------------------------------------
def make_steering(args):
    """Steering from the flags; with --headmap, its recommended mode, strength, decode-only
    and focus fill in the flags not given."""
    from llama_steer.headmap import Headmap
    from llama_steer.steering import Steering

    roi = args.roi
    schedule = parse_schedule(args.schedule) if args.schedule else []
    if schedule and schedule[0][0] == 0:
        roi = schedule[0][1]
    if args.headmap and args.heads:
        raise CliError("--heads and --headmap both pick heads: give one")
    hm = Headmap.load(args.headmap) if args.headmap else None
    # no headmap: the plain defaults (redirect at strength 4, prompt and generated tokens)
    rec = hm.recommended() if hm else dict(mode="redirect", strength=4.0, decode_only=False)
    heads = dict(headmap=hm, top_k=args.top_k) if hm else dict(heads=parse_heads(args.heads))
    mode = args.mode or rec["mode"]
    if roi is None and mode != "image-boost":
        return Steering(strength=0.0, **heads), schedule
    focus = args.focus or rec.get("focus")
    return Steering(
        roi=roi,
        mode=mode,
        strength=args.strength if args.strength is not None else float(rec["strength"]),
        decode_only=args.decode_only if args.decode_only is not None else rec["decode_only"],
        focus=None if focus == "none" else focus,
        **heads,
    ), schedule


def run(args) -> int:
    prompt = args.prompt
    if args.file:
        prompt = Path(args.file).read_text()
    steering, schedule = make_steering(args)
    if args.show_grid:
        _, mmproj = resolve_model(args)
        if not (mmproj and args.image):
            raise CliError("--show-grid needs --mmproj and --image")
        show_grid(mmproj, args.image, args.roi, steering)
        if prompt is None:
            return 0
    if prompt is None:
        raise CliError("nothing to do: give -p PROMPT (or -f FILE)")
    llm, mmproj = load(args, steering)
    try:
        if mmproj:
            stream = llm.create_chat_completion(
                [user_message(prompt, args.image)],
                max_tokens=args.n_predict,
                temperature=args.temp,
                stream=True,
            )
            pieces = (c["choices"][0]["delta"].get("content", "") for c in stream)
        else:
            stream = llm.create_completion(
                prompt, max_tokens=args.n_predict, temperature=args.temp, stream=True
            )
            pieces = (c["choices"][0]["text"] for c in stream)
        switches = dict(schedule)
        for n, piece in enumerate(pieces, 1):
            print(piece, end="", flush=True)
            if n in switches:
                steering.update(roi=switches[n])
        print()
        st = steering.stats()
        if args.verbose:
            print(f"[llama-steer] {st.n_kq_edited} attention nodes edited", file=sys.stderr)
    finally:
        llm.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    commands = {
        "chat": "llama_steer.chat",
        "demo": "llama_steer.demo",
        "score": "llama_steer.score",
        "eval": "llama_steer.evaluate",
        "look": "llama_steer.look",
    }
    try:
        if argv and argv[0] in commands:
            import importlib

            return importlib.import_module(commands[argv[0]]).main(argv[1:])
        p = argparse.ArgumentParser(
            prog="llama-steer",
            description=__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_model_args(p)
        add_gen_args(p)
        add_steer_args(p)
        return run(p.parse_args(argv))
    except (CliError, SteeringError) as e:
        print(f"llama-steer: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, ValueError, OSError) as e:
        print(f"llama-steer: {type(e).__name__}: {e}", file=sys.stderr)
        return RUNTIME_ERROR


if __name__ == "__main__":
    sys.exit(main())

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
import ctypes
import math
import os
import re
import sys
import warnings
from pathlib import Path

from llama_steer import messages
from llama_steer._errors import SteeringError
from llama_steer.steering import MODES

USAGE_ERROR, RUNTIME_ERROR = 2, 1


class CliError(Exception):
    """Bad command-line input (exit 2)."""


# -- what the user reads on stderr -----------------------------------------------------------
def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # the library warns with warnings.warn; its default display echoes a Python source line,
    # noise to a shell user: one line, in the CLI's own voice
    print(f"llama-steer: warning: {message}", file=sys.stderr, flush=True)


def install_warning_format() -> None:
    warnings.showwarning = _show_warning


_LOG_CALLBACKS: list = []  # ctypes callbacks must outlive every call into llama.cpp


def quiet_native_logs(verbose: bool) -> None:
    """Without -v, llama.cpp's and mtmd's logs (prompt echo, image encode/decode progress,
    ~20 lines a run) stay off stderr, so an error is the first thing the user reads; native
    errors still come through. mtmd logs through its own callback, which prints everything by
    default; llama-cpp-python's callback for llama.cpp maps ggml's log levels as they were
    before DEBUG was inserted (it shows this llama.cpp's warnings as errors), so both get
    this one."""
    if verbose:
        return
    try:
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd_cpp
    except (ImportError, OSError):
        return
    last = [0]

    def log(level: int, text: bytes, user_data) -> None:
        # ggml.h: GGML_LOG_LEVEL_ERROR = 4; CONT (5) continues the previous message
        level = last[0] if level == 5 else level
        last[0] = level
        if level == 4 and text:
            sys.stderr.write(text.decode("utf-8", "replace"))

    cb = llama_cpp.llama_log_callback(log)
    _LOG_CALLBACKS.append(cb)
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(cb, ctypes.c_void_p(0))


def temperature(text: str) -> float:
    """--temp: a finite number >= 0 (0 = greedy)."""
    try:
        t = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number: e.g. 0 or 0.8") from None
    if not math.isfinite(t) or t < 0:
        raise argparse.ArgumentTypeError(
            f"{text} is not a temperature: use a finite number >= 0 (0 = greedy, e.g. 0.8)"
        )
    return t


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
    g.add_argument("--temp", type=temperature, default=0.0, help="0 = greedy (default)")


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
    g.add_argument(
        "--domain",
        help="for --mode redirect: what to suppress while --roi is boosted (ROI grammar, e.g. "
        'text:"<all the facts>"); image ROIs default to their whole image',
    )
    g.add_argument(
        "--headmap",
        help="a llama-steer headmap JSON (version 1: ranked heads and the model they are for; "
        "scripts/convert_headmap.py converts a plain ranking list)",
    )
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


def parse_schedule(spec: str) -> list[tuple[int, str]]:
    """'0:panel:1/6,12:panel:4/6' -> [(0, 'panel:1/6'), (12, 'panel:4/6')]."""
    if not spec.strip():
        raise CliError(
            "--schedule is empty: write N:ROI entries, e.g. 0:panel:1/6,12:panel:4/6, or "
            "leave the flag out"
        )
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


# -- files: checked before llama.cpp sees them -----------------------------------------------
def check_gguf_file(path: str, flag: str, projector: bool) -> None:
    """A whole GGUF of the right kind (a text model for -m, a projector for --mmproj);
    llama.cpp itself only says "Failed to load model from file"."""
    from llama_steer._gguf import GGUFError, check_gguf

    want = "the multimodal projector (mmproj) GGUF" if projector else "a text model GGUF"
    try:
        meta = check_gguf(path)
    except GGUFError as e:
        fix = "download it again" if "truncated" in str(e) else f"pass {want}"
        raise CliError(f"{flag} {e}: {fix}") from None
    arch = meta.get("general.architecture")
    if projector and arch != "clip":
        raise CliError(
            f"--mmproj {path} is a {arch} model, not a multimodal projector: pass it as -m "
            "and the matching mmproj-*.gguf as --mmproj"
        )
    if not projector and arch == "clip":
        raise CliError(
            f"{flag} {path} is a multimodal projector (mmproj), not a text model: pass it as "
            "--mmproj and the text GGUF as -m"
        )


def image_size(path: str, flag: str = "--image") -> tuple[int, int]:
    return messages.image_size(path, flag)


def image_bytes(path: str, flag: str = "--image") -> tuple[bytes, str]:
    return messages.image_bytes(path, flag)


def read_prompt_file(path: str) -> str:
    p = Path(path)
    if not p.exists():
        raise CliError(
            f"-f {path}: no such file (-f reads the prompt from a file; -p takes it inline)"
        )
    if p.is_dir():
        raise CliError(f"-f {path} is a directory: pass a text file with the prompt")
    try:
        return p.read_text()
    except UnicodeDecodeError:
        raise CliError(f"-f {path} is not UTF-8 text: pass a text file with the prompt") from None
    except OSError as e:
        raise CliError(f"-f {path}: cannot read it ({e.strerror})") from None


def check_saliency(targets: tuple, flag: str) -> None:
    """Load each saliency:FILE now: a bad file would otherwise fail mid-run with a raw
    Pillow/NumPy error."""
    from llama_steer.roi import RoiError, Saliency

    for t in targets:
        if not isinstance(t, Saliency) or not isinstance(t.source, (str, Path)):
            continue
        path = str(t.source)
        if Path(path).is_dir():
            raise CliError(f"{flag} saliency:{path} is a directory: pass a PNG or .npy map")
        try:
            t.load()
        except RoiError as e:
            raise CliError(f"{flag} saliency:{path}: {e}") from None
        except Exception as e:  # Pillow / NumPy say it in their own words; name the file
            raise CliError(
                f"{flag} saliency:{path} is not a saliency map ({type(e).__name__}: {e}): pass "
                "a grayscale PNG or a 2-D .npy array"
            ) from None


# -- model ---------------------------------------------------------------------------------
def embedded_model() -> tuple[str, str]:
    try:
        return messages.embedded_model()
    except SteeringError as e:
        raise CliError(str(e)) from None


def resolve_model(args) -> tuple[str, str | None]:
    if args.hf_repo or args.hf_file:
        if not (args.hf_repo and args.hf_file):
            raise CliError("--hf-repo and --hf-file go together")
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            raise CliError("--hf-repo needs huggingface-hub: pip install huggingface-hub") from None
        model, mmproj = hf_hub_download(args.hf_repo, args.hf_file), args.mmproj
    elif args.model is None:
        m, p = embedded_model()
        model, mmproj = m, args.mmproj or p
    else:
        model, mmproj = args.model, args.mmproj
    check_gguf_file(model, "-m", projector=False)
    if mmproj:
        check_gguf_file(mmproj, "--mmproj", projector=True)
    return model, mmproj


def load(args, steering):
    from llama_steer.llama import Llama

    model, mmproj = resolve_model(args)
    if args.image and not mmproj:
        raise CliError("--image needs --mmproj (the model's multimodal projector)")
    quiet_native_logs(args.verbose)
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


def user_message(text: str, images: list) -> dict:
    return messages.user_message(text, images, "--image")


# -- context: does the prompt fit in -c? ---------------------------------------------------------
IMAGE_MARKERS = 2  # tokens mtmd adds around each image (<|vision_start|>, <|vision_end|>)


def _ctx_round(n: int) -> int:
    return -(-n // 256) * 256  # llama.cpp pads n_ctx to a multiple of 256 anyway


def image_tokens(mmproj: str, sizes: list[tuple[int, int]]) -> list[int] | None:
    """Tokens each image takes, by the projector's resize rule; None for a projector whose
    rule llama-steer does not know (then llama-cpp-python's own check is the only one)."""
    from llama_steer._gguf import GGUFError
    from llama_steer.vision import Geometry, GeometryError

    try:
        geo = Geometry.from_mmproj(mmproj)
        return [geo.grid(w, h).n_tokens + IMAGE_MARKERS for w, h in sizes]
    except (GeometryError, GGUFError, KeyError):
        return None


def fitting_size(mmproj: str, sizes: list[tuple[int, int]], budget: int) -> tuple[int, int] | None:
    """The largest (w, h) the first image can be shrunk to (aspect kept, the others shrunk by
    the same factor) so that all images take at most ``budget`` tokens; None if none does."""
    from llama_steer.vision import Geometry

    geo = Geometry.from_mmproj(mmproj)

    def tokens(f: float) -> int:
        return sum(
            geo.grid(max(1, int(w * f)), max(1, int(h * f))).n_tokens + IMAGE_MARKERS
            for w, h in sizes
        )

    lo, hi = 0.0, 1.0
    if tokens(1e-6) > budget:
        return None
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tokens(mid) <= budget else (lo, mid)
    w, h = sizes[0]
    return max(1, int(w * lo)), max(1, int(h * lo))


def check_fits(args, mmproj, sizes, n_text: int | None) -> None:
    """Refuse a prompt that cannot fit in -c, with the -c that fits (and, with images, the
    image size that fits this -c). ``n_text``: the text's tokens, None before the model is
    loaded (then only the images are counted: a huge image is refused before it is decoded)."""
    n_ctx = args.ctx_size
    if n_ctx < 0:
        raise CliError(f"-c {n_ctx}: the context size must be >= 1 (0: the model's own)")
    if n_ctx == 0:
        return  # llama.cpp's "the model's training context": checked once loaded
    img = image_tokens(mmproj, sizes) if (mmproj and sizes) else []
    if img is None:
        return
    n_img = sum(img)
    need = n_img + (n_text or 0) + 1  # at least one answer token
    if need <= n_ctx:
        return
    # before the model is loaded the text is not tokenized yet: a token per byte bounds it
    text = n_text if n_text is not None else len(args._prompt.encode()) + 64
    fit_c = _ctx_round(n_img + text + max(args.n_predict, 1))
    what = f"{n_img} for the image{'s' if len(img) > 1 else ''}" if img else ""
    msg = (
        f"the prompt needs {'at least ' if n_text is None else ''}{need - 1} tokens"
        f"{' (' + what + ')' if what else ''} but -c is {n_ctx}: pass -c {fit_c}"
    )
    if img:
        budget = n_ctx - text - 1
        size = fitting_size(mmproj, sizes, budget) if budget > 0 else None
        if size:
            msg += f", or shrink the image to at most {size[0]}x{size[1]} px for -c {n_ctx}"
    raise CliError(msg)


def prompt_tokens(llm, prompt: str, images: list) -> int:
    """The text's tokens as the model will see them, chat template included."""
    if not images:
        return len(llm.tokenize(prompt.encode(), add_bos=True, special=False))
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        tmpl = llm.metadata["tokenizer.chat_template"]
        text = (
            ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            .from_string(tmpl)
            .render(
                messages=[{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                bos_token="",
                eos_token="",
            )
        )
    except Exception:  # a template this cannot render: the prompt and a margin
        text = prompt + " " * 32
    return len(llm.tokenize(text.encode(), add_bos=False, special=True))


def show_grid(mmproj: str, images: list[str], roi: str | None, config, out=sys.stdout) -> None:
    """Print each image's token grid; with --roi, mark the tokens the resolved steering
    ``config`` targets (#), its focus applied."""
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
        marked = set(config.target_cells(seq)[0].tolist())
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
STEER_FLAGS = ("headmap", "heads", "top_k", "strength", "mode", "focus", "decode_only", "domain")


def _targets(roi):
    from llama_steer.roi import parse_roi

    return parse_roi(roi) if roi else ()


def _text_only(targets) -> bool:
    from llama_steer.roi import IMAGE_TARGETS

    return bool(targets) and not any(isinstance(t, IMAGE_TARGETS) for t in targets)


def _load_headmap(args):
    from llama_steer.headmap import Headmap, NotAHeadmap

    try:
        hm = Headmap.load(args.headmap)
    except NotAHeadmap:
        model = args.model or (None if args.hf_repo else _embedded_or_none())
        raise CliError(str(NotAHeadmap(args.headmap, model))) from None
    if not hm.heads:
        raise CliError(
            f"--headmap {args.headmap} lists no heads ('heads' is empty): regenerate it with "
            "`llama-steer score ... -o FILE`, or convert a ranking with "
            "scripts/convert_headmap.py"
        )
    return hm


def _embedded_or_none():
    try:
        return embedded_model()[0]
    except CliError:
        return None


def make_steering(args, one_shot: bool = False):
    """Steering from the flags: flags not given stay None and the library decides them (the
    model's headmap, else its fallback: config.SteeringConfig.resolve), exactly as Python's
    ``Steering(...)`` does. Returns (steering, schedule); schedule entries are (after N
    tokens, roi, focus). ``one_shot``: a single answer (not chat, where /roi comes later),
    so steering flags without a target are refused."""
    from llama_steer.config import SteeringConfig
    from llama_steer.steering import Steering

    roi = args.roi
    schedule = parse_schedule(args.schedule) if args.schedule is not None else []
    if schedule and schedule[0][0] == 0:
        if roi is not None:
            raise CliError(
                f"--roi {roi!r} and --schedule's first entry 0:{schedule[0][1]} both set the "
                "target from the first token: drop --roi, or start --schedule later (N > 0)"
            )
        roi = schedule.pop(0)[1]
    hm = _load_headmap(args) if args.headmap else None
    domain = getattr(args, "domain", None)
    if one_shot and roi is None and not schedule and args.mode != "image-boost":
        given = [
            "--" + f.replace("_", "-") for f in STEER_FLAGS if getattr(args, f, None) is not None
        ]
        if given and args.strength != 0:
            raise CliError(
                f"{', '.join(given)} given, but nothing to steer to: add --roi (e.g. "
                '--roi panel:2/6, --roi text:"...") or --schedule; for the unsteered model '
                "drop the steering flags (or pass --strength 0)"
            )
    rois = [("--roi", roi)] + [("--schedule", r) for _, r in schedule]
    dom_targets = _targets(domain)
    check_saliency(dom_targets, "--domain")
    for flag, r in rois:
        t = _targets(r)
        check_saliency(t, flag)
        if args.focus == "content" and _text_only(t):
            raise CliError(
                f"--focus content narrows image ROIs to the tokens that show something, but "
                f"{flag} {r!r} is text only: drop --focus, or target an image region"
            )
        if args.mode in ("redirect", "reroute") and _text_only(t) and not domain:
            raise CliError(
                f"--mode {args.mode} boosts {flag} {r!r} and suppresses a domain, which a text ROI "
                'does not imply: add --domain ROI (e.g. --domain text:"<all the facts>"), or '
                "use --mode bias"
            )
    strength = args.strength
    config = SteeringConfig(
        roi=roi,
        heads=args.heads,
        headmap=hm,
        top_k=args.top_k,
        mode=args.mode,
        strength=strength,
        decode_only=args.decode_only,
        focus=args.focus,
        domain=domain,
    )
    for _, r in schedule:
        config.replace(roi=r)  # a bad scheduled ROI fails now, not mid-answer
    # content focus is decided per target (a text ROI goes without the headmap's focus)
    return Steering(config), [(n, r, args.focus) for n, r in schedule]


def _ctx_error(e: ValueError, args) -> CliError | None:
    """llama-cpp-python's own "Prompt exceeds n_ctx: A > B" (a projector llama-steer cannot
    predict) as a usage error with the -c that fits."""
    m = re.search(r"(?:Prompt exceeds n_ctx|Requested tokens) \(?(\d+)\)?", str(e))
    if not m:
        return None
    need = int(m.group(1))
    return CliError(
        f"the prompt needs more than {need - 1} tokens but -c is {args.ctx_size}: pass "
        f"-c {_ctx_round(need + max(args.n_predict, 1))}"
    )


def run(args) -> int:
    prompt = args.prompt
    if args.file:
        if prompt is not None:
            raise CliError("-p and -f both give the prompt: pass one")
        prompt = read_prompt_file(args.file)
    args._prompt = prompt or ""
    steering, schedule = make_steering(args, one_shot=not args.show_grid or prompt is not None)
    if args.show_grid:
        model, mmproj = resolve_model(args)
        if not (mmproj and args.image):
            raise CliError("--show-grid needs --mmproj and --image")
        for path in args.image:
            image_bytes(path)
        from llama_steer.headmap import ModelIdentity

        # the defaults the model will get (its headmap's focus), without loading it
        identity = ModelIdentity.of_gguf(model) if model else None
        show_grid(mmproj, args.image, args.roi, steering.config.resolve(identity))
        if prompt is None:
            return 0
    if prompt is None:
        raise CliError("nothing to do: give -p PROMPT (or -f FILE)")
    model, mmproj = resolve_model(args)
    if args.image and not mmproj:
        raise CliError("--image needs --mmproj (the model's multimodal projector)")
    sizes = [image_size(p) for p in args.image]
    check_fits(args, mmproj, sizes, None)  # a huge image: refused before anything is decoded
    message = user_message(prompt, args.image) if mmproj else None  # decodes each image once
    llm, mmproj = load(args, steering)
    if args.verbose:
        r = steering.resolved
        hm = f"headmap {Path(r.headmap.source or '?').name}, " if r.headmap is not None else ""
        print(
            f"[llama-steer] steering: {hm}heads {r.describe_heads()}, {r.mode}, strength "
            f"{r.strength:g}{', decode only' if r.decode_only else ''}"
            f"{', focus content' if r.focus == 'content' else ''}",
            file=sys.stderr,
        )
    try:
        if args.ctx_size == 0:
            args.ctx_size = llm.n_ctx()
        check_fits(args, mmproj, sizes, prompt_tokens(llm, prompt, args.image))
        if mmproj:
            stream = llm.create_chat_completion(
                [message], max_tokens=args.n_predict, temperature=args.temp, stream=True
            )
            pieces = (c["choices"][0]["delta"].get("content", "") for c in stream)
        else:
            stream = llm.create_completion(
                prompt, max_tokens=args.n_predict, temperature=args.temp, stream=True
            )
            pieces = (c["choices"][0]["text"] for c in stream)
        switches = {n: (r, f) for n, r, f in schedule}
        try:
            for n, piece in enumerate(pieces, 1):
                print(piece, end="", flush=True)
                if n in switches:
                    r, f = switches[n]
                    steering.update(roi=r, focus=f)
        except ValueError as e:
            err = _ctx_error(e, args)
            if err is None:
                raise
            raise err from None
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
    install_warning_format()
    commands = {
        "chat": "llama_steer.apps.chat",
        "demo": "llama_steer.apps.demo",
        "score": "llama_steer.apps.score",
        "eval": "llama_steer.apps.evaluate",
        "look": "llama_steer.apps.look",
        "reason": "llama_steer.apps.reason",
        "serve": "llama_steer.apps.serve",
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
    # run as the imported module, not as __main__: subcommands (chat, ...) raise
    # llama_steer.apps.cli.CliError, which a __main__.CliError handler would not catch
    from llama_steer.apps.cli import main as _main

    sys.exit(_main())

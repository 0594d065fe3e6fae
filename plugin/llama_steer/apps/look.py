"""``llama-steer look``: where do the (top) heads look while the model answers?

    llama-steer look -m m.gguf --mmproj mm.gguf --image strip.png -p "What is in panel 3?" \\
                     --headmap headmaps/organism.json --top-k 10 -o look.png

Generates the answer greedily, reads after every generated token how much attention the chosen
heads put on each image token (the native observer, one region per image token), averages over
tokens and heads, and writes the image with that map laid over it and the answer under it.
Steering flags (--roi, --mode, --strength) apply as usual, to see where steered heads look.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def attention_map(llm, image_path: str, prompt: str, n_predict: int = 12) -> tuple[np.ndarray, str]:
    """(ny, nx) mean attention of the steered heads on each image token over the answer's
    tokens, and the answer."""
    from llama_cpp._utils import suppress_stdout_stderr

    from llama_steer.messages import user_message

    msgs = [user_message(prompt, [image_path])]
    with suppress_stdout_stderr(disable=llm.verbose):
        llm.create_chat_completion(msgs, max_tokens=1, temperature=0)  # lays out the image
    (span,) = llm.images[:1] or [None]
    if span is None:
        raise ValueError("the prompt holds no image")
    acc, n, text = np.zeros(span.grid.n_tokens), 0, []
    with llm.steering.observe("image-tokens") as obs:
        with suppress_stdout_stderr(disable=llm.verbose):
            stream = llm.create_chat_completion(
                msgs, max_tokens=n_predict, temperature=0, stream=True
            )
            for chunk in stream:
                piece = chunk["choices"][0]["delta"].get("content")
                if piece is None:
                    continue
                acc += obs.mass()  # mean over the steered heads, this token
                n += 1
                text.append(piece)
    return (acc / max(n, 1)).reshape(span.grid.ny, span.grid.nx), "".join(text).strip()


def overlay_png(image_path: str, grid_map: np.ndarray, grid, caption: str, out: Path) -> None:
    from PIL import Image, ImageDraw

    img = Image.open(image_path).convert("RGB")
    scale = max(1, 480 // max(img.size))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    # token squares live on the resized canvas; map them back to the original image
    heat = np.zeros((img.height, img.width))
    for t, (x0, y0, x1, y1) in enumerate(grid.token_boxes()):
        r, c = divmod(t, grid.nx)
        heat[
            int(y0 * scale) : int(np.ceil(y1 * scale)), int(x0 * scale) : int(np.ceil(x1 * scale))
        ] = grid_map[r, c]
    top = heat.max() if heat.max() > 0 else 1.0
    red = Image.new("RGB", img.size, (255, 40, 0))
    alpha = Image.fromarray((180 * heat / top).astype(np.uint8), "L")
    img.paste(red, (0, 0), alpha)
    canvas = Image.new("RGB", (img.width, img.height + 24), "white")
    canvas.paste(img, (0, 0))
    ImageDraw.Draw(canvas).text((4, img.height + 6), caption, fill="black")
    canvas.save(out)


def main(argv: list[str] | None = None) -> int:
    from llama_steer.apps.cli import CliError, add_model_args, add_steer_args, load, make_steering

    p = argparse.ArgumentParser(
        prog="llama-steer look",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    add_steer_args(p)
    p.add_argument("--image", action="append", default=[], required=True)
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("-n", "--n-predict", type=int, default=12)
    p.add_argument("-o", "--out", default="look.png")
    args = p.parse_args(argv)
    steering, _ = make_steering(args)
    llm, mmproj = load(args, steering)
    if not mmproj:
        raise CliError("look needs a vision model: pass --mmproj")
    try:
        mask = steering.mask
        grid_map, answer = attention_map(llm, args.image[0], args.prompt, args.n_predict)
        grid = llm.images[0].grid
    finally:
        llm.close()
    heads = "all heads" if steering.heads == "all" else f"{int(mask.sum())} heads"
    overlay_png(
        args.image[0], grid_map, grid, f"{args.prompt} -> {answer}  ({heads})", Path(args.out)
    )
    r, c = np.unravel_index(np.argmax(grid_map), grid_map.shape)
    print(f"{args.prompt} -> {answer}")
    print(
        f"most attended image token: row {r}, column {c} (index {r * grid.nx + c}); "
        f"wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Chat messages with images, and the embedded model's files: what apps and users need to
build a request, with images checked before llama.cpp sees them.

    >>> from llama_steer.messages import user_message
    >>> msg = user_message("What is in panel 2?", ["strip.png"])     # paths or PIL images
    >>> llm.create_chat_completion([msg], max_tokens=16)

    user_message(text, images) ... an OpenAI-style user message (images as data URIs)
    data_uri(path) ............... "data:image/png;base64,..." of an image file
    image_bytes(path) ............ (bytes, MIME type) after a full decode (a truncated file
                                   fails here), re-encoded as PNG when llama.cpp cannot read it
    image_size(path) ............. (width, height) from the header only
    embedded_model() ............. (text GGUF, mmproj GGUF) of the model shipped in the package

Bad files raise SteeringError naming the file and the fix (``label`` names it: a CLI passes
its flag, e.g. "--image").
"""

from __future__ import annotations

import base64
import io
import mimetypes
import os
from pathlib import Path

from llama_steer._errors import SteeringError

__all__ = ["data_uri", "embedded_model", "image_bytes", "image_size", "user_message"]

# formats llama.cpp's image loader (stb_image) decodes; Pillow reads more (WebP, TIFF, ...):
# those are decoded here and handed over as PNG
_STB_FORMATS = {"PNG", "JPEG", "BMP", "GIF", "PPM", "TGA"}
_STB_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B"}


def open_image(path: str, label: str = "image"):
    """Pillow's lazy open (header only), or SteeringError naming what is wrong and the fix."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise SteeringError(f"{label} {path}: no such file", field="image")
    if p.is_dir():
        raise SteeringError(
            f"{label} {path} is a directory: pass an image file (PNG, JPEG, ...)", field="image"
        )
    try:
        if p.stat().st_size == 0:
            raise SteeringError(
                f"{label} {path} is empty (0 bytes): pass an image file (PNG, JPEG, ...)",
                field="image",
            )
        # the size is checked against the context before the pixels are decoded (apps), so
        # Pillow's decompression-bomb guard would only stand in the way of that message
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(p)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    except UnidentifiedImageError:
        raise SteeringError(
            f"{label} {path} is not an image (no known image format): pass a PNG or JPEG file",
            field="image",
        ) from None
    except OSError as e:
        raise SteeringError(f"{label} {path}: cannot read it ({e.strerror or e})") from None


def image_size(path: str, label: str = "image") -> tuple[int, int]:
    with open_image(path, label) as im:
        return im.size


def image_bytes(path: str, label: str = "image") -> tuple[bytes, str]:
    """(bytes, MIME type) of an image file after a full decode (a truncated or corrupt file
    fails here, not in llama.cpp); re-encoded as PNG when llama.cpp's loader cannot read the
    format."""
    from PIL import Image

    im = open_image(path, label)
    with im:
        try:
            im.load()
        except (OSError, ValueError, SyntaxError) as e:
            raise SteeringError(
                f"{label} {path} is truncated or corrupt ({e}): pass a whole image file",
                field="image",
            ) from None
        if im.format in _STB_FORMATS and im.mode in _STB_MODES:
            mime = mimetypes.guess_type(Path(path).name)[0] or Image.MIME.get(im.format)
            return Path(path).read_bytes(), mime or "image/png"
        buf = io.BytesIO()
        im.convert("RGBA" if "A" in im.mode else "RGB").save(buf, format="PNG")
        return buf.getvalue(), "image/png"


def data_uri(path: str, label: str = "image") -> str:
    data, mime = image_bytes(path, label)
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def user_message(text: str, images: list, label: str = "image") -> dict:
    """An OpenAI-style user message: ``images`` (file paths or PIL images) then ``text``."""
    if not images:
        return {"role": "user", "content": text}

    def url(i) -> str:
        if isinstance(i, str | Path):
            return data_uri(str(i), label)
        from llama_steer import comics

        return comics.data_uri(i)

    parts = [{"type": "image_url", "image_url": {"url": url(i)}} for i in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def embedded_model() -> tuple[str, str]:
    """(text GGUF, mmproj GGUF) of the small VLM shipped in the package: organism v2, the
    Qwen3-VL-architecture one (v1, Qwen2-VL, ships beside it as organism-f16.gguf);
    $LLAMA_STEER_ORGANISM_DIR points elsewhere (a retrained pair of the same names)."""
    d = Path(
        os.environ.get("LLAMA_STEER_ORGANISM_DIR") or Path(__file__).resolve().parent / "models"
    )
    m, p = d / "organism-v2-f16.gguf", d / "mmproj-organism-v2-f16.gguf"
    if not (m.exists() and p.exists()):
        raise SteeringError(f"the embedded model is not installed ({d}): pass -m and --mmproj")
    return str(m), str(p)

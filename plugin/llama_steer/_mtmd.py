"""The one walk over an mtmd chunk list (llama-cpp-python's ``mtmd_cpp`` bindings).

    walk(m, chunks) -> [("text", [token ids]) | ("image", chunk handle)]

``m`` is the mtmd module (or llama-steer's watch standing in for it, llama.py); audio chunks
are refused: steering maps text and image chunks only.
"""

from __future__ import annotations

import ctypes

from llama_steer._errors import SteeringError


def walk(m, chunks) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for i in range(m.mtmd_input_chunks_size(chunks)):
        ch = m.mtmd_input_chunks_get(chunks, i)
        kind = m.mtmd_input_chunk_get_type(ch)
        if kind == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t()
            ptr = m.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n))
            out.append(("text", ptr[: n.value]))
        elif kind == m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            out.append(("image", ch))
        else:
            raise SteeringError("steering supports text and image chunks (no audio)")
    return out

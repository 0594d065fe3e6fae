"""Loading models safely: the AMX guard.

    >>> from llama_steer import guarded_load
    >>> with guarded_load():
    ...     llm = llama_cpp.Llama(model_path="model-q4_k_m.gguf")   # a plain model, guarded

    guarded_load() ....... context manager: models loaded inside it take the extra-buffer-type
                           decision below (``llama_steer.Llama`` always loads inside it)
    extra_bufts_decision() (use_extra_bufts, reason): the decision for this process
    decide(names, env) ... the rule itself, on plain values (tested directly)

Why: llama.cpp's CPU backend offers "extra buffer types" for model weights
(``llama_model_params.use_extra_bufts``, on by default): weight repacking for faster matmuls
(``CPU_REPACK``) and, where the CPU has Intel AMX and the build enabled it, the ``AMX`` buffer
type. In llama.cpp 0.3.36 (the pinned llama-cpp-python) the AMX path faults on Sapphire
Rapids-class virtual machines: ``ggml_backend_amx_mul_mat`` runs ``ldtilecfg`` on an invalid
tile config for every K-quant model (llama.cpp issue #20824, fix PR #26954 not in 0.3.36), and
an MLA (DeepSeek-V2/V3, R1) model aborts in ``sched_reserve`` even at F16. The switch is
all-or-nothing, so the guard turns extra buffer types off only where ggml offers the AMX
buffer type: there the process loses AMX and repacked weights (slower prompt processing on
quantized models, decode mostly unchanged) instead of crashing; on every other CPU nothing
changes and repacking keeps its speed. ``LLAMA_STEER_EXTRA_BUFTS=1`` keeps them on anyway
(a llama.cpp with the upstream fix), ``=0`` turns them off on any CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

__all__ = ["ENV", "decide", "extra_bufts_decision", "guarded_load"]

ENV = "LLAMA_STEER_EXTRA_BUFTS"
_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")
_log = logging.getLogger("llama_steer")

# one lock for every temporary patch of llama-cpp-python's default-params functions (model
# params here, context params in llama.py): two threads loading at once must not interleave
PARAMS_LOCK = threading.RLock()
_decision: tuple[bool, str | None] | None = None
_told = False


def decide(buffer_types: list[str], env: str | None) -> tuple[bool, str | None]:
    """(use_extra_bufts, reason to log or None) for a CPU offering ``buffer_types`` (ggml's
    names, e.g. ["AMX", "CPU_REPACK"]) and the value of LLAMA_STEER_EXTRA_BUFTS."""
    v = (env or "").strip().lower()
    if v in _ON:
        return True, None
    if v in _OFF:
        return False, None
    if v not in ("", "auto"):
        raise ValueError(f"{ENV}={env!r}: use 1 (keep extra buffer types), 0 (off) or auto")
    if any(name.upper().startswith("AMX") for name in buffer_types):
        return False, (
            "llama-steer: this CPU has Intel AMX, whose llama.cpp 0.3.36 path crashes on "
            "K-quant and MLA models (llama.cpp issue #20824); loading with "
            f"use_extra_bufts=False (no AMX or repacked weights). {ENV}=1 keeps them."
        )
    return True, None


def extra_bufts_decision() -> tuple[bool, str | None]:
    """The decision for this process (ggml asked once; the environment read each time)."""
    global _decision
    env = os.environ.get(ENV)
    if env is not None and env.strip().lower() not in ("", "auto"):
        return decide([], env)
    if _decision is None:
        from llama_steer import _native

        _decision = decide(_native.cpu_extra_buffer_types(), None)
    return _decision


@contextlib.contextmanager
def guarded_load():
    """Models loaded by llama-cpp-python inside this block get ``use_extra_bufts=False`` where
    the AMX guard applies (see the module docstring); elsewhere it changes nothing."""
    global _told
    use, reason = extra_bufts_decision()
    if use:
        yield
        return
    import llama_cpp.llama_cpp as lc

    if reason and not _told:
        _told = True
        _log.warning(reason)
    with PARAMS_LOCK:
        original = lc.llama_model_default_params

        def without_extra_bufts():
            p = original()
            p.use_extra_bufts = False
            return p

        lc.llama_model_default_params = without_extra_bufts
        try:
            yield
        finally:
            lc.llama_model_default_params = original

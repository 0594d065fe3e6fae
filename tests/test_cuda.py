"""The CUDA path: the kernel compiles for Hopper (sm_90) and Blackwell (sm_120) with NVRTC and
with nvcc, missing drivers give errors that name the fix, and, where a GPU exists, the kernel's
edits and observations equal the host path's on the same inputs.

CI has no GPU: the compile checks and the error paths run there; GPU tests skip with a reason.
"""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from llama_steer import SteeringError, _cuda, _native

ARCHS = (90, 120)


@pytest.mark.parametrize("arch", ARCHS)
def test_nvrtc_compiles_the_embedded_kernel(arch, tmp_path, monkeypatch):
    pytest.importorskip("cuda.bindings", reason="the test extra brings cuda-bindings + NVRTC")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cubin = _cuda.compile_cubin(arch)
    assert cubin[:4] == b"\x7fELF"
    for name in _cuda.KERNELS:
        assert name.encode() in cubin
    cached = list((tmp_path / "llama-steer" / "cuda").glob(f"*-sm_{arch}.cubin"))
    assert len(cached) == 1 and cached[0].read_bytes() == cubin
    assert _cuda.compile_cubin(arch) == cubin  # from the cache


@pytest.mark.parametrize("arch", ARCHS)
def test_nvcc_compiles_the_embedded_kernel(arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed on this machine")
    src = tmp_path / "steer_kernel.cu"
    src.write_text(_cuda.kernel_source())
    r = subprocess.run(
        [nvcc, f"-arch=sm_{arch}", "-cubin", "-o", str(tmp_path / "k.cubin"), str(src)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr


def test_embedded_kernel_is_the_repo_kernel():
    """The source NVRTC gets at run time is the one in native/ (one source of truth)."""
    import pathlib

    native = pathlib.Path(__file__).resolve().parents[1] / "native"
    src = _cuda.kernel_source()
    assert (native / "steer_math.h").read_text() in src
    kernel = (native / "steer_kernel.cu").read_text().replace('#include "steer_math.h"', "")
    assert kernel in src


def _has_gpu() -> bool:
    try:
        from cuda.bindings import driver

        if int(driver.cuInit(0)[0]) != 0:
            return False
        err, n = driver.cuDeviceGetCount()
        return int(err) == 0 and n > 0
    except Exception:
        return False


def test_no_driver_is_a_clear_error():
    if _has_gpu():
        pytest.skip("a CUDA driver and GPU are present")
    with _native.Hook() as hook:
        hook.bind(2, 2)
        with pytest.raises((SteeringError, _native.NativeError), match="offload_kqv=False"):
            _cuda.attach(hook)
        with pytest.raises(_native.NativeError, match="offload_kqv=False"):
            hook.set_cuda(1, 2, 3)  # libcuda.so.1 cannot be opened here
        with pytest.raises(_native.NativeError, match="CUDA path"):
            hook.edit_device(0, _native.PHASE_PREFILL, 1, (1, 2, 1, 4), (32, 16, 16, 4))


gpu = pytest.mark.skipif(not _has_gpu(), reason="no CUDA GPU on this machine")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape,pad", [((1, 4, 1, 257), 0), ((1, 4, 7, 33), 5), ((2, 3, 2, 16), 3)])
def test_gpu_edit_and_observe_equal_the_host_path(shape, pad):
    from cuda.bindings import driver

    rng = np.random.default_rng(sum(shape))
    S, H, T, KV = shape
    with _native.Hook() as hook:
        hook.bind(2, 4)
        hook.set_scale(1, 0.125)
        loaded = _cuda.attach(hook)
        try:
            heads = rng.random((2, 4)) < 0.6
            heads[1, 0] = True
            bias = rng.normal(size=KV - 3).astype(np.float32) * 4
            region = rng.integers(-1, 3, KV).astype(np.int16)
            hook.set_config(
                heads,
                bias,
                tail=-2.0,
                region=region,
                n_regions=3,
                obs_layers=np.array([False, True]),
                obs_rows=_native.ROWS_ALL,
            )
            base = rng.normal(size=(S, H, T, KV + pad)).astype(np.float32)
            host = base.copy()
            hook.edit_buffer(1, _native.PHASE_PREFILL, host[..., :KV])
            err, dptr = driver.cuMemAlloc(base.nbytes)
            assert int(err) == 0
            try:
                driver.cuMemcpyHtoD(dptr, base, base.nbytes)
                hook.edit_device(1, _native.PHASE_PREFILL, int(dptr), (S, H, T, KV), base.strides)
                dev = np.empty_like(base)
                driver.cuMemcpyDtoH(dev, dptr, base.nbytes)
                np.testing.assert_allclose(dev, host, rtol=1e-6, atol=1e-6)
                probs = np.abs(rng.normal(size=base.shape)).astype(np.float32)
                hook.observe_buffer(1, probs[..., :KV])
                want, _ = hook.read_obs(reset=True)
                driver.cuMemcpyHtoD(dptr, probs, probs.nbytes)
                hook.observe_device(1, int(dptr), (S, H, T, KV), probs.strides)
                got, _ = hook.read_obs(reset=True)
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
            finally:
                driver.cuMemFree(dptr)
        finally:
            hook.close()
            loaded.close()


HEADMAP = str(Path(__file__).resolve().parents[1] / "headmaps" / "organism.json")


def _offloads() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload()) and _has_gpu()


@pytest.mark.gpu
def test_offloaded_steering_equals_the_host_path(organism):
    """The organism fully offloaded and steered by the kernels answers as the same steering on
    the host path (offload_kqv=False); strength 0 on the GPU is the unsteered GPU model."""
    if not _offloads():
        pytest.skip("needs llama-cpp-python built with CUDA and a GPU (-DGGML_CUDA=on)")
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from llama_steer import Llama, Panel, Steering, comics
    from llama_steer.messages import user_message

    model, mmproj = organism

    def make(steering, **kw):
        handler = MTMDChatHandler(clip_model_path=mmproj, verbose=False)
        return Llama(
            model_path=model, chat_handler=handler, steering=steering, n_ctx=1024,
            n_gpu_layers=99, verbose=False, seed=1, **kw,
        )  # fmt: skip

    def ask(llm, img):
        msg = [user_message("What is in this panel?", [img])]
        out = llm.create_chat_completion(msg, max_tokens=16, temperature=0)
        return out["choices"][0]["message"]["content"].strip()

    def steer():
        return Steering(
            headmap=HEADMAP, roi=Panel(1, grid=(2, 3)), mode="redirect",
            strength=12.0, decode_only=True, focus="content",
        )  # fmt: skip

    gpu, host = make(steer()), make(steer(), offload_kqv=False)
    assert gpu._steer_cuda is not None and host._steer_cuda is None
    imgs = [comics.render(comics.make_strip(7 * 10**9 + i, "2x3"), "numpy") for i in range(3)]
    for img in imgs:
        for p in range(2, 7):
            gpu.steering.update(roi=Panel(p, grid=(2, 3)))
            host.steering.update(roi=Panel(p, grid=(2, 3)))
            assert ask(gpu, img) == ask(host, img)
    assert gpu.steering.stats().n_kq_edited > 0
    gpu.steering.update(strength=0.0)
    plain = make(None)
    assert [ask(gpu, im) for im in imgs] == [ask(plain, im) for im in imgs]
    for llm in (gpu, host, plain):
        llm.close()

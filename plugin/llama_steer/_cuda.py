"""The CUDA path: compile the steering kernels with NVRTC and hand them to the native hook.

    kernel_source() ....... the kernel text the native library was built with
    compile_cubin(arch) ... NVRTC -> cubin for sm_<arch>, cached on disk by arch + source hash
    attach(hook, device) .. driver: primary context of `device`, load the cubin for its arch,
                            give the hook its CUfunctions (the hook launches them itself)

Needs the ``cuda`` extra (cuda-bindings + NVRTC wheels) and a CUDA driver, only when attention
tensors live on a GPU. Nothing here runs at import: the GPU is probed by attach() alone.
Every failure raises SteeringError naming the fix (install the extra, or keep attention on
the host with ``offload_kqv=False``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from llama_steer import _native
from llama_steer.steering import SteeringError

__all__ = ["attach", "compile_cubin", "kernel_source"]

KERNELS = ("steer_edit_kernel", "steer_observe_kernel")
_FIX = (
    "install the CUDA extra (pip install 'llama-steer[cuda]'), or pass offload_kqv=False "
    "so attention stays on the host, where the C path steers it"
)


def kernel_source() -> str:
    return _native.ffi.string(_native.lib.steer_cuda_source()).decode()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llama-steer" / "cuda"


def _bindings():
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError as e:
        raise SteeringError(
            f"attention is on a GPU but cuda-bindings is missing ({e}): {_FIX}"
        ) from None
    return driver, nvrtc


def _ok(result, what: str):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise SteeringError(f"{what} failed ({err!r}): {_FIX}")
    return rest[0] if len(rest) == 1 else rest


def compile_cubin(arch: int, cache: bool = True) -> bytes:
    """cubin of the steering kernels for sm_<arch> (e.g. 90 Hopper, 120 Blackwell)."""
    _, nvrtc = _bindings()
    src = kernel_source()
    digest = hashlib.sha256(src.encode()).hexdigest()[:16]
    path = _cache_dir() / f"steer-{digest}-sm_{arch}.cubin"
    if cache and path.exists():
        return path.read_bytes()
    archs = _ok(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")
    if arch not in list(archs):
        raise SteeringError(
            f"this NVRTC cannot target sm_{arch} (it supports {sorted(archs)}): install a newer "
            f"NVRTC (pip install -U 'llama-steer[cuda]'), or pass offload_kqv=False"
        )
    prog = _ok(
        nvrtc.nvrtcCreateProgram(src.encode(), b"steer_kernel.cu", 0, [], []),
        "nvrtcCreateProgram",
    )
    opts = [f"--gpu-architecture=sm_{arch}".encode(), b"--std=c++17", b"-default-device"]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    if int(err) != 0:
        size = _ok(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise SteeringError(
            f"NVRTC could not compile the steering kernel for sm_{arch}:\n"
            f"{log.decode(errors='replace')}"
        )
    size = _ok(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
    cubin = b" " * size
    _ok(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    nvrtc.nvrtcDestroyProgram(prog)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(cubin)
        tmp.replace(path)
    return cubin


class _Loaded:
    """Keeps the module and the primary context alive as long as the hook uses them."""

    def __init__(self, driver, dev, ctx, module):
        self.driver, self.dev, self.ctx, self.module = driver, dev, ctx, module

    def close(self) -> None:
        if self.module is not None:
            self.driver.cuModuleUnload(self.module)
            self.driver.cuDevicePrimaryCtxRelease(self.dev)
            self.module = None


def attach(hook: _native.Hook, device: int = 0) -> _Loaded:
    """Compile (or load from cache) the kernels for ``device``'s arch and give them to the
    hook, which then edits attention tensors that live in that GPU's memory."""
    driver, _ = _bindings()
    try:
        _ok(driver.cuInit(0), "cuInit (is an NVIDIA driver installed?)")
    except RuntimeError as e:  # cuda-bindings raises when libcuda.so cannot be loaded
        raise SteeringError(f"no CUDA driver could be loaded ({e}): {_FIX}") from None
    dev = _ok(driver.cuDeviceGet(device), f"cuDeviceGet({device})")
    attr = driver.CUdevice_attribute
    major = _ok(
        driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
        "cuDeviceGetAttribute",
    )
    minor = _ok(
        driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev),
        "cuDeviceGetAttribute",
    )
    cubin = compile_cubin(int(major) * 10 + int(minor))
    ctx = _ok(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
    _ok(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    module = _ok(driver.cuModuleLoadData(cubin), "cuModuleLoadData")
    fns = [_ok(driver.cuModuleGetFunction(module, k.encode()), k) for k in KERNELS]
    hook.set_cuda(int(ctx), int(fns[0]), int(fns[1]))
    return _Loaded(driver, dev, ctx, module)

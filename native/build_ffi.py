"""cffi build of the native hook (API mode): the module ``llama_steer._steer_native``.

The C API is declared once, in ``native/llama_steer.h``; this script feeds the block between
its CDEF-BEGIN and CDEF-END markers to ``ffibuilder.cdef`` and compiles ``native/steer.c`` and
``native/steer_cuda.c``. The CUDA kernel's source (``steer_math.h`` + ``steer_kernel.cu``) is
embedded in the module as ``steer_cuda_source()``, so the kernel NVRTC compiles at run time
is the one this host code was built with. Used by ``setup.py`` (``cffi_modules``).
"""

import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent


def _cdef() -> str:
    text = (HERE / "llama_steer.h").read_text()
    m = re.search(r"/\* CDEF-BEGIN \*/(.*?)/\* CDEF-END \*/", text, re.S)
    if m is None:
        raise RuntimeError("native/llama_steer.h lost its CDEF-BEGIN/CDEF-END markers")
    # cffi's cdef takes `#define NAME <int>` but not comments inside declarations
    return re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)


def kernel_source() -> str:
    """steer_math.h followed by steer_kernel.cu, as one translation unit for NVRTC."""
    math = (HERE / "steer_math.h").read_text()
    kernel = (HERE / "steer_kernel.cu").read_text().replace('#include "steer_math.h"', "")
    return math + "\n" + kernel


def _c_string(text: str) -> str:
    lines = text.encode().decode("ascii").splitlines()
    esc = [ln.replace("\\", "\\\\").replace('"', '\\"') for ln in lines]
    return "\n".join(f'"{ln}\\n"' for ln in esc)


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "llama_steer._steer_native",
    '#include "llama_steer.h"\n'
    f"static const char steer_kernel_src[] =\n{_c_string(kernel_source())};\n"
    "const char *steer_cuda_source(void) { return steer_kernel_src; }\n",
    sources=[str((HERE / f).relative_to(HERE.parent)) for f in ("steer.c", "steer_cuda.c")],
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["m", "dl"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

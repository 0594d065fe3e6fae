"""cffi build of the native hook (API mode): the module ``llama_steer._steer_native``.

The C API is declared once, in ``native/llama_steer.h``; this script feeds the block between
its CDEF-BEGIN and CDEF-END markers to ``ffibuilder.cdef`` and compiles ``native/steer.c``.
Used by ``setup.py`` (``cffi_modules``); ``python native/build_ffi.py`` builds in place.
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


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "llama_steer._steer_native",
    '#include "llama_steer.h"',
    sources=[str((HERE / "steer.c").relative_to(HERE.parent))],
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["m"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

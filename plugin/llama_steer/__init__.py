"""llama-steer: steer where a model looks, inside llama-cpp-python.

    Llama ............. drop-in ``llama_cpp.Llama`` with ``steering=``
    Steering .......... which heads, which key cells (ROI), which mode, how strong
    Text, Tokens ...... targets in a prompt's text
    ImageTokens, Box, Panel, Region, Saliency
                        targets in an image (see ``roi``); ``parse_roi`` reads the CLI grammar
    SteeringError ..... bad input, named with its fix
    guarded_load ...... context manager for plain llama_cpp.Llama loads: the AMX guard

Modules: ``steering`` (config), ``roi`` (targets, grammar), ``vision`` (image token grids),
``llama`` (the subclass), ``_native`` (cffi), ``_cuda`` (NVRTC kernels), ``comics`` (data).
"""

from llama_steer._errors import SteeringError
from llama_steer._load import guarded_load
from llama_steer._version import __version__
from llama_steer.roi import Box, ImageTokens, Panel, Region, Saliency, Text, Tokens, parse_roi
from llama_steer.steering import Steering

__all__ = [
    "Box",
    "ImageTokens",
    "Llama",
    "Panel",
    "Region",
    "Saliency",
    "Steering",
    "SteeringError",
    "Text",
    "Tokens",
    "__version__",
    "guarded_load",
    "parse_roi",
]


def __getattr__(name: str):
    # importing llama_cpp loads libllama; defer it until Llama is asked for
    if name == "Llama":
        from llama_steer.llama import Llama

        return Llama
    raise AttributeError(name)

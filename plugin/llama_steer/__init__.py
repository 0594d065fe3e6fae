"""llama-steer: steer where a model looks, inside llama-cpp-python.

    Llama ............. drop-in ``llama_cpp.Llama`` with ``steering=``
    Steering .......... the runtime handle: a config attached to a model; update(), observe()
    SteeringConfig .... which heads, which key cells (ROI), which mode, how strong (a value)
    Observer .......... attention of the heads on named regions, per token
    Headmap ........... ranked heads of one model (``find_headmap`` picks the model's)
    Text, Tokens ...... targets in a prompt's text
    ImageTokens, Box, Panel, Region, Saliency
                        targets in an image (see ``roi``); ``parse_roi`` reads the CLI grammar
    SteeringError ..... bad input, named with its fix
    guarded_load ...... context manager for plain llama_cpp.Llama loads: the AMX guard

Layers: ``_native`` (the only cffi user) -> values: ``roi`` (targets, grammar), ``vision``
(image token grids), ``headmap``, ``config`` -> runtime: ``steering``, ``llama`` (the
subclass), ``messages`` (chat messages with images) -> apps: ``llama_steer.apps`` (the
``llama-steer`` commands), which use only the public names here.
"""

from llama_steer._errors import SteeringError
from llama_steer._load import guarded_load
from llama_steer._version import __version__
from llama_steer.config import SteeringConfig
from llama_steer.headmap import Headmap, find_headmap
from llama_steer.roi import Box, ImageTokens, Panel, Region, Saliency, Text, Tokens, parse_roi
from llama_steer.steering import Observer, Steering

__all__ = [
    "Box",
    "Headmap",
    "ImageTokens",
    "Llama",
    "Observer",
    "Panel",
    "Region",
    "Saliency",
    "Steering",
    "SteeringConfig",
    "SteeringError",
    "Text",
    "Tokens",
    "__version__",
    "find_headmap",
    "guarded_load",
    "parse_roi",
]


def __getattr__(name: str):
    # importing llama_cpp loads libllama; defer it until Llama is asked for
    if name == "Llama":
        from llama_steer.llama import Llama

        return Llama
    raise AttributeError(name)

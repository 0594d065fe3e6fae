"""llama-steer: steer where a model looks, inside llama-cpp-python.

    Llama ......... drop-in ``llama_cpp.Llama`` with ``steering=``
    Steering ...... which heads, which key cells (ROI), which mode, how strong
    Text, Tokens .. targets for text prompts
    SteeringError . bad input, named with its fix

Modules: ``steering`` (config and targets), ``llama`` (the subclass), ``_native`` (cffi).
"""

from llama_steer._version import __version__
from llama_steer.steering import Steering, SteeringError, Text, Tokens

__all__ = ["Llama", "Steering", "SteeringError", "Text", "Tokens", "__version__"]


def __getattr__(name: str):
    # importing llama_cpp loads libllama; defer it until Llama is asked for
    if name == "Llama":
        from llama_steer.llama import Llama

        return Llama
    raise AttributeError(name)

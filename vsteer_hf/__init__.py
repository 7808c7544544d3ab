"""vsteer_hf: value-head safety steering for Hugging Face transformers.

Value-filtered decoding (VFD) and dynamic abstention inside `model.generate(..., value_steer=cfg)`.
Importing the package loads neither vLLM nor any judge.
"""

from vsteer_hf import policy
from vsteer_hf.config import ValueSteerConfig
from vsteer_hf.head import HeadCard, ValueHead, load_value_head
from vsteer_hf.hf.decode import ValueSteerOutput
from vsteer_hf.hf.enable import disable_value_steer, enable_value_steer

__all__ = [
    "HeadCard",
    "ValueHead",
    "ValueSteerConfig",
    "ValueSteerOutput",
    "disable_value_steer",
    "enable_value_steer",
    "load_value_head",
    "policy",
]
__version__ = "0.1.0"

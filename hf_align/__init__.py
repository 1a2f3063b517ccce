"""hf-align: make a transformer's layers first-class on the Hugging Face stack."""

__version__ = "0.1.0"

from .layers import LayerView, register_family, supported_families  # noqa: E402
from .trainers import AlignedTrainer, AlignedTrainingArguments  # noqa: E402

__all__ = [
    "AlignedTrainer",
    "AlignedTrainingArguments",
    "LayerView",
    "register_family",
    "supported_families",
    "__version__",
]

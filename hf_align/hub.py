"""Loading and sharing helpers: safetensors-only local loading, model cards with layer-wise results."""

from __future__ import annotations

import os
from typing import Any

import transformers


def load_local_model(path: str | os.PathLike, config: Any = None, **kwargs: Any):
    """Load a saved transformers model from a local folder: safetensors only, no remote code.

    The class is the one named in ``config.architectures`` (it must be a transformers class, or an Auto
    class registered by hf-align); pickled ``.bin`` weights are refused.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"expected a local model folder, got {path!r}")
    if config is None:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        raise ValueError(f"{path}/config.json names no `architectures`; cannot tell which model class to load")
    cls = getattr(transformers, architectures[0], None)
    if cls is None:
        raise ValueError(f"{architectures[0]!r} is not a transformers class; hf-align loads no remote code")
    return cls.from_pretrained(path, config=config, use_safetensors=True, trust_remote_code=False, **kwargs)

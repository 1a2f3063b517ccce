"""``pipeline("early-exit-classification")``: text or image classification that stops at the first sure block.

    import hf_align                                   # registers the task
    from transformers import pipeline

    clf = pipeline("early-exit-classification", model="path/or/repo", threshold=0.9)
    clf("some text")      # [{'label': 'stats', 'score': 0.97, 'exit_layer': 2, 'num_layers': 6}]
    clf([img1, img2], batch_size=2, top_k=3)

The model's own tokenizer or image processor prepares the inputs; :class:`~hf_align.EarlyExitModel` runs the
blocks and exits per sample. Exit settings (``policy``, ``threshold``, ``patience``, ``exit_layer``,
``min_layer``) default to the model's ``config.early_exit`` and can be given at construction or per call.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import numpy as np
import torch
from transformers import Pipeline

from ..modeling.early_exit import EarlyExitConfig, EarlyExitModel

_SETTINGS = ("policy", "threshold", "patience", "exit_layer", "min_layer")

# What the saved folder's `early_exit_classification.py` contains: an import of the installed library (for
# `trust_remote_code=True` users on the Hub); nothing else is executed from a saved folder.
_SHIM = '''"""Shim for transformers' custom pipelines: uses the installed hf-align package (pip install hf-align)."""
from hf_align.pipelines.early_exit_classification import EarlyExitClassificationPipeline  # noqa: F401
'''


def _is_image(x: Any) -> bool:
    try:
        from PIL import Image

        if isinstance(x, Image.Image):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(x, (np.ndarray, torch.Tensor))


class EarlyExitClassificationPipeline(Pipeline):
    """Text / image classification with early exit through the model's shared head (or a multi-exit model)."""

    def __init__(self, model, *args, **kwargs):
        settings = {k: kwargs.pop(k) for k in _SETTINGS if k in kwargs}
        if isinstance(model, EarlyExitModel):
            settings = {**vars(model.settings), **settings}
            model = model.model
        super().__init__(model, *args, **kwargs)
        self.early_exit = EarlyExitModel(self.model, **settings)
        self.is_image_model = self.early_exit.view.task == "image-classification"
        if self.is_image_model and self.image_processor is None:
            raise ValueError("an image classifier needs an image processor: pass image_processor= (none was found "
                             "with the model)")
        if not self.is_image_model and self.tokenizer is None:
            raise ValueError("a text classifier needs a tokenizer: pass tokenizer= (none was found with the model)")

    def _sanitize_parameters(self, top_k=None, truncation=None, max_length=None, **kwargs):
        preprocess = {}
        if truncation is not None:
            preprocess["truncation"] = truncation
        if max_length is not None:
            preprocess["max_length"] = max_length
        unknown = set(kwargs) - set(_SETTINGS)
        if unknown:
            raise ValueError(f"unknown argument(s) {sorted(unknown)}; exit settings are {list(_SETTINGS)}")
        forward = {k: v for k, v in kwargs.items() if v is not None}
        if forward:  # validate now, before any input is processed
            EarlyExitConfig.from_dict({**vars(self.early_exit.settings), **forward}).validate(self.early_exit.num_layers)
        postprocess = {}
        if top_k is not None:
            if not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
            postprocess["top_k"] = top_k
        return preprocess, forward, postprocess

    def preprocess(self, inputs, truncation=True, max_length=None):
        if self.is_image_model:
            if isinstance(inputs, str) and not (os.path.exists(inputs) or inputs.startswith(("http://", "https://"))):
                raise ValueError(f"{type(self.model).__name__} is an image classifier but got text: {inputs[:50]!r}. "
                                 "Expected a PIL image, a numpy array, a tensor, or a path/URL to an image.")
            if isinstance(inputs, str):
                from transformers.image_utils import load_image

                inputs = load_image(inputs)
            elif not _is_image(inputs):
                raise ValueError(f"expected an image (PIL, numpy array, tensor or path), got {type(inputs).__name__}")
            return self.image_processor(images=inputs, return_tensors="pt")
        if _is_image(inputs):
            raise ValueError(f"{type(self.model).__name__} is a text classifier but got an image "
                             f"({type(inputs).__name__}); expected a string")
        if not isinstance(inputs, str):
            raise ValueError(f"a text classifier expects a string, got {type(inputs).__name__}")
        return self.tokenizer(inputs, return_tensors="pt", truncation=truncation, max_length=max_length)

    def _forward(self, model_inputs, **settings):
        early_exit = self.early_exit
        if settings:
            saved = early_exit.settings
            early_exit.set_exit(**settings)
        try:
            out = early_exit(**model_inputs)
        finally:
            if settings:
                early_exit.settings = saved
        return {"logits": out.logits, "exit_layers": out.exit_layers}

    def postprocess(self, model_outputs, top_k: int = 1):
        scores = model_outputs["logits"][0].float().softmax(-1)
        exit_layer = int(model_outputs["exit_layers"].reshape(-1)[0])
        id2label = self.early_exit.view.hf_model.config.id2label
        top = scores.topk(min(top_k, scores.numel()))
        return [{"label": id2label.get(int(i), str(int(i))), "score": float(s), "exit_layer": exit_layer,
                 "num_layers": self.early_exit.num_layers} for s, i in zip(top.values, top.indices)]

    def save_pretrained(self, save_directory, **kwargs):
        """Save model (with ``config.early_exit``), processors and ``custom_pipelines`` so the folder can be shared.

        Like transformers' ``Pipeline.save_pretrained`` for registered custom pipelines, but the code written
        beside the model is a two-line shim that imports the installed hf-align, not a copy of this module.
        Reload without running any code from the folder::

            pipeline("early-exit-classification", model=folder, pipeline_class=EarlyExitClassificationPipeline)
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a directory, got the file {save_directory!r}")
        config = self.early_exit.config
        previous = getattr(config, "custom_pipelines", None)
        config.custom_pipelines = {
            "early-exit-classification": {
                "impl": "early_exit_classification.EarlyExitClassificationPipeline",
                "pt": ("AutoModelForSequenceClassification", "AutoModelForImageClassification"),
                "type": "multimodal",
            }
        }
        try:
            os.makedirs(save_directory, exist_ok=True)
            self.early_exit.save_pretrained(save_directory, **kwargs)  # writes config.early_exit too
            for component in (self.tokenizer, self.image_processor):
                if component is not None:
                    component.save_pretrained(save_directory, **kwargs)
            path = os.path.join(save_directory, "early_exit_classification.py")
            with open(path + ".tmp", "w") as f:
                f.write(_SHIM)
            shutil.move(path + ".tmp", path)
        except Exception:
            config.custom_pipelines = previous
            raise


def register_pipeline() -> None:
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification
    from transformers.pipelines import PIPELINE_REGISTRY

    if "early-exit-classification" not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(
            "early-exit-classification",
            pipeline_class=EarlyExitClassificationPipeline,
            pt_model=(AutoModelForSequenceClassification, AutoModelForImageClassification),
            type="multimodal",
        )

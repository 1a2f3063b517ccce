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
from typing import Any

import numpy as np
import torch
from transformers import Pipeline

from .._registration import PIPELINES, when_imported
from ..hub import REMOTE_CODE_FILE, REMOTE_TASK, remote_pipeline_entry, write_remote_code  # noqa: F401 (re-exported)
from ..modeling.early_exit import EarlyExitModel, PickledWeightsError, refuse_pickled_weights

_SETTINGS = ("policy", "threshold", "patience", "exit_layer", "min_layer")

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
        calibration = None
        if isinstance(model, EarlyExitModel):
            settings = {**vars(model.settings), **settings}
            calibration = model.calibration
            model = model.model
        super().__init__(model, *args, **kwargs)
        self.early_exit = EarlyExitModel(self.model, **settings)
        self.early_exit.calibration = calibration
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
            self.early_exit.exit_settings(**forward)
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
            # a PIL image in the model's channel count (an RGB photo for a grey-scale model, RGBA for an RGB one)
            mode = {1: "L", 3: "RGB"}.get(getattr(self.model.config, "num_channels", None))
            if mode is not None and hasattr(inputs, "convert") and getattr(inputs, "mode", mode) != mode:
                inputs = inputs.convert(mode)
            return self.image_processor(images=inputs, return_tensors="pt")
        if _is_image(inputs):
            raise ValueError(f"{type(self.model).__name__} is a text classifier but got an image "
                             f"({type(inputs).__name__}); expected a string")
        if not isinstance(inputs, str):
            raise ValueError(f"a text classifier expects a string, got {type(inputs).__name__}")
        return self.tokenizer(inputs, return_tensors="pt", truncation=truncation, max_length=max_length)

    def _forward(self, model_inputs, **settings):
        # the settings are this call's arguments: the shared model is never changed, so threads may share it
        out = self.early_exit(**model_inputs, **settings)
        return {"logits": out.logits, "exit_layers": out.exit_layers}

    def postprocess(self, model_outputs, top_k: int = 1):
        scores = model_outputs["logits"][0].float().softmax(-1)
        exit_layer = int(model_outputs["exit_layers"].reshape(-1)[0])
        id2label = self.early_exit.view.hf_model.config.id2label
        top = scores.topk(min(top_k, scores.numel()))
        return [{"label": id2label.get(int(i), str(int(i))), "score": float(s), "exit_layer": exit_layer,
                 "num_layers": self.early_exit.num_layers} for s, i in zip(top.values, top.indices)]

    def save_pretrained(self, save_directory, *, card_data=None, license: str | None = None, language=None,
                        datasets=None, base_model=None, tags=None, **kwargs):
        """Save model (with ``config.early_exit``), tokenizer / image processor and a model card, so that

            pipeline("early-exit-classification", model=folder)      # after `import hf_align`

        loads it back with the same settings, and the folder stays a plain transformers model without hf-align.
        Users who do not import hf-align can use ``pipeline(model=folder, trust_remote_code=True)``: the only code
        written (``early_exit_classification.py``) imports the installed hf-align. Nothing is set on the live model
        or config. Card metadata as in
        :meth:`~hf_align.EarlyExitModel.save_pretrained`.
        """
        from ..hub import early_exit_card, user_metadata

        repo = kwargs.pop("_card_repo", None)
        metadata = user_metadata(card_data, license=license, language=language, datasets=datasets,
                                 base_model=base_model, tags=tags)
        if os.path.isfile(os.fspath(save_directory)):
            raise ValueError(f"save_directory must be a directory, got the file {os.fspath(save_directory)!r}")
        os.makedirs(save_directory, exist_ok=True)
        self.early_exit.save_pretrained(save_directory, model_card=False, **kwargs)
        for component in (self.tokenizer, self.image_processor):
            if component is not None:
                component.save_pretrained(save_directory)
        early_exit_card(save_directory, self.early_exit, metadata=metadata, repo=repo,
                        calibration=self.early_exit.calibration)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: str | bool | None = None, revision: str | None = None,
                    create_pr: bool = False, max_shard_size: int | str | None = "50GB", **card_metadata):
        """Push model, processor and model card to ``repo_id`` in one commit (what :meth:`save_pretrained` writes)."""
        from ..hub import push_to_hub

        return push_to_hub(self, repo_id, default_message="Upload early-exit pipeline", save_kwargs={"max_shard_size": max_shard_size},
                           commit_message=commit_message, commit_description=commit_description, private=private,
                           token=token, revision=revision, create_pr=create_pr, **card_metadata)


_HUB_ARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder")


def _safetensors_only(auto: type) -> type:
    """``auto`` whose ``from_pretrained`` refuses a folder / repo with only pickled weights before reading anything.

    transformers' pipeline loader tries the task's classes, catches OSError/ValueError/TypeError/RuntimeError and
    then tries the class in ``config.architectures``, which would read a ``pytorch_model.bin``; so the check runs
    here, first, and raises :class:`~hf_align.modeling.early_exit.PickledWeightsError` (which it does not catch).
    The class keeps ``auto``'s name (a saved pipeline's ``custom_pipelines`` entry names transformers' class)."""

    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        if kwargs.get("use_safetensors") is False:
            raise PickledWeightsError("hf-align loads safetensors weights only: use_safetensors=False is refused")
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            refuse_pickled_weights(pretrained_model_name_or_path, **{k: kwargs[k] for k in _HUB_ARGS if k in kwargs})
            kwargs["use_safetensors"] = True
        return auto.from_pretrained.__func__(cls, pretrained_model_name_or_path, *model_args, **kwargs)

    return type(auto.__name__, (auto,), {"from_pretrained": classmethod(from_pretrained),
                                         "__module__": __name__, "__qualname__": auto.__name__,
                                         "__doc__": auto.__doc__})


def register_pipeline() -> None:
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification
    from transformers.pipelines import PIPELINE_REGISTRY

    if "early-exit-classification" not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(
            "early-exit-classification",
            pipeline_class=EarlyExitClassificationPipeline,
            pt_model=(_safetensors_only(AutoModelForSequenceClassification),
                      _safetensors_only(AutoModelForImageClassification)),
            type="multimodal",
        )


# importing this module registers it: now, or once the target module is imported (it may be half-imported right now)
when_imported(PIPELINES, register_pipeline)

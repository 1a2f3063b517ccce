"""The standard multi-exit baseline: a separate classifier after every block (PABEE / DeeBERT style).

The aligned-training paper compares one shared head against multi-exit architectures that add a classifier
per exit. :class:`MultiExitModel` wraps any supported transformers classifier (PEFT-style: the backbone is
not copied) and adds ``exit_heads``: one ``nn.Linear`` per block 1..L-1, shaped like the model's own final
linear layer. Everything before that layer (final norm, pooling, pooler) stays shared, as in PABEE; block L
uses the model's own classifier, so the wrapper's forward is exactly the backbone's.

It is a registered Auto model (``model_type="hf-align-multi-exit"``): ``AutoModelForSequenceClassification`` /
``AutoModelForImageClassification.from_pretrained(folder)`` load it after ``import hf_align``; it trains with
:class:`~hf_align.AlignedTrainer` (PABEE's loss ``sum_i i * L_i / sum_i i`` is ``layer_weights="linear"``)
and serves with :class:`~hf_align.EarlyExitModel` and ``pipeline("early-exit-classification")``.
"""

from __future__ import annotations

import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from .._registration import AUTO_CLASSES, when_imported
from ..layers import LayerView

__all__ = ["MultiExitConfig", "MultiExitModel", "add_exit_heads", "load_multi_exit"]


class MultiExitConfig(PretrainedConfig):
    """Config of :class:`MultiExitModel`: the backbone's config (as a dict) and its transformers class name."""

    model_type = "hf-align-multi-exit"
    has_no_defaults_at_init = True

    def __init__(self, backbone_config: dict | None = None, backbone_architecture: str | None = None, **kwargs):
        if isinstance(backbone_config, PretrainedConfig):
            backbone_config = backbone_config.to_dict()
        self.backbone_config = backbone_config
        self.backbone_architecture = backbone_architecture
        if backbone_config is not None:
            for key in ("id2label", "label2id"):
                kwargs.setdefault(key, backbone_config.get(key))
            kwargs.setdefault("num_hidden_layers", backbone_config.get("num_hidden_layers"))
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        super().__init__(**kwargs)

    def get_backbone_config(self) -> PretrainedConfig:
        if self.backbone_config is None:
            raise ValueError("MultiExitConfig has no backbone_config")
        config = dict(self.backbone_config)
        return AutoConfig.for_model(config.pop("model_type"), **config)


def _backbone_class(name: str | None):
    cls = getattr(transformers, name or "", None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, PreTrainedModel):
        raise ValueError(f"backbone_architecture {name!r} is not a transformers model class (no remote code is loaded)")
    return cls


class MultiExitModel(PreTrainedModel):
    """A supported transformers classifier plus one separate final linear layer per block 1..L-1."""

    config_class = MultiExitConfig
    base_model_prefix = "multi_exit"
    main_input_name = "input_ids"

    def __init__(self, config: MultiExitConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        if backbone is None:
            backbone = _backbone_class(config.backbone_architecture)(config.get_backbone_config())
        self.backbone = backbone
        self.main_input_name = backbone.main_input_name
        view = LayerView(backbone, check=False)
        final = view.classifier
        if not isinstance(final, nn.Linear):
            raise ValueError(f"the head's final layer must be nn.Linear to add exit heads, got {type(final).__name__}")
        self.exit_heads = nn.ModuleList(
            nn.Linear(final.in_features, final.out_features, bias=final.bias is not None) for _ in range(view.num_layers - 1)
        )
        for head in self.exit_heads:
            self._init_exit_head(head)
        self.post_init()

    def _init_exit_head(self, head: nn.Linear) -> None:
        std = getattr(self.backbone.config, "initializer_range", 0.02)
        nn.init.normal_(head.weight, std=std)
        if head.bias is not None:
            nn.init.zeros_(head.bias)

    def _init_weights(self, module):
        if any(module is head for head in getattr(self, "exit_heads", [])):
            self._init_exit_head(module)

    def layer_classifier(self, layer: int) -> nn.Module | None:
        """The final linear layer to use at block ``layer`` (1-based): ``exit_heads[layer - 1]`` for
        ``layer < L``; ``None`` (the model's own classifier) at block L. :meth:`hf_align.LayerView.head` asks
        every wrapper along the chain for this, so the layer view itself knows nothing of multi-exit models."""
        if 1 <= layer <= len(self.exit_heads):
            return self.exit_heads[layer - 1]
        return None

    def get_base_model(self) -> PreTrainedModel:
        return self.backbone

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, pixel_values=None,
                inputs_embeds=None, labels=None, **kwargs):
        """The backbone's forward (block L uses the model's own classifier); the named arguments are those of
        transformers' text and image classifiers, so Trainer keeps the right dataset columns."""
        named = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                     position_ids=position_ids, pixel_values=pixel_values, inputs_embeds=inputs_embeds, labels=labels)
        return self.backbone(**{k: v for k, v in named.items() if v is not None}, **kwargs)


def add_exit_heads(model: PreTrainedModel) -> MultiExitModel:
    """Wrap ``model`` (not copied) with freshly initialised per-layer exit heads."""
    LayerView(model)  # supported and self-checking, or a clear error
    config = MultiExitConfig(backbone_config=model.config, backbone_architecture=type(model).__name__)
    return MultiExitModel(config, backbone=model)


def load_multi_exit(path, **kwargs) -> MultiExitModel:
    """Load a saved :class:`MultiExitModel` (safetensors only)."""
    return MultiExitModel.from_pretrained(path, use_safetensors=True, trust_remote_code=False, **kwargs)


def register_auto_classes() -> None:
    """Register the multi-exit model with transformers' Auto classes (called on ``import hf_align``)."""
    from transformers import AutoModel, AutoModelForImageClassification, AutoModelForSequenceClassification

    try:
        AutoConfig.register(MultiExitConfig.model_type, MultiExitConfig)
    except ValueError:  # already registered
        pass
    for auto in (AutoModel, AutoModelForSequenceClassification, AutoModelForImageClassification):
        try:
            auto.register(MultiExitConfig, MultiExitModel)
        except ValueError:
            pass


# importing this module registers it: now, or once the target module is imported (it may be half-imported right now)
when_imported(AUTO_CLASSES, register_auto_classes)

"""Tiny random models of every supported family (no download), shared by the tests."""

from __future__ import annotations

import torch
import transformers as T

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, vocab_size=99)

# (family, config class, config overrides)
FAMILIES = {
    "bert": (T.BertConfig, {}),
    "roberta": (T.RobertaConfig, {}),
    "xlm-roberta": (T.XLMRobertaConfig, {}),
    "distilbert": (T.DistilBertConfig, dict(dim=32, n_layers=3, n_heads=4, hidden_dim=37, vocab_size=99)),
    "electra": (T.ElectraConfig, dict(embedding_size=16)),
    "deberta-v2": (T.DebertaV2Config, dict(relative_attention=True, position_biased_input=False, max_relative_positions=16, pos_att_type=["p2c", "c2p"])),
    "vit": (T.ViTConfig, dict(image_size=16, patch_size=4, num_channels=3)),
    "deit": (T.DeiTConfig, dict(image_size=16, patch_size=4, num_channels=3)),
    "gpt2": (T.GPT2Config, dict(n_embd=32, n_layer=3, n_head=4, vocab_size=99, pad_token_id=0, n_positions=64)),
    "llama": (T.LlamaConfig, dict(num_key_value_heads=2, pad_token_id=0, max_position_embeddings=64)),
    "mistral": (T.MistralConfig, dict(num_key_value_heads=2, pad_token_id=0, max_position_embeddings=64)),
    "qwen2": (T.Qwen2Config, dict(num_key_value_heads=2, pad_token_id=0, max_position_embeddings=64)),
}

# every (family, model class) pair the registry covers
CASES = [
    ("bert", "BertForSequenceClassification"),
    ("roberta", "RobertaForSequenceClassification"),
    ("roberta", "RobertaForCausalLM"),
    ("xlm-roberta", "XLMRobertaForSequenceClassification"),
    ("distilbert", "DistilBertForSequenceClassification"),
    ("electra", "ElectraForSequenceClassification"),
    ("electra", "ElectraForCausalLM"),
    ("deberta-v2", "DebertaV2ForSequenceClassification"),
    ("vit", "ViTForImageClassification"),
    ("deit", "DeiTForImageClassification"),
    ("gpt2", "GPT2ForSequenceClassification"),
    ("gpt2", "GPT2LMHeadModel"),
    ("llama", "LlamaForSequenceClassification"),
    ("llama", "LlamaForCausalLM"),
    ("mistral", "MistralForSequenceClassification"),
    ("mistral", "MistralForCausalLM"),
    ("qwen2", "Qwen2ForSequenceClassification"),
    ("qwen2", "Qwen2ForCausalLM"),
]


def tiny_config(family: str, **overrides):
    config_cls, extra = FAMILIES[family]
    kwargs = {} if family in ("distilbert", "gpt2") else dict(SMALL)
    if family in ("vit", "deit"):
        kwargs.pop("vocab_size")
    kwargs.update(extra)
    kwargs["num_labels"] = 3
    kwargs.update(overrides)
    return config_cls(**kwargs)


def tiny_model(family: str, class_name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if class_name in ("RobertaForCausalLM", "ElectraForCausalLM"):
        overrides.setdefault("is_decoder", True)
    config = tiny_config(family, **overrides)
    model = getattr(T, class_name)(config)
    return model.eval()

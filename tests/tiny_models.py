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

# The 2024-2026 families (tests/test_families.py). Decoders: pad id 0, GQA where the family has it; hybrid
# attention with a sliding window (4) smaller than the test sequences, so sliding and global masks differ.
_DEC = dict(num_key_value_heads=2, pad_token_id=0, max_position_embeddings=64)
_HYBRID = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
_MOE = dict(experts_implementation="eager")  # grouped_mm kernels refuse float64
DECODER_FAMILIES = {
    "qwen3": (T.Qwen3Config, dict(_DEC, layer_types=_HYBRID, use_sliding_window=True, sliding_window=4)),
    "gemma": (T.GemmaConfig, dict(_DEC, head_dim=8)),
    "gemma2": (T.Gemma2Config, dict(_DEC, head_dim=8, sliding_window=4, layer_types=_HYBRID,
                                    final_logit_softcapping=2.0, attn_logit_softcapping=5.0)),
    "gemma3": (T.Gemma3TextConfig, dict(_DEC, head_dim=8, sliding_window=4, layer_types=_HYBRID,
                                        final_logit_softcapping=2.0)),
    "phi3": (T.Phi3Config, dict(_DEC, eos_token_id=None, bos_token_id=None)),
    "phi": (T.PhiConfig, dict(_DEC, partial_rotary_factor=0.5)),
    "olmo": (T.OlmoConfig, dict(_DEC, eos_token_id=None)),
    "olmo2": (T.Olmo2Config, dict(_DEC)),
    "gpt-neox": (T.GPTNeoXConfig, dict(_DEC, rotary_pct=0.5, use_parallel_residual=True)),
    "opt": (T.OPTConfig, dict(pad_token_id=0, max_position_embeddings=64, ffn_dim=37, word_embed_proj_dim=16)),
    "falcon": (T.FalconConfig, dict(pad_token_id=0, parallel_attn=True, new_decoder_architecture=True,
                                    num_kv_heads=2)),
    "falcon-alibi": (T.FalconConfig, dict(pad_token_id=0, alibi=True, parallel_attn=False, multi_query=True)),
    "stablelm": (T.StableLmConfig, dict(_DEC, partial_rotary_factor=0.5, use_qkv_bias=True)),
    "granite": (T.GraniteConfig, dict(_DEC, logits_scaling=2.0, embedding_multiplier=3.0, residual_multiplier=0.5,
                                      attention_multiplier=0.2, bos_token_id=None, eos_token_id=None)),
    "starcoder2": (T.Starcoder2Config, dict(_DEC, bos_token_id=None, eos_token_id=None)),
    "mixtral": (T.MixtralConfig, dict(_DEC, **_MOE, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-moe": (T.Qwen2MoeConfig, dict(_DEC, **_MOE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=20)),
    "qwen3-moe": (T.Qwen3MoeConfig, dict(_DEC, **_MOE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)),
    "cohere": (T.CohereConfig, dict(_DEC, logit_scale=0.5, bos_token_id=None, eos_token_id=None)),
    "bloom": (T.BloomConfig, dict(pad_token_id=0, bos_token_id=None, eos_token_id=None)),
    "gpt-bigcode": (T.GPTBigCodeConfig, dict(pad_token_id=0, n_positions=64, multi_query=True, bos_token_id=None,
                                             eos_token_id=None)),
    "gpt-neo": (T.GPTNeoConfig, dict(pad_token_id=0, max_position_embeddings=64, window_size=4, bos_token_id=None,
                                     eos_token_id=None, attention_types=[[["global", "local"], 2]])),
    "llama4": (T.Llama4TextConfig, dict(_DEC, **_MOE, head_dim=8, intermediate_size_mlp=40, attention_chunk_size=4,
                                        num_local_experts=2, interleave_moe_layer_step=2, no_rope_layers=[1, 1, 1, 0],
                                        bos_token_id=None, eos_token_id=None)),
    "gpt-j": (T.GPTJConfig, dict(pad_token_id=0, n_positions=64, rotary_dim=4, bos_token_id=None, eos_token_id=None)),
}
# (family key, transformers class prefix) -> registry family name where they differ
DECODER_CLASSES = {
    "qwen3": "Qwen3", "gemma": "Gemma", "gemma2": "Gemma2", "gemma3": "Gemma3", "phi3": "Phi3", "phi": "Phi",
    "olmo": "Olmo", "olmo2": "Olmo2", "gpt-neox": "GPTNeoX", "opt": "OPT", "falcon": "Falcon", "falcon-alibi": "Falcon",
    "stablelm": "StableLm", "granite": "Granite", "starcoder2": "Starcoder2", "mixtral": "Mixtral",
    "qwen2-moe": "Qwen2Moe", "qwen3-moe": "Qwen3Moe", "cohere": "Cohere", "bloom": "Bloom",
    "gpt-bigcode": "GPTBigCode", "gpt-neo": "GPTNeo", "gpt-j": "GPTJ", "llama4": "Llama4",
}
ENCODER_FAMILIES = {
    "modernbert": (T.ModernBertConfig, dict(vocab_size=99, pad_token_id=0, global_attn_every_n_layers=2,
                                            local_attention=4, max_position_embeddings=64, bos_token_id=None,
                                            eos_token_id=None, cls_token_id=None, sep_token_id=None)),
    "mpnet": (T.MPNetConfig, dict(vocab_size=99)),
    "albert": (T.AlbertConfig, dict(vocab_size=99, embedding_size=16, num_hidden_groups=2)),
    "dinov2": (T.Dinov2Config, dict(image_size=16, patch_size=4)),
    "beit": (T.BeitConfig, dict(image_size=16, patch_size=4, use_relative_position_bias=True)),
    "clip-vision": (T.CLIPVisionConfig, dict(image_size=16, patch_size=4)),
    "siglip-vision": (T.SiglipVisionConfig, dict(image_size=16, patch_size=4)),
    # image classifiers on the towers: the dual config, blocks configured by its vision_config
    "clip": (T.CLIPConfig, dict(image_size=16, patch_size=4)),
    "siglip": (T.SiglipConfig, dict(image_size=16, patch_size=4)),
}
_TEXT_TOWER = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, vocab_size=50)
ENCODER_CLASSES = {
    "modernbert": ("ModernBertForSequenceClassification", "ModernBertModel"),
    "mpnet": ("MPNetForSequenceClassification", "MPNetModel"),
    "albert": ("AlbertForSequenceClassification", "AlbertModel"),
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Model"),
    "beit": ("BeitForImageClassification", "BeitModel"),
    "clip-vision": (None, "CLIPVisionModel"),
    "siglip-vision": (None, "SiglipVisionModel"),
    "clip": ("CLIPForImageClassification", None),
    "siglip": ("SiglipForImageClassification", None),
}


def tiny_decoder(family: str, suffix: str = "ForCausalLM", num_layers: int = 4, seed: int = 0,
                 dtype: torch.dtype = torch.float64, **overrides):
    """A tiny random decoder of a 2024-2026 family (``suffix``: "ForCausalLM", "ForSequenceClassification",
    "Model"), in float64 by default (no near-tie can flip an argmax)."""
    config_cls, extra = DECODER_FAMILIES[family]
    kwargs = dict(SMALL, num_labels=3, initializer_range=0.2)
    kwargs.update(extra)
    if "layer_types" in kwargs:
        kwargs["layer_types"] = kwargs["layer_types"][:num_layers]
    kwargs.update(num_hidden_layers=num_layers, **overrides)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = getattr(T, DECODER_CLASSES[family] + suffix)(config)
    return model.to(dtype).eval()


def tiny_encoder(family: str, head: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    config_cls, extra = ENCODER_FAMILIES[family]
    kwargs = dict(SMALL, num_labels=3)
    kwargs.pop("vocab_size")
    kwargs.update(extra)
    kwargs.update(overrides)
    if family == "albert":
        kwargs.setdefault("num_hidden_layers", 4)
    if family in ("clip", "siglip"):
        config = config_cls(text_config=_TEXT_TOWER, vision_config={k: v for k, v in kwargs.items() if k != "num_labels"},
                            num_labels=kwargs["num_labels"])
    else:
        config = config_cls(**kwargs)
    torch.manual_seed(seed)
    name = ENCODER_CLASSES[family][0 if head else 1]
    return getattr(T, name)(config).to(dtype).eval()

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


def left_padded_prompts(batch: int, vocab: int = 99):
    """Up to 4 prompts of 7 tokens, left-padded with id 0 to ragged lengths 7, 5, 3, 6: (ids, attention_mask)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    mask[3, :1] = 0
    ids[mask == 0] = 0  # left padding with pad id 0
    return ids[:batch], mask[:batch]

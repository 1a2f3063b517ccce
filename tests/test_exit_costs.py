"""Cost per exit depth: counted FLOPs vs closed-form counts written from the configs, memory, the table."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

import hf_align
from hf_align.generation.cost import peak_memory

B, T = 2, 12


def closed_form(family: str, config, mode: str, kv: int = T) -> tuple[int, int, int]:
    """(embedding, per-block, head) FLOPs of one call, from the config alone (2 FLOPs per multiply-add)."""
    D, heads = config.hidden_size, config.num_attention_heads
    head_dim = D // heads
    if mode == "decode":
        tokens, t_q, t_k = B, 1, kv + 1
    else:
        tokens, t_q, t_k = B * T, T, T
    scores = 2 * 2 * B * heads * t_q * t_k * head_dim  # Q K^T and softmax(.) V over the whole rectangle
    embedding = 0
    if family == "bert":  # q, k, v, o (D x D); intermediate D x I and output I x D; pooler D x D + classifier
        block = 2 * (4 * D * D + 2 * D * config.intermediate_size) * tokens
        head = 2 * (D * D + D * config.num_labels) * B
    elif family == "vit":
        patches = (config.image_size // config.patch_size) ** 2
        tokens = B * (patches + 1)  # + CLS
        scores = 2 * 2 * B * heads * (patches + 1) ** 2 * head_dim
        block = 2 * (4 * D * D + 2 * D * config.intermediate_size) * tokens
        head = 2 * D * config.num_labels * B
        embedding = 2 * D * config.num_channels * config.patch_size ** 2 * patches * B
    elif family == "gpt2":  # c_attn D x 3D, c_proj D x D, c_fc D x 4D, mlp c_proj 4D x D; LM head at each position
        block = 2 * (3 * D * D + D * D + 8 * D * D) * tokens
        head = 2 * D * config.vocab_size * tokens
    elif family == "llama":  # q, o: D x D; k, v: D x (H_kv * d); gate, up: D x I; down: I x D
        kv_width = config.num_key_value_heads * head_dim
        block = 2 * (2 * D * D + 2 * D * kv_width + 3 * D * config.intermediate_size) * tokens
        head = 2 * D * config.vocab_size * tokens
    else:
        raise AssertionError(family)
    return embedding, block + scores, head


CASES = [
    ("bert", "BertForSequenceClassification", "forward"),
    ("vit", "ViTForImageClassification", "forward"),
    ("gpt2", "GPT2LMHeadModel", "decode"),
    ("gpt2", "GPT2LMHeadModel", "forward"),
    ("llama", "LlamaForCausalLM", "decode"),
    ("llama", "LlamaForCausalLM", "forward"),
]


@pytest.mark.parametrize("family,class_name,mode", CASES)
def test_counted_flops_per_exit_depth_match_the_analytic_count(family, class_name, mode):
    model = tiny_model(family, class_name)
    L = model.config.num_hidden_layers
    table = hf_align.exit_costs(model, mode=mode, batch_size=B, seq_len=T, repeats=1, progress=False)
    embedding, block, head = closed_form(family, model.config, mode)
    assert [r["exit_layer"] for r in table] == [r["blocks_run"] for r in table] == list(range(1, L + 1))
    for row in table:
        expected = embedding + row["exit_layer"] * block + head
        assert row["flops_analytic"] == expected  # the shape walk equals the closed form
        assert abs(row["flops"] - expected) <= 0.02 * expected  # acceptance: counted within 2% of analytic
        assert row["flops_rel_err"] <= 0.02
    assert table[-1]["flops_fraction"] == 1.0 and table[-1]["speedup"] == 1.0
    # blocks after the exit never run: every further block adds the same counted FLOPs
    steps = [b["flops"] - a["flops"] for a, b in zip(table.rows, table.rows[1:])]
    assert max(steps) - min(steps) <= 0.01 * block


def test_decode_memory_holds_the_extended_cache_and_the_table_renders(tmp_path):
    model = tiny_model("llama", "LlamaForCausalLM")
    c = model.config
    table = hf_align.exit_costs(model, batch_size=B, seq_len=T, repeats=2, progress=False)
    assert table.mode == "decode" and table.kv_length == T and table.throughput_unit == "tokens/s"
    # each block run concatenates a new (B, H_kv, T + 1, d) key and value tensor (float32) that lives to the end
    cache_bytes = 2 * B * c.num_key_value_heads * (T + 1) * (c.hidden_size // c.num_attention_heads) * 4
    for row in table:
        assert row["peak_memory_mb"] * 2**20 >= row["exit_layer"] * cache_bytes
        assert row["latency_ms"] > 0
        assert row["throughput"] == pytest.approx(B / (row["latency_ms"] / 1e3))
    text = table.to_markdown()
    assert text.count("\n| ") == 1 + c.num_hidden_layers and "FLOPs (analytic)" in text and "tokens/s" in text
    fig = table.plot(str(tmp_path / "costs.png"))
    assert len(fig.axes) == 4 and (tmp_path / "costs.png").stat().st_size > 0
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_peak_memory_of_a_known_allocation():
    weight = torch.ones(64, 64)

    def views():  # views of a tensor that existed before the call allocate nothing
        return weight.t()[:10], weight.view(32, 128).transpose(0, 1)

    assert peak_memory(lambda: weight.t().reshape(-1))[1] == 64 * 64 * 4  # a non-contiguous reshape copies

    assert peak_memory(views)[1] == 0

    def work():
        a = torch.ones(1000, dtype=torch.float32)  # 4000 bytes
        b = torch.ones(500, dtype=torch.float64)  # 4000 bytes, a still alive: peak 8000
        del a, b
        return torch.ones(10)  # 40 bytes, after both were freed

    _, peak = peak_memory(work)
    assert 8000 <= peak < 8000 + 1024


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(mode="decode"), ValueError, "causal LM"),
    (dict(mode="sideways"), ValueError, "mode"),
    (dict(exit_layers=[0, 1]), ValueError, "exit_layers"),
    (dict(exit_layers=[4]), ValueError, "exit_layers"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(kv_length=8), ValueError, "kv_length"),
    (dict(inputs=[1, 2]), TypeError, "dict"),
])
def test_bad_input(kwargs, error, message):
    model = tiny_model("bert", "BertForSequenceClassification")
    with pytest.raises(error, match=message):
        hf_align.exit_costs(model, progress=False, **kwargs)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())

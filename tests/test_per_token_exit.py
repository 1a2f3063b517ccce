"""Per-token early exit (CALM): exactness when no token exits, state propagation, block counts, bad input."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model
from transformers import DynamicCache

import hf_align
from hf_align.generation import PerTokenEarlyExit, early_exit_generate

DECODERS = [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
            ("qwen2", "Qwen2ForCausalLM")]


def lm(family, class_name, **overrides):
    return tiny_model(family, class_name, **overrides).double()


def prompts(batch, length=7, seed=0, pads=(0, 3, 1, 2)):
    """Left-padded prompts (pad id 0, real ids 1..98)."""
    ids = torch.randint(1, 99, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row in range(batch):
        n = pads[row % len(pads)] if batch > 1 else 0
        ids[row, :n] = 0
        mask[row, :n] = 0
    return ids, mask


@pytest.mark.parametrize("family,class_name,batch", [
    pytest.param(f, c, b, marks=[pytest.mark.slow] if f in ("mistral", "qwen2") else [])  # same code path as llama
    for f, c in DECODERS for b in (1, 4) if b == 4 or f in ("gpt2", "llama")
])
def test_no_exit_reproduces_generate(family, class_name, batch):
    model = lm(family, class_name)
    ids, mask = prompts(batch)
    common = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    plain = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=None, **common)
    # an EOS that the first row emits mid-way, so rows finish at different steps
    eos = int(plain[0, ids.shape[1] + 4])
    for eos_id in (None, eos):
        reference = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=eos_id, **common)
        out = early_exit_generate(model, input_ids=ids, attention_mask=mask, threshold=1.0, eos_token_id=eos_id,
                                  **common)
        assert torch.equal(out.sequences, reference)
        generated = out.sequences[:, ids.shape[1]:]
        finished_before = torch.zeros_like(generated, dtype=torch.bool)
        if eos_id is not None:
            finished_before[:, 1:] = (generated[:, :-1] == eos_id).cumsum(-1) > 0
        assert (out.exit_layers[~finished_before] == model.config.num_hidden_layers).all()


def _attention_reference_kv(family, model, block_index, h, position_ids):
    """K/V that block ``block_index``'s own attention module caches for input hidden state ``h`` (B, T, D)."""
    cache = DynamicCache()
    if family == "gpt2":
        block = model.transformer.h[block_index]
        block.attn(block.ln_1(h), cache=cache)
    else:
        block = model.model.layers[block_index]
        cos_sin = model.model.rotary_emb(h, position_ids=position_ids)
        block.self_attn(block.input_layernorm(h), position_embeddings=cos_sin, attention_mask=None, cache=cache)
    return cache.layers[block_index].keys, cache.layers[block_index].values


@pytest.mark.parametrize("family,class_name", [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM")])
def test_every_token_exits_at_block_1_with_propagated_kv(family, class_name):
    model = lm(family, class_name, num_hidden_layers=3) if family != "gpt2" else lm(family, class_name)
    L = model.config.num_hidden_layers
    ids, _ = prompts(1)
    n_new, T = 8, ids.shape[1]
    out = early_exit_generate(model, input_ids=ids, threshold=0.0, confidence="max_prob", max_new_tokens=n_new,
                              eos_token_id=None, pad_token_id=0)
    assert out.exit_layers.tolist() == [[L] + [1] * (n_new - 1)]
    assert out.blocks_run == L + (n_new - 1)
    # Block 1 always runs on real inputs, so h_1 of every position is the plain forward's first hidden state.
    with torch.no_grad():
        full = model(input_ids=out.sequences, output_hidden_states=True)
        h1 = full.hidden_states[1]  # (1, T + n_new, D)
        # the tokens chosen after block 1 are the argmax of the shared head on h_1
        norm = model.transformer.ln_f if family == "gpt2" else model.model.norm
        lens = model.lm_head(norm(h1)).argmax(-1)
    assert torch.equal(out.sequences[0, T + 1:], lens[0, T:T + n_new - 1])
    # the cached keys/values of blocks 2..L for the exited tokens: block j's own attention on h_1
    decoded = slice(T, T + n_new - 1)  # tokens fed in decoding steps (the last new token is never fed)
    positions = torch.arange(out.sequences.shape[1])[None]
    with torch.no_grad():
        for j in range(1, L):
            ref_k, ref_v = _attention_reference_kv(family, model, j, h1, positions)
            keys, values = out.cache.layers[j].keys, out.cache.layers[j].values
            assert keys.shape[2] == T + n_new - 1
            torch.testing.assert_close(keys[:, :, decoded], ref_k[:, :, decoded], rtol=0, atol=1e-12)
            torch.testing.assert_close(values[:, :, decoded], ref_v[:, :, decoded], rtol=0, atol=1e-12)
            # prompt positions hold the model's own keys/values: block j+1's input there is h_j (h_1 only for j = 1)
            assert torch.allclose(keys[:, :, :T], ref_k[:, :, :T]) == (j == 1)


def _make_identity(family, block):
    """Zero the block's residual branches (attention and MLP output projections): h_out = h_in exactly."""
    names = ("attn.c_proj", "mlp.c_proj") if family == "gpt2" else ("self_attn.o_proj", "mlp.down_proj")
    for name in names:
        module = block.get_submodule(name)
        torch.nn.init.zeros_(module.weight)
        if getattr(module, "bias", None) is not None:
            torch.nn.init.zeros_(module.bias)


@pytest.mark.parametrize("family,class_name", [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM")])
def test_exit_at_constructed_saturated_block_and_blocks_counted_by_hooks(family, class_name):
    model = lm(family, class_name, **({"n_layer": 4} if family == "gpt2" else {"num_hidden_layers": 4}))
    blocks = model.transformer.h if family == "gpt2" else model.model.layers
    _make_identity(family, blocks[2])  # block 3 changes nothing: cos(h_3, h_2) = 1, the state saturates there
    runner = PerTokenEarlyExit(model, threshold=0.999999, confidence="state")
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    try:
        ids, mask = prompts(1)
        out = runner.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    finally:
        for h in handles:
            h.remove()
    assert out.exit_layers.tolist() == [[4, 3, 3, 3, 3, 3]]
    assert len(calls) == out.blocks_run == int(out.exit_layers.sum()) == 4 + 5 * 3
    assert calls.count(3) == 1  # block 4 ran only in the prefill


def test_blocks_counted_by_hooks_in_a_batch():
    model = lm("llama", "LlamaForCausalLM", num_hidden_layers=4)
    # top-1 minus top-2 probability of this random model is ~4e-4 (median): a mix of exits
    runner = PerTokenEarlyExit(model, threshold=5e-4, confidence="softmax")
    ids, mask = prompts(3, seed=2)
    count = [0]
    handles = [b.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1)) for b in runner.view.blocks]
    try:
        out = runner.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    finally:
        for h in handles:
            h.remove()
    depths = out.exit_layers
    assert 1 < depths[:, 1:].float().mean() < 4  # the threshold makes a mix of exits
    # lock-step batch: each step runs blocks up to the deepest exit among the rows
    assert count[0] == out.blocks_run == 4 + int(depths[:, 1:].max(0).values.sum())
    # each row gets the tokens it would get alone
    for row in range(3):
        keep = mask[row].bool()
        alone = runner.generate(input_ids=ids[row:row + 1, keep], max_new_tokens=8, eos_token_id=None, pad_token_id=0)
        assert torch.equal(alone.sequences[0, keep.sum():], out.sequences[row, ids.shape[1]:])
        assert torch.equal(alone.exit_layers[0], depths[row])


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(threshold=1.5), "threshold"),
        (dict(threshold=-0.1), "threshold"),
        (dict(confidence="entropy"), "confidence"),
        (dict(min_exit_layer=0), "min_exit_layer"),
        (dict(min_exit_layer=4), "min_exit_layer"),
        (dict(do_sample=True), "greedy"),
        (dict(num_beams=2), "num_beams"),
        (dict(input_ids=torch.ones(2, 3)), r"\(batch, length\) integer tensor"),
        (dict(attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]])), "left padding"),
    ],
)
def test_bad_input_is_refused_and_model_unchanged(kwargs, message):
    model = lm("llama", "LlamaForCausalLM")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    inputs = dict(input_ids=torch.tensor([[5, 6, 7], [8, 9, 10]]), max_new_tokens=3, pad_token_id=0)
    inputs.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        early_exit_generate(model, **inputs)
    assert _no_hooks(model)
    assert model.config.to_dict() == config
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family,class_name,message", [
    ("bert", "BertForSequenceClassification", "needs a causal LM"),
    ("roberta", "RobertaForCausalLM", "key/value projection"),
])
def test_models_without_a_supported_lm_head_are_refused(family, class_name, message):
    model = tiny_model(family, class_name)
    with pytest.raises(ValueError, match=message):
        hf_align.early_exit_generate(model, input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2)
    assert _no_hooks(model)


@pytest.mark.parametrize("family,class_name", [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM")])
def test_teacher_forced_score(family, class_name):
    model = lm(family, class_name)
    L = model.config.num_hidden_layers
    ids = torch.randint(1, 99, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()  # the model's own full-depth logits
        loss = -logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()  # mean NLL of tokens 1..11
        lens = model.lm_head((model.transformer.ln_f if family == "gpt2" else model.model.norm)(
            model(input_ids=ids, output_hidden_states=True).hidden_states[1]))
    full = PerTokenEarlyExit(model, threshold=1.0).score(ids)
    assert full.nll.shape == (2, 11) and (full.exit_layers == L).all()
    assert full.perplexity == pytest.approx(float(torch.exp(loss)), rel=1e-9)
    with torch.no_grad():
        assert full.perplexity == pytest.approx(float(torch.exp(model(input_ids=ids, labels=ids).loss)), rel=1e-6)
    # every fed token exits after block 1: its NLL is that of the shared head on the plain forward's h_1
    # (block 1 only ever sees real inputs), except the first scored token, which comes from the prefill
    early = PerTokenEarlyExit(model, threshold=0.0, confidence="max_prob").score(ids, prefix_length=3)
    assert early.exit_layers[:, 1:].eq(1).all() and early.exit_layers[:, 0].eq(L).all()
    reference = -lens.double().log_softmax(-1)[:, 3:-1].gather(-1, ids[:, 4:, None]).squeeze(-1)
    torch.testing.assert_close(early.nll[:, 1:], reference, rtol=0, atol=1e-10)
    assert early.blocks_run == L + 8  # one lock-step batch: prefill (L blocks) + 8 steps of 1 block


def test_min_exit_layer_and_head_calls():
    model = lm("llama", "LlamaForCausalLM", num_hidden_layers=4)
    runner = PerTokenEarlyExit(model, threshold=0.0, confidence="max_prob", min_exit_layer=3)
    heads = [0]
    handle = model.lm_head.register_forward_hook(lambda *a: heads.__setitem__(0, heads[0] + 1))
    try:
        out = runner.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=5, eos_token_id=None,
                              pad_token_id=0)
    finally:
        handle.remove()
    assert out.exit_layers.tolist() == [[4, 3, 3, 3, 3]]
    assert heads[0] == 1 + 4  # the prefill's head, then one head per step (block 3, where every token exits)

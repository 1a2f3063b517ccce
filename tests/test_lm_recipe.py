"""The aligned LM recipe: per-layer perplexity, the chunked per-layer loss, layer dropout, early-exit curricula,
and the offline English text + BPE tokenizer. Every check is against an explicit reference written here."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from tiny_models import DECODER_FAMILIES, tiny_decoder, tiny_model

from hf_align import AlignedTrainer, AlignedTrainingArguments
from hf_align.trainers.curricula import layer_dropout_mask, layer_dropout_probs

L = 3
DECODERS = [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
            ("qwen2", "Qwen2ForCausalLM")]


def args_for(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], disable_tqdm=True, save_strategy="no",
                per_device_train_batch_size=4, per_device_eval_batch_size=3, learning_rate=1e-3, seed=0,
                use_cpu=True, dataloader_num_workers=0)
    base.update(kw)
    return AlignedTrainingArguments(**base)


def lm_dataset(n=8, vocab=99, T_=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, T_), generator=g)
    labels = ids.clone()
    labels[::2, -3:] = -100  # ignored positions: rows have different numbers of scored tokens
    labels[1, 2:5] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()}).with_format("torch")


def final_norm(model):
    """The model's own final norm (architecture knowledge lives in the test, not the library)."""
    return model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm


def block_list(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


# -- per-layer perplexity --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,cls", DECODERS)
def test_eval_layer_perplexity_matches_float64_reference(tmp_path, family, cls):
    """exp(token-weighted mean NLL over ALL eval tokens) per block, from output_hidden_states + the model's own
    norm / lm_head in float64; batches of 3 over 8 rows with unequal token counts, so a mean of batch
    perplexities (or of batch losses) would differ."""
    model = tiny_model(family, cls)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # sharp predictions: the batches' perplexities differ clearly
    data = lm_dataset()
    trainer = AlignedTrainer(model=model, args=args_for(tmp_path, lm_loss_chunk_size=5), train_dataset=data,
                             eval_dataset=data)
    metrics = trainer.evaluate()
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        out = ref(input_ids=data[:]["input_ids"], output_hidden_states=True, use_cache=False)
    targets = data[:]["labels"][:, 1:]
    keep = targets != -100
    for layer in range(1, L + 1):
        # hidden_states[l] is block l's output, except the last entry, which HF returns after the final norm
        logits = out.logits if layer == L else ref.lm_head(final_norm(ref)(out.hidden_states[layer]))
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        expected = math.exp(nll[keep].sum().item() / keep.sum().item())
        assert metrics[f"eval_layer_{layer}_perplexity"] == pytest.approx(expected, rel=1e-5)
        batch_means = [math.exp(nll[i:i + 3][keep[i:i + 3]].mean().item()) for i in range(0, 8, 3)]
        assert abs(np.mean(batch_means) - expected) > 1e-2 * expected  # the test can tell the two apart
    assert metrics["eval_perplexity"] == metrics[f"eval_layer_{L}_perplexity"]


def test_classifiers_report_no_perplexity(tmp_path):
    model = tiny_model("llama", "LlamaForSequenceClassification")
    data = Dataset.from_dict({"input_ids": torch.randint(1, 99, (6, 5)).tolist(), "labels": [0, 1, 2, 0, 1, 2]})
    metrics = AlignedTrainer(model=model, args=args_for(tmp_path), eval_dataset=data.with_format("torch")).evaluate()
    assert "eval_layer_1_accuracy" in metrics and not any("perplexity" in k for k in metrics)


# -- the memory-frugal per-layer loss ---------------------------------------------------------------------------

@pytest.mark.parametrize("family,cls", DECODERS[:2])
def test_lm_loss_never_builds_full_logits_for_intermediate_layers(tmp_path, family, cls):
    """Every call of the LM head except the model's own forward sees at most lm_loss_chunk_size tokens, in the
    loss (forward and checkpointed backward) and in evaluation; loss and gradients equal the plain computation."""
    model = tiny_model(family, cls)  # eval mode: no dropout, so the plain recomputation below sees the same net
    data = lm_dataset()
    chunk = 5
    trainer = AlignedTrainer(model=model, args=args_for(tmp_path, lm_loss_chunk_size=chunk, layer_weights="uniform"),
                             train_dataset=data, eval_dataset=data)
    rows = []
    handle = model.lm_head.register_forward_hook(lambda m, a, o: rows.append(o.shape[:-1].numel()))
    batch = dict(data[:4])
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    handle.remove()
    n_scored = int((batch["labels"][:, 1:] != -100).sum())
    full = batch["input_ids"].numel()
    assert rows.count(full) == 1  # the model's own logits, once
    small = [r for r in rows if r != full]
    assert max(small) <= chunk and sum(small) == 2 * (L - 1) * n_scored  # forward + recomputation in backward
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # plain computation: full logits of every layer through the model's own norm + head
    outs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o if isinstance(o, torch.Tensor) else o[0]))
             for b in block_list(model)]
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    for h in hooks:
        h.remove()
    targets = batch["labels"][:, 1:].reshape(-1)
    layer_logits = [model.lm_head(final_norm(model)(h)) for h in outs[:-1]] + [logits]
    plain = sum(F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), targets, ignore_index=-100) for lg in layer_logits) / L
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)
    plain.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    rows.clear()
    handle = model.lm_head.register_forward_hook(lambda m, a, o: rows.append(o.shape[:-1].numel()))
    trainer.evaluate()
    handle.remove()
    # eval (batches of 3, 3, 2 rows x 9 tokens): the model's own forwards are the only calls above the chunk size
    assert sorted(r for r in rows if r > chunk) == [18, 27, 27]


# -- layer dropout --------------------------------------------------------------------------------------------

def test_layer_dropout_probabilities_follow_layerskip_scales():
    L8, p = 8, 0.2
    exp = layer_dropout_probs(p, L8, "exp")
    for l in range(1, L8 + 1):  # LayerSkip / torchtune "exp": p_max * (2^((l-1)/(L-1)) - 1)
        assert exp[l - 1] == pytest.approx(p * (2 ** ((l - 1) / (L8 - 1)) - 1), abs=1e-12)
    assert exp[0] == 0 and exp[-1] == pytest.approx(p)
    assert layer_dropout_probs(p, L8, "linear") == pytest.approx([p * i / 7 for i in range(8)])
    assert layer_dropout_probs(p, L8, "uniform") == pytest.approx([p] * 8)
    assert layer_dropout_probs(p, L8, "sin") == pytest.approx([p * math.sin(math.pi / 2 * i / 7) for i in range(8)])
    assert layer_dropout_probs(p, L8, "log") == pytest.approx([p * math.log(i + 1) / math.log(8) for i in range(8)])
    assert all(a <= b for a, b in zip(exp, exp[1:]))  # rising with depth
    probs = [0.0, 0.1, 0.5]
    mask = layer_dropout_mask(probs, 20000, torch.Generator().manual_seed(0))
    for l, q in enumerate(probs):  # per-sample Bernoulli(p_l): frequencies within 5 standard errors
        assert abs(mask[l].double().mean().item() - q) <= 5 * math.sqrt(q * (1 - q) / 20000) + 1e-12


@pytest.mark.parametrize("family,cls", DECODERS[:2])
def test_dropped_block_passes_its_input_through(tmp_path, family, cls):
    """A sample whose block j is skipped gets exactly the logits of the model with block j removed; the other
    samples are unchanged."""
    from hf_align.trainers.curricula import skipping_blocks

    model = tiny_model(family, cls)
    ids = torch.randint(1, 99, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(L, 3, dtype=torch.bool)
    mask[1, 0] = True  # sample 0 skips block 2
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        with skipping_blocks(block_list(model), mask):
            got = model(input_ids=ids, use_cache=False).logits
        pruned = copy.deepcopy(model)
        blocks = block_list(pruned)
        del blocks[1]
        want0 = pruned(input_ids=ids[:1], use_cache=False).logits
    torch.testing.assert_close(got[0], want0[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1:], full[1:], rtol=0, atol=0)
    assert (got[0] - full[0]).abs().max() > 1e-3


def _rows_entering(blocks):
    """Hooks on every submodule of every block: the largest number of batch rows any of them received, per forward."""
    seen = [[] for _ in blocks]
    handles = []
    for index, block in enumerate(blocks):
        for module in block.modules():
            if module is block:
                continue
            handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, index=index: seen[index].append(
                    next(a.shape[0] for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() >= 2)),
                with_kwargs=True))
    return seen, handles


@pytest.mark.parametrize("family,cls", DECODERS)
def test_layer_dropout_skipped_rows_never_enter_the_block(tmp_path, family, cls, monkeypatch):
    """Batch-dimension skipping: in every training forward, the submodules of block l see exactly the rows that
    keep block l (hook counts), and a block every row skips is not entered at all."""
    import hf_align.trainers.aligned_trainer as trainer_module

    masks = []
    real = trainer_module.layer_dropout_mask
    monkeypatch.setattr(trainer_module, "layer_dropout_mask",
                        lambda *a, **k: masks.append(real(*a, **k)) or masks[-1])
    model = tiny_model(family, cls, num_hidden_layers=4)
    blocks = block_list(model)
    trainer = AlignedTrainer(model=model, args=args_for(tmp_path, layer_dropout=0.6, layer_dropout_scale="uniform",
                                                        max_steps=4, per_device_train_batch_size=6),
                             train_dataset=lm_dataset(n=24))
    seen, handles = _rows_entering(blocks)  # after the trainer's self-check forward
    trainer.train()
    for h in handles:
        h.remove()
    assert len(masks) == 4
    skipped_somewhere = 0
    for index in range(4):
        kept = [int((~m[index]).sum()) for m in masks]
        entered = [k for k in kept if k > 0]
        # a forward where block l kept k rows: every call inside the block saw k rows (k = 6 when none skipped)
        per_forward = iter(seen[index])
        calls = len(seen[index]) // max(len(entered), 1)
        for k in entered:
            rows = [next(per_forward) for _ in range(calls)]
            assert set(rows) == {k}, (index, k, rows)
        skipped_somewhere += sum(6 - k for k in kept)
    assert skipped_somewhere > 0


@pytest.mark.parametrize("skip_compute", [True, False])
@pytest.mark.parametrize("family,cls", DECODERS[:2])
def test_skipping_equals_the_pruned_model_in_values_and_gradients(family, cls, skip_compute):
    """Rows 0 and 2 skip block 2, row 1 keeps it: each row's logits and its loss gradients equal those of a model
    with block 2 removed (rows 0, 2) or of the full model (row 1), computed row by row."""
    from hf_align.trainers.curricula import skipping_blocks

    model = tiny_model(family, cls).train()
    for m in model.modules():  # no dropout: the references must see the same network
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ids = torch.randint(1, 99, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(L, 3, dtype=torch.bool)
    mask[1, [0, 2]] = True
    with skipping_blocks(block_list(model), mask, skip_compute=skip_compute):
        out = model(input_ids=ids, use_cache=False).logits
    loss = out.float().logsumexp(-1).sum()
    grads = torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)
    pruned = copy.deepcopy(model)
    del block_list(pruned)[1]
    for row, reference in [(0, pruned), (1, model), (2, pruned)]:
        want = reference(input_ids=ids[row:row + 1], use_cache=False).logits
        torch.testing.assert_close(out[row:row + 1], want, rtol=1e-5, atol=1e-5)
    # gradients: the sum of the per-row references' gradients (block 2's parameters only get row 1's)
    names = [n for n, _ in model.named_parameters()]
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for row, reference in [(0, pruned), (1, model), (2, pruned)]:
        reference.zero_grad()
        reference(input_ids=ids[row:row + 1], use_cache=False).logits.float().logsumexp(-1).sum().backward()
        own = dict(reference.named_parameters())
        for n in names:
            key = n
            if reference is pruned:  # block indices above the removed one shift down by one
                key = _pruned_name(n)
                if key is None:
                    continue
            g = own[key].grad
            if g is not None:
                ref[n] += g
    for n, g in zip(names, grads):
        torch.testing.assert_close(g if g is not None else torch.zeros_like(ref[n]), ref[n], rtol=1e-4, atol=1e-6)
    assert not any(hasattr(vars(b), "forward") or "forward" in vars(b) for b in block_list(model))  # restored


@pytest.mark.parametrize("family", sorted(DECODER_FAMILIES))
def test_skipping_rows_equals_running_every_row_in_every_decoder_family(family):
    """A left-padded ragged batch, rows skipping different blocks: the block run on the kept rows only gives the
    values of the block run on every row with the skipped rows' outputs replaced (itself checked against the pruned
    model above), for every registered decoder family (NaN where the plain model itself gives NaN)."""
    from hf_align.layers import LayerView
    from hf_align.trainers.curricula import skipping_blocks

    model = tiny_decoder(family).eval()
    view = LayerView(model)
    ids = torch.randint(1, 99, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    skip = torch.zeros(view.num_layers, 3, dtype=torch.bool)
    skip[1, [0, 2]] = True
    skip[-1, 1] = True
    with torch.no_grad():
        out = {}
        for compute in (True, False):
            with skipping_blocks(view.blocks, skip, skip_compute=compute):
                out[compute] = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(out[True], out[False], rtol=1e-9, atol=1e-9, equal_nan=True)


def _pruned_name(name: str) -> str | None:
    """The parameter of the model without block 2 (index 1) that ``name`` corresponds to (None for block 2's)."""
    import re

    match = re.search(r"\.(h|layers)\.(\d+)\.", name)
    if match is None:
        return name
    index = int(match.group(2))
    if index == 1:
        return None
    return name[:match.start(2)] + str(index - 1 if index > 1 else index) + name[match.end(2):]


def test_layer_dropout_resume_is_exact(tmp_path):
    """6 steps straight equal 3 steps + resume from checkpoint-3 (weights and logged losses): the dropout draws
    continue where they stopped."""
    data = lm_dataset(n=24)

    def make(out):
        args = args_for(tmp_path, output_dir=str(out), max_steps=6, logging_steps=1, save_strategy="steps",
                        save_steps=3, layer_dropout=0.5, layer_dropout_scale="uniform")
        return AlignedTrainer(model=tiny_model("llama", "LlamaForCausalLM"), args=args, train_dataset=data)

    full = make(tmp_path / "full")
    full.train()
    resumed = make(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    for key in ("loss", "layer_1_loss"):
        ref = [e[key] for e in full.state.log_history if key in e]
        assert [e[key] for e in resumed.state.log_history if key in e][-3:] == ref[-3:]
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=n)


def test_layer_dropout_is_seeded_training_only_and_off_by_default(tmp_path):
    data = lm_dataset(n=12)

    def run(seed, p):
        model = tiny_model("llama", "LlamaForCausalLM")
        trainer = AlignedTrainer(model=model, args=args_for(tmp_path, layer_dropout=p, layer_dropout_scale="linear",
                                                            max_steps=3, logging_steps=1, seed=seed),
                                 train_dataset=data, eval_dataset=data)
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e], trainer, model

    a, trainer, model = run(0, 0.5)
    b, _, _ = run(0, 0.5)
    c, _, _ = run(1, 0.5)
    off, _, _ = run(0, 0.0)
    assert a == b and a != off and a[1:] != c[1:]  # same seed same draws; first loss of seed 1 may coincide
    assert AlignedTrainingArguments.__dataclass_fields__["layer_dropout"].default == 0.0  # off by default
    metrics = trainer.evaluate()  # evaluation never drops: equals a plain evaluation of the same weights
    plain = AlignedTrainer(model=model, args=args_for(tmp_path), eval_dataset=data).evaluate()
    for k in (f"eval_layer_{l}_perplexity" for l in range(1, L + 1)):
        assert metrics[k] == pytest.approx(plain[k], rel=1e-9)


# -- early-exit curricula (torchtune's RotationalEarlyExitCurriculum / GradualEarlyExitCurriculum) ----------------

def _active(weights):
    return {l for l, w in enumerate(weights, start=1) if w > 0}


def test_rotational_curriculum_matches_torchtune(tmp_path):
    model = tiny_model("llama", "LlamaForCausalLM", num_hidden_layers=8)
    trainer = AlignedTrainer(model=model, args=args_for(tmp_path, early_exit_curriculum="rotational",
                                                        early_exit_every=3), train_dataset=lm_dataset())
    initial = np.zeros(8, dtype=bool)
    initial[0::3] = True  # torchtune layers="0::3"
    mask = initial.copy()
    for step in range(12):
        expected = {i + 1 for i in np.flatnonzero(mask)} | {8}
        weights = trainer.current_layer_weights(step)
        assert _active(weights) == expected, step
        total = sum(expected)  # 'linear' renormalised over the active blocks
        assert weights == pytest.approx([l / total if l in expected else 0.0 for l in range(1, 9)])
        mask = np.roll(mask, 1)  # torchtune's step()


def test_gradual_curriculum_matches_torchtune(tmp_path):
    model = tiny_model("llama", "LlamaForCausalLM", num_hidden_layers=8)
    trainer = AlignedTrainer(model=model, args=args_for(tmp_path, early_exit_curriculum="gradual", max_steps=40,
                                                        layer_weights="uniform", early_exit_gradual_fraction=0.5),
                             train_dataset=lm_dataset())
    seen = []
    for step in range(41):
        expected = {i + 1 for i in range(8) if step / 40 >= 0.5 * (8 - i) / 8} | {8}
        weights = trainer.current_layer_weights(step)
        assert _active(weights) == expected
        assert weights == pytest.approx([1 / len(expected) if l in expected else 0 for l in range(1, 9)])
        seen.append(len(expected))
    assert seen[0] == 1 and seen[-1] == 8 and seen[20] == 8 and seen[19] == 7  # block 1 joins at 50% of training


def test_curriculum_loss_is_the_active_layers_loss(tmp_path):
    """compute_loss at a given global step equals sum over that step's active blocks of w_l * CE, computed here."""
    model = tiny_model("gpt2", "GPT2LMHeadModel", n_layer=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).train()
    data = lm_dataset()
    trainer = AlignedTrainer(model=model, args=args_for(tmp_path, early_exit_curriculum="rotational", early_exit_every=2,
                                                        layer_weights=[1.0, 2.0, 3.0, 4.0]), train_dataset=data)
    batch = dict(data[:4])
    targets = batch["labels"][:, 1:].reshape(-1)
    for step, active in [(0, {1, 3, 4}), (1, {2, 4})]:
        trainer.state.global_step = step
        ours = trainer.compute_loss(model, dict(batch)).item()
        outs = []
        hooks = [b.register_forward_hook(lambda m, a, o, outs=outs: outs.append(o[0] if isinstance(o, tuple) else o))
                 for b in model.transformer.h]
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        for h in hooks:
            h.remove()
        per_layer = [model.lm_head(model.transformer.ln_f(h)) for h in outs[:-1]] + [logits]
        expected = sum(l * F.cross_entropy(per_layer[l - 1][:, :-1].reshape(-1, 99), targets, ignore_index=-100).item()
                       for l in active)  # explicit weights are used as given on the active blocks
        assert ours == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("family,cls", DECODERS[:2])
def test_self_distillation_loss_is_ce_plus_beta_kl_to_the_fixed_last_layer(tmp_path, family, cls):
    """layer_distillation=beta: loss = sum_{l<L} w_l [CE(p_l) + beta KL(p_L || p_l)] + w_L CE(p_L), token means,
    computed here in float64 from output_hidden_states + the model's own norm / lm_head; the KL term sends no
    gradient into the last block (p_L is a fixed target)."""
    model = tiny_model(family, cls)
    data = lm_dataset()
    beta = 0.7
    trainer = AlignedTrainer(model=model, args=args_for(tmp_path, layer_distillation=beta, layer_weights=[0.2, 0.3, 0.5],
                                                        lm_loss_chunk_size=5), train_dataset=data)
    batch = dict(data[:4])
    ours = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], output_hidden_states=True, use_cache=False)
        norm = final_norm(model)
        per_layer = [model.lm_head(norm(h)).double() for h in out.hidden_states[1:-1]] + [out.logits.double()]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    log_last = per_layer[-1][:, :-1][keep].log_softmax(-1)
    expected = 0.0
    for w, lg in zip([0.2, 0.3, 0.5], per_layer):
        log_p = lg[:, :-1][keep].log_softmax(-1)
        ce = -log_p.gather(1, targets[keep][:, None]).mean()
        kl = (log_last.exp() * (log_last - log_p)).sum(-1).mean() if lg is not per_layer[-1] else 0.0
        expected += w * (ce + beta * kl)
    assert ours.item() == pytest.approx(float(expected), rel=1e-5)
    # the KL terms' gradient w.r.t. the last block is zero: with and without distillation it is the same
    last_block = list(block_list(model)[-1].parameters())
    g_kl = torch.autograd.grad(ours, last_block)
    plain = AlignedTrainer(model=model, args=args_for(tmp_path, layer_weights=[0.2, 0.3, 0.5], lm_loss_chunk_size=5),
                           train_dataset=data)
    g_plain = torch.autograd.grad(plain.compute_loss(model, dict(batch)), last_block)
    for a, b in zip(g_kl, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="layer_distillation"):
        AlignedTrainer(model=tiny_model("bert", "BertForSequenceClassification"),
                       args=args_for(tmp_path, layer_distillation=0.5))
    with pytest.raises(ValueError, match="layer_distillation"):
        AlignedTrainingArguments(output_dir=str(tmp_path), layer_distillation=-1.0)


def test_eval_reports_teacher_forced_draft_acceptance(tmp_path):
    """eval_layer_{l}_greedy_acceptance = share of scored tokens with argmax p_l = argmax p_L; sampling acceptance =
    mean of sum_v min(p_l, p_L): float64 references over all eval tokens (batches of 3 of 8 unequal rows)."""
    model = tiny_model("llama", "LlamaForCausalLM")
    data = lm_dataset()
    metrics = AlignedTrainer(model=model, args=args_for(tmp_path), eval_dataset=data).evaluate()
    ids, labels = data[:]["input_ids"], data[:]["labels"]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        per_layer = [model.lm_head(model.model.norm(h)).double() for h in out.hidden_states[1:-1]] + [out.logits.double()]
    keep = labels[:, 1:] != -100
    last = per_layer[-1][:, :-1][keep]
    for l in range(1, L):
        lg = per_layer[l - 1][:, :-1][keep]
        greedy = (lg.argmax(-1) == last.argmax(-1)).double().mean().item()
        sampling = torch.minimum(lg.softmax(-1), last.softmax(-1)).sum(-1).mean().item()
        assert metrics[f"eval_layer_{l}_greedy_acceptance"] == pytest.approx(greedy, abs=1e-12)
        assert metrics[f"eval_layer_{l}_sampling_acceptance"] == pytest.approx(sampling, rel=1e-6)
    assert f"eval_layer_{L}_greedy_acceptance" not in metrics  # the last block verifies; it is not a draft


def test_recipe_options_validate(tmp_path):
    model = tiny_model("llama", "LlamaForCausalLM")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        AlignedTrainer(model=model, args=args_for(tmp_path, layer_dropout=0.1, gradient_checkpointing=True))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for bad in [dict(layer_dropout=1.0), dict(layer_dropout=-0.1), dict(layer_dropout_scale="cubic"),
                dict(early_exit_curriculum="random"), dict(early_exit_every=0), dict(early_exit_gradual_fraction=0.0)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            AlignedTrainingArguments(output_dir=str(tmp_path), **bad)


# -- offline English text and the BPE tokenizer -------------------------------------------------------------

def test_python_docs_text_bpe_and_blocks():
    from hf_align.data import lm_blocks, load_python_docs_texts, train_bpe_tokenizer

    texts = load_python_docs_texts()
    from pydoc_data.topics import topics

    assert len(texts["train"]) + len(texts["test"]) == len(topics) and len(texts["test"]) == round(0.1 * len(topics))
    assert not set(texts["train"]) & set(texts["test"])
    assert sum(map(len, texts["train"])) > 300_000
    sample = texts["train"][:20]
    a = train_bpe_tokenizer(sample, vocab_size=600)
    b = train_bpe_tokenizer(sample, vocab_size=600)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()  # deterministic training
    assert len(a) == 600
    text = texts["test"][0][:500]
    assert a.decode(a(text)["input_ids"]) == text  # byte-level: lossless, no unknown token
    blocks = lm_blocks(sample, a, block_size=32)
    ids = sum((a(t)["input_ids"] + [a.eos_token_id] for t in sample), [])
    assert len(blocks) == len(ids) // 32
    assert blocks[1]["input_ids"] == ids[32:64] and blocks[1]["labels"] == blocks[1]["input_ids"]
    with pytest.raises(ValueError, match="block_size"):
        lm_blocks(sample, a, block_size=1)
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(sample, vocab_size=100)


# -- scale: 2 processes (torchrun, gloo, CPU) -----------------------------------------------------------------

FSDP_SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "aligned_fsdp.py")


def _run_script(tmp_path, mode, procs, port):
    out = tmp_path / f"{mode}-{procs}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, FSDP_SCRIPT, str(out), mode]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
               str(port)] + cmd[1:]
    subprocess.run(cmd, check=True, env=env, timeout=400)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_fsdp2_sharded_blocks_give_the_same_layer_losses(tmp_path):
    """Every block an FSDP2 unit (torch fully_shard, parameters DTensor-sharded over 2 gloo processes): the
    per-layer losses of 3 AdamW steps and the final weights equal one process on the same global batches."""
    one = _run_script(tmp_path, "fsdp2", 1, 0)
    two = _run_script(tmp_path, "fsdp2", 2, 29571)
    assert two["world_size"] == 2 and two["block_type"].startswith("FSDP") and two["param_type"] == "DTensor"
    np.testing.assert_allclose(two["layer_losses"], one["layer_losses"], rtol=0, atol=2e-5)
    assert one["layer_losses"][0] != one["layer_losses"][2]  # the weights did change between steps
    for name, norm in one["param_norms"].items():
        assert two["param_norms"][name] == pytest.approx(norm, abs=2e-5), name


@pytest.mark.slow
def test_trainer_two_processes_lm_matches_one_and_fsdp_on_cpu_falls_back_to_ddp(tmp_path):
    """AlignedTrainer.train()/evaluate() on a causal LM under torchrun: the same per-layer training losses and
    eval perplexities as one process. Asking the Trainer for FSDP on CPU gets DistributedDataParallel
    (accelerate only switches to FSDP on accelerator devices), with the same results."""
    one = _run_script(tmp_path, "trainer", 1, 0)
    two = _run_script(tmp_path, "trainer-fsdp", 2, 29572)
    assert two["world_size"] == 2 and two["wrapped"] == "DistributedDataParallel"
    np.testing.assert_allclose(two["layer_losses"], one["layer_losses"], rtol=0, atol=1e-4)
    for layer in (1, 2, 3):
        key = f"eval_layer_{layer}_perplexity"
        assert two[key] == pytest.approx(one[key], rel=1e-4)

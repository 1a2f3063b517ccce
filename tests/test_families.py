"""The 2024-2026 families: every registered family against independent references.

For each family a tiny random model (float64 for the decoders, so that no near-tie can flip an argmax):
the self-check, hybrid attention (each block its own mask / rotary table; sliding window 4 < sequence length),
speculative decoding and per-token exit (threshold 1) against stock ``generate``, the aligned loss against the
losses of the model truncated to l blocks (its *own* head and loss), ``exit_costs``' analytic FLOPs against
torch's FLOP counter, the structural fallback, and the generated support table against docs/layers.md.

The default run covers every family once through the cheap checks and a representative set (hybrid attention,
ALiBi, parallel blocks, soft-capping, logit scaling, MoE, learned positions) through decoding; ``-m slow``
runs decoding, the aligned loss and the FLOP count for every family.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from datasets import Dataset
from tiny_models import (
    CASES,
    DECODER_CLASSES,
    DECODER_FAMILIES,
    ENCODER_CLASSES,
    ENCODER_FAMILIES,
    left_padded_prompts,
    tiny_decoder,
    tiny_encoder,
    tiny_model,
)

import hf_align
from hf_align import LayerView
from hf_align.families import get_family, is_causal_lm_family, recorded_kv, support_table
from hf_align.generation import speculative_generate
from hf_align.layers import PerBlock

L = 4
DECODERS = list(DECODER_FAMILIES)
# decoded in the default run: hybrid sliding/global (qwen3, gemma2, gemma3, gpt-neo), ALiBi (bloom, falcon-alibi),
# parallel attention/MLP (gpt-neox, falcon, gpt-j), soft-capping / scaling (gemma2, granite, cohere), MoE
# (qwen3-moe), learned absolute positions and a projection after the final norm (opt)
FAST = ["qwen3", "gemma2", "gemma3", "gpt-neox", "opt", "falcon-alibi", "granite", "cohere", "qwen3-moe", "gpt-neo"]


def _speed(family):
    return [] if family in FAST else [pytest.mark.slow]


DECODE_PARAMS = [pytest.param(f, marks=_speed(f), id=f) for f in DECODERS]
SLOW_PARAMS = [pytest.param(f, marks=[] if f in ("gemma3", "qwen3-moe", "opt") else [pytest.mark.slow], id=f)
               for f in DECODERS]


_prompts = left_padded_prompts


def _generate(model, ids, mask, new=10):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                          eos_token_id=None, pad_token_id=0)


# -- 1. the self-check for every family and head ------------------------------------------------------------

DECODER_CASES = [(f, s) for f in DECODERS for s in ("ForCausalLM", "ForSequenceClassification", "Model")
                 if hasattr(T, DECODER_CLASSES[f] + s) and not (f in ("gemma3", "llama4") and s == "Model")]


@pytest.mark.parametrize("family,suffix", DECODER_CASES, ids=[f"{f}-{s}" for f, s in DECODER_CASES])
def test_decoder_self_check_float32(family, suffix):
    model = tiny_decoder(family, suffix, dtype=torch.float32)
    view = LayerView(model)  # raises unless head(h_L) == the model's own logits within 1e-5
    assert view.last_check_diff <= 1e-5
    assert view.family.causal and is_causal_lm_family(model.config.model_type)
    # and independently of the view's self-check: the logit lens at the last layer is the model's logits
    ids, mask = _prompts(4)
    with torch.no_grad():
        if suffix == "Model":
            ours = view.output_hidden_states(input_ids=ids, attention_mask=mask)[-1]
            ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            ours = view.layer_logits(input_ids=ids, attention_mask=mask)[-1]
            ref = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


ENCODER_CASES = [(f, h) for f in ENCODER_FAMILIES for h in (True, False) if ENCODER_CLASSES[f][0 if h else 1]]


@pytest.mark.parametrize("family,head", ENCODER_CASES, ids=[f"{f}-{'head' if h else 'base'}" for f, h in ENCODER_CASES])
def test_encoder_and_vision_self_check(family, head):
    model = tiny_encoder(family, head)
    view = LayerView(model)
    assert view.last_check_diff <= 1e-5 and not view.family.causal
    inputs = view.example_inputs(batch_size=3)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        if head:
            torch.testing.assert_close(view.layer_logits(**inputs)[-1], out.logits, rtol=0, atol=1e-5)
        else:
            for ours, ref in zip(view.output_hidden_states(**inputs), out.hidden_states):
                torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_modernbert_mean_pooling_and_albert_shared_groups():
    model = tiny_encoder("modernbert", classifier_pooling="mean")
    assert LayerView(model).pooling == "mean"  # the masked mean over tokens, as the model pools (self-checked)
    assert LayerView(tiny_encoder("modernbert")).pooling == "cls"
    albert = tiny_encoder("albert", num_hidden_layers=4, num_hidden_groups=2)
    view = LayerView(albert)
    groups = albert.albert.encoder.albert_layer_groups
    assert [b is groups[0] for b in view.blocks] == [True, True, False, False]


# -- 2. hybrid attention: each block gets its own arguments (float64 exactness) -----------------------------

# (family, whether the model passes sliding and global blocks different arguments; GPT-Neo's local blocks build
# their window inside the attention module)
HYBRID = [("gemma2", True), ("gemma3", True), ("qwen3", True), ("llama4", True), ("gpt-neo", False),
          ("modernbert", True)]


@pytest.mark.parametrize("family,per_block_arguments", HYBRID, ids=[h[0] for h in HYBRID])
def test_hybrid_blocks_get_their_own_masks_float64(family, per_block_arguments):
    # sliding window 4 (llama4: attention chunks of 4; gpt-neo: local window 4; modernbert: local attention 4)
    # < 12 tokens
    if family == "modernbert":
        model = tiny_encoder(family, head=False, dtype=torch.float64, num_hidden_layers=L)
    else:
        model = tiny_decoder(family, "ForCausalLM")
    view = LayerView(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 99, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    inputs = dict(input_ids=ids, attention_mask=mask)
    state = view.prepare(**inputs)
    per_block = [k for k, v in state.block_kwargs.items() if isinstance(v, PerBlock)]
    assert bool(per_block) == per_block_arguments, per_block
    real = mask.bool()
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        if view.has_head:  # (eager Gemma 2 gives NaN for a left-padded row itself: NaN where the model has NaN)
            ours = view.layer_logits(**inputs)[-1]
            assert bool(ours[0].isfinite().all())
            torch.testing.assert_close(ours, out.logits, rtol=0, atol=1e-12, equal_nan=True)
        # every block's output: the model's own hidden states (the last one normed, as the model returns it)
        for a, b in zip(view.output_hidden_states(**inputs), out.hidden_states):
            torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-12, equal_nan=True)
        if per_block_arguments:  # the check is sensitive: every block given the first block's arguments differs
            shared = {k: (v[0] if isinstance(v, PerBlock) else v) for k, v in state.block_kwargs.items()}
            wrong = view.run_blocks(dataclasses.replace(state, block_kwargs=shared), L).hidden
            right = view.run_blocks(state, L).hidden
            assert (wrong[0] - right[0]).abs().max() > 1e-6


def test_capturing_thread_and_a_plain_forward_thread_share_a_hybrid_model():
    """While one thread captures block arguments (its blocks answer with their input), another thread's forward of
    the same model runs its blocks for real: both get the reference outputs."""
    import threading

    model = tiny_decoder("gemma3")
    view = LayerView(model)
    ids, mask = _prompts(4)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        after_two = view.forward_until(2, input_ids=ids, attention_mask=mask)
    errors = []

    def capture():
        with torch.no_grad():
            for _ in range(30):
                if not torch.equal(view.forward_until(2, input_ids=ids, attention_mask=mask), after_two):
                    errors.append("view")

    def forward():
        with torch.no_grad():
            for _ in range(30):
                if not torch.equal(model(input_ids=ids, attention_mask=mask).logits, reference):
                    errors.append("model")

    threads = [threading.Thread(target=capture), threading.Thread(target=forward)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(type(b).__name__ == "Gemma3DecoderLayer" and not hasattr(type(b), "_hf_align_passing")
               for b in view.blocks)  # every block is back to its own class


# -- 3. decoding: speculative and per-token exit against stock generate --------------------------------------


@pytest.fixture(scope="module")
def decoders():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tiny_decoder(family)
        return cache[family]

    return get


# speculative_generate refuses sliding-window models past the window (its own check): decode within a window of 24
WIDE = {"qwen3": dict(sliding_window=24), "gemma2": dict(sliding_window=24), "gemma3": dict(sliding_window=24),
        "opt": dict(word_embed_proj_dim=32), "llama4": dict(attention_chunk_size=24)}
# known limits of speculative.py (reported, not patched here): OPT's project_in (word_embed_proj_dim != hidden)
# breaks the draft fast path's embed(token) + position part; Falcon with ALiBi builds its bias from a 2D mask, and
# draft steps pass the model a 4D mask
SPECULATIVE_KNOWN: dict[str, str] = {}  # (ALiBi: the draft steps pass the 2D mask when the blocks take `alibi`)


@pytest.mark.parametrize("family", DECODE_PARAMS)
@pytest.mark.parametrize("batch", [1, 4])
def test_speculative_greedy_equals_generate(family, batch):
    if family in SPECULATIVE_KNOWN and batch > 1:
        pytest.xfail(SPECULATIVE_KNOWN[family])
    model = tiny_decoder(family, **WIDE.get(family, {}))
    ids, mask = _prompts(batch)
    reference = _generate(model, ids, mask)
    for k, n in ((1, 3), (3, 2)):
        out = speculative_generate(model, ids, mask, exit_layer=k, num_draft_tokens=n, max_new_tokens=10,
                                   eos_token_id=None, pad_token_id=0)
        assert torch.equal(out, reference), (family, batch, k, n)


def test_speculative_opt_with_project_in():
    model = tiny_decoder("opt")  # word_embed_proj_dim 16 != hidden 32: project_in / project_out
    ids, mask = _prompts(4)
    out = speculative_generate(model, ids, mask, exit_layer=2, num_draft_tokens=2, max_new_tokens=10,
                               eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, _generate(model, ids, mask))


@pytest.mark.parametrize("family", DECODE_PARAMS)
def test_per_token_exit_threshold_one_equals_generate(decoders, family):
    model = decoders(family)
    ids, mask = _prompts(4)
    out = hf_align.early_exit_generate(model, input_ids=ids, attention_mask=mask, threshold=1.0, max_new_tokens=10,
                                       eos_token_id=None, pad_token_id=0)
    assert torch.equal(out.sequences, _generate(model, ids, mask))
    assert bool((out.exit_layers == L).all())


@pytest.mark.parametrize("family", DECODE_PARAMS)
def test_recorded_kv_equals_what_the_block_caches(decoders, family):
    """The state propagation of per-token exit: the keys/values recorded from block j on h are exactly those
    block j writes into a real cache when it runs on h (read back from the cache)."""
    model = decoders(family)
    view = LayerView(model)
    ids, mask = _prompts(4)
    cache = T.DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    state = view.prepare(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    state = view.run_block(state)
    j = 3
    args, kwargs = state.arguments_of(j)
    keys, values = recorded_kv(view.blocks[j - 1], state.hidden, kwargs)
    with torch.no_grad():
        view.blocks[j - 1](state.hidden, *args, **kwargs)
    layer = cache.layers[j - 1]
    kept = min(keys.shape[-2], layer.keys.shape[-2])  # a sliding-window layer keeps only its window
    assert kept >= 3
    # (Bloom's padded positions are NaN in the model's own cache too)
    torch.testing.assert_close(keys[..., -kept:, :], layer.keys[..., -kept:, :], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(values[..., -kept:, :], layer.values[..., -kept:, :], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("family", DECODE_PARAMS)
def test_per_token_exit_runs_with_exits(decoders, family):
    """With exits firing (threshold 0: every token leaves at block 1), decoding completes and every later block
    has its propagated keys/values in the cache."""
    model = decoders(family)
    ids, mask = _prompts(4)
    out = hf_align.early_exit_generate(model, input_ids=ids, attention_mask=mask, threshold=0.0, max_new_tokens=6,
                                       eos_token_id=None, pad_token_id=0)
    assert out.sequences.shape == (4, 13)
    assert bool((out.exit_layers[:, 1:] == 1).all())


# -- 4. the aligned loss against the model truncated to l blocks ---------------------------------------------


def _truncated(model, layers, total=L):
    """A copy of ``model`` with only its first ``layers`` blocks: its own forward, final norm, head and loss."""
    m = copy.deepcopy(model)
    name = min((name for name, mod in m.named_modules() if isinstance(mod, torch.nn.ModuleList) and len(mod) == total),
               key=lambda s: s.count("."))
    parent, _, attr = name.rpartition(".")
    holder = m.get_submodule(parent) if parent else m
    setattr(holder, attr, torch.nn.ModuleList(list(getattr(holder, attr))[:layers]))
    configs = [getattr(mod, "config", None) for mod in m.modules()]
    configs += [getattr(c, sub, None) for c in list(configs) for sub in ("vision_config", "text_config")]
    for config in {id(c): c for c in configs if c is not None}.values():
        if getattr(config, "num_hidden_layers", None) == total:
            config.num_hidden_layers = layers
            if getattr(config, "layer_types", None) is not None:
                config.layer_types = config.layer_types[:layers]
    return m


def _aligned_args(tmp_path):
    return hf_align.AlignedTrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], disable_tqdm=True,
                                             save_strategy="no", per_device_train_batch_size=4, use_cpu=True,
                                             dataloader_num_workers=0, seed=0)


def _paper_weights(n):
    return [2 * l / (n * (n + 1)) for l in range(1, n + 1)]  # the paper's default weights


@pytest.mark.parametrize("family", SLOW_PARAMS)
def test_aligned_loss_equals_truncated_models_losses(tmp_path, family):
    model = tiny_decoder(family, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 99, (6, 9), generator=g)
    labels = ids.clone()
    labels[::2, -3:] = -100
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()}).with_format("torch")
    trainer = hf_align.AlignedTrainer(model=model, args=_aligned_args(tmp_path), train_dataset=data)
    batch = data[:4]
    model.eval()
    ours = trainer.compute_loss(model, dict(batch))
    expected = 0.0
    with torch.no_grad():
        for l, w in enumerate(_paper_weights(L), start=1):
            ref = _truncated(model, l).double()
            expected += w * ref(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss.item()
    assert abs(ours.item() - expected) <= 1e-5


@pytest.mark.parametrize("family", [pytest.param(f, marks=[] if f == "modernbert" else [pytest.mark.slow])
                                    for f in ("modernbert", "mpnet", "albert", "dinov2", "beit", "clip", "siglip")])
def test_encoder_aligned_loss_equals_hand_computation(tmp_path, family):
    model = tiny_encoder(family)
    view = LayerView(model)
    n = view.num_layers
    g = torch.Generator().manual_seed(0)
    if view.is_vision:
        size = view.layer_config.image_size
        columns = {"pixel_values": torch.randn(6, 3, size, size, generator=g).tolist()}
    else:
        ids = torch.randint(1, 99, (6, 7), generator=g)
        mask = torch.ones_like(ids)
        mask[::3, -2:] = 0
        ids[mask == 0] = 0
        columns = {"input_ids": ids.tolist(), "attention_mask": mask.tolist()}
    columns["labels"] = torch.randint(0, 3, (6,), generator=g).tolist()
    data = Dataset.from_dict(columns).with_format("torch")
    trainer = hf_align.AlignedTrainer(model=model, args=_aligned_args(tmp_path), train_dataset=data)
    batch = dict(data[:4])
    model.eval()
    ours = trainer.compute_loss(model, dict(batch))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    expected = 0.0
    with torch.no_grad():
        if family == "albert":  # shared layer groups: the hand formula on the model's own hidden states
            hidden = model.double()(**{k: v.double() if v.is_floating_point() else v for k, v in inputs.items()},
                                    output_hidden_states=True).hidden_states[1:]
            for w, h in zip(_paper_weights(n), hidden):
                logits = model.classifier(torch.tanh(model.albert.pooler(h[:, 0])))
                expected += w * F.cross_entropy(logits, batch["labels"]).item()
        else:  # the model truncated to l blocks: its own head and loss
            for l, w in enumerate(_paper_weights(n), start=1):
                ref = _truncated(model, l, n).double()
                cast = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
                expected += w * ref(**cast, labels=batch["labels"]).loss.item()
    assert abs(ours.item() - expected) <= 1e-5


CLASSIFIERS = [("decoder", f) for f in DECODERS if hasattr(T, DECODER_CLASSES[f] + "ForSequenceClassification")]
CLASSIFIERS += [("encoder", f) for f in ENCODER_FAMILIES if ENCODER_CLASSES[f][0]]


@pytest.mark.parametrize("kind,family", [pytest.param(k, f, marks=[] if f in ("gemma3", "beit", "albert", "opt")
                                                      else [pytest.mark.slow], id=f) for k, f in CLASSIFIERS])
def test_classifier_early_exit_at_block_k_is_the_truncated_model(kind, family):
    """EarlyExitModel at block k (fixed policy) gives the logits of the model truncated to k blocks, for a padded
    batch, and its exits skip the later blocks."""
    if kind == "decoder":
        model = tiny_decoder(family, "ForSequenceClassification")
    else:
        model = tiny_encoder(family, dtype=torch.float64)
    view = LayerView(model)
    n = view.num_layers
    inputs = view.example_inputs(batch_size=3, seq_len=7)
    for k in (1, n - 1):
        out = hf_align.EarlyExitModel(model, policy="fixed", exit_layer=k)(**inputs)
        assert out.exit_layers.tolist() == [k] * 3
        with torch.no_grad():
            if family == "albert":  # shared groups: the hand formula on the model's own hidden states
                h = model(**inputs, output_hidden_states=True).hidden_states[k]
                reference = model.classifier(torch.tanh(model.albert.pooler(h[:, 0])))
            else:
                reference = _truncated(model, k, n)(**inputs).logits
        torch.testing.assert_close(out.logits, reference, rtol=0, atol=1e-10)


def test_moe_router_aux_loss_is_the_models():
    """The MoE families' router auxiliary loss, as the model adds it: loss = CE + coef * aux_loss."""
    model = tiny_decoder("mixtral", dtype=torch.float64, output_router_logits=True, router_aux_loss_coef=0.1)
    ids, _ = _prompts(1)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    logits = LayerView(model).layer_logits(input_ids=ids)[-1]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    aux = hf_align.families.router_aux_loss(model, out)
    torch.testing.assert_close(out.loss.double(), (ce + aux).double(), rtol=0, atol=1e-6)  # aux is float32
    assert aux > 0


# -- 5. exit costs: analytic FLOPs against torch's counter, or "not counted" ---------------------------------


@pytest.mark.parametrize("mode", ["forward", "decode"])
@pytest.mark.parametrize("family", SLOW_PARAMS)
def test_exit_costs_analytic_flops_match_the_counter(family, mode):
    # (decode: a KV cache of 8 > the sliding window 4, so sliding layers attend to fewer keys)
    model = tiny_decoder(family, dtype=torch.float32)
    table = hf_align.exit_costs(model, mode=mode, batch_size=2, seq_len=8, repeats=1, progress=False)
    if not get_family(model.config.model_type).flops_counted:
        assert all(r["flops_analytic"] is None for r in table)
        assert any("not counted" in note for note in table.notes)
        return
    for row in table:
        assert abs(row["flops"] - row["flops_analytic"]) <= 0.02 * row["flops_analytic"], row
    # blocks after the exit never run: each further block adds its own count (sliding blocks less when decoding)
    for a, b in zip(table.rows, table.rows[1:]):
        counted, analytic = b["flops"] - a["flops"], b["flops_analytic"] - a["flops_analytic"]
        assert abs(counted - analytic) <= 0.02 * analytic


@pytest.mark.parametrize("family", [pytest.param(f, marks=[] if f == "dinov2" else [pytest.mark.slow])
                                    for f in ("modernbert", "mpnet", "albert", "dinov2", "beit", "clip", "siglip")])
def test_encoder_exit_costs_match_the_counter(family):
    table = hf_align.exit_costs(tiny_encoder(family), batch_size=2, seq_len=8, repeats=1, progress=False)
    for row in table:
        assert abs(row["flops"] - row["flops_analytic"]) <= 0.02 * row["flops_analytic"], row


@pytest.mark.slow
@pytest.mark.parametrize("family,class_name", [c for c in CASES if c[1] != "GPT2ForSequenceClassification"])
def test_original_families_exit_cost_claims(family, class_name):
    """The table's "counted" / "not counted" for the families registered before this matrix, measured."""
    model = tiny_model(family, class_name)
    table = hf_align.exit_costs(model, mode="forward", batch_size=2, seq_len=8, repeats=1, progress=False)
    if get_family(model.config.model_type).flops_counted:
        assert all(r["flops_rel_err"] <= 0.02 for r in table)
    else:
        assert all(r["flops_analytic"] is None for r in table)


def test_every_registered_family_has_a_tiny_model_in_the_tests():
    """The support table lists only families these tests build (tiny_models: the original CASES and the new ones)."""
    covered = {get_family(tiny_model(f, c).config.model_type).name for f, c in CASES}
    covered |= {get_family(DECODER_FAMILIES[f][0]().model_type).name for f in DECODER_FAMILIES}
    covered |= {get_family(ENCODER_FAMILIES[f][0]().model_type).name for f in ENCODER_FAMILIES}
    assert covered == set(hf_align.supported_families())


# -- 6. the structural fallback ------------------------------------------------------------------------------

_S = dict(hidden_size=32, num_hidden_layers=L, num_attention_heads=4, intermediate_size=37, vocab_size=99,
          pad_token_id=0, max_position_embeddings=64, num_labels=3, initializer_range=0.2)
# unregistered families, chosen to differ: Persimmon (final_layernorm, partial rotary, q/k layernorm), XGLM
# (sinusoidal positions, scaled embeddings, layer_norm), MPT (ALiBi, blocks in `blocks`, norm_f)
UNREGISTERED = {
    "persimmon": lambda: T.PersimmonConfig(**_S),
    "xglm": lambda: T.XGLMConfig(d_model=32, num_layers=L, attention_heads=4, ffn_dim=37, vocab_size=99,
                                 pad_token_id=0, max_position_embeddings=64, init_std=0.2),
    "mpt": lambda: T.MptConfig(d_model=32, n_layers=L, n_heads=4, vocab_size=99, pad_token_id=0, num_labels=3,
                               initializer_range=0.2, use_cache=True),
}
_PREFIX = {"persimmon": "Persimmon", "xglm": "XGLM", "mpt": "Mpt"}


def _unregistered(name, suffix, dtype=torch.float64):
    assert get_family(name) is None  # really not registered
    torch.manual_seed(0)
    return getattr(T, _PREFIX[name] + suffix)(UNREGISTERED[name]()).to(dtype).eval()


@pytest.mark.parametrize("name", list(UNREGISTERED))
@pytest.mark.parametrize("suffix", ["ForCausalLM", "ForSequenceClassification", "Model"])
def test_structural_fallback_is_kept_after_its_self_check(name, suffix):
    if not hasattr(T, _PREFIX[name] + suffix):
        pytest.skip(f"transformers has no {_PREFIX[name]}{suffix}")
    model = _unregistered(name, suffix, torch.float32)
    with pytest.warns(UserWarning, match="inferred by structure"):
        view = LayerView(model)
    assert view.family.inferred and "blocks" in view.family.inferred and view.family.causal
    assert "inferred by structure" in view.describe()
    ids, mask = _prompts(4)
    with torch.no_grad():
        if suffix == "Model":
            ours, ref = view.output_hidden_states(input_ids=ids, attention_mask=mask), \
                model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            for a, b in zip(ours, ref):
                torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=0, atol=1e-5)
        else:
            ours = view.layer_logits(input_ids=ids, attention_mask=mask)[-1]
            torch.testing.assert_close(ours, model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(UNREGISTERED))
def test_structural_fallback_decodes_like_generate(name):
    # (XGLM's own mask code overflows in float64)
    model = _unregistered(name, "ForCausalLM", torch.float32 if name == "xglm" else torch.float64)
    ids, mask = _prompts(4)
    with pytest.warns(UserWarning, match="inferred by structure"):
        out = hf_align.early_exit_generate(model, input_ids=ids, attention_mask=mask, threshold=1.0, max_new_tokens=8,
                                           eos_token_id=None, pad_token_id=0)
    assert torch.equal(out.sequences, _generate(model, ids, mask, new=8))


class _ToyConfig(T.PretrainedConfig):
    model_type = "hf-align-toy"

    def __init__(self, hidden_size=8, num_hidden_layers=2, vocab_size=11, sequential=False, scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size, self.num_hidden_layers, self.vocab_size = hidden_size, num_hidden_layers, vocab_size
        self.sequential, self.scale = sequential, scale


class _ToyModel(T.PreTrainedModel):
    config_class = _ToyConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        layers = [torch.nn.Linear(config.hidden_size, config.hidden_size) for _ in range(config.num_hidden_layers)]
        self.layers = torch.nn.Sequential(*layers) if config.sequential else torch.nn.ModuleList(layers)
        self.norm = torch.nn.LayerNorm(config.hidden_size)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, output_hidden_states=False, **kwargs):
        hidden = self.embed(input_ids)
        states = [hidden]
        for layer in self.layers:
            hidden = torch.tanh(layer(hidden))
            states.append(hidden)
        return T.modeling_outputs.BaseModelOutput(last_hidden_state=self.norm(hidden), hidden_states=tuple(states))


class _ToyForCausalLM(T.PreTrainedModel):
    config_class = _ToyConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = _ToyModel(config)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.model(input_ids, attention_mask).last_hidden_state
        return T.modeling_outputs.CausalLMOutput(logits=self.lm_head(hidden) * self.config.scale)


def test_structural_fallback_fails_clearly():
    ids = torch.tensor([[1, 2, 3]])
    # blocks that are not a ModuleList of num_hidden_layers entries: nothing to infer
    with pytest.raises(ValueError, match="no nn.ModuleList with config.num_hidden_layers=2 entries.*register_family"):
        LayerView(_ToyForCausalLM(_ToyConfig(sequential=True)).eval())
    # structure found, but the head does something the structure does not show: kept only if the self-check passes
    with pytest.raises(ValueError, match="no layer-view adapter.*inferred a layer view by structure .* does not reproduce the model.*register_family"):
        LayerView(_ToyForCausalLM(_ToyConfig(scale=3.0)).eval())
    # without the hidden scaling the same structure is inferred and kept
    with pytest.warns(UserWarning, match="final stage \\['model.norm'\\]|final stage \\['norm'\\]"):
        view = LayerView(_ToyForCausalLM(_ToyConfig()).eval())
    assert view.forward_until(1, input_ids=ids).shape == (1, 3, 8)
    with pytest.raises(ValueError, match="check=False is refused"):
        LayerView(_ToyForCausalLM(_ToyConfig()).eval(), check=False)


# -- 7. the support table ------------------------------------------------------------------------------------


def test_support_table_in_docs_is_the_registry():
    docs = (pathlib.Path(__file__).parent.parent / "docs" / "layers.md").read_text()
    start, end = "<!-- support-table:start -->", "<!-- support-table:end -->"
    assert start in docs and end in docs, "docs/layers.md lost its generated support table"
    written = docs.split(start, 1)[1].split(end, 1)[0].strip()
    assert written == support_table().strip(), "regenerate the table in docs/layers.md from hf_align.families.support_table()"


def test_aligned_trainer_adds_the_router_aux_loss_as_the_model_does(tmp_path):
    """With only the last layer weighted, AlignedTrainer's loss is the MoE model's own loss (CE + coef * aux)."""
    from datasets import Dataset

    from hf_align import AlignedTrainer, AlignedTrainingArguments

    model = tiny_decoder("mixtral", dtype=torch.float64, output_router_logits=True, router_aux_loss_coef=0.1)
    ids, _ = _prompts(1)
    args = AlignedTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, layer_weights="last",
                                    disable_tqdm=True, save_strategy="no")
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    trainer = AlignedTrainer(model=model, args=args, train_dataset=data)
    with torch.no_grad():
        ours = trainer.compute_loss(model, {"input_ids": ids, "labels": ids})
        reference = model(input_ids=ids, labels=ids, use_cache=False).loss
    assert hf_align.families.router_aux_loss(model, model(input_ids=ids, use_cache=False)) > 0
    torch.testing.assert_close(ours.double(), reference.double(), rtol=0, atol=1e-6)

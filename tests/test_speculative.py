"""Self-speculative decoding: exactness against the model's own generate, the sampling rule, KV reuse, bad input."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
import transformers as T
from tiny_models import left_padded_prompts, tiny_config, tiny_model

import hf_align
from hf_align.generation import speculative_acceptance, speculative_generate, speculative_sample

DECODERS = [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
            ("qwen2", "Qwen2ForCausalLM")]
L = 4


def _decoder(family, class_name, seed=0):
    extra = {"n_layer": L} if family == "gpt2" else {"num_hidden_layers": L}
    # initializer_range 0.2: varied greedy continuations (at 0.02 tiny GPT-2 repeats one token)
    model = tiny_model(family, class_name, seed=seed, initializer_range=0.2, **extra)
    return model.double()  # float64: no near-tie can flip an argmax


_prompts = left_padded_prompts


@pytest.fixture(scope="module", params=DECODERS, ids=[d[0] for d in DECODERS])
def decoder(request):
    return _decoder(*request.param)


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_equals_generate(decoder, batch):
    ids, mask = _prompts(batch)
    inputs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10)
    plain = decoder.generate(**inputs, eos_token_id=None, do_sample=False)
    # an EOS id taken from generate's own output, so that it really occurs inside drafts and finishes rows early
    new = plain[0, ids.shape[1]:].tolist()
    eos = next(t for j, t in enumerate(new) if j >= 3 and t not in new[:j])  # first occurs after a full draft
    plain_eos = decoder.generate(**inputs, eos_token_id=eos, do_sample=False)
    assert plain_eos.shape[1] < plain.shape[1] or batch > 1
    assert (plain_eos[:, ids.shape[1]:] == eos).any()
    for (k, n), (eos_id, reference) in itertools.product([(1, 2), (2, 3), (3, 5)], [(None, plain), (eos, plain_eos)]):
        out, stats = speculative_generate(decoder, **inputs, eos_token_id=eos_id, exit_layer=k, num_draft_tokens=n,
                                          return_stats=True)
        assert out.shape == reference.shape, (k, n, eos_id)
        assert torch.equal(out, reference), (k, n, eos_id)
        assert stats.rounds > 0 and 0 <= stats.accepted <= stats.drafted
        assert stats.fast_path is True  # draft steps skipped the preamble (checked bit-exact on first use)


def test_eos_inside_accepted_draft():
    """Make the last block the identity (zero output projections): the draft at k = L-1 is then the full model, every
    draft token is accepted (acceptance rate exactly 1), and the EOS is necessarily drafted inside a round."""
    model = _decoder("llama", "LlamaForCausalLM")
    last = hf_align.LayerView(model).blocks[-1]
    with torch.no_grad():
        last.self_attn.o_proj.weight.zero_()
        last.mlp.down_proj.weight.zero_()
    ids, mask = _prompts(4)
    inputs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    plain = model.generate(**inputs, eos_token_id=None)
    new = plain[0, ids.shape[1]:].tolist()
    eos = next(t for j, t in enumerate(new) if j >= 3 and t not in new[:j])
    reference = model.generate(**inputs, eos_token_id=eos)
    out, stats = speculative_generate(model, **inputs, eos_token_id=eos, exit_layer=L - 1, num_draft_tokens=5,
                                      return_stats=True)
    assert torch.equal(out, reference)
    assert stats.acceptance_rate == 1.0 and stats.drafted > 0
    assert (reference[:, ids.shape[1]:] == eos).any(-1).sum() >= 1


def test_greedy_dict_output_and_stats():
    model = _decoder("llama", "LlamaForCausalLM")
    ids, mask = _prompts(2)
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False,
                               return_dict_in_generate=True)
    out = hf_align.speculative_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=9, exit_layer=3,
                                        num_draft_tokens=3, return_dict_in_generate=True)
    assert isinstance(out, T.generation.utils.GenerateDecoderOnlyOutput)
    assert torch.equal(out.sequences, reference.sequences)
    stats = out.stats
    assert stats.new_tokens == 9 and stats.batch_size == 2 and stats.exit_layer == 3
    assert stats.acceptance_rate == stats.accepted / stats.drafted
    assert stats.tokens_per_second > 0


def test_auto_exit_layer_is_exact_and_reports_calibration():
    model = _decoder("gpt2", "GPT2LMHeadModel")
    ids, mask = _prompts(4)
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    out, stats = speculative_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=16,
                                      exit_layer="auto", return_stats=True)
    assert torch.equal(out, reference)
    calib = stats.calibration
    assert 1 <= stats.exit_layer <= L - 1 and (calib["exit_layer"], calib["num_draft_tokens"]) == (
        stats.exit_layer, stats.num_draft_tokens)
    assert set(calib["alpha"]) == set(range(1, L)) and all(0 <= a <= 1 for a in calib["alpha"].values())
    # a random model's early layers rarely agree with its last: nothing is predicted to pay off, so the call decodes
    # the ordinary way after the prefill (and says so), with the same output
    assert calib["plain"] is True and calib["history"][-1] == ("plain", 0)
    assert stats.plain_steps == 15 and stats.rounds == 0
    assert max(calib["predicted_speedup"].values()) < 1.0


def test_auto_draft_count_measures_the_rounds_of_the_call():
    """With the depth fixed and the draft count automatic, every round's acceptance is folded into the choice."""
    model = _decoder("llama", "LlamaForCausalLM")
    ids, mask = _prompts(4)
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    out, stats = speculative_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=16, exit_layer=2,
                                      num_draft_tokens="auto", return_stats=True)
    assert torch.equal(out, reference)
    calib = stats.calibration
    assert calib["plain"] is False and stats.plain_steps == 0 and stats.rounds > 0
    assert {k for k, _ in calib["history"]} == {2} and set(calib["measured"]) == {2}
    measured = calib["measured"][2]
    assert measured["accepted"] == stats.accepted and measured["rejections"] == stats.rejections
    first = calib["history"][0]
    assert calib["predicted_speedup"][f"{first[0]},{first[1]}"] > 0


def test_auto_choice_counts_the_measured_round_overhead_and_the_measured_plain_step():
    """The decision rule, by hand: rounds whose wall time exceeds the timed parts by o per position are predicted at
    E(alpha, n) / (T(k, n) + (n+1) o) * t_plain, with t_plain the measured plain step; once that is below 1 for
    every (k, n), the call falls back to plain decoding. Until three rounds were timed, the overhead counts as 0."""
    from hf_align.generation.auto_exit import ExitChooser, expected_tokens_per_round

    chooser = ExitChooser(hf_align.LayerView(_decoder("llama", "LlamaForCausalLM")))
    ms = 1e-3
    chooser.costs = {m: {"preamble": 0.5 * ms, "block": ms * (1 + 0.05 * (m - 1)), "head": 0.2 * ms}
                     for m in range(1, 10)}
    chooser.prior = {k: 0.9 for k in chooser.candidates}

    def by_hand(k, n, overhead, plain):
        parts = ((n + 1) * (0.5 * ms + k * ms) + n * 0.2 * ms + 0.5 * ms + (L - k) * ms * (1 + 0.05 * n)
                 + 0.2 * ms)
        return expected_tokens_per_round(chooser.alpha(k), n) / (parts + (n + 1) * overhead) * plain

    chooser.current = chooser._best()
    assert chooser.predicted_speedup(*chooser.current) == pytest.approx(
        by_hand(*chooser.current, 0.0, 0.5 * ms + L * ms + 0.2 * ms), rel=1e-12)
    assert chooser.needs_plain_probe()
    plain = 5.0 * ms  # the real plain step costs more than its parts (4.7 ms)
    chooser.observe_plain(plain)
    chooser.observe_plain(plain)
    assert not chooser.needs_plain_probe() and not chooser.plain
    assert chooser.plain_seconds() == plain
    k, n = chooser.current
    assert chooser.predicted_speedup(k, n) == pytest.approx(by_hand(k, n, 0.0, plain), rel=1e-12) and \
        chooser.predicted_speedup(k, n) > 1
    overhead = 3.0 * ms  # per position: every round is slower than any gain
    assert max(by_hand(kk, nn, overhead, plain) for kk in chooser.candidates for nn in chooser.draft_counts) < 1
    for r in range(4):  # the first round is not timed; the overhead counts from the third timed one
        k, n = chooser.current
        chooser.observe(k, n, accepted=n, drafted=n, rejections=0,
                        seconds=chooser.part_seconds(k, n) + (n + 1) * overhead)
        assert chooser.plain is (r == 3)
    assert chooser.overhead_per_position() == pytest.approx(overhead, rel=1e-9)
    assert chooser.report()["plain_step_s"]["measured"] == plain


def test_auto_prior_is_the_teacher_forced_agreement_on_the_prompt():
    """The prior of the automatic choice, recomputed independently: the layer view's per-layer logits over the
    prompt itself, and the agreement of each layer's argmax with the last layer's at the real positions that predict
    prompt tokens. With the last block made the identity, the agreement of block L-1 is 1."""
    model = _decoder("llama", "LlamaForCausalLM", seed=3)
    last = hf_align.LayerView(model).blocks[-1]
    with torch.no_grad():
        last.self_attn.o_proj.weight.zero_()
        last.mlp.down_proj.weight.zero_()
    ids, mask = _prompts(4)
    with warnings.catch_warnings():  # whether any k is predicted faster depends on this machine's timings
        warnings.filterwarnings("ignore", message="choose_exit_layer: no draft depth", category=UserWarning)
        k, report = hf_align.choose_exit_layer(model, ids, mask, num_draft_tokens=3)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = hf_align.LayerView(model).layer_logits(input_ids=ids, attention_mask=mask, position_ids=positions)
    window = slice(0, ids.shape[1] - 1)  # every position but the last predicts a prompt token
    real = mask[:, window] == 1
    final = logits[-1][:, window].argmax(-1)
    for layer in range(1, L):
        agree = (logits[layer - 1][:, window].argmax(-1) == final)
        assert report["prompt_agreement"][layer] == pytest.approx(agree[real].double().mean().item(), abs=1e-12)
        assert report["prompt_positions"][layer] == int(real.sum())
    assert report["prompt_agreement"][L - 1] == 1.0
    best = max(report["predicted_speedup"], key=report["predicted_speedup"].get)
    assert (k, report["num_draft_tokens"]) == tuple(map(int, best.split(",")))


def test_top_k_1_sampling_equals_greedy():
    # sampling from the warped distributions with top_k=1 is deterministic: the sampling path must give greedy output
    model = _decoder("qwen2", "Qwen2ForCausalLM")
    ids, mask = _prompts(4)
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    out = speculative_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=1,
                               exit_layer=1, num_draft_tokens=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, reference)


# -- the sampling rule ----------------------------------------------------------------------------------------


def _random_dist(rng, shape):
    x = rng.gamma(0.7, size=shape)
    x[..., 0] *= rng.random() < 0.5  # sometimes a zero-probability token
    return x / x.sum(-1, keepdims=True)


def test_acceptance_rule_output_distribution_is_exactly_p():
    """Enumerate every draft sequence and every accept/reject outcome (V=3, n=2) in float64: the emitted tokens,
    continued by p where the round stopped, have exactly the target distribution p(s_1) p(s_2|s_1) p(s_3|s_1 s_2)."""
    rng = np.random.default_rng(0)
    V, n = 3, 2
    for trial in range(5):
        target = {pre: _random_dist(rng, V) for m in range(n + 1) for pre in itertools.product(range(V), repeat=m)}
        drafter = {pre: _random_dist(rng, V) for m in range(n) for pre in itertools.product(range(V), repeat=m)}

        def chain(seq, target=target):
            return np.prod([target[tuple(seq[:j])][seq[j]] for j in range(len(seq))])

        emitted = {}  # probability of each emitted token sequence (length 1..n+1)
        for draft in itertools.product(range(V), repeat=n):
            q_draft = np.prod([drafter[draft[:j]][draft[j]] for j in range(n)])
            if q_draft == 0:
                continue
            p = torch.tensor(np.stack([target[draft[:j]] for j in range(n + 1)]))[None]
            q = torch.tensor(np.stack([drafter[draft[:j]] for j in range(n)]))[None]
            accept, residual = speculative_acceptance(p, q, torch.tensor(draft)[None])
            accept, residual = accept[0].numpy(), residual[0].numpy()
            reach = 1.0
            for j in range(n + 1):
                stop = 1.0 - accept[j] if j < n else 1.0  # reject at j (or the bonus position)
                for x in range(V):
                    seq = draft[:j] + (x,)
                    emitted[seq] = emitted.get(seq, 0.0) + q_draft * reach * stop * residual[j, x]
                if j < n:
                    reach *= accept[j]
        for full in itertools.product(range(V), repeat=n + 1):
            got = sum(prob * chain(full) / chain(full[: len(seq)]) for seq, prob in emitted.items()
                      if full[: len(seq)] == seq and chain(full[: len(seq)]) > 0)
            np.testing.assert_allclose(got, chain(full), rtol=0, atol=1e-13, err_msg=f"trial {trial} {full}")


def test_speculative_sample_follows_the_rule():
    # a Monte-Carlo check of the sampler against the rule's exact probabilities (fixed seed, 5 sigma)
    rng = np.random.default_rng(3)
    V, n, B = 4, 2, 40000
    p = torch.tensor(_random_dist(rng, (1, n + 1, V))).expand(B, -1, -1)
    q = torch.tensor(_random_dist(rng, (1, n, V))).expand(B, -1, -1)
    draft = torch.tensor([[1, 2]]).expand(B, -1)
    accept, residual = speculative_acceptance(p[:1], q[:1], draft[:1])
    accept, residual = accept[0].numpy(), residual[0].numpy()
    count, token = speculative_sample(p, q, draft, torch.Generator().manual_seed(0))
    for a in range(n + 1):
        reach = np.prod(accept[:a])
        for x in range(V):
            exact = reach * (1 - accept[a] if a < n else 1.0) * residual[a, x]
            observed = float(((count == a) & (token == x)).double().mean())
            assert abs(observed - exact) <= 5 * np.sqrt(exact * (1 - exact) / B) + 1e-12, (a, x, observed, exact)


def test_sampling_end_to_end_matches_model_distribution():
    """Two sampled tokens from 1500 copies of one prompt (a batch, so the min-accepted rule is exercised): the
    empirical joint distribution matches the model's own warped p(x1) p(x2|x1) (chi-square, fixed seed)."""
    model = _decoder("llama", "LlamaForCausalLM", seed=2)
    prompt = torch.randint(1, 99, (1, 5), generator=torch.Generator().manual_seed(4))
    top_k, B = 3, 1500
    warp = T.TopKLogitsWarper(top_k)
    with torch.no_grad():
        p1 = torch.softmax(warp(None, model(prompt).logits[:, -1].float()), -1)[0]
        joint = {}
        for x1 in p1.nonzero()[:, 0].tolist():
            logits = model(torch.cat([prompt, torch.tensor([[x1]])], 1)).logits[:, -1].float()
            p2 = torch.softmax(warp(None, logits), -1)[0]
            for x2 in p2.nonzero()[:, 0].tolist():
                joint[(x1, x2)] = float(p1[x1] * p2[x2])
    out = speculative_generate(model, input_ids=prompt.expand(B, -1), max_new_tokens=2, do_sample=True, top_k=top_k,
                               eos_token_id=None, exit_layer=1, num_draft_tokens=2,
                               generator=torch.Generator().manual_seed(0))
    pairs = [tuple(row) for row in out[:, -2:].tolist()]
    assert set(pairs) <= set(joint)
    chi2 = sum((pairs.count(c) - B * e) ** 2 / (B * e) for c, e in joint.items())
    assert chi2 < 40.0, chi2  # 8 degrees of freedom: P(chi2 > 40) < 1e-5


# -- KV reuse -------------------------------------------------------------------------------------------------


def test_kv_reuse_block_calls():
    """Forward hooks record the positions of every block call. With reuse, blocks 1..k run the prompt once and then
    one position per call (n draft steps + the one undrafted token per round); blocks k+1..L run the prompt once and
    then one call of n_r+1 positions per round. So every position passes every block exactly once; without reuse
    blocks 1..k would run the n_r drafted positions of every round a second time in verification."""
    model = _decoder("llama", "LlamaForCausalLM")
    blocks = hf_align.LayerView(model).blocks
    ids, mask = _prompts(1)
    speculative_generate(model, input_ids=ids, max_new_tokens=1, exit_layer=1)  # builds (and self-checks) its view
    calls = [[] for _ in range(L)]
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls[i].append(a[0].shape[1])) for i, b in enumerate(blocks)]
    k, n = 2, 3
    try:
        _, stats = speculative_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=21, eos_token_id=None,
                                        exit_layer=k, num_draft_tokens=n, return_stats=True)
    finally:
        for h in handles:
            h.remove()
    prompt = ids.shape[1]
    for j in range(L):
        assert calls[j][0] == prompt  # prefill
    verify_sizes = calls[k][1:]
    assert len(verify_sizes) == stats.rounds and all(1 <= s <= n + 1 for s in verify_sizes)
    assert verify_sizes[0] == n + 1
    for j in range(k):
        assert calls[j][1:] == [1] * sum(verify_sizes)  # one position per call, n_r + 1 calls per round
    for j in range(k, L):
        assert calls[j][1:] == verify_sizes
    totals = [sum(c) for c in calls]
    assert totals == [prompt + sum(verify_sizes)] * L == stats.block_positions
    drafted = sum(s - 1 for s in verify_sizes)
    assert drafted == stats.drafted > 0
    no_reuse = prompt + sum(verify_sizes) + drafted  # blocks 1..k: drafts, then all n_r+1 positions again
    assert all(t < no_reuse for t in totals[:k])


# -- bad input ------------------------------------------------------------------------------------------------


def _fingerprint(model):
    return (
        model.config.to_dict(),
        model.generation_config.to_dict() if getattr(model, "generation_config", None) is not None else None,
        sorted(vars(model)),
        [(m.training, len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        [p.detach().clone() for p in model.parameters()],
    )


def _same(a, b):
    return a[:4] == b[:4] and all(torch.equal(x, y) for x, y in zip(a[4], b[4]))


def test_model_unchanged_after_use():
    model = _decoder("gpt2", "GPT2LMHeadModel")
    model.train()  # also the training flags must come back as they were
    before = _fingerprint(model)
    ids, mask = _prompts(2)
    _, stats = speculative_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=5, exit_layer=2,
                                    num_draft_tokens=2, return_stats=True)
    speculative_generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=5, exit_layer=2, do_sample=True)
    # in training mode dropout makes the embedding output random: the bit-exact check refuses the draft shortcut
    assert stats.fast_path is False
    assert _same(before, _fingerprint(model))
    assert not hasattr(model, "_cache") and not hasattr(model, "past_key_values")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(exit_layer=0), r"exit_layer must be in \[1, 3\]"),
        (dict(exit_layer=L), r"exit_layer must be in \[1, 3\]"),
        (dict(exit_layer="middle"), "exit_layer must be an integer"),
        (dict(exit_layer=1, num_draft_tokens=0), "num_draft_tokens must be a positive integer"),
        (dict(exit_layer=1, num_beams=2), "num_beams=2"),
        (dict(exit_layer=1, use_cache=False), "use_cache=False"),
        (dict(exit_layer=1, attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1, 0]])), "left padding"),
        (dict(exit_layer=1, input_ids=torch.tensor([5, 6, 7])), r"\(batch, length\) integer tensor"),
        (dict(exit_layer=1, input_ids=torch.tensor([[5.0, 6.0]])), r"\(batch, length\) integer tensor"),
    ],
)
def test_bad_arguments_fail_before_any_work(kwargs, match):
    model = _decoder("llama", "LlamaForCausalLM")
    before = _fingerprint(model)
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    kwargs = dict(kwargs)
    ids = kwargs.pop("input_ids", _prompts(1)[0])
    with pytest.raises((ValueError, TypeError), match=match):
        speculative_generate(model, input_ids=ids, attention_mask=kwargs.pop("attention_mask", None), max_new_tokens=4,
                             **kwargs)
    handle.remove()
    assert calls == []  # no forward ran
    assert _same(before, _fingerprint(model))


def test_sliding_window_within_and_beyond():
    model = tiny_model("mistral", "MistralForCausalLM", initializer_range=0.2, sliding_window=24).double()
    ids, mask = _prompts(2)
    inputs = dict(input_ids=ids, attention_mask=mask, do_sample=False)
    reference = model.generate(**inputs, max_new_tokens=17)  # 7 + 17 = the window
    assert torch.equal(speculative_generate(model, **inputs, max_new_tokens=17, exit_layer=1, num_draft_tokens=3),
                       reference)
    with pytest.raises(ValueError, match="sliding-window attention .window 24 tokens"):
        speculative_generate(model, **inputs, max_new_tokens=18, exit_layer=1)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: tiny_model("llama", "LlamaForSequenceClassification"), "classifier with no LM head"),
        (lambda: T.LlamaModel(tiny_config("llama")), "without an LM head"),
        (lambda: T.BertForMaskedLM(tiny_config("bert")), "encoder-only"),
        (lambda: T.RobertaForCausalLM(tiny_config("roberta")), "encoder-only"),  # is_decoder=False: bidirectional
        (lambda: tiny_model("bert", "BertForSequenceClassification"), "no LM head"),
    ],
)
def test_models_that_cannot_draft_are_refused(build, match):
    model = build()
    before = _fingerprint(model)
    with pytest.raises(ValueError, match=match):
        speculative_generate(model, input_ids=torch.tensor([[5, 6, 7]]), exit_layer=1, max_new_tokens=3)
    assert _same(before, _fingerprint(model))

"""``model.generate(custom_generate=hf_align.self_speculative)``: every option greedy or sampling ``generate``
honours, against stock ``generate`` on the same float64 model (the reference), one option at a time."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
import transformers as T
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers

import hf_align
from hf_align import self_speculative
from hf_align.generation import speculative_generate

DECODERS = [("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
            ("qwen2", "Qwen2ForCausalLM")]
L = 4


def _decoder(family="llama", class_name="LlamaForCausalLM", seed=0, **overrides):
    extra = {"n_layer": L} if family == "gpt2" else {"num_hidden_layers": L}
    model = tiny_model(family, class_name, seed=seed, initializer_range=0.2, **extra, **overrides)
    return model.double()  # float64: no near-tie can flip an argmax


def _ragged(batch=5, length=9, seed=1):
    """A left-padded batch with ragged prompt lengths (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, pads in enumerate([0, 2, 4, 1, 7][:batch]):
        mask[row, :pads] = 0
    ids[mask == 0] = 0
    return ids, mask


def _both(model, ids, mask, k=2, n=3, **kwargs):
    reference = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    ours = model.generate(input_ids=ids, attention_mask=mask, custom_generate=self_speculative, exit_layer=k,
                          num_draft_tokens=n, **kwargs)
    return reference, ours


@pytest.fixture(scope="module", params=DECODERS, ids=[d[0] for d in DECODERS])
def decoder(request):
    return _decoder(*request.param)


@pytest.fixture(scope="module")
def llama():
    return _decoder()


def _tokenizer():
    vocab = {f"t{i}": i for i in range(98)}
    vocab["abcdef"] = 98  # the probe string StopStringCriteria tokenizes to learn each token's text
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", unk_token="t1")


# -- exactness through generate ---------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 5])
def test_greedy_equals_generate_every_family(decoder, batch):
    ids, mask = _ragged(batch)
    for k, n in [(1, 2), (2, 4), (3, 3)]:
        reference, ours = _both(decoder, ids, mask, k, n, max_new_tokens=14, do_sample=False, eos_token_id=None)
        assert torch.equal(ours, reference), (k, n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family,class_name", DECODERS, ids=[d[0] for d in DECODERS])
def test_half_precision_greedy_equals_generate_up_to_ties_of_its_own_logits(family, class_name, dtype):
    """In bf16/fp16 (how real checkpoints are decoded) greedy output equals stock generate's row for row, except
    where generate's own next-token logits tie to within two units in the last place of that dtype: the verify pass
    runs n+1 positions in one matmul, whose accumulation order differs from one position at a time (the model's own
    teacher-forced forward disagrees with generate at such ties just as often). A real defect (a rejected slot left
    visible, a wrong position) diverges at gaps far above that; no output is NaN."""
    extra = {"n_layer": L} if family == "gpt2" else {"num_hidden_layers": L}
    identical = total = 0
    for seed in range(3):
        model = tiny_model(family, class_name, seed=seed, initializer_range=0.2, **extra).to(dtype)
        ids, mask = _ragged(5, seed=seed)
        gen = dict(max_new_tokens=14, do_sample=False, eos_token_id=None)
        reference = model.generate(input_ids=ids, attention_mask=mask, output_logits=True,
                                   return_dict_in_generate=True, **gen)
        for k, n in [(1, 2), (2, 4), ("auto", None)]:
            ours = model.generate(input_ids=ids, attention_mask=mask, custom_generate=self_speculative, exit_layer=k,
                                  num_draft_tokens=n, **gen)
            assert ours.shape == reference.sequences.shape
            for row in range(ids.shape[0]):
                total += 1
                differ = (ours[row] != reference.sequences[row]).nonzero()
                if not len(differ):
                    identical += 1
                    continue
                step = int(differ[0]) - ids.shape[1]
                top = reference.logits[step][row].to(torch.float64).topk(2).values
                assert torch.isfinite(top).all()
                ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(abs(float(top[0])) or 1e-30))
                assert float(top[0] - top[1]) <= 2 * ulp, (seed, k, n, row, step, float(top[0] - top[1]), ulp)
    assert identical >= 0.8 * total, (identical, total)


OPTIONS = {
    "repetition_penalty": dict(repetition_penalty=1.6),
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
    "bad_words_ids": dict(bad_words_ids=[[5], [7, 8], [40]]),
    "min_new_tokens": dict(min_new_tokens=12),  # with an EOS id that the plain output emits early (set below)
    "suppress_tokens": dict(suppress_tokens=[3, 11, 25], begin_suppress_tokens=[4]),
    "sequence_bias": dict(sequence_bias={(17,): 3.0, (42, 8): -2.0}),
    "forced_eos": dict(forced_eos_token_id=9),
    "eos_list": dict(eos_token_id=[10, 20, 30]),
    "static_cache": dict(cache_implementation="static"),
    "output_scores": dict(output_scores=True, output_logits=True, return_dict_in_generate=True),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_generate_option_exact(llama, option):
    ids, mask = _ragged(5)
    kwargs = {"max_new_tokens": 16, "do_sample": False, "eos_token_id": None, **OPTIONS[option]}
    if option == "min_new_tokens":  # an EOS the model emits after 3 tokens without the minimum
        plain = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None)
        kwargs["eos_token_id"] = int(plain[0, ids.shape[1] + 2])
        short = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                               eos_token_id=kwargs["eos_token_id"])
        assert short.shape[1] < plain.shape[1] or (short[:, ids.shape[1]:] == kwargs["eos_token_id"]).any()
    for k, n in [(1, 3), (3, 5)]:
        reference, ours = _both(llama, ids, mask, k, n, **kwargs)
        if isinstance(reference, torch.Tensor):
            assert torch.equal(ours, reference), (option, k, n)
            continue
        assert torch.equal(ours.sequences, reference.sequences)
        assert len(ours.scores) == len(reference.scores) and len(ours.logits) == len(reference.logits)
        for mine, theirs in zip(ours.scores + ours.logits, reference.scores + reference.logits):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_static_cache_long_call_compacts_and_stays_exact(llama):
    """Many rounds with rejections: rejected slots fill the static cache and are squeezed out (compaction)."""
    ids, mask = _ragged(5)
    reference, ours = _both(llama, ids, mask, 1, 6, max_new_tokens=40, do_sample=False, eos_token_id=None,
                            cache_implementation="static")
    assert torch.equal(ours, reference)


def test_stop_strings_with_tokenizer(llama):
    tokenizer = _tokenizer()
    ids, mask = _ragged(5)
    plain = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None)
    stop = tokenizer.convert_ids_to_tokens(int(plain[0, ids.shape[1] + 5]))  # occurs mid-way in row 0
    kwargs = dict(max_new_tokens=16, do_sample=False, eos_token_id=None, stop_strings=[stop], tokenizer=tokenizer,
                  pad_token_id=0)
    reference = llama.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert reference.shape[1] < plain.shape[1] or batch_stopped(reference, ids.shape[1])
    # (transformers 5 does not hand `tokenizer` to a custom_generate callable; speculative_generate routes it)
    ours = speculative_generate(llama, ids, mask, exit_layer=2, num_draft_tokens=4, **kwargs)
    assert torch.equal(ours, reference)


def batch_stopped(out, prompt):
    return bool((out[:, prompt:] == 0).any())


class StopOnToken(T.StoppingCriteria):
    """A user criterion: a row is done once it has generated ``token`` (a pure function of input_ids)."""

    def __init__(self, token: int, prompt: int):
        self.token, self.prompt = token, prompt

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, self.prompt:] == self.token).any(-1)


def test_user_stopping_criteria(llama):
    ids, mask = _ragged(5)
    plain = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None)
    token = int(plain[2, ids.shape[1] + 4])
    criteria = T.StoppingCriteriaList([StopOnToken(token, ids.shape[1])])
    reference, ours = _both(llama, ids, mask, 1, 3, max_new_tokens=16, do_sample=False, eos_token_id=None,
                            pad_token_id=0, stopping_criteria=criteria)
    assert reference.shape[1] <= plain.shape[1]
    assert torch.equal(ours, reference)


def test_max_time_stops_like_generate(llama):
    ids, mask = _ragged(2)
    reference, ours = _both(llama, ids, mask, 1, 3, max_new_tokens=16, do_sample=False, eos_token_id=None,
                            max_time=1e-9)
    assert reference.shape[1] == ids.shape[1] + 1  # one step, then the time is up
    assert torch.equal(ours, reference)


class Recorder(T.generation.streamers.BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


def test_streamer_gets_every_token_once_in_order(llama):
    ids, mask = _ragged(1)
    theirs, mine = Recorder(), Recorder()
    reference = llama.generate(input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=None, streamer=theirs)
    # (transformers 5 does not hand `streamer` to a custom_generate callable; speculative_generate routes it)
    ours = speculative_generate(llama, ids, max_new_tokens=12, do_sample=False, eos_token_id=None, streamer=mine,
                                exit_layer=2, num_draft_tokens=4)
    assert torch.equal(ours, reference)
    assert mine.ended == theirs.ended == 1
    assert len(mine.puts) == len(theirs.puts) == 1 + 12  # the prompt, then one put per new token
    assert all(torch.equal(a, b) for a, b in zip(mine.puts, theirs.puts))


@pytest.mark.parametrize("decoding", ["self_speculative", "per_token_exit"])
def test_streamer_through_model_generate_custom_generate(llama, decoding):
    """transformers 5's generate drops `streamer` before calling a custom_generate callable (it puts the prompt only);
    both decoders read it back from generate's frame, so the stream equals stock generate's, put for put."""
    ids, mask = _ragged(2)
    ids, mask = ids[:1], mask[:1]
    theirs, mine = Recorder(), Recorder()
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=None)
    reference = llama.generate(input_ids=ids, attention_mask=mask, streamer=theirs, **kwargs)
    extra = dict(exit_layer=1, num_draft_tokens=3) if decoding == "self_speculative" else dict(threshold=1.0)
    ours = llama.generate(input_ids=ids, attention_mask=mask, streamer=mine,
                          custom_generate=getattr(hf_align, decoding), **extra, **kwargs)
    assert torch.equal(ours if torch.is_tensor(ours) else ours.sequences, reference)
    assert mine.ended == theirs.ended == 1
    assert len(mine.puts) == len(theirs.puts) == 1 + 10
    assert all(torch.equal(a, b) for a, b in zip(mine.puts, theirs.puts))
    # no streamer given: nothing is picked up from anywhere else
    quiet = llama.generate(input_ids=ids, attention_mask=mask, custom_generate=getattr(hf_align, decoding),
                           **extra, **kwargs)
    assert torch.equal(quiet if torch.is_tensor(quiet) else quiet.sequences, reference)
    assert len(mine.puts) == 11


def test_text_streamer_text_equals_decoded_output(llama):
    tokenizer = _tokenizer()
    ids, _ = _ragged(1)
    streamer = T.TextIteratorStreamer(tokenizer, skip_prompt=True)
    out = speculative_generate(llama, ids, max_new_tokens=12, do_sample=False, eos_token_id=None, streamer=streamer,
                               exit_layer=1, num_draft_tokens=3)
    streamed = "".join(streamer)
    assert streamed.strip() == tokenizer.decode(out[0, ids.shape[1]:]).strip()
    assert len(streamed.split()) == 12


def test_generation_config_argument(llama):
    ids, mask = _ragged(5)
    config = T.GenerationConfig(max_new_tokens=13, do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=3,
                                pad_token_id=0)
    reference, ours = _both(llama, ids, mask, 2, 3, generation_config=config)
    assert torch.equal(ours, reference)


def test_legacy_sampling_field_on_model_config_behaves_as_generate():
    model = _decoder()
    model.config.repetition_penalty = 1.3  # the pre-GenerationConfig way: generate refuses it, so do we
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match="modified the pretrained model configuration") as theirs:
        model.generate(input_ids=ids, max_new_tokens=4)
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError) as ours:
        model.generate(input_ids=ids, max_new_tokens=4, custom_generate=self_speculative, exit_layer=1)
    handle.remove()
    assert str(ours.value) == str(theirs.value) and calls == []


def test_attention_mask_omitted_with_pad_tokens_inside_input_ids(decoder):
    """generate infers the mask from the pad id (ids != pad); the issue's repro."""
    ids = torch.tensor([[3, 3, 17, 42, 8], [11, 25, 17, 42, 8]])
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=3, eos_token_id=None)
    reference = decoder.generate(input_ids=ids, **kwargs)
    masked = decoder.generate(input_ids=ids, attention_mask=(ids != 3).long(), **kwargs)
    assert torch.equal(reference, masked)  # the reference really uses the inferred mask
    for k, n in [(1, 2), (3, 4)]:
        ours = decoder.generate(input_ids=ids, custom_generate=self_speculative, exit_layer=k, num_draft_tokens=n,
                                **kwargs)
        assert torch.equal(ours, reference)
        assert torch.equal(speculative_generate(decoder, ids, exit_layer=k, num_draft_tokens=n, **kwargs), reference)


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_dynamic_rope_exact_within_and_refused_past_the_original_length(rope_type):
    params = {"rope_type": rope_type, "factor": 2.0, "rope_theta": 10000.0}
    if rope_type == "longrope":
        params.update(short_factor=[1.0] * 4, long_factor=[1.5] * 4, original_max_position_embeddings=24)
    model = _decoder(max_position_embeddings=24, rope_parameters=params)
    ids, mask = _ragged(2)
    reference, ours = _both(model, ids, mask, 1, 3, max_new_tokens=24 - ids.shape[1], do_sample=False,
                            eos_token_id=None)
    assert torch.equal(ours, reference)
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="dynamic rotary table"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, custom_generate=self_speculative,
                       exit_layer=1)
    handle.remove()
    assert calls == []


def test_unknown_processor_rows_advance_together_and_stay_exact(llama):
    class Penalise7(T.LogitsProcessor):  # a user processor hf-align does not know: called on the whole batch
        def __call__(self, input_ids, scores):
            seen = (input_ids == 7).any(-1, keepdim=True)
            return scores - 5.0 * seen * torch.nn.functional.one_hot(torch.tensor(9), scores.shape[-1])

    ids, mask = _ragged(5)
    processors = T.LogitsProcessorList([Penalise7()])
    reference = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                               eos_token_id=None, logits_processor=processors)
    stats = hf_align.SpeculativeStats(exit_layer=1, num_draft_tokens=3, num_layers=L)
    ours = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                          logits_processor=processors, custom_generate=self_speculative, exit_layer=1,
                          num_draft_tokens=3, speculative_stats=stats)
    assert torch.equal(ours, reference)
    assert stats.ragged is False


def test_num_return_sequences_top_k_1_equals_greedy(llama):
    """Sampling with top_k=1 is deterministic: each of the expanded copies must be the greedy output."""
    ids, mask = _ragged(2)
    greedy = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None)
    ours = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=1,
                          num_return_sequences=3, eos_token_id=None, custom_generate=self_speculative, exit_layer=2,
                          num_draft_tokens=3)
    assert torch.equal(ours, greedy.repeat_interleave(3, dim=0))


# -- sampling keeps the distribution ------------------------------------------------------------------------------


def test_sampling_distribution_with_warpers_and_repetition_penalty():
    """V = 6, three new tokens: the exact distribution of (s1, s2, s3) under stock sampling is computed in float64
    from the model's own logits through generate's own processors (temperature 0.7, top-p 0.9, repetition penalty
    1.5), and 6,000 speculative samples (one batch via num_return_sequences) must follow it (chi-square)."""
    model = tiny_model("llama", "LlamaForCausalLM", seed=2, vocab_size=6, initializer_range=0.3,
                       num_hidden_layers=L, pad_token_id=None, bos_token_id=None, eos_token_id=None).double()
    prompt = torch.tensor([[1, 4, 2]])
    settings = dict(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.5)
    processors = model._get_logits_processor(generation_config=T.GenerationConfig(**settings),
                                             input_ids_seq_length=3, encoder_input_ids=prompt,
                                             prefix_allowed_tokens_fn=None, logits_processor=T.LogitsProcessorList(),
                                             device="cpu", model_kwargs={})
    exact = {}
    with torch.no_grad():
        for seq in itertools.product(range(6), repeat=2):
            full = torch.cat([prompt, torch.tensor([seq])], dim=1)
            logits = model(full).logits.double()
            prob = 1.0
            for j in range(3):
                prefix = full[:, : 3 + j]
                scores = processors(prefix, logits[:, 2 + j].float().double())
                p = torch.softmax(scores, -1)[0]
                if j < 2:
                    prob *= float(p[seq[j]])
                else:
                    for last in range(6):
                        exact[(*seq, last)] = prob * float(p[last])
    assert math.isclose(sum(exact.values()), 1.0, rel_tol=1e-9)
    draws = 6000
    torch.manual_seed(0)
    out = model.generate(input_ids=prompt, max_new_tokens=3, num_return_sequences=draws, custom_generate=self_speculative,
                         exit_layer=1, num_draft_tokens=2, generator=torch.Generator().manual_seed(0), **settings)
    counts = {}
    for row in out[:, 3:].tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert set(counts) <= {key for key, value in exact.items() if value > 0}  # nothing top-p removed
    # chi-square over outcomes with expected count >= 5 (the rest pooled)
    observed, expected, rest_o, rest_e = [], [], 0, 0.0
    for key, value in exact.items():
        e = value * draws
        if e >= 5:
            observed.append(counts.get(key, 0))
            expected.append(e)
        else:
            rest_o += counts.get(key, 0)
            rest_e += e
    if rest_e > 0:
        observed.append(rest_o)
        expected.append(rest_e)
    assert len(observed) >= 10  # a real spread of outcomes, not a near-deterministic model
    from scipy.stats import chisquare

    stat = chisquare(np.array(observed), np.array(expected) * sum(observed) / sum(expected))
    assert stat.pvalue > 1e-3, stat


# -- KV reuse with ragged acceptance ----------------------------------------------------------------------------


def test_kv_reuse_with_ragged_acceptance(llama):
    """Block-call counts: every block runs the prompt once and then n_r + 1 positions per round for the whole batch;
    per row those are its accepted tokens plus its rejected drafts (each position passes each block once)."""
    ids, mask = _ragged(4)
    k, n, new = 2, 3, 24
    stats = hf_align.SpeculativeStats(exit_layer=k, num_draft_tokens=n, num_layers=L)
    blocks = hf_align.LayerView(llama).blocks
    calls = [[] for _ in range(L)]
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls[i].append(a[0].shape[1])) for i, b in enumerate(blocks)]
    try:
        out = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             eos_token_id=None, custom_generate=self_speculative, exit_layer=k, num_draft_tokens=n,
                             speculative_stats=stats)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(out, llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                           eos_token_id=None))
    prompt = ids.shape[1]
    verify = calls[k][1:]
    assert len(verify) == stats.rounds
    for j in range(k):
        assert calls[j][0] == prompt and calls[j][1:] == [1] * sum(verify)
    for j in range(k, L):
        assert calls[j] == [prompt, *verify]
    assert stats.block_positions == [prompt + sum(verify)] * L
    # rows advanced by their own counts: some round kept different accepted counts for different rows, and the
    # batch needed fewer rounds than if every row advanced by the smallest count
    assert stats.ragged is True
    lockstep = hf_align.SpeculativeStats(exit_layer=k, num_draft_tokens=n, num_layers=L)

    class Identity(T.LogitsProcessor):  # unknown to hf-align: forces lock step
        def __call__(self, input_ids, scores):
            return scores

    llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None,
                   custom_generate=self_speculative, exit_layer=k, num_draft_tokens=n, speculative_stats=lockstep,
                   logits_processor=T.LogitsProcessorList([Identity()]))
    assert lockstep.ragged is False and stats.rounds < lockstep.rounds


# -- bad input and model state ----------------------------------------------------------------------------------


def _fingerprint(model):
    return (
        model.config.to_dict(),
        model.generation_config.to_dict(),
        sorted(vars(model)),
        "generate" in vars(model),
        [(m.training, len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        [p.detach().clone() for p in model.parameters()],
    )


def _same(a, b):
    return a[:5] == b[:5] and all(torch.equal(x, y) for x, y in zip(a[5], b[5]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_beams=2), "num_beams=2"),
        (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha=0.6"),
        (dict(output_attentions=True, return_dict_in_generate=True), "output_attentions"),
        (dict(output_hidden_states=True, return_dict_in_generate=True), "output_hidden_states"),
        (dict(use_cache=False), "use_cache=False"),
        (dict(exit_layer=0), r"exit_layer must be in \[1, 3\]"),
        (dict(exit_layer="middle"), "exit_layer must be an integer"),
        (dict(num_draft_tokens=0), "num_draft_tokens must be a positive integer"),
        (dict(watermarking_config=T.WatermarkingConfig()), "WatermarkLogitsProcessor"),
    ],
)
def test_bad_input_refused_before_any_work(kwargs, match):
    model = _decoder()
    before = _fingerprint(model)
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    kwargs = {"exit_layer": 1, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=4, custom_generate=self_speculative,
                       **kwargs)
    handle.remove()
    assert calls == []
    assert _same(before, _fingerprint(model))


def test_model_unchanged_after_calls(llama):
    model = copy.deepcopy(llama)
    model.train()
    before = _fingerprint(model)
    ids, mask = _ragged(3)
    for kwargs in (dict(do_sample=False), dict(do_sample=True, top_p=0.8), dict(cache_implementation="static"),
                   dict(repetition_penalty=1.2, output_scores=True, return_dict_in_generate=True)):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, custom_generate=self_speculative,
                       exit_layer=2, num_draft_tokens=2, **kwargs)
    after = _fingerprint(model)
    # generate itself keeps its static cache on the model (stock behaviour, also without custom_generate)
    assert _same((*before[:2], [v for v in before[2] if v != "_cache"], *before[3:]),
                 (*after[:2], [v for v in after[2] if v != "_cache"], *after[3:]))


def test_auto_when_the_first_token_ends_the_call(llama):
    ids, mask = _ragged(2)
    reference = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
    out, stats = speculative_generate(llama, ids, mask, max_new_tokens=1, return_stats=True)
    assert torch.equal(out, reference) and stats.rounds == 0 and stats.calibration is None


def _compile_everywhere(**kwargs):
    config = T.CompileConfig(dynamic=False, **kwargs)
    config._compile_all_devices = True  # transformers' own switch to compile on a CPU ("useful for testing")
    return config


def test_compiled_path_follows_generates_compile_criteria(llama, monkeypatch):
    """torch.compile is used exactly where generate would compile its decoding steps: a static cache, on a GPU-like
    device or with compile_config._compile_all_devices, and not with disable_compile."""
    from collections import OrderedDict

    from hf_align.generation import compiled as C
    from hf_align.layers import run_block_sequence

    compiled = []
    monkeypatch.setattr(C, "_COMPILED", OrderedDict())
    monkeypatch.setattr(C.CompiledSegments, "__call__",
                        lambda self, start, blocks, hidden, arguments: compiled.append(start) or
                        run_block_sequence(blocks, hidden, arguments))
    ids, mask = _ragged(2)
    cases = [
        (dict(), False),  # dynamic cache
        (dict(cache_implementation="static"), False),  # on a CPU generate does not compile either
        (dict(cache_implementation="static", compile_config=_compile_everywhere()), True),
        (dict(cache_implementation="static", compile_config=_compile_everywhere(), disable_compile=True), False),
    ]
    reference = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for kwargs, expected in cases:
        compiled.clear()
        stats = hf_align.SpeculativeStats(exit_layer=2, num_draft_tokens=3, num_layers=L)
        out = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             custom_generate=self_speculative, exit_layer=2, num_draft_tokens=3,
                             speculative_stats=stats, **kwargs)
        assert torch.equal(out, reference)
        assert stats.compiled is expected and bool(compiled) is expected, kwargs
        if expected:  # draft segments start at block 0, verify segments at block k
            assert set(compiled) == {0, 2}


def test_compiled_segments_are_bounded_least_recently_used_first(monkeypatch):
    """The compiled copies are kept per segment and shape up to a bound, the least recently used dropped first, and
    the compile configurations likewise: a long process does not accumulate graphs without bound."""
    from collections import OrderedDict

    from hf_align.generation import compiled as C

    made = []
    monkeypatch.setattr(C.torch, "compile", lambda fn, **options: made.append(fn.__name__) or fn)
    runner = C.CompiledSegments({}, max_segments=2)
    block = torch.nn.Linear(3, 3)
    for start, positions in [(0, 1), (2, 4), (0, 1), (1, 1), (2, 4)]:
        hidden = torch.randn(1, positions, 3)
        out = runner(start, [block], hidden, [((), {})])
        torch.testing.assert_close(out, block(hidden))
    # (0,1) hit once; (1,1) evicts (2,4), the least recently used; (2,4) is then compiled again, evicting (0,1)
    assert made == ["run_block_sequence_0_1_1x1", "run_block_sequence_2_3_1x4", "run_block_sequence_1_2_1x1",
                    "run_block_sequence_2_3_1x4"]
    assert list(runner.functions) == [(1, 2, 1, 1), (2, 3, 1, 4)]
    assert len({id(f.__code__) for f in runner.functions.values()}) == 2  # each its own code object

    monkeypatch.setattr(C, "_COMPILED", OrderedDict())
    model = _decoder(seed=0)
    cache = T.StaticCache(config=model.config, max_cache_len=8)
    configs = [_compile_everywhere(mode=mode) for mode in ("default", "reduce-overhead", "max-autotune",
                                                            "max-autotune-no-cudagraphs", "default")]
    configs.append(_compile_everywhere(mode="default", fullgraph=not T.CompileConfig().fullgraph))
    runners = [C.compiled_segment_runner(model, T.GenerationConfig(compile_config=c), cache) for c in configs]
    assert runners[4] is runners[0]  # the same options: the same runner, now the most recently used
    assert len(C._COMPILED) == C.MAX_CONFIGURATIONS == 4
    # the sixth configuration evicted the least recently used one ("reduce-overhead"), not the re-used "default"
    assert runners[1] not in C._COMPILED.values() and runners[0] in C._COMPILED.values()


@pytest.mark.slow
def test_compiled_path_is_exact_and_compiles_each_segment_once():
    """Under torch.compile (inductor, on this CPU through _compile_all_devices), greedy output still equals stock
    generate token for token, for a fixed (k, n) and for the automatic choice with its plain fallback; a second call
    compiles no new graph; nothing stays on the model."""
    from hf_align.generation import compiled as C

    model = _decoder(seed=5)
    before = _fingerprint(model)
    ids, mask = _ragged(3)
    compile_config = _compile_everywhere()
    gen = dict(max_new_tokens=10, do_sample=False, eos_token_id=None)
    reference = model.generate(input_ids=ids, attention_mask=mask, **gen)
    for options in (dict(exit_layer=1, num_draft_tokens=2), dict(exit_layer="auto")):
        graphs = []
        for _ in range(2):
            stats = hf_align.SpeculativeStats(exit_layer=0, num_draft_tokens=0, num_layers=L)
            out = model.generate(input_ids=ids, attention_mask=mask, custom_generate=self_speculative,
                                 cache_implementation="static", compile_config=compile_config,
                                 speculative_stats=stats, **options, **gen)
            assert torch.equal(out, reference), options
            assert stats.compiled
            graphs.append(sum(len(c.functions) for c in C._COMPILED.values()))
        assert graphs[1] == graphs[0] and graphs[0] >= 1
    assert not hasattr(model, "_compiled_call")
    after = _fingerprint(model)
    # generate itself keeps its static cache (and its length) on the model: stock behaviour with a static cache
    stock = ("_cache", "_previous_max_cache_length")
    assert _same((*before[:2], [v for v in before[2] if v not in stock], *before[3:]),
                 (*after[:2], [v for v in after[2] if v not in stock], *after[3:]))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 16), k=st.sampled_from([1, 2, 3, "auto"]), n=st.integers(1, 6), seed=st.integers(0, 10**6),
       new=st.integers(1, 14))
def test_left_padded_batches_of_1_to_16_equal_generate(llama, batch, k, n, seed, new):
    """Any batch of 1-16 left-padded prompts of ragged lengths (rows keep their own accepted counts), any (k, n):
    token for token stock generate's greedy output."""
    g = torch.Generator().manual_seed(seed)
    width = int(torch.randint(3, 12, (1,), generator=g))
    ids = torch.randint(1, 99, (batch, width), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, : int(torch.randint(0, width - 1, (1,), generator=g))] = 0
    ids[mask == 0] = 0
    gen = dict(max_new_tokens=new, do_sample=False, eos_token_id=None)
    reference = llama.generate(input_ids=ids, attention_mask=mask, **gen)
    extra = dict(exit_layer=k) if k == "auto" else dict(exit_layer=k, num_draft_tokens=n)
    ours = llama.generate(input_ids=ids, attention_mask=mask, custom_generate=self_speculative, **extra, **gen)
    assert torch.equal(ours, reference)

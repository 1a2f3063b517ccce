"""One front door for both decoders: the same bad generate argument gets the same error type and message from
self-speculative decoding and per-token exit, before any forward runs."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from tiny_models import tiny_model

import hf_align

PROMPT = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", "LlamaForCausalLM", num_hidden_layers=4).double()


MISTAKES = {
    "beam search": dict(num_beams=2),
    "no cache": dict(use_cache=False),
    "attentions": dict(output_attentions=True, return_dict_in_generate=True),
    "hidden states": dict(output_hidden_states=True, return_dict_in_generate=True),
    "right padding": dict(attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])),
    "mask shape": dict(attention_mask=torch.tensor([[1, 1, 1], [1, 1, 1]])),
    "1-D input_ids": dict(input_ids=torch.tensor([5, 6, 7])),
    "float input_ids": dict(input_ids=torch.tensor([[5.0, 6.0]])),
    "watermark": dict(watermarking_config=T.WatermarkingConfig()),
}


def _call(decoder, model, kwargs):
    kwargs = dict(kwargs)
    ids = kwargs.pop("input_ids", PROMPT)
    mask = kwargs.pop("attention_mask", None)
    if decoder == "speculative":
        return hf_align.speculative_generate(model, ids, mask, exit_layer=1, num_draft_tokens=2, max_new_tokens=4,
                                             **kwargs)
    return hf_align.early_exit_generate(model, input_ids=ids, attention_mask=mask, threshold=0.9, max_new_tokens=4,
                                        **kwargs)


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_same_mistake_same_error_from_both_decoders(model, mistake):
    kwargs = MISTAKES[mistake]
    errors = []
    for decoder in ("speculative", "per-token"):
        calls = []
        handle = model.register_forward_pre_hook(lambda *a, calls=calls: calls.append(1))
        try:
            with pytest.raises((ValueError, TypeError)) as info:
                _call(decoder, model, kwargs)
        finally:
            handle.remove()
        assert calls == [], (decoder, "a forward ran before the error")
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


def test_per_token_exit_through_generate_honours_processors_and_criteria(model):
    """With threshold 1 (no exit) per-token exit is greedy generate: also with generate's processors and criteria."""
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, repetition_penalty=1.5,
                  no_repeat_ngram_size=2, pad_token_id=0)
    reference = model.generate(input_ids=PROMPT, **kwargs)
    out = model.generate(input_ids=PROMPT, custom_generate=hf_align.per_token_exit, threshold=1.0, **kwargs)
    assert torch.equal(out.sequences, reference)
    out = hf_align.early_exit_generate(model, input_ids=PROMPT, threshold=1.0, **kwargs)
    assert torch.equal(out.sequences, reference)

"""An aligned causal LM saved by the trainer decodes self-speculatively straight from the Hub (offline cache in the
real layout) with ``trust_remote_code=True``, and is a plain model without it. References: the in-memory model's
own greedy ``generate`` and block-call counts."""

from __future__ import annotations

import json
import os
import shutil

import huggingface_hub.constants
import pytest
import torch
import transformers as T
from datasets import Dataset
from hub_cache import populate_hub_cache
from tiny_models import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers

import hf_align
import hf_align.hub
from hf_align import AlignedTrainer, AlignedTrainingArguments

REPO = "hf-align-test/aligned-llama"
AUTO_REPO = "hf-align-test/aligned-llama-auto"
L = 4


def _tokenizer():
    vocab = {f"t{i}": i for i in range(99)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", unk_token="t1", eos_token="t2",
                                     bos_token="t1")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmhub")
    model = tiny_model("llama", "LlamaForCausalLM", num_hidden_layers=L, initializer_range=0.2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (8, 10), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")
    args = AlignedTrainingArguments(output_dir=str(tmp / "out"), report_to=[], disable_tqdm=True, save_strategy="no",
                                    per_device_train_batch_size=4, learning_rate=1e-3, seed=0, use_cpu=True,
                                    dataloader_num_workers=0, max_steps=2)
    trainer = AlignedTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    folder = tmp / "saved"
    trainer.save_model(str(folder))
    _tokenizer().save_pretrained(str(folder))
    auto_folder = tmp / "auto"  # as the trainer saved it: the draft depth is chosen in each call
    shutil.copytree(folder, auto_folder)
    # the calibrated defaults of the saved LM (the public helper works on any saved causal LM folder)
    hf_align.hub.write_custom_generate(str(folder), exit_layer=2, num_draft_tokens=3)
    cache = tmp / "hub"
    mp = pytest.MonkeyPatch()
    mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_MODULES_CACHE", str(tmp / "modules"))
    try:
        populate_hub_cache(cache, REPO, str(folder))
        populate_hub_cache(cache, AUTO_REPO, str(auto_folder))
        yield {"folder": folder, "model": trainer.model.eval(), "tmp": tmp}
    finally:
        mp.undo()


def _count_block_calls(model):
    calls = [0] * L
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, b in enumerate(model.model.layers)]
    return calls, handles


def test_saved_folder_has_custom_generate(hub):
    folder = hub["folder"]
    assert open(folder / "custom_generate" / "requirements.txt").read().strip().startswith("hf-align")
    source = open(folder / "custom_generate" / "generate.py").read()
    assert "self_speculative" in source and "def generate(model" in source
    saved = json.loads(open(folder / "generation_config.json").read())
    assert (saved["self_speculative_exit_layer"], saved["self_speculative_num_draft_tokens"]) == (2, 3)
    card = open(folder / "README.md").read()
    assert "custom_generate" in card.split("---")[1]  # the tag in the metadata
    for section in ("### Base model", "### Model compatibility", "### Additional Arguments", "### Output Type changes",
                    "### Example usage"):
        assert section in card


def test_hub_round_trip_decodes_self_speculatively_with_trust_remote_code(hub):
    prompt = torch.tensor([[5, 17, 42, 8, 23, 61]])
    reference = hub["model"].generate(input_ids=prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)

    plain = T.AutoModelForCausalLM.from_pretrained(REPO).eval()
    assert "generate" not in vars(plain)
    calls, handles = _count_block_calls(plain)
    out = plain.generate(input_ids=prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    for h in handles:
        h.remove()
    assert torch.equal(out, reference)
    assert calls == [12] * L  # plain generate: every block once per step

    fast = T.AutoModelForCausalLM.from_pretrained(REPO, trust_remote_code=True).eval()
    assert "generate" in vars(fast)  # transformers replaced generate (its custom_generate mechanism)
    config_before = fast.config.to_dict(), fast.generation_config.to_dict()
    calls, handles = _count_block_calls(fast)
    out = fast.generate(input_ids=prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    for h in handles:
        h.remove()
    assert torch.equal(out, reference)
    # drafting: the first block runs once per drafted position, the last once per verify round (fewer)
    assert calls[-1] < calls[0] and calls[-1] < 12
    assert (fast.config.to_dict(), fast.generation_config.to_dict()) == config_before
    assert all(len(m._forward_hooks) == len(m._forward_pre_hooks) == 0 for m in fast.modules())

    # without stored defaults the call chooses (k, n) itself; the output is the same
    auto = T.AutoModelForCausalLM.from_pretrained(AUTO_REPO, trust_remote_code=True).eval()
    assert torch.equal(auto.generate(input_ids=prompt, max_new_tokens=12, do_sample=False, eos_token_id=None),
                       reference)

    # the same function on any copy of the model, by repo id
    out = plain.generate(input_ids=prompt, max_new_tokens=12, do_sample=False, eos_token_id=None,
                         custom_generate=REPO, trust_remote_code=True)
    assert torch.equal(out, reference)
    assert "generate" not in vars(plain)


def test_without_trust_remote_code_custom_generate_is_refused(hub):
    plain = T.AutoModelForCausalLM.from_pretrained(REPO)
    with pytest.raises(ValueError, match="trust_remote_code"):
        plain.generate(input_ids=torch.tensor([[5, 6]]), max_new_tokens=3, custom_generate=REPO)


def test_pipeline_text_generation_same_text_both_ways(hub):
    prompt = "t5 t17 t42 t8 t23"
    plain = T.pipeline("text-generation", model=REPO)
    fast = T.pipeline("text-generation", model=REPO, trust_remote_code=True)
    assert "generate" in vars(fast.model) and "generate" not in vars(plain.model)
    kwargs = dict(max_new_tokens=10, do_sample=False)
    assert fast(prompt, **kwargs)[0]["generated_text"] == plain(prompt, **kwargs)[0]["generated_text"]


def test_requirements_name_hf_align_when_missing(hub, monkeypatch):
    """Without hf-align installed, transformers' requirements check names what to install."""
    import importlib.metadata

    real = importlib.metadata.version

    def version(name):
        if name.replace("_", "-").lower() == "hf-align":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(ImportError, match=r"Missing requirements.*\n.*hf-align>=0\.1\.0"):
        T.AutoModelForCausalLM.from_pretrained(REPO, trust_remote_code=True)
    assert os.path.isdir(hub["folder"])

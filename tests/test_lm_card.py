"""The model card of an aligned causal LM (issue 19, acceptance 4): the per-layer perplexity table and plot, the
recommended (exit layer, draft count), the metadata, and usage snippets that run as written."""

from __future__ import annotations

import re

import pytest
import torch
import transformers as T
import yaml

from hf_align import AlignedTrainer, AlignedTrainingArguments
from hf_align.data import lm_blocks, load_python_docs_texts, train_bpe_tokenizer


def tiny_llama(tok):
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id))


@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory):
    texts = load_python_docs_texts()
    tok = train_bpe_tokenizer(texts["train"][:20], vocab_size=400, model_max_length=32)
    train = lm_blocks(texts["train"][:20], tok, 32).select(range(48))
    test = lm_blocks(texts["test"][:2], tok, 32).select(range(8))
    model = tiny_llama(tok)
    out = tmp_path_factory.mktemp("lm") / "aligned-lm"
    args = AlignedTrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=8, learning_rate=3e-3,
                                    report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
    trainer = AlignedTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, processing_class=tok)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.speculative_recommendation = {"exit_layer": 2, "num_draft_tokens": 3, "speedup": 1.27, "acceptance": 0.61}
    trainer.create_model_card(license="apache-2.0", dataset="python-docs", finetuned_from="my-org/base-llama",
                              tags=["my-tag"])
    trainer.save_model(str(out))
    return out, metrics


def _card(out):
    text = (out / "README.md").read_text()
    _, meta, body = text.split("---", 2)
    return yaml.safe_load(meta), body


def test_card_has_the_perplexity_table_plot_and_recommendation(saved_lm):
    out, metrics = saved_lm
    meta, body = _card(out)
    rows = re.findall(r"^\| (\d) \| ([\d.]+) \| ([^|]*) \| ([^|]*) \|$", body, re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    for layer, ppl, greedy, sampling in rows:  # the evaluation's own numbers, rounded as printed
        assert float(ppl) == pytest.approx(metrics[f"eval_layer_{layer}_perplexity"], abs=0.006)
        if int(layer) < 3:
            assert float(greedy.strip(" %")) == pytest.approx(100 * metrics[f"eval_layer_{layer}_greedy_acceptance"], abs=0.06)
            assert float(sampling.strip(" %")) == pytest.approx(100 * metrics[f"eval_layer_{layer}_sampling_acceptance"], abs=0.06)
        else:
            assert "verifies" in greedy
    assert "![perplexity after every block](layer_perplexity.png)" in body
    assert (out / "layer_perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Exit layer **2** of 3, **3** draft tokens per round: measured **1.27x** plain `generate`" in body
    assert "draft acceptance 61.0%" in body
    assert "early-exit-classification" not in body and "accuracy" not in body.lower()  # an LM card, not a classifier's
    # metadata: what the user passed, plus the library's
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["python-docs"]
    assert meta["base_model"] == "my-org/base-llama"
    assert {"my-tag", "hf-align", "custom_generate", "causal-lm"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "text-generation"
    # the recommendation is the saved model's custom_generate default
    generation = T.GenerationConfig.from_pretrained(out)
    assert generation.self_speculative_exit_layer == 2 and generation.self_speculative_num_draft_tokens == 3
    assert T.AutoConfig.from_pretrained(out).architectures == ["LlamaForCausalLM"]


def test_card_snippets_run_as_written(saved_lm, monkeypatch):
    out, _ = saved_lm
    _, body = _card(out)
    snippets = re.findall(r"^```python\n(.*?)^```", body, re.S | re.M)
    assert len(snippets) >= 2
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for code in snippets:
        assert str(out) in code  # the folder is the repo the snippet loads
        exec(compile(code, "README.md", "exec"), {})


def test_card_without_a_measurement_says_how_to_get_one(tmp_path):
    from hf_align.hub import aligned_model_card
    from hf_align.layers import LayerView

    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16))
    log = [{"eval_layer_1_perplexity": 40.0, "eval_layer_2_perplexity": 30.0, "eval_layer_1_greedy_acceptance": 0.5,
            "eval_layer_1_sampling_acceptance": 0.7}]
    aligned_model_card(tmp_path, model, LayerView(model), log, recipe={"layer_weights": "linear"})
    body = (tmp_path / "README.md").read_text()
    assert "| 1 | 40.00 | 50.0% | 70.0% |" in body and "| 2 | 30.00 | (verifies) | (verifies) |" in body
    assert "Not measured yet" in body and 'exit_layer="auto"' in body
    (tmp_path / "README.md").write_text("my own notes")  # a README the user wrote is never overwritten
    aligned_model_card(tmp_path, model, LayerView(model), log, recipe={})
    assert (tmp_path / "README.md").read_text() == "my own notes"


def test_lora_aligned_lm_trains_merges_and_its_card_loads_it(tmp_path, monkeypatch):
    """A LoRA adapter trained with the aligned loss: the merged model's per-block perplexities equal the adapter
    model's (float64 reference through the merged weights), it is a plain LlamaForCausalLM, and the adapter's
    card snippet (AutoPeftModelForCausalLM + merge_and_unload) runs as written."""
    peft = pytest.importorskip("peft")
    texts = load_python_docs_texts()
    tok = train_bpe_tokenizer(texts["train"][:10], vocab_size=300, model_max_length=32)
    train = lm_blocks(texts["train"][:10], tok, 32).select(range(32))
    test = lm_blocks(texts["test"][:1], tok, 32).select(range(6))
    base = tiny_llama(tok)
    base.save_pretrained(tmp_path / "base")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                     task_type="CAUSAL_LM"))
    lora.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    out = tmp_path / "adapter"
    args = AlignedTrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
                                    report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True)
    trainer = AlignedTrainer(model=lora, args=args, train_dataset=train, eval_dataset=test, processing_class=tok)
    trainer.train()
    adapter_metrics = trainer.evaluate()
    trainer.save_model(str(out))
    merged = lora.merge_and_unload()
    assert type(merged) is T.LlamaForCausalLM and not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.tensor(test["input_ids"])
    with torch.no_grad():
        hidden = merged.double()(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        for l in range(1, 4):
            h = hidden[l] if l == 3 else merged.model.norm(hidden[l])  # transformers' last hidden state is normed
            nll = torch.nn.functional.cross_entropy(merged.lm_head(h)[:, :-1].reshape(-1, len(tok)), ids[:, 1:].reshape(-1))
            assert adapter_metrics[f"eval_layer_{l}_perplexity"] == pytest.approx(nll.exp().item(), rel=1e-5)
    _, body = _card(out)
    assert "PEFT adapter" in body and "early-exit-classification" not in body
    snippet = re.findall(r"^```python\n(.*?)^```", body, re.S | re.M)[0]
    assert "AutoPeftModelForCausalLM" in snippet
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(snippet, "README.md", "exec"), {})

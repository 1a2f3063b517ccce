"""AlignedTrainer: the loss against explicit per-layer references, stock equivalence, resume, errors, saving."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from datasets import Dataset
from tiny_models import tiny_model

from hf_align import AlignedTrainer, AlignedTrainingArguments

L = 3


def args_for(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], disable_tqdm=True, save_strategy="no",
                per_device_train_batch_size=4, per_device_eval_batch_size=5, learning_rate=1e-3, seed=0,
                use_cpu=True, dataloader_num_workers=0)
    base.update(kw)
    return AlignedTrainingArguments(**base)


def text_dataset(n=12, vocab=99, T_=7, num_labels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, T_), generator=g)
    mask = torch.ones(n, T_, dtype=torch.long)
    for i in range(0, n, 3):  # some padded rows
        ids[i, -2:], mask[i, -2:] = 0, 0
    labels = torch.randint(0, num_labels, (n,), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}).with_format("torch")


def lm_dataset(n=8, vocab=99, T_=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, T_), generator=g)
    labels = ids.clone()
    labels[::2, -3:] = -100  # ignored positions
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()}).with_format("torch")


def image_dataset(n=10, num_labels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"pixel_values": torch.randn(n, 3, 16, 16, generator=g).tolist(),
                              "labels": torch.randint(0, num_labels, (n,), generator=g).tolist()}).with_format("torch")


def block_outputs(model, blocks, inputs):
    outs = []
    handles = [b.register_forward_hook(lambda m, a, o: outs.append(o if isinstance(o, torch.Tensor) else o[0])) for b in blocks]
    try:
        logits = model(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    return logits, outs


def paper_weights(num_layers):
    return [2 * l / (num_layers * (num_layers + 1)) for l in range(1, num_layers + 1)]


# -- 1. the loss against an explicit per-layer loop --------------------------------------------------------

def test_loss_matches_explicit_loop_bert(tmp_path):
    model = tiny_model("bert", "BertForSequenceClassification")
    batch = text_dataset()[:6]
    trainer = AlignedTrainer(model=model, args=args_for(tmp_path), train_dataset=text_dataset())
    ours = trainer.compute_loss(model, dict(batch))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[1:]
        expected = sum(w * F.cross_entropy(model.classifier(model.bert.pooler(h)).double(), batch["labels"])
                       for w, h in zip(paper_weights(L), hidden))
    assert abs(ours.item() - expected.item()) <= 1e-6


def test_loss_matches_explicit_loop_vit_uniform(tmp_path):
    model = tiny_model("vit", "ViTForImageClassification")
    data = image_dataset()
    trainer = AlignedTrainer(model=model, args=args_for(tmp_path, layer_weights="uniform"), train_dataset=data)
    batch = data[:5]
    ours = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        _, hidden = block_outputs(model, model.vit.layers, {"pixel_values": batch["pixel_values"]})
        expected = sum(F.cross_entropy(model.classifier(model.vit.layernorm(h[:, 0])).double(), batch["labels"]) / L
                       for h in hidden)
    assert abs(ours.item() - expected.item()) <= 1e-6


@pytest.mark.parametrize("chunk", [4, 4096])
def test_loss_matches_explicit_loop_llama_lm(tmp_path, chunk):
    model = tiny_model("llama", "LlamaForCausalLM")
    data = lm_dataset()
    trainer = AlignedTrainer(model=model, args=args_for(tmp_path, lm_loss_chunk_size=chunk), train_dataset=data)
    batch = data[:4]
    ours = trainer.compute_loss(model, dict(batch))
    ours.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    _, hidden = block_outputs(model, model.model.layers, {"input_ids": batch["input_ids"], "use_cache": False})
    expected = 0
    targets = batch["labels"][:, 1:]
    for w, h in zip(paper_weights(L), hidden):
        logits = model.lm_head(model.model.norm(h))[:, :-1]
        expected = expected + w * F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1), ignore_index=-100)
    assert abs(ours.item() - expected.item()) <= 1e-6
    expected.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad.to(grads[name].dtype), rtol=1e-4, atol=1e-6, msg=name)


# -- "last" is the stock Trainer ------------------------------------------------------------------------------

@pytest.mark.parametrize("family,cls,make", [("bert", "BertForSequenceClassification", text_dataset),
                                             ("gpt2", "GPT2ForSequenceClassification", text_dataset),
                                             ("qwen2", "Qwen2ForCausalLM", lm_dataset)])
def test_last_equals_stock_trainer_loss_and_gradients(tmp_path, family, cls, make):
    data = make()
    batch = data[:6]
    stock_model, our_model = tiny_model(family, cls), tiny_model(family, cls)
    plain = T.TrainingArguments(output_dir=str(tmp_path / "s"), report_to=[], use_cpu=True)
    stock = T.Trainer(model=stock_model, args=plain, train_dataset=data)
    ours = AlignedTrainer(model=our_model, args=args_for(tmp_path, layer_weights="last"), train_dataset=data)
    n_items = (batch["labels"][:, 1:] != -100).sum() if cls.endswith("CausalLM") else None
    for num_items in [None, n_items] if n_items is not None else [None]:
        stock_model.zero_grad()
        our_model.zero_grad()
        a = stock.compute_loss(stock_model, dict(batch), num_items_in_batch=num_items)
        b = ours.compute_loss(our_model, dict(batch), num_items_in_batch=num_items)
        a.backward()
        b.backward()
        assert abs(a.item() - b.item()) <= 1e-7
        for (name, p), q in zip(stock_model.named_parameters(), our_model.parameters()):
            if p.grad is None:
                assert q.grad is None or q.grad.abs().max() == 0, name
            else:
                torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-7, msg=name)


# -- evaluation metrics ---------------------------------------------------------------------------------------

def test_eval_layer_metrics_match_direct_computation(tmp_path):
    model = tiny_model("bert", "BertForSequenceClassification")
    data = text_dataset(n=13)
    seen = {}

    def compute_metrics(pred):
        seen["n"] = len(pred.label_ids)
        return {"acc_from_compute_metrics": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    trainer = AlignedTrainer(model=model, args=args_for(tmp_path), train_dataset=data, eval_dataset=data,
                             compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    with torch.no_grad():
        hidden = model(input_ids=data[:]["input_ids"], attention_mask=data[:]["attention_mask"], output_hidden_states=True).hidden_states[1:]
        accs = [(model.classifier(model.bert.pooler(h)).argmax(-1) == data[:]["labels"]).double().mean().item() for h in hidden]
        losses = [F.cross_entropy(model.classifier(model.bert.pooler(h)).double(), data[:]["labels"]).item() for h in hidden]
    for l in range(1, L + 1):
        assert abs(metrics[f"eval_layer_{l}_accuracy"] - accs[l - 1]) <= 1e-9
        assert abs(metrics[f"eval_layer_{l}_loss"] - losses[l - 1]) <= 1e-5
    assert seen["n"] == 13 and abs(metrics["eval_acc_from_compute_metrics"] - accs[-1]) <= 1e-9
    target = accs[-1] - 0.01
    assert metrics["eval_minimal_depth"] == next(l for l, a in enumerate(accs, 1) if a >= target)
    assert metrics["eval_monotone"] == float(all(b >= a for a, b in zip(accs, accs[1:])))


def test_lm_eval_accuracy_is_next_token_accuracy(tmp_path):
    model = tiny_model("gpt2", "GPT2LMHeadModel")
    data = lm_dataset(n=6)
    trainer = AlignedTrainer(model=model, args=args_for(tmp_path), train_dataset=data, eval_dataset=data)
    metrics = trainer.evaluate()
    with torch.no_grad():
        _, hidden = block_outputs(model, model.transformer.h, {"input_ids": data[:]["input_ids"], "use_cache": False})
    targets = data[:]["labels"][:, 1:]
    keep = targets != -100
    for l, h in enumerate(hidden, start=1):
        pred = model.lm_head(model.transformer.ln_f(h))[:, :-1].argmax(-1)
        expected = ((pred == targets) & keep).sum().item() / keep.sum().item()
        assert abs(metrics[f"eval_layer_{l}_accuracy"] - expected) <= 1e-9


# -- training: logging, gradient accumulation, peft, resume --------------------------------------------------

def test_train_logs_layer_losses_and_gradient_accumulation_matches(tmp_path):
    data = lm_dataset(n=8)
    results = []
    for bs, ga in [(4, 1), (2, 2)]:
        model = tiny_model("llama", "LlamaForCausalLM")
        args = args_for(tmp_path / f"{bs}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                        max_steps=2, logging_steps=1, learning_rate=1e-2)
        trainer = AlignedTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
        logs = [e for e in trainer.state.log_history if "loss" in e]
        results.append((logs, [p.detach().clone() for p in model.parameters()]))
        assert all(f"layer_{l}_loss" in logs[0] for l in range(1, L + 1))
        # the logged total is the weighted sum of the logged per-layer losses
        for entry in logs:
            total = sum(w * entry[f"layer_{l}_loss"] for l, w in zip(range(1, L + 1), paper_weights(L)))
            assert abs(total - entry["loss"]) <= 1e-3 * max(1.0, entry["loss"])
    (logs_a, params_a), (logs_b, params_b) = results
    for a, b in zip(logs_a, logs_b):
        assert abs(a["loss"] - b["loss"]) <= 1e-4
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_peft_lora_training(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_model("bert", "BertForSequenceClassification")
    lora = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    frozen = model.bert.embeddings.word_embeddings.weight.detach().clone()
    data = text_dataset(n=16)
    trainer = AlignedTrainer(model=lora, args=args_for(tmp_path, max_steps=4, learning_rate=1e-2), train_dataset=data,
                             eval_dataset=data)
    before = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [n for n, p in lora.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_" in n for n in changed)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, frozen)
    assert "eval_layer_3_accuracy" in trainer.evaluate()


def test_resume_reproduces_uninterrupted_losses(tmp_path):
    data = text_dataset(n=24)

    def make(out, max_steps):  # a fresh model each time: resuming must restore everything
        model = tiny_model("bert", "BertForSequenceClassification", hidden_dropout_prob=0.1)
        args = args_for(tmp_path, output_dir=str(out), max_steps=max_steps, logging_steps=1, save_strategy="steps",
                        save_steps=3, learning_rate=5e-3)
        return AlignedTrainer(model=model, args=args, train_dataset=data)

    full = make(tmp_path / "full", 6)  # saves checkpoint-3 on the way
    full.train()
    reference = [e["loss"] for e in full.state.log_history if "loss" in e]
    resumed = make(tmp_path / "resumed", 6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    again = [e["loss"] for e in resumed.state.log_history if "loss" in e]
    assert again[-3:] == reference[-3:]
    layer_ref = [e["layer_1_loss"] for e in full.state.log_history if "loss" in e]
    layer_again = [e["layer_1_loss"] for e in resumed.state.log_history if "loss" in e]
    assert layer_again[-3:] == layer_ref[-3:]


# -- 5. bad input fails before any step ----------------------------------------------------------------------

def test_bad_input_fails_before_training(tmp_path):
    data = text_dataset()
    bart = T.BartForSequenceClassification(T.BartConfig(d_model=16, encoder_layers=1, decoder_layers=1,
                                                        encoder_attention_heads=2, decoder_attention_heads=2,
                                                        encoder_ffn_dim=8, decoder_ffn_dim=8, vocab_size=99))
    with pytest.raises(ValueError, match="no layer-view adapter"):
        AlignedTrainer(model=bart, args=args_for(tmp_path), train_dataset=data)
    model = tiny_model("bert", "BertForSequenceClassification")
    snapshot = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="has 2 entries but the model has 3 blocks"):
        AlignedTrainer(model=model, args=args_for(tmp_path, layer_weights=[0.5, 0.5]), train_dataset=data)
    with pytest.raises(ValueError, match="non-negative"):
        args_for(tmp_path, layer_weights=[0.5, -0.1, 0.6])
    with pytest.raises(ValueError, match="layer_weights must be one of"):
        args_for(tmp_path, layer_weights="cubic")
    with pytest.raises(ValueError, match="aligned_layers"):
        AlignedTrainer(model=model, args=args_for(tmp_path, aligned_layers=[0, 4]), train_dataset=data)
    with pytest.raises(ValueError, match="has no labels"):
        AlignedTrainer(model=model, args=args_for(tmp_path), train_dataset=data.remove_columns("labels"))
    assert all(torch.equal(a, b) for a, b in zip(snapshot, model.parameters()))
    assert not os.path.exists(tmp_path / "out")


def test_aligned_layers_subset_weights(tmp_path):
    model = tiny_model("bert", "BertForSequenceClassification")
    trainer = AlignedTrainer(model=model, args=args_for(tmp_path, aligned_layers=[2, 3]), train_dataset=text_dataset())
    assert trainer.layer_loss_weights == pytest.approx([0.0, 2 / 5, 3 / 5])


# -- saving: plain transformers model + model card --------------------------------------------------------

def test_save_writes_card_and_plain_model(tmp_path):
    model = tiny_model("vit", "ViTForImageClassification")
    data = image_dataset()
    out = tmp_path / "saved"
    trainer = AlignedTrainer(model=model, args=args_for(tmp_path, output_dir=str(out), max_steps=2), train_dataset=data,
                             eval_dataset=data)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    card = (out / "README.md").read_text()
    assert "aligned-training" in card and "| 3 |" in card and "layer_accuracy.png" in card
    assert f"{100 * metrics['eval_layer_3_accuracy']:.2f}%" in card
    assert (out / "layer_accuracy.png").stat().st_size > 1000
    reloaded = T.AutoModelForImageClassification.from_pretrained(out)
    assert type(reloaded) is T.ViTForImageClassification
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=data[:]["pixel_values"]).logits,
                                   model.eval()(pixel_values=data[:]["pixel_values"]).logits)
    json.loads((out / "config.json").read_text())


def test_card_does_not_overwrite_users_readme(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    model = tiny_model("vit", "ViTForImageClassification")
    trainer = AlignedTrainer(model=model, args=args_for(tmp_path, output_dir=str(out)), train_dataset=image_dataset())
    trainer.save_model()
    assert (out / "README.md").read_text() == "my notes"


# -- 4. two processes ------------------------------------------------------------------------------------------

TWO_PROC_SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "aligned_ddp.py")


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """torchrun --nproc_per_node 2 (gloo): same training and the same layer-wise eval metrics as 1 process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = tmp_path / "one.json"
    two = tmp_path / "two.json"
    subprocess.run([sys.executable, TWO_PROC_SCRIPT, str(one), "16"], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                    TWO_PROC_SCRIPT, str(two), "8"], check=True, env=env, timeout=300)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    keys = [k for k in a if k.startswith("eval_layer_")]
    assert len(keys) == 2 * L
    for k in keys + ["eval_minimal_depth", "eval_monotone"]:
        assert abs(a[k] - b[k]) <= 1e-4, (k, a[k], b[k])
    for x, y in zip(a["train_losses"], b["train_losses"]):
        assert abs(x - y) <= 1e-4

"""`hf-align train` / `evaluate` for causal LMs, and `hf_align.speculative_profile`: tiny random Llama / GPT-2
models saved with a BPE tokenizer trained on a few paragraphs of Python's own documentation (offline), text
written as .txt / .jsonl files, and the embedded Python docs with a fresh model.

References are independent of hf-align: the saved model loaded back with transformers, its own final norm + LM
head applied to `output_hidden_states` in float64, blocks packed here with the tokenizer, plain `generate`."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers as T
from safetensors.torch import load_file
from test_cli import one_line_error

import hf_align
from hf_align.cli.commands import main
from hf_align.data import load_python_docs_texts, train_bpe_tokenizer

BLOCK = 32
FAST = ["--report_to", "none", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--block_size", str(BLOCK), "--learning_rate", "1e-3"]
NO_PROFILE = ["--speculative_profile", "false"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer, a tiny Llama and a tiny GPT-2 saved with it, and documents as .txt / .jsonl files."""
    root = tmp_path_factory.mktemp("cli_lm")
    source = load_python_docs_texts()["train"][:12]
    docs = [line for doc in source for line in doc.split("\n") if len(line.split()) >= 4][:160]
    tok = train_bpe_tokenizer(docs, vocab_size=300, model_max_length=64)
    V = len(tok)
    torch.manual_seed(0)
    llama = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                             bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=0.2))
    llama.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    torch.manual_seed(1)
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0, initializer_range=0.2))
    gpt2.save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    with open(root / "docs.txt", "w") as f:  # blank lines between the documents are skipped
        f.write("\n\n".join(docs) + "\n\n   \n")
    with open(root / "docs.jsonl", "w") as f:  # a label column too: a causal LM must ignore it
        for i, d in enumerate(docs):
            f.write(json.dumps({"body": d, "label": i % 2}) + "\n")
    return root, docs, tok


def ref_blocks(docs, tok, block):
    """Documents tokenized here, joined with EOS, cut into blocks (the tail dropped)."""
    ids = []
    for d in docs:
        ids += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(ids) // block
    return torch.tensor(ids[: n * block]).view(n, block)


def ref_layer_logits(model, blocks):
    """float64 logits of every block l: the model's own final norm + LM head on output_hidden_states[l] (l < L),
    the model's logits at l = L (hidden_states[-1] is already normed)."""
    with torch.no_grad():
        out = model(input_ids=blocks, output_hidden_states=True)
        L = model.config.num_hidden_layers
        norm = model.model.norm if hasattr(model, "model") else model.transformer.ln_f
        head = model.lm_head
        return [head(norm(out.hidden_states[l])) for l in range(1, L)] + [out.logits]


def ref_perplexity(logits, blocks):
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    return float(torch.exp(nll))


# ---------------------------------------------------------------------------------------------- train


def test_train_txt_keeps_the_lm_head_and_sets_the_recommendation(setup, tmp_path, capsys, monkeypatch):
    root, docs, tok = setup
    seen = {}
    original = hf_align.AlignedTrainer.save_model

    def save_model(self, *args, **kwargs):  # what the trainer's card / save code will read
        seen["recommendation"] = getattr(self, "speculative_recommendation", None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(hf_align.AlignedTrainer, "save_model", save_model)
    out = tmp_path / "out"
    assert main(["train", "--model_name_or_path", str(root / "llama"), "--dataset_name", str(root / "docs.txt"),
                 "--output_dir", str(out), "--max_steps", "3", "--save_strategy", "no", *FAST,
                 "--draft_counts", "1", "2", "--profile_repeats", "1", "--profile_new_tokens", "4",
                 "--profile_prompts", "2"]) == 0
    text = capsys.readouterr().out
    assert "label" not in text.split("perplexity")[0]  # never asks for / mentions a label column
    for layer in (1, 2, 3):
        assert f"  block {layer}: " in text
    assert "self-speculative decoding, recommended: exit layer" in text
    rec = seen["recommendation"]
    assert rec["exit_layer"] in (1, 2) and rec["num_draft_tokens"] in (1, 2)
    assert set(rec) >= {"exit_layer", "num_draft_tokens", "speedup", "acceptance"}
    assert rec.get("plain_is_faster", False) == (rec["speedup"] < 1)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    model = T.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM" and model.lm_head.weight.shape == (len(tok), 32)
    base = T.LlamaForCausalLM.from_pretrained(root / "llama")
    assert not torch.allclose(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert (out / "tokenizer.json").exists()


def test_train_jsonl_text_column_gpt2_ignores_a_label_column(setup, tmp_path, capsys):
    root, docs, tok = setup
    out = tmp_path / "out"
    assert main(["train", "--model_name_or_path", str(root / "gpt2"), "--dataset_name", str(root / "docs.jsonl"),
                 "--text_column", "body", "--output_dir", str(out), "--max_steps", "2", "--save_strategy", "no",
                 *FAST, *NO_PROFILE]) == 0
    text = capsys.readouterr().out
    n_eval = round(0.1 * len(docs))
    assert f"data: {len(docs) - n_eval} training / {n_eval} evaluation documents" in text
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    model = T.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "GPT2LMHeadModel" and model.lm_head.weight.shape[0] == len(tok)
    assert model.config.vocab_size == len(tok)


def test_embedded_python_docs_with_a_fresh_llama(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--dataset_name", "embedded:python-docs", "--output_dir", str(out), "--max_steps", "2",
                 "--max_train_samples", "6", "--max_eval_samples", "1", "--save_strategy", "no", *FAST,
                 *NO_PROFILE]) == 0
    text = capsys.readouterr().out
    assert "no --model_name_or_path: using a fresh 4-block Llama (hidden 64" in text
    assert "BPE tokenizer" in text and "evaluation split 'test'" in text
    model = T.AutoModelForCausalLM.from_pretrained(out)
    tok = T.AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 4
    assert model.config.hidden_size == 64 and model.lm_head.weight.shape[0] == len(tok) == model.config.vocab_size


def test_resume_from_checkpoint_equals_an_uninterrupted_run(setup, tmp_path, monkeypatch):
    root, _, _ = setup
    steps = []
    original = hf_align.AlignedTrainer.training_step

    def training_step(self, *args, **kwargs):
        steps.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(hf_align.AlignedTrainer, "training_step", training_step)
    common = ["train", "--model_name_or_path", str(root / "llama"), "--dataset_name", str(root / "docs.txt"),
              "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--seed", "5", *FAST, *NO_PROFILE]
    full = tmp_path / "full"
    assert main([*common, "--output_dir", str(full)]) == 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")  # the run stopped after step 3
    assert steps == [0, 1, 2, 3, 4, 5]
    assert main([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", str(resumed / "checkpoint-3")]) == 0
    assert steps[6:] == [3, 4, 5]  # resumed: steps 4..6 only, from the checkpoint's weights and optimizer
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    first = load_file(full / "checkpoint-3" / "model.safetensors")
    assert any(not torch.equal(a[k], first[k]) for k in a)  # steps 4..6 changed the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- evaluate


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_analyze_token_collapse_equals_a_float64_reference(setup, tmp_path, name):
    """`hf-align analyze` on a causal LM and a .txt file: the LM head is kept, and the report's token-level
    collapse (next-token classes, the LM head's input as features) equals numpy on the model's own forward."""
    root, docs, tok = setup
    out = tmp_path / "analysis"
    assert main(["analyze", "--model_name_or_path", str(root / name), "--dataset_name", str(root / "docs.txt"),
                 "--block_size", str(BLOCK), "--output_dir", str(out), "--metrics", "cka", "--min_count", "2",
                 "--disable_tqdm", "true"]) == 0
    report = json.loads((out / "report.json").read_text())
    model = T.AutoModelForCausalLM.from_pretrained(root / name, dtype=torch.float64).eval()
    blocks = ref_blocks(docs, tok, BLOCK)
    assert report["task"] == "causal-lm" and report["num_blocks"] == len(blocks)
    col = report["collapse"]
    with torch.no_grad():
        out_ = model(input_ids=blocks, output_hidden_states=True)
    L = model.config.num_hidden_layers
    norm = model.model.norm if hasattr(model, "model") else model.transformer.ln_f
    with torch.no_grad():
        feats = [norm(out_.hidden_states[l]) for l in range(L)] + [out_.hidden_states[L]]  # the last is normed
    y = blocks[:, 1:].reshape(-1).numpy()
    counts = np.bincount(y, minlength=len(tok))
    keep = np.isin(y, np.flatnonzero(counts >= 2))
    assert col["num_tokens"] == y.size and col["num_samples"] == keep.sum() == col["num_samples"]
    assert col["num_seen"] == np.count_nonzero(counts >= 2) and col["num_classes"] == model.config.vocab_size
    for layer in (1, L):
        X = feats[layer][:, :-1].reshape(-1, feats[layer].shape[-1]).numpy()[keep]
        yk = y[keep]
        classes = np.unique(yk)
        M = np.array([X[yk == k].mean(0) for k in classes])
        Sw = sum((X[yk == k] - M[i]).T @ (X[yk == k] - M[i]) for i, k in enumerate(classes)) / X.shape[0]
        Mc = M - M.mean(0)
        nc1 = np.trace(Sw @ np.linalg.pinv(Mc.T @ Mc / len(classes))) / len(classes)
        assert col["per_layer"][layer]["nc1"] == pytest.approx(nc1, rel=1e-5)
    md = (out / "report.md").read_text()
    assert "Token-level neural collapse through depth" in md and "never seen" in md
    assert (out / "collapse.png").exists() and (out / "similarity_cka.png").exists()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_evaluate_perplexity_and_acceptance_equal_a_float64_reference(setup, tmp_path, name):
    root, docs, tok = setup
    out = tmp_path / "report"
    assert main(["evaluate", "--model_name_or_path", str(root / name), "--dataset_name", str(root / "docs.txt"),
                 "--block_size", str(BLOCK), "--output_dir", str(out), "--cost_repeats", "0", *NO_PROFILE]) == 0
    report = json.loads((out / "report.json").read_text())
    model = T.AutoModelForCausalLM.from_pretrained(root / name, dtype=torch.float64).eval()
    blocks = ref_blocks(docs, tok, BLOCK)
    assert report["num_blocks"] == len(blocks)
    logits = ref_layer_logits(model, blocks)
    expected = [ref_perplexity(lg, blocks) for lg in logits]
    np.testing.assert_allclose(report["layer_perplexity"], expected, rtol=1e-5)
    scored = [lg[:, :-1] for lg in logits]  # the positions that predict a next token (the perplexity's tokens)
    p_L = scored[-1].softmax(-1)
    greedy = [(lg.argmax(-1) == scored[-1].argmax(-1)).double().mean().item() for lg in scored[:-1]]
    sampling = [torch.minimum(lg.softmax(-1), p_L).sum(-1).mean().item() for lg in scored[:-1]]
    assert report["acceptance"]["exit_layers"] == [1, 2]
    assert report["acceptance"]["source"] == "AlignedTrainer.evaluate"
    np.testing.assert_allclose(report["acceptance"]["greedy"], greedy, atol=2 / blocks.numel())
    np.testing.assert_allclose(report["acceptance"]["sampling"], sampling, atol=1e-5)
    md = (out / "report.md").read_text()
    assert "## Perplexity of every block" in md and "## Acceptance of each exit layer" in md
    assert (out / "layer_perplexity.png").exists() and (out / "acceptance.png").exists()
    assert report["speculative_profile"] is None and report["costs"] is None


def test_evaluate_with_the_speculative_profile_and_costs(setup, tmp_path, capsys):
    root, _, _ = setup
    out = tmp_path / "report"
    assert main(["evaluate", "--model_name_or_path", str(root / "llama"), "--dataset_name", str(root / "docs.txt"),
                 "--block_size", str(BLOCK), "--output_dir", str(out), "--cost_repeats", "1", "--draft_counts", "1", "3",
                 "--profile_repeats", "1", "--profile_new_tokens", "4", "--profile_prompts", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = report["speculative_profile"]["rows"]
    assert sorted((r["exit_layer"], r["num_draft_tokens"]) for r in rows) == [(1, 1), (1, 3), (2, 1), (2, 3)]
    best = max(rows, key=lambda r: r["speedup"])
    rec = report["speculative_profile"]["recommended"]
    assert (rec["exit_layer"], rec["num_draft_tokens"]) == (best["exit_layer"], best["num_draft_tokens"])
    assert [r["exit_layer"] for r in report["costs"]] == [1, 2, 3]
    md = (out / "report.md").read_text()
    assert "## Measured self-speculative speed-up" in md and "## Cost per exit depth" in md
    for png in ("speculative_profile.png", "exit_costs.png", "layer_perplexity.png"):
        assert (out / png).exists()
    assert "recommended: exit layer" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_fails_before_training(setup, tmp_path, capsys):
    root, _, _ = setup
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "short.txt").write_text("hi\nthere\nyou\n")
    out = tmp_path / "out"
    cases = [
        (["--model_name_or_path", str(root / "llama"), "--dataset_name", str(root / "docs.jsonl"), "--text_column", "text"],
         ["column 'text' (--text_column) is not in the 'train' split", "available columns: ['body', 'label']"]),
        (["--model_name_or_path", str(root / "llama"), "--dataset_name", str(tmp_path / "empty.txt")], ["is empty"]),
        (["--model_name_or_path", str(root / "gpt2"), "--dataset_name", str(tmp_path / "blank.txt")], ["has no text"]),
        (["--model_name_or_path", str(root / "gpt2"), "--dataset_name", str(root / "docs.txt"), "--block_size", "65"],
         ["--block_size 65 is larger than the 64 positions"]),
        (["--model_name_or_path", str(root / "llama"), "--dataset_name", str(tmp_path / "short.txt"),
          "--eval_split_size", "0.34"], ["text is too short", "fewer than one block of 32"]),
    ]
    for extra, fragments in cases:
        args = ["train", *extra, "--output_dir", str(out), "--max_steps", "1", *FAST]
        if "--block_size" in extra:  # the later --block_size of FAST would win
            args = ["train", *extra, "--output_dir", str(out), "--max_steps", "1", "--report_to", "none"]
        assert main(args) == 2, extra
        one_line_error(capsys, "hf-align train: error: ", *fragments)
        assert not out.exists()
    # evaluate checks the same
    assert main(["evaluate", "--model_name_or_path", str(root / "llama"), "--dataset_name", str(root / "docs.txt"),
                 "--block_size", "100", "--output_dir", str(out)]) == 2
    one_line_error(capsys, "hf-align evaluate: error: --block_size 100 is larger than the 64 positions")
    assert not out.exists()


def test_entry_point_exit_status(setup, tmp_path):
    root, _, _ = setup
    (tmp_path / "empty.jsonl").write_text("")
    script = os.path.join(os.path.dirname(sys.executable), "hf-align")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "hf_align.cli"]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(hf_align.__file__))}
    done = subprocess.run([*command, "train", "--model_name_or_path", str(root / "gpt2"), "--dataset_name",
                           str(tmp_path / "empty.jsonl"), "--block_size", "32", "--output_dir", str(tmp_path / "o")],
                          capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"hf-align train: error: {str(tmp_path / 'empty.jsonl')!r} is empty: there is no text to train on"]
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- speculative_profile


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                            bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                            initializer_range=0.2)).to(torch.float64).eval()


def test_speculative_profile_times_identical_generations(lm):
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    profile = hf_align.speculative_profile(lm, ids, draft_counts=(1, 3), max_new_tokens=6, repeats=2, progress=False)
    plain = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                        do_sample=False)
    assert plain.shape == (2, 12)
    assert [(r["exit_layer"], r["num_draft_tokens"]) for r in profile.rows] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    assert torch.equal(profile.outputs["plain"], plain)
    for k, n in [(1, 1), (1, 3), (2, 1), (2, 3)]:
        assert torch.equal(profile.outputs[(k, n)], plain), (k, n)
    for r in profile.rows:
        assert 0 <= r["acceptance"] <= 1 and r["plain_s"] == profile.plain_s
        assert r["speedup"] == pytest.approx(r["plain_s"] / r["speculative_s"])
    best = max(profile.rows, key=lambda r: r["speedup"])
    assert profile.recommended["exit_layer"] == best["exit_layer"]
    assert profile.recommended["num_draft_tokens"] == best["num_draft_tokens"]
    assert profile.recommended["speedup"] == best["speedup"]
    assert profile.recommended.get("plain_is_faster", False) == (best["speedup"] < 1)
    assert "| 2 | 3 |" in profile.to_markdown()
    assert json.loads(json.dumps(profile.to_dict()))["rows"][0]["exit_layer"] == 1


def test_speculative_profile_acceptance_is_the_drafted_fraction(lm):
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    profile = hf_align.speculative_profile(lm, ids, exit_layers=[2], draft_counts=[2], max_new_tokens=8, repeats=1,
                                           progress=False)
    stats = hf_align.SpeculativeStats(exit_layer=2, num_draft_tokens=2, num_layers=3)
    lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                custom_generate=hf_align.self_speculative, exit_layer=2, num_draft_tokens=2, speculative_stats=stats)
    assert profile.rows[0]["acceptance"] == stats.accepted / stats.drafted


@pytest.mark.parametrize("kwargs", [
    dict(exit_layers=[0]), dict(exit_layers=[3]), dict(exit_layers=[]), dict(exit_layers=[1, 1]),
    dict(draft_counts=[]), dict(draft_counts=[0]), dict(draft_counts=2), dict(max_new_tokens=0), dict(repeats=0),
    dict(do_sample="yes"), dict(max_new_tokens=60),
])
def test_speculative_profile_bad_arguments(lm, kwargs):
    ids = torch.randint(3, 64, (1, 5))
    with pytest.raises(ValueError):
        hf_align.speculative_profile(lm, ids, progress=False, **kwargs)


def test_speculative_profile_bad_inputs(lm):
    with pytest.raises(ValueError):
        hf_align.speculative_profile(lm, torch.tensor([3, 4, 5]), progress=False)
    with pytest.raises(ValueError):
        hf_align.speculative_profile(lm, torch.ones(1, 3), progress=False)
    with pytest.raises(ValueError):
        hf_align.speculative_profile(lm, torch.ones(1, 3, dtype=torch.long), torch.ones(1, 4), progress=False)
    clf = T.LlamaForSequenceClassification(lm.config)
    with pytest.raises(ValueError, match="classifier"):
        hf_align.speculative_profile(clf, torch.ones(1, 3, dtype=torch.long), progress=False)

"""The layer view: self-check per family, exact early stopping, errors that leave the model as it was."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from tiny_models import CASES, tiny_model

import hf_align
from hf_align import LayerView
from hf_align.layers import get_family


def padded_text_batch(model, left: bool = False, seed: int = 1):
    """Three sequences of different lengths, padded with the model's pad id (right or left)."""
    config = model.config
    vocab, pad = config.vocab_size, config.pad_token_id if config.pad_token_id is not None else 0
    g = torch.Generator().manual_seed(seed)
    lengths, T_ = [9, 6, 4], 9
    ids = torch.full((3, T_), pad, dtype=torch.long)
    mask = torch.zeros((3, T_), dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens = torch.randint(pad + 1, vocab, (n,), generator=g)
        where = slice(T_ - n, T_) if left else slice(0, n)
        ids[row, where], mask[row, where] = tokens, 1
    return {"input_ids": ids, "attention_mask": mask}


def batch_for(model, view, left=False):
    if view.task == "image-classification":
        g = torch.Generator().manual_seed(3)
        return {"pixel_values": torch.randn(3, 3, 16, 16, generator=g)}
    return padded_text_batch(model, left=left)


def block_outputs_by_hooks(model, blocks, inputs):
    """Independent reference: forward hooks on the blocks during the model's own full forward."""
    outputs = []

    def keep(module, args, out):
        outputs.append(out if isinstance(out, torch.Tensor) else out[0])

    handles = [b.register_forward_hook(keep) for b in blocks]
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    return logits, outputs


@pytest.mark.parametrize("family,class_name", CASES, ids=[c for _, c in CASES])
def test_self_check_every_family_with_padding(family, class_name):
    model = tiny_model(family, class_name)
    view = LayerView(model)
    assert view.num_layers == 3 and len(view.blocks) == 3
    assert view.last_check_diff is not None and view.last_check_diff <= 1e-5
    paddings = [False, True] if view.pooling == "last" or view.task == "causal-lm" else [False]
    for left in paddings:
        inputs = batch_for(model, view, left=left)
        logits, hooked = block_outputs_by_hooks(model, view.blocks, inputs)
        with torch.no_grad():
            per_layer = view.layer_logits(**inputs)
            hidden = view.hidden_states(**inputs)
        assert len(per_layer) == 3 and len(hidden) == 4
        # the head on the last block's output is the model's own logits (padded batch)
        assert (per_layer[-1] - logits).abs().max().item() <= 1e-5
        # every block output equals what the block produced inside the model's own forward
        for layer in range(3):
            torch.testing.assert_close(hidden[layer + 1], hooked[layer], rtol=0, atol=1e-6)


def test_padding_changes_decoder_pooling():
    """The last non-pad token is really used: a right-padded row's logits are read at its own last token."""
    model = tiny_model("llama", "LlamaForSequenceClassification")
    view = LayerView(model)
    inputs = padded_text_batch(model)
    with torch.no_grad():
        batch_logits = view.layer_logits(**inputs)[-1]
        alone = view.layer_logits(input_ids=inputs["input_ids"][2:, :4], attention_mask=inputs["attention_mask"][2:, :4])[-1]
    torch.testing.assert_close(batch_logits[2:], alone, rtol=0, atol=1e-5)


def test_intermediate_heads_equal_explicit_head_on_model_hidden_states():
    """Independent reference for intermediate layers: BERT's pooler+classifier on HF's own hidden_states."""
    model = tiny_model("bert", "BertForSequenceClassification")
    view = LayerView(model)
    inputs = padded_text_batch(model)
    with torch.no_grad():
        ref_hidden = model(**inputs, output_hidden_states=True).hidden_states
        expected = [model.classifier(model.bert.pooler(h)) for h in ref_hidden[1:]]
        ours = view.layer_logits(**inputs)
    for e, o in zip(expected, ours):
        torch.testing.assert_close(o, e, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "family,class_name",
    [("bert", "BertForSequenceClassification"), ("vit", "ViTForImageClassification"),
     ("llama", "LlamaForCausalLM"), ("deberta-v2", "DebertaV2ForSequenceClassification"),
     ("gpt2", "GPT2ForSequenceClassification")],
)
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_forward_until_runs_exactly_k_blocks(family, class_name, k):
    model = tiny_model(family, class_name)
    view = LayerView(model)
    inputs = batch_for(model, view)
    _, reference = block_outputs_by_hooks(model, view.blocks, inputs)
    calls = [0] * 3
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1)) for i, b in enumerate(view.blocks)]
    try:
        with torch.no_grad():
            hidden = view.forward_until(k, **inputs)
    finally:
        for h in handles:
            h.remove()
    assert calls == [1] * k + [0] * (3 - k)
    if k > 0:
        torch.testing.assert_close(hidden, reference[k - 1], rtol=0, atol=1e-6)
    else:
        with torch.no_grad():
            emb = model(**inputs, output_hidden_states=True).hidden_states[0] if view.task != "causal-lm" else None
        if emb is not None:
            torch.testing.assert_close(hidden, emb, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "family,class_name",
    [("bert", "BertForSequenceClassification"), ("llama", "LlamaForSequenceClassification"),
     ("deberta-v2", "DebertaV2ForSequenceClassification"), ("gpt2", "GPT2ForSequenceClassification")],
)
def test_state_select_keeps_rows_exact(family, class_name):
    """Rows that stay in a shrunk batch get the same result as in the full batch."""
    model = tiny_model(family, class_name)
    view = LayerView(model)
    inputs = padded_text_batch(model)
    with torch.no_grad():
        full = view.layer_logits(**inputs)[-1]
        state = view.run_blocks(view.prepare(**inputs), 1).select([0, 2])
        state = view.run_blocks(state, 3)
        part = view.head(state.hidden, state.context)
    torch.testing.assert_close(part, full[[0, 2]], rtol=0, atol=1e-5)


def _hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_unsupported_model_error_and_model_untouched():
    config = T.BartConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=8, decoder_ffn_dim=8, vocab_size=50)
    model = T.BartForSequenceClassification(config).train()
    with pytest.raises(ValueError) as err:
        LayerView(model)
    msg = str(err.value)
    assert "bart" in msg and "register_family" in msg
    for family in ["bert", "roberta", "distilbert", "electra", "deberta-v2", "vit", "gpt2", "llama"]:
        assert family in msg
    assert model.training and _hook_count(model) == 0


def test_unsupported_head_type_names_supported_tasks():
    model = T.BertForMaskedLM(tiny_model("bert", "BertForSequenceClassification").config)
    with pytest.raises(ValueError, match="sequence-classification"):
        LayerView(model)


def test_failing_self_check_reports_difference_and_restores_model():
    model = tiny_model("bert", "BertForSequenceClassification")
    model.train()
    model.bert.embeddings.eval()  # a mixed-mode model: every flag must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    family = get_family("bert")

    def wrong_head(model, hidden, ctx):  # forgets the pooler
        return model.classifier(hidden[:, 0])

    hf_align.register_family("bert", family.model_types, {"sequence-classification": wrong_head},
                             block_paths=family.block_paths, overwrite=True)
    try:
        with pytest.raises(ValueError, match=r"self-check failed .* differs from the model's own logits by [0-9.e+-]+"):
            LayerView(model)
    finally:
        hf_align.register_family("bert", family.model_types, family.heads, classifiers=family.classifiers,
                                 block_paths=family.block_paths, pooling=family.pooling, overwrite=True)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert _hook_count(model) == 0
    LayerView(model)  # the original adapter is back


def test_error_inside_forward_leaves_no_hook():
    model = tiny_model("bert", "BertForSequenceClassification")
    view = LayerView(model)
    with pytest.raises(IndexError):
        view.prepare(input_ids=torch.full((1, 4), 10_000))  # out-of-vocabulary ids fail in the embedding
    assert _hook_count(model) == 0


def test_bad_inputs_are_clear():
    view = LayerView(tiny_model("vit", "ViTForImageClassification"))
    with pytest.raises(ValueError, match="pixel_values"):
        view.layer_logits(input_ids=torch.ones(1, 4, dtype=torch.long))
    text = LayerView(tiny_model("bert", "BertForSequenceClassification"))
    with pytest.raises(ValueError, match="input_ids"):
        text.layer_logits(pixel_values=torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="k must be"):
        text.forward_until(4, input_ids=torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(TypeError):
        LayerView("bert-base-uncased")


def test_register_family_validation():
    with pytest.raises(ValueError, match="already registered"):
        hf_align.register_family("bert", ["bert"], {"sequence-classification": lambda m, h, c: h})
    with pytest.raises(ValueError, match="unknown task"):
        hf_align.register_family("x", ["x"], {"token-classification": lambda m, h, c: h})
    assert "llama" in hf_align.supported_families()["llama"]["model_types"]


def test_user_registered_family():
    """A family the registry does not know (BART's encoder-decoder is out of scope, so use a custom module)."""

    class TinyConfig(T.PretrainedConfig):
        model_type = "tiny-mlp-encoder"

        def __init__(self, hidden_size=8, num_hidden_layers=2, vocab_size=20, num_labels=3, **kw):
            super().__init__(num_labels=num_labels, **kw)
            self.hidden_size, self.num_hidden_layers, self.vocab_size = hidden_size, num_hidden_layers, vocab_size

    class Block(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.lin = torch.nn.Linear(d, d)

        def forward(self, hidden, scale=None):
            return hidden + torch.tanh(self.lin(hidden)) * scale

    class TinyModel(T.PreTrainedModel):
        config_class = TinyConfig
        base_model_prefix = "encoder"

        def __init__(self, config):
            super().__init__(config)
            self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
            self.layers = torch.nn.ModuleList(Block(config.hidden_size) for _ in range(config.num_hidden_layers))
            self.post_init()

        def forward(self, input_ids, attention_mask=None, **kw):
            h = self.embed(input_ids)
            for block in self.layers:
                h = block(h, scale=0.5)
            return h

    class TinyForSequenceClassification(T.PreTrainedModel):
        config_class = TinyConfig
        base_model_prefix = "encoder"

        def __init__(self, config):
            super().__init__(config)
            self.encoder = TinyModel(config)
            self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels)
            self.post_init()

        def forward(self, input_ids, attention_mask=None, **kw):
            return T.modeling_outputs.SequenceClassifierOutput(logits=self.classifier(self.encoder(input_ids).mean(1)))

    model = TinyForSequenceClassification(TinyConfig()).eval()
    with pytest.raises(ValueError, match="no layer-view adapter"):
        LayerView(model)
    hf_align.register_family("tiny-mlp", ["tiny-mlp-encoder"],
                             {"sequence-classification": lambda m, h, c: m.classifier(h.mean(1))})
    try:
        view = LayerView(model)
        ids = torch.randint(0, 20, (2, 5))
        with torch.no_grad():
            torch.testing.assert_close(view.layer_logits(input_ids=ids)[-1], model(ids).logits, rtol=0, atol=1e-6)
        assert view.num_layers == 2
    finally:
        hf_align.layers._REGISTRY.pop("tiny-mlp")


def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    model = tiny_model("bert", "BertForSequenceClassification")
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], init_lora_weights=False)
    peft_model = peft.get_peft_model(model, lora).eval()
    view = LayerView(peft_model)
    inputs = padded_text_batch(model)
    with torch.no_grad():
        ours = view.layer_logits(**inputs)[-1]
        ref = peft_model(**inputs).logits
        base_only = peft_model.get_base_model()
        with peft_model.disable_adapter():
            without_lora = base_only(**inputs).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert (ours - without_lora).abs().max() > 1e-4  # the LoRA weights really take part
    assert view.classifier.weight.shape == (3, 32)


def test_peft_lora_decoder():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama", "LlamaForCausalLM")
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(model, lora).eval()
    view = LayerView(peft_model)
    inputs = padded_text_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(view.layer_logits(**inputs)[-1], peft_model(**inputs).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,class_name", [("bert", "BertForSequenceClassification"), ("vit", "ViTForImageClassification"), ("qwen2", "Qwen2ForCausalLM")])
def test_saved_and_reloaded_model(tmp_path, family, class_name):
    model = tiny_model(family, class_name)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = getattr(T, class_name).from_pretrained(tmp_path).eval()
    view = LayerView(reloaded)
    inputs = batch_for(reloaded, view)
    with torch.no_grad():
        torch.testing.assert_close(view.layer_logits(**inputs)[-1], model(**inputs).logits, rtol=0, atol=1e-5)

"""Head-less base models (AutoModel: BertModel, ViTModel, GPT2Model, LlamaModel...) and wrapped models through the
layer view, layer_similarity and collapse_report, against an independent float64 computation from the model's
own ``output_hidden_states=True`` forward over all the data at once (issue 12, acceptance 1)."""

import warnings

import numpy as np
import pytest
import torch
import transformers as T
from references import ref_linear_cka
from tiny_models import tiny_config

from hf_align import LayerView, collapse_report, layer_similarity

BASE = {
    "bert": "BertModel",
    "roberta": "RobertaModel",
    "xlm-roberta": "XLMRobertaModel",
    "distilbert": "DistilBertModel",
    "electra": "ElectraModel",
    "deberta-v2": "DebertaV2Model",
    "vit": "ViTModel",
    "deit": "DeiTModel",
    "gpt2": "GPT2Model",
    "llama": "LlamaModel",
    "mistral": "MistralModel",
    "qwen2": "Qwen2Model",
}
DECODERS = ("gpt2", "llama", "mistral", "qwen2")
N, K = 30, 3


def base_model(family, seed=0):
    torch.manual_seed(seed)
    return getattr(T, BASE[family])(tiny_config(family)).eval()


def make_data(family, n=N, seed=1):
    """Examples (unpadded token lists, or images) with labels; the all-at-once padded reference inputs."""
    g = torch.Generator().manual_seed(seed)
    labels = [i % K for i in range(n)]
    if family in ("vit", "deit"):
        pixels = torch.randn(n, 3, 16, 16, generator=g)
        return [{"pixel_values": pixels[i], "labels": labels[i]} for i in range(n)], {"pixel_values": pixels}
    lengths = torch.randint(3, 9, (n,), generator=g).tolist()
    rows = [torch.randint(1, 99, (t,), generator=g).tolist() for t in lengths]
    T_ = max(lengths)
    ids = torch.tensor([r + [0] * (T_ - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T_ - len(r)) for r in rows])
    return [{"input_ids": r, "labels": y} for r, y in zip(rows, labels)], {"input_ids": ids, "attention_mask": mask}


def reference_features(model, family, inputs):
    """float64 features of every layer from the model's own output_hidden_states, pooled as the family's
    classifier pools: first token (encoders, ViT) or last non-padding token (decoders)."""
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    if family in DECODERS:
        last = inputs["attention_mask"].sum(1) - 1
        return [h.double()[torch.arange(len(last)), last].numpy() for h in hidden]
    return [h.double()[:, 0].numpy() for h in hidden]


def ref_nc1(f, y, k):
    means = np.stack([f[y == c].mean(0) for c in range(k)])
    centred = f - means[y]
    sw = centred.T @ centred / len(f)
    mc = means - means.mean(0)
    sb = mc.T @ mc / k
    return np.trace(sw @ np.linalg.pinv(sb)) / k


@pytest.mark.parametrize("family", list(BASE))
def test_base_model_view_similarity_collapse(family):
    model = base_model(family)
    view = LayerView(model)  # runs the base-model self-check (hidden states == output_hidden_states)
    assert view.task == "feature-extraction" and not view.has_head
    assert view.last_check_diff <= 1e-5
    data, inputs = make_data(family)
    ref = reference_features(model, family, inputs)
    # the view's states as the model returns them; stop-after-k runs k blocks only
    with torch.no_grad():
        own = model(**inputs, output_hidden_states=True)
        ours = view.output_hidden_states(**inputs)
        assert len(ours) == len(own.hidden_states) == view.num_layers + 1
        for a, b in zip(ours, own.hidden_states):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        torch.testing.assert_close(view.final_norm(view.forward_until(view.num_layers, **inputs)), own.last_hidden_state,
                                   atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="base model without a head"):
        view.head(ours[-1], **inputs)

    # layers whose pooled features are the same vector for every sample (ViT/DeiT's CLS at the embedding output)
    constant = [layer for layer, f in enumerate(ref) if np.ptp(f, axis=0).max() == 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = layer_similarity(model, data, batch_size=8, progress=False)
        rep = collapse_report(model, data, num_classes=K, batch_size=8)
    assert sim.pooling == ("last" if family in DECODERS else "cls")
    assert sim.undefined_layers == [f"layer {layer}" for layer in constant]
    assert constant == ([0] if family in ("vit", "deit") else [])
    for k, a in enumerate(ref):
        for m, b in enumerate(ref):
            if k not in constant and m not in constant:
                assert sim.matrix[k, m] == pytest.approx(ref_linear_cka(a, b), abs=1e-6)

    assert rep.features == "hidden" and rep.classifier == {} and rep.undefined_layers == constant
    y = np.array([e["labels"] for e in data])
    for layer, f in enumerate(ref):
        if layer in constant:
            assert np.isnan(rep.per_layer[layer]["nc1"])
            continue
        assert rep.per_layer[layer]["nc1"] == pytest.approx(ref_nc1(f, y, K), rel=1e-6)
        assert "nc4" not in rep.per_layer[layer]  # NC4 needs the model's predictions: no head, no NC4


def test_base_model_needs_num_classes_and_refuses_head_uses():
    from hf_align import EarlyExitModel

    model = base_model("bert")
    data, _ = make_data("bert", n=6)
    with pytest.raises(ValueError, match="num_classes"):
        collapse_report(model, data)
    with pytest.raises(ValueError, match="features='head' needs a classification head"):
        collapse_report(model, data, num_classes=K, features="head")
    with pytest.raises(ValueError, match="base model without a head"):
        LayerView(model).layer_logits(input_ids=torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="classifiers"):
        EarlyExitModel(model)


def test_peft_wrapped_base_model():
    from peft import LoraConfig, get_peft_model

    model = base_model("bert")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False))
    peft_model.eval()
    data, inputs = make_data("bert")
    ref = reference_features(peft_model, "bert", inputs)  # the LoRA-adapted forward
    with peft_model.disable_adapter():  # the adapters really change the features
        plain = reference_features(peft_model, "bert", inputs)
    assert np.abs(plain[-1] - ref[-1]).max() > 1e-3
    sim = layer_similarity(peft_model, data, batch_size=8, progress=False)
    np.testing.assert_allclose(sim.matrix, [[ref_linear_cka(a, b) for b in ref] for a in ref], atol=1e-6)


def test_sentence_transformers_wrapper(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from hf_align.data import train_wordpiece_tokenizer

    texts = [f"sample number {i} about layers and heads {i % 7}" for i in range(40)]
    tokenizer = train_wordpiece_tokenizer(texts, vocab_size=120)
    torch.manual_seed(0)
    bert = T.BertModel(tiny_config("bert", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)).eval()
    bert.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a folder without modules.json: sentence-transformers builds Transformer + mean Pooling itself
        wrapper = st.SentenceTransformer(str(tmp_path / "bert"), device="cpu").eval()
    view = LayerView(wrapper)
    assert isinstance(view.hf_model, T.BertModel) and view.task == "feature-extraction"
    encoded = [dict(tokenizer(t)) for t in texts]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    inner = view.hf_model
    with torch.no_grad():
        hidden = inner(**batch, output_hidden_states=True).hidden_states
        # the wrapper's own sentence embedding is the masked mean of the same model's last hidden state
        emb = wrapper.encode(texts, convert_to_tensor=True, batch_size=40)
    m = batch["attention_mask"][..., None].double()
    np.testing.assert_allclose(emb.double().numpy(), ((hidden[-1].double() * m).sum(1) / m.sum(1)).numpy(), atol=1e-5)
    ref = [h.double()[:, 0].numpy() for h in hidden]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = layer_similarity(wrapper, encoded, batch_size=16, progress=False)
    defined = ~sim.undefined
    expected = np.array([[ref_linear_cka(a, b) if np.ptp(a) > 0 and np.ptp(b) > 0 else np.nan for b in ref] for a in ref])
    np.testing.assert_allclose(sim.matrix[defined], expected[defined], atol=1e-6)
    assert sim.undefined_layers == ["layer 0"]  # [CLS] at the embedding output is the same vector for all


def test_cli_layers_describes_a_saved_base_model(tmp_path, capsys):
    from hf_align.cli import main

    base_model("gpt2").save_pretrained(tmp_path / "gpt2")
    assert main(["layers", str(tmp_path / "gpt2")]) == 0
    out = capsys.readouterr().out
    assert "GPT2Model" in out and "task='feature-extraction'" in out and "pooling='last'" in out
    assert "view hidden states - model hidden states" in out

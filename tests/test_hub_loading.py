"""Everything hf-align saves loads by Hub repo id from a populated cache (HF_HUB_OFFLINE=1), through the stock
entry points with no extra arguments: with hf-align imported (this process) and without (a fresh interpreter that
never imports it). References are the in-memory models' own logits / own sampling and numpy formulas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import transformers as T
from datasets import Dataset
from hub_cache import populate_evaluate_cache, populate_hub_cache
from PIL import Image
from references import ref_linear_cka

import hf_align
from hf_align import AlignedTrainer, AlignedTrainingArguments, EarlyExitModel
from hf_align.data import train_wordpiece_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = ["solve a linear system of equations", "compute the fast fourier transform of a signal",
             "fit a normal distribution to data", "minimise a scalar function of one variable",
             "interpolate a smooth spline", "the gamma function and its logarithm"]
TEXT, LORA, VIT, SR = "hf-align-test/aligned-bert", "hf-align-test/aligned-bert-lora", "hf-align-test/vit-exit", "hf-align-test/sr"
CKA, NC = "hf-align-test/cka", "hf-align-test/neural_collapse"
L = 3


def _args(out, **kw):
    return AlignedTrainingArguments(output_dir=str(out), report_to=[], disable_tqdm=True, save_strategy="no",
                                    per_device_train_batch_size=6, per_device_eval_batch_size=6, learning_rate=1e-2,
                                    seed=0, use_cpu=True, dataloader_num_workers=0, max_steps=1, **kw)


def _image(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8))


def _probs(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[0].double().softmax(-1)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Five artefacts saved the hf-align way and put into a Hub cache; in-memory references beside them."""
    tmp = tmp_path_factory.mktemp("hub")
    cache = tmp / "hub"
    mp = pytest.MonkeyPatch()
    mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    refs = {"cache": str(cache), "tmp": tmp}
    try:
        # 1. an aligned text classifier: AlignedTrainer.save_model (model + tokenizer + card)
        tok = train_wordpiece_tokenizer(SENTENCES * 3, vocab_size=120)
        torch.manual_seed(0)
        config = T.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=L, num_attention_heads=4,
                              intermediate_size=37, num_labels=3, pad_token_id=tok.pad_token_id)
        enc = tok(SENTENCES, padding="max_length", max_length=12, truncation=True)
        data = Dataset.from_dict({**enc, "labels": [i % 3 for i in range(len(SENTENCES))]}).with_format("torch")
        trainer = AlignedTrainer(model=T.BertForSequenceClassification(config), args=_args(tmp / "text"),
                                 train_dataset=data, eval_dataset=data, processing_class=tok)
        trainer.evaluate()  # (no training needed for loading: the artefact is what AlignedTrainer saves)
        trainer.save_model()
        refs["text_model"] = trainer.model.eval()
        refs["tok"] = tok
        refs["text_commit"] = populate_hub_cache(cache, TEXT, tmp / "text")

        # 2. a PEFT adapter of it (base loaded by repo id from the cache), saved by AlignedTrainer
        import peft

        base = T.AutoModelForSequenceClassification.from_pretrained(TEXT)
        lora = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                                         init_lora_weights=False))
        lora_trainer = AlignedTrainer(model=lora, args=_args(tmp / "lora"), train_dataset=data, eval_dataset=data)
        lora_trainer.evaluate()
        lora_trainer.save_model()
        refs["lora_model"] = lora.eval()
        populate_hub_cache(cache, LORA, tmp / "lora")

        # 3. an image classifier with its processor, saved as an early-exit pipeline
        torch.manual_seed(0)
        vit = T.ViTForImageClassification(T.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                                      num_hidden_layers=L, num_attention_heads=4,
                                                      intermediate_size=37, num_labels=4)).eval()
        processor = T.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        T.pipeline("early-exit-classification", model=vit, image_processor=processor, policy="fixed",
                   exit_layer=2).save_pretrained(tmp / "vit")
        refs["vit"], refs["processor"] = vit, processor
        populate_hub_cache(cache, VIT, tmp / "vit")

        # 4. an SR pipeline
        from diffusers import DDPMScheduler

        from hf_align import sr_unet
        from hf_align.pipelines.super_resolution import SuperResolutionPipeline

        torch.manual_seed(0)
        sr = SuperResolutionPipeline(sr_unet(3, (8, 16)), DDPMScheduler(num_train_timesteps=20), scale_factor=2,
                                     residual_scale=2.0)
        sr.set_progress_bar_config(disable=True)
        sr.save_pretrained(tmp / "sr")
        refs["sr"] = sr
        populate_hub_cache(cache, SR, tmp / "sr")

        # 5. the evaluate metrics, in evaluate's download cache
        for repo, name in ((CKA, "cka"), (NC, "neural_collapse")):
            populate_evaluate_cache(tmp / "evaluate" / "downloads", repo,
                                    os.path.join(ROOT, "hf_align", "metrics", name, f"{name}.py"))
        yield refs
    finally:
        mp.undo()


# PEFT looks for the base model's config in the fake Hub repo id while saving the adapter; not a user's warning
@pytest.mark.filterwarnings("ignore:Could not find a config file in hf-align-test:UserWarning")
def test_text_classifier_by_repo_id(hub):
    clf = T.pipeline("early-exit-classification", model=TEXT)  # tokenizer, model, no extra arguments
    assert type(clf.model) is T.BertForSequenceClassification and clf.tokenizer is not None
    text = SENTENCES[1]
    full = clf(text, policy="fixed", exit_layer=L)[0]
    probs = _probs(hub["text_model"], hub["tok"](text, return_tensors="pt"))
    assert full["exit_layer"] == L and full["score"] == pytest.approx(float(probs.max()), abs=1e-5)
    assert full["label"] == hub["text_model"].config.id2label[int(probs.argmax())]
    # the card's metadata is on the Hub copy, as written by AlignedTrainer
    from huggingface_hub import ModelCard, hf_hub_download

    card = ModelCard.load(hf_hub_download(TEXT, "README.md"))
    assert card.data.library_name == "transformers" and "aligned-training" in card.data.tags
    assert f'model="{hub["tmp"] / "text"}"' in card.text  # saved locally: the snippet names the folder it was saved to


def test_early_exit_model_from_pretrained_hub_kwargs(hub, tmp_path):
    commit = hub["text_commit"]
    ee = EarlyExitModel.from_pretrained(TEXT, dtype=torch.float64, revision=commit, token=False,
                                        cache_dir=hub["cache"], device_map="cpu", threshold=0.5)
    assert next(ee.model.parameters()).dtype == torch.float64 and ee.settings.threshold == 0.5
    inputs = hub["tok"](SENTENCES[0], return_tensors="pt")
    out = ee.set_exit(policy="fixed", exit_layer=L)(**inputs)
    ref = _probs(hub["text_model"], inputs)
    np.testing.assert_allclose(out.logits[0].softmax(-1).numpy(), ref.numpy(), atol=1e-5)
    with pytest.raises(OSError):
        EarlyExitModel.from_pretrained(TEXT, revision="0" * 40)  # a commit that is not in the cache
    with pytest.raises(ValueError, match="unknown argument.*treshold"):
        EarlyExitModel.from_pretrained(TEXT, treshold=0.5)


def test_image_classifier_with_processor_by_repo_id(hub):
    clf = T.pipeline("early-exit-classification", model=VIT)
    assert isinstance(clf.image_processor, T.ViTImageProcessor) and clf.image_processor.size == {"height": 16, "width": 16}
    assert clf.early_exit.settings.policy == "fixed" and clf.early_exit.settings.exit_layer == 2
    image = _image()
    assert clf(image)[0]["exit_layer"] == 2
    full = clf(image, exit_layer=L)[0]
    probs = _probs(hub["vit"], hub["processor"](images=image, return_tensors="pt"))
    assert full["score"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_peft_adapter_by_repo_id(hub):
    from huggingface_hub import ModelCard, hf_hub_download

    card = ModelCard.load(hf_hub_download(LORA, "README.md"))
    assert card.data.library_name == "peft" and card.data.base_model == TEXT
    assert "| 3 |" in card.text and "AutoPeftModelForSequenceClassification" in card.text  # not PEFT's template
    clf = T.pipeline("early-exit-classification", model=LORA)
    text = SENTENCES[2]
    inputs = hub["tok"](text, return_tensors="pt")
    probs = _probs(hub["lora_model"], inputs)
    full = clf(text, policy="fixed", exit_layer=L)[0]
    assert full["score"] == pytest.approx(float(probs.max()), abs=1e-5)
    ee = EarlyExitModel.from_pretrained(LORA, policy="fixed", exit_layer=L)
    np.testing.assert_allclose(ee(**inputs).logits[0].double().softmax(-1).numpy(), probs.numpy(), atol=1e-5)


def test_sr_pipeline_by_repo_id(hub):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(SR)
    assert type(pipe).__name__ == "SuperResolutionPipeline" and pipe.config.residual_scale == 2.0
    pipe.set_progress_bar_config(disable=True)
    low = np.random.default_rng(0).random((1, 8, 8, 3)).astype(np.float32)
    got = pipe(low, num_inference_steps=3, generator=torch.Generator().manual_seed(3), output_type="np").images
    ref = hub["sr"](low, num_inference_steps=3, generator=torch.Generator().manual_seed(3), output_type="np").images
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_metrics_by_repo_id(hub, monkeypatch):
    import evaluate

    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    monkeypatch.setattr(evaluate.config, "DOWNLOADED_EVALUATE_PATH", hub["tmp"] / "evaluate" / "downloads")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 5))
    Y = np.tanh(X @ rng.normal(size=(5, 3)))
    got = evaluate.load(CKA, "linear").compute(predictions=X.tolist(), references=Y.tolist())["cka"]
    assert got == pytest.approx(ref_linear_cka(X, Y), abs=1e-9)
    # neural collapse on a known geometry: every feature is its class mean -> no within-class variability
    means = np.eye(3, 4)
    labels = np.repeat(np.arange(3), 4)
    nc = evaluate.load(NC).compute(features=means[labels].tolist(), references=labels.tolist(),
                                   predictions=labels.tolist())
    assert nc["nc1"] == pytest.approx(0.0, abs=1e-12) and nc["nc4"] == 0.0


_WITHOUT_HF_ALIGN = r"""
import json, sys
import numpy as np, torch, transformers as T
from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification, AutoTokenizer
out = {}
tok = AutoTokenizer.from_pretrained(TEXT)
text = AutoModelForSequenceClassification.from_pretrained(TEXT)
with torch.no_grad():
    out["text"] = [type(text).__name__, text(**tok(SENTENCE, return_tensors="pt")).logits[0].tolist()]
vit = AutoModelForImageClassification.from_pretrained(VIT)
from transformers import AutoImageProcessor
processor = AutoImageProcessor.from_pretrained(VIT)
with torch.no_grad():
    out["vit"] = [type(vit).__name__, type(processor).__name__, vit(**processor(images=IMAGE, return_tensors="pt")).logits[0].tolist()]
from peft import AutoPeftModelForSequenceClassification
lora = AutoPeftModelForSequenceClassification.from_pretrained(LORA)
with torch.no_grad():
    out["lora"] = [type(lora.base_model.model).__name__, lora(**tok(SENTENCE, return_tensors="pt")).logits[0].tolist()]
try:
    T.pipeline("early-exit-classification", model=TEXT)
except Exception as e:  # the task exists only once hf_align is imported
    out["pipeline_without"] = type(e).__name__
from diffusers import DiffusionPipeline, UNet2DModel, DDPMScheduler
unet = UNet2DModel.from_pretrained(SR, subfolder="unet")
scheduler = DDPMScheduler.from_pretrained(SR, subfolder="scheduler")
out["sr_components"] = [type(unet).__name__, unet.config.in_channels, scheduler.config.num_train_timesteps]
try:
    DiffusionPipeline.from_pretrained(SR)
except Exception as e:
    out["sr_without"] = [type(e).__name__, str(e)]
out["hf_align_imported"] = "hf_align" in sys.modules
# trust_remote_code=True: the repo's one code file imports the installed hf-align, and says how to install it
sys.modules["hf_align"] = None  # as if hf-align were not installed
try:
    T.pipeline(model=VIT, trust_remote_code=True)
except ImportError as e:
    out["remote_missing"] = str(e)
del sys.modules["hf_align"]
remote = T.pipeline(model=VIT, trust_remote_code=True)
out["remote"] = [type(remote).__name__, remote(IMAGE, exit_layer=3)[0]["score"]]
import evaluate
rng = np.random.default_rng(0)
X = rng.normal(size=(20, 5)); Y = np.tanh(X @ rng.normal(size=(5, 3)))
out["cka"] = evaluate.load(CKA, "linear").compute(predictions=X.tolist(), references=Y.tolist())["cka"]
# the SR repo by id with trust: diffusers fetches and runs its pipeline.py, which imports the installed hf-align
sr = DiffusionPipeline.from_pretrained(SR, trust_remote_code=True)
sr.set_progress_bar_config(disable=True)
low = np.random.default_rng(0).random((1, 8, 8, 3)).astype(np.float32)
high = sr(low, num_inference_steps=3, generator=torch.Generator().manual_seed(3), output_type="np").images
out["sr_trusted"] = [type(sr).__module__, np.asarray(high).tolist()]
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow  # one fresh interpreter importing transformers, peft, diffusers and evaluate: ~10-25 s
def test_without_hf_align_in_a_fresh_interpreter(hub, tmp_path):
    """A user without `import hf_align`: plain transformers / PEFT / diffusers objects, and the metric by id."""
    image_path = tmp_path / "image.png"
    _image(1).save(image_path)
    header = (f"TEXT, VIT, LORA, SR, CKA = {TEXT!r}, {VIT!r}, {LORA!r}, {SR!r}, {CKA!r}\n"
              f"SENTENCE = {SENTENCES[3]!r}\nfrom PIL import Image\nIMAGE = Image.open({str(image_path)!r}).convert('RGB')\n")
    home = tmp_path / "home"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_HOME": str(home),
           "HF_HUB_CACHE": hub["cache"], "HF_EVALUATE_CACHE": str(hub["tmp"] / "evaluate"),
           "HF_MODULES_CACHE": str(home / "modules"), "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", header + textwrap.dedent(_WITHOUT_HF_ALIGN)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    # plain transformers models with the same numbers as the in-memory ones
    assert out["text"][0] == "BertForSequenceClassification"
    ref = hub["text_model"](**hub["tok"](SENTENCES[3], return_tensors="pt")).logits[0]
    np.testing.assert_allclose(out["text"][1], ref.detach().numpy(), atol=1e-5)
    assert out["vit"][0] == "ViTForImageClassification" and out["vit"][1].startswith("ViTImageProcessor")
    with torch.no_grad():
        ref = hub["vit"](**hub["processor"](images=_image(1), return_tensors="pt")).logits[0]
    np.testing.assert_allclose(out["vit"][2], ref.numpy(), atol=1e-5)
    assert out["lora"][0] == "BertForSequenceClassification"
    with torch.no_grad():
        ref = hub["lora_model"](**hub["tok"](SENTENCES[3], return_tensors="pt")).logits[0]
    np.testing.assert_allclose(out["lora"][1], ref.numpy(), atol=1e-5)
    assert out["sr_components"] == ["UNet2DModel", 6, 20]
    # what needs `import hf_align`: the registered task and the pipeline class (stated in the cards and docs)
    assert out["pipeline_without"] == "KeyError"
    # diffusers' own refusal before any code of the repo runs: its pipeline.py needs trust_remote_code
    assert out["sr_without"][0] == "ValueError" and "custom code in pipeline.py" in out["sr_without"][1]
    assert "trust_remote_code=True" in out["sr_without"][1]
    assert out["hf_align_imported"] is False
    assert "pip install hf-align" in out["remote_missing"]
    with torch.no_grad():
        probs = hub["vit"](**hub["processor"](images=_image(1), return_tensors="pt")).logits[0].softmax(-1)
    assert out["remote"][0] == "EarlyExitClassificationPipeline"
    assert out["remote"][1] == pytest.approx(float(probs.max()), abs=1e-5)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 5))
    Y = np.tanh(X @ rng.normal(size=(5, 3)))
    assert out["cka"] == pytest.approx(ref_linear_cka(X, Y), abs=1e-9)
    low = np.random.default_rng(0).random((1, 8, 8, 3)).astype(np.float32)
    ref = hub["sr"](low, num_inference_steps=3, generator=torch.Generator().manual_seed(3),
                    output_type="np").images
    assert out["sr_trusted"][0] == "hf_align.pipelines.super_resolution"
    np.testing.assert_allclose(np.asarray(out["sr_trusted"][1]), ref, atol=1e-5)


def test_import_registers_for_diffusers():
    import diffusers

    from hf_align.pipelines.super_resolution import SuperResolutionPipeline

    assert diffusers.SuperResolutionPipeline is SuperResolutionPipeline
    assert hf_align.SuperResolutionPipeline is SuperResolutionPipeline

"""What ``push_to_hub`` sends (files, card text, metadata), captured at the ``HfApi`` boundary as huggingface_hub's
own tests do (``HfApi.create_repo`` / ``upload_folder`` / ``create_commit`` patched); the cards' usage snippets run as
written against a Hub cache made of what was pushed; saving never mutates the live model or config."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
import transformers as T
from datasets import Dataset
from hub_cache import populate_hub_cache
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl

from hf_align import AlignedTrainer, AlignedTrainingArguments, EarlyExitModel, calibrate
from hf_align.data import train_wordpiece_tokenizer
from hf_align.hub import CARD_MARKER

SENTENCES = ["solve a linear system of equations", "compute the fast fourier transform of a signal",
             "fit a normal distribution to data", "minimise a scalar function of one variable",
             "interpolate a smooth spline", "the gamma function and its logarithm"]
L = 3


class FakeHub:
    """Records what reaches ``HfApi``; ``remote`` holds files already in the (fake) repos."""

    def __init__(self, tmp_path):
        self.repos: list[dict] = []
        self.uploads: list[dict] = []
        self.remote: dict[tuple[str, str], bytes] = {}
        self.tmp = tmp_path

    def last(self, repo_id: str) -> dict:
        return [u for u in self.uploads if u["repo_id"] == repo_id][-1]


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
    from huggingface_hub.utils import filter_repo_objects

    hub = FakeHub(tmp_path)

    def create_repo(self, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kwargs):
        hub.repos.append({"repo_id": repo_id, "private": private, "repo_type": repo_type, "exist_ok": exist_ok})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def _commit(repo_id, files, commit_message, commit_description, revision, create_pr):
        hub.remote.update({(repo_id, path): data for path, data in files.items()})
        hub.uploads.append({"repo_id": repo_id, "files": files, "commit_message": commit_message,
                            "commit_description": commit_description, "revision": revision, "create_pr": create_pr})
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{'a' * 40}",
                          commit_message=commit_message, commit_description=commit_description or "", oid="a" * 40)

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, commit_message=None, commit_description=None,
                      token=None, repo_type=None, revision=None, create_pr=None, allow_patterns=None,
                      ignore_patterns=None, delete_patterns=None, run_as_future=False):
        ignore = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        paths = sorted(os.path.relpath(os.path.join(d, f), folder_path).replace(os.sep, "/")
                       for d, _, names in os.walk(folder_path) for f in names)
        kept = filter_repo_objects(paths, allow_patterns=allow_patterns, ignore_patterns=ignore + DEFAULT_IGNORE_PATTERNS)
        files = {}
        for p in kept:
            with open(os.path.join(folder_path, p), "rb") as f:
                files[p] = f.read()
        return _commit(repo_id, files, commit_message, commit_description, revision, create_pr)

    def create_commit(self, repo_id, operations, *, commit_message, commit_description=None, token=None,
                      repo_type=None, revision=None, create_pr=None, **kwargs):
        files = {}
        for op in operations:
            src = op.path_or_fileobj
            if isinstance(src, (str, os.PathLike)):
                with open(src, "rb") as f:
                    files[op.path_in_repo] = f.read()
            else:
                files[op.path_in_repo] = src if isinstance(src, bytes) else src.read()
        return _commit(repo_id, files, commit_message, commit_description, revision, create_pr)

    def create_branch(self, repo_id, *, branch, exist_ok=False, **kwargs):
        hub.repos.append({"repo_id": repo_id, "branch": branch})

    def file_exists(self, repo_id, filename, *, repo_type=None, revision=None, token=None):
        return (repo_id, filename) in hub.remote

    def hf_hub_download(self, repo_id, filename, **kwargs):
        path = tmp_path / "remote" / repo_id / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(hub.remote[(repo_id, filename)])
        return str(path)

    for name, fn in [("create_repo", create_repo), ("upload_folder", upload_folder), ("create_commit", create_commit),
                     ("create_branch", create_branch), ("file_exists", file_exists),
                     ("hf_hub_download", hf_hub_download)]:
        monkeypatch.setattr(HfApi, name, fn)
    return hub


def card_of(upload) -> ModelCard:
    text = upload["files"]["README.md"].decode()
    assert CARD_MARKER in text
    return ModelCard(text)


def run_snippets(card: ModelCard, uploads, tmp_path, monkeypatch) -> str:
    """Put the pushed repos into a Hub cache and run the card's Python blocks exactly as written."""
    cache = tmp_path / "hub-cache"
    for upload in uploads:
        populate_hub_cache(cache, upload["repo_id"], upload["files"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    blocks = re.findall(r"```python\n(.*?)```", card.text, flags=re.S)
    assert blocks
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, "<model card>", "exec"), {"__name__": "__card__"})
    return out.getvalue()


@pytest.fixture(scope="module")
def text_model():
    tok = train_wordpiece_tokenizer(SENTENCES * 3, vocab_size=120)
    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=L, num_attention_heads=4,
                          intermediate_size=37, num_labels=3, pad_token_id=tok.pad_token_id,
                          id2label={0: "linalg", 1: "signal", 2: "stats"}, label2id={"linalg": 0, "signal": 1, "stats": 2})
    enc = tok(SENTENCES, padding="max_length", max_length=12, truncation=True)
    data = Dataset.from_dict({**enc, "labels": [i % 3 for i in range(len(SENTENCES))]}).with_format("torch")
    return T.BertForSequenceClassification(config).eval(), tok, data


def _aligned_args(out, **kw):
    return AlignedTrainingArguments(output_dir=str(out), report_to=[], disable_tqdm=True, save_strategy="no",
                                    per_device_train_batch_size=6, per_device_eval_batch_size=6, learning_rate=1e-2,
                                    seed=0, use_cpu=True, dataloader_num_workers=0, max_steps=1, **kw)


METADATA = dict(license="mit", language="en", datasets=["user/sentences"], base_model="user/tiny-bert",
                tags=["demo"])


def test_early_exit_model_push_sends_model_settings_curve_and_card(fake_hub, text_model):
    model, tok, data = text_model
    before = model.config.to_dict()
    ee = EarlyExitModel(model)
    curve = calibrate(ee, data, tolerance=0.5, progress=False)
    info = ee.push_to_hub("user/bert-exit", private=True, commit_message="first", **METADATA)
    assert info.oid == "a" * 40
    assert fake_hub.repos == [{"repo_id": "user/bert-exit", "private": True, "repo_type": "model", "exist_ok": True}]
    upload = fake_hub.last("user/bert-exit")
    assert set(upload["files"]) == {"config.json", "model.safetensors", "README.md", "exit_curve.png",
                                    "early_exit_classification.py"}
    assert upload["commit_message"] == "first"
    config = json.loads(upload["files"]["config.json"])
    assert config["early_exit"] == {"policy": "confidence", "threshold": curve.chosen, "patience": 2,
                                    "exit_layer": None, "min_layer": 1}
    assert list(config["custom_pipelines"]) == ["hf-align/early-exit-classification"]  # trust_remote_code users
    card = card_of(upload)
    assert (card.data.license, card.data.language, card.data.datasets, card.data.base_model) == (
        "mit", "en", ["user/sentences"], "user/tiny-bert")
    assert {"hf-align", "early-exit", "demo"} <= set(card.data.tags)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-classification"
    assert "**chosen**" in card.text and "![exit curve](exit_curve.png)" in card.text
    assert 'model="user/bert-exit"' in card.text
    assert "no tokenizer was saved" in card.text  # the bare model has none: the card says so
    # nothing changed on the live model
    assert model.config.to_dict() == before and not hasattr(model.config, "early_exit")
    # to a branch: created first, the commit goes there
    ee.push_to_hub("user/bert-exit", revision="dev", commit_description="details")
    assert fake_hub.repos[-1] == {"repo_id": "user/bert-exit", "branch": "dev"}
    assert (fake_hub.last("user/bert-exit")["revision"], fake_hub.last("user/bert-exit")["commit_description"]) == (
        "dev", "details")
    again = card_of(fake_hub.last("user/bert-exit"))  # the metadata of the card on the Hub is kept
    assert again.data.license == "mit" and again.data.datasets == ["user/sentences"] and "demo" in again.data.tags


def test_bad_metadata_fails_before_anything_is_sent(fake_hub, text_model, tmp_path):
    ee = EarlyExitModel(text_model[0])
    with pytest.raises(TypeError, match="tags must be a string or a list of strings"):
        ee.push_to_hub("user/x", tags=3)
    with pytest.raises(TypeError, match="license must be a string"):
        ee.save_pretrained(tmp_path / "x", license=["mit"])
    assert fake_hub.repos == [] and fake_hub.uploads == [] and not (tmp_path / "x").exists()


def test_pipeline_pushes_run_their_card_snippets(fake_hub, text_model, tmp_path, monkeypatch):
    model, tok, _ = text_model
    before = model.config.to_dict()
    clf = T.pipeline("early-exit-classification", model=model, tokenizer=tok, policy="patience", patience=2)
    clf.push_to_hub("user/text-exit", license="apache-2.0")
    text = fake_hub.last("user/text-exit")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(text["files"])
    assert [n for n in text["files"] if n.endswith(".py")] == ["early_exit_classification.py"]  # imports hf-align only
    assert model.config.to_dict() == before
    torch.manual_seed(0)
    vit = T.ViTForImageClassification(T.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                                  num_hidden_layers=L, num_attention_heads=4, intermediate_size=37,
                                                  num_labels=4)).eval()
    processor = T.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    T.pipeline("early-exit-classification", model=vit, image_processor=processor).push_to_hub("user/vit-exit")
    image = fake_hub.last("user/vit-exit")
    assert "preprocessor_config.json" in image["files"]
    text_card, image_card = card_of(text), card_of(image)
    assert text_card.data.license == "apache-2.0" and image_card.data.pipeline_tag == "image-classification"
    printed = run_snippets(text_card, fake_hub.uploads, tmp_path, monkeypatch)
    assert "'exit_layer'" in printed and "'num_layers': 3" in printed
    printed = run_snippets(image_card, fake_hub.uploads, tmp_path, monkeypatch)
    assert "'exit_layer'" in printed and "'num_layers': 3" in printed


def test_saving_never_mutates_and_later_saves_load_both_ways(text_model, tmp_path):
    model, tok, _ = text_model
    model.config.custom_pipelines = {"early-exit-classification": {"impl": "early_exit_classification.X"}}  # old hf-align
    try:
        before = model.config.to_dict()
        clf = T.pipeline("early-exit-classification", model=model, tokenizer=tok, threshold=0.4)
        clf.save_pretrained(tmp_path / "pipe")
        EarlyExitModel(model, policy="fixed", exit_layer=2).save_pretrained(tmp_path / "ee")
        assert model.config.to_dict() == before and not hasattr(model.config, "early_exit")
        saved = json.loads((tmp_path / "pipe" / "config.json").read_text())
        assert list(saved["custom_pipelines"]) == ["hf-align/early-exit-classification"]  # the old entry is dropped
        assert saved["early_exit"]["threshold"] == 0.4
    finally:
        del model.config.custom_pipelines
    # a later plain save of the same model loads with the registered task (no trust_remote_code) and plainly
    model.save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    again = T.pipeline("early-exit-classification", model=str(tmp_path / "plain"))
    with torch.no_grad():
        ref = model(**tok(SENTENCES[0], return_tensors="pt")).logits[0].softmax(-1)
    assert again(SENTENCES[0], policy="fixed", exit_layer=L)[0]["score"] == pytest.approx(float(ref.max()), abs=1e-5)
    assert type(T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain")) is T.BertForSequenceClassification
    # the early-exit folders reload with their settings, with no extra arguments
    assert T.pipeline("early-exit-classification", model=str(tmp_path / "pipe")).early_exit.settings.threshold == 0.4
    assert EarlyExitModel.from_pretrained(tmp_path / "ee").settings.exit_layer == 2


def test_aligned_trainer_push_card_and_metadata(fake_hub, text_model, tmp_path):
    model, tok, data = text_model
    torch.manual_seed(0)
    fresh = T.BertForSequenceClassification(model.config).eval()
    trainer = AlignedTrainer(model=fresh, args=_aligned_args(tmp_path / "out", hub_model_id="user/aligned-bert"),
                             train_dataset=data, eval_dataset=data, processing_class=tok)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.push_to_hub(license="mit", language="en", dataset="user/sentences", finetuned_from="user/tiny-bert",
                        tags=["demo"])
    upload = fake_hub.last("user/aligned-bert")
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "layer_accuracy.png"} <= set(upload["files"])
    card = card_of(upload)
    assert (card.data.license, card.data.language, card.data.datasets, card.data.base_model) == (
        "mit", "en", ["user/sentences"], "user/tiny-bert")
    assert {"hf-align", "aligned-training", "demo"} <= set(card.data.tags)
    for layer in range(1, L + 1):
        assert f"| {layer} | {100 * metrics[f'eval_layer_{layer}_accuracy']:.2f}% |" in card.text
    assert 'model="user/aligned-bert"' in card.text
    # the metadata is kept by a later save (the card is regenerated with the newest results)
    trainer.save_model()
    kept = ModelCard.load(tmp_path / "out" / "README.md")
    assert kept.data.license == "mit" and kept.data.datasets == ["user/sentences"]


@pytest.mark.slow  # a second trainer; the adapter's card is also checked by test_hub_loading
def test_peft_adapter_gets_hf_align_card(fake_hub, text_model, tmp_path):
    peft = pytest.importorskip("peft")
    model, tok, data = text_model
    torch.manual_seed(0)
    base = T.BertForSequenceClassification(model.config)
    base.config._name_or_path = base.name_or_path = "user/tiny-bert"  # as if loaded from the Hub
    lora = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    trainer = AlignedTrainer(model=lora, args=_aligned_args(tmp_path / "lora", hub_model_id="user/bert-lora"),
                             train_dataset=data, eval_dataset=data)
    trainer.train()
    trainer.evaluate()
    trainer.push_to_hub(license="mit")
    upload = fake_hub.last("user/bert-lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(upload["files"])
    assert "model.safetensors" not in upload["files"]
    card = card_of(upload)
    assert card.data.library_name == "peft" and card.data.base_model == "user/tiny-bert"
    assert card.data.license == "mit" and "aligned-training" in card.data.tags
    assert "| 3 |" in card.text and "AutoPeftModelForSequenceClassification" in card.text
    assert "Provide a quick summary" not in card.text  # PEFT's template was replaced


@pytest.fixture
def flush_denormals():
    """The 1-step tiny UNet's sampling runs into float32 denormals, which are ~100x slower on CPU."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.mark.slow  # DREAMTrainer + sampling through the card's snippet
def test_dream_trainer_push_and_sr_snippet(fake_hub, tmp_path, monkeypatch, flush_denormals):
    import datasets
    from skimage import data as skdata

    from hf_align.diffusion import sr_unet
    from hf_align.trainers.dream_config import DREAMTrainingArguments
    from hf_align.trainers.dream_trainer import DREAMTrainer

    photo = skdata.astronaut()
    ds = datasets.Dataset.from_dict({"image": [photo[40:56, 60:76], photo[100:116, 100:116]]},
                                    features=datasets.Features({"image": datasets.Image()}))
    args = DREAMTrainingArguments(output_dir=str(tmp_path / "sr"), max_steps=1, per_device_train_batch_size=2,
                                  learning_rate=1e-3, report_to=[], save_strategy="no", crop_size=16, scale_factor=2,
                                  use_cpu=True, num_train_timesteps=20, disable_tqdm=True, seed=0,
                                  hub_model_id="user/sr-dream")
    torch.manual_seed(0)
    trainer = DREAMTrainer(model=sr_unet(block_out_channels=(8, 16), norm_num_groups=4), args=args, train_dataset=ds)
    trainer.train()
    trainer.push_to_hub(license="cc-by-4.0", dataset="user/photos")
    upload = fake_hub.last("user/sr-dream")
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json", "README.md", "pipeline.py"} <= set(upload["files"])
    assert json.loads(upload["files"]["model_index.json"])["_class_name"] == ["pipeline", "SuperResolutionPipeline"]
    card = card_of(upload)
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "image-to-image"
    assert card.data.license == "cc-by-4.0" and card.data.datasets == ["user/photos"]
    assert {"dream", "super-resolution"} <= set(card.data.tags) and "dream_detail_preservation" in card.text
    assert 'DiffusionPipeline.from_pretrained("user/sr-dream")' in card.text
    assert "(16, 16)" in run_snippets(card, [upload], tmp_path, monkeypatch)  # 8x8 in, x2 out


def test_sr_pipeline_push_keeps_users_readme(fake_hub, tmp_path):
    from diffusers import DDPMScheduler

    from hf_align.diffusion import sr_unet
    from hf_align.pipelines.super_resolution import SuperResolutionPipeline

    torch.manual_seed(0)
    pipe = SuperResolutionPipeline(sr_unet(block_out_channels=(8, 16), norm_num_groups=4),
                                   DDPMScheduler(num_train_timesteps=20), scale_factor=2)
    fake_hub.remote[("user/sr", "README.md")] = b"# my own card\n"
    pipe.push_to_hub("user/sr", license="mit")
    assert "README.md" not in fake_hub.last("user/sr")["files"]  # the user's card on the Hub stays
    assert "model_index.json" in fake_hub.last("user/sr")["files"]
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "README.md").write_text("my notes")
    pipe.save_pretrained(tmp_path / "local")
    assert (tmp_path / "local" / "README.md").read_text() == "my notes"
    # hf-align's own card is regenerated, and the user metadata it had is kept
    pipe.save_pretrained(tmp_path / "ours", license="mit", tags=["x"])
    pipe.save_pretrained(tmp_path / "ours")
    card = ModelCard.load(tmp_path / "ours" / "README.md")
    assert card.data.license == "mit" and "x" in card.data.tags


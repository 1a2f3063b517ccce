"""Early exit with the model's own (shared) head: stop at the first block that is sure; skip the rest.

:class:`EarlyExitModel` wraps a supported transformers classifier (or a :class:`MultiExitModel`) without
copying or changing it. Blocks run one at a time with the exact arguments the model prepared (see
:class:`~hf_align.LayerView`); after block l the head gives ``logits_l`` and the exit policy decides, per
sample, whether to stop. Samples that stop leave the batch, so the remaining blocks run on fewer rows, and
blocks after the last sample's exit never run.

Exit policies (``p_l = softmax(logits_l)``):

* ``confidence``: exit when ``max_c p_l[c] >= threshold`` (threshold in (0, 1]);
* ``entropy`` (DeeBERT): exit when ``H(p_l) = -sum_c p_l[c] log p_l[c] <= threshold`` (nats, >= 0);
* ``patience`` (PABEE): exit when ``argmax logits_l`` has been the same for ``patience`` consecutive blocks
  (the current block included), i.e. unchanged ``patience - 1`` times;
* ``fixed``: exit at block ``exit_layer``;

never before ``min_layer``, always at block L. The model's default settings are saved in ``config.early_exit`` (a
plain dict), so ``save_pretrained`` keeps them and the saved model still loads as a plain transformers classifier.
Settings given to a call (``model(**batch, threshold=0.5)``) apply to that call only.

The forward always runs in eval mode (dropout off), also when the wrapped model was left in ``train()``
mode; every module's own train/eval flag is restored afterwards.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from ..layers import LayerView, eval_mode

__all__ = ["EarlyExitConfig", "EarlyExitModel", "EarlyExitOutput", "POLICIES", "PickledWeightsError",
           "refuse_pickled_weights"]

POLICIES = ("confidence", "entropy", "patience", "fixed")
_SETTING_NAMES = ("policy", "threshold", "patience", "exit_layer", "min_layer")  # the fields of EarlyExitConfig
# other transformers `from_pretrained` options EarlyExitModel.from_pretrained passes on
_LOAD_KWARGS = ("attn_implementation", "force_download", "proxies", "variant", "max_memory", "offload_folder",
                "quantization_config")


_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".bin.index.json")


class PickledWeightsError(Exception):
    """A folder or Hub repo whose weights exist only in a pickled format (``pytorch_model.bin``, ...).

    hf-align loads safetensors weights only. Deliberately not an ``OSError`` / ``ValueError``: transformers'
    pipeline loader catches those and retries with the class named in ``config.architectures``, which would read
    the pickle; this error stops ``pipeline(...)`` before any weight file is opened."""


def _weight_files(path, *, revision=None, token=None, cache_dir=None, local_files_only=False,
                  subfolder: str = "") -> list[str] | None:
    """The weight-like file names of a local folder or Hub repo (in ``subfolder``), or None when unknown.

    Offline (``HF_HUB_OFFLINE`` or ``local_files_only``) a Hub repo is looked up in the local cache only."""
    path = os.fspath(path)
    if os.path.isdir(path):
        folder = os.path.join(path, subfolder)
        return sorted(os.listdir(folder)) if os.path.isdir(folder) else None
    from huggingface_hub import constants, try_to_load_from_cache

    names = ["model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
             "pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin"]
    if local_files_only or constants.HF_HUB_OFFLINE:
        prefix = f"{subfolder}/" if subfolder else ""
        found = [n for n in names if isinstance(try_to_load_from_cache(path, prefix + n, cache_dir=cache_dir,
                                                                       revision=revision), str)]
        return found or None
    try:
        from huggingface_hub import list_repo_files

        files = list_repo_files(path, revision=revision, token=token)
    except Exception:  # noqa: BLE001 - unknown (no network, no such repo): the loader reports it
        return None
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    return sorted(f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):])


def refuse_pickled_weights(path, **hub: Any) -> None:
    """Raise :class:`PickledWeightsError` when ``path`` (folder or Hub repo) has pickled weights and no safetensors.

    Only file names are looked at (``hub``: ``revision``, ``token``, ``cache_dir``, ``local_files_only``,
    ``subfolder``); nothing is downloaded or unpickled."""
    files = _weight_files(path, **{k: v for k, v in hub.items() if v is not None})
    if not files or any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files):
        return
    pickled = [f for f in files if f.endswith(_PICKLED)]
    if pickled:
        raise PickledWeightsError(
            f"{os.fspath(path)} holds only pickled weights ({', '.join(pickled)}) and no safetensors file; hf-align "
            "loads safetensors weights only and reads no pickle. Where you trust the file, convert it once with "
            "transformers (AutoModelForSequenceClassification.from_pretrained(path).save_pretrained(new_folder) "
            "writes model.safetensors) and load new_folder.")


@dataclass
class EarlyExitConfig:
    """Exit settings (stored as ``config.early_exit``)."""

    policy: str = "confidence"
    threshold: float | None = 0.9
    patience: int = 2
    exit_layer: int | None = None
    min_layer: int = 1

    def validate(self, num_layers: int) -> EarlyExitConfig:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown exit policy {self.policy!r}; expected one of {POLICIES}")
        if self.threshold is not None and (isinstance(self.threshold, bool) or not isinstance(self.threshold, numbers.Real)):
            raise TypeError(f"threshold must be a number (e.g. 0.9), got {type(self.threshold).__name__} {self.threshold!r}")
        if self.policy == "confidence":
            if self.threshold is None or not (0 < float(self.threshold) <= 1):
                raise ValueError(f"confidence threshold must be in (0, 1], got {self.threshold!r}")
        if self.policy == "entropy":
            if self.threshold is None or not (0 <= float(self.threshold) < math.inf):
                raise ValueError(f"entropy threshold must be a finite number >= 0 (nats), got {self.threshold!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:  # True is no count
            raise ValueError(f"patience must be an integer >= 1, got {self.patience!r}")
        if self.policy == "fixed" and (isinstance(self.exit_layer, bool) or not isinstance(self.exit_layer, int) or not 1 <= self.exit_layer <= num_layers):
            raise ValueError(f"exit_layer must be an integer in [1, {num_layers}] for the fixed policy, got {self.exit_layer!r}")
        if isinstance(self.min_layer, bool) or not isinstance(self.min_layer, int) or not 1 <= self.min_layer <= num_layers:
            raise ValueError(f"min_layer must be an integer in [1, {num_layers}], got {self.min_layer!r}")
        return self

    @classmethod
    def from_dict(cls, data: dict | None) -> EarlyExitConfig:
        data = dict(data or {})
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown early-exit settings {sorted(unknown)}; expected {[f.name for f in fields(cls)]}")
        return cls(**data)


@dataclass
class EarlyExitOutput(ModelOutput):
    """``logits`` (B, C) at each sample's exit; ``exit_layers`` (B,) 1-based; ``layer_logits``: per sample, the
    (exit_layer, C) logits of every block it ran (only with ``output_layer_logits=True``)."""

    logits: torch.Tensor | None = None
    exit_layers: torch.Tensor | None = None
    layer_logits: list[torch.Tensor] | None = None


def _exit_mask(settings: EarlyExitConfig, logits: torch.Tensor, layer: int, streak: torch.Tensor) -> torch.Tensor:
    """Which rows stop after this block (before ``min_layer`` and the last-block rule)."""
    if settings.policy == "fixed":
        return torch.full((logits.shape[0],), layer >= settings.exit_layer, dtype=torch.bool, device=logits.device)
    if settings.policy == "patience":
        return streak >= settings.patience
    probs = logits.float().softmax(-1)
    if settings.policy == "confidence":
        return probs.max(-1).values >= settings.threshold
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    return entropy <= settings.threshold


class EarlyExitModel(nn.Module):
    """Early exit for any supported transformers classifier with one shared head (or a multi-exit model).

    Args:
        model: a ``*ForSequenceClassification`` / ``*ForImageClassification`` model of a supported family, a
            PEFT-wrapped one, or a :class:`~hf_align.modeling.MultiExitModel`. Not copied or modified.
        policy, threshold, patience, exit_layer, min_layer: see the module docstring; defaults come from
            ``model.config.early_exit`` when present.
    """

    def __init__(self, model: nn.Module, **settings: Any):
        super().__init__()
        view = LayerView(model)
        if view.task not in ("sequence-classification", "image-classification"):
            raise ValueError(f"early exit is for classifiers; {type(view.hf_model).__name__} is a {view.task} model")
        self.model = model
        self.view = view
        stored = getattr(self.config, "early_exit", None) or {}
        self.settings = EarlyExitConfig.from_dict({**stored, **settings}).validate(view.num_layers)
        self.calibration = None  # the ExitCurve of the last `calibrate` (shown in the model card)

    # -- construction / saving -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, dtype=None, revision: str | None = None,
                        token: str | bool | None = None, cache_dir=None, device_map=None,
                        local_files_only: bool = False, subfolder: str = "", **kwargs: Any) -> EarlyExitModel:
        """Load a saved classifier (local folder or Hub repo id; safetensors only, no remote code) and wrap it.

        A folder or repo with only pickled weights (``pytorch_model.bin``) raises :class:`PickledWeightsError`
        before anything is read, as ``pipeline("early-exit-classification", model=...)`` does.

        ``dtype``, ``revision``, ``token``, ``cache_dir``, ``device_map``, ``local_files_only`` and ``subfolder`` are
        passed to transformers' ``from_pretrained``; the exit settings (``policy``, ``threshold``, ``patience``,
        ``exit_layer``, ``min_layer``) override the saved ``config.early_exit``; ``attn_implementation``,
        ``force_download``, ``proxies``, ``variant``, ``max_memory``, ``offload_folder``, ``quantization_config`` go to
        the model's ``from_pretrained`` too. A PEFT adapter folder/repo loads its base model with the adapter applied.
        """
        from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification
        from transformers.utils import find_adapter_config_file

        from .multi_exit import register_auto_classes

        register_auto_classes()
        names = {f.name for f in fields(EarlyExitConfig)}
        settings = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        unknown = sorted(set(kwargs) - set(_LOAD_KWARGS))
        if unknown:  # fail before any download or loading
            raise ValueError(f"unknown argument(s) {unknown} to EarlyExitModel.from_pretrained; exit settings are "
                             f"{sorted(names)}, loading options dtype, revision, token, cache_dir, device_map, "
                             f"local_files_only, subfolder, {', '.join(_LOAD_KWARGS)}")
        hub = {"revision": revision, "token": token, "cache_dir": cache_dir, "local_files_only": local_files_only,
               "subfolder": subfolder}
        path = pretrained_model_name_or_path
        refuse_pickled_weights(path, **hub)  # before any config or weight is read
        config_source = path
        adapter = find_adapter_config_file(path, **hub)
        if adapter is not None and not os.path.isfile(os.path.join(os.fspath(path), subfolder, "config.json")):
            with open(adapter, encoding="utf-8") as f:
                config_source = json.load(f)["base_model_name_or_path"]
            config = AutoConfig.from_pretrained(config_source, trust_remote_code=False, token=token,
                                                cache_dir=cache_dir, local_files_only=local_files_only)
        else:
            config = AutoConfig.from_pretrained(path, trust_remote_code=False, **hub)
        for auto in (AutoModelForSequenceClassification, AutoModelForImageClassification):
            if type(config) in auto._model_mapping:
                model = auto.from_pretrained(path, use_safetensors=True, trust_remote_code=False, dtype=dtype,
                                             device_map=device_map, **hub, **kwargs)
                break
        else:
            raise ValueError(f"{path}: {type(config).__name__} is not a sequence or image classifier config")
        return cls(model.eval(), **settings)

    @property
    def config(self):
        return getattr(self.model, "config", None) or self.view.hf_model.config

    @property
    def num_layers(self) -> int:
        return self.view.num_layers

    def set_exit(self, **settings: Any) -> EarlyExitModel:
        """Change the exit settings (validated first: on error nothing changes)."""
        self.settings = EarlyExitConfig.from_dict({**asdict(self.settings), **settings}).validate(self.num_layers)
        return self

    @contextlib.contextmanager
    def _settings_in_config(self):
        """``config.early_exit`` = the current settings and ``config.custom_pipelines`` = the trust_remote_code entry
        (see :data:`hf_align.hub.REMOTE_TASK`) while saving; the live config is
        restored afterwards. An entry named "early-exit-classification" (written by hf-align 0.1) is dropped: it
        would make transformers demand ``trust_remote_code`` instead of using the registered task."""
        from ..hub import remote_pipeline_entry

        configs = [self.config]
        if self.view.hf_model.config is not self.config:
            configs.append(self.view.hf_model.config)
        saved = [(c, dict(c.__dict__)) for c in configs]
        try:
            for c in configs:
                c.early_exit = asdict(self.settings)
                custom = getattr(c, "custom_pipelines", None)
                custom = {k: v for k, v in (custom or {}).items() if k != "early-exit-classification"}
                c.custom_pipelines = {**custom, **remote_pipeline_entry()}
            yield
        finally:
            for c, state in saved:
                c.__dict__.clear()
                c.__dict__.update(state)

    def save_pretrained(self, save_directory, *, model_card: bool = True, card_data=None, license: str | None = None,
                        language=None, datasets=None, base_model=None, tags=None, **kwargs) -> None:
        """Save the wrapped model with the exit settings in ``config.early_exit`` and a model card (README.md).

        The folder is a plain transformers model (``AutoModelFor...Classification.from_pretrained`` loads it without
        hf-align; ``pipeline("early-exit-classification", model=folder)`` with it, and
        ``pipeline(model=folder, trust_remote_code=True)`` without importing it: the one code file written only
        imports the installed hf-align). The live model and config are not changed. Card metadata: ``card_data`` (a ``huggingface_hub.ModelCardData`` or dict) and/or
        ``license``, ``language``, ``datasets``, ``base_model``, ``tags``; kept by later saves. A README.md the user
        wrote is never overwritten. Other keywords go to the model's ``save_pretrained``.
        """
        from ..hub import early_exit_card, user_metadata

        repo = kwargs.pop("_card_repo", None)
        metadata = user_metadata(card_data, license=license, language=language, datasets=datasets,
                                 base_model=base_model, tags=tags)  # bad metadata fails before anything is written
        if os.path.isfile(os.fspath(save_directory)):
            raise ValueError(f"save_directory must be a directory, got the file {os.fspath(save_directory)!r}")
        from ..hub import write_remote_code

        with self._settings_in_config():
            self.model.save_pretrained(save_directory, **kwargs)
        write_remote_code(save_directory)
        if model_card:
            early_exit_card(save_directory, self, metadata=metadata, repo=repo, calibration=self.calibration)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: str | bool | None = None, revision: str | None = None,
                    create_pr: bool = False, max_shard_size: int | str | None = "50GB", **card_metadata) -> Any:
        """Push the model (``config.early_exit`` included) and its model card to ``repo_id`` in one commit.

        ``card_metadata``: ``card_data``, ``license``, ``language``, ``datasets``, ``base_model``, ``tags`` as in
        :meth:`save_pretrained`. Returns the ``CommitInfo``."""
        from ..hub import push_to_hub

        return push_to_hub(self, repo_id, default_message="Upload early-exit model", save_kwargs={"max_shard_size": max_shard_size},
                           commit_message=commit_message, commit_description=commit_description, private=private,
                           token=token, revision=revision, create_pr=create_pr, **card_metadata)

    # -- inference -------------------------------------------------------------------------------------

    def exit_settings(self, **overrides: Any) -> EarlyExitConfig:
        """This model's settings with ``overrides`` (``policy``, ``threshold``, ``patience``, ``exit_layer``,
        ``min_layer``) applied, validated; the model is not changed."""
        if not overrides:
            return self.settings
        return EarlyExitConfig.from_dict({**asdict(self.settings), **overrides}).validate(self.num_layers)

    @torch.no_grad()
    def forward(self, output_layer_logits: bool = False, **inputs: Any) -> EarlyExitOutput:
        """Run blocks until every sample has exited; rows that exit leave the batch. Eval mode while running
        (the model's own train/eval flags are restored after).

        Exit settings given here (``model(**batch, threshold=0.5)``) apply to this call only: they are call
        arguments, never written to the model, so one model can serve concurrent calls with different settings.
        """
        settings = self.exit_settings(**{k: inputs.pop(k) for k in _SETTING_NAMES if k in inputs})
        with eval_mode(self.model):
            return self._forward(output_layer_logits, settings, **inputs)

    def _forward(self, output_layer_logits: bool, settings: EarlyExitConfig, **inputs: Any) -> EarlyExitOutput:
        view, L = self.view, self.num_layers
        state = view.prepare(**inputs)
        batch = state.batch_size
        device = state.hidden.device
        rows = torch.arange(batch, device=device)  # original row of each row still running
        final_logits: torch.Tensor | None = None
        exit_layers = torch.full((batch,), L, dtype=torch.long, device=device)
        history: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        patience = settings.policy == "patience"
        previous = torch.full((batch,), -1, dtype=torch.long, device=device) if patience else None
        streak = torch.zeros(batch, dtype=torch.long, device=device) if patience else None
        # the first block after which anyone may exit: no head is needed before it (unless asked for)
        first = max(settings.min_layer, settings.exit_layer if settings.policy == "fixed" else 1)
        for layer in range(1, L + 1):
            state = view.run_block(state)
            if layer < first and not (output_layer_logits or patience):
                continue
            logits = view.head(state.hidden, state.context, layer=layer)
            if final_logits is None:
                final_logits = logits.new_empty((batch, logits.shape[-1]))
            if output_layer_logits:
                for i, row in enumerate(rows.tolist()):
                    history[row].append(logits[i])
            if patience:
                prediction = logits.argmax(-1)
                streak = torch.where(prediction == previous, streak + 1, torch.ones_like(streak))
                previous = prediction
            if layer == L:
                final_logits[rows] = logits
                exit_layers[rows] = L
                break
            if layer < first:
                continue
            done = _exit_mask(settings, logits, layer, streak)
            n_done = int(done.sum())  # one synchronisation per block
            if n_done == 0:
                continue
            if n_done == done.shape[0]:  # everyone still running exits here
                final_logits[rows] = logits
                exit_layers[rows] = layer
                break
            final_logits[rows[done]] = logits[done]
            exit_layers[rows[done]] = layer
            index = (~done).nonzero().squeeze(1)
            state, rows = state.select(index), rows[index]
            if patience:
                previous, streak = previous[index], streak[index]
        layer_logits = [torch.stack(h) for h in history] if output_layer_logits else None
        return EarlyExitOutput(logits=final_logits, exit_layers=exit_layers, layer_logits=layer_logits)

    def __repr__(self) -> str:
        return f"EarlyExitModel({type(self.view.hf_model).__name__}, num_layers={self.num_layers}, settings={self.settings})"

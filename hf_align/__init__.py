"""hf-align: make a transformer's layers first-class on the Hugging Face stack.

Importing the package is cheap (no torch, no transformers pipelines, no diffusers): every public name and
subpackage is imported on first use (PEP 562), and the registrations wait for the module they register into
(:mod:`hf_align._registration`): ``pipeline("early-exit-classification")`` once ``transformers.pipelines`` is
imported, the multi-exit Auto classes once transformers' Auto classes (or ``modeling_utils``) are, and ``SuperResolutionPipeline`` for
``diffusers.DiffusionPipeline.from_pretrained`` once ``diffusers`` is.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._lazy import lazy_exports  # noqa: E402
from ._registration import AUTO_CLASSES, DIFFUSERS, PIPELINES, when_imported  # noqa: E402

_LAZY = {
    # the layer view and the family registry
    **{name: ".layers" for name in ("LayerView", "register_family", "supported_families")},
    # early exit for classifiers (modeling/), the pipeline, aligned training
    **{name: ".modeling" for name in ("EarlyExitModel", "MultiExitConfig", "MultiExitModel", "add_exit_heads",
                                      "calibrate", "exit_curve")},
    "EarlyExitClassificationPipeline": ".pipelines.early_exit_classification",
    "AlignedTrainer": ".trainers.aligned_trainer",
    "AlignedTrainingArguments": ".trainers.aligned_config",
    # layer-wise similarity (analysis/)
    **{name: ".analysis" for name in ("LayerSimilarity", "SimilarityUndefinedError", "cosine", "debiased_linear_cka",
                                      "hsic1", "layer_similarity", "linear_cka", "minibatch_cka", "rank_correlation",
                                      "rbf_cka")},
    # neural collapse
    **{name: ".analysis.collapse" for name in ("ClassStatistics", "collapse_metrics", "collapse_report", "gnc2",
                                               "plot_collapse_progression")},
    # self-speculative decoding (generation/)
    **{name: ".generation" for name in ("SpeculativeStats", "choose_exit_layer", "self_speculative", "speculative_generate")},
    # DREAM and super-resolution (diffusers)
    "dream_rectify": ".diffusion",
    "sr_unet": ".diffusion",
    "SuperResolutionPipeline": ".pipelines.super_resolution",
    "DREAMTrainer": ".trainers.dream_trainer",
    "DREAMTrainingArguments": ".trainers.dream_config",
    # decoders: per-token early exit (CALM) and the cost of each exit depth
    **{name: ".generation" for name in ("ExitCostTable", "PerTokenEarlyExit", "early_exit_generate", "exit_costs",
                                        "per_token_exit", "plot_exit_costs")},
    # the measured speed-up of self-speculative decoding per (exit layer, draft count)
    **{name: ".generation" for name in ("SpeculativeProfile", "speculative_profile")},
}
_SUBPACKAGES = ("analysis", "cli", "data", "diffusion", "families", "generation", "hub", "layers", "metrics",
                "modeling", "pipelines", "trainers")

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals(), submodules=_SUBPACKAGES)


# -- registrations (each runs once the module it registers into is imported; at once if it already is) ----------


def _call(module: str, function: str) -> None:
    """``module.function()``; when ``module`` is itself being imported right now (it imported the module that
    triggered this), it has no ``function`` yet and registers itself at its own end instead (``when_imported`` at
    the bottom of the module)."""
    import importlib

    target = getattr(importlib.import_module(module, __name__), function, None)
    if target is not None:
        target()


def _register_auto_classes() -> None:  # AutoConfig / AutoModelFor...Classification know the multi-exit model
    _call(".modeling.multi_exit", "register_auto_classes")


def _register_pipeline() -> None:  # pipeline("early-exit-classification")
    _register_auto_classes()  # a multi-exit folder loads through the pipeline too
    _call(".pipelines.early_exit_classification", "register_pipeline")


def _register_diffusers_pipeline() -> None:  # DiffusionPipeline.from_pretrained(<SR folder or repo id>)
    _call(".pipelines.super_resolution", "register_diffusers_pipeline")


when_imported(AUTO_CLASSES, _register_auto_classes)  # before any model module: AutoConfig.from_pretrained needs it
when_imported(PIPELINES, _register_pipeline)
when_imported(DIFFUSERS, _register_diffusers_pipeline)


__all__ = [*sorted(_LAZY), "__version__"]

"""The arguments of the ``hf-align`` commands: ``HfArgumentParser`` dataclasses (every field is an option, its
``help`` metadata the text of ``--help``). ``train`` takes every ``TrainingArguments`` / ``AlignedTrainingArguments``
field."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..trainers.aligned_config import LAYER_WEIGHT_SCHEMES, AlignedTrainingArguments

EMBEDDED_LM = ("embedded:python-docs",)  # text for causal LMs (CPython's pydoc_data topics)
EMBEDDED = ("embedded:digits", "embedded:scipy-docs", *EMBEDDED_LM)
TASKS = ("auto", "causal-lm", "classification")

__all__ = ["EMBEDDED", "EMBEDDED_LM", "TASKS", "AlignedTrainingCLIArguments", "AnalyzeArguments", "DataArguments",
           "DemoArguments", "EvaluateArguments", "LayersArguments", "ModelArguments", "SpeculativeProfileArguments"]


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A local model folder (safetensors weights, config.json, and its tokenizer or image "
                  "processor) or a Hub repo id; no remote code is run. A checkpoint without a classification head "
                  "gets AutoModelFor{Sequence,Image}Classification with num_labels from the data. May be omitted "
                  "with an embedded dataset: a fresh tiny model made for it is used (and named in the output). A causal-LM "
                  "checkpoint (its config's architectures is a *ForCausalLM / *LMHeadModel class) keeps its LM head and "
                  "trains / evaluates on packed text blocks (see --task)."},
    )
    task: str = field(
        default="auto",
        metadata={"help": f"One of {', '.join(TASKS)}. auto: causal-lm when the checkpoint's config names a causal-LM "
                  "class (or, without --model_name_or_path, for embedded:python-docs), else classification. causal-lm: "
                  "next-token prediction on --block_size token blocks of the --text_column, the LM head kept (a base "
                  "checkpoint gets AutoModelForCausalLM's head); classification: the classifier path (a label column)."},
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Hub cache folder (default: the HF cache)."})

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {list(TASKS)}, got {self.task!r}")

    def hub_kwargs(self) -> dict:
        return {"revision": self.revision, "cache_dir": self.cache_dir, "trust_remote_code": False}


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A Hub dataset id, a local folder (csv/json/parquet files, .txt files for causal LMs, or an "
                  "image folder), a local file (.csv, .tsv, .json, .jsonl, .parquet; .txt for causal LMs: one document "
                  f"per line, blank lines skipped), or an embedded dataset: {', '.join(EMBEDDED)}."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(
        default="test",
        metadata={"help": "Split to evaluate / analyze. For training, when the dataset has no such split, "
                  "--eval_split_size of the train split is held out instead (seeded, stratified)."},
    )
    eval_split_size: float = field(
        default=0.1, metadata={"help": "Fraction of the train split held out for evaluation when there is no test split."}
    )
    text_column: str = field(default="text", metadata={"help": "Text column (text models; for causal LMs the documents "
                                                       "to pack; a .txt file's lines are this column)."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text column for sentence pairs."})
    image_column: str = field(default="image", metadata={"help": "Image column (image models)."})
    label_column: str = field(default="label", metadata={"help": "Label column: integer class ids, a ClassLabel, or strings."})
    max_length: int = field(default=128, metadata={"help": "Tokenizer truncation length (text models)."})
    block_size: int = field(default=128, metadata={"help": "Causal LMs: tokens per training / evaluation block (the "
                                                   "documents are tokenized, joined with EOS and cut into blocks of this "
                                                   "many tokens; the tail is dropped). At most the model's positions."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use a seeded random subset of N training "
                                                                   "examples (documents, for causal LMs, before packing)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use a seeded random subset of N evaluation "
                                                                  "examples (documents, for causal LMs, before packing)."})


@dataclass
class AlignedTrainingCLIArguments(AlignedTrainingArguments):
    """``AlignedTrainingArguments`` with ``layer_weights`` readable from the command line:
    ``--layer_weights linear`` or ``--layer_weights 0.1 0.3 0.6`` (one number per block)."""

    layer_weights: list[str] = field(
        default_factory=lambda: ["linear"],
        metadata={"help": f"Per-layer loss weights: one of {', '.join(LAYER_WEIGHT_SCHEMES)} ('linear' = 2l/(L(L+1)), "
                  "the paper's default; 'last' = standard training), or L non-negative numbers, one per block."},
    )

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("--output_dir is required (where the trained model, its processor and card are saved)")
        weights = self.layer_weights
        if isinstance(weights, (list, tuple)):
            if len(weights) == 1 and str(weights[0]) in LAYER_WEIGHT_SCHEMES:
                self.layer_weights = str(weights[0])
            else:
                try:
                    self.layer_weights = [float(w) for w in weights]
                except ValueError:
                    raise ValueError(f"--layer_weights expects one of {LAYER_WEIGHT_SCHEMES} or one number per block, "
                                     f"got {' '.join(map(str, weights))}") from None
        super().__post_init__()


@dataclass
class SpeculativeProfileArguments:
    """Causal LMs: the measured speed-up of self-speculative decoding (``hf_align.speculative_profile``)."""

    speculative_profile: bool = field(
        default=True,
        metadata={"help": "Causal LMs: time generate with custom_generate=self_speculative at every exit layer k and "
                  "--draft_counts n against plain generate, on prompts cut from the evaluation blocks, and report the "
                  "recommended (k, n) (train: stored on the trainer for the model card). false skips it."},
    )
    draft_counts: list[int] = field(default_factory=lambda: [1, 2, 4],
                                    metadata={"help": "Draft counts n of the speculative profile."})
    profile_prompts: int = field(default=4, metadata={"help": "Prompts of the speculative profile (the first "
                                                      "min(16, block_size // 2) tokens of that many evaluation blocks)."})
    profile_new_tokens: int = field(default=16, metadata={"help": "New tokens per generate call of the speculative profile."})
    profile_repeats: int = field(default=3, metadata={"help": "Timed repeats of every setting (median reported)."})

    def __post_init__(self):
        for name in ("profile_prompts", "profile_new_tokens", "profile_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if any(n < 1 for n in self.draft_counts):
            raise ValueError(f"--draft_counts must be integers >= 1, got {self.draft_counts}")


@dataclass
class AnalyzeArguments:
    output_dir: str = field(default="hf-align-analysis", metadata={"help": "Report folder (report.md, report.json, PNGs)."})
    metrics: list[str] = field(default_factory=lambda: ["cosine", "cka"],
                               metadata={"help": "Layer similarity metrics (see hf_align.layer_similarity): cosine, "
                                         "cka, debiased_cka, minibatch_cka."})
    pooling: str | None = field(default=None, metadata={"help": "cls, mean, last or tokens; default: the pooling of "
                                                        "the model's own head (cls for encoders, last for decoders)."})
    collapse: bool = field(default=True, metadata={"help": "Per-layer neural-collapse metrics (NC1-NC4; causal LMs: "
                                                   "token-level, the vocabulary as the classes)."})
    batch_size: int = field(default=32, metadata={"help": "Batch size of the forward passes."})
    min_count: int = field(default=1, metadata={"help": "Causal LMs: tokens with fewer targets in the text are left "
                                                "out of the collapse metrics (counted in the report)."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})


@dataclass
class EvaluateArguments:
    output_dir: str = field(default="hf-align-evaluation", metadata={"help": "Report folder (report.md, report.json, PNGs)."})
    policy: str = field(default="confidence", metadata={"help": "Exit policy: confidence, entropy, patience or fixed."})
    values: list[float] | None = field(default=None, metadata={"help": "Settings of the policy to sweep "
                                                               "(thresholds / patience / exit layer); default a standard grid."})
    min_layer: int = field(default=1, metadata={"help": "No exit before this block."})
    tolerance: float = field(default=0.01, metadata={"help": "Mark the lowest-depth setting whose accuracy is within "
                                                     "this (absolute) tolerance of full depth on the evaluated split."})
    batch_size: int = field(default=64, metadata={"help": "Batch size of the forward passes."})
    cost_repeats: int = field(default=5, metadata={"help": "Timing repeats of the cost-per-exit-depth table (one batch "
                                                   "of the data; causal LMs: one decoding step; median reported); 0 "
                                                   "skips the table."})


@dataclass
class DemoArguments:
    output_dir: str = field(default="hf-align-demo", metadata={"help": "Where the model, plots, pipeline and report go."})
    steps: int = field(default=800, metadata={"help": "Training steps."})
    seed: int = field(default=0, metadata={"help": "Random seed."})


@dataclass
class LayersArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A local model folder or Hub id (safetensors, no remote code), or a family name / "
                  "model type (e.g. one listed by `hf-align layers --list_families`) for a tiny random model. May be given "
                  "as the first positional argument."},
    )
    list_families: bool = field(default=False, metadata={"help": "List the supported families and exit."})

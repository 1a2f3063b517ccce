"""``hf-align train`` / ``evaluate`` / ``analyze`` for causal language models: documents -> packed token blocks -> aligned
next-token training (the model's own LM head after every block, never replaced) and a layer-wise report.

Text comes from a ``.txt`` file (one document per line, blank lines skipped), a ``.jsonl`` / ``.json`` /
``.csv`` / ``.tsv`` / ``.parquet`` file or a folder of such files (``--text_column``), a Hub dataset id, or
``embedded:python-docs`` (CPython's ``pydoc_data`` topics, :func:`hf_align.data.load_python_docs_texts`). The
documents are tokenized, joined with EOS and cut into ``--block_size`` blocks (:func:`hf_align.data.lm_blocks`);
the evaluation documents are the test split, or ``--eval_split_size`` of the documents held out (seeded) before
packing. Every bad input is a :class:`~.loading.CLIError` raised before any training.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from .arguments import EMBEDDED_LM, DataArguments, ModelArguments, SpeculativeProfileArguments
from .loading import (
    CLIError,
    _first_line,
    check_columns,
    evaluation_split,
    is_causal_lm,
    load_processor,
    load_raw_dataset,
    select_split,
)

__all__ = ["analyze_lm", "evaluate_lm", "is_lm_task", "train_lm"]


# ---------------------------------------------------------------------------------------------- what is an LM


def is_lm_task(model_args: ModelArguments, data_args: DataArguments, checked) -> bool:
    """Whether this run is a causal-LM run: ``--task causal-lm``, or ``auto`` with a causal-LM checkpoint (its
    config's ``architectures``), or no checkpoint and an embedded LM dataset."""
    if model_args.task == "classification":
        return False
    if checked is None:  # no --model_name_or_path: the embedded dataset decides
        lm = data_args.dataset_name in EMBEDDED_LM
        if model_args.task == "causal-lm" and not lm:
            raise CLIError(f"--task causal-lm without --model_name_or_path needs --dataset_name {EMBEDDED_LM[0]} (a fresh "
                           f"tiny Llama is made for it); {data_args.dataset_name!r} has no text for a causal LM")
        return lm
    config, _ = checked
    if model_args.task == "causal-lm":
        from transformers import AutoModelForCausalLM

        if type(config) not in AutoModelForCausalLM._model_mapping:
            raise CLIError(f"--task causal-lm: {model_args.model_name_or_path!r} ({config.model_type}) has no causal-LM "
                           "model class in transformers")
        return True
    return is_causal_lm(config)


def model_positions(config) -> int | None:
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return value if isinstance(value, int) and value > 0 else None


def check_block_size(data_args: DataArguments, config, name: str) -> None:
    block = data_args.block_size
    if isinstance(block, bool) or not isinstance(block, int) or block < 2:
        raise CLIError(f"--block_size must be an integer >= 2, got {block!r}")
    positions = model_positions(config) if config is not None else None
    if positions is not None and block > positions:
        raise CLIError(f"--block_size {block} is larger than the {positions} positions of {name} "
                       f"(max_position_embeddings / n_positions); use --block_size {positions} or less")


# ---------------------------------------------------------------------------------------------- text


def load_text_dataset(args: DataArguments):
    """``datasets.DatasetDict`` of documents for ``--dataset_name``: a ``.txt`` file (one document per line, in
    the ``--text_column``), an empty file refused, everything else as :func:`~.loading.load_raw_dataset`."""
    from datasets import Dataset, DatasetDict

    name = args.dataset_name
    if name and os.path.isfile(name):
        if os.path.getsize(name) == 0:
            raise CLIError(f"{name!r} is empty: there is no text to train on")
        if os.path.splitext(name)[1].lower() == ".txt":
            with open(name, encoding="utf-8", errors="replace") as f:
                lines = [line.rstrip("\r\n") for line in f]
            return DatasetDict(train=Dataset.from_dict({args.text_column: [ln for ln in lines if ln.strip()]}))
    return load_raw_dataset(args)


def documents(ds, column: str, split: str) -> list[str]:
    """The non-empty documents of ``column`` (blank ones skipped); a column of non-text values is an error."""
    check_columns(ds, {"--text_column": column}, split)
    values = ds[column]
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise CLIError(f"column {column!r} (--text_column) of the {split!r} split holds {type(bad).__name__} values "
                       f"(e.g. {bad!r}); a causal LM trains on text")
    docs = [v for v in values if v is not None and v.strip()]
    if not docs:
        raise CLIError(f"the {split!r} split has no text: column {column!r} (--text_column) holds {len(values)} "
                       "empty value(s)")
    return docs


def _subset(docs: list[str], max_samples: int | None, seed: int, option: str) -> list[str]:
    if max_samples is None or max_samples >= len(docs):
        return docs
    if max_samples < 1:
        raise CLIError(f"{option} must be >= 1, got {max_samples}")
    keep = np.sort(np.random.default_rng(seed).choice(len(docs), size=max_samples, replace=False))
    return [docs[i] for i in keep]


def train_eval_documents(data, args: DataArguments, seed: int = 0) -> tuple[list[str], list[str], str]:
    """(train docs, eval docs, note): the test split when there is one, else ``--eval_split_size`` of the training
    documents held out (a seeded permutation), both before packing."""
    train = documents(select_split(data, args.dataset_train_split), args.text_column, args.dataset_train_split)
    if args.dataset_test_split in data:
        held = documents(data[args.dataset_test_split], args.text_column, args.dataset_test_split)
        note = f"evaluation split {args.dataset_test_split!r}"
    else:
        if not 0 < args.eval_split_size < 1:
            raise CLIError(f"--eval_split_size must be in (0, 1), got {args.eval_split_size}")
        n_eval = max(1, round(args.eval_split_size * len(train)))
        if len(train) - n_eval < 1:
            raise CLIError(f"the {args.dataset_train_split!r} split has {len(train)} document(s): too few to hold out "
                           f"--eval_split_size {args.eval_split_size:g} for evaluation (give a {args.dataset_test_split!r} "
                           "split or more documents)")
        order = np.random.default_rng(seed).permutation(len(train))
        held_idx, fit_idx = np.sort(order[:n_eval]), np.sort(order[n_eval:])
        train, held = [train[i] for i in fit_idx], [train[i] for i in held_idx]
        note = (f"no {args.dataset_test_split!r} split: {len(held)} documents ({args.eval_split_size:g}) of "
                f"{args.dataset_train_split!r} held out for evaluation")
    return (_subset(train, args.max_train_samples, seed, "--max_train_samples"),
            _subset(held, args.max_eval_samples, seed, "--max_eval_samples"), note)


def pack(docs: list[str], tokenizer, block_size: int, what: str, vocab_size: int | None = None):
    """:func:`hf_align.data.lm_blocks` with the CLI's errors: no EOS token, too little text, ids beyond the model's
    vocabulary."""
    from ..data import lm_blocks

    if getattr(tokenizer, "eos_token_id", None) is None:
        raise CLIError("the tokenizer has no eos token (documents are joined with EOS); set tokenizer.eos_token and save it")
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise CLIError(f"packing needs a fast tokenizer (tokenizer.json); got {type(tokenizer).__name__}")
    try:
        blocks = lm_blocks(docs, tokenizer, block_size)
    except ValueError as err:
        raise CLIError(f"the {what} text is too short: {err} (--block_size); give more text or a smaller --block_size") from None
    if vocab_size is not None:
        top = int(np.max(blocks["input_ids"]))
        if top >= vocab_size:
            raise CLIError(f"the tokenizer gives token id {top}, but the model's vocabulary has {vocab_size} entries; "
                           "use the model's own tokenizer")
    return blocks


# ---------------------------------------------------------------------------------------------- models


def load_causal_lm(model_args: ModelArguments, config):
    """``AutoModelForCausalLM`` of the checkpoint: its own LM head when it has one (the saved class), else the
    head ``AutoModelForCausalLM`` puts on a base body (tied to the embeddings where the family ties them)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = model_args.model_name_or_path
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, use_safetensors=True, **model_args.hub_kwargs())
    except (OSError, ValueError, SafetensorError) as err:
        raise CLIError(f"could not load the weights of {path!r} (safetensors only): {_first_line(err)}") from err
    if not is_causal_lm(config):
        print(f"{path} is a {(config.architectures or ['base model'])[0]} without an LM head: {type(model).__name__} "
              "puts transformers' causal-LM head on its pretrained body")
    return model


def fresh_lm(train_docs: list[str], block_size: int, seed: int):
    from .demo import python_docs_llama

    model, tokenizer = python_docs_llama(train_docs, block_size=block_size, seed=seed)
    c = model.config
    return model, tokenizer, (f"a fresh {c.num_hidden_layers}-block Llama (hidden {c.hidden_size}, random init, "
                              f"hf_align.cli.demo.python_docs_llama) with a byte-level BPE tokenizer ({len(tokenizer)} "
                              "tokens) trained on the training documents")


# ---------------------------------------------------------------------------------------------- measuring


def profile_inputs(blocks, block_size: int, num_prompts: int):
    """Prompts of the speculative profile: the first ``min(16, block_size // 2)`` tokens of up to ``num_prompts``
    evaluation blocks."""
    import torch

    length = max(1, min(16, block_size // 2))
    rows = blocks[: min(num_prompts, len(blocks))]["input_ids"]
    return torch.as_tensor(np.asarray(rows)[:, :length], dtype=torch.long)


def measure_profile(model, blocks, block_size: int, args: SpeculativeProfileArguments):
    """:func:`hf_align.generation.profile.speculative_profile` on prompts cut from ``blocks`` (None when the model
    has one block: nothing to draft with)."""
    from ..generation.profile import speculative_profile

    if int(model.config.num_hidden_layers) < 2:
        print("speculative profile: skipped (one block: no shallower exit to draft with)")
        return None
    ids = profile_inputs(blocks, block_size, args.profile_prompts)
    positions = model_positions(model.config)
    new = args.profile_new_tokens if positions is None else max(1, min(args.profile_new_tokens, positions - ids.shape[1]))
    return speculative_profile(model, ids, draft_counts=tuple(args.draft_counts), max_new_tokens=new,
                               repeats=args.profile_repeats, progress=False)


def recommendation_text(rec: dict) -> str:
    text = (f"exit layer {rec['exit_layer']}, {rec['num_draft_tokens']} draft token(s): {rec['speedup']:.2f}x plain "
            f"generate, {100 * rec['acceptance']:.0f}% of drafts accepted")
    return text + (" (plain decoding is faster here)" if rec.get("plain_is_faster") else "")


def _eval_args(output_dir: str, batch_size: int):
    import torch

    from ..trainers.aligned_config import AlignedTrainingArguments

    return AlignedTrainingArguments(output_dir=output_dir, report_to=[], per_device_eval_batch_size=batch_size,
                                    use_cpu=not torch.cuda.is_available(), write_model_card=False)


# ---------------------------------------------------------------------------------------------- commands


def train_lm(model_args: ModelArguments, data_args: DataArguments, args, profile_args: SpeculativeProfileArguments,
             checked, resume) -> int:
    """Aligned next-token training of a causal LM on packed blocks; per-block perplexity; the speculative profile;
    model + tokenizer + card saved."""
    from transformers import default_data_collator

    from ..trainers import AlignedTrainer

    config = None if checked is None else checked[0]
    check_block_size(data_args, config, model_args.model_name_or_path or "the model")
    tokenizer = None if checked is None else load_processor(model_args, "text")
    data = load_text_dataset(data_args)
    train_docs, eval_docs, note = train_eval_documents(data, data_args, seed=args.seed)
    if checked is None:
        model, tokenizer, what = fresh_lm(train_docs, data_args.block_size, args.seed)
        print(f"no --model_name_or_path: using {what}")
    vocab = None if checked is None else int(config.vocab_size)
    train = pack(train_docs, tokenizer, data_args.block_size, "training", vocab)
    evaluation = pack(eval_docs, tokenizer, data_args.block_size, "evaluation", vocab)
    print(f"data: {len(train_docs)} training / {len(eval_docs)} evaluation documents ({note}) -> {len(train)} / "
          f"{len(evaluation)} blocks of {data_args.block_size} tokens")
    if checked is not None:
        model = load_causal_lm(model_args, config)
    trainer = AlignedTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                             processing_class=tokenizer, data_collator=default_data_collator)
    trainer.train(resume_from_checkpoint=resume or None)
    metrics = trainer.evaluate()
    L = trainer.num_layers
    print("perplexity of every block through the model's own final norm + LM head (evaluation blocks):")
    for layer in range(1, L + 1):
        print(f"  block {layer}: {metrics[f'eval_layer_{layer}_perplexity']:.2f}")
    if profile_args.speculative_profile:
        profile = measure_profile(trainer.model, evaluation, data_args.block_size, profile_args)
        if profile is not None:
            trainer.speculative_recommendation = {**profile.recommended,  # read by the trainer's card / save code
                                                  "measured_on": profile.describe()}
            print(f"self-speculative decoding, recommended: {recommendation_text(profile.recommended)}")
    name = data_args.dataset_name
    if name and not name.startswith("embedded:") and not os.path.exists(name):  # a Hub dataset: the card's metadata
        trainer.create_model_card(datasets=[name])
    trainer.save_model(args.output_dir)
    print(f"model ({type(trainer.model).__name__}), its tokenizer and model card saved to {args.output_dir}")
    return 0


def held_out_blocks(model_args: ModelArguments, data_args: DataArguments, checked, what: str):
    """(split, documents, packed blocks, model in eval mode) of ``evaluate`` / ``analyze``: the test split (or the
    first), ``--max_eval_samples`` documents, packed into ``--block_size`` blocks with the model's tokenizer."""
    config = checked[0]
    check_block_size(data_args, config, model_args.model_name_or_path)
    tokenizer = load_processor(model_args, "text")
    data = load_text_dataset(data_args)
    raw = evaluation_split(data, data_args.dataset_test_split)
    split = data_args.dataset_test_split if data_args.dataset_test_split in data else list(data)[0]
    docs = _subset(documents(raw, data_args.text_column, split), data_args.max_eval_samples, 0, "--max_eval_samples")
    blocks = pack(docs, tokenizer, data_args.block_size, what, int(config.vocab_size))
    return split, docs, blocks, load_causal_lm(model_args, config).eval()


def evaluate_lm(model_args: ModelArguments, data_args: DataArguments, args, profile_args: SpeculativeProfileArguments,
                checked) -> int:
    """Per-block perplexity, per-exit acceptance (greedy and T=1 sampling), the measured self-speculative speed-up
    per (k, n) and the cost per exit depth -> report.md, report.json, PNGs in ``--output_dir``."""
    import tempfile

    from transformers import default_data_collator

    from ..hub import plot_layer_curves
    from ..trainers import AlignedTrainer
    from .reports import write_report

    name = model_args.model_name_or_path
    split, docs, blocks, model = held_out_blocks(model_args, data_args, checked, "evaluation")
    os.makedirs(args.output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # the metric has one definition: AlignedTrainer.evaluate's
        metrics = AlignedTrainer(model, args=_eval_args(tmp, args.batch_size), eval_dataset=blocks,
                                 data_collator=default_data_collator).evaluate()
    L = int(model.config.num_hidden_layers)
    perplexity = [metrics[f"eval_layer_{l}_perplexity"] for l in range(1, L + 1)]
    exits = list(range(1, L))
    # teacher-forced acceptance of every exit against the last block: AlignedTrainer.evaluate's definition too
    greedy = [metrics[f"eval_layer_{l}_greedy_acceptance"] for l in exits]
    sampling = [metrics[f"eval_layer_{l}_sampling_acceptance"] for l in exits]
    source = "AlignedTrainer.evaluate"
    plot_layer_curves({"perplexity": perplexity}, os.path.join(args.output_dir, "layer_perplexity.png"),
                      ylabel="perplexity (log scale)", title="Perplexity through the model's own LM head", log=True)
    sections = [
        f"Model: `{name}` ({type(model).__name__}, {L} blocks); data: `{data_args.dataset_name}` split `{split}`, "
        f"{len(docs)} documents -> {len(blocks)} blocks of {data_args.block_size} tokens.",
        "## Perplexity of every block through the model's own final norm + LM head\n\n"
        "![layer perplexity](layer_perplexity.png)\n\n| block | perplexity |\n| ---: | ---: |\n"
        + "\n".join(f"| {l} | {p:.4g} |" for l, p in enumerate(perplexity, 1)),
    ]
    if exits:
        plot_layer_curves({"greedy": greedy, "sampling (T=1)": sampling}, os.path.join(args.output_dir, "acceptance.png"),
                          ylabel="acceptance", title="Teacher-forced acceptance of each exit vs the last block",
                          percent=True)
        sections.append(
            "## Acceptance of each exit layer (teacher forced on these blocks)\n\n"
            "greedy: fraction of the scored positions (those with a next token) where the exit's argmax equals the last block's; sampling (T=1): mean over "
            "positions of sum_v min(p_l(v), p_L(v)).\n\n![acceptance](acceptance.png)\n\n"
            "| exit layer | greedy | sampling (T=1) |\n| ---: | ---: | ---: |\n"
            + "\n".join(f"| {l} | {100 * g:.1f}% | {100 * s:.1f}% |" for l, g, s in zip(exits, greedy, sampling)))
    profile = None
    if profile_args.speculative_profile:
        profile = measure_profile(model, blocks, data_args.block_size, profile_args)
    if profile is not None:
        profile.plot(os.path.join(args.output_dir, "speculative_profile.png"))
        sections.append("## Measured self-speculative speed-up per (exit layer k, draft tokens n)\n\n"
                        "![speculative profile](speculative_profile.png)\n\n" + profile.to_markdown()
                        + f"\n\n**recommended**: {recommendation_text(profile.recommended)}.")
    costs = None
    if args.cost_repeats > 0:
        from ..generation.cost import exit_costs

        costs = exit_costs(model, mode="decode", repeats=args.cost_repeats, progress=False)
        costs.plot(os.path.join(args.output_dir, "exit_costs.png"))
        sections.append("## Cost per exit depth (one decoding step)\n\n![exit costs](exit_costs.png)\n\n"
                        + costs.to_markdown())
    report: dict[str, Any] = {
        "model": name, "dataset": data_args.dataset_name, "split": split, "task": "causal-lm",
        "num_documents": len(docs), "num_blocks": len(blocks), "block_size": data_args.block_size,
        "layer_perplexity": perplexity,
        "acceptance": {"exit_layers": exits, "greedy": greedy, "sampling": sampling, "source": source},
        "speculative_profile": None if profile is None else profile.to_dict(),
        "costs": None if costs is None else costs.rows,
    }
    write_report(args.output_dir, "hf-align evaluate", sections, report)
    print("perplexity of every block: " + ", ".join(f"{p:.2f}" for p in perplexity))
    if exits:
        print("greedy acceptance of every exit: " + ", ".join(f"{100 * g:.1f}%" for g in greedy))
    if profile is not None:
        print(f"self-speculative decoding, recommended: {recommendation_text(profile.recommended)}")
    print(f"report: {os.path.join(args.output_dir, 'report.md')}", file=sys.stdout)
    return 0


# ---------------------------------------------------------------------------------------------- analyze



def analyze_lm(model_args: ModelArguments, data_args: DataArguments, args, checked) -> int:
    """Layer similarity over every token (``tokens`` pooling unless ``--pooling``) and token-level neural collapse
    through depth (the vocabulary as the classes: :func:`hf_align.analysis.collapse.token_collapse_report`) of a
    causal LM on packed text blocks -> report.md, report.json, PNGs in ``--output_dir``."""
    import warnings

    from ..analysis import UndefinedSimilarityWarning, layer_similarity
    from ..analysis.collapse import collapse_report, plot_collapse_progression
    from .reports import matrix_markdown, token_collapse_markdown, write_report

    name = model_args.model_name_or_path
    split, docs, blocks, model = held_out_blocks(model_args, data_args, checked, "analysis")
    L = int(model.config.num_hidden_layers)
    pooling = args.pooling or "tokens"
    os.makedirs(args.output_dir, exist_ok=True)
    inputs = blocks.remove_columns([c for c in blocks.column_names if c == "labels"])
    sections = [f"Model: `{name}` ({type(model).__name__}, {L} blocks); data: `{data_args.dataset_name}` split "
                f"`{split}`, {len(docs)} documents -> {len(blocks)} blocks of {data_args.block_size} tokens; "
                f"similarity pooling: {pooling}."]
    report: dict[str, Any] = {"model": name, "dataset": data_args.dataset_name, "split": split, "task": "causal-lm",
                              "num_documents": len(docs), "num_blocks": len(blocks), "block_size": data_args.block_size,
                              "pooling": pooling, "similarity": {}}
    names = [str(k) for k in range(L + 1)]
    for metric in args.metrics:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UndefinedSimilarityWarning)
            sim = layer_similarity(model, inputs, metric=metric, pooling=pooling, batch_size=args.batch_size)
        path = f"similarity_{metric}.png"
        sim.plot(os.path.join(args.output_dir, path))
        report["similarity"][metric] = {"matrix": sim.matrix, "undefined_layers": sim.undefined_layers}
        sections.append(f"## Layer similarity: {metric} (0 = embeddings)\n\n![{metric}]({path})\n\n"
                        + matrix_markdown(sim.matrix, names)
                        + (f"\n\nUndefined (constant features): {', '.join(sim.undefined_layers)}." if caught else ""))
        print(f"{metric}: {path}")
    if args.collapse:
        result = collapse_report(model, blocks, batch_size=args.batch_size, min_count=args.min_count,
                                 progress=not args.disable_tqdm)
        plot_collapse_progression(result, os.path.join(args.output_dir, "collapse.png"))
        sections.append(
            f"## Token-level neural collapse through depth (classes = the next token; layers 0..{L})\n\n"
            f"{result.num_tokens} target tokens of {result.num_classes} vocabulary classes: {result.num_seen} classes "
            f"with at least {result.min_count} targets are measured, {result.num_rare} rarer ones and "
            f"{result.num_unseen} never seen are left out. Features: the LM head's input (final norm applied) after "
            "each block; W: the LM head. Definitions: docs/collapse.md (Token-level collapse).\n\n"
            "![collapse](collapse.png)\n\n" + token_collapse_markdown(result))
        report["collapse"] = result.to_dict()
        print("collapse: collapse.png")
    write_report(args.output_dir, "hf-align analyze", sections, report)
    print(f"report: {os.path.join(args.output_dir, 'report.md')}")
    return 0

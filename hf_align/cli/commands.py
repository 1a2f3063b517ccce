"""The ``hf-align`` command, in the style of TRL's ``trl sft``: every option comes from a dataclass parsed by
``transformers.HfArgumentParser``, so every ``TrainingArguments`` / ``AlignedTrainingArguments`` field works.

    hf-align train      aligned fine-tuning (loss sum_l w_l * CE(head(h_l), y)) of a model folder / Hub id on a dataset;
                        a causal LM keeps its LM head and trains on packed text blocks (--block_size), then the
                        self-speculative speed-up per (exit layer, draft count) is measured
    hf-align analyze    layer similarity heatmaps (cosine + linear CKA) and per-layer neural collapse -> report folder
    hf-align evaluate   layer-wise accuracy through the shared head and the early-exit curve -> report folder; for a
                        causal LM per-block perplexity, per-exit acceptance, measured speed-up and cost per exit depth
    hf-align demo       the main job on embedded data (scikit-learn's digits)
    hf-align layers     the layer view of a model folder / Hub id, or of a tiny random model of a family
    hf-align --version

``hf-align COMMAND --help`` lists every option. Bad arguments end with one line
``hf-align COMMAND: error: ...`` on stderr and exit status 2. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from transformers import HfArgumentParser

from .arguments import (
    EMBEDDED,
    AlignedTrainingCLIArguments,
    AnalyzeArguments,
    DataArguments,
    DemoArguments,
    EvaluateArguments,
    LayersArguments,
    ModelArguments,
    SpeculativeProfileArguments,
)
from .lm import analyze_lm, evaluate_lm, is_lm_task, train_lm
from .loading import (
    CLIError,
    LabelSpace,
    check_columns,
    check_label_range,
    collator,
    encode,
    ensure_pad_token,
    evaluation_split,
    fresh_model_for,
    is_classifier,
    label_space,
    load_classifier,
    load_model_config,
    load_processor,
    load_raw_dataset,
    loader,
    supported_text,
    train_eval_splits,
)
from .reports import collapse_markdown, layer_accuracy_markdown, matrix_markdown, write_report

# ---------------------------------------------------------------------------------------------- shared steps


def _check_model(model_args: ModelArguments, data_args: DataArguments, need_classifier: bool, command: str):
    """``(config, modality)`` of ``--model_name_or_path`` (no weights read), or None for a fresh embedded model;
    runs before any data is read, so a wrong model folder is reported first. A causal LM (``is_lm_task``) passes
    ``need_classifier``."""
    if model_args.model_name_or_path is None:
        if data_args.dataset_name not in EMBEDDED:
            raise CLIError(f"--model_name_or_path is required (a model folder or Hub id) unless --dataset_name is one of {list(EMBEDDED)}")
        if command != "train":
            raise CLIError(f"--model_name_or_path is required: {command} needs a trained model (e.g. the output_dir of hf-align train)")
        return None
    config, modality = load_model_config(model_args)
    if need_classifier and not is_classifier(config, modality) and not is_lm_task(model_args, data_args, (config, modality)):
        raise CLIError(f"{command} needs a trained classifier; {model_args.model_name_or_path!r} is a "
                       f"{(config.architectures or ['base model'])[0]} (train one with hf-align train)")
    return config, modality


def _prepare(model_args: ModelArguments, data_args: DataArguments, checked, split_raw: list, seed: int):
    """Model, processor, modality, label space and encoded splits for ``split_raw`` (raw ``datasets`` splits)."""
    if checked is None:
        model, processor, modality, what = fresh_model_for(data_args.dataset_name, split_raw[0], seed=seed)
        print(f"no --model_name_or_path: using {what}")
        config, new_head = model.config, False
    else:
        config, modality = checked
        processor = load_processor(model_args, modality)
        model = None
    inputs = ({"--text_column": data_args.text_column, "--text_pair_column": data_args.text_pair_column}
              if modality == "text" else {"--image_column": data_args.image_column})
    for ds in split_raw:
        check_columns(ds, {**inputs, "--label_column": data_args.label_column}, ds.split and str(ds.split) or "data")
    space: LabelSpace = label_space(split_raw, data_args.label_column)
    name = model_args.model_name_or_path or "the fresh model"
    if model is None:
        model, new_head = load_classifier(model_args, config, modality, space)
        if new_head:
            print(f"{name} has no classification head ({(config.architectures or ['base model'])[0]}): a new one with "
                  f"{len(space.names)} labels is put on its pretrained body")
    check_label_range(split_raw, data_args.label_column, space, model.config.num_labels, name,
                      getattr(model.config, "label2id", None))
    if modality == "text":
        ensure_pad_token(processor, model)
    channels = getattr(model.config, "num_channels", 3)
    positions = getattr(model.config, "max_position_embeddings", None)
    encoded = [encode(ds, processor, modality, data_args, space, getattr(model.config, "label2id", None), channels,
                      positions) for ds in split_raw]
    return model, processor, modality, space, encoded


# ---------------------------------------------------------------------------------------------- commands


def cmd_train(model_args: ModelArguments, data_args: DataArguments, args: AlignedTrainingCLIArguments,
              profile_args: SpeculativeProfileArguments | None = None) -> int:
    """Aligned fine-tuning: ``AlignedTrainer`` on the train split, layer-wise evaluation, model + card saved
    (causal LMs: :func:`.lm.train_lm`)."""
    from transformers import set_seed

    from ..trainers import AlignedTrainer

    set_seed(args.seed)
    resume = args.resume_from_checkpoint  # TrainingArguments only records it; the Trainer acts on train()'s argument
    if isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = True  # the last checkpoint in --output_dir
    elif isinstance(resume, str) and not os.path.isdir(resume):
        raise CLIError(f"--resume_from_checkpoint {resume!r} is not a checkpoint folder (or pass True for the last one "
                       f"in --output_dir)")
    checked = _check_model(model_args, data_args, need_classifier=False, command="train")
    if is_lm_task(model_args, data_args, checked):
        return train_lm(model_args, data_args, args, profile_args or SpeculativeProfileArguments(), checked, resume)
    data = load_raw_dataset(data_args)
    train_raw, eval_raw, note = train_eval_splits(data, data_args, seed=args.seed)
    print(f"data: {len(train_raw)} training / {len(eval_raw)} evaluation examples ({note})")
    model, processor, modality, space, (train, evaluation) = _prepare(model_args, data_args, checked,
                                                                      [train_raw, eval_raw], args.seed)
    trainer = AlignedTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                             processing_class=processor, data_collator=collator(processor, modality))
    trainer.train(resume_from_checkpoint=resume or None)
    metrics = trainer.evaluate()
    L = trainer.num_layers
    print("accuracy of every block through the model's own head (evaluation split):")
    for layer in range(1, L + 1):
        print(f"  block {layer}: {100 * metrics[f'eval_layer_{layer}_accuracy']:5.1f}%")
    trainer.save_model(args.output_dir)
    print(f"model, its {'tokenizer' if modality == 'text' else 'image processor'} and model card saved to {args.output_dir}")
    return 0


def cmd_analyze(model_args: ModelArguments, data_args: DataArguments, args: AnalyzeArguments) -> int:
    """Layer similarity (every metric in ``--metrics``, (L+1)x(L+1) with 0 = embeddings) and per-layer collapse;
    causal LMs: :func:`.lm.analyze_lm` (token-level collapse, the vocabulary as the classes)."""
    import warnings

    from ..analysis import UndefinedSimilarityWarning, layer_similarity, rank_correlation
    from ..analysis.collapse import collapse_report, plot_collapse_progression
    from ..layers import LayerView

    checked = _check_model(model_args, data_args, need_classifier=False, command="analyze")
    if is_lm_task(model_args, data_args, checked):
        return analyze_lm(model_args, data_args, args, checked)
    data = load_raw_dataset(data_args)
    raw = evaluation_split(data, data_args.dataset_test_split, data_args.max_eval_samples)
    model, processor, modality, space, (encoded,) = _prepare(model_args, data_args, checked, [raw], 0)
    model.eval()
    view = LayerView(model)
    pooling = args.pooling or view.pooling
    os.makedirs(args.output_dir, exist_ok=True)
    batches = loader(encoded, processor, modality, args.batch_size)
    sections = [f"Model: `{model_args.model_name_or_path}` ({type(model).__name__}, {view.num_layers} blocks); data: "
                f"`{data_args.dataset_name}` split `{data_args.dataset_test_split}`, {len(raw)} examples; pooling: {pooling}."]
    report: dict = {"model": model_args.model_name_or_path, "dataset": data_args.dataset_name,
                    "split": data_args.dataset_test_split, "num_examples": len(raw), "pooling": pooling, "similarity": {}}
    names = [str(k) for k in range(view.num_layers + 1)]
    matrices = {}
    for metric in args.metrics:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UndefinedSimilarityWarning)
            sim = layer_similarity(model, batches, metric=metric, pooling=pooling)
        path = f"similarity_{metric}.png"
        sim.plot(os.path.join(args.output_dir, path))
        matrices[metric] = sim.matrix
        report["similarity"][metric] = {"matrix": sim.matrix, "undefined_layers": sim.undefined_layers}
        sections.append(f"## Layer similarity: {metric} (0 = embeddings)\n\n![{metric}]({path})\n\n"
                        + matrix_markdown(sim.matrix, names)
                        + (f"\n\nUndefined (constant features): {', '.join(sim.undefined_layers)}." if caught else ""))
        print(f"{metric}: {path}" + (f" (undefined: {sim.undefined_layers})" if sim.undefined_layers else ""))
    if "cosine" in matrices and "cka" in matrices:
        try:
            rho = rank_correlation(matrices["cosine"], matrices["cka"])
            report["cosine_cka_rank_correlation"] = rho
            sections.append(f"Cosine vs linear CKA agreement (Spearman over layer pairs): **{rho:.3f}**.")
        except ValueError as err:  # too few defined layer pairs (shallow models)
            sections.append(f"Cosine vs linear CKA agreement: not computed ({err}).")
    if args.collapse:
        collapse_pooling = pooling if pooling in ("cls", "mean") else "mean"
        try:
            # blocks 1..L: the embedding output (layer 0) often has constant features at CLS (undefined metrics)
            result = collapse_report(model, batches, pooling=collapse_pooling, num_classes=len(space.names),
                                     layers=list(range(1, view.num_layers + 1)))
        except ValueError as err:  # e.g. a class with no samples in the analysed split: keep the similarity results
            reason = " ".join(str(err).split())
            sections.append(f"## Neural collapse through depth\n\nNot computed: {reason}")
            report["collapse"] = {"error": reason}
            print(f"collapse: not computed ({reason})", file=sys.stderr)
        else:
            plot_collapse_progression(result, os.path.join(args.output_dir, "collapse.png"))
            sections.append(f"## Neural collapse through depth (blocks 1..{view.num_layers}, {collapse_pooling} pooling, "
                            f"{len(space.names)} classes)\n\n![collapse](collapse.png)\n\n" + collapse_markdown(result))
            report["collapse"] = result.to_dict()
            print("collapse: collapse.png")
    write_report(args.output_dir, "hf-align analyze", sections, report)
    print(f"report: {os.path.join(args.output_dir, 'report.md')}")
    return 0


def cmd_evaluate(model_args: ModelArguments, data_args: DataArguments, args: EvaluateArguments,
                 profile_args: SpeculativeProfileArguments | None = None) -> int:
    """Accuracy of every block through the model's own head, and the early-exit curve (accuracy vs mean exit
    block over the policy's settings, exits simulated with EarlyExitModel's own rule); causal LMs:
    :func:`.lm.evaluate_lm`."""
    from ..hub import plot_layer_accuracy
    from ..modeling import EarlyExitModel, exit_curve
    from ..modeling.calibration import collect_layer_logits

    checked = _check_model(model_args, data_args, need_classifier=True, command="evaluate")
    if is_lm_task(model_args, data_args, checked):
        return evaluate_lm(model_args, data_args, args, profile_args or SpeculativeProfileArguments(), checked)
    data = load_raw_dataset(data_args)
    raw = evaluation_split(data, data_args.dataset_test_split, data_args.max_eval_samples)
    model, processor, modality, space, (encoded,) = _prepare(model_args, data_args, checked, [raw], 0)
    early = EarlyExitModel(model.eval(), policy=args.policy, min_layer=args.min_layer,
                           **({"threshold": None} if args.policy in ("patience", "fixed") else {}),
                           **({"exit_layer": 1} if args.policy == "fixed" else {}))
    batches = loader(encoded, processor, modality, args.batch_size)
    logits, labels = collect_layer_logits(early, batches)
    accuracy = (logits.argmax(-1) == labels[:, None]).mean(0).tolist()  # (L,)
    values = args.values
    if values is not None and args.policy in ("patience", "fixed"):
        values = [int(v) for v in values]
    curve = exit_curve(early, batches, policy=args.policy, values=values, layer_logits=(logits, labels))
    ok = [i for i, acc in enumerate(curve.accuracy) if acc >= curve.full_accuracy - args.tolerance]
    if ok:
        curve.chosen = curve.values[min(ok, key=lambda i: (curve.mean_exit_layer[i], -curve.accuracy[i]))]
    os.makedirs(args.output_dir, exist_ok=True)
    plot_layer_accuracy({"shared head": accuracy}, os.path.join(args.output_dir, "layer_accuracy.png"))
    curve.plot(os.path.join(args.output_dir, "exit_curve.png"))
    L = len(accuracy)
    sections = [
        f"Model: `{model_args.model_name_or_path}` ({type(model).__name__}, {L} blocks); data: `{data_args.dataset_name}` "
        f"split `{data_args.dataset_test_split}`, {len(raw)} examples.",
        "## Accuracy of every block through the model's own head\n\n![layer accuracy](layer_accuracy.png)\n\n"
        + layer_accuracy_markdown(accuracy),
        f"## Early exit ({args.policy} policy)\n\n![exit curve](exit_curve.png)\n\n" + curve.to_markdown()
        + (f"\n\n**chosen**: the lowest mean exit block within {100 * args.tolerance:g} point(s) of full depth on this "
           "split (measured here, not a promise for new data: calibrate on a validation split for that)."
           if ok else f"\n\nNo setting is within {100 * args.tolerance:g} point(s) of full depth on this split."),
    ]
    costs = None
    if args.cost_repeats > 0:  # cost of every exit depth on the first batch of this data (the survey's table)
        from ..generation.cost import exit_costs

        costs = exit_costs(model, next(iter(batches)), repeats=args.cost_repeats, progress=False)
        costs.plot(os.path.join(args.output_dir, "exit_costs.png"))
        sections.append("## Cost per exit depth (one batch of this split)\n\n![exit costs](exit_costs.png)\n\n"
                        + costs.to_markdown())
    report = {"model": model_args.model_name_or_path, "dataset": data_args.dataset_name,
              "split": data_args.dataset_test_split, "num_examples": len(raw), "layer_accuracy": accuracy,
              "exit_curve": {"policy": curve.policy, "values": curve.values, "accuracy": curve.accuracy,
                             "mean_exit_layer": curve.mean_exit_layer, "full_accuracy": curve.full_accuracy,
                             "chosen": curve.chosen, "tolerance": args.tolerance},
              "costs": None if costs is None else costs.rows}
    write_report(args.output_dir, "hf-align evaluate", sections, report)
    print("accuracy of every block: " + ", ".join(f"{100 * a:.1f}%" for a in accuracy))
    if ok:
        i = curve.values.index(curve.chosen)
        print(f"early exit: {args.policy} {curve.chosen} keeps {100 * curve.accuracy[i]:.1f}% (full depth "
              f"{100 * curve.full_accuracy:.1f}%) running {curve.mean_exit_layer[i]:.2f} of {L} blocks on average")
    print(f"report: {os.path.join(args.output_dir, 'report.md')}")
    return 0


def cmd_demo(args: DemoArguments) -> int:
    from .demo import run_demo

    result = run_demo(output_dir=args.output_dir, steps=args.steps, seed=args.seed)
    return 0 if result["tolerance_held"] else 1


def _tiny_family_model(name: str):
    """A tiny random model of a registered family (or model type), built from its config (no download)."""
    import transformers

    from ..families import TASKS, supported_families

    families = supported_families()  # the registry's public lookup: name -> model types and tasks
    family = families.get(name) or next((f for f in families.values() if name in f["model_types"]), None)
    if family is None:
        return None
    model_type = name if name in family["model_types"] else family["model_types"][0]
    task = next(t for t in TASKS if t in family["tasks"])
    auto = {"sequence-classification": "AutoModelForSequenceClassification",
            "image-classification": "AutoModelForImageClassification", "causal-lm": "AutoModelForCausalLM"}[task]
    try:
        config = transformers.AutoConfig.for_model(
            model_type, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=100, num_labels=3, image_size=16, patch_size=4, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
        cls = getattr(transformers, auto)._model_mapping[type(config)]
        return (cls[0] if isinstance(cls, (tuple, list)) else cls)(config)  # some types map to several classes
    except Exception as err:
        raise CLIError(f"could not build a tiny random {model_type} model ({err}); pass a saved model folder instead") from err


def cmd_layers(args: LayersArguments) -> int:
    import transformers

    from ..families import support_table
    from ..layers import LayerView

    if args.list_families:  # the support table, generated from the registry (also in docs/layers.md)
        print(support_table())
        print(f"\nFamilies (model types: tasks): {supported_text()}")
        return 0
    name = args.model_name_or_path
    if not name:
        raise CLIError("expected a model folder, a Hub id or a family name (hf-align layers --list_families shows them)")
    model = None if os.path.isdir(name) else _tiny_family_model(name)
    if model is None:
        try:
            config, _ = load_model_config(ModelArguments(model_name_or_path=name))
        except CLIError as err:
            raise CLIError(f"{err} (or pass a family name: hf-align layers --list_families)") from None
        cls = getattr(transformers, (config.architectures or [""])[0], None)
        if cls is None:
            raise CLIError(f"{name!r}: config.architectures={config.architectures} names no transformers class")
        model = cls.from_pretrained(name, config=config, use_safetensors=True, trust_remote_code=False)
    print(LayerView(model.eval()).describe())
    return 0


class _CommandParser(HfArgumentParser):
    """An ``HfArgumentParser`` whose argument errors are one line (the full usage is in ``--help``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists every option)\n")


COMMANDS = {
    "train": ("aligned fine-tuning of a model folder / Hub id on a dataset (every TrainingArguments option works); "
              "causal LMs keep their LM head and train on packed text blocks",
              (ModelArguments, DataArguments, AlignedTrainingCLIArguments, SpeculativeProfileArguments), cmd_train),
    "analyze": ("layer similarity heatmaps (cosine + CKA) and per-layer neural collapse, written to a report folder",
                (ModelArguments, DataArguments, AnalyzeArguments), cmd_analyze),
    "evaluate": ("layer-wise accuracy and the early-exit curve (causal LMs: per-block perplexity, per-exit acceptance, "
                 "the measured self-speculative speed-up and the cost per exit depth), written to a report folder",
                 (ModelArguments, DataArguments, EvaluateArguments, SpeculativeProfileArguments), cmd_evaluate),
    "demo": ("the main job on embedded data (scikit-learn's digits): train, analyze, calibrated early exit",
             (DemoArguments,), cmd_demo),
    "layers": ("print the layer view of a model folder / Hub id or of a tiny random model of a family",
               (LayersArguments,), cmd_layers),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, _CommandParser]]:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="hf-align", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hf-align {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
    parsers = {name: sub.add_parser(name, help=text, description=text, dataclass_types=types)
               for name, (text, types, _) in COMMANDS.items()}
    return parser, parsers


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (argparse's own errors and ``--help`` raise ``SystemExit``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, parsers = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])  # --help / --version / an unknown command: argparse answers and exits
        return 2
    command, rest = argv[0], argv[1:]
    if command == "layers" and rest and not rest[0].startswith("-"):
        rest = ["--model_name_or_path", rest[0], *rest[1:]]
    sub = parsers[command]
    try:
        _, unknown = sub.parse_known_args(rest)  # unknown options first, before any dataclass validates itself
        if unknown:
            sub.error(f"unrecognized arguments: {' '.join(unknown)}")
        objs = sub.parse_args_into_dataclasses(args=rest)
        return COMMANDS[command][2](*objs)
    except (CLIError, ValueError) as err:
        if os.environ.get("HF_ALIGN_DEBUG"):
            raise
        message = " ".join(str(err).split())
        print(f"hf-align {command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

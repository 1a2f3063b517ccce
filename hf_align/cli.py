"""The ``hf-align`` command.

    hf-align layers PATH_OR_FAMILY     print the layer view of a local model folder, or of a tiny random model
    hf-align demo                      the main job on embedded data (scikit-learn's digits); see README
"""

from __future__ import annotations

import argparse
import os
import sys


def _tiny_model(family: str):
    """A tiny random model of a registered family, built from a config (no download)."""
    import transformers as T

    common = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, num_labels=3)
    builders = {
        "bert": lambda: T.BertForSequenceClassification(T.BertConfig(vocab_size=100, **common)),
        "vit": lambda: T.ViTForImageClassification(T.ViTConfig(image_size=16, patch_size=4, **common)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=4, n_head=4)),
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(vocab_size=100, num_key_value_heads=2, **common)),
    }
    if family not in builders:
        raise SystemExit(f"hf-align layers: no tiny example for {family!r}; choose one of {sorted(builders)} or pass a folder")
    return builders[family]()


def cmd_layers(args: argparse.Namespace) -> int:
    from .layers import LayerView

    if os.path.isdir(args.model):
        from transformers import AutoConfig

        from .hub import load_local_model

        config = AutoConfig.from_pretrained(args.model)
        model = load_local_model(args.model, config)
    else:
        model = _tiny_model(args.model)
    view = LayerView(model.eval())
    print(view.describe())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(output_dir=args.output_dir, steps=args.steps, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-align", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layers", help="print the layer view of a model (local folder or a tiny random family model)")
    p.add_argument("model", help="a local model folder (safetensors) or a family name: bert, vit, gpt2, llama")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("demo", help="the main job on embedded data (scikit-learn digits)")
    p.add_argument("--output-dir", default="hf-align-demo")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

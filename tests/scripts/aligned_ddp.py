"""Train + evaluate a tiny BERT with AlignedTrainer; run plainly (1 process) or under torchrun (2 processes).

usage: aligned_ddp.py OUT.json PER_DEVICE_BATCH
The global batch (per-device batch x processes) is the same in both runs, so training must agree.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from test_aligned_trainer import text_dataset  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

from hf_align import AlignedTrainer, AlignedTrainingArguments  # noqa: E402

out, per_device = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
data = text_dataset(n=48)
evalset = text_dataset(n=21, seed=5)  # 21 is not a multiple of 2 x 5: the sampler pads, metrics must not count twice
args = AlignedTrainingArguments(output_dir=os.path.join(os.path.dirname(out), "ddp-out"), report_to=[], disable_tqdm=True,
                                save_strategy="no", per_device_train_batch_size=per_device, per_device_eval_batch_size=5,
                                learning_rate=5e-3, max_steps=4, logging_steps=1, seed=0, use_cpu=True,
                                ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
# no dropout: its random masks differ between one batch of 16 and two of 8
model = tiny_model("bert", "BertForSequenceClassification", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
trainer = AlignedTrainer(model=model, args=args, train_dataset=data,
                         eval_dataset=evalset)
trainer.train()
metrics = trainer.evaluate()
if trainer.is_world_process_zero():
    metrics["world_size"] = args.world_size
    metrics["train_losses"] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    with open(out, "w") as f:
        json.dump(metrics, f)
import torch.distributed as dist  # noqa: E402

if dist.is_initialized():
    dist.barrier()  # both ranks done before the group goes: gloo aborts a rank torn down mid-exchange
    dist.destroy_process_group()

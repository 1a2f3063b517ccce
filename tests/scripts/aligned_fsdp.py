"""AlignedTrainer's per-layer LM losses in 1 process vs 2 processes (torchrun, gloo, CPU).

usage: aligned_fsdp.py OUT.json MODE        MODE = trainer | fsdp2 | trainer-fsdp
* trainer:      AlignedTrainer.train() + evaluate() (under torchrun: DistributedDataParallel through accelerate).
* fsdp2:        every block and the root made FSDP2 units with torch's ``fully_shard`` (parameters sharded as
                DTensors across the 2 processes); 3 AdamW steps of AlignedTrainer.compute_loss on each rank's
                half of the global batch; per-layer losses all-reduced.
* trainer-fsdp: AlignedTrainer with TrainingArguments(fsdp=...) - records what accelerate wraps the model in.
The global batch is the same in every run, so the per-layer losses must agree.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from tiny_models import tiny_model  # noqa: E402

from hf_align import AlignedTrainer, AlignedTrainingArguments  # noqa: E402

out, mode = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
world = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
GLOBAL_BATCH = 8


def lm_dataset(n, seed):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (n, 12), generator=g)
    labels = ids.clone()
    labels[::3, -4:] = -100  # unequal token counts per row and per rank
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()}).with_format("torch")


def args_for(**kw):
    return AlignedTrainingArguments(output_dir=os.path.join(os.path.dirname(out), f"{mode}-out"), report_to=[],
                                    disable_tqdm=True, save_strategy="no", per_device_eval_batch_size=5,
                                    learning_rate=5e-3, max_steps=3, logging_steps=1, seed=0, use_cpu=True,
                                    lm_loss_chunk_size=16, ddp_backend="gloo" if world > 1 else None, **kw)


result = {"world_size": world, "mode": mode}
model = tiny_model("llama", "LlamaForCausalLM")
train = lm_dataset(32, 0)
if mode in ("trainer", "trainer-fsdp"):
    extra = dict(fsdp=True, fsdp_config={"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}) if mode == "trainer-fsdp" else {}
    trainer = AlignedTrainer(model=model, args=args_for(per_device_train_batch_size=GLOBAL_BATCH // world, **extra),
                             train_dataset=train, eval_dataset=lm_dataset(21, 5))
    trainer.train()
    result.update(trainer.evaluate())
    result["wrapped"] = type(trainer.model_wrapped).__name__
    result["distributed_type"] = str(trainer.accelerator.distributed_type)
    result["layer_losses"] = [[e[f"layer_{l}_loss"] for l in (1, 2, 3)] for e in trainer.state.log_history if "loss" in e]
elif mode == "fsdp2":
    # The trainer (its layer view and self-check) is built on the unsharded model, as under accelerate, which
    # shards at train(): transformers' Trainer.__init__ moves the model with .to(device), which fails on FSDP2
    # modules, and a forward of the sharded model before training (e.g. a self-check) leaves FSDP2's root
    # unsharded, after which its parameters (embeddings, final norm, LM head) silently stop updating.
    trainer = AlignedTrainer(model=model, args=args_for())
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():  # the Trainer's accelerator has set up gloo already
            dist.init_process_group("gloo")
        for block in model.model.layers:
            fully_shard(block)  # every block its own FSDP unit; the layer view keeps the same (now FSDP) modules
        fully_shard(model)
    result["block_type"] = type(trainer.layer_view.blocks[0]).__name__
    result["param_type"] = type(model.model.layers[0].mlp.up_proj.weight).__name__
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for step in range(3):
        batch = train[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
        num_items = int((batch["labels"][:, 1:] != -100).sum())  # tokens of the GLOBAL batch
        part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        local = {k: v[part] for k, v in batch.items()}
        outputs, hidden, context = trainer._forward_layers(model, local)
        per_layer = trainer.layer_losses(hidden, outputs.logits, context, local["labels"], num_items)
        loss = sum(w * l for w, l in zip(trainer.layer_loss_weights, per_layer)) * world  # FSDP averages gradients
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        values = torch.stack([l.detach() for l in per_layer]).double()
        if world > 1:
            dist.all_reduce(values)  # each rank's term is its token sum / global token count
        losses.append(values.tolist())
    result["layer_losses"] = losses
    result["param_norms"] = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).norm().item()
                             for n, p in model.named_parameters()}
if rank == 0:
    with open(out, "w") as f:
        json.dump(result, f)
if dist.is_initialized():
    dist.barrier()  # both ranks done before the group goes: gloo aborts a rank torn down mid-exchange
    dist.destroy_process_group()

"""Data-parallel LoRA training on CPU (gloo) with torchrun or accelerate; optionally FSDP2.

Each rank trains the same tiny Llama (built from a config, no downloads) on different data; at the end every rank
hashes its adapter, the hashes are all-gathered and must agree, and rank 0 alone saves the adapter.

    # plain DDP
    torchrun --nproc_per_node 2 examples/train_distributed.py --out /tmp/ddp
    # FSDP2 (fully_shard per decoder layer, then the root)
    torchrun --nproc_per_node 2 examples/train_distributed.py --fsdp2 --out /tmp/fsdp2
    # FSDP1 (FullyShardedDataParallel with peftkit's fsdp_auto_wrap_policy, use_orig_params=True)
    torchrun --nproc_per_node 2 examples/train_distributed.py --fsdp1 --out /tmp/fsdp1
    # accelerate (note: --multi_gpu with Accelerator(cpu=True); `--cpu` would silently run a single process)
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        examples/train_distributed.py --accelerate --out /tmp/accel

Writes ``<out>/adapter/`` (adapter_config.json + adapter_model.safetensors) and ``<out>/rank<k>.json``
(``{"rank", "world_size", "mode", "hash", "hashes", "losses"}``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit import LoraConfig, get_peft_model, get_peft_model_state_dict
from peftkit.integrations.distributed import (
    fsdp_auto_wrap_policy,
    full_state_dict,
    fully_shard_model,
    shutdown,
)

VOCAB, SEQ, BATCH = 128, 16, 4


def build_model(seed: int) -> torch.nn.Module:
    """A tiny Llama with LoRA on q_proj/v_proj (gaussian init: the adapter starts away from zero)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    base = LlamaForCausalLM(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian",
                      task_type="CAUSAL_LM")
    return get_peft_model(base, lora)


def batch(rank: int, step: int) -> torch.Tensor:
    """Different data on every rank and step: ``(BATCH, SEQ)`` token ids."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randint(3, VOCAB, (BATCH, SEQ), generator=generator)


def adapter_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the adapter tensors in key order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0, help="init seed (DDP/accelerate: rank k uses seed + k)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--accelerate", action="store_true", help="use accelerate.Accelerator(cpu=True)")
    mode.add_argument("--fsdp2", action="store_true", help="shard with FSDP2 fully_shard instead of DDP")
    mode.add_argument("--fsdp1", action="store_true", help="shard with FSDP1 FullyShardedDataParallel instead of DDP")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)

    accelerator = None
    if args.accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # DDP broadcasts rank 0's parameters when it wraps the model, so a different init per rank still ends identical;
    # FSDP2 keeps each rank's own shard of its own tensors, so it needs the same init on every rank.
    sharded = args.fsdp1 or args.fsdp2
    peft_model = build_model(args.seed if sharded else args.seed + rank)

    if args.fsdp2:
        model = fully_shard_model(peft_model)
    elif args.fsdp1:
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(peft_model, auto_wrap_policy=fsdp_auto_wrap_policy(peft_model),
                                         use_orig_params=True, device_id=torch.device("cpu"))
    elif accelerator is None:
        model = torch.nn.parallel.DistributedDataParallel(peft_model)
    params = [p for p in model.parameters() if p.requires_grad] if sharded else [
        p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    if accelerator is not None:
        model, optimizer = accelerator.prepare(peft_model, optimizer)

    losses = []
    for step in range(args.steps):
        ids = batch(rank, step)
        loss = model(input_ids=ids, labels=ids).loss
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    state = full_state_dict(model)  # a collective; on CPU every rank receives the full tensors
    digest = adapter_hash(get_peft_model_state_dict(peft_model, state))
    hashes: list[str | None] = [None] * world
    dist.all_gather_object(hashes, digest)
    if len(set(hashes)) != 1:
        raise SystemExit(f"rank {rank}: adapters differ across ranks: {hashes}")

    peft_model.save_pretrained(out / "adapter", state_dict=state, is_main_process=rank == 0)
    out.mkdir(parents=True, exist_ok=True)
    mode_name = "fsdp2" if args.fsdp2 else "fsdp1" if args.fsdp1 else "accelerate" if accelerator else "ddp"
    record = {"rank": rank, "world_size": world, "mode": mode_name, "hash": digest, "hashes": hashes,
              "losses": losses, "wrapped": type(model).__name__}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        print(json.dumps({k: record[k] for k in ("mode", "world_size", "hashes")}), flush=True)
    shutdown()
    # Every rank has passed the final barrier and the process group is gone, so nothing is left to do. Skip the
    # interpreter's teardown: FSDP/accelerate state still references gloo objects whose threads can abort (SIGABRT,
    # "terminate called without an active exception") a finished run when they are destroyed at exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()

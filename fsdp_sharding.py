"""FSDP2 sharding, DCP checkpoints and activation checkpointing (D1-D4) for train_distill.py.

A companion file: train_distill.py loads it (companion() in its shared config block) when the config sets
train.strategy fsdp or train.activation_checkpointing, or when it reads a sharded checkpoint, and hands itself
over as `kit`; this file refuses and gathers through the script's own ConfigError, model_blocks() and
all_gather_list(). Beyond one device with the engines PyTorch ships: FSDP2's fully_shard and
torch.distributed.checkpoint (DCP). Chosen once in train(); the loop and its guarantees are the same for every
strategy. The teacher stays replicated on every process: it has no gradients and no optimizer state (4 bytes
a parameter in fp32 against the student's 16 with AdamW), runs under no_grad, and offline KD
(kd.teacher_cache) keeps it out of training altogether; its tensor digest is checked as under DDP.
"""
import contextlib
import os
import re
import shutil
import types
import warnings

import torch
import torch.distributed as dist

kit: types.ModuleType  # the training script that loaded this file: companion() sets it before this code runs


def checkpoint_activations(module, key):
    """train.activation_checkpointing: each block's forward runs again in the backward instead of keeping
    its activations (torch.utils.checkpoint, non-reentrant, replaying the RNG state it first saw: the same
    dropout masks, the same gradients)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    blocks = kit.model_blocks(module)
    if not len(blocks):
        raise kit.ConfigError([("C3", "train.activation_checkpointing", f"true, but {key} has no nn.ModuleList of "
                            "blocks to checkpoint; set it to false")])
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block)


def shard_model(module, precision):
    """D1: every block its own FSDP unit (its weights gathered just before it runs and freed after), then
    the root (embeddings, final norm, head, projection). The optimizer holds fp32 shards; forward and
    backward run in train.precision (MixedPrecisionPolicy) and gradients are reduced in fp32 (G6)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # FSDP2 warns that a root returning a view (F.linear of a [B, T, C] input is one) would lose its gradient
    # hook to an in-place op on it: the loss never writes into the logits or the projection
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in kit.model_blocks(module):
        fully_shard(block, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


def sharded_grad_scaler(device):
    """fp16 under FSDP: torch's ShardedGradScaler, whose inf check is reduced over the processes, so every
    process skips the same overflowed step (G5, D1); each alone would skip on its own shard's overflow."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    # its one-element scale meets DTensor shards, which warn that they replicate it: that is what it is for
    warnings.filterwarnings("ignore", message="Found a non-scalar tensor with numel=1")
    return ShardedGradScaler(device.type)


def single_process_group(device):
    """fully_shard needs a process group even for one process (train.strategy fsdp without torchrun): one
    held in memory, nothing listens on a port."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)


def save_shards(run, name):
    """D2: every process writes its shards of the weights and the optimizer state into one DCP directory,
    checkpoints/<name>-step<N>/, under a temporary name first and renamed once complete; the checkpoint file
    written after it (last.pt, best.pt) names it. A kill at any point leaves the previous pair whole (R6)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    d = run["dist"]
    final = f"{name}-step{run['state']['global_step']:08d}"
    tmp = os.path.join(run["ckpt_dir"], f".tmp-{os.getpid()}-{final}")
    tmp = kit.all_gather_list([tmp], d["world"])[0]  # process 0's
    model_state, optimizer_state = get_state_dict(run["module"], run["optimizer"])
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)  # returns once every shard is in
    if d["main"]:
        path = os.path.join(run["ckpt_dir"], final)
        if os.path.isdir(path):  # the same step saved again (a stop right after a save): its file still names it,
            shutil.rmtree(path)  # and the .prev file names the one before, which a kill here falls back to
        os.replace(tmp, path)
        dir_fd = os.open(run["ckpt_dir"], os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    return final


def load_shards(run, ckpt, source):
    """D3: the DCP checkpoint a checkpoint file names into this run's network and optimizer, sharded or not:
    DCP reads each process's part of every tensor, whatever the number of processes that wrote it."""
    import torch.distributed.checkpoint as dcp
    directory = shard_directory(ckpt, source, "--resume")
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optimizer_state = get_state_dict(run["module"], run["optimizer"])
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(run["module"], run["optimizer"], model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def prune_shards(run):
    """Process 0, after a checkpoint file is written: DCP directories that no checkpoint file names any more."""
    keep = set()
    for name in ("last.pt", "last.prev.pt", "best.pt", "best.prev.pt"):
        with contextlib.suppress(Exception):  # absent or torn: it names nothing
            keep.add(torch.load(os.path.join(run["ckpt_dir"], name), map_location="cpu",
                                weights_only=True).get("shards"))
    for name in os.listdir(run["ckpt_dir"]):
        if re.fullmatch(r"(last|best)-step\d{8}", name) and name not in keep:
            shutil.rmtree(os.path.join(run["ckpt_dir"], name), ignore_errors=True)


@contextlib.contextmanager
def gathered_for_generation(module):
    """D1: on-policy generation under FSDP, through the root module (its hooks gather what a forward needs). The
    prompt's forward, which every process runs on its whole share, gathers each unit's weights as a training
    forward does; they stay gathered until generation ends, so the one-token steps after it run no collective
    and each process stops when its own rows have ended. Sharded again after, as before generation."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:  # the blocks reshard after each forward again; the root never does (backward needs it)
            unit.set_reshard_after_forward(unit is not module, recurse=False)
            unit.reshard()


SHARDED_CHECKPOINTS = {"save": save_shards, "load": load_shards, "prune": prune_shards,
                       "generation": gathered_for_generation}


# The DCP directory a sharded checkpoint file (last.pt, best.pt) names, beside it (D2)
def missing_shards(ckpt, path):
    """D2: why the DCP directory a sharded checkpoint file names (beside the file) cannot be read, or None."""
    directory = os.path.join(os.path.dirname(path), ckpt["shards"])
    if os.path.isfile(os.path.join(directory, ".metadata")):
        return None
    state = "incomplete (no .metadata)" if os.path.isdir(directory) else "missing"
    return f"{path} is a sharded checkpoint (train.strategy fsdp): its weights are in the directory " \
           f"{ckpt['shards']}/ beside it, which is {state}"


def shard_directory(ckpt, path, key="--checkpoint"):
    """D2: the DCP directory a sharded checkpoint file names. A file copied without it (a best.pt sent alone)
    is one ConfigError naming the directory it needs, or the export/ that needs none."""
    problem = missing_shards(ckpt, path)
    if problem:
        raise kit.ConfigError([("D2", key, f"{problem}; copy {ckpt['shards']}/ from the run's checkpoints/ next to it, "
                            "or use the run's export/ (one whole state dict, no shards)")])
    return os.path.join(os.path.dirname(path), ckpt["shards"])


def read_shards(directory, prefix="model."):
    """The tensors of a DCP checkpoint directory (D2) whose names start with `prefix`, each whole, in host
    memory, read by this process alone: for an export or a comparison, never for training."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    meta = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=directory, no_dist=True)
    return {k[len(prefix):]: v for k, v in state.items()}


def shard_tensors(ckpt, path, prefix="model.", key="--checkpoint"):
    """D4: the whole tensors (names starting with `prefix`) of the DCP directory a sharded checkpoint file names,
    gathered by this process alone (an export, a teacher, a check; never training)."""
    return read_shards(shard_directory(ckpt, path, key), prefix)

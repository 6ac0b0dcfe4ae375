"""Knowledge distillation of a causal language model, with a training loop that cannot have the catalogue's bugs.

Run it (defaults: a built-in corpus of generated Python-like text, the same bytes everywhere, no download):

    python train_distill.py --dry_run                     # every code path in seconds, no config needed
    python train_distill.py --help_config                 # every config key: default, type, meaning
    python train_distill.py --config configs/distill_demo_teacher.yaml  # the teacher: kd.enabled false, plain LM
    python train_distill.py --config configs/distill_demo.yaml          # the student, distilled from that teacher
    python train_distill.py --config configs/distill_reference.yaml \
        --set kd.teacher_checkpoint=runs/t/checkpoints/best.pt
    torchrun --standalone --nproc_per_node=2 train_distill.py --config configs/distill_reference.yaml
    python prepare_text.py my_texts/ --tokenizer TEACHER_HF_DIR --out data/mine   # first, for your own text: .bin files

A run trains the network the student.* keys name: the built-in GPT, a local Hugging Face model
(`student.hf_dir`) or the user's module (`student.target`). With `kd.enabled: false` that is plain
language-model training (how a teacher is made, your own HF model included); with `kd.enabled: true` it
is distilled from the frozen teacher in `kd.teacher_checkpoint` (or, when the `transformers` package is
installed, a local Hugging Face model directory `kd.hf_teacher_dir`, or the user's module `teacher.target`).
A finished run exports its best network to runs/<run_name>/export/ (docs/distill_models.md). Loss per real target token:
    kd.alpha * CE(labels) + kd.beta * T^2 * KL(teacher_T || student_T) + kd.gamma * hidden-state loss,
with another divergence (kd.divergence: reverse KL, GKD's JSD, skew KL, TVD), on-policy data (the student's
own continuations, kd.on_policy_fraction) and a layer map for the hidden-state term (kd.hidden_layers).
The same command line starts the run and resumes it after a kill or a preemption (`--resume auto`).
Row ids in comments (S1, R4, G2, ...) refer to FAILURE_MODES.md, the catalogue this loop is built
against. The blocks marked "shared" are byte-identical in train_probe.py (a test enforces it).
"""
import argparse
import contextlib
import difflib
import functools
import hashlib
import importlib
import importlib.util
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import yaml

TASK = "distill"
TRAINING_ONLY_FILES = ()  # E11: --evaluate may check a teacher cache against data.train_bin
PREPARE_TOOL = "python prepare_text.py TEXTS --tokenizer DIR"  # makes the data.* token files (C3: named when missing)

# -----------------------------------------------------------------------------
# Config: every key, its default, its type and what it means. A YAML file and --set override these;
# any other key is an error (C2), every value is cast to its type or rejected (C1).
# Types: str, int, float, bool, floats (list), strs (list), pairs (a list of [int, int]), dict (free-form), a tuple
# of choices; "?" allows null.
CONFIG = {
    "task": ("distill", "str", "which script runs this config (distill = train_distill.py)"),
    "run_name": ("distill", "str", "run directory is runs/<run_name>/ unless --run_dir is given"),
    "launch_dir": (None, "str?", "the directory the run was launched from, recorded by the run (null: the current "
                   "one); a *.target module not importable from the current directory is looked for there (C8)"),
    "seed": (0, "int", "seeds data order and initialisation"),
    # optimizer
    "optim.name": ("adamw", ("adamw", "sgd"), "optimizer"),
    "optim.lr": (1e-3, "float", "peak learning rate"),
    "optim.weight_decay": (0.1, "float", "decoupled (AdamW) / L2 (SGD) weight decay on weight matrices and embeddings"),
    "optim.betas": ([0.9, 0.95], "floats", "AdamW betas"),
    "optim.momentum": (0.9, "float", "SGD momentum"),
    # learning-rate schedule, stepped once per optimizer step (S1)
    "schedule.type": ("cosine", ("onecycle", "cosine", "linear", "wsd", "constant"), "LR schedule"),
    "schedule.warmup": (0.1, "float", "warmup: a fraction of the run (< 1) or optimizer steps (>= 1)"),
    "schedule.div_factor": (25.0, "float", "the first step's LR is optim.lr / div_factor"),
    "schedule.final_div_factor": (1e4, "float", "onecycle: final LR = optim.lr / (div_factor * final_div_factor)"),
    "schedule.final_lr_ratio": (0.1, "float", "cosine/linear/wsd: final LR as a fraction of optim.lr"),
    "schedule.anneal": ("cos", ("cos", "linear"), "onecycle: anneal_strategy"),
    "schedule.cycle_momentum": (False, "bool", "onecycle: cycle momentum / Adam beta1 (S4)"),
    "schedule.decay": (0.2, "float", "wsd: share of the run spent in the final decay"),
    "schedule.total_steps": (None, "int?", "leave null: derived from the data; if set it must match (S2)"),
    "expect.initial_lr": (None, "float?", "optional: the LR you expect at step 1 (checked by the dry runs, S5)"),
    "expect.peak_lr": (None, "float?", "optional: the highest LR you expect"),
    "expect.final_lr": (None, "float?", "optional: the LR you expect at the last step"),
    # training loop
    "train.epochs": (1, "int?", "passes over the training windows (null when train.max_steps is set)"),
    "train.max_steps": (None, "int?", "optimizer steps instead of epochs (null when train.epochs is set); given "
                        "alone or by --set over a file's epochs, it replaces them (note S2)"),
    "train.batch_size": (16, "int", "windows per micro-batch, per process"),
    "train.grad_accum": (1, "int", "micro-batches per optimizer step"),
    "train.clip_grad_norm": (1.0, "float?", "max total gradient norm; null = no clipping (norm still logged)"),
    "train.grad_norm_warn": (100.0, "float", "warn when the total gradient norm exceeds this (G3)"),
    "train.precision": ("fp32", ("fp32", "bf16", "fp16"), "autocast dtype; fp16 adds a GradScaler"),
    "train.device": ("auto", ("auto", "cpu", "cuda"), "auto = cuda when available"),
    "train.log_every": (10, "int", "optimizer steps between train records"),
    "train.progress_every_s": (60.0, "float", "seconds between progress lines (step, elapsed, steps/s, ETA) when "
                               "stderr is no terminal (nohup, cron, --detach); a terminal gets a tqdm bar instead"),
    "train.eval_every": (None, "int?", "optimizer steps between evals; null = once per epoch"),
    "train.save_every_steps": (None, "int?", "optimizer steps between last.pt saves; null = no step trigger"),
    "train.save_every_minutes": (5.0, "float?", "minutes of training between last.pt saves (R8: bounds what a SIGKILL "
                                 "loses); null = no time trigger. The end, a stop signal and a G4 abort always save"),
    "train.max_bad_steps": (20, "int", "abort after this many consecutive non-finite steps (G4)"),
    "train.patience": (None, "int?", "early stopping: evals without improvement; null = off"),
    "train.best_metric": ("val/loss", "str", "picks best.pt: val/loss, val/ppl (lower is better) or val/agreement"),
    "train.max_loss_share": (0.9, "float", "warn when a loss term other than the label CE is above this share of the "
                             "loss for 3 logged steps in a row (E2; a 40x feature loss is ~95%)"),
    "train.num_workers": (0, "int", "DataLoader worker processes"),
    "train.eval_batch_size": (32, "int", "windows per eval batch"),
    "train.allow_schedule_change": (False, "bool", "resume even if schedule-shaping keys changed (S7)"),
    "train.strategy": ("ddp", ("ddp", "fsdp"), "several processes: ddp replicates the trained network, fsdp shards "
                       "its weights, gradients and optimizer state (FSDP2) and saves DCP checkpoints (D1-D4)"),
    "train.activation_checkpointing": (False, "bool", "recompute each block's activations in the backward (less "
                                       "memory, ~1/3 more compute); blocks = the longest nn.ModuleList"),
    # metric sinks (optional packages): each receives every metrics.jsonl record, process 0 only (E10)
    "log.tensorboard": (False, "bool", "TensorBoard event files in <run_dir>/tb/ (needs the tensorboard package)"),
    "log.wandb": (None, "str?", "Weights & Biases project (wandb; honours WANDB_MODE=offline, WANDB_DIR); null = off"),
    "log.mlflow": (None, "str?", "an MLflow tracking URI: sqlite:///mlflow.db for a local store (no server; needs "
                   "pip install mlflow), http://host:5000 for a server; metric names with '.' for '/'; null = off"),
    # data: nanoGPT-style token files (flat uint16/uint32 ids, memory-mapped) or the built-in corpus
    "data.train_bin": (None, "str?", "training tokens .bin; null = the built-in corpus (generated Python-like "
                       "text, the same bytes everywhere)"),
    "data.val_bin": (None, "str?", "validation tokens .bin (set both or neither)"),
    "data.dtype": ("uint16", ("uint16", "uint32"), "token id type of the .bin files"),
    "data.vocab_size": (None, "int?", "vocab size of the .bin files (required with them; the built-in corpus: 256)"),
    "data.seq_len": (128, "int", "tokens per window: window i = tokens[i*seq_len : i*seq_len + seq_len + 1]"),
    "data.pad_token": (None, "int?", ".bin files: the padding id; a target equal to it or following it is ignored"),
    "data.too_long": ("refuse", ("refuse", "truncate", "drop"), "examples (prepare_text.py's chat, prompt/completion) "
                      "longer than data.seq_len + 1 tokens: refuse the config, truncate them or drop them (C10)"),
    "data.packing": (False, "bool", "prepare_text.py's examples: pack several to a row of data.seq_len + 1 tokens "
                     "(first-fit in data order, fixed at start), none attending across examples (block-diagonal mask, "
                     "per-example positions; built-in GPT and Hugging Face models); false = one a row, padded (C10)"),
    "data.limit": (None, "int?", "use only the first N windows of each split (debugging, --dry_run)"),
    "data.val_windows": (512, "int?", "windows each eval scores, evenly spaced over the val split; null = all"),
    "data.builtin.train_bytes": (2_000_000, "int", "built-in corpus: bytes of training text (whole files, padded)"),
    "data.builtin.val_bytes": (200_000, "int", "built-in corpus: bytes of validation text"),
    # models: GPT-style causal transformers. A run trains student.* (the built-in GPT, student.hf_dir or
    # student.target); kd.enabled true distils it from the teacher, false trains it as a plain LM (a teacher-to-be)
    "teacher.n_layer": (4, "int", "kd.enabled true: teacher blocks (must match kd.teacher_checkpoint)"),
    "teacher.n_head": (4, "int", "teacher attention heads"),
    "teacher.n_embd": (128, "int", "teacher width"),
    "student.n_layer": (2, "int", "blocks of the trained network (the student; kd.enabled false: the teacher-to-be)"),
    "student.n_head": (2, "int", "student attention heads"),
    "student.n_embd": (64, "int", "student width; a learned projection maps it to the teacher's width (kd.gamma)"),
    # models the user brings (docs/distill_models.md); null = the built-in GPT of the *.n_* keys above
    "student.hf_dir": (None, "str?", "a local Hugging Face causal-LM directory trained as the student: its weights, or "
                       "config.json alone for a random init seeded by seed (needs transformers; never downloads)"),
    "student.target": (None, "str?", "or: 'package.module:callable' returning the student nn.Module: ids [B, T] -> "
                       "logits [B, T, vocab], (logits, hidden [B, T, D]) or an output with .logits"),
    "student.kwargs": ({}, "dict", "keyword arguments for student.target's callable"),
    "teacher.target": (None, "str?", "kd.enabled true: 'package.module:callable' returning the frozen teacher "
                       "nn.Module with its weights (as student.target)"),
    "teacher.kwargs": ({}, "dict", "keyword arguments for teacher.target's callable"),
    # distillation
    "kd.enabled": (False, "bool", "false: train student.* as a plain LM (a teacher); true: distil it from the teacher"),
    "kd.alpha": (0.5, "float", "weight of the cross-entropy on the labels"),
    "kd.beta": (0.5, "float", "weight of T^2 * KL(teacher_T || student_T)"),
    "kd.gamma": (0.1, "float", "weight of the hidden-state loss through the learned projection (0: neither is built)"),
    "kd.temperature": (2.0, "float", "softmax temperature T of the KD term"),
    "kd.top_k": (None, "int?", "KD on the teacher's top-k tokens per position + a bucket for the rest; null = full KD"),
    "kd.divergence": ("forward_kl", ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"), "D(teacher_T, student_T): "
                      "forward_kl, reverse_kl (MiniLLM), jsd (GKD's generalized JSD), skew_kl (DistiLLM), tvd; "
                      "scaled by T^2 (tvd: T)"),
    "kd.jsd_beta": (0.5, "float", "jsd: GKD's beta, the teacher's weight in the mixture; 0 = forward KL, 1 = reverse"),
    "kd.skew_alpha": (0.1, "float", "skew_kl: KL(p || a p + (1 - a) q) with a = this (DistiLLM); 0 = forward KL"),
    "kd.on_policy_fraction": (0.0, "float", "GKD's lmbda: the share of micro-batches whose KD term is taken on the "
                              "student's own continuations of a prompt, scored by the teacher; 0 = off"),
    "kd.seq_kd": (False, "bool", "GKD's seq_kd: micro-batches not on-policy train on the teacher's continuation of "
                  "the prompt (sampled as the student's, up to kd.max_new_tokens), not the data; online teacher only"),
    "kd.prompt_tokens": (None, "int?", "on-policy, seq_kd: a prompt is a window's first N tokens; null = seq_len // 2"),
    "kd.max_new_tokens": (None, "int?", "on-policy, seq_kd: new tokens after the prompt; null = to the window end"),
    "kd.sample_temperature": (1.0, "float", "on-policy, seq_kd: sampling temperature, 0 = greedy (first-ranked token)"),
    "kd.eos_token": (None, "int?", "on-policy, seq_kd: the id that ends a generated sequence (nothing after it is "
                                   "generated or scored); null = a Hugging Face student's eos_token_id, else none"),
    "kd.hidden_layers": (None, "pairs?", "kd.gamma's layer map [[student_layer, teacher_layer], ...], a projection "
                         "per pair; 0 = embeddings, L = after block L (the last: final state); null = [[last, last]]"),
    "kd.teacher_checkpoint": (None, "str?", "a checkpoint of this script (best.pt or last.pt): a kd.enabled=false "
                              "run's network, or a student as the next teacher; its saved config rebuilds the network"),
    "kd.hf_teacher_dir": (None, "str?", "or: a local Hugging Face causal-LM directory with weights (transformers; "
                          "never downloads); or teacher.target: exactly one of the three with kd.enabled"),
    "kd.teacher_cache": (None, "str?", "offline KD: directory of the teacher's cached top-k (built first when absent "
                         "or incomplete, then training loads no teacher); needs kd.top_k, kd.gamma 0; null = online"),
    "kd.chunk_tokens": (0, "int", "compute the head, CE and KD terms this many positions at a time from the last "
                        "hidden states, each chunk's gradient taken in the forward (nothing recomputed), so no "
                        "[batch, seq, vocab] tensor exists (D6); 0 = off. Built-in GPT and Hugging Face models"),
    "kd.teacher_cache_dtype": ("fp32", ("fp32", "fp16"), "teacher cache values: fp32 (exactly what online top-k "
                               "uses) or fp16 (half the disk, rounded)"),
    "kd.teacher_cache_mode": ("topk", ("topk", "sampled"), "what kd.teacher_cache stores per position: topk (the "
                              "teacher's top-k + rest bucket, biased) or sampled (kd.cache_samples tokens drawn from "
                              "the teacher with importance weights: unbiased forward-KL gradient; kd.top_k null)"),
    "kd.cache_samples": (12, "int", "sampled cache: draws per position (stored: the distinct ids, their weights and "
                         "the teacher's top-1, in cache_samples + 1 slots)"),
    "kd.cache_proposal_temperature": (None, "float?", "sampled cache: the draws come from softmax(teacher / this), "
                                      "importance-weighted to the teacher at kd.temperature; null = kd.temperature"),
}
# C8: the keys that name files or directories; a relative one is read from the current directory at launch, and the
# run records it as an absolute path (absolute_paths()), so the run reads the same files from anywhere later.
PATH_KEYS = ("data.train_bin", "data.val_bin", "student.hf_dir", "kd.teacher_checkpoint", "kd.hf_teacher_dir",
             "kd.teacher_cache")


# ==== shared: config (identical in train_probe.py and train_distill.py) ====
class ConfigError(Exception):
    """Bad input. Printed as one line per problem, exit code 2, nothing written (C1-C3)."""

    def __init__(self, problems):
        self.problems = problems  # [(catalogue id, key, message)]
        super().__init__("\n".join(f"config error: {key}: {msg}" for _, key, msg in problems))


def one_line_parser(doc):
    """A command line whose wrong or missing option is one line and exit 2 (C3), not argparse's usage block."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: {message}; see --help\n")
    return parser


def _flatten(tree, schema, prefix=""):
    flat = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and schema.get(key, (None, None))[1] != "dict":  # a free-form mapping stays whole
            flat.update(_flatten(value, schema, key + "."))
        else:
            flat[key] = value
    return flat


def unflatten(flat):
    tree = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def cast_value(value, kind):
    """`value` as `kind`, or ValueError saying what was expected (C1: YAML 1.1 reads 3e-4 as a string)."""
    if isinstance(kind, str) and kind.endswith("?"):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~", "")):
            return None
        kind = kind[:-1]
    if isinstance(kind, tuple):
        for choice in kind:
            if value == choice or str(value).strip().lower() == str(choice).lower():
                return choice
        raise ValueError("one of " + ", ".join(str(c).lower() for c in kind))
    if kind in ("float", "int"):
        wanted = "a whole number" if kind == "int" else "a number"  # C1: batch_size 'lots' wants a whole one
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError
            number = float(value)
        except ValueError:
            raise ValueError(wanted) from None
        if not math.isfinite(number):
            raise ValueError("a finite number")
        if kind == "int" and number != int(number):
            raise ValueError(wanted)
        return int(number) if kind == "int" else number
    if kind == "bool":
        text = str(value).strip().lower()  # True -> 'true'
        if text not in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            raise ValueError("true or false")
        return text in ("true", "yes", "on", "1")
    if kind == "str":
        if isinstance(value, (dict, list)) or value is None:
            raise ValueError("a string")
        return str(value)
    if kind in ("floats", "strs"):  # a list of float / str
        if not isinstance(value, (list, tuple)) or (kind == "strs" and not value):
            raise ValueError("a list of numbers such as [0.9, 0.999]" if kind == "floats" else
                             "a list of names such as [FP1, FP2]")
        return [cast_value(v, kind[:-1]) for v in value]
    if kind == "pairs":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (list, tuple)) and len(v) == 2 for v in value):
            raise ValueError("a list of pairs such as [[1, 2], [2, 4]]")
        return [[cast_value(a, "int"), cast_value(b, "int")] for a, b in value]
    if kind == "dict":
        if value is not None and not isinstance(value, dict):
            raise ValueError("a mapping")
        return {} if value is None else value
    raise AssertionError(f"unknown kind {kind}")


# C2: names other trainers use for a key's last part (a top-level `lr:`, `optim.learning_rate`).
KEY_ALIASES = {"learning_rate": "lr", "max_lr": "lr", "maxlr": "lr", "peak_lr": "lr", "wd": "weight_decay",
               "num_epochs": "epochs", "max_epochs": "epochs", "warmup_steps": "warmup", "warmup_ratio": "warmup",
               "accumulate_grad_batches": "grad_accum", "gradient_accumulation_steps": "grad_accum"}


def closest_key(key, schema):
    """C2: the valid key a misspelt one most likely meant, or None: one whose last part is the key's last part (or
    its usual alias), the same section first; else the closest spelling of the whole dotted key."""
    *section, leaf = key.split(".")
    leaf = KEY_ALIASES.get(leaf.lower(), leaf.lower())
    same_leaf = [k for k in schema if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return next((k for k in same_leaf if k.split(".")[:-1] == section), same_leaf[0])
    close = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.6)
    return close[0] if close else None


def yaml_error_text(err):
    """Where and why a YAML file does not parse: 'line 3, column 7: mapping values are not allowed here'."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + (getattr(err, "problem", None) or str(err).splitlines()[0])


def read_yaml(path, schema):
    """The config file as a nested dict, read as written. A key given twice is an error: YAML would keep the second
    silently (C2). A string-typed key keeps the text written (YAML 1.1 reads run_name: 007 as 7, 12:30 as 750, yes
    as True), and one cut short by ' #' (a comment) is an error (C1)."""
    try:
        with open(path) as f:
            text = f.read()
    except UnicodeDecodeError as err:  # C3: a Latin-1 or binary file (was a UnicodeDecodeError traceback)
        raise ConfigError([("C3", path, f"is not {err.encoding} text ({err.reason} at byte {err.start}); save it as "
                            f"{err.encoding}")]) from None
    lines = text.splitlines()
    loader = yaml.SafeLoader(text)
    problems = []

    def build(node, prefix):
        if isinstance(node, yaml.MappingNode):
            first = {}
            for key_node, _ in node.value:
                name = loader.construct_object(key_node, deep=True)
                if name in first and name != "<<":
                    problems.append(("C2", f"{prefix}{name}", f"appears twice in {path}, at lines {first[name]} and "
                                     f"{key_node.start_mark.line + 1}; YAML would keep the second and drop the first "
                                     "silently: merge them into one"))
                first.setdefault(name, key_node.start_mark.line + 1)
            loader.flatten_mapping(node)  # `<<: *anchor` merges: explicit keys win over merged ones, as in YAML
            return {name: build(value, f"{prefix}{name}.") for name, value in
                    ((loader.construct_object(k, deep=True), v) for k, v in node.value)}
        key = prefix[:-1]
        plain = isinstance(node, yaml.ScalarNode) and node.style is None
        if key in schema and schema[key][1] in ("str", "str?") and plain and not node.tag.endswith(":null"):
            rest = lines[node.end_mark.line][node.end_mark.column:] if node.end_mark.line < len(lines) else ""
            if re.match(r"\s+#\S", rest):
                written = node.value + rest.rstrip()
                problems.append(("C1", key, f"line {node.end_mark.line + 1} of {path}: YAML reads {written.strip()!r} "
                                 f"as {node.value!r} (' #' starts a comment); quote the value: "
                                 f"{key.rsplit('.', 1)[-1]}: \"{written.strip()}\""))
            return node.value  # the text as written, not YAML 1.1's int, float, bool or date
        return loader.construct_object(node, deep=True)

    try:
        root = loader.get_single_node()
        tree = {} if root is None else build(root, "")
    except (yaml.YAMLError, ValueError) as err:  # ValueError: a date-like value that is no date (2024-13-01)
        raise ConfigError([("C3", path, f"is not valid YAML ({yaml_error_text(err)}); fix the syntax there")]) from None
    finally:
        loader.dispose()
    if problems:
        raise ConfigError(problems)
    return tree


def literal_text(text, string=True):
    """--set key=TEXT's value as YAML reads TEXT; for a string-typed key the text as typed (C1: run_name=007 stays
    '007'), unquoted when it is a quoted YAML string. Empty, null or ~ is null; TEXT that is no YAML is itself."""
    try:
        node = yaml.compose(text)
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
            return None
        if string and isinstance(node, yaml.ScalarNode):
            return node.value if node.style else text.strip()
        return yaml.safe_load(text)  # a list or mapping for a string: cast_value says a string was expected
    except yaml.YAMLError:
        return text.strip() if string else text


def load_config(path, overrides, schema, base=None):
    """YAML + `--set key=value` on `base` (--evaluate: the run's config, C8) or the defaults -> ({dotted.key: typed
    value}, notes such as a string read as a number (C1)); ConfigError lists every problem at once (C1, C2)."""
    raw = {}
    if path:
        if not os.path.isfile(path) or not os.access(path, os.R_OK):  # C3: one line, never open()'s traceback
            said = (f"{path} is a directory; give the path of a YAML config file" if os.path.isdir(path) else
                    f"file {path} may not be read (permission denied); fix its permissions" if os.path.exists(path)
                    else f"file {path} not found; give the path of a YAML config")
            raise ConfigError([("C3", "--config", said)])
        raw = read_yaml(path, schema)
        if not isinstance(raw, dict) or raw == {}:  # C3: an empty file trained the defaults without a word
            raise ConfigError([("C3", path, "is empty (no keys); write the keys to change in it, or omit --config to "
                                "train the defaults" if raw == {} else "must be a YAML mapping of keys to values")])
    flat = {**(base or {}), **_flatten(raw, schema)}
    problems, notes, typed_on_set = [], [], set()
    for item in overrides or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(("C3", "--set", f"'{item}' is not key=value"))
            continue
        value = literal_text(text, key in schema and schema[key][1] in ("str", "str?"))  # C1: run_name=007 stays '007'
        mapping = next((k for k in schema if schema[k][1] == "dict" and key.startswith(k + ".")), None)
        if key not in schema and mapping:  # backbone.kwargs.depth=4: one entry inside a free-form mapping
            base = flat.get(mapping, schema[mapping][0])  # the YAML's mapping, else the default (copied, never edited)
            node = flat[mapping] = dict(base) if isinstance(base, dict) else {}
            *parents, leaf = key[len(mapping) + 1:].split(".")
            for part in parents:
                node[part] = node = dict(node[part]) if isinstance(node.get(part), dict) else {}
            node[leaf] = value
        else:
            flat[key] = value
            typed_on_set.add(key)
    sections = {key.split(".")[0] for key in schema if "." in key}
    for section in dict.fromkeys(key.split(".")[0] for key in flat if key not in schema and "." in key):
        if section not in sections and section not in schema:  # C2: one line per mistyped section (trian:)
            keys = [key for key in flat if key.startswith(section + ".")]
            close = difflib.get_close_matches(section, sorted(sections), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"the sections are {', '.join(sorted(sections))}"
            problems.append(("C2", section, f"unknown section ({len(keys)} key{'s' * (len(keys) > 1)}: "
                             f"{', '.join(k[len(section) + 1:] for k in keys)}); {hint}"))
            flat = {key: value for key, value in flat.items() if key not in keys}
    for key in flat:
        if key not in schema:
            close = closest_key(key, schema)
            hint = f"; did you mean {close}?" if close else "; --help_config lists every key"
            problems.append(("C2", key, f"unknown key{hint}"))
    # S2: of train.max_steps and train.epochs the one named later (--set over the file, the file over the defaults)
    # sets the length, as the HF Trainer's max_steps does; the other steps aside, with a note. Both at one level: C3.
    for key, other in (("train.max_steps", "train.epochs"), ("train.epochs", "train.max_steps")):
        later = key in typed_on_set and other not in typed_on_set and flat.get(other) is not None
        unnamed = key == "train.max_steps" and other not in flat
        if other in schema and flat.get(key) is not None and (later or unnamed):
            was = f"the config file's {flat[other]}" if other in flat else f"its default {schema[other][0]}"
            flat[other] = None
            notes.append(("S2", other, f"null instead of {was}: {key} {flat[key]} sets the run's length"))
    cfg = {}
    for key, (default, kind, _doc) in schema.items():
        value = flat.get(key, default)
        try:
            cfg[key] = cast_value(value, kind)
        except ValueError as err:
            problems.append(("C1", key, f"got {value!r}, expected {err}"))
            continue
        # C1: a file's `3e-4` is text to YAML 1.1 (and other readers); a number typed on --set is cast without a note
        if (isinstance(value, str) and kind in ("float", "int", "float?", "int?") and cfg[key] is not None
                and key not in typed_on_set):
            notes.append(("C1", key, f"the string {value!r} was read as the number {cfg[key]!r}"))
    if problems:
        raise ConfigError(problems)
    return cfg, notes


KIT_TASKS = {"probe": "train_probe.py", "distill": "train_distill.py"}  # the config's `task` -> its script


def common_value_problems(cfg, task):
    """Values of the keys both scripts have that would only fail hours later (C3)."""
    p = []

    def require(ok, key, msg, row="C3"):
        if not ok:
            p.append((row, key, f"{cfg.get(key)!r} {msg}"))

    if cfg["task"] in KIT_TASKS:
        require(cfg["task"] == task, "task", f"is not '{task}'; run this config with {KIT_TASKS[cfg['task']]}")
    else:
        close = difflib.get_close_matches(cfg["task"], list(KIT_TASKS), n=1, cutoff=0.5)
        require(False, "task", "is not a task of this kit (" + ", ".join(f"{t} = {s}" for t, s in KIT_TASKS.items())
                + ")" + (f"; did you mean {close[0]} ({KIT_TASKS[close[0]]})?" if close else ""))
    require(cfg["seed"] >= 0, "seed", "must be >= 0")
    require(cfg["optim.lr"] > 0, "optim.lr", "must be > 0")
    require(cfg["optim.weight_decay"] >= 0, "optim.weight_decay", "must be >= 0")
    require(len(cfg["optim.betas"]) == 2 and all(0 <= b < 1 for b in cfg["optim.betas"]),
            "optim.betas", "must be two numbers in [0, 1)")
    require(cfg["optim.momentum"] >= 0, "optim.momentum", "must be >= 0")
    require(cfg["schedule.warmup"] >= 0, "schedule.warmup", "must be >= 0 (a fraction < 1 or optimizer steps)", "S3")
    require(cfg["schedule.warmup"] < 1 or cfg["schedule.warmup"] == int(cfg["schedule.warmup"]),
            "schedule.warmup", "must be a fraction < 1 or a whole number of optimizer steps", "S3")
    require(cfg["schedule.div_factor"] >= 1, "schedule.div_factor", "must be >= 1")
    require(cfg["schedule.final_div_factor"] >= 1, "schedule.final_div_factor", "must be >= 1")
    require(0 <= cfg["schedule.final_lr_ratio"] <= 1, "schedule.final_lr_ratio", "must be in [0, 1]")
    require(0 < cfg["schedule.decay"] < 1, "schedule.decay", "must be in (0, 1)")
    require((cfg["train.epochs"] is None) != (cfg["train.max_steps"] is None), "train.epochs",
            "and train.max_steps: set exactly one of them (the other null)")
    for key in ("train.epochs", "train.max_steps", "train.eval_every", "train.save_every_steps",
                "train.patience", "schedule.total_steps"):
        require(cfg[key] is None or cfg[key] >= 1, key, "must be >= 1 or null")
    for key in ("train.batch_size", "train.grad_accum", "train.log_every", "train.max_bad_steps",
                "train.eval_batch_size"):
        require(cfg[key] >= 1, key, "must be >= 1")
    require(cfg["train.num_workers"] >= 0, "train.num_workers", "must be >= 0")
    require(cfg["train.progress_every_s"] >= 0, "train.progress_every_s", "must be >= 0 (seconds)")
    sinks = metric_sinks(cfg)  # E10: the companion is loaded here, at start-up, when a sink is on
    p += sinks.sink_problems(cfg) if sinks else []
    for key in ("train.save_every_minutes", "train.clip_grad_norm"):
        require(cfg[key] is None or cfg[key] > 0, key, "must be > 0 or null")
    require(0 < cfg["train.max_loss_share"] <= 1, "train.max_loss_share", "must be in (0, 1]")
    for key in ("expect.initial_lr", "expect.peak_lr", "expect.final_lr"):
        require(cfg[key] is None or cfg[key] >= 0, key, "must be >= 0 or null")
    if cfg["train.device"] == "cuda" and not torch.cuda.is_available():
        p.append(("C3", "train.device", "'cuda' but no CUDA device is visible; use auto or cpu"))
    return p


def check_file(cfg, key, problems, suffixes):
    """A data/model path must exist before anything heavy starts (C3)."""
    path = cfg[key]
    if path is not None and not os.path.exists(path):
        # Not "set it to null": for a data key null means synthetic data, never what a missing file meant.
        where = "" if os.path.isabs(path) else f" (a relative path is read from the current directory, {os.getcwd()})"
        folder = os.path.dirname(path)  # C3: no such directory at all: the data was never made here (stage 1)
        fix = (f"its directory {folder} does not exist: make the data first (the README's stage 1, {PREPARE_TOOL} "
               f"--out {folder}), or fix the path" if key.startswith("data.") and folder and not os.path.isdir(folder)
               else "fix the path")
        problems.append(("C3", key, f"file {path} not found{where}; {fix}"))
    elif path is not None and (not os.path.isfile(path) or not os.access(path, os.R_OK)):  # C3: never a traceback
        problems.append(("C3", key, f"file {path} may not be read (permission denied); fix its permissions" if
                         os.path.isfile(path) else f"{path} is a directory, not a file; fix the path"))
    elif path is not None and suffixes and not path.endswith(suffixes):
        problems.append(("C3", key, f"{path} should end with {' or '.join(suffixes)}"))


def config_reference(schema, script, companions):
    """--help_config: every key with its default, type and meaning, straight from CONFIG, grouped by section; a key
    that loads a companion file names it (C3: the script's COMPANION_KEYS, the one table of which key needs which)."""
    def text(value):
        return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...").strip()

    def kind_text(kind):
        if isinstance(kind, tuple):
            return " | ".join(text(choice) for choice in kind)
        return kind[:-1] + " or null" if kind.endswith("?") else kind

    rows = [(key, text(default), kind_text(kind), doc + (f" [set: needs {companions[key]}.py beside {script}]" if key in
             companions else "")) for key, (default, kind, doc) in schema.items()]
    widths = [max(len(row[0]) for row in rows), max(len(row[1]) for row in rows),
              max(len(row[2]) for row in rows if len(row[2]) <= 24)]  # a longer list of choices: the doc below it
    lines = [f"{script}: every config key, its default, its type and its meaning. A YAML file of nested keys",
             "(optim: {lr: 5.0e-4}) and --set key=value (--set optim.lr=5e-4 train.grad_accum=4) override the",
             "defaults; unknown keys are errors (C2), values are cast to their type or rejected (C1).",
             "Row ids (S1, R4, C2, ...) are explained in FAILURE_MODES.md."]
    sections = {}  # each section once, in the order CONFIG first names it (its keys need not be adjacent there)
    for row in rows:
        sections.setdefault(row[0].partition(".")[0] if "." in row[0] else "top level", []).append(row)
    for section, members in sections.items():
        lines.append("\n" + section)
        for key, default, kind, doc in members:
            if len(kind) > widths[2]:
                lines += [f"  {key:<{widths[0]}}  {default:<{widths[1]}}  {kind}", " " * (8 + sum(widths)) + doc]
            else:
                lines.append(f"  {key:<{widths[0]}}  {default:<{widths[1]}}  {kind:<{widths[2]}}  {doc}")
    return "\n".join(lines)


def write_stdout(text, bar=None):
    """A line to stdout (above a tqdm bar), flushed at once: a SIGKILL loses no line a pipe's buffer held. False when
    stdout is closed (`| head` exited): it then points at /dev/null, so no later write or the exit fails (R8)."""
    try:
        if bar is not None:
            bar.write(text, file=sys.stdout)
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return True
    except (OSError, ValueError):
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return False


def absolute_paths(cfg, path_keys):
    """C8: the config as a run records it: path keys absolute (a relative one means the launch directory) and that
    directory as launch_dir, so whatever reads the run later reads the same files and *.target modules anywhere."""
    out = {k: os.path.abspath(v) if k in path_keys and isinstance(v, str) else v for k, v in cfg.items()}
    if "launch_dir" in out:
        out["launch_dir"] = out["launch_dir"] or os.getcwd()
    return out


def import_target(target, key, launch_dir=None):
    """'package.module:callable' (a *.target key) -> the callable, from the working directory too (the user's model
    code sits there; python scripts/x.py puts only scripts/ on sys.path), then launch_dir (C8: used from elsewhere)."""
    module_name, _, attr = target.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(1, os.getcwd())  # after the script's own directory, as python -m would have it
    for attempt in range(2):
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
            return obj
        except (ImportError, AttributeError) as err:
            error = err
        if attempt or not (isinstance(error, ModuleNotFoundError) and launch_dir and os.path.isdir(launch_dir)
                           and launch_dir not in sys.path and error.name == module_name.split(".")[0]):
            break
        sys.path.append(launch_dir)  # C8: last, so nothing the current setup imports changes
        importlib.invalidate_caches()
    where = f"importable from {os.getcwd()} or PYTHONPATH"
    if launch_dir and os.path.realpath(launch_dir) != os.path.realpath(os.getcwd()):
        where += (f"; the run was launched from {launch_dir}" + ("" if os.path.isdir(launch_dir) else ", which is not "
                  "on this machine") + ": add the directory that holds the module to PYTHONPATH")
    raise ConfigError([("C3", key, f"cannot import {target} ({type(error).__name__}: {error}); the module must be "
                        f"{where}")]) from None


# Companion files: an optional feature (metric sinks, FSDP) lives in a file of the kit beside the script, loaded once
# at start-up when the config asks for it; a script copied alone runs without them while no such feature is on.
COMPANIONS = {}  # name -> the module this script loaded (each script keeps its own: both may share one process)


def companion(name, feature, fix=None):
    """<name>.py from this script's directory (never sys.path: a user's module of that name cannot stand in), given
    this script as `kit` (its log(), atomic_save(), ConfigError). Missing: one line naming the file, exit 2 (C3)."""
    if name not in COMPANIONS:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
        if not os.path.isfile(path):
            raise ConfigError([("C3", feature, f"needs {name}.py beside {os.path.basename(__file__)} (copy it from "
                                f"the kit), or {fix or f'leave {feature} unset'}")])
        spec = importlib.util.spec_from_file_location(f"{__name__}.{name}", path)
        module = importlib.util.module_from_spec(spec)
        own = sys.modules.get(__name__)  # this script; loaded without registering it (launch.sh's preflight): its names
        module.kit = own if getattr(own, "__dict__", None) is globals() else argparse.Namespace(**globals())
        spec.loader.exec_module(module)
        COMPANIONS[name] = module
    return COMPANIONS[name]
# ==== end shared: config ====


def problem_check(problems):
    """require(ok, key, msg, row="C3"): adds the problem (row, key, msg) to problems unless ok."""
    def require(ok, key, msg, row="C3"):
        if not ok:
            problems.append((row, key, msg))
    return require


def resolve_config(path=None, overrides=(), check_files=True, base=None):
    """The distillation config: load, cast, validate. Tools import this so they judge what training runs."""
    cfg, notes = load_config(path, overrides, CONFIG, base)
    problems = common_value_problems(cfg, TASK)
    # C3: the companion files the config turns on load first: a missing one is one line before anything is written
    sharding(cfg), chunking(cfg), caching(cfg), packing(cfg), generating(cfg), divergences(cfg)
    for key in hf_dir_keys(cfg):  # C3: hf_models.py for a Hugging Face directory, loaded here as well
        hf_models(key)
    for key in built_model_keys(cfg, "student.target", "teacher.target"):  # C3: user_models.py for a callable too
        user_models(key)
    require = problem_check(problems)
    data_problems(cfg, problems, check_files)
    network_and_kd_value_problems(cfg, problems, notes)
    model_source_problems(cfg, problems, check_files)
    require(cfg["kd.chunk_tokens"] >= 0, "kd.chunk_tokens", f"{cfg['kd.chunk_tokens']!r} must be >= 0 (0 = off)")
    metrics = ("val/loss", "val/ppl") + (("val/agreement",) if cfg["kd.enabled"] else ())
    require(cfg["train.best_metric"] in metrics, "train.best_metric",
            f"{cfg['train.best_metric']!r} is not one of {', '.join(metrics)}")
    if problems:
        raise ConfigError(problems)
    return absolute_paths(cfg, PATH_KEYS), notes


def data_problems(cfg, problems, check_files):
    """C3: the token files (or the built-in corpus) and their sizes, added to problems."""
    require = problem_check(problems)
    bins = cfg["data.train_bin"] is not None
    require(bins == (cfg["data.val_bin"] is not None), "data.val_bin",
            "set data.train_bin and data.val_bin both (token files) or neither (the built-in corpus)")
    if check_files:
        for key in ("data.train_bin", "data.val_bin"):
            check_file(cfg, key, problems, (".bin",))
    teacher = cfg["kd.teacher_checkpoint"]  # with kd.enabled false, model_source_problems refuses the key itself
    if check_files and cfg["kd.enabled"] and teacher is not None:
        require(os.path.exists(teacher), "kd.teacher_checkpoint",
                f"file {teacher} not found; {how_to_make_teacher(teacher)}")
    require(cfg["data.seq_len"] >= 1, "data.seq_len", f"{cfg['data.seq_len']!r} must be >= 1")
    vocab = vocab_size(cfg)
    if bins:
        limit = 2 ** (16 if cfg["data.dtype"] == "uint16" else 32)
        require(vocab is not None, "data.vocab_size", "null, but .bin token files need their vocabulary size "
                                                      "(e.g. 50257 for GPT-2 ids); set it")
        require(vocab is None or 2 <= vocab <= limit, "data.vocab_size",
                f"{vocab!r} must be in 2..{limit} for {cfg['data.dtype']} token ids")
        pad = cfg["data.pad_token"]
        require(pad is None or vocab is None or 0 <= pad < vocab, "data.pad_token",
                f"{pad!r} must be an id in 0..vocab_size-1 or null")
        if check_files and not problems:
            problems += prepared_text_problems(cfg)
            for key in [k for k in ("data.train_bin", "data.val_bin") if k not in {p[1] for p in problems}]:
                size, item = os.path.getsize(cfg[key]), np.dtype(cfg["data.dtype"]).itemsize
                require(size % item == 0, key,
                        f"{cfg[key]} has {size} bytes, not a whole number of {cfg['data.dtype']} ids; check data.dtype")
                # C10: a split of examples (rows of their own, padded) may hold fewer tokens than one row
                require(size // item > cfg["data.seq_len"] or example_bounds(cfg, key[5:-4]) is not None, key,
                        f"{cfg[key]} holds {size // item} tokens, fewer than one window of data.seq_len + 1 = "
                        f"{cfg['data.seq_len'] + 1}")
    else:
        require(cfg["data.vocab_size"] in (None, 256), "data.vocab_size",
                f"{cfg['data.vocab_size']!r}, but the built-in corpus is bytes (256); set it to null")
        require(cfg["data.pad_token"] is None, "data.pad_token",
                "is for .bin files; the built-in corpus pads with byte 0 itself; set it to null")
        for key in ("data.builtin.train_bytes", "data.builtin.val_bytes"):
            require(cfg[key] > cfg["data.seq_len"], key, f"{cfg[key]!r} must exceed data.seq_len")
        if check_files:
            problem = builtin_corpus_problem()
            require(problem is None, "data.train_bin", problem)
    for key in ("data.limit", "data.val_windows"):
        require(cfg[key] is None or cfg[key] >= 1, key, f"{cfg[key]!r} must be >= 1 or null")
    if cfg["data.packing"]:  # C10: what cannot be packed (packing.py)
        problems += packing(cfg).packing_problems(cfg, check_files and bins and not problems)


def network_and_kd_value_problems(cfg, problems, notes):
    """C3: the built-in networks' shapes, the KD weights, temperature, top-k and objective, added to problems."""
    require = problem_check(problems)
    vocab = vocab_size(cfg)
    for role in ("teacher", "student"):
        for dim in ("n_layer", "n_head", "n_embd"):
            require(cfg[f"{role}.{dim}"] >= 1, f"{role}.{dim}", f"{cfg[f'{role}.{dim}']!r} must be >= 1")
        require(cfg[f"{role}.n_embd"] % max(cfg[f"{role}.n_head"], 1) == 0, f"{role}.n_embd",
                f"{cfg[f'{role}.n_embd']} is not divisible by {role}.n_head {cfg[f'{role}.n_head']}")
    require(cfg["kd.temperature"] > 0, "kd.temperature", f"{cfg['kd.temperature']!r} must be > 0")
    for key in ("kd.alpha", "kd.beta", "kd.gamma"):
        require(cfg[key] >= 0, key, f"{cfg[key]!r} must be >= 0")
    k = cfg["kd.top_k"]
    require(k is None or (k >= 1 and (vocab is None or k <= vocab)), "kd.top_k",
            f"{k!r} must be in 1..vocab size ({vocab}) or null (full KD)")
    problems += objective_problems(cfg, notes)


def model_source_problems(cfg, problems, check_files):
    """C3: where the trained network and the teacher come from (one source each; an offline cache; Hugging Face
    directories; the teacher checkpoint's window length), added to problems."""
    require = problem_check(problems)
    # the models: at most one source of the trained network (student.*), exactly one teacher source with KD
    for key in ("student.target", "teacher.target"):
        require(cfg[key] is None or re.fullmatch(r"[\w.]+:[\w.]+", cfg[key]) is not None, key,
                f"{cfg[key]!r} must look like 'package.module:callable'")
    require(cfg["student.hf_dir"] is None or cfg["student.target"] is None, "student.target",
            "and student.hf_dir are both set; set at most one (both null = the built-in GPT of student.n_*)")
    for role in ("student", "teacher"):  # a key that would be ignored is an error: the user meant something by it
        require(not cfg[f"{role}.kwargs"] or cfg[f"{role}.target"] is not None, f"{role}.kwargs",
                f"is set but {role}.target is null, so nothing would use it; set {role}.target or remove {role}.kwargs")
    sources = [key for key in ("kd.teacher_checkpoint", "kd.hf_teacher_dir", "teacher.target") if cfg[key] is not None]
    cache = cfg["kd.teacher_cache"]
    if cfg["kd.enabled"]:
        require(max(cfg["kd.alpha"], cfg["kd.beta"], cfg["kd.gamma"]) > 0, "kd.alpha",  # a sum said it of alpha -5
                "kd.alpha, kd.beta and kd.gamma are all 0")
        require(len(sources) == 1 or (cache is not None and not sources), "kd.teacher_checkpoint",
                "kd.enabled is true: set exactly one of kd.teacher_checkpoint (a checkpoint of this script), "
                "kd.hf_teacher_dir and teacher.target (with a complete kd.teacher_cache, none is needed)"
                + (f"; now set: {', '.join(sources)}" if sources else ""))
        problems += caching(cfg).cache_problems(cfg) if caching(cfg) else []  # offline KD: teacher_cache.py's checks
    else:  # plain LM training of student.*: every teacher and KD key would be ignored, so one set is an error
        for key in teacher_keys_set(cfg):
            problems.append(("C3", key, f"is set ({cfg[key]!r}), but kd.enabled is false: this run trains student.* "
                             "as a plain language model with no teacher; remove it, or set kd.enabled=true"))
    for key in hf_dir_keys(cfg):
        problems += hf_models(key).source_problems(cfg, key, check_files)
    if check_files and cfg["kd.enabled"] and cfg["kd.teacher_checkpoint"] and not problems:
        try:  # the checkpoint's window length and, for a Hugging Face network, its directory's limits (--dry_run too)
            saved = read_teacher_checkpoint(cfg)["config"]
            hf = trained_arch(saved).get("hf_dir")
            if hf is not None:
                problems += hf_models("kd.teacher_checkpoint", HF_CHECKPOINT_FIX).saved_dir_problems(cfg, hf)
        except ConfigError as err:
            problems += err.problems


def objective_problems(cfg, notes):
    """The distillation objective's keys (kd.divergence and its parameters, on-policy data, the layer map):
    values and combinations that cannot work, as (row, key, message); notes for keys a run ignores."""
    p, k, cache = [], cfg["kd.top_k"], cfg["kd.teacher_cache"]

    def require(ok, key, msg, row="C3"):
        if not ok:
            p.append((row, key, f"{cfg[key]!r} {msg}"))

    require(0 <= cfg["kd.jsd_beta"] <= 1, "kd.jsd_beta", "must be in [0, 1] (0 = forward KL, 1 = reverse KL)")
    require(0 <= cfg["kd.skew_alpha"] < 1, "kd.skew_alpha",
            "must be in [0, 1) (0 = forward KL; 1 would compare p with itself)")
    require(cfg["kd.cache_samples"] >= 1, "kd.cache_samples", "must be >= 1 (draws per position)")
    require(cfg["kd.cache_proposal_temperature"] is None or cfg["kd.cache_proposal_temperature"] > 0,
            "kd.cache_proposal_temperature", "must be > 0, or null (= kd.temperature)")
    if cfg["kd.enabled"] and cfg["kd.teacher_cache_mode"] == "sampled":
        require(cache is not None, "kd.teacher_cache_mode",
                "needs kd.teacher_cache, the directory the draws are stored in: set it, or kd.teacher_cache_mode=topk "
                "(the default)")
        require(k is None, "kd.top_k",
                "set, but a sampled kd.teacher_cache stores kd.cache_samples draws per position, not the top-k: set "
                "kd.top_k=null")
    p += divergences(cfg).divergence_problems(cfg) if divergences(cfg) else []  # E12: divergences.py's checks
    p += chunking(cfg).chunk_problems(cfg) if chunking(cfg) else []  # C3: what the chunked loss cannot compute
    p += generating(cfg).generation_problems(cfg, notes, require) if generating(cfg) else []  # E14
    layers = cfg["kd.hidden_layers"]
    if layers is not None:
        require(len(layers) >= 1 and all(s >= 0 and t >= 0 for s, t in layers), "kd.hidden_layers",
                "must be pairs [student_layer, teacher_layer] of layers >= 0 (0 = embeddings), at least one")
        if not (cfg["kd.enabled"] and cfg["kd.gamma"] > 0):  # each network's depth is checked when it is built
            notes.append(("C3", "kd.hidden_layers",
                          "is ignored: the hidden-state term is off (kd.gamma 0 or kd.enabled false)"))
    return p


def teacher_keys_set(cfg):
    """The teacher.* and kd.* keys (kd.enabled aside) a config sets to other than their defaults: only a
    distillation (kd.enabled true) reads them."""
    return [key for key in CONFIG if key.split(".")[0] in ("teacher", "kd") and key not in ("kd.enabled",
                                                                                            "kd.chunk_tokens")
            and cfg[key] != CONFIG[key][0]]  # kd.chunk_tokens chunks a plain LM's CE too


def transformers_installed():
    return importlib.util.find_spec("transformers") is not None


def tokenizer_digest(tokenizer):
    """C10: sha256 of a tokenizer's id -> token map (its added tokens too): what the token ids mean, whatever else
    its files hold. prepare_text.py records it in manifest.json; runs compare it with the models' tokenizers."""
    pairs = sorted(tokenizer.get_vocab().items(), key=lambda pair: pair[1])
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()


def hf_config_value(config, names):
    """(name, value) of the first of `names` a Hugging Face config (a dict or a config object) sets, looking
    into a nested text_config too; (None, None) when it sets none."""
    get = config.get if isinstance(config, dict) else lambda name, default=None: getattr(config, name, default)
    for name in names:
        if isinstance(get(name), int):
            return name, get(name)
    text = get("text_config")
    return hf_config_value(text, names) if text else (None, None)


# ==== shared: schedule (identical in train_probe.py and train_distill.py) ====
def optimizer_steps_per_epoch(num_samples, batch_size, grad_accum, world_size=1):
    """S2/G1: the kit's accumulation rule, here and nowhere else. A micro-batch is batch_size samples on each of
    world_size processes; a step takes grad_accum micro-batches, and the last, possibly short, group steps once."""
    micro_batches = math.ceil(num_samples / (batch_size * world_size))
    return math.ceil(micro_batches / grad_accum)


def dry_run_epochs(num_samples, world_size):
    """E5: the epochs a dry run's tiny run (batch 4 x accum 2: DRY_RUN_SETTINGS) needs to reach its evals at steps 3
    and 6 and its stop at step 5 before its end, on however few windows the data has (2 at the least)."""
    return max(2, math.ceil(7 / optimizer_steps_per_epoch(num_samples, 4, 2, world_size)))


def plan_schedule(cfg, num_samples, world_size=1):
    """Derive every step count from the data (S2, S3, S7): never hand-typed, so never inconsistent."""
    batch, accum = cfg["train.batch_size"], cfg["train.grad_accum"]
    micro = math.ceil(num_samples / (batch * world_size))
    per_epoch = optimizer_steps_per_epoch(num_samples, batch, accum, world_size)
    steps = cfg["train.max_steps"]  # S2: when set, it is the run's length; else the epochs are
    epochs = cfg["train.epochs"] if steps is None else math.ceil(steps / per_epoch)
    total = per_epoch * epochs if steps is None else steps
    warmup = cfg["schedule.warmup"]
    warmup_steps = round(warmup * total) if warmup < 1 else int(warmup)  # S3: always optimizer steps
    plan = {"num_samples": num_samples, "world_size": world_size, "batch_size": batch, "grad_accum": accum,
            "micro_batches_per_epoch": micro, "steps_per_epoch": per_epoch, "epochs": epochs,
            "total_steps": total, "warmup_steps": warmup_steps}
    problems = []
    given = cfg["schedule.total_steps"]
    if given is not None and given != total:
        problems.append(("S2", "schedule.total_steps", f"is {given} but the run has {total} optimizer steps "
                         f"({given / total:.3g}x; micro-batches per epoch {micro}, accumulation {accum}); "
                         "set it to null"))
    if total < 2:
        problems.append(("C3", "train.max_steps", f"the run has {total} optimizer step(s); it needs at least 2"))
    elif warmup_steps >= total:
        problems.append(("S3", "schedule.warmup", f"{warmup_steps} warmup steps but the run has only {total} "
                         "optimizer steps; warmup is counted in optimizer steps, not micro-batches"))
    elif cfg["schedule.type"] == "onecycle" and warmup_steps < 2:
        problems.append(("S3", "schedule.warmup", f"onecycle needs at least 2 warmup steps, got {warmup_steps}"))
    if problems:
        raise ConfigError(problems)
    return plan


def run_length_text(cfg, plan):
    """How the run's length follows (S2): from train.epochs, or train.max_steps (the epochs then are what it covers)."""
    total, per_epoch = plan["total_steps"], plan["steps_per_epoch"]
    if cfg["train.max_steps"] is not None:
        return (f"train.max_steps sets the length: {total} optimizer steps ({total / per_epoch:.3g} epochs of "
                f"{per_epoch}) (S2)")
    return f"x {plan['epochs']} epochs = {total} optimizer steps (S2)"


def build_optimizer(cfg, param_groups):
    if cfg["optim.name"] == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg["optim.lr"], betas=tuple(cfg["optim.betas"]),
                                 weight_decay=cfg["optim.weight_decay"])
    return torch.optim.SGD(param_groups, lr=cfg["optim.lr"], momentum=cfg["optim.momentum"],
                           weight_decay=cfg["optim.weight_decay"])


def build_schedule(optimizer, cfg, plan):
    """The LR schedule from torch's own schedulers (S5, S6): step 1 at lr / div_factor, step w of w >= 2 warmup steps
    at the peak, the last step at the floor. The caller steps it once after every optimizer step, nowhere else (S1)."""
    from torch.optim import lr_scheduler as sched
    lr, kind = cfg["optim.lr"], cfg["schedule.type"]
    total, warm = plan["total_steps"], plan["warmup_steps"]
    if kind == "onecycle":
        # S5: torch's floor is max_lr / (div_factor * final_div_factor); S4: momentum cycling is opt-in.
        return sched.OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=warm / total,
                                anneal_strategy=cfg["schedule.anneal"], div_factor=cfg["schedule.div_factor"],
                                final_div_factor=cfg["schedule.final_div_factor"],
                                cycle_momentum=cfg["schedule.cycle_momentum"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SequentialLR's own construction-time deprecation notes
        phases, milestones = [], []
        start = warm - 1 if warm >= 2 else 0  # index of the first step at the peak
        if warm >= 2:
            phases.append(sched.LinearLR(optimizer, start_factor=1 / cfg["schedule.div_factor"],
                                         end_factor=1.0, total_iters=start))
            milestones.append(start)
        span = total - 1 - start  # steps from the peak to the last step, which lands on the floor
        floor = cfg["schedule.final_lr_ratio"]
        if kind == "cosine":
            phases.append(sched.CosineAnnealingLR(optimizer, T_max=span, eta_min=lr * floor))
        elif kind == "linear":
            phases.append(sched.LinearLR(optimizer, start_factor=1.0, end_factor=floor, total_iters=span))
        elif kind == "wsd":
            decay = max(1, min(span, round(cfg["schedule.decay"] * total)))
            if span > decay:
                phases.append(sched.ConstantLR(optimizer, factor=1.0, total_iters=0))
                milestones.append(total - 1 - decay)
            phases.append(sched.LinearLR(optimizer, start_factor=1.0, end_factor=floor, total_iters=decay))
        elif kind == "constant":
            phases.append(sched.ConstantLR(optimizer, factor=1.0, total_iters=0))
        else:
            raise ConfigError([("S6", "schedule.type",
                                f"{kind!r} is not one of onecycle, cosine, linear, wsd, constant")])
        return phases[0] if len(phases) == 1 else sched.SequentialLR(optimizer, phases, milestones=milestones)


def schedule_landmarks(cfg, plan):
    """What the configured schedule must produce: initial, peak, final LR and its designed flat steps."""
    lr, kind, total, warm = cfg["optim.lr"], cfg["schedule.type"], plan["total_steps"], plan["warmup_steps"]
    warms = kind == "onecycle" or warm >= 2
    initial = lr / cfg["schedule.div_factor"] if warms else lr
    final = {"onecycle": lr / (cfg["schedule.div_factor"] * cfg["schedule.final_div_factor"]),  # S5: torch's floor
             "constant": lr}.get(kind, lr * cfg["schedule.final_lr_ratio"])
    start = warm - 1 if warm >= 2 else 0
    decay = max(1, min(total - 1 - start, round(cfg["schedule.decay"] * total))) if kind == "wsd" else 0
    flat = range(start, total - decay) if kind in ("constant", "wsd") else range(0)  # the peak held, by design
    return {"initial": initial, "peak": lr, "final": final, "peak_step": start + 1, "flat_steps": flat}


def lr_curve(cfg, plan, resume_at=None):
    """The LR each optimizer step 1..total uses, from the real torch scheduler on a dummy parameter; with
    resume_at=k through a resumed run's round trip of both state_dicts after step k (R3)."""
    def fresh(states=()):
        optimizer = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))])
        scheduler = build_schedule(optimizer, cfg, plan)
        for obj, state in zip((optimizer, scheduler), states):
            obj.load_state_dict(state)
        return optimizer, scheduler

    optimizer, scheduler = fresh()
    curve = np.empty(plan["total_steps"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": no weights here
        for i in range(plan["total_steps"]):
            if i == resume_at:
                optimizer, scheduler = fresh((optimizer.state_dict(), scheduler.state_dict()))
            curve[i] = optimizer.param_groups[0]["lr"]
            scheduler.step()
    return curve


def nearly_equal(a, b, rel=1e-6):
    """Equal up to float round-off: an LR computed two ways (the schedule's landmarks, the curve)."""
    return abs(a - b) <= rel * max(abs(a), abs(b)) + 1e-15


def check_lr_curve(curve, cfg, plan, longest_flat=2):
    """S10/S5 sanity checks on a per-step LR curve: [(row id, message)], empty when it is sane."""
    marks, failures = schedule_landmarks(cfg, plan), []
    total = len(curve)
    if not nearly_equal(curve[0], marks["initial"]):
        failures.append(("S10", f"step 1 LR is {curve[0]:.6g}, the configured initial LR is {marks['initial']:.6g}"))
    if plan["warmup_steps"] >= 2 or cfg["schedule.type"] == "onecycle":
        ramp = curve[:marks["peak_step"]]
        if not (np.all(np.diff(ramp) >= 0) and ramp[-1] > ramp[0]):
            failures.append(("S10", f"the LR does not rise through warmup (steps 1-{marks['peak_step']})"))
    if not nearly_equal(float(curve.max()), marks["peak"]):
        failures.append(("S10", f"the peak LR is {curve.max():.6g}, optim.lr is {marks['peak']:.6g}"))
    if not nearly_equal(curve[-1], marks["final"]):
        failures.append(("S10", f"the last step's LR is {curve[-1]:.6g}, the schedule's floor is {marks['final']:.6g}"))
    zero = np.flatnonzero(curve[:-1] <= 0)
    if zero.size:
        failures.append(("S10", f"the LR is 0 from step {zero[0] + 1} of {total}: training stops learning there"))
    moving = np.ones(total, bool)
    moving[list(marks["flat_steps"])] = False
    same = np.r_[False, curve[1:] == curve[:-1]] & moving
    run = best = best_end = 0
    for i, s in enumerate(same):
        run = run + 1 if s else 0
        if run > best:
            best, best_end = run, i
    if best >= longest_flat:
        failures.append(("S10", f"the LR stays at {curve[best_end]:.6g} for steps {best_end - best + 1}-{best_end + 1} "
                                "where the schedule should move"))
    for name, actual in (("initial", curve[0]), ("peak", float(curve.max())), ("final", curve[-1])):
        want = cfg[f"expect.{name}_lr"]
        if want is not None and not nearly_equal(want, actual, rel=1e-3):
            failures.append(("S5", f"expect.{name}_lr is {want:.6g} but torch's {cfg['schedule.type']} schedule "
                                   f"gives {actual:.6g}"))
    return failures
# ==== end shared: schedule ====


# ==== shared: devices, data order, precision (identical in train_probe.py and train_distill.py) ====
def setup_distributed(cfg):
    """One process, or one of torchrun's (it sets WORLD_SIZE/RANK/LOCAL_RANK): NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg["train.device"] == "cuda" or (cfg["train.device"] == "auto" and torch.cuda.is_available())
    if world > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    return {"rank": rank, "world": world, "device": device, "main": rank == 0}


def epoch_order(num_samples, batch_size, grad_accum, world_size, seed, epoch):
    """One epoch as optimizer steps -> global micro-batches of sample indices (R5, G1, S2). The permutation depends
    only on (seed, epoch): the data position is the step number, resume needs no sampler state. A global micro-batch
    is batch_size * world_size samples: N processes of batch b see, step for step, what one of batch N*b sees."""
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    size = batch_size * world_size
    micro = [order[i:i + size] for i in range(0, num_samples, size)]
    steps = [micro[i:i + grad_accum] for i in range(0, len(micro), grad_accum)]
    assert len(steps) == optimizer_steps_per_epoch(num_samples, batch_size, grad_accum, world_size)  # S2
    return steps


def rank_share(indices, rank, world):
    """This process's part of a global micro-batch (contiguous; a short last batch splits evenly)."""
    return np.array_split(indices, world)[rank]


NO_CONTEXT = contextlib.nullcontext()  # reusable: entered once per micro-batch where nothing needs switching


def autocast(device, precision):
    if precision == "fp32":
        return NO_CONTEXT
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def make_grad_scaler(device, precision):
    """fp16 only; GradScaler backs off on inf by itself, so no hand-set init_scale or _scale writes (G5)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def to_device(tensor, device):
    """Pinned host memory + non_blocking: the copy overlaps compute on GPUs (G7); a no-op on CPU."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def all_gather_list(items, world):
    """Concatenate per-process Python lists in rank order (eval predictions from every process)."""
    if world == 1:
        return list(items)
    gathered = [None] * world
    dist.all_gather_object(gathered, list(items))
    return [x for part in gathered for x in part]
# ==== end shared: devices, data order, precision ====


# -----------------------------------------------------------------------------
# Data: window i of a token stream is tokens[i*L : i*L + L + 1] (inputs = the first L, targets = the
# last L), so every token is a target exactly once and a sample is just a window index: the shared
# epoch_order() permutation over windows makes sampling deterministic and resumable (R5).
IGNORE = -100  # F.cross_entropy's ignore_index: padding targets count in no loss and no token count (G2, E3)
GENERATE = -101  # C10: a prompt-only example's target after its last token: its completion is generated there (E14)
BUILTIN_PAD = 0  # NUL never occurs in the generated text, so byte 0 is free to mark padding


def vocab_size(cfg):
    return cfg["data.vocab_size"] if cfg["data.train_bin"] else 256


# C4: the built-in corpus is generated, not read from the machine: the same bytes under every Python, OS and package
# version (it used to be the interpreter's stdlib sources, whose bytes change between patch releases, and so did
# the demo's data and every teacher trained on it), and nothing to ship beside the script. BUILTIN_CHECK pins the
# first documents' sha256: a Python whose generator ever gave other bytes stops with one line.
BUILTIN_VERBS = ("get", "set", "load", "save", "parse", "build", "find", "read", "write", "update", "check", "make",
                 "count", "merge", "split", "join", "compute", "render", "apply", "resolve", "encode", "decode",
                 "scan", "sort")
BUILTIN_NOUNS = ("item", "name", "path", "value", "key", "node", "line", "token", "record", "buffer", "config",
                 "entry", "size", "index", "offset", "result", "data", "field", "block", "state", "table", "user",
                 "group", "event", "message", "header", "limit", "prefix", "score", "total", "width", "depth",
                 "parent", "child", "source")
BUILTIN_WORDS = ("the", "a", "each", "every", "given", "current", "next", "first", "last", "new", "old", "empty",
                 "valid", "of", "in", "from", "to", "for", "with", "and", "or", "when", "if", "is", "are", "not",
                 "only", "all", "one")
BUILTIN_MODULES = ("os", "sys", "re", "json", "math", "time", "random", "itertools", "functools", "collections",
                   "hashlib")
BUILTIN_CALLS = ("len", "sorted", "list", "str", "int", "min", "max", "sum", "abs", "repr", "tuple", "set")
BUILTIN_CHECK = "f7c8ea7dc17aaa9d8139502f276d9305d06c331074dc28dc45c84fb4af9b5160"  # sha256 of documents 0..99 joined


def builtin_document(number):
    """Document `number`: a Python-like module whose names are reused within a function (a model gains from
    looking back), drawn from random.Random(int).random() alone, the one stream Python keeps across versions."""
    r = random.Random(number).random

    def pick(seq):
        return seq[int(r() * len(seq))]

    def sentence():
        words = [pick(BUILTIN_WORDS if r() < 0.5 else BUILTIN_NOUNS) for _ in range(3 + int(r() * 8))]
        return " ".join(words).capitalize() + "."

    def atom(names):
        x = r()
        return pick(names) if x < 0.6 else str(int(r() * 100)) if x < 0.85 else f"{pick(BUILTIN_CALLS)}({pick(names)})"

    def expr(names, depth=0):
        if depth > 1 or r() < 0.5:
            return atom(names)
        return f"{expr(names, depth + 1)} {pick(('+', '-', '*', '//', '%'))} {expr(names, depth + 1)}"

    def body(names, indent, depth):
        lines, names, pad = [], list(names), "    " * indent
        for _ in range(1 + int(r() * 4)):
            x = r()
            if x < 0.4 or depth > 1:
                new = pick(BUILTIN_NOUNS)
                lines.append(f"{pad}{new} = {expr(names)}")
                names.append(new)
            elif x < 0.6:
                lines.append(f"{pad}if {pick(names)} {pick(('<', '<=', '>', '>=', '==', '!='))} {atom(names)}:")
                lines += body(names, indent + 1, depth + 1)
                if r() < 0.4:
                    lines += [f"{pad}else:"] + body(names, indent + 1, depth + 1)
            elif x < 0.8:
                var = pick(BUILTIN_NOUNS)
                lines.append(f"{pad}for {var} in {pick(names)}:")
                lines += body(names + [var], indent + 1, depth + 1)
            else:
                lines.append(f"{pad}{pick(names)}.{pick(BUILTIN_VERBS)}({expr(names)})")
        return lines

    def function(indent, method):
        pad = "    " * indent
        args = sorted({pick(BUILTIN_NOUNS) for _ in range(1 + int(r() * 3))})
        lines = [f"{pad}def {pick(BUILTIN_VERBS)}_{pick(BUILTIN_NOUNS)}("
                 f"{', '.join((['self'] if method else []) + args)}):",
                 f'{pad}    """{sentence()}"""']
        lines += body(args, indent + 1, 0)
        return lines + [f"{pad}    return {expr(args + (['self'] if method else []))}"]

    lines = [f'"""{sentence()} {sentence()}"""', ""]
    lines += sorted({f"import {pick(BUILTIN_MODULES)}" for _ in range(1 + int(r() * 3))}) + [""]
    for _ in range(int(r() * 3)):
        lines.append(f"{pick(BUILTIN_NOUNS).upper()}_{pick(BUILTIN_NOUNS).upper()} = {int(r() * 1000)}")
    for _ in range(2 + int(r() * 4)):
        if r() < 0.3:
            fields = sorted({pick(BUILTIN_NOUNS) for _ in range(1 + int(r() * 3))})
            lines += ["", "", f"class {pick(BUILTIN_NOUNS).capitalize()}{pick(BUILTIN_NOUNS).capitalize()}:",
                      f'    """{sentence()}"""', "", f"    def __init__(self, {', '.join(fields)}):"]
            lines += [f"        self.{f} = {f}" for f in fields]
            for _ in range(1 + int(r() * 3)):
                lines += [""] + function(1, True)
        else:
            lines += ["", ""] + function(0, False)
    return ("\n".join(lines) + "\n").encode("ascii")


@functools.lru_cache(maxsize=1)
def builtin_corpus_problem():
    """None when this Python generates the pinned bytes, else the C3 line saying it does not."""
    got = hashlib.sha256(b"".join(builtin_document(n) for n in range(100))).hexdigest()
    if got == BUILTIN_CHECK:
        return None
    return (f"null selects the built-in corpus, but this Python ({sys.executable}, {sys.version.split()[0]}) generates "
            f"other bytes for it (sha256 {got[:12]}, expected {BUILTIN_CHECK[:12]}); give .bin token files instead")


@functools.lru_cache(maxsize=8)
def builtin_corpus(split, seq_len, max_bytes):
    """The bytes (vocab 256) of builtin_document n, for val when n % 10 == 0, else train, in order up to max_bytes.
    Each is padded with byte 0 to whole windows with at least one pad: a window never mixes two documents, and a
    document's last window has fewer real targets, the uneven token counts accumulation must weigh (G2)."""
    numbers = itertools.count(0, 10) if split == "val" else (n for n in itertools.count(1) if n % 10)
    parts, size = [], 0
    for number in numbers:
        text = builtin_document(number)
        # room for one pad: a document's last target never reads the next one
        text = text[:-1] if len(text) % seq_len == 0 else text
        padded = len(text) + (-len(text)) % seq_len
        if parts and size + padded > max_bytes:
            break
        parts += [np.frombuffer(text, np.uint8), np.full(padded - len(text), BUILTIN_PAD, np.uint8)]
        size += padded
    tokens = np.concatenate(parts + [np.full(1, BUILTIN_PAD, np.uint8)])  # the last window's "+1" token
    tokens.flags.writeable = False
    return tokens


class TokenWindows(torch.utils.data.Dataset):
    """Windows of a token file (memory-mapped: multi-GB files never load into RAM) or of the built-in
    corpus. Indexed by an array of window indices, so one fetch returns one micro-batch (x, y) [n, L]
    of int64, targets that are padding set to IGNORE."""

    def __init__(self, cfg, split):
        self.seq_len, self.vocab = cfg["data.seq_len"], vocab_size(cfg)
        self.path = cfg[f"data.{split}_bin"]
        self.dtype = np.dtype(cfg["data.dtype"])
        if self.path:
            self.pad = cfg["data.pad_token"]
            num_tokens = os.path.getsize(self.path) // self.dtype.itemsize
            self.tokens = None  # opened lazily: each DataLoader worker maps the file itself
            # R10: every id of the file, before the run dir is made (not at the step that reads it)
            bad = first_id_past(self.path, self.dtype.name, self.vocab, file_stat(self.path))
            if bad is not None:
                at, token = bad
                raise ConfigError([("C3", f"data.{split}_bin", f"{self.path} holds token id {token} >= data.vocab_size "
                                    f"{self.vocab} at token {at:,} (byte offset {at * self.dtype.itemsize:,}); fix "
                                    "data.vocab_size or data.dtype, or that file")])
            self.source = f"{self.path} ({num_tokens} {self.dtype.name} tokens)"
            self.digest = content_record(self.path)["sha256"]  # C4/R11: resume compares the bytes, not the name
            self.examples = example_bounds(cfg, split)
            if self.examples is not None:  # C10: examples a row, padded; their loss mask says which targets count
                self.pad, self.mask = None, None
                long, how = self.examples["long"], {"truncate": "truncated to it", "drop": "dropped"}
                lengths, rows = self.examples["ends"] - self.examples["starts"], len(self.examples["row_bounds"]) - 1
                self.source += (f", {len(lengths)} examples in {rows} rows"
                                f"{' (data.packing)' if cfg['data.packing'] else ''}, "
                                f"{padding_share(lengths, rows, self.seq_len):.0%} of the rows padding" + (
                    f" ({long} longer than data.seq_len + 1 tokens, {how[cfg['data.too_long']]}: data.too_long)"
                    if long else ""))
        else:
            self.pad, self.examples = BUILTIN_PAD, None
            self.tokens = builtin_corpus(split, self.seq_len, cfg[f"data.builtin.{split}_bytes"])
            num_tokens = len(self.tokens)
            self.digest = hashlib.sha256(self.tokens.tobytes()).hexdigest()
            self.source = f"built-in corpus: generated Python-like text, {num_tokens} bytes, sha256 {self.digest[:12]}"
        self.packed = self.examples is not None and cfg["data.packing"]
        self.num_windows = window_count(cfg, split)
        self.offsets = np.arange(self.seq_len + 1)

    def __getstate__(self):  # a worker started by spawn maps the file itself, it is never pickled whole
        state = dict(self.__dict__)
        if self.path:
            state["tokens"] = state["mask"] = None
        return state

    def stream(self):
        if self.tokens is None:
            self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self.tokens

    def __len__(self):
        return self.num_windows

    def rows(self, indices):
        """(ids [n, L + 1], real targets [n, L], positions [n, L + 1]) of windows (positions None), or of rows of
        examples (C10): each example cut at data.seq_len + 1 tokens, after the one before it in its row (one a row
        unless data.packing), padding after the last; its targets those its loss mask holds, never its first
        token (the one before it ends another example); its positions 0, 1, ... (padding's 0)."""
        if self.examples is None:
            starts = np.asarray(indices, dtype=np.int64)[:, None] * self.seq_len
            w = np.asarray(self.stream()[starts + self.offsets], dtype=np.int64)
            return w, self.real_targets(w), None
        if self.mask is None:
            self.mask = np.memmap(self.examples["mask"], dtype=np.uint8, mode="r")
        w, real = np.zeros((len(indices), self.seq_len + 1), np.int64), np.zeros((len(indices), self.seq_len + 1), bool)
        pos, ex = np.zeros_like(w), self.examples
        for row, r in enumerate(indices):
            at = 0
            for i in ex["order"][ex["row_bounds"][r]:ex["row_bounds"][r + 1]]:
                a, b = ex["starts"][i], ex["ends"][i]
                w[row, at:at + b - a], real[row, at:at + b - a] = self.stream()[a:b], self.mask[a:b]
                real[row, at], pos[row, at:at + b - a], at = False, np.arange(b - a), at + b - a
        return w, real[:, 1:], pos

    def real_targets(self, w):
        """True where window w's target is a real token: not padding, and not read right after padding."""
        if self.pad is None:
            return np.ones((len(w), self.seq_len), bool)
        return (w[:, 1:] != self.pad) & (w[:, :-1] != self.pad)

    def count(self, indices):
        """G2: real target tokens in these windows, from the data on the host: every process computes
        the global count of a step itself, without communication."""
        if self.pad is None and self.examples is None:
            return len(indices) * self.seq_len
        return int(self.rows(indices)[1].sum())

    def __getitem__(self, indices):
        """(x, y), and packed (C10) the positions of x as a third tensor (batch_parts() reads either)."""
        w, real, pos = self.rows(indices)
        y = np.where(real, w[:, 1:], IGNORE)
        if self.examples is not None and self.examples["prompts_only"]:  # C10: where the completion would start
            n = self.examples["ends"][indices] - self.examples["starts"][indices]  # (example_prompts reads it, E14)
            y[np.flatnonzero(n <= self.seq_len), n[n <= self.seq_len] - 1] = GENERATE
        packed = (torch.from_numpy(pos[:, :-1].copy()),) if self.packed else ()
        return torch.from_numpy(w[:, :-1].copy()), torch.from_numpy(y), *packed


def padding_share(lengths, rows, seq_len):
    """C10: the share of the rows' data.seq_len + 1 tokens that no example fills (padding waste)."""
    return 1 - lengths.sum() / max(1, rows * (seq_len + 1))


def batch_parts(batch, packed):
    """(x, y, positions or None, the teacher's cached numbers or ()) of a micro-batch: TokenWindows's (x, y), packed
    (x, y, positions), either followed by TeacherCacheWindows's cached numbers."""
    x, y, *rest = batch
    return (x, y, rest[0], tuple(rest[1:])) if packed else (x, y, None, tuple(rest))


# ==== shared: data file content (identical in train_probe.py and train_distill.py) ====
# R9/R11: what a data file holds, for resume, every cache, the dry run and diagnose_and_fix.py: the SHA-256 of all
# its bytes (sampled blocks miss an edit between them), read once per content, not at every start: a record under
# CONTENT_CACHE per file (device, inode) holds it while size, mtime_ns, ctime_ns and 16 sampled blocks are unchanged.
# Any write changes ctime (os.utime and touch -r set mtime back, never ctime), so such a record is of the bytes.
CONTENT_CACHE = os.environ.get("KIT_CONTENT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kit-content")
CONTENT_BLOCK = 1 << 24  # bytes read at a time: 16 MiB of memory whatever the file's size


def float_npy_layout(path):
    """(data offset, dtype, shape, Fortran order) of a .npy file of floats (its values can be NaN), else None."""
    try:
        array = np.load(path, mmap_mode="r") if path.endswith(".npy") else None
    except Exception:  # not a .npy the loader maps (Python objects, a torn header): its reader says so
        return None
    if array is None or array.dtype.kind not in "fc":
        return None
    return array.offset, array.dtype, array.shape, not array.flags.c_contiguous


def read_content(path):
    """One pass over a file: {"sha256"} of its bytes and, for a .npy of floats, "nonfinite_row": the first row
    (window) holding a NaN or an infinity, or None (C9: found in the same read as the digest)."""
    layout, digest = float_npy_layout(path), hashlib.sha256()
    with open(path, "rb") as f:
        if layout is None:
            for block in iter(lambda: f.read(CONTENT_BLOCK), b""):
                digest.update(block)
            return {"sha256": digest.hexdigest()}
        offset, dtype, shape, fortran = layout
        digest.update(f.read(offset))
        rows, count, done, bad = (shape or (1,))[0], int(np.prod(shape)), 0, None
        per_row = count // max(rows, 1)
        for block in iter(lambda: f.read(CONTENT_BLOCK // dtype.itemsize * dtype.itemsize), b""):
            digest.update(block)
            values = np.frombuffer(block, dtype, count=min(len(block) // dtype.itemsize, max(count - done, 0)))
            at = done + np.flatnonzero(~np.isfinite(values))
            if len(at):
                row = int((at % rows).min() if fortran else at[0] // per_row)
                bad = row if bad is None else min(bad, row)
            done += len(values)
    return {"sha256": digest.hexdigest(), "nonfinite_row": bad}


def content_record(path):
    """R9/R11: a data file by its content: {"path", "bytes", "sha256"} (+ "nonfinite_row" for a .npy of floats),
    read whole only when no record under CONTENT_CACHE matches the file's identity, times and sampled blocks."""
    st = os.stat(path)
    stat = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    sampled = hashlib.sha256(str(st.st_size).encode())
    with open(path, "rb") as f:
        for at in sorted({int(x) for x in np.linspace(0, max(st.st_size - (1 << 16), 0), 16)}):
            f.seek(at)
            sampled.update(f.read(1 << 16))
    memo = os.path.join(CONTENT_CACHE, hashlib.sha256(f"{st.st_dev}:{st.st_ino}".encode()).hexdigest()[:32] + ".json")
    try:
        with open(memo) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = None
    if not isinstance(known, dict) or [known.get("stat"), known.get("sampled")] != [stat, sampled.hexdigest()]:
        known = {"stat": stat, "sampled": sampled.hexdigest(), **read_content(path)}
        with contextlib.suppress(OSError):  # a read-only home: the next start reads the file whole again
            os.makedirs(CONTENT_CACHE, exist_ok=True)
            atomic_write_text(memo, json.dumps(known))
    rest = {k: v for k, v in known.items() if k not in ("stat", "sampled")}
    return {"path": os.path.abspath(path), "bytes": st.st_size, **rest}
# ==== end shared: data file content ====


# -----------------------------------------------------------------------------
# Examples prepared by prepare_text.py (C10): beside the token file, manifest.json says what made it (tokenizer
# and chat template digests) and, for chat and prompt/completion data, names each split's loss mask
# (*.mask.bin, one byte per token) and example bounds (*.starts.npy). Every run, dry run and diagnose checks it.
# The token file of examples ends with EXAMPLES_MARK, 64 ids of 0 and 1 no plain token stream ends with: a copy without
# its manifest, which a run would read as one plain stream (every token trained), is known by its content.
EXAMPLES_MARK = np.unpackbits(np.frombuffer(hashlib.sha256(b"prepare_text.py examples").digest()[:8], np.uint8))


def prepared_text(path):
    """(manifest, its record of the token file `path`) when prepare_text.py made it, else (None, None)."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(path)), "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None, None
    if not isinstance(manifest, dict) or manifest.get("made_by") != "prepare_text.py":
        return None, None
    return manifest, next((r for r in manifest.get("splits", {}).values() if r.get("file") == os.path.basename(path)),
                          None)


def incomplete_examples(key, path, record):
    """C10: one line naming the manifest.json, loss mask or bounds file that examples copied alone or renamed lack."""
    folder = os.path.dirname(os.path.abspath(path))
    if record is not None:
        companions = [(os.path.join(folder, record[k]), least) for k, least in  # a byte a token; 8 per bound, + header
                      (("mask", record.get("tokens", 0)), ("starts", 8 * record.get("examples", 0))) if k in record]
        return [("C10", key, f"{name} is {'cut short' if os.path.isfile(name) else 'missing'}, which {folder}/manifest"
                 f".json names for the examples of {os.path.basename(path)}; copy {os.path.basename(name)} from the "
                 "directory prepare_text.py wrote") for name, least in companions
                if not os.path.isfile(name) or os.path.getsize(name) < least][:1]
    tail = np.fromfile(path, np.uint8, offset=max(0, os.path.getsize(path) - 4 * len(EXAMPLES_MARK))).tobytes()
    if not any(tail.endswith(EXAMPLES_MARK.astype(t).tobytes()) for t in ("uint16", "uint32")):
        return []
    stem = os.path.basename(path).removesuffix(".bin")
    return [("C10", key, f"{path} holds examples prepare_text.py wrote (it ends with their mark), but no {folder}/"
             "manifest.json names it, so their loss masks and bounds would be ignored and every token trained; copy "
             f"the manifest.json, {stem}.mask.bin and {stem}.starts.npy prepare_text.py wrote beside it")]


def packing(cfg):
    """packing.py when data.packing is true (C10), else None."""
    return companion("packing", "data.packing") if cfg["data.packing"] else None


def example_bounds(cfg, split):
    """C10: a prepared split's examples as the run reads them (data.too_long applied: long ones cut to
    data.seq_len + 1 tokens, or dropped): {starts, ends, long (how many were longer), mask path}; None: windows."""
    path = cfg[f"data.{split}_bin"]
    record = prepared_text(path)[1]
    if not record or "starts" not in record:
        return None
    mask, name = (os.path.join(os.path.dirname(os.path.abspath(path)), record[k]) for k in ("mask", "starts"))
    rows = example_rows(name, file_stat(name), cfg["data.seq_len"] + 1, cfg["data.too_long"], cfg["data.packing"])
    return dict(rows, mask=mask, prompts_only=record.get("loss_tokens") == 0)


@functools.lru_cache(maxsize=4)
def example_rows(name, stat, room, too_long, packing):
    """example_bounds() of the bounds file `name` (`stat` keys the memo: the layout is computed once a run, the same
    on every process and on resume): starts, ends, long, and the rows: row r holds the examples
    order[row_bounds[r]:row_bounds[r + 1]], one each, or packed (C10, packing.py) first-fit in data order."""
    bounds = np.load(name)
    starts, ends = bounds[:-1], bounds[1:]
    long = ends - starts > room
    keep = ~long if too_long == "drop" else np.ones(len(starts), bool)
    starts, ends = starts[keep], np.minimum(ends[keep], starts[keep] + room)
    row_of = (companion("packing", "data.packing").first_fit_rows(ends - starts, room) if packing
              else np.arange(len(starts)))
    order = np.argsort(row_of, kind="stable")  # a row's examples in data order
    return {"starts": starts, "ends": ends, "long": int(long.sum()), "order": order,
            "row_bounds": np.searchsorted(row_of[order], np.arange(row_of.max(initial=-1) + 2))}


def truncated_away(cfg, split):
    """C10, G2: True when no example of a prepared split, as the run reads it (example_bounds()), keeps a target its
    loss mask trains (never its first token). A loop over the offsets kept, not the examples, stopping at the first
    some example trains: on data that trains, as many reads an example as its shortest prompt's tokens."""
    ex = example_bounds(cfg, split)
    mask, lengths = np.memmap(ex["mask"], dtype=np.uint8, mode="r"), ex["ends"] - ex["starts"]
    return not any(mask[ex["starts"][lengths > k] + k].any() for k in range(1, cfg["data.seq_len"] + 1))


def file_digests(path, names=None):
    names = sorted(os.listdir(path)) if names is None else names
    return {name: read_content(os.path.join(path, name))["sha256"] for name in names
            if os.path.isfile(os.path.join(path, name))}


def data_tokenizer(cfg):
    """C10: (directory, {file: sha256}) of the tokenizer prepare_text.py saved beside the training data (with
    the chat template the data was rendered with: what an export carries); (None, None) when there is none."""
    manifest, record = prepared_text(cfg["data.train_bin"]) if cfg["data.train_bin"] else (None, None)
    saved = manifest.get("tokenizer", {}).get("saved") if record is not None else None
    if not isinstance(saved, dict):
        return None, None
    return os.path.join(os.path.dirname(os.path.abspath(cfg["data.train_bin"])), saved["dir"]), saved["files"]


def data_tokenizer_problem(cfg):
    """C10: the saved tokenizer is, byte for byte, the one the manifest records (keyed on content, never on the
    directory's name); else one line: the ids were made by another tokenizer than the export would carry."""
    where, want = data_tokenizer(cfg)
    if where is None or (os.path.isdir(where) and file_digests(where) == want):
        return []
    return [("C10", "data.train_bin", f"{where} is not the tokenizer {os.path.dirname(where)}/manifest.json records "
             "(missing, or its files changed after the data was prepared), so the ids and the chat template an export "
             "carries may not match; prepare again: python prepare_text.py SOURCES --tokenizer DIR --out NEW_DIR")]


def prepared_text_problems(cfg):
    """C10: token files prepare_text.py made must be what the config says: the same vocabulary and id type,
    unchanged since, examples that fit data.seq_len (or data.too_long), and the models' tokenizer. resolve_config()
    calls it, so the run, --dry_run and diagnose_and_fix.py refuse alike."""
    problems, models = [], [k for k in ("student.hf_dir", "kd.hf_teacher_dir") if cfg[k] and os.path.isdir(cfg[k])]
    problems += data_tokenizer_problem(cfg)
    for key in ("data.train_bin", "data.val_bin"):
        manifest, record = prepared_text(cfg[key])
        problems += incomplete_examples(key, cfg[key], record)
        if record is None:
            continue
        made = f"{os.path.dirname(cfg[key]) or '.'}/manifest.json"
        again = f"python prepare_text.py SOURCES --tokenizer DIR --out {os.path.dirname(cfg[key]) or '.'}"
        train = prepared_text(cfg["data.train_bin"])[0] or manifest  # C10: one tokenizer's ids in both splits
        if manifest.get("tokenizer", {}).get("sha256") != train.get("tokenizer", {}).get("sha256"):
            problems.append(("C10", key, f"{cfg[key]} was prepared with another tokenizer than data.train_bin: its ids "
                             f"are other tokens (a val/loss of noise); prepare it with data.train_bin's: {again}"))
        if cfg["data.dtype"] != manifest.get("dtype"):
            problems.append(("C10", "data.dtype", f"{cfg['data.dtype']!r}, but {made} says {manifest.get('dtype')!r}; "
                             f"set data.dtype: {manifest.get('dtype')}"))
        # C10: every prepared id is below the manifest's vocab_size; a larger data.vocab_size is a model whose
        # embeddings are padded past its tokenizer (data prepared with --tokenizer a tokenizer directory): fine
        if (cfg["data.vocab_size"] or 0) < manifest.get("vocab_size", 0):
            problems.append(("C10", "data.vocab_size", f"{cfg['data.vocab_size']!r}, but {made} says "
                             f"{manifest.get('vocab_size')!r}; set data.vocab_size to the models' vocab_size (at "
                             f"least {manifest.get('vocab_size')})"))
        if os.path.getsize(cfg[key]) != record.get("bytes"):
            problems.append(("C10", key, f"{cfg[key]} is {os.path.getsize(cfg[key])} bytes, {made} says "
                             f"{record.get('bytes')}: it changed after it was prepared; prepare again: {again}"))
        longest = max(r.get("longest", 0) for r in manifest.get("splits", {}).values())  # of both splits
        if record.get("longest", 0) > cfg["data.seq_len"] + 1 and cfg["data.too_long"] == "refuse":
            problems.append(("C10", "data.seq_len", f"{cfg['data.seq_len']}, but the longest example {made} holds is "
                             f"{longest} tokens; set data.seq_len to at least {longest - 1}, or data.too_long to "
                             "truncate or drop the longer examples"))
        generates = cfg["kd.enabled"] and (cfg["kd.on_policy_fraction"] >= 1 or cfg["kd.seq_kd"])
        if (key == "data.train_bin" and "starts" in record and record.get("loss_tokens") != 0 and not generates
                and cfg["data.too_long"] == "truncate" and truncated_away(cfg, "train")):  # G2: all steps skipped
            problems.append(("C10", "data.seq_len", f"{cfg['data.seq_len']} with data.too_long truncate keeps no "
                             f"trained token in any example of {cfg[key]} (each cut at data.seq_len + 1 tokens, "
                             "before its loss mask's), so the run would train nothing; set data.seq_len to at least "
                             f"{longest - 1} (the longest example whole: data.too_long drop would leave no example)"))
        formats = set(manifest.get("formats", {}).values())
        if "starts" in record and cfg["kd.prompt_tokens"] is not None and key == "data.train_bin" and not any(
                f.startswith("text") for f in formats):  # a key that would be ignored is an error
            problems.append(("C10", "kd.prompt_tokens", f"is set, but the examples of {cfg[key]} ({', '.join(formats)})"
                             " carry their own prompts, which on-policy continues; remove it"))
        if "starts" in record and record.get("loss_tokens") == 0 and (key == "data.val_bin" or not generates):
            # E14: prompt-only rows train only when every micro-batch generates its completion; eval scores the
            # val data's own completions (a fixed reference, comparable from eval to eval), so val needs them
            problems.append(("C10", key, f"{cfg[key]} holds prompts only ({{\"prompt\"}} rows), no completion to " + (
                "score: eval scores the val data's completions; set data.val_bin to prepared rows with completions "
                "(prompt/completion or messages)" if key == "data.val_bin" else "train on: set kd.on_policy_fraction=1 "
                "(the student writes every completion) or kd.seq_kd=true (the teacher does), or prepare "
                "prompt/completion or messages rows")))
        for model in models if key == "data.train_bin" else ():  # C10: the models' tokenizer is the data's
            problems += hf_models(model).tokenizer_problems(cfg, model, manifest, made)
    return list(dict.fromkeys(problems))  # one line per problem: both splits of one preparation share a manifest


TOKEN_SCAN_IDS = 1 << 24  # ids per block when a token file is scanned: 32-64 MiB of memory whatever the file's size


def file_stat(path):
    """(size, mtime_ns, ctime_ns): any write changes the times (os.utime can set mtime back, not ctime)."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


@functools.lru_cache(maxsize=16)
def first_id_past(path, dtype, vocab, stat):
    """(offset, id) of the first token id >= vocab in a token file, or None: a vectorised max over each block of
    a memory map (about a second per GB), then the block's first bad offset. `stat` (file_stat) keys the memo:
    the dry run opens the same files for each of its tiny runs, a rewritten file is read again."""
    tokens = np.memmap(path, dtype=dtype, mode="r")
    for start in range(0, len(tokens), TOKEN_SCAN_IDS):
        block = tokens[start:start + TOKEN_SCAN_IDS]
        if int(block.max()) >= vocab:
            at = start + int(np.flatnonzero(block >= vocab)[0])
            return at, int(tokens[at])
    return None


def check_token_ids(x, y, vocab, name):
    """A token id past the vocabulary anywhere in the file stops the run with one line (C3), not an
    index error from deep inside the embedding. Host tensors: no device sync."""
    top = max(int(x.max()), int(y.max())) if x.numel() else -1
    if top >= vocab:
        raise ConfigError([("C3", name,
                            f"token id {top} >= data.vocab_size {vocab}; fix data.vocab_size or data.dtype")])


def data_digest(train_set, val_set):
    """C4: what a checkpoint records of the data it was trained on, compared on resume and when it becomes a
    teacher: the sha256 of the train and val bytes."""
    return {"train": train_set.digest, "val": val_set.digest}


def builtin_digest(cfg):
    """data_digest() of the built-in corpus that cfg's data.* keys select, without a TokenWindows."""
    return {split: hashlib.sha256(builtin_corpus(split, cfg["data.seq_len"],
                                                 cfg[f"data.builtin.{split}_bytes"]).tobytes()).hexdigest()
            for split in ("train", "val")}


def window_count(cfg, split):
    """A split's windows, cheaply: the token file's size, its examples, or the built-in corpus (built once, cached)."""
    path = cfg[f"data.{split}_bin"]
    examples = example_bounds(cfg, split) if path else None
    if examples is not None:
        n = len(examples["row_bounds"]) - 1
    else:  # windows of data.seq_len tokens, and one more: the last window's last target
        tokens = (os.path.getsize(path) // np.dtype(cfg["data.dtype"]).itemsize if path else
                  len(builtin_corpus(split, cfg["data.seq_len"], cfg[f"data.builtin.{split}_bytes"])))
        n = (tokens - 1) // cfg["data.seq_len"]
    return n if cfg["data.limit"] is None else min(n, cfg["data.limit"])


def train_set_size(cfg):
    """Training windows (the tools size a schedule with this, as with train_probe.py's)."""
    return window_count(cfg, "train")


def eval_windows(cfg, num_windows):
    """The val windows every eval scores: evenly spaced over the split, the same ones each time."""
    want = cfg["data.val_windows"]
    if want is None or want >= num_windows:
        return np.arange(num_windows)
    return np.unique(np.linspace(0, num_windows - 1, want).round().astype(np.int64))


# -----------------------------------------------------------------------------
# Models: a GPT-style causal transformer (pre-norm blocks, tied embeddings). No dropout and only
# per-token normalisation, so an update does not depend on how a step is cut into micro-batches (G2).
class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, kv=None, mask=None):
        """x [B, T, C] -> x; with kv (generation: () at the prompt, else this block's cache, x one new position) ->
        (x, the keys and values up to x's last position). mask: packed rows' block-diagonal mask (C10), else causal."""
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(c, 2))
        if kv:
            k, v = torch.cat([kv[0], k], 2), torch.cat([kv[1], v], 2)
        # a single new position sees every cached one: no mask (is_causal would align it with the first key)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=t > 1 and mask is None)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, c))
        x = x + self.mlp(self.ln2(x))
        return x if kv is None else (x, (k, v))


class GPT(nn.Module):
    """idx [B, T] -> (logits [B, T, vocab], last hidden state [B, T, width]), or with `layers` (kd.hidden_layers)
    those layers' states: 0 = the embeddings, i = after block i, n_layer = ln_f's. `past` (generation): () or the
    cache it returned -> (idx's last logits [B, vocab], every block's keys and values). positions [B, T] (packed
    rows, C10): each token's place in its example, the only one it attends to (packing.py's block_causal_mask)."""
    kv_cache = True

    def __init__(self, vocab, block_size, n_layer, n_head, n_embd):
        super().__init__()
        self.width, self.layers = n_embd, None
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        for name, p in self.named_parameters():  # GPT-2's init: residual outputs scaled by depth
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("out.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, logits=True, past=None, positions=None):
        start = past[0][0].shape[2] if past else 0  # generation: the new positions follow the cached ones
        where = torch.arange(start, start + idx.shape[1], device=idx.device) if positions is None else positions
        x = self.wte(idx) + self.wpe(where)
        mask = None if positions is None else companion("packing", "data.packing").block_causal_mask(positions)
        states, cache = [x], []
        for i, block in enumerate(self.blocks):
            if past is None:
                x = block(x, mask=mask)
            else:
                x, kv = block(x, past[i] if past else ())
                cache.append(kv)
            states.append(x)
        if past is not None:
            return F.linear(self.ln_f(x[:, -1]), self.wte.weight), tuple(cache)
        hidden = self.ln_f(x)
        out = F.linear(hidden, self.wte.weight) if logits else None  # tied input/output embedding
        if self.layers is not None and logits:  # kd.hidden_layers (never with kd.chunk_tokens: objective_problems)
            return out, [(states[i] if i < len(self.blocks) else hidden) for i in self.layers]
        return out, hidden


# Hugging Face models (student.hf_dir, kd.hf_teacher_dir, or held by a checkpoint or *.target callable): their code
# (checks, loading, HFCausalLM, the packing probe, the export) is the companion hf_models.py, loaded at config
# resolution when a config names a Hugging Face directory, and where a checkpoint or callable turns out to hold one.
HF_CHECKPOINT_FIX = "give a checkpoint whose network is not a Hugging Face model"


def hf_models(key, fix=None):
    """hf_models.py, for the Hugging Face model `key` names; missing, one line naming the file and key (C3)."""
    return companion("hf_models", key, fix)


def built_model_keys(cfg, student_key, teacher_key):
    """Which of the two keys name a model this run builds: the student's when set; the teacher's when set, KD on."""
    return [k for k in (student_key, teacher_key) if cfg[k] and (k == student_key or cfg["kd.enabled"])]


def hf_dir_keys(cfg):
    return built_model_keys(cfg, "student.hf_dir", "kd.hf_teacher_dir")


def is_hf_lm(lm):
    """lm is a Hugging Face model behind the kit's interface (HFCausalLM): only hf_models.py, once loaded, makes one."""
    return "hf_models" in COMPANIONS and isinstance(lm, COMPANIONS["hf_models"].HFCausalLM)


# A user's module (student.target, teacher.target, or held by a checkpoint): its adapter and check (TargetLM,
# target_lm) are the companion user_models.py, loaded at config resolution for a callable or a checkpoint holding one.
def user_models(key, fix=None):
    """user_models.py, for the user's module `key` names; missing, one line naming the file and key (C3)."""
    return companion("user_models", key, fix)


def is_user_lm(lm):
    """lm is a user's module behind the kit's interface (TargetLM): only user_models.py, once loaded, makes one."""
    return "user_models" in COMPANIONS and isinstance(lm, COMPANIONS["user_models"].TargetLM)


def layer_states(out):
    """Every layer's hidden state, when a forward's output lists them (kd.hidden_layers): Hugging Face's
    hidden_states (embeddings first), or a list/tuple of tensors as the second item of a tuple; else None."""
    if isinstance(out, (tuple, list)) or torch.is_tensor(out):
        states = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
    else:
        states = out.get("hidden_states") if isinstance(out, dict) else getattr(out, "hidden_states", None)
    ok = isinstance(states, (tuple, list)) and states and all(torch.is_tensor(h) for h in states)
    return list(states) if ok else None


def split_outputs(out):
    """(logits, hidden or None) from whatever a language model's forward returns (TargetLM's forms)."""
    if torch.is_tensor(out):
        return out, None
    if isinstance(out, (tuple, list)):
        states = layer_states(out)
        return out[0], (out[1] if len(out) > 1 and torch.is_tensor(out[1]) else states[-1] if states else None)
    get = out.get if isinstance(out, dict) else lambda name: getattr(out, name, None)
    states = get("hidden_states")
    return get("logits"), (states[-1] if isinstance(states, (tuple, list)) and states else states)


class Trainable(nn.Module):
    """What the optimizer trains and the checkpoint's "model" holds: the language model ("lm.*", a Hugging Face or
    user model's under "lm.model.*") and, with kd.gamma > 0 (G8) and both widths known, the projection to the
    teacher's width ("proj.*"), or one per kd.hidden_layers pair ("proj.0.*", ...; `pairs`: their widths)."""

    def __init__(self, lm, teacher_width=None, pairs=None):
        super().__init__()
        self.lm = lm
        if pairs:
            self.proj = nn.ModuleList(nn.Linear(s, t) for s, t in pairs)
        else:
            self.proj = nn.Linear(lm.width, teacher_width) if teacher_width and lm.width else None

    def forward(self, idx, project=False, logits=True, past=None, positions=None):
        """(logits, projected hidden state(s) or None); logits=False (kd.chunk_tokens): the last hidden state in
        place of the logits; past (generation): the LM's (last logits, cache), through this root module, not .lm,
        so that FSDP's hooks on it gather the weights (D1)."""
        if past is not None:
            return self.lm(idx, past=past)
        out, hidden = self.lm(idx, positions=positions) if logits else self.lm(idx, logits=False, positions=positions)
        if project and isinstance(self.proj, nn.ModuleList):
            return (out if logits else hidden), [proj(h) for proj, h in zip(self.proj, hidden)]
        return (out if logits else hidden), (self.proj(hidden) if project else None)


def trained_arch(cfg):
    """The network a config trains (student.*, distilled or a plain LM) as data a checkpoint's config rebuilds it
    from: {"hf_dir": path} | {"target": "module:callable", "kwargs": {...}} | {"n_layer", "n_head", "n_embd"}."""
    if cfg.get("student.hf_dir"):
        return {"hf_dir": cfg["student.hf_dir"]}
    if cfg.get("student.target"):
        return {"target": cfg["student.target"], "kwargs": dict(cfg.get("student.kwargs") or {})}
    return {dim: cfg[f"student.{dim}"] for dim in ("n_layer", "n_head", "n_embd")}


def describe_arch(arch):
    if "hf_dir" in arch:
        return hf_models("student.hf_dir").describe(arch["hf_dir"])
    if "target" in arch:
        return f"{arch['target']}(**{arch['kwargs']})"
    return f"built-in GPT, {arch['n_layer']} layers x {arch['n_embd']} wide, {arch['n_head']} heads"


def transformers_module():
    import transformers
    transformers.utils.logging.disable_progress_bar()  # no loading bars in the run's output
    return transformers


def build_lm(cfg, arch, key, who, hidden, weights=True):
    """The language model `arch` (trained_arch's description) names, behind one interface:
    idx [B, T] -> (logits [B, T, vocab], last hidden state [B, T, width] or None), attribute width."""
    if "hf_dir" in arch:  # weights=False: a kd.teacher_checkpoint's network, its weights in the checkpoint
        hf = hf_models(key, None if weights else HF_CHECKPOINT_FIX)
        return hf.dir_lm(cfg, arch["hf_dir"], key, who, hidden, weights)
    if "target" in arch:
        user = user_models(key, None if weights else "give a checkpoint whose network is not a user's module")
        return user.target_lm(cfg, arch, key, who, hidden)
    return GPT(vocab_size(cfg), cfg["data.seq_len"], **arch)


def trained_key(cfg):
    """The config key that names the trained network (for messages)."""
    return next((k for k in ("student.hf_dir", "student.target") if cfg.get(k)), "student.n_layer")


def hidden_request(cfg, column):
    """What a network returns besides its logits: False (no hidden-state term), True (its last hidden state), or
    the layers of kd.hidden_layers' column (0 = the student's, 1 = the teacher's)."""
    if not (cfg["kd.enabled"] and cfg["kd.gamma"] > 0):
        return False
    layers = cfg["kd.hidden_layers"]
    return True if layers is None else tuple(pair[column] for pair in layers)


def use_layers(lm, hidden, cfg, who):
    """kd.hidden_layers: make `lm` return the hidden states of those layers, once it is known to have them:
    a network shallower than the map, or one that returns its last hidden state only, is one line (C3)."""
    if not isinstance(hidden, tuple):
        return lm
    depth = len(lm.blocks) if isinstance(lm, GPT) else lm.depth
    if depth is None:
        raise ConfigError([("C3", "kd.hidden_layers", f"{cfg['kd.hidden_layers']} needs the hidden state of every "
                            f"layer of {who}, which returns its last one only; return (logits, [hidden state of "
                            "each layer]) or an output with hidden_states, or set kd.hidden_layers=null")])
    if max(hidden) > depth:
        raise ConfigError([("C3", "kd.hidden_layers", f"{cfg['kd.hidden_layers']} names layer {max(hidden)} of {who}, "
                            f"which has {depth} layers: 0 (the embeddings) to {depth} (the last)")])
    lm.layers = hidden
    return lm


def layer_width(lm, layer):
    return lm.widths[layer] if getattr(lm, "widths", None) else lm.width


def build_trainable(cfg, teacher):
    torch.manual_seed(cfg["seed"])  # the LM first: runs that differ only in loss weights start identical
    who = "the student" if cfg["kd.enabled"] else "the trained network"
    hidden = hidden_request(cfg, 0) if teacher is not None else False
    lm = build_lm(cfg, trained_arch(cfg), trained_key(cfg), who, hidden)
    if packing(cfg):  # C10: the network keeps a packed row's examples apart, or the run is refused
        packing(cfg).packing_check(lm, cfg, trained_key(cfg), who)
    lm = use_layers(lm, hidden, cfg, who)
    # kd.hidden_layers with kd.gamma > 0: a projection per pair, none otherwise
    pairs = [(layer_width(lm, s), layer_width(teacher, t)) for s, t in cfg["kd.hidden_layers"]] \
        if isinstance(hidden, tuple) else None
    # train mode throughout (from_pretrained returns eval mode): the user's dropout is on while training.
    # G8: no projection at kd.gamma 0, so no parameter the loss never uses (DDP needs no unused-parameter
    # search, the checkpoint holds none); it is made after the LM, so the LM's init is the same either way.
    return Trainable(lm, teacher.width if teacher is not None and cfg["kd.gamma"] > 0 else None, pairs).train()


def projection_resume_hooks(module, optimizer, cfg):
    """G8: resuming across the projection's presence. A kd.gamma 0 checkpoint from before the kit left it out holds
    an untrained proj.* and its optimizer entries (each group's last, param_groups' order): both are dropped, and
    the run continues exactly as it would have. One without a projection resumed at kd.gamma > 0: one line."""
    dropped = {}

    def model_hook(_module, state, prefix, *_args):
        names = [k for k in state if k.startswith(prefix + "proj.")]
        if module.proj is None:
            dropped.update({k[len(prefix):]: tuple(state.pop(k).shape) for k in names})
        elif not names and any(k.startswith(prefix + "lm.") for k in state):
            raise ConfigError([("G8", "kd.gamma", f"{cfg['kd.gamma']!r}, but the checkpoint being resumed was trained "
                                "at kd.gamma 0 and holds no hidden-state projection; resume with kd.gamma=0, or "
                                "start a new run (--set run_name=NEW)")])

    def optimizer_hook(_optimizer, state):
        groups = state["param_groups"]
        if not dropped or len(groups) != len(optimizer.param_groups):
            return None
        extra = [g for g, mine in zip(groups, optimizer.param_groups) if len(g["params"]) == len(mine["params"]) + 1]
        moments = sorted(tuple(state["state"][g["params"][-1]]["exp_avg"].shape) for g in extra
                         if "exp_avg" in state["state"].get(g["params"][-1], {}))
        if len(extra) == len(dropped) and moments in ([], sorted(dropped.values())):  # never stepped, or its shapes
            for g in extra:
                state["state"].pop(g["params"].pop(), None)
        return state

    module.register_load_state_dict_pre_hook(model_hook)
    optimizer.register_load_state_dict_pre_hook(optimizer_hook)


def how_to_make_teacher(path):
    """What to run when the teacher checkpoint is missing: a kd.enabled=false run writing it, by its config in
    configs/ (of the current directory or beside this script) when there is one."""
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) < 3 or parts[-2] != "checkpoints" or not parts[-3]:
        return "make the teacher with a kd.enabled=false run of this script, or fix the path"
    # C3: dirname, not os.path.join(*parts): an absolute path keeps its leading "/"
    run_dir, name = os.path.dirname(os.path.dirname(os.path.normpath(path))), parts[-3]
    for base in (os.getcwd(), os.path.dirname(os.path.abspath(__file__))):
        config = os.path.join(base, "configs", name + ".yaml")
        if os.path.isfile(config):
            launcher = os.path.relpath(os.path.join(base, "launch.sh"))  # typed in the current directory: ./launch.sh
            launcher = launcher if launcher.startswith(".") else os.path.join(".", launcher)
            run = (f"{launcher} {os.path.relpath(config)}" if os.path.isfile(launcher) else
                   f"python {os.path.relpath(os.path.abspath(__file__))} --config {os.path.relpath(config)}")
            return f"make the teacher first: {run} (from this directory: it writes {run_dir}), or fix the path"
    return (f"make the teacher first: python {os.path.basename(__file__)} --config TEACHER.yaml --set kd.enabled=false "
            f"--run_dir {run_dir}, or fix the path")


def read_teacher_checkpoint(cfg):
    """kd.teacher_checkpoint (mmapped: cheap enough for resolve_config), checked to be this script's, with
    windows at least data.seq_len long for the built-in GPT it may hold."""
    path, key = cfg["kd.teacher_checkpoint"], "kd.teacher_checkpoint"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # whatever the unpickler meets in a torn or foreign file
        raise ConfigError([("C3", key, f"{path} does not load ({type(err).__name__}); give a train_distill.py "
                            "checkpoint")]) from None
    if not isinstance(ckpt, dict) or ckpt.get("task") != TASK or not isinstance(ckpt.get("config"), dict):
        raise ConfigError([("C3", key, f"{path} is not a train_distill.py checkpoint; make the teacher with "
                            "kd.enabled=false and point here at its checkpoints/best.pt")])
    saved = ckpt["config"]
    if not saved.get("data.train_bin") and ckpt.get("data_digest") != builtin_digest(saved):
        # C4: a teacher of another version's built-in corpus describes other text: nothing distils from it silently
        raise ConfigError([("C3", key, f"{path} was trained on another built-in corpus than the one this script "
                            "generates (older versions read the interpreter's standard library); train the teacher "
                            "again into a new run dir (move the old one away first) and point here at its best.pt")])
    if set(trained_arch(saved)) == {"n_layer", "n_head", "n_embd"} and saved["data.seq_len"] < cfg["data.seq_len"]:
        raise ConfigError([("C3", "data.seq_len", f"{cfg['data.seq_len']} is longer than the teacher's position limit, "
                            f"its windows of {saved['data.seq_len']} tokens in {path}; set data.seq_len to at most "
                            f"{saved['data.seq_len']}")])
    return ckpt


def load_teacher_checkpoint(cfg, hidden=True):
    """A checkpoint of this script: its saved config's trained_arch names the network; a built-in GPT must be the
    one teacher.* describes, a Hugging Face one is rebuilt from its config.json, a user module from its callable."""
    path, key = cfg["kd.teacher_checkpoint"], "kd.teacher_checkpoint"
    ckpt = read_teacher_checkpoint(cfg)
    saved = ckpt["config"]
    arch = trained_arch(saved)
    if vocab_size(saved) != vocab_size(cfg):
        raise ConfigError([("C3", key, f"{path} has a vocabulary of {vocab_size(saved)}, this run's data has "
                            f"{vocab_size(cfg)}; teacher and student must share one tokenizer")])
    if "n_layer" in arch and arch != {dim: cfg[f"teacher.{dim}"] for dim in arch}:  # the built-in GPT
        raise ConfigError([("C3", "teacher.n_layer", f"{path} holds a network with "
                            + ", ".join(f"{k} {v}" for k, v in arch.items())
                            + "; set teacher.n_layer/n_head/n_embd to those values")])
    lm = GPT(vocab_size(saved), saved["data.seq_len"], **arch) if "n_layer" in arch else \
        build_lm(cfg, arch, key, "the teacher", hidden, weights=False)
    lm.load_state_dict({k[3:]: v for k, v in saved_weights(ckpt, path, key).items() if k.startswith("lm.")})
    return lm


def build_teacher(cfg, device, hidden=None):
    """Load and freeze: eval mode, no grad, never in the optimizer, checked unchanged after training.
    teacher(x) -> (logits, last hidden state, or None unless `hidden`; default: kd.gamma > 0)."""
    hidden = hidden_request(cfg, 1) if hidden is None else hidden
    if cfg["kd.hf_teacher_dir"]:
        teacher = hf_models("kd.hf_teacher_dir").load_hf_teacher(cfg, hidden)
    elif cfg["teacher.target"]:
        torch.manual_seed(cfg["seed"])  # a callable that initialises anything does so the same way every run
        arch = {"target": cfg["teacher.target"], "kwargs": dict(cfg["teacher.kwargs"])}
        teacher = build_lm(cfg, arch, "teacher.target", "the teacher", hidden)
    else:
        teacher = load_teacher_checkpoint(cfg, hidden)
    if packing(cfg):  # C10
        packing(cfg).packing_check(teacher, cfg, teacher_key(cfg), "the teacher")
    use_layers(teacher, hidden, cfg, "the teacher")
    teacher.requires_grad_(False)
    return teacher.eval().to(device)


def teacher_key(cfg):
    return next(k for k in ("kd.hf_teacher_dir", "teacher.target", "kd.teacher_checkpoint") if cfg[k])


def param_groups(module):
    """Weight decay on matrices and embeddings (every parameter with >= 2 dimensions, a Hugging Face or
    user model's too); none on biases and norm gains. Parameters the user froze stay out of the optimizer."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


# -----------------------------------------------------------------------------
# Beyond one device (train.strategy: fsdp, train.activation_checkpointing): the code is fsdp_sharding.py, a
# companion file beside this script (FSDP2's fully_shard, DCP checkpoints, activation checkpointing), loaded
# at config resolution when either is on. Chosen once in train(); the loop and its guarantees are the same for
# every strategy.
def model_blocks(module):
    """The repeated blocks of a language model: its longest nn.ModuleList (the built-in GPT's blocks, a
    Hugging Face model's layers or h, a user module's); empty when it has none."""
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len) if lists else nn.ModuleList()


def sharding(cfg):
    """fsdp_sharding.py when train.strategy is fsdp or train.activation_checkpointing is on (D1), else None."""
    on = [k for k, off in (("train.strategy", "ddp"), ("train.activation_checkpointing", False)) if cfg[k] != off]
    return companion("fsdp_sharding", on[0]) if on else None


def saved_weights(ckpt, path, key="--checkpoint"):
    """A checkpoint file's network as one state dict: its "model", or (D4) the whole tensors of the DCP
    directory it names, gathered by this process alone (an export, a teacher, a check; never training)."""
    if ckpt.get("shards"):
        return shard_reader(key).shard_tensors(ckpt, path, "model.", key)
    return ckpt["model"]


# -----------------------------------------------------------------------------
# Losses, each summed over real target tokens (the shared loop divides by the step's token count, G2), in fp32
# whatever the autocast dtype (G6: CPU autocast even runs log_softmax in fp16). Each model's log-probabilities are
# computed once a step (log_probs); a term of weight 0 is not computed at all (G8: make_task's loss picks them once).
def log_probs(logits, temperature=1.0):
    """log softmax(logits / T) over the vocabulary in fp32 (G6): the one full-vocabulary pass per model and
    step. At T = 1 there is no division (x / 1 is x, bit for bit)."""
    with torch.autocast(logits.device.type, enabled=False):
        z = logits.float()
        return F.log_softmax(z if temperature == 1 else z / temperature, -1)


def token_cross_entropy(logits, targets):
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def nll_sum(log_q, targets):
    """token_cross_entropy from log-probabilities already computed at T = 1 (the KD term's, shared)."""
    return F.nll_loss(log_q.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def kd_kl(student_logits, teacher_logits, temperature, top_k=None, log_q=None):
    """KL(teacher_T || student_T) per position of [..., V] logits, in fp32 (G6); log_q: the student's log_probs at T
    if the step has them. top_k: the KL coarsened to the teacher's top k + one bucket with each model's exact rest
    mass (logsumexp, not 1 - sum): biased, never above full KD (data processing; blind to the student's tail),
    equal at k = vocab (no bucket). Offline (kd.teacher_cache), the same kl_topk reads teacher_topk's numbers."""
    log_q = log_probs(student_logits, temperature) if log_q is None else log_q
    with torch.no_grad():  # the teacher is frozen
        teacher = log_probs(teacher_logits, temperature) if top_k is None else \
            teacher_topk(teacher_logits, temperature, top_k)
    return xlogy_ratio(teacher, log_q).sum(-1) if top_k is None else kl_topk(log_q, *teacher)


def first_token(logits):
    """E3: the token a model ranks first: the lowest id among its maximal logits (torch.argmax returns the first
    maximal index). val/agreement's one tie rule, for the student, the online teacher and the cache's index[..., 0]."""
    return logits.argmax(-1)


def teacher_topk(teacher_logits, temperature, top_k):
    """What top-k KD needs of the teacher in fp32 (G6), and kd.teacher_cache stores: (log p at T of its k most likely
    tokens [..., k], their ids [..., k], log p of all others together [...], -inf when k >= vocab). index[..., 0] is
    first_token(teacher_logits): topk orders ties as it likes (116 of 188 bf16 ties differed from argmax), so it is
    swapped with whichever tied token topk put first (or, when more than k tokens tie, put in its place)."""
    with torch.autocast(teacher_logits.device.type, enabled=False):
        logits = teacher_logits.float()
        log_p = F.log_softmax(logits / temperature, -1)
        k = min(top_k, log_p.shape[-1])
        # ranked by logit, the order first_token uses (logits / T can round into ties)
        _, index = logits.topk(k, dim=-1)
        first = first_token(logits).unsqueeze(-1)
        hit = index == first
        at = hit.int().argmax(-1, keepdim=True)  # where topk put the first token (0 when it is left out)
        index = index.scatter(-1, at, torch.where(hit.any(-1, keepdim=True), index[..., :1], index.gather(-1, at)))
        index = index.scatter(-1, torch.zeros_like(at), first)  # E3: a tie's first token first, whatever topk did
        log_rest = log_p.scatter(-1, index, float("-inf")).logsumexp(-1) if k < log_p.shape[-1] else \
            torch.full(log_p.shape[:-1], float("-inf"), device=log_p.device)
        return log_p.gather(-1, index), index, log_rest


def kl_topk(log_q, log_p_top, index, log_rest):
    """The coarsened KL of kd_kl(top_k) from the student's log_probs and the teacher's top-k numbers
    (teacher_topk, or the cache); on a sampled cache's numbers (teacher_sampled), its unbiased estimator."""
    kl = xlogy_ratio(log_p_top, log_q.gather(-1, index)).sum(-1)
    if index.shape[-1] < log_q.shape[-1]:
        rest_q = log_q.scatter(-1, index, float("-inf")).logsumexp(-1)
        kl = kl + xlogy_ratio(log_rest, rest_q)
    return kl


def kd_kl_topk(student_logits, log_p_top, index, log_rest, temperature, log_q=None):
    """kl_topk from the student's logits (or its log_probs at T, log_q), in fp32."""
    return kl_topk(log_probs(student_logits, temperature) if log_q is None else log_q, log_p_top, index, log_rest)


def xlogy_ratio(log_p, log_q):
    """p * (log p - log q) term by term, summed to KL(p || q) (not sum p log p - sum p log q: a small KL keeps its
    digits); p = 0 (a teacher logit of -inf) adds 0, not nan, even where log q is -inf."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0)


# kd.divergence: D(p, q) between the teacher's p = softmax(teacher / T) and the student's q = softmax(student / T),
# both at the same temperature (E13: a T on one side only is another objective, never a scaled one). Forward KL is
# the functions above; the others (reverse KL, JSD, skew KL, TVD) and their config checks (E12) are divergences.py, a
# companion file beside this script, loaded at config resolution when kd.divergence names one.
def divergences(cfg):
    """divergences.py when a distillation's kd.divergence is not forward_kl (E13), else None."""
    return companion("divergences", "kd.divergence") if cfg["kd.enabled"] and cfg["kd.divergence"] != "forward_kl" \
        else None


def divergence_scale(kind, temperature):
    """The factor that keeps the KD gradient's size independent of T: T^2 for the divergences locally quadratic in
    the logit difference / T (smooth f-divergences, gradient ~ 1/T^2; Hinton et al.), T for tvd (linear, ~ 1/T)."""
    return temperature if kind == "tvd" else temperature ** 2


def kd_divergence(student_logits, kind, temperature, teacher_logits=None, top_k=None, cached=None,
                  jsd_beta=0.5, skew_alpha=0.1, log_q=None):
    """kd.divergence per position in fp32 (G6) from the teacher's logits or kd.teacher_cache's numbers (`cached`):
    forward_kl is kd_kl / kd_kl_topk, the others divergences.py's; log_q: the student's at T if the step has it (G8)."""
    if kind == "forward_kl":
        return kd_kl_topk(student_logits, *cached, temperature, log_q=log_q) if cached else \
            kd_kl(student_logits, teacher_logits, temperature, top_k, log_q=log_q)
    return companion("divergences", "kd.divergence").kd_divergence(student_logits, kind, temperature, teacher_logits,
                                                                   top_k, cached, jsd_beta, skew_alpha, log_q)


def hidden_loss(projected, teacher_hidden):
    """The hidden-state term per position: the mean squared difference of the layer-normalised hidden states in
    fp32, scale-free, O(1) whatever the teacher's activation scale (E2: the reference run's feature loss was 40x
    its KD loss); with kd.hidden_layers (lists) the mean over the pairs, so kd.gamma weighs it alike."""
    if not torch.is_tensor(projected):
        return sum(hidden_loss(s, t) for s, t in zip(projected, teacher_hidden)) / len(projected)
    with torch.autocast(projected.device.type, enabled=False):
        s, t = projected.float(), teacher_hidden.float()
        return (F.layer_norm(s, s.shape[-1:]) - F.layer_norm(t, t.shape[-1:])).pow(2).mean(-1)


# -----------------------------------------------------------------------------
# A loss that never holds the whole vocabulary (kd.chunk_tokens, D6): its code is chunked_loss.py, a companion file.
def chunking(cfg):
    """chunked_loss.py when kd.chunk_tokens is set (D6), else None."""
    return companion("chunked_loss", "kd.chunk_tokens") if cfg["kd.chunk_tokens"] else None


# -----------------------------------------------------------------------------
# Offline KD (kd.teacher_cache, R9): the teacher runs once over every training and eval window, its numbers are
# stored, and training reads them with no teacher in memory. Its code (the cache's size, identity, manifest,
# lock, build and readers, and the sampled mode's draws) is teacher_cache.py, a companion file.
def caching(cfg):
    """teacher_cache.py when kd.teacher_cache is set with KD on (offline KD), else None."""
    return companion("teacher_cache", "kd.teacher_cache") if cfg["kd.enabled"] and cfg["kd.teacher_cache"] else None


def cache_reader(windows, path, manifest, split):
    """A TeacherCacheWindows rebuilt where it is unpickled (a DataLoader worker a spawn start method made): pickle
    finds this function in the script, the class's file is loaded by path (companion()), never imported by name."""
    return companion("teacher_cache", "kd.teacher_cache").TeacherCacheWindows(windows, path, manifest, split)


# ==== shared: run dir, checkpoints, resume (identical in train_probe.py and train_distill.py) ====
# Tests only (KIT_FAULT_*), read once at import: the loop asks one flag, STEP_FAULTS, per micro-batch.
KILL_AT = os.environ.get("KIT_FAULT_KILL_AT")  # "STEP:MICRO": SIGKILL before that micro-batch (R1)
# "STEP": wait there for a stop signal (R8), so a test's signal lands mid-run however busy the machine is
HOLD_AT = os.environ.get("KIT_FAULT_HOLD_AT")
STEP_FAULTS = KILL_AT is not None or HOLD_AT is not None
SAVE_KILL_AT = os.environ.get("KIT_FAULT_SAVE_KILL_AT")  # "POINT[:N]": SIGKILL at POINT of the Nth save (R6, R12)
SAVES = [0]  # atomic_save calls in this process, for SAVE_KILL_AT


def step_fault(run, step, micro):
    if KILL_AT == f"{step}:{micro}":
        os.kill(os.getpid(), signal.SIGKILL)
    while HOLD_AT == str(step) and micro == 0 and run["stop_signal"] is None:
        signal.pause()  # returns once a handler has run; an ignored signal (nohup's SIGHUP) does not wake it


def save_fault(point, nth=1):
    """Die at POINT of the Nth atomic_save, or of publishing an export (R6, R12), as a kill or a power cut would."""
    name, _, at = (SAVE_KILL_AT or "").partition(":")
    if name == point and int(at or 1) == nth:
        os.kill(os.getpid(), signal.SIGKILL)


class TrainingAborted(Exception):
    """The loop stopped itself on purpose (G4, S9): the message says why, the state is saved."""


def open_run(run_dir, cfg, dist_info):
    """runs/<run_name>/: config.yaml, metrics.jsonl, train.log, checkpoints/. Logs append, never truncate."""
    # The run dict, every key once. Here: cfg (the resolved config); dist (setup_distributed); quiet (no stdout);
    # run_dir, ckpt_dir; stop_signal (R8: the signal that asked to stop); stop_after (tests: stop at that step);
    # bar (tqdm, E7); last_save, best_written, best_pending (R8: the save triggers, best.pt written late);
    # sharded (D1: the FSDP save/load/prune/generation hooks, or None); state (what last.pt saves, below); log_file and
    # metrics_file (process 0). train() adds: plan (plan_schedule), train_set, module (the trained network), model
    # (module, or its DDP/FSDP wrapper), params, optimizer, scheduler, scaler; the probe backbone,
    # backbone_output_shape, inputs (R11), eval_sources; distillation val_set, val_windows, teacher,
    # teacher_digest, teacher_cache, data_digest (S7), check_strategy. Later: expected_lr (resume, S9),
    # progress (E7), sinks (E10), loss_parts (E2's history), one_class_warned / teacher_top1 (each script's eval).
    run = {"cfg": cfg, "dist": dist_info, "quiet": False, "run_dir": run_dir,
           "ckpt_dir": os.path.join(run_dir, "checkpoints"),
           "stop_signal": None, "stop_after": None, "bar": None, "last_save": time.monotonic(),
           "best_written": None, "best_pending": None, "sharded": None,
           "state": {"global_step": 0, "skipped_steps": 0, "bad_streak": 0, "best_value": None, "best_step": None,
                     "evals_since_best": 0, "last_eval": None, "last_eval_params": None, "warned_e2": [],
                     "trained": False, "finished": False}}
    # trained: the loop is over (last step or early stop); finished: the final evaluation is done as well
    if dist_info["main"]:
        os.makedirs(run["ckpt_dir"], exist_ok=True)
        remove_stale_temp_files(run_dir, run["ckpt_dir"])
        run["log_file"] = open(os.path.join(run_dir, "train.log"), "a")
        run["metrics_file"] = open(os.path.join(run_dir, "metrics.jsonl"), "a")
    return run


def remove_stale_temp_files(run_dir, ckpt_dir):
    """R6/R12: what a kill left of the kit's writes goes when the run starts again: temp files and directories
    of a writer that is gone (.tmp-PID-*, *.tmp-PID, .export-PID-*), a *.prev.pt.tmp link (a second name of a
    checkpoint still there), and export.prev/ once export/ is there again (until then the complete export)."""
    for directory in (run_dir, ckpt_dir, os.path.join(run_dir, "features")):
        for name in os.listdir(directory) if os.path.isdir(directory) else ():
            tail = name.rpartition(".tmp-")[2] if ".tmp-" in name else ""
            pid = name.split("-")[1] if name.startswith((".tmp-", ".export-")) else tail
            if name.endswith(".prev.pt.tmp") or (pid.isdigit() and not process_alive(int(pid))):
                remove_path(os.path.join(directory, name))
    if os.path.isdir(os.path.join(run_dir, "export")):
        remove_path(os.path.join(run_dir, "export.prev"))


def remove_path(path):
    """A file, a link or a whole directory; nothing when it is gone already."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def publish_directory(tmp, out):
    """R12: the complete directory tmp becomes out; an existing out is renamed aside to out.prev first, so a kill
    at any point leaves one complete export on disk (out.prev between the renames: finished_run_pending)."""
    save_fault("export_written")
    aside = out + ".prev"
    if os.path.isdir(out):
        remove_path(aside)  # a leftover of an earlier kill; out itself is complete
        os.replace(out, aside)
        save_fault("export_aside")
    os.replace(tmp, out)
    save_fault("export_published")
    remove_path(aside)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def log(run, message):
    if not run["dist"]["main"]:
        return
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
    if not run["quiet"] and not write_stdout(line, run["bar"]):
        # R8: stdout closed (`| head`, a dropped terminal): keep training, train.log keeps every line
        run["quiet"] = True
    run["log_file"].write(line + "\n")
    run["log_file"].flush()


def write_metrics(run, record):
    """One JSON object per line; non-finite numbers become null and are named in "nonfinite" (strict JSON)."""
    if not run["dist"]["main"]:
        return
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    clean = {k: (None if k in bad else v) for k, v in record.items()}
    if bad:
        clean["nonfinite"] = bad
    run["metrics_file"].write(json.dumps(clean) + "\n")
    run["metrics_file"].flush()
    if run.get("sinks"):  # E10: the same record to TensorBoard, W&B, MLflow (open_sinks loaded their companion)
        COMPANIONS["metric_sinks"].send_to_sinks(run, record)


def config_text(cfg):
    """config.yaml of a run and of its export: the resolved config, nested, every key (C8: paths absolute)."""
    return yaml.safe_dump(unflatten(cfg), sort_keys=False)


def write_resolved_config(run):
    if run["dist"]["main"]:
        atomic_write_text(os.path.join(run["run_dir"], "config.yaml"), config_text(run["cfg"]))


def atomic_write_text(path, text):
    """Temp file, fsync, rename: a reader sees the old file or the new one, whole. `text` may be bytes."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state():
    """R4/R7: torch CPU, every CUDA device, numpy and python RNG, as tensors and plain types."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n, p = state["numpy"], state["python"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


def seed_everything(seed, rank):
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def schedule_signature(cfg, plan):
    """S7: everything that shapes the LR curve; frozen in the checkpoint, compared on resume."""
    keys = ["optim.lr", "train.epochs", "train.max_steps", "train.batch_size", "train.grad_accum"]
    keys += [k for k in cfg if k.startswith("schedule.")]
    return {**{k: cfg[k] for k in keys}, "total_steps": plan["total_steps"], "num_samples": plan["num_samples"]}


def atomic_save(obj, path):
    """R6: temp file, fsync, rename. The previous file is kept as *.prev.pt; a kill or a full disk at any
    point leaves the old checkpoint whole, and what a kill leaves behind never blocks a later save."""
    directory = os.path.dirname(path)
    SAVES[0] += 1
    # The writer's pid in the name: open_run removes the temp file of a writer that was killed.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".tmp-{os.getpid()}-", suffix=".pt")
    save_fault("after_mkstemp", SAVES[0])
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            save_fault("after_write", SAVES[0])
            f.flush()
            os.fsync(f.fileno())
        save_fault("after_fsync", SAVES[0])
        if os.path.exists(path):
            prev = path[:-3] + ".prev.pt"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(prev + ".tmp")  # R6: left by a kill between the link and the rename below
            os.link(path, prev + ".tmp")
            save_fault("after_link", SAVES[0])
            os.replace(prev + ".tmp", prev)
            with contextlib.suppress(FileNotFoundError):  # rename is a no-op when both names are links to one file
                os.unlink(prev + ".tmp")                  # (a kill after this rename, before the next one, leaves that)
            save_fault("after_prev", SAVES[0])
        os.replace(tmp, path)
        save_fault("after_replace", SAVES[0])
        dir_fd = os.open(directory, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def checkpoint_state(run, name="last"):
    """Everything the loop needs to continue exactly, loadable with weights_only=True (R7); a collective, None but
    on process 0. D2: sharded weights and optimizer state go to the DCP directory the checkpoint names first."""
    d, st = run["dist"], run["state"]
    rngs = all_gather_list([rng_state()], d["world"])
    shards = run["sharded"]["save"](run, name) if run["sharded"] else None
    if not d["main"]:
        return None
    per_epoch = run["plan"]["steps_per_epoch"]
    return {"format": 1, "task": run["cfg"]["task"], "shards": shards,
            "model": None if shards else run["module"].state_dict(),
            "optimizer": None if shards else run["optimizer"].state_dict(), "scheduler": run["scheduler"].state_dict(),
            "scaler": run["scaler"].state_dict() if run["scaler"] else None, "rng": rngs,
            "data_position": {"epoch": st["global_step"] // per_epoch, "step_in_epoch": st["global_step"] % per_epoch,
                              "seed": run["cfg"]["seed"]},
            "world_size": d["world"], "config": dict(run["cfg"]),
            "schedule": schedule_signature(run["cfg"], run["plan"]),
            "inputs": run.get("inputs"),  # R11: what the model's inputs (the probe's features) depend on
            "data_digest": run.get("data_digest"), "torch_version": str(torch.__version__), **st}


def host_copy(obj):
    """Every tensor copied to host memory: a best.pt waiting for its write must not change as training goes on."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: host_copy(value) for key, value in obj.items()}
    return type(obj)(host_copy(value) for value in obj) if type(obj) in (list, tuple) else obj


def save_last(run):
    """last.pt (R6: atomic; process 0 writes, a collective under DDP). A best.pt still held in memory is
    written first, so best.pt on disk is never older than the best step last.pt names."""
    ckpt = checkpoint_state(run)
    run["last_save"] = time.monotonic()  # on every process: the time trigger restarts for all of them together
    if ckpt is None:
        return
    if run["best_pending"] is not None:
        atomic_save(run["best_pending"], os.path.join(run["ckpt_dir"], "best.pt"))
        run["best_pending"] = None
    atomic_save(ckpt, os.path.join(run["ckpt_dir"], "last.pt"))
    if run["sharded"]:
        run["sharded"]["prune"](run)


def save_best(run):
    """best.pt now when none was written in the last train.save_every_minutes (always when sharded, D2: its DCP
    directory is written already), else a host copy written with the next last.pt: no fsync per fast eval (R6)."""
    ckpt = checkpoint_state(run, "best")
    if ckpt is None:
        return
    minutes, now = run["cfg"]["train.save_every_minutes"], time.monotonic()
    if run["sharded"] or minutes is None or run["best_written"] is None or now - run["best_written"] >= 60 * minutes:
        atomic_save(ckpt, os.path.join(run["ckpt_dir"], "best.pt"))
        run["best_written"], run["best_pending"] = now, None
        if run["sharded"]:
            run["sharded"]["prune"](run)
    else:
        run["best_pending"] = host_copy(ckpt)


def load_latest_checkpoint(path, warn=lambda message: None):
    """R6: a torn or unreadable last.pt falls back to last.prev.pt, said by warn (resume() logs it)."""
    candidates = [path] + ([path[:-3] + ".prev.pt"] if path.endswith("last.pt") else [])
    for candidate in candidates:
        if not os.path.exists(candidate):
            continue
        try:
            ckpt = torch.load(candidate, map_location="cpu", weights_only=True)  # R7
        except Exception as err:  # a torn file raises whatever the unpickler meets
            warn(f"WARNING R6: {candidate} is unreadable ({type(err).__name__}: {err}); trying the previous checkpoint")
            continue
        sharded = isinstance(ckpt, dict) and ckpt.get("shards")
        gone = sharded and shard_reader("--resume").missing_shards(ckpt, candidate)
        if gone:  # D2: the DCP directory it names is half of the checkpoint (deleted, or a kill before it was in)
            warn(f"WARNING R6: {gone}; trying the previous checkpoint")
            continue
        return ckpt, candidate
    return None, None


def drop_stale_expectations(run):
    """S5: expect.* values this run's schedule does not produce (a --set optim.lr=... on a config whose expect:
    block was written for its own LR) are dropped with a note (--dry_run and diagnose refuse such a config)."""
    cfg = run["cfg"]
    stale = [msg for rid, msg in check_lr_curve(run["expected_lr"], cfg, run["plan"]) if rid == "S5"]
    if stale:
        cfg.update({"expect.initial_lr": None, "expect.peak_lr": None, "expect.final_lr": None})
        log(run, f"note S5: the config's expect: block does not hold for this run ({'; '.join(stale)}): the "
                 "schedule changed (a --set?); expect.* dropped for this run, fix or remove them in the config")


def other_data_problem(cfg, ckpt, digest, source):
    """S7, C4: a run continued on other bytes than it started on (a corpus that changed under it) is not one run:
    the ConfigError resume() raises, and the dry run of train_distill.py before it (same line), else None."""
    older = ckpt.get("data_digest") is None and cfg.get("data.train_bin")  # token files were not hashed before R11
    if digest is None or ckpt.get("data_digest") == digest or older:
        return None
    return ConfigError([("S7", "--run_dir", f"{source} was trained on other data than this run reads (its sha256 "
                         f"differs, or was not recorded by an older version); start a new run (--set run_name=NEW "
                         "or --run_dir NEW), nothing was touched")])


def check_resume_mode(run_dir, mode):
    """R1/C3: a --run_dir that is a file, --resume none on checkpoints, a --resume PATH not there: before any write."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):  # C3: not makedirs' NotADirectoryError traceback
        raise ConfigError([("C3", "--run_dir", f"{run_dir} is a file, not a directory; give another --run_dir")])
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    if mode == "none" and (os.path.exists(last) or os.path.exists(last[:-3] + ".prev.pt")):
        raise ConfigError([("R1", "--resume", f"none, but {run_dir} already holds checkpoints; use "
                            "--resume auto to continue, or another --run_dir to start afresh (nothing was "
                            "touched)")])
    if mode not in ("none", "auto") and not os.path.exists(mode):
        raise ConfigError([("C3", "--resume", f"checkpoint {mode} not found")])


def resume(run, mode):
    """R1/R2/R3: the one place the loop position comes from a checkpoint; nothing later reassigns it."""
    cfg, plan = run["cfg"], run["plan"]
    run["expected_lr"] = lr_curve(cfg, plan)  # S9: the curve the optimizer's LR must follow, step by step
    drop_stale_expectations(run)
    if mode == "none":
        return False
    last = os.path.join(run["ckpt_dir"], "last.pt")
    path = last if mode == "auto" else mode
    ckpt, source = load_latest_checkpoint(path, lambda message: log(run, message))
    # R1 under DDP: every process must continue from the same step, or the collectives pair up different steps
    # (a node that cannot see the run dir would silently start from step 0).
    seen = all_gather_list([ckpt["global_step"] if ckpt else None], run["dist"]["world"])
    if len(set(seen)) > 1:
        raise ConfigError([("R1", "--run_dir", f"the processes found different checkpoints in {run['run_dir']} "
                            f"(global step by rank: {seen}); every node must see the same run dir (shared "
                            "filesystem)")])
    if ckpt is None:
        if mode != "auto" or os.path.exists(last):
            raise ConfigError([("R6", "--resume", f"no readable checkpoint at {path} or its .prev.pt")])
        metrics = os.path.join(run["run_dir"], "metrics.jsonl")
        if run["dist"]["main"] and os.path.getsize(metrics) > 0:  # R8: an attempt killed before its first save
            log(run, f"note R8: {run['run_dir']} holds an earlier attempt's log but no checkpoint (it stopped before "
                     "its first save: train.save_every_minutes / train.save_every_steps bound what a kill loses); "
                     "starting again at step 0, metrics.jsonl continues")
        return False
    if ckpt.get("task") != cfg["task"]:
        raise ConfigError([("R1", "--resume",
                            f"{source} is a '{ckpt.get('task')}' checkpoint, this is '{cfg['task']}'")])
    problem = other_data_problem(cfg, ckpt, run.get("data_digest"), source) or \
        (finished_run_problem(cfg, ckpt, run["run_dir"]) if ckpt.get("finished") else None)
    if problem:
        raise problem
    if not ckpt.get("finished"):  # a finished run is never continued: complete, the caller says so
        load_resume_state(run, ckpt, source, resume_changes(run, ckpt, source))
    run["state"].update({k: ckpt[k] for k in run["state"] if k in ckpt})  # R2: global_step; R5: the data position
    if run["state"]["finished"]:
        return True
    log(run, f"resumed from {source} at optimizer step {ckpt['global_step']} "
             f"(epoch {ckpt['data_position']['epoch'] + 1}, step {ckpt['data_position']['step_in_epoch']} of it)")
    write_metrics(run, {"event": "resume", "step": ckpt["global_step"], "from": source})
    return True


def resume_changes(run, ckpt, source):
    """R5/S7: a ConfigError naming what differs when this run may not continue ckpt (another global micro-batch,
    seed, or schedule not explicitly allowed to change), else the allowed schedule changes {key: (saved, new)}."""
    cfg, plan = run["cfg"], run["plan"]
    world, saved_world = run["dist"]["world"], ckpt["world_size"]
    # R5: the data order and the schedule depend on the global micro-batch (train.batch_size x processes),
    # not on how it is split: another number of processes with the same global micro-batch continues exactly
    saved_batch = ckpt["schedule"]["train.batch_size"] * saved_world
    if world != saved_world and world * cfg["train.batch_size"] != saved_batch:
        other = f" or with train.batch_size={saved_batch // world} (the same {saved_batch} windows a micro-batch)" \
            if saved_batch % world == 0 else ""
        raise ConfigError([("S7", "--resume", f"{source} was written by {saved_world} process(es), this run has "
                            f"{world}; the data order and schedule depend on it, relaunch with {saved_world} "
                            f"process(es){other} or start a new --run_dir")])
    if "check_strategy" in run:  # a task with strategies (distillation: sharded or not) checks its own
        run["check_strategy"](run, ckpt, source)
    saved_seed = ckpt["data_position"]["seed"]
    if saved_seed != cfg["seed"]:  # S7/R5: the permutation of the epoch in progress is a function of the seed
        raise ConfigError([("S7", "seed",
                            f"{cfg['seed']}, but {source} was trained with seed {saved_seed} and the data "
                            f"order of the epoch in progress depends on it; restore seed={saved_seed}, or start a new "
                            "run (--set run_name=NEW or --run_dir NEW)")])
    new_sig = schedule_signature(cfg, plan)
    changed = {k: (ckpt["schedule"].get(k), v) for k, v in new_sig.items() if ckpt["schedule"].get(k) != v}
    if world != saved_world:
        changed.pop("train.batch_size")  # the split of the same global micro-batch, checked above (R5)
    if changed and ckpt["global_step"] > plan["total_steps"]:
        raise ConfigError([("S7", "train.epochs",
                            f"{source} is at optimizer step {ckpt['global_step']}, the new schedule "
                            f"has only {plan['total_steps']}; restore the run length or start a new --run_dir")])
    if changed and not cfg["train.allow_schedule_change"]:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        raise ConfigError([("S7", "train.allow_schedule_change", f"the schedule changed since {source}: {what}; "
                            "restore those values, or set train.allow_schedule_change=true to continue on the new "
                            "curve")])
    return changed


def load_resume_state(run, ckpt, source, changed):
    """The weights, optimizer, LR schedule (the new curve when it changed), grad scaler and RNG streams of ckpt."""
    cfg, plan = run["cfg"], run["plan"]
    world, saved_world = run["dist"]["world"], ckpt["world_size"]
    saved_batch = ckpt["schedule"]["train.batch_size"] * saved_world
    if ckpt.get("shards"):  # D3: DCP reads this process's part of every tensor, for any number of processes
        run["sharded"]["load"](run, ckpt, source)
    else:
        run["module"].load_state_dict(ckpt["model"])
        run["optimizer"].load_state_dict(ckpt["optimizer"])
    # S7, explicitly allowed: the new curve, advanced by real steps to the saved position (not last_epoch, R3)
    if changed:
        log(run, f"WARNING S7: schedule changed ({', '.join(changed)}); the LR follows the new curve from step "
                 f"{ckpt['global_step']}")
        for group in run["optimizer"].param_groups:  # as a fresh optimizer: the loaded mid-run LR and the old
            group.pop("initial_lr", None)            # initial_lr must not seed the new curve (chained schedulers)
            group["lr"] = cfg["optim.lr"]
        run["scheduler"] = build_schedule(run["optimizer"], cfg, plan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(ckpt["global_step"]):
                run["scheduler"].step()
    else:
        run["scheduler"].load_state_dict(ckpt["scheduler"])  # R3: state_dict round trip
    if run["scaler"] and ckpt["scaler"]:
        run["scaler"].load_state_dict(ckpt["scaler"])
    if world == saved_world:
        set_rng_state(ckpt["rng"][run["dist"]["rank"]])  # R4
    else:  # R4/R5: no saved stream belongs to this process; each its own again, from (seed, step)
        seed_everything(cfg["seed"] + 7919 * ckpt["global_step"], run["dist"]["rank"])
        log(run, f"note R5: continuing a {saved_world}-process checkpoint on {world} process(es) with the same global "
                 f"micro-batch of {saved_batch}: the data order and the LR schedule are exact; each process's random "
                 "stream restarts from (seed, step) and the sums over processes round differently, so the run "
                 "equals an uninterrupted one to float round-off (bit for bit without dropout only by chance)")


def finished_run_problem(cfg, ckpt, run_dir):
    """A finished run relaunched with other values (it is never continued): a ConfigError naming them, else None."""
    ignored = ("run_name", "train.allow_schedule_change", "train.num_workers", "train.device", "launch_dir",
               "expect.initial_lr", "expect.peak_lr", "expect.final_lr")  # expectations shape nothing (S5)
    saved = absolute_paths(ckpt.get("config") or {}, PATH_KEYS)  # C8: a run saved before paths were recorded absolute
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in cfg.items()
               if k in saved and k not in ignored and saved[k] != v]
    if not changed:
        return None
    return ConfigError([("S7", "run_name", f"{run_dir} holds a finished run (step {ckpt.get('global_step')}) and these "
                         f"values differ from it: {', '.join(changed)}; a finished run is never continued: start a new "
                         "run with another run_name (--set run_name=NEW) or --run_dir NEW")])


def finished_run_verdict(cfg, ckpt, run_dir):
    """Is a finished run simply complete (the probe's already_complete, launch.sh)? None: yes; else the script's
    finished_run_pending words (R12, S7); a relaunch with other values raises finished_run_problem's error."""
    problem = finished_run_problem(cfg, ckpt, run_dir)
    if problem:
        raise problem
    return finished_run_pending(cfg, ckpt, run_dir)


def log_run_complete(run, step):
    """The one line a finished run started again writes (R12); nothing is trained."""
    log(run, f"run already complete at step {step} ({run['ckpt_dir']}/last.pt); nothing to do")


def best_text(run):
    """The best eval for the closing lines; a metric that was never finite (a one-class AUROC) is said so."""
    st, name = run["state"], run["cfg"]["train.best_metric"]
    if st["best_value"] is None:
        return f"no finite {name} in any eval, so no best.pt"
    return f"best {name}={st['best_value']:.5g} at step {st['best_step']}"


def install_stop_handlers(run):
    """R8: SIGTERM/SIGINT/SIGUSR1 (preemption notice)/SIGHUP (a dropped ssh session) finish the current
    step, save, then exit. Only the main thread can install them (a test or tool may call train() elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def request_stop(signum, _frame):
        if run["stop_signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        run["stop_signal"] = signum
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
        if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
            continue  # started under nohup: the run is meant to outlive the terminal
        signal.signal(sig, request_stop)


def tensor_digest(module):
    """SHA-256 of every parameter and buffer (persistent or not, 0-dim and integer ones too: BatchNorm's
    num_batches_tracked): a frozen network that moved in any bit, running statistics too, gets another digest."""
    digest = hashlib.sha256()
    named = [("param " + n, t) for n, t in module.named_parameters()]
    named += [("buffer " + n, t) for n, t in module.named_buffers()]
    for name, tensor in sorted(named, key=lambda item: item[0]):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_tensors_equal(path_a, path_b):
    """R4: two checkpoints' weights, optimizer and scheduler state equal bit for bit."""
    def tensors(obj, prefix=""):
        if torch.is_tensor(obj):
            yield prefix, obj
        elif isinstance(obj, (dict, list, tuple)):
            for k, v in obj.items() if isinstance(obj, dict) else enumerate(obj):
                yield from tensors(v, f"{prefix}.{k}")

    def everything(path):  # D2: a sharded checkpoint's weights and optimizer state are in its DCP directory
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("shards"):
            return dict(tensors({"scheduler": ckpt["scheduler"], **shard_reader().shard_tensors(ckpt, path, "")}))
        return dict(tensors({k: ckpt[k] for k in ("model", "optimizer", "scheduler")}))

    ta, tb = everything(path_a), everything(path_b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def shard_reader(key="--checkpoint"):
    """D2: fsdp_sharding.py, which reads the DCP directory a sharded checkpoint names, for a reader asking via key."""
    return companion("fsdp_sharding", key, fix="read a checkpoint that is not sharded")


def remove_refused_run_dir():
    """C3: a run launch.sh made a new run dir for (its lock alone in it: KIT_NEW_RUN_DIR) and that was refused
    before writing anything leaves no run dir behind, as the script run by itself leaves none; nor the parents
    (runs/) launch.sh made for it, up to KIT_NEW_RUN_TOP, while they are empty."""
    path = os.environ.get("KIT_NEW_RUN_DIR")
    names = os.listdir(path) if path and os.path.isdir(path) else []
    if names and all(name.startswith("launch") and name.endswith(".lock") for name in names):
        with contextlib.suppress(OSError):  # another process of the same launch got there first; a parent in use
            for name in names:
                os.unlink(os.path.join(path, name))
            os.rmdir(path)
            path, top = os.path.abspath(path), os.path.abspath(os.environ.get("KIT_NEW_RUN_TOP") or path)
            while path.startswith(top + os.sep):
                path = os.path.dirname(path)
                os.rmdir(path)


def exit_process(code):
    """End the process; under torchrun skip the interpreter's shutdown, where a gloo thread still releasing the
    last collective's tensors (ProcessGroupGloo::runLoop -> ~AsyncBarrierWork) asks for the GIL and aborts a run
    that finished and saved (status 134). Every file is flushed or fsynced by now: nothing is lost."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)
    sys.exit(code)
# ==== end shared: run dir, checkpoints, resume ====


# ==== shared: progress and metric sinks (identical in train_probe.py and train_distill.py) ====
# E7: a tqdm bar on a terminal, else timed progress lines; from host numbers the step has already read (G7).
def clock(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def start_progress(run):
    """E7: the bar on process 0's terminal, else show_progress()'s lines, so `tail -f` of a nohup log shows them."""
    now = time.monotonic()
    run["progress"] = {"start": now, "first_step": run["state"]["global_step"], "last_line": now}
    if run["dist"]["main"] and sys.stderr.isatty():
        from tqdm import tqdm
        run["bar"] = tqdm(total=run["plan"]["total_steps"], initial=run["state"]["global_step"], unit="step",
                          dynamic_ncols=True)


def progress_text(run, step):
    """Elapsed, steps/s and ETA from this process's steps (a resumed run measures its own); its line is the latest."""
    p, total = run["progress"], run["plan"]["total_steps"]
    p["last_line"] = now = time.monotonic()
    elapsed, done = now - p["start"], step - p["first_step"]
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = clock((total - step) / rate) if rate > 0 else "?"
    return f"elapsed {clock(elapsed)} {rate:.3g} steps/s ETA {eta}"


def show_progress(run, step):
    if run["bar"] is not None:
        run["bar"].update(1)
    elif time.monotonic() - run["progress"]["last_line"] >= run["cfg"]["train.progress_every_s"]:
        total = run["plan"]["total_steps"]
        log(run, f"progress: step {step}/{total} ({step / total:.0%}) " + progress_text(run, step))


def end_progress(run):
    if run["bar"] is not None:
        run["bar"].close()
        run["bar"] = None


# Metric sinks (E10), each optional: metric_sinks.py beside this script opens, feeds and closes them.
SINK_KEYS = ("log.tensorboard", "log.wandb", "log.mlflow")


def metric_sinks(cfg):
    """The metric_sinks companion when the config turns a sink on, else None. Config resolution calls it first
    (the run, --dry_run and the tools), so a missing file is one line before anything is written (C3)."""
    wanted = [key for key in SINK_KEYS if cfg[key]]
    return companion("metric_sinks", wanted[0]) if wanted else None


def open_sinks(run):
    """E10: the sinks the config turns on, opened once after resume() has set the step the run continues from."""
    run["sinks"] = []
    sinks = metric_sinks(run["cfg"])
    if sinks:
        sinks.open_sinks(run)


def close_sinks(run, ok=True):
    """Flush and close every sink (W&B and MLflow mark the run finished, or killed when it stopped early)."""
    if run.get("sinks"):
        COMPANIONS["metric_sinks"].close_sinks(run, ok)
# ==== end shared: progress and metric sinks ====


# -----------------------------------------------------------------------------
# The run: data -> teacher (frozen) -> student + projection, optimizer, schedule -> resume -> fit.
def print_plan(run, resumed):
    cfg, plan, d = run["cfg"], run["plan"], run["dist"]
    marks = schedule_landmarks(cfg, plan)
    b, a, w, n = plan["batch_size"], plan["grad_accum"], plan["world_size"], plan["num_samples"]
    tr, va = run["train_set"], run["val_set"]
    what = "windows" if tr.examples is None else "rows of packed examples" if tr.packed else "examples, each a window"
    log(run, f"data: {tr.source}; {n} train {what} of {tr.seq_len} tokens, vocab {tr.vocab}")
    log(run, f"val: {va.source}; each eval scores {len(run['val_windows'])} of its {len(va)} windows")
    log(run, f"steps: ceil({n} / ({b} x {w} processes)) = {plan['micro_batches_per_epoch']} micro-batches per epoch; "
             f"ceil({plan['micro_batches_per_epoch']} / grad_accum {a}) = {plan['steps_per_epoch']} optimizer "
             "steps per epoch; " + run_length_text(cfg, plan))
    log(run, f"schedule: {cfg['schedule.type']}, warmup {plan['warmup_steps']} optimizer steps, "
             f"LR {marks['initial']:.4g} at step 1 -> peak {marks['peak']:.4g} at step {marks['peak_step']} -> "
             f"{marks['final']:.4g} at step {plan['total_steps']}")
    params = sum(p.numel() for p in run["params"])
    log(run, f"model: {describe_arch(trained_arch(cfg))} from {trained_key(cfg)}, {params} trainable parameters; "
             + ("the student, distilled from the teacher below" if cfg["kd.enabled"] else
                "kd.enabled false: plain LM training of it, no teacher (a teacher-to-be)"))
    if run["teacher"] is not None:
        k = cfg["kd.top_k"]
        source = cfg["kd.teacher_checkpoint"] or cfg["kd.hf_teacher_dir"] or cfg["teacher.target"]
        log(run, f"teacher: {source} (frozen, sha256 {run['teacher_digest'][:12]}); "
                 + objective_text(cfg, 'full vocabulary' if k is None else f'top-{k} + rest bucket'))
    if run["teacher_cache"] is not None:
        m = run["teacher_cache"]["manifest"]
        _, how = caching(cfg).teacher_cache_size(cfg, m["windows"]["train"], m["windows"]["val"])
        what = caching(cfg).cache_slots(m, m["data.vocab_size"])[1]
        log(run, f"teacher: offline, its {what} from the cache {run['teacher_cache']['path']} (built from "
                 f"{m['teacher']['source']}, sha256 {m['teacher']['tensor_digest'][:12]}; {how}); no teacher in "
                 "memory; "
                 + objective_text(cfg, what + (", importance-weighted" if "sampled" in what else " + rest bucket")))
    log(run, f"devices: {d['world']} process(es) on {d['device']}, precision {cfg['train.precision']}; "
             + (f"resuming at step {run['state']['global_step']}" if resumed else "starting at step 0"))


def objective_text(cfg, vocabulary):
    """The loss as the run computes it, for the plan: its terms, the divergence, its scale, on-policy data."""
    kind, T = cfg["kd.divergence"], cfg["kd.temperature"]
    scale = "T" if divergence_scale(kind, 2.0) == 2.0 else "T^2"
    name = {"jsd": f"JSD(beta {cfg['kd.jsd_beta']:g})", "skew_kl": f"skew KL(alpha {cfg['kd.skew_alpha']:g})",
            "forward_kl": "KL", "reverse_kl": "reverse KL", "tvd": "TVD"}[kind]
    layers = cfg["kd.hidden_layers"]
    text = (f"loss = {cfg['kd.alpha']:g} CE + {cfg['kd.beta']:g} {scale} {name} (T {T:g}, {vocabulary}) + "
            f"{cfg['kd.gamma']:g} hidden" + (f" over layer pairs {layers}" if layers and cfg["kd.gamma"] > 0 else ""))
    return text + (generating(cfg).plan_text(cfg, name) if generating(cfg) else "")  # E14


# -----------------------------------------------------------------------------
# Generated micro-batches (E14: on-policy data, kd.seq_kd): their code is on_policy.py, a companion file beside
# this script, loaded at config resolution when a key of theirs is set; make_task() plugs it in once, no loop branch.
GENERATION_KEYS = ("kd.on_policy_fraction", "kd.seq_kd", "kd.prompt_tokens", "kd.max_new_tokens",
                   "kd.sample_temperature", "kd.eos_token")


def on_policy_used(cfg):
    """Some micro-batches are generated: on-policy ones, or kd.seq_kd's (the teacher writes the completion)."""
    return cfg["kd.enabled"] and (cfg["kd.on_policy_fraction"] > 0 or cfg["kd.seq_kd"])


def generating(cfg):
    """on_policy.py when the config sets a key of generation away from its default (even one a run ignores: the
    notes and refusals are the file's), else None. resolve_config() calls it first: a missing file is one line."""
    key = next((k for k in GENERATION_KEYS if cfg[k] != CONFIG[k][0]), None)
    return companion("on_policy", key) if key else None


def run_inputs(cfg, d, print_progress, build_cache=True, cache_only=False):
    """R10: everything train() reads and refuses before its run directory is made, in the order it runs: the
    token files (every id inside the vocabulary), the schedule (S2, S3), the frozen teacher or the teacher cache
    (its manifest, data and teacher: C3, R9), the eval windows and the trained network (a Hugging Face or user
    model's vocabulary and positions). --dry_run and diagnose_and_fix.py call it with build_cache=False: the
    same refusals with the same lines, and nothing written. cache_only (--cache_teacher): up to the cache."""
    train_set, val_set = TokenWindows(cfg, "train"), TokenWindows(cfg, "val")
    plan = plan_schedule(cfg, len(train_set), d["world"])
    offline = cfg["kd.enabled"] and cfg["kd.teacher_cache"] is not None  # offline KD: no teacher in memory
    teacher = build_teacher(cfg, d["device"]) if cfg["kd.enabled"] and not offline else None
    windows = eval_windows(cfg, len(val_set))
    if val_set.count(windows) == 0:
        raise ConfigError([("C3", "data.val_bin", "the eval windows hold no real target tokens (all padding?)")])
    cache = caching(cfg).prepare_teacher_cache(cfg, d, train_set, val_set, windows, print_progress,
                                               build_cache) if offline else None
    inputs = {"train_set": train_set, "val_set": val_set, "plan": plan, "val_windows": windows, "teacher": teacher,
              "teacher_cache": cache, "module": None}
    if not cache_only:
        inputs["module"] = build_trainable(cfg, teacher).to(d["device"])  # a Hugging Face or user model's errors too
        if cfg["train.activation_checkpointing"]:
            sharding(cfg).checkpoint_activations(inputs["module"].lm, trained_key(cfg))
        if cfg["kd.chunk_tokens"]:  # D6: both networks' logits must be a linear map of their last hidden state
            chunking(cfg).linear_head(inputs["module"].lm, trained_key(cfg))
            if teacher is not None:
                chunking(cfg).linear_head(teacher, "the teacher")
        if not any(p.requires_grad for p in inputs["module"].parameters()):
            raise ConfigError([("C3", trained_key(cfg),
                                "the network has no trainable parameters (all requires_grad=False)")])
    return inputs


def check_strategy(run, ckpt, source):
    """S7, D2: a checkpoint continues only under the train.strategy that wrote it (shards, or whole tensors)."""
    if bool(ckpt.get("shards")) != bool(run["sharded"]):
        raise ConfigError([("S7", "train.strategy", f"{source} was saved with train.strategy="
                            f"{'fsdp' if ckpt.get('shards') else 'ddp'}; set it back, or start a new --run_dir")])


# ---- The training loop, in the order it runs: train -> fit -> optimizer_step -> the loss -> evaluate. What it
# calls only when an option is on (FSDP, chunked loss, sinks, generation, the offline cache) was chosen before train().
def train(cfg, run_dir, resume_mode="auto", stop_after=None, quiet=False, cache_only=False):
    """Run (or continue) one distillation (or, kd.enabled false, teacher) training. Returns (outcome, run).
    cache_only (--cache_teacher): build kd.teacher_cache and return ("cached", ...) before the run dir is made."""
    d = setup_distributed(cfg)
    seed_everything(cfg["seed"], d["rank"])
    # R8: the cache build's progress lines
    print_progress = (lambda line: None) if quiet or not d["main"] else write_stdout
    check_resume_mode(run_dir, resume_mode)  # R1/C3: before a teacher cache is built or the run dir written
    inputs = run_inputs(cfg, d, print_progress, cache_only=cache_only)  # every refusal before the run dir (R10)
    if cache_only:
        return "cached", {"teacher_cache": inputs["teacher_cache"], "dist": d}
    teacher, module = inputs["teacher"], inputs["module"]
    # R4: every process its own stream for the training forward's randomness (the dropout of a user's or
    # Hugging Face model), the same on every run; build_trainable seeded the same init on every process.
    seed_everything(cfg["seed"], d["rank"])
    run = open_run(run_dir, cfg, d)
    run.update(inputs, quiet=quiet, stop_after=stop_after, check_strategy=check_strategy,
               teacher_digest=tensor_digest(teacher) if teacher is not None else None,
               data_digest=data_digest(inputs["train_set"], inputs["val_set"]))
    model = module
    if cfg["train.strategy"] == "fsdp":  # D1: sharded weights, gradients and optimizer state; DCP checkpoints (D2)
        fsdp = sharding(cfg)
        fsdp.single_process_group(d["device"])
        model = fsdp.shard_model(module, cfg["train.precision"])
        run["sharded"] = fsdp.SHARDED_CHECKPOINTS
    elif d["world"] > 1:
        # DDP copies process 0's weights and buffers to every process at construction; the student's buffers
        # are fixed, so the default per-forward buffer broadcast only copies equal values. Unused parameters:
        # whatever a user module (student.target) leaves out of its forward; the projection takes part in every
        # micro-batch (an on-policy one adds it at weight 0), so DDP skips its per-step search of the autograd
        # graph for unused parameters.
        model = torch.nn.parallel.DistributedDataParallel(
            module, find_unused_parameters=is_user_lm(module.lm))
    # the student and its projection: the frozen teacher is never in the optimizer
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, param_groups(module))
    scaler = make_grad_scaler(d["device"], cfg["train.precision"])
    if scaler and run["sharded"]:
        scaler = sharding(cfg).sharded_grad_scaler(d["device"])
    if teacher is not None:
        projection_resume_hooks(module, optimizer, cfg)  # G8: checkpoints from before the projection left kd.gamma 0
    run.update(model=model, params=params, optimizer=optimizer,
               scheduler=build_schedule(optimizer, cfg, run["plan"]), scaler=scaler)
    resumed = resume(run, resume_mode)
    if run["state"]["finished"]:
        log_run_complete(run, run["state"]["global_step"])
        if finished_run_pending(cfg, None, run_dir):  # R12: killed between the last save and the export's publication
            export_best(run)
        return "complete", run
    write_resolved_config(run)
    open_sinks(run)  # E10: after resume(), which set the step the sinks continue from
    print_plan(run, resumed)
    task = make_task(run)
    install_stop_handlers(run)
    outcome = fit(run, task)
    if teacher is not None and tensor_digest(teacher) != run["teacher_digest"]:
        raise TrainingAborted("the frozen teacher's tensors changed during training")
    st = run["state"]
    if outcome in ("finished", "early_stopped"):
        log(run, f"done: {st['global_step']} optimizer steps, {st['skipped_steps']} skipped; last eval "
                 + " ".join(f"{k}={v:.4f}" for k, v in (st["last_eval"] or {}).items()) + f"; {best_text(run)}")
        export_best(run)
    return outcome, run


# ==== shared: training loop (identical in train_probe.py and train_distill.py) ====
def fit(run, task):
    """The loop, in the order it runs: batches -> optimizer step -> log -> eval -> save -> stop?"""
    # task, what the loop needs from its script (probe_task, make_task build it): batches(index lists) ->
    # micro-batches; count(indices) -> targets in them and count_name ("samples", "tokens"); loss(model, batch) ->
    # (sum, {part: value}); evaluate(run) -> metrics; final_eval (probe: a test split still to score). Optional
    # (distillation): step_count (G2: targets of a step that depend on it), record (generation costs), empty_why,
    # empty_step (G2: a step with no target).
    cfg, plan, d, st = run["cfg"], run["plan"], run["dist"], run["state"]
    total, per_epoch = plan["total_steps"], plan["steps_per_epoch"]
    eval_every = cfg["train.eval_every"] or per_epoch  # E4: checked against the run length by the tools
    save_every = cfg["train.save_every_steps"]
    run["last_save"] = time.monotonic()  # the time trigger (train.save_every_minutes) counts from here
    start_progress(run)  # E7: a tqdm bar on a terminal, else timed progress lines
    window = {"time": time.perf_counter(), "samples": 0, "targets": 0}
    outcome = "finished"
    while st["global_step"] < total and outcome == "finished":
        epoch, first = divmod(st["global_step"], per_epoch)
        steps = epoch_order(plan["num_samples"], plan["batch_size"], plan["grad_accum"], d["world"], cfg["seed"], epoch)
        steps = steps[first:first + total - st["global_step"]]  # R5: continue at the next unseen step
        local = [[rank_share(m, d["rank"], d["world"]) for m in step] for step in steps]
        batches = task["batches"]([m for step in local for m in step])
        for step_indices, step_local in zip(steps, local):
            # G2: targets in the whole global step (a task whose targets depend on the step counts them itself)
            count = task["step_count"](step_indices, st["global_step"] + 1) if "step_count" in task else \
                sum(task["count"](m) for m in step_indices)
            out = optimizer_step(run, task, [next(batches) for _ in step_local], count)
            step = st["global_step"]
            window["samples"] += sum(len(m) for m in step_indices)
            window["targets"] += count
            st["bad_streak"] = 0 if out["finite"] else st["bad_streak"] + 1
            st["skipped_steps"] += not out["finite"] or out["empty"]  # G4, G2: steps without an update
            if step % cfg["train.log_every"] == 0 or step == 1 or not out["finite"] or out["empty"] or step == total:
                log_step(run, task, out, epoch, window)
            show_progress(run, step)
            warn_step(run, task, out)
            if st["bad_streak"] >= cfg["train.max_bad_steps"]:
                save_last(run)
                raise TrainingAborted(f"G4: {st['bad_streak']} non-finite steps in a row up to step {step}; state "
                                      f"saved in {run['ckpt_dir']}/last.pt. Check the data and lower optim.lr")
            if step % eval_every == 0 or step == total:
                record_eval(run, task["evaluate"](run))
                if patience_exhausted(run):
                    log(run, f"early stop at step {step}: no better {cfg['train.best_metric']} for "
                             f"{cfg['train.patience']} evals ({best_text(run)})")
                    outcome = "early_stopped"
            if outcome == "early_stopped" or step == total:
                st["trained"] = True
                st["finished"] = not task.get("final_eval")  # a final evaluation still to run keeps the run open
                save_last(run)
                break
            if out["stop"] or step == run["stop_after"]:
                save_last(run)
                outcome = "stopped"
                break
            if out["save_due"] or (save_every and step % save_every == 0):
                save_last(run)
    end_progress(run)
    write_metrics(run, {"event": outcome, "step": st["global_step"]})
    return outcome


def log_step(run, task, out, epoch, window):
    """One logged step: its record (rates over the window since the last, restarted here), bar or line, E2's check."""
    st, unit, step = run["state"], task["count_name"], run["state"]["global_step"]
    elapsed = max(time.perf_counter() - window["time"], 1e-9)
    record = {"step": step, "epoch": epoch + 1, "lr": out["lr"],
              "samples_per_s": window["samples"] / elapsed, f"{unit}_per_s": window["targets"] / elapsed,
              "skipped_steps": st["skipped_steps"],
              # G2: an empty step has no loss and no gradient (a null would read as G4's non-finite)
              **({} if out["empty"] else {"loss": out["loss"], "grad_norm": out["grad_norm"]})}
    record.update({f"loss/{k}": v for k, v in out["parts"].items()})
    record.update(task["record"]() if "record" in task else {})  # the task's own costs (generation)
    if run["scaler"]:
        record["scale"] = run["scaler"].get_scale()
    write_metrics(run, record)
    window.update(time=time.perf_counter(), samples=0, targets=0)
    if out["empty"]:
        return  # said by warn_step's WARNING G2; no loss parts either
    if run["bar"] is not None:
        run["bar"].set_postfix(loss=f"{out['loss']:.4g}", lr=f"{out['lr']:.3g}")
    else:
        log(run, f"step {step}/{run['plan']['total_steps']} epoch {epoch + 1} lr {out['lr']:.4g} "
                 f"loss {out['loss']:.5g} grad_norm {out['grad_norm']:.3g} {record[f'{unit}_per_s']:.1f} {unit}/s "
                 + progress_text(run, step))
    if out["parts"]:
        warn_dominating_loss(run, step, out["parts"])


def warn_dominating_loss(run, step, parts):
    """E2: said once per term, with the steps it covers so far."""
    st = run["state"]
    run.setdefault("loss_parts", []).append((step, dict(parts)))
    limit = run["cfg"]["train.max_loss_share"]
    recent = dominating_loss(run["loss_parts"][-3:], limit)  # cheap: the whole history only to warn
    found = dominating_loss(run["loss_parts"], limit) if set(recent) - set(st["warned_e2"]) else {}
    for k, (a, b, n, top) in found.items():
        if k not in st["warned_e2"]:
            st["warned_e2"].append(k)
            log(run, f"WARNING E2: loss/{k} is above train.max_loss_share {limit:.0%} of the loss at "
                     f"{n} logged steps in {a}-{b} (up to {top:.0%}); rebalance the weights (said "
                     "once; diagnose_and_fix.py --log gives the run's whole range)")


def warn_step(run, task, out):
    """G2, G4, G3: a step without an update (nothing to score, or non-finite) or with a large gradient, said."""
    cfg, st, unit = run["cfg"], run["state"], task["count_name"]
    step = st["global_step"]
    if out["empty"]:
        log(run, f"WARNING G2: step {step} skipped: none of its micro-batches holds a {unit[:-1]} to score"
                 f"{task.get('empty_why', '')}; no update, the LR schedule moves on ({st['skipped_steps']} "
                 "skipped in all)")
    elif not out["finite"]:
        log(run, f"WARNING G4: step {step} skipped: loss {out['loss']}, grad_norm {out['grad_norm']} "
                 f"({st['bad_streak']} in a row, {st['skipped_steps']} in all)")
    elif out["grad_norm"] > cfg["train.grad_norm_warn"]:
        log(run, f"WARNING G3: step {step} gradient norm {out['grad_norm']:.4g} > {cfg['train.grad_norm_warn']:g}")


def optimizer_step(run, task, micro_batches, count):
    """Micro-batches -> gradients -> one optimizer step -> one scheduler step. Returns host floats."""
    cfg, d, st = run["cfg"], run["dist"], run["state"]
    model, optimizer, scheduler, scaler = run["model"], run["optimizer"], run["scheduler"], run["scaler"]
    step = st["global_step"] + 1
    if count == 0:  # G2: no target in the whole step; only distillation has such steps (its task's empty_step)
        return task["empty_step"](run, step)
    if not run["module"].training:  # after an eval; a frozen backbone/teacher is not in here and stays in eval mode
        model.train()
    # G2: a micro-batch weighs by its share of the step's targets (a short last group included); the
    # x world undoes DDP's mean over processes, so the step equals one big batch of the same targets.
    share = count / d["world"]
    losses, parts, amp, last = [], {}, autocast(d["device"], cfg["train.precision"]), len(micro_batches) - 1
    for i, batch in enumerate(micro_batches):
        if STEP_FAULTS:
            step_fault(run, step, i)
        with gradient_sync(model, d["world"], i == last):  # gradients cross processes once per step
            with amp:
                loss_sum, components = task["loss"](model, batch)
            loss = loss_sum.float() / share
            (scaler.scale(loss) if scaler else loss).backward()
        losses.append(loss.detach())
        for name, value in components.items():
            parts.setdefault(name, []).append(value.detach().float())
    if scaler:
        scaler.unscale_(optimizer)  # G5: unscale before clipping, public API only
    # G3: clip_grad_norm_'s total norm, read back with the loss; the clip follows once the host knows it matters
    norm = total_grad_norm([p.grad for p in run["params"] if p.grad is not None])
    # G7: one host read per step: the micro-batch losses, the loss parts, the gradient norm (and DDP's flags)
    stats = torch.stack([*losses, *(v for part in parts.values() for v in part), norm.float()])
    save_due = save_is_due(run)
    if d["world"] > 1:  # summed over processes, so every process stops or saves at the same step (R8); the
        # gradient norm, the same on every process after DDP's all-reduce, is divided back below
        flags = [float(run["stop_signal"] is not None), float(save_due)]
        stats = torch.cat([stats, torch.tensor(flags, device=stats.device)])
        dist.all_reduce(stats)
    values = stats.tolist()
    loss, at = math.fsum(values[:len(losses)]) / d["world"], len(losses)
    for name, part in parts.items():
        parts[name], at = math.fsum(values[at:at + len(part)]) / count, at + len(part)
    grad_norm, stop = values[at] / d["world"], run["stop_signal"] is not None
    if d["world"] > 1:
        stop, save_due = values[-2] > 0, values[-1] > 0
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    lrs = [group["lr"] for group in optimizer.param_groups]  # S8: the LR this step uses, from the optimizer
    expected = run["expected_lr"][step - 1]
    if any(lr != expected for lr in lrs):  # S9: the scheduler is the only owner of the LR
        raise TrainingAborted(f"S9: at step {step} the optimizer's LR is {lrs[0]:.6g} but the configured schedule "
                              f"gives {expected:.6g}; something else writes the LR (a plateau rule, a manual "
                              "write): remove it, the scheduler must be its only owner")
    if finite:
        clip_gradients(run["params"], cfg["train.clip_grad_norm"], norm, grad_norm)  # G3
    if scaler:
        scaler.step(optimizer)  # skips the update by itself on inf/nan; always after a backward (G1)
        scaler.update()
    elif finite:
        optimizer.step()  # G4: a non-finite loss or gradient never reaches the weights
    optimizer.zero_grad(set_to_none=True)
    advance_schedule(scheduler)
    st["global_step"] = step
    return {"loss": loss, "grad_norm": grad_norm, "lr": lrs[0], "finite": finite, "stop": stop, "save_due": save_due,
            "parts": parts, "empty": False}


def advance_schedule(scheduler):
    """S1: the schedule advances once per optimizer step, skipped steps (G2, G4, fp16 overflow) included, so the
    LR is a function of the data position and the dry-run curve is the one training uses. Torch's "step()
    before optimizer.step()" warning (skipped first steps; a SequentialLR milestone fp16 skipped up to) comes
    only while the optimizer never stepped (its _opt_called flag): filtered then alone, as catch_warnings every
    step cost ~5 us and reset the warning caches. Without the flag every step is filtered: slower, never wrong."""
    if getattr(scheduler.optimizer, "_opt_called", False):
        scheduler.step()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        scheduler.step()


def save_is_due(run):
    """R8: train.save_every_minutes has passed since the last save (on this process)."""
    minutes = run["cfg"]["train.save_every_minutes"]
    return minutes is not None and time.monotonic() - run["last_save"] >= 60 * minutes
# ==== end shared: training loop ====


def empty_step(run, step):
    """G2: a step whose micro-batches hold no target on any process (count 0: in train_distill.py, on-policy
    micro-batches whose windows all have padding inside the prompt, E14) has no loss to divide by and no
    gradient: no forward, no update. count is the whole global step's, so every process takes this path at the
    same step (no collective is left waiting); the stop and save requests still cross the processes (R8). The
    scheduler advances (S1) and fit() counts the step as skipped (R2: global_step - skipped_steps = updates)."""
    flags = [float(run["stop_signal"] is not None), float(save_is_due(run))]
    if run["dist"]["world"] > 1:
        reduced = torch.tensor(flags, device=run["dist"]["device"])
        dist.all_reduce(reduced)
        flags = reduced.tolist()
    lr = run["optimizer"].param_groups[0]["lr"]
    advance_schedule(run["scheduler"])
    run["state"]["global_step"] = step
    return {"loss": math.nan, "grad_norm": math.nan, "lr": lr, "finite": True, "stop": flags[0] > 0,
            "save_due": flags[1] > 0, "parts": {}, "empty": True}


def make_loss(run, kd_term):
    """loss(model, batch) -> (sum over the micro-batch, {part: value}): the chunked loss, plain LM training's CE
    (kd.enabled false), or CE + KD + hidden-state terms, each at its weight; of the data, or (kd.seq_kd,
    on_policy.py's with_generation()) of the teacher's sequences."""
    cfg, teacher = run["cfg"], run["teacher"]
    cache = run.get("teacher_cache")
    alpha, beta, gamma, temperature = cfg["kd.alpha"], cfg["kd.beta"], cfg["kd.gamma"], cfg["kd.temperature"]
    chunk, packed = cfg["kd.chunk_tokens"], run["train_set"].packed
    chunked_loss = chunking(cfg).make_chunked_loss(run) if chunk else None

    def loss(model, batch):
        if chunk:  # forward KL only (objective_problems refuses another divergence with kd.chunk_tokens)
            return chunked_loss(model, batch)
        x, y, pos, cached = batch_parts(batch, packed)
        logits, projected = model(x, project=teacher is not None and gamma > 0, positions=pos)
        if teacher is None and cache is None:
            # kd.enabled false: plain LM training (this is how a teacher is made)
            return token_cross_entropy(logits, y), {}
        # G8: a term whose weight is 0 is not computed (no CE at kd.alpha 0, no teacher hidden states and no
        # projection at kd.gamma 0); the student's log-probabilities are computed once, and at T = 1 the CE
        # term reads the KD term's (a log_softmax and nll_loss are what F.cross_entropy runs).
        real, parts = y != IGNORE, {}
        log_q = log_probs(logits, temperature) if beta > 0 else None
        if alpha > 0:
            parts["ce"] = alpha * (nll_sum(log_q, y) if log_q is not None
                                   and temperature == 1 else token_cross_entropy(logits, y))
        if beta > 0 or gamma > 0:
            t_logits = t_hidden = None
            if not cached:
                with torch.no_grad():
                    t_logits, t_hidden = teacher(x, positions=pos)  # C10: the same rows, the same mask
            if beta > 0:  # divergence_scale: T^2 (tvd: T) keeps the KD gradient's scale independent of T
                parts["kd"] = kd_term(logits, t_logits, cached, real, log_q)
            if gamma > 0:
                parts["hidden"] = gamma * torch.where(real, hidden_loss(projected, t_hidden), 0.0).sum()
        return sum(parts.values()), parts

    return loss


def evaluate(run):
    """val/loss = summed token CE / real target tokens over the eval windows, val/ppl = exp(val/loss),
    val/agreement = share of those targets where student and teacher rank the same token first. Each
    process scores its share; sums and counts are gathered before any division."""
    d, cfg, val, teacher = run["dist"], run["cfg"], run["val_set"], run["teacher"]
    cache = run.get("teacher_cache")  # offline: the teacher's top-1 is its cached index[..., 0]
    rows = np.array_split(np.arange(len(run["val_windows"])), d["world"])[d["rank"]]  # positions in the eval windows
    mine = run["val_windows"][rows]
    size = cfg["train.eval_batch_size"]
    run["module"].eval()
    top1 = run.setdefault("teacher_top1", {})  # frozen teacher, fixed windows: its answers are computed once
    # D6: no [batch, seq, vocab] here either
    chunk = cfg["kd.chunk_tokens"] if isinstance(run["module"], Trainable) else 0
    chunks = chunking(cfg)  # loaded at start-up (resolve_config)
    ce_sum, count, agree = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(mine), size):
            x, y, pos, _ = batch_parts(val[mine[start:start + size]], val.packed)
            check_token_ids(x, y, val.vocab, "data.val_bin")
            x, y = to_device(x, d["device"]), to_device(y, d["device"])
            pos = None if pos is None else to_device(pos, d["device"])
            with autocast(d["device"], cfg["train.precision"]):
                if chunk:
                    hidden, _ = run["module"](x, logits=False, positions=pos)
                    ce, first = chunks.chunked_scores(hidden, chunks.linear_head(run["module"].lm, "the network"), y,
                                                      chunk)
                else:
                    logits, _ = run["module"](x, positions=pos)
                    ce, first = token_cross_entropy(logits, y), first_token(logits)
                if teacher is not None and start not in top1:
                    top1[start] = (chunks.chunked_scores(teacher(x, logits=False, positions=pos)[1],
                                                         chunks.linear_head(teacher, "the teacher"), None, chunk)[1]
                                   if chunk else first_token(teacher(x, positions=pos)[0]))
                elif cache is not None and start not in top1:  # E3: teacher_topk put first_token's id at index 0
                    top1[start] = to_device(cache["val"].teacher(rows[start:start + size])[1][..., 0], d["device"])
            real = y != IGNORE
            ce_sum += ce.item()  # a float64 sum on the host: no fp32 drift over many batches
            count += int(real.sum())
            if start in top1:
                agree += int(((first == top1[start]) & real).sum())
        if run["sharded"]:  # D1: each forward gathers the weights from every process, so all run as many
            spare = batch_parts(val[run["val_windows"][:1]], val.packed)
            spare = [None if t is None else to_device(t, d["device"]) for t in spare[::2]]
            batches = math.ceil(math.ceil(len(run["val_windows"]) / d["world"]) / size)
            for _ in range(batches - math.ceil(len(mine) / size)):
                run["module"](spare[0], logits=not chunk, positions=spare[1])
    sums = np.sum(all_gather_list([(ce_sum, count, agree)], d["world"]), axis=0)
    mean_ce = float(sums[0] / sums[1])
    metrics = {"val/loss": mean_ce, "val/ppl": perplexity(mean_ce)}
    if teacher is not None or cache is not None:
        metrics["val/agreement"] = float(sums[2] / sums[1])
    return metrics


def perplexity(mean_ce):
    """E3: exp of the mean token CE; inf past float range (not an OverflowError, not a clamped value)."""
    return float("inf") if mean_ce >= 709.0 else math.exp(mean_ce)  # nan >= 709 is False: nan stays nan


def make_task(run):
    """What the shared loop needs from distillation: batches, token counts, the loss, the eval."""
    cfg, train_set, teacher = run["cfg"], run["train_set"], run["teacher"]
    kd_term = make_kd_term(cfg)
    task = {"batches": make_batches(run), "count": train_set.count, "count_name": "tokens",
            "loss": make_loss(run, kd_term), "evaluate": evaluate, "empty_step": empty_step}
    if on_policy_used(cfg) and teacher is not None:  # E14: generated micro-batches, chosen once here
        generating(cfg).with_generation(run, kd_term, task)
    return task


def make_batches(run):
    """The training micro-batches: (x, y) token windows, or offline (x, y, log_p_top, index, log_rest)."""
    cfg, d, train_set = run["cfg"], run["dist"], run["train_set"]
    cache = run.get("teacher_cache")  # offline: micro-batches carry the teacher's cached top-k, no teacher runs
    name = "data.train_bin" if cfg["data.train_bin"] else "data.builtin"

    def batches(index_lists):
        # R4: the loader draws its base seed from its own generator when its iterator is made, not from the
        # global torch RNG: a resumed run makes one more iterator than an uninterrupted one, and a draw there
        # would move the dropout masks of every later step
        loader = torch.utils.data.DataLoader(train_set if cache is None else cache["train"], batch_size=None,
                                             sampler=index_lists, num_workers=cfg["train.num_workers"],
                                             pin_memory=d["device"].type == "cuda",
                                             generator=torch.Generator().manual_seed(cfg["seed"]))
        for batch in loader:  # (x, y), or offline (x, y, log_p_top, index, log_rest)
            check_token_ids(batch[0], batch[1], train_set.vocab, name)
            yield tuple(to_device(t, d["device"]) for t in batch)

    return batches


def make_kd_term(cfg):
    beta, temperature, top_k = cfg["kd.beta"], cfg["kd.temperature"], cfg["kd.top_k"]
    kind, jsd_beta, skew_alpha = cfg["kd.divergence"], cfg["kd.jsd_beta"], cfg["kd.skew_alpha"]
    scale = divergence_scale(kind, temperature)

    def kd_term(logits, t_logits, cached, mask, log_q=None):
        """kd.beta x scale x the divergence summed over the masked positions. Padding is masked with where(),
        not dropped with logits[mask]: a boolean index has a data-dependent size, a host-device sync on GPUs
        every micro-batch (G7). offline: the teacher's top-k numbers read from the cache, as online top-k.
        log_q: the student's log_probs at T when the step has them already (G8)."""
        div = kd_divergence(logits, kind, temperature, t_logits, top_k, cached or None, jsd_beta, skew_alpha, log_q)
        return beta * scale * torch.where(mask, div, 0.0).sum()

    return kd_term


# ==== shared: loop checks (identical in train_probe.py and train_distill.py) ====
def total_grad_norm(grads):
    """G3: the value torch.nn.utils.clip_grad_norm_ returns. On the CPU: torch's arithmetic (the norm of each
    gradient's norm) without its per-call grouping by device and dtype, the same bits in a quarter of the time
    on a small model. D1: a sharded gradient (FSDP2's DTensor) counts every process's shard."""
    if grads and hasattr(grads[0], "full_tensor"):
        return torch.nn.utils.get_total_norm(grads).full_tensor()
    if grads and grads[0].device.type == "cpu":
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return torch.nn.utils.get_total_norm(grads)


def clip_gradients(params, max_norm, norm, norm_on_host):
    """G3: clip_grad_norm_'s second half, given the norm of its first. Below max_norm its factor is exactly 1.0:
    torch multiplies anyway only to avoid a host sync the loop has paid already (margin: float32 rounding)."""
    if max_norm is not None and norm_on_host + 1e-6 > max_norm * (1 - 1e-5):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)


def gradient_sync(model, world, now):
    """G2/G7: gradients are reduced over the processes once per optimizer step, with its last micro-batch:
    DDP's no_sync() before it; a sharded model (FSDP2) keeps them unreduced until then."""
    if world > 1 and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(now)
        return NO_CONTEXT
    return model.no_sync() if world > 1 and not now else NO_CONTEXT


LOSS_FLOOR = 1e-4  # E1: an eval loss below this is a saturated model's; its value can repeat to the last bit
ANNEALED = 1e-3  # E1: an LR under this fraction of the run's peak is an annealed tail (OneCycle ends at 4e-6 of it)


def same_metrics(a, b):
    """Two evals' metrics equal to the last bit (NaN equal to NaN)."""
    return a.keys() == b.keys() and all(x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x)
                                                    and math.isnan(y)) for x, y in ((a[k], b[k]) for k in a))


def frozen_evals(previous, metrics, lr, peak, moved=None):
    """E1, the one rule of the script's warning and diagnose_and_fix.py's log check: two evals in a row with
    identical metrics mean a frozen model (LR 0, weights out of the optimizer) unless it converged: an LR
    annealed under ANNEALED of the run's `peak`, trained parameters that `moved` (the script knows), or, from a
    log alone (moved None), an eval loss at its floor (1.5e-7 repeats to the last bit while weights move).
    Returns why the model looks frozen, or None."""
    if previous is None or not same_metrics(previous, metrics) or 0 <= lr < ANNEALED * peak:
        return None
    if lr <= 0:
        return f"the LR is {lr:g}"
    if moved is None:
        floor = any(k.endswith("loss") and isinstance(v, float) and 0 <= v < LOSS_FLOOR for k, v in metrics.items())
        return None if floor else "the model stopped changing (LR 0? frozen weights?)"
    return None if moved else f"the trained parameters did not move at LR {lr:.4g} (frozen weights?)"


def dominating_loss(records, limit, persist=3):
    """E2, the one rule of the script's warning and diagnose_and_fix.py's log check. records: (step, {name:
    value}) of the logged loss parts in step order. A term dominates above `limit` of the parts' summed magnitude
    in `persist` records in a row (one noisy record is not a weighting). The label loss ("ce") is not judged: a
    student that agrees with its teacher is the healthy end of a KD run. Returns {name: (first step, last step,
    records above, largest share)}."""
    shares = []
    for step, parts in records:
        total = sum(abs(v) for v in parts.values())
        if len(parts) > 1 and total > 0 and all(math.isfinite(v) for v in parts.values()):
            shares.append((step, {k: abs(v) / total for k, v in parts.items()}))
    found = {}
    for name in sorted({k for _, p in shares for k in p} - {"ce"}):
        over = [(step, p[name]) for step, p in shares if p.get(name, 0.0) > limit]
        above = "".join("1" if p.get(name, 0.0) > limit else "0" for _, p in shares)
        if "1" * persist in above:  # `persist` records above the limit in a row
            found[name] = (over[0][0], over[-1][0], len(over), max(v for _, v in over))
    return found


def param_fingerprint(params):
    """One float64 sum per trained tensor: changes whenever an optimizer step moves a weight (E1). A sharded
    weight (D1) sums this process's shard: the fingerprint is only ever compared with this process's own."""
    return torch.stack([(p.to_local() if hasattr(p, "to_local") else p).detach().double().sum()
                        for p in params]).tolist()


def record_eval(run, metrics):
    """Record an eval, warn on frozen metrics (E1), keep best.pt, count the evals since the best."""
    cfg, st = run["cfg"], run["state"]
    step = st["global_step"]
    write_metrics(run, {"step": step, **metrics})
    log(run, f"eval step {step}: " + " ".join(f"{k}={v:.5g}" for k, v in metrics.items()))
    fingerprint = param_fingerprint(run["params"])
    moved = None if st["last_eval_params"] is None else fingerprint != st["last_eval_params"]
    lr, peak = run["expected_lr"][step - 1], float(run["expected_lr"].max())
    frozen = frozen_evals(st["last_eval"], metrics, lr, peak, moved)
    if frozen:  # E1: a converged model (LR > 0, weights still moving) repeats its metrics too, and is not warned
        log(run, f"WARNING E1: eval at step {step} is identical to the previous one ({metrics}); {frozen}")
    st["last_eval"], st["last_eval_params"] = dict(metrics), fingerprint
    name, best = cfg["train.best_metric"], st["best_value"]
    value, lower = metrics[name], name.endswith(("loss", "ppl"))
    if math.isfinite(value) and (best is None or (value < best if lower else value > best)):
        st["best_value"], st["best_step"], st["evals_since_best"] = value, step, 0
        save_best(run)
    else:
        st["evals_since_best"] += 1


def patience_exhausted(run):
    """Early stop: train.patience evals in a row without a better train.best_metric."""
    patience = run["cfg"]["train.patience"]
    return patience is not None and run["state"]["evals_since_best"] >= patience
# ==== end shared: loop checks ====


# -----------------------------------------------------------------------------
# Export: the best network where its users load it without this script (docs/distill_models.md).
def export_best(run):
    """best.pt's network into <run_dir>/export/: a Hugging Face model as a save_pretrained directory (hf_models.py),
    any other as model.pt, a plain state dict, with model.json saying how to build the module it loads into; the
    tokenizer (export_tokenizer). Published whole by publish_directory(): a kill leaves no half export and never
    none (R12); process 0 only."""
    if not run["dist"]["main"]:
        return
    cfg, best_path = run["cfg"], os.path.join(run["ckpt_dir"], "best.pt")
    if not os.path.exists(best_path):
        log(run, "WARNING: no best.pt (no eval had a finite value); nothing exported")
        return
    best = torch.load(best_path, map_location="cpu", weights_only=True, mmap=True)
    state = {k[len("lm."):]: v for k, v in saved_weights(best, best_path).items() if k.startswith("lm.")}  # D4
    lm, arch, out = run["module"].lm, trained_arch(cfg), os.path.join(run["run_dir"], "export")
    # R12: a kill's leftover names its writer
    tmp = tempfile.mkdtemp(dir=run["run_dir"], prefix=f".export-{os.getpid()}-")
    os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would hide the export from the people it is for
    try:
        if is_hf_lm(lm):
            hf_models(trained_key(cfg)).save_export(lm, state, tmp)
        else:
            if is_user_lm(lm):
                state = {k[len("model."):]: v for k, v in state.items()}
            torch.save(state, os.path.join(tmp, "model.pt"))
            build = (f"module = {arch['target']}(**kwargs)" if "target" in arch else
                     "from train_distill import GPT; module = GPT(vocab_size, seq_len, n_layer, n_head, n_embd)")
            meta = {"format": "state_dict", "file": "model.pt", "arch": arch, "vocab_size": vocab_size(cfg),
                    "seq_len": cfg["data.seq_len"], "launch_dir": cfg["launch_dir"],  # C8: where arch's module is
                    "load": build + "; module.load_state_dict(torch.load('model.pt', weights_only=True))"}
            atomic_write_text(os.path.join(tmp, "model.json"), json.dumps(meta, indent=2) + "\n")
        atomic_write_text(os.path.join(tmp, "config.yaml"), config_text(cfg))  # C8: the run's config, for --evaluate
        export_tokenizer(run, arch, tmp)
        publish_directory(tmp, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    log(run, f"exported best.pt's network (step {best['global_step']}, {cfg['train.best_metric']} "
             f"{best['best_value']:.5g}) to {out}")


def export_tokenizer(run, arch, tmp):
    """C10: the export carries the tokenizer the data was prepared with, its chat template included (prepare_text.py
    saved it beside the data; checked byte for byte against the manifest, here again as it is copied), so
    AutoTokenizer loads from the export what AutoModelForCausalLM does; without one, a Hugging Face student's own
    (student.hf_dir's tokenizer files). Any kind of student: the built-in GPT's export carries it too."""
    (where, want), names = data_tokenizer(run["cfg"]), None
    if where is None and "hf_dir" in arch:  # a Hugging Face student's own tokenizer files
        where, names = arch["hf_dir"], hf_models("student.hf_dir").TOKENIZER_FILES
    if where is None or not os.path.isdir(where):
        return
    copied = file_digests(where, names)
    for name in copied:
        shutil.copy2(os.path.join(where, name), os.path.join(tmp, name))
    if want is not None and file_digests(tmp, list(copied)) != want:  # changed during the run: carry none of it
        for name in copied:
            os.remove(os.path.join(tmp, name))
        log(run, f"WARNING C10: {where} changed during the run, it is not the tokenizer the data was prepared with; "
                 "the export carries no tokenizer")


def finished_run_pending(cfg, ckpt, run_dir):
    """Why a finished run is not simply complete, in words, or None (launch.sh asks before saying "complete"):
    its export is missing, killed before it was published (R12). The script's next start writes it."""
    export = os.path.join(run_dir, "export")
    missing = os.path.isfile(os.path.join(run_dir, "checkpoints", "best.pt")) and not os.path.isdir(export)
    return f"{export} is missing; the script writes it from best.pt" if missing else None


def load_export(export_dir):
    """An export loaded the way its users load it, without this script's training code: a Hugging Face
    directory with from_pretrained, a state dict into the module model.json names. Eval mode."""
    if os.path.isfile(os.path.join(export_dir, "config.json")):
        return transformers_module().AutoModelForCausalLM.from_pretrained(export_dir, local_files_only=True).eval()
    with open(os.path.join(export_dir, "model.json")) as f:
        meta = json.load(f)
    arch = meta["arch"]
    module = (import_target(arch["target"], "export", meta.get("launch_dir"))(**arch["kwargs"]) if "target" in arch
              else GPT(meta["vocab_size"], meta["seq_len"], **arch))
    module.load_state_dict(torch.load(os.path.join(export_dir, meta["file"]), map_location="cpu", weights_only=True))
    return module.eval()


# -----------------------------------------------------------------------------
# --evaluate (E11): a checkpoint, a run directory (its best.pt) or an export scored on the config's val windows
# by the same evaluate() the run used. Its code is distill_evaluate.py, a companion file beside this script,
# loaded by main() for --evaluate only.


# -----------------------------------------------------------------------------
# --dry_run (E5, S10): every code path on tiny data in seconds, before a long run is launched: the
# config's own run made tiny (KD from its teacher, or with kd.enabled false plain LM training of the same
# network) in fp32 (train, eval, save, export, stop, resume), fp16 (GradScaler) and bf16.
DRY_RUN_SETTINGS = ["train.epochs=2", "train.max_steps=null", "train.batch_size=4", "train.grad_accum=2",
                    "train.log_every=1", "train.eval_every=3", "train.save_every_steps=2", "train.patience=null",
                    "train.num_workers=0", "train.eval_batch_size=8", "schedule.warmup=2", "schedule.total_steps=null",
                    "expect.initial_lr=null", "expect.peak_lr=null", "expect.final_lr=null", "data.limit=26",
                    "data.val_windows=null", "data.seq_len=16", "data.builtin.train_bytes=40000",
                    "data.builtin.val_bytes=8000", "student.n_layer=1", "student.n_head=2", "student.n_embd=16",
                    "log.tensorboard=false", "log.wandb=null", "log.mlflow=null"]  # the checks run, no dashboards fill


def read_metrics(run_dir):
    """metrics.jsonl as (train records by step, eval records by step, events); the last record of a step wins."""
    trains, evals, events = {}, {}, []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for r in map(json.loads, f):
            if "event" in r:
                events.append(r)
            elif "lr" in r:
                trains[r["step"]] = r
            else:
                evals[r["step"]] = r
    return trains, evals, events


def export_matches_best(run_dir, cfg, teacher):
    """True when run_dir/export/, loaded as its users load it, gives the same logits as best.pt's network
    loaded into this script's model, on a batch of val windows."""
    path = os.path.join(run_dir, "checkpoints", "best.pt")
    best = torch.load(path, map_location="cpu", weights_only=True)
    module = build_trainable(cfg, teacher)
    module.load_state_dict(saved_weights(best, path))
    # packed (C10), a row's positions come third: the same causal rows through both networks compare the weights
    x = TokenWindows(cfg, "val")[np.arange(min(4, len(TokenWindows(cfg, "val"))))][0]
    with torch.no_grad():
        want = module.eval()(x)[0]
        got, _ = split_outputs(load_export(os.path.join(run_dir, "export"))(x))
    return torch.equal(want, got)


def optimizer_step_count(ckpt, path=None):
    """Updates the optimizer applied (AdamW counts them per parameter); None for SGD, which does not count."""
    if ckpt.get("shards"):  # D2: in the DCP directory, as optimizer.state.<parameter>.step
        steps = [v for k, v in shard_reader().shard_tensors(ckpt, path, "optimizer.state.").items()
                 if k.endswith(".step")]
    else:
        steps = [s["step"] for s in ckpt["optimizer"]["state"].values() if "step" in s]
    return int(steps[0]) if steps else (0 if ckpt["config"]["optim.name"] == "adamw" else None)


def dry_run(config_path, overrides, train_fn=train, run_dir=None):
    """Check the full schedule of the real config, then train/eval/save/stop/resume tiny copies of it in
    fp32, fp16 and bf16. Returns the exit code: 0 only when every check held."""
    cfg, _ = resolve_config(config_path, overrides)
    d = setup_distributed(cfg)  # under torchrun the tiny runs use every process: the DDP paths are checked too
    print_main = write_stdout if d["main"] else (lambda *args: None)  # R8: `--dry_run | head` ends without a traceback
    results = []

    def check(ok, what):
        results.append(bool(ok))
        print_main(f"  {'ok  ' if ok else 'FAIL'} {what}")

    def train_fn_together(*args, **kwargs):  # returns once process 0 has written every file of that run
        outcome_and_run = train_fn(*args, **kwargs)
        if d["world"] > 1:
            dist.barrier()
        return outcome_and_run

    print_main(f"dry run of {config_path or 'the built-in defaults'}"
               + (f" on {d['world']} processes" if d["world"] > 1 else "")
               + (", sharded (train.strategy fsdp)" if cfg["train.strategy"] == "fsdp" else "")
               + (", activation checkpointing" if cfg["train.activation_checkpointing"] else "")
               + (f", chunked loss ({cfg['kd.chunk_tokens']} positions)" if cfg["kd.chunk_tokens"] else ""))
    check_real_config(cfg, d, check, run_dir or os.path.join("runs", cfg["run_name"]))
    tiny = dry_run_settings(cfg, overrides, d)
    # Every process trains into process 0's temporary directory and reads the same files back afterwards
    # (processes on one node share its filesystem; launch.sh runs a multi-node job's dry run on one node).
    with tempfile.TemporaryDirectory(prefix="dry_run_") if d["main"] else contextlib.nullcontext() as tmp:
        tmp = all_gather_list([tmp], d["world"])[0]
        start = time.perf_counter()
        # the config's own runs: KD against its own teacher, or (kd.enabled false) plain LM training of the
        # same student.* network with no teacher, which is what the real run does
        if not cfg["kd.enabled"]:
            print_main(f"  kd.enabled false: the tiny runs are plain LM training of the network student.* names "
                f"({describe_arch(trained_arch(cfg))}), no teacher and no KD steps, as the real run")
        offline = cfg["kd.enabled"] and cfg["kd.teacher_cache"] is not None

        def tiny_config(precision):  # an offline config: the tiny runs build and read their own teacher cache
            cache = [f"kd.teacher_cache={os.path.join(tmp, 'cache_' + precision)}"] if offline else []
            return resolve_config(config_path, tiny + [f"train.precision={precision}"] + cache)[0]

        student, a, b = tiny_config("fp32"), os.path.join(tmp, "uninterrupted"), os.path.join(tmp, "interrupted")
        plan = check_tiny_run(cfg, student, a, offline, train_fn_together, check)
        # R1-R5, R8: stopped at step 5 and resumed, the tiny run ends bit-identical to the uninterrupted one
        outcome, _ = train_fn_together(student, b, "none", stop_after=5, quiet=True)
        check(outcome == "stopped", "stop at step 5 saves and exits (R8 path)")
        outcome, _ = train_fn_together(student, b, "auto", quiet=True)
        check(outcome == "finished" and checkpoint_tensors_equal(os.path.join(a, "checkpoints", "last.pt"),
                                                                 os.path.join(b, "checkpoints", "last.pt")),
              "resume from that save ends bit-identical to the uninterrupted run (R1-R5)")
        outcome, _ = train_fn_together(student, b, "auto", quiet=True)
        check(outcome == "complete", "a finished run restarted says it is complete")
        for precision in ("fp16", "bf16"):
            low = tiny_config(precision)
            check_precision_run(cfg, low, plan, os.path.join(tmp, precision), train_fn_together, check)
        print_main(f"  tiny runs took {time.perf_counter() - start:.1f} s")
        if d["world"] > 1:
            dist.barrier()  # every process has read the files before process 0 deletes the directory
    ok = all(results)
    print_main("dry run passed" if ok else "dry run FAILED")
    return 0 if ok else 1


def check_real_config(cfg, d, check, run_dir):
    """The real config's own inputs and its full schedule, before any tiny run."""
    # R10: whatever the real run refuses before its first step (its token files, teacher or cache, network) is
    # refused here first, by the same function with the same line (exit 2); nothing is written
    check_resume_mode(run_dir, "auto")  # C3: a --run_dir that is a file
    inputs = run_inputs(cfg, d, lambda line: None, build_cache=False)
    # S7/C4: the run dir's checkpoint (as resume() reads it, R6), trained on other bytes: the relaunch would refuse
    # to continue it; refused here with its line (it passed, then the run refused)
    ckpt, source = load_latest_checkpoint(os.path.join(run_dir, "checkpoints", "last.pt"))
    problem = ckpt and other_data_problem(cfg, ckpt, data_digest(inputs["train_set"], inputs["val_set"]), source)
    if problem:
        raise problem
    check(True, f"the config's own inputs pass what the run checks before step 1: {len(inputs['train_set'])} train "
                f"windows, every token id < {inputs['train_set'].vocab}, "
                + ("the teacher cache, " if cfg["kd.enabled"] and cfg["kd.teacher_cache"] else "")
                + ("the teacher, " if inputs["teacher"] is not None else "") + "the trained network (R10)")
    plan = inputs["plan"]  # the run's own (S2): a schedule plan_schedule() refuses was refused by run_inputs()
    del inputs
    failures = check_lr_curve(lr_curve(cfg, plan), cfg, plan)
    check(not failures, f"full schedule: {plan['total_steps']} optimizer steps, S10/S5 checks"
                        + "".join(f"\n       {rid}: {msg}" for rid, msg in failures))


def dry_run_settings(cfg, overrides, d):
    """The overrides that shrink the real config to the tiny runs'."""
    # C10: examples whole, as the run has them; E5: windows no longer than the run's (a split it takes holds one).
    # N processes x batch 4 over N x 26 windows: the same step counts, short last group included, as one process
    whole = any(cfg[f"data.{s}_bin"] and example_bounds(cfg, s) is not None for s in ("train", "val"))
    shape = {"data.seq_len": cfg["data.seq_len"] if whole else min(16, cfg["data.seq_len"]),
             "data.limit": 26 * d["world"]}
    # E5: under 26 windows a process, more epochs: the evals at steps 3, 6 and the stop at 5 come before the end
    windows = window_count({**cfg, **shape}, "train") if cfg["data.train_bin"] else shape["data.limit"]
    shape["train.epochs"] = dry_run_epochs(windows, d["world"])
    tiny = list(overrides) + DRY_RUN_SETTINGS + [f"{key}={value}" for key, value in shape.items()]
    if cfg["kd.hidden_layers"]:  # the tiny built-in student as deep as the layer map reaches
        tiny.append(f"student.n_layer={max(1, *(s for s, _ in cfg['kd.hidden_layers']))}")
    tiny += generating(cfg).tiny_settings(cfg) if generating(cfg) else []  # E14: both kinds of micro-batch
    return tiny


def check_tiny_run(cfg, student, a, offline, train_fn_together, check):
    """One uninterrupted tiny run in fp32 (into directory a): its steps, LR, losses, evals, checkpoints, export
    and teacher. Returns its plan."""
    who = "student" if cfg["kd.enabled"] else "plain LM"
    outcome, run = train_fn_together(student, a, "none", quiet=True)
    plan = run["plan"]
    check(outcome == "finished" and run["state"]["global_step"] == plan["total_steps"],
          f"{who}: {plan['total_steps']} optimizer steps over {plan['epochs']} epochs of {plan['num_samples']} windows"
          + (" with a short last accumulation group (G1)" if plan["micro_batches_per_epoch"] % 2 else ""))
    trains, evals, _ = read_metrics(a)
    logged = np.array([trains[s]["lr"] for s in sorted(trains)])
    check(len(logged) == plan["total_steps"] and np.array_equal(logged, lr_curve(student, plan)),
          "logged LR equals the schedule's own curve at every step (S1, S8)")
    check(not check_lr_curve(logged, student, plan), "tiny run's LR passes the S10 checks")
    if generating(student):  # E14: the student's generated micro-batches and the teacher's (kd.seq_kd)
        generating(student).tiny_run_checks(student, trains, plan, check)
    scored = [r for r in trains.values() if "loss" in r]  # G2: a step with no token to score logs no loss
    parts = sorted({k for r in scored for k in r if k.startswith("loss/")})  # step 1's alone FAILed when it had none
    check(scored and all(math.isfinite(r["loss"]) for r in scored) and bool(parts) == cfg["kd.enabled"],
          (f"finite losses, components {parts} logged (E2)" if parts else "finite losses (one term: the LM's CE)")
          if scored else f"a token to train on: all {plan['total_steps']} steps skipped (G2), the tiny run's windows "
          "(the first of data.train_bin) hold none; a data.too_long truncate that cuts every trained token does this")
    want = {"val/loss", "val/ppl"} | ({"val/agreement"} if cfg["kd.enabled"] else set())
    check(sorted(evals) == [3, 6, plan["total_steps"]] and all(
        want <= set(e) and nearly_equal(e["val/ppl"], math.exp(e["val/loss"])) for e in evals.values()),
        f"eval at steps {sorted(evals)}: {', '.join(sorted(want))}; val/ppl = exp(val/loss) (E3, E5)")
    last_path = os.path.join(a, "checkpoints", "last.pt")
    last = torch.load(last_path, map_location="cpu", weights_only=True)
    check(last["global_step"] == last["scheduler"]["last_epoch"] == plan["total_steps"]
          and optimizer_step_count(last, last_path) in (None, last["global_step"] - last["skipped_steps"]),
          "checkpoint loads with weights_only=True; global_step == scheduler steps == optimizer steps + skipped "
          "(R2, R7)")
    check(os.path.exists(os.path.join(a, "checkpoints", "best.pt")), "best.pt written")
    check(export_matches_best(a, student, run["teacher"]),
          f"export/ reloads without the kit ({'from_pretrained' if is_hf_lm(run['module'].lm) else 'a state dict'}) "
          "and gives best.pt's logits")
    if offline:
        check(run["teacher"] is None and run["teacher_cache"]["manifest"]["complete"],
              f"offline: the teacher's {caching(cfg).cache_slots(cfg, vocab_size(cfg))[1]} cached, the student "
              "trained from it with no teacher in memory")
    elif cfg["kd.enabled"]:
        check(tensor_digest(run["teacher"]) == tensor_digest(build_teacher(student, torch.device("cpu")))
              and not any(p.requires_grad for p in run["teacher"].parameters()) and not run["teacher"].training,
              "teacher frozen: eval mode, no grad, tensors identical to its checkpoint after training")
    return plan


def check_precision_run(cfg, low, plan, p_dir, train_fn_together, check):
    """G5, G6: the tiny run in fp16 or bf16 (low's train.precision): every step finite or skipped, LR on schedule."""
    precision = low["train.precision"]
    outcome, run = train_fn_together(low, p_dir, "none", quiet=True)
    trains, evals, _ = read_metrics(p_dir)
    skipped = run["state"]["skipped_steps"]
    # G5: a step the GradScaler skips (overflowed gradients) logs its finite loss: it counts once, as skipped
    skips = np.diff([0] + [trains[s].get("skipped_steps", 0) for s in sorted(trains)])
    sound = sum(1 for r, skip in zip((trains[s] for s in sorted(trains)), skips)
                if skip or (r.get("loss") is not None and math.isfinite(r["loss"])))
    check(outcome == "finished" and sound == len(trains) == plan["total_steps"] and skips.sum() == skipped
          and np.array_equal([trains[s]["lr"] for s in sorted(trains)], lr_curve(low, plan))
          and all(math.isfinite(e["val/loss"]) for e in evals.values())
          and (precision != "fp16" or all("scale" in r for r in trains.values())),
          f"{precision}: {plan['total_steps']} steps, {skipped} skipped by "
          f"{'the GradScaler' if precision == 'fp16' else 'the guard'}, "
          f"{'KD' if cfg['kd.enabled'] else 'CE'} in fp32, LR on schedule (G5, G6)")


# -----------------------------------------------------------------------------
def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg.split("=")[0] == "--tokenize" for arg in argv):  # C3: the preparation is its own tool now
        print(ConfigError([("C3", "--tokenize", "moved to the kit's prepare_text.py (copy it beside this script): "
                            "python prepare_text.py TEXT... --tokenizer DIR --out DIR")]), file=sys.stderr)
        raise SystemExit(2)  # as argparse exits on a bad option (launch.sh's preflight calls parse_args too)
    parser = one_line_parser(__doc__)
    parser.add_argument("--config", help="YAML config (omit for the built-in defaults)")
    parser.add_argument("--set", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys: --set optim.lr=3e-4 train.grad_accum=4 (repeatable)")
    parser.add_argument("--dry_run", action="store_true", help="check every code path on tiny data and exit")
    parser.add_argument("--resume", default="auto",
                        help="auto (default): continue from the run dir's last.pt; none; or a path")
    parser.add_argument("--run_dir", help="default runs/<run_name>")
    parser.add_argument("--evaluate", metavar="PATH", help="instead of training: score a checkpoint, a run directory "
                        "(its best.pt) or an export directory on the --config's data; the last line is JSON")
    parser.add_argument("--cache_teacher", action="store_true",
                        help="only build kd.teacher_cache (the teacher's top-k over every train and eval window) and "
                        "exit")
    parser.add_argument("--help_config", action="store_true",
                        help="print every config key with its default, type and meaning, and exit")
    args = parser.parse_args(argv)
    args.set = [item for group in args.set for item in group]  # --set a=1 b=2 and --set a=1 --set b=2 alike
    return args


# C3: which config key loads which companion file (--help_config names it beside the key); the loaders are called
# from resolve_config(), tests/test_config_text.py holds this table to them.
COMPANION_KEYS = {**dict.fromkeys(SINK_KEYS, "metric_sinks"), **dict.fromkeys(GENERATION_KEYS, "on_policy"),
                  **dict.fromkeys(("train.strategy", "train.activation_checkpointing"), "fsdp_sharding"),
                  **dict.fromkeys(("student.hf_dir", "kd.hf_teacher_dir"), "hf_models"), "data.packing": "packing",
                  **dict.fromkeys(("student.target", "teacher.target"), "user_models"), "kd.divergence": "divergences",
                  "kd.chunk_tokens": "chunked_loss", "kd.teacher_cache": "teacher_cache"}


def main(argv=None):
    args = parse_args(argv)
    if args.help_config:
        write_stdout(config_reference(CONFIG, os.path.basename(__file__), COMPANION_KEYS))  # R8: `| head` ok
        return 0
    try:
        if args.evaluate:
            scorer = companion("distill_evaluate", "--evaluate", fix="run without --evaluate")
            return scorer.evaluate_saved(args.config, args.set, args.evaluate)
        if args.dry_run:
            return dry_run(args.config, args.set, run_dir=args.run_dir)
        cfg, notes = resolve_config(args.config, args.set)
        for rid, key, msg in notes:
            print(f"note {rid}: {key}: {msg}", file=sys.stderr)
        if args.cache_teacher and not (cfg["kd.enabled"] and cfg["kd.teacher_cache"]):
            raise ConfigError([("C3", "--cache_teacher",
                                "needs kd.enabled=true and kd.teacher_cache set (the directory to build)")])
        outcome, run = train(cfg, args.run_dir or os.path.join("runs", cfg["run_name"]), args.resume,
                             cache_only=args.cache_teacher)
        close_sinks(run, ok=outcome != "stopped")
        if dist.is_initialized():
            # Every process leaves its last collective (the final save) before any closes its connections:
            # a peer that exits first would fail the slower one mid-collective. The exit itself is
            # exit_process()'s job (the gloo threads versus Py_Finalize).
            dist.barrier()
    except ConfigError as err:
        sys.stderr.write(f"{err}\n")  # one write: under torchrun every process says it, whole lines (C3)
        remove_refused_run_dir()
        return 2
    except TrainingAborted as err:
        print(f"training aborted: {err}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if outcome == "stopped":
        signum = run["stop_signal"] or signal.SIGTERM
        log(run, f"stopped by signal {signum} at step {run['state']['global_step']}; checkpoint saved, "
                 "the same command resumes")
        return 128 + int(signum)
    return 0


if __name__ == "__main__":
    exit_process(main())

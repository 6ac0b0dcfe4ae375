"""Linear probe on a frozen backbone, with a training loop that cannot have the catalogue's bugs.

Run it (defaults: synthetic TUAB-shaped EEG windows and a small built-in encoder):

    python train_probe.py --config configs/probe_synthetic.yaml
    python train_probe.py --dry_run                       # every code path in seconds, no config needed
    python train_probe.py --help_config                   # every config key: default, type, meaning
    python train_probe.py --config configs/tuab_4s.yaml --set optim.lr=3e-3 --set train.grad_accum=4
    torchrun --standalone --nproc_per_node=2 train_probe.py --config configs/tuab_4s.yaml
    python prepare_tuab.py /path/to/tuh_eeg_abnormal/v3.0.1 --out data/tuab_4s --config configs/tuab_4s.yaml  # first

The same command line starts the run and resumes it after a kill or a preemption (`--resume auto`).
Row ids in comments (S1, R4, G2, ...) refer to FAILURE_MODES.md, the catalogue this loop is built
against. The blocks marked "shared" are byte-identical in train_distill.py (a test enforces it).
"""
import argparse
import contextlib
import difflib
import hashlib
import importlib.util
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

TASK = "probe"
TRAINING_ONLY_FILES = ("data.train_x", "data.train_y")  # E11: --evaluate reads neither
PREPARE_TOOL = "python prepare_tuab.py TUAB_DIR --config CONFIG"  # makes the data.* windows (C3: named when missing)

# -----------------------------------------------------------------------------
# Config: every key, its default, its type and what it means. A YAML file and --set override these;
# any other key is an error (C2), every value is cast to its type or rejected (C1).
# Types: str, int, float, bool, floats (list), strs (list), dict (free-form), a tuple of choices; "?" allows null.
CONFIG = {
    "task": ("probe", "str", "which script runs this config (probe = train_probe.py)"),
    "run_name": ("probe", "str", "run directory is runs/<run_name>/ unless --run_dir is given"),
    "launch_dir": (None, "str?", "the directory the run was launched from, recorded by the run (null: the current "
                   "one); a *.target module not importable from the current directory is looked for there (C8)"),
    "seed": (0, "int", "seeds data order, synthetic data, initialisation"),
    # optimizer
    "optim.name": ("adamw", ("adamw", "sgd"), "optimizer"),
    "optim.lr": (5e-4, "float", "peak learning rate"),
    "optim.weight_decay": (0.05, "float", "decoupled weight decay (AdamW) / L2 (SGD)"),
    "optim.betas": ([0.9, 0.999], "floats", "AdamW betas"),
    "optim.momentum": (0.9, "float", "SGD momentum"),
    # learning-rate schedule, stepped once per optimizer step (S1)
    "schedule.type": ("onecycle", ("onecycle", "cosine", "linear", "wsd", "constant"), "LR schedule"),
    "schedule.warmup": (0.1, "float", "warmup: a fraction of the run (< 1) or optimizer steps (>= 1)"),
    "schedule.div_factor": (25.0, "float", "the first step's LR is optim.lr / div_factor"),
    "schedule.final_div_factor": (1e4, "float", "onecycle: final LR = optim.lr / (div_factor * final_div_factor)"),
    "schedule.final_lr_ratio": (0.0, "float", "cosine/linear/wsd: final LR as a fraction of optim.lr"),
    "schedule.anneal": ("cos", ("cos", "linear"), "onecycle: anneal_strategy"),
    "schedule.cycle_momentum": (False, "bool", "onecycle: cycle momentum / Adam beta1 (S4)"),
    "schedule.decay": (0.2, "float", "wsd: share of the run spent in the final decay"),
    "schedule.total_steps": (None, "int?", "leave null: derived from the data; if set it must match (S2)"),
    "expect.initial_lr": (None, "float?", "optional: the LR you expect at step 1 (checked by the dry runs, S5)"),
    "expect.peak_lr": (None, "float?", "optional: the highest LR you expect"),
    "expect.final_lr": (None, "float?", "optional: the LR you expect at the last step"),
    # training loop
    "train.epochs": (20, "int?", "passes over the training set (null when train.max_steps is set)"),
    "train.max_steps": (None, "int?", "optimizer steps instead of epochs (null when train.epochs is set); given "
                        "alone or by --set over a file's epochs, it replaces them (note S2)"),
    "train.batch_size": (64, "int", "samples per micro-batch, per process"),
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
    "train.best_metric": ("val/auroc", "str", "metric that picks best.pt (loss/ppl: lower is better)"),
    "train.max_loss_share": (0.9, "float", "warn when a loss term other than the label CE is above this share of the "
                             "loss for 3 logged steps in a row (E2; a 40x feature loss is ~95%)"),
    "train.num_workers": (0, "int", "DataLoader worker processes (uncached path; at most the cores it may use)"),
    "train.eval_batch_size": (256, "int", "samples per eval / feature-extraction batch"),
    "train.allow_schedule_change": (False, "bool", "resume even if schedule-shaping keys changed (S7)"),
    # metric sinks (optional packages): each receives every metrics.jsonl record, process 0 only (E10)
    "log.tensorboard": (False, "bool", "TensorBoard event files in <run_dir>/tb/ (needs the tensorboard package)"),
    "log.wandb": (None, "str?", "a Weights & Biases project to log to (needs wandb; honours WANDB_MODE=offline, "
                  "WANDB_DIR); null = off"),
    "log.mlflow": (None, "str?", "an MLflow tracking URI: sqlite:///mlflow.db for a local store (no server; needs "
                   "pip install mlflow), http://host:5000 for a server; metric names with '.' for '/'; null = off"),
    # data: .npy files, X [N, C, T] float32 (memory-mapped), y [N] int; null train_x = synthetic
    "data.train_x": (None, "str?", "training windows .npy [N, C, T]"),
    "data.train_y": (None, "str?", "training labels .npy [N]"),
    "data.val_x": (None, "str?", "validation windows .npy"),
    "data.val_y": (None, "str?", "validation labels .npy"),
    "data.test_x": (None, "str?", "optional test windows .npy (evaluated with best.pt at the end)"),
    "data.test_y": (None, "str?", "optional test labels .npy"),
    "data.limit": (None, "int?", "use only the first N windows of each split (debugging, --dry_run)"),
    # what the windows are: prepare_tuab.py makes them so, and a run refuses prepared data that differ (C6)
    "data.sample_rate": (256.0, "float", "Hz of the windows (prepare_tuab.py resamples every recording to it)"),
    "data.window_seconds": (4.0, "float", "seconds per window; sample_rate x window_seconds must be whole samples"),
    "data.montage": ("referential", ("referential", "tcp"), "the channels when data.channels is null: referential = "
                     "the 19 common 10-20 electrodes against the recording's reference; tcp = TUH's 22 bipolar pairs"),
    "data.channels": (None, "strs?", "the windows' channels in order: electrodes (FP1) or bipolar pairs (FP1-F7), "
                      "matched to TUAB's 'EEG FP1-REF' / 'EEG FP1-LE' labels; null = data.montage's list"),
    "data.units": ("uV", ("uV", "mV", "V"), "unit of the windows' values (each EDF channel converted from its own "
                   "physical dimension)"),
    "data.bandpass": (None, "floats?", "[low, high] Hz: a zero-phase FIR band-pass after resampling; null = none"),
    "data.notch": (None, "float?", "Hz of a power-line notch after resampling (60 where TUH recorded); null = none"),
    "data.val_fraction": (0.2, "float", "share of the train directory's subjects held out as val, chosen by a hash "
                          "of the subject id"),
    "data.synthetic.num_train": (4000, "int", "synthetic training windows"),
    "data.synthetic.num_val": (1000, "int", "synthetic validation windows"),
    "data.synthetic.channels": (19, "int", "EEG channels"),
    "data.synthetic.length": (1024, "int", "samples per window (4 s at 256 Hz)"),
    "data.synthetic.sample_rate": (256.0, "float", "Hz"),
    "data.synthetic.effect": (1.0, "float", "how much more slow-wave power abnormal windows carry"),
    # backbone (frozen) and probe head (trained)
    "backbone.target": (None, "str?", "'package.module:callable' returning the encoder; null = built-in"),
    "backbone.kwargs": ({}, "dict", "keyword arguments for the callable"),
    "backbone.checkpoint": (None, "str?", "state-dict file loaded into the backbone; null = seeded init"),
    "backbone.output": (None, "str?", "which tensor of a tuple/list/dict/ModelOutput output holds the features: "
                        "a key or an index; null = a tensor output itself, a tuple's first element, a dict's "
                        "last_hidden_state or else its only tensor (docs/probe-backbones.md)"),
    "backbone.pool": (None, (None, "mean_tokens", "mean_time", "cls", "flatten"), "how the feature tensor becomes "
                      "[B, D]: null or none = it must already be 2-D; mean_tokens [B, N, D] -> mean over N; "
                      "mean_time [B, D, T] -> mean over T; cls [B, N, D] -> token 0; flatten = all dims after B"),
    "backbone.cache_features": ("auto", ("auto", True, False), "compute features once, kept in <run_dir>/features/ "
                                "for resumes (auto: if they fit in RAM)"),
    "head.num_classes": (2, "int", "classes, labels 0..N-1; AUROC: class 1 vs 0, or one-vs-rest macro mean for more"),
    "head.standardize": (True, "bool", "standardise features with training-set mean/std (fixed, not trained)"),
    "head.dropout": (0.0, "float", "dropout on the standardised features before the linear layer (a probe "
                     "regulariser; draws from the torch RNG, which resume restores, R4)"),
}
# C8: the keys that name files; a relative one is read from the current directory at launch, and the run records it
# as an absolute path (absolute_paths()), so the run reads the same files from anywhere later.
PATH_KEYS = ("data.train_x", "data.train_y", "data.val_x", "data.val_y", "data.test_x", "data.test_y",
             "backbone.checkpoint")


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


def resolve_config(path=None, overrides=(), check_files=True, base=None):
    """The probe's config: load, cast, validate. Tools import this so they judge what training runs."""
    cfg, notes = load_config(path, overrides, CONFIG, base)
    problems = common_value_problems(cfg, TASK)
    backbones(cfg)  # C3: loaded here, at start-up, when the config names a backbone of its own
    if check_files:
        for key in PATH_KEYS:
            check_file(cfg, key, problems, (".npy",) if key.startswith("data.") else ())
    if cfg["data.train_x"] is not None and None in (cfg["data.train_y"], cfg["data.val_x"], cfg["data.val_y"]):
        problems.append(("C3", "data.train_x", "is set, so data.train_y, data.val_x and data.val_y must be too"))
    if (cfg["data.test_x"] is None) != (cfg["data.test_y"] is None):
        problems.append(("C3", "data.test_x", "and data.test_y: set both or neither"))
    for key in ("data.synthetic.num_train", "data.synthetic.num_val", "data.synthetic.channels",
                "data.synthetic.length", "head.num_classes"):
        if cfg[key] < (2 if key == "head.num_classes" else 1):
            problems.append(("C3", key, f"{cfg[key]!r} is too small"))
    if cfg["train.best_metric"] not in ("val/auroc", "val/bacc", "val/loss"):
        problems.append(("C3", "train.best_metric", f"{cfg['train.best_metric']!r} is not one of val/auroc, val/bacc, "
                         "val/loss"))
    if cfg["data.limit"] is not None and cfg["data.limit"] < 1:
        problems.append(("C3", "data.limit", f"{cfg['data.limit']!r} keeps no windows; use >= 1, or null for every "
                         "window"))
    if cfg["backbone.target"] is not None and ":" not in cfg["backbone.target"]:
        problems.append(("C3", "backbone.target", "must look like 'package.module:callable'"))
    if not 0 <= cfg["head.dropout"] < 1:
        problems.append(("C3", "head.dropout", f"{cfg['head.dropout']!r} must be in [0, 1)"))
    problems += window_setting_problems(cfg)
    if check_files:
        problems += prepared_data_problems(cfg)  # C6: windows from prepare_tuab.py must be what data.* says
    if problems:
        raise ConfigError(problems)
    return absolute_paths(cfg, PATH_KEYS), notes


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
# Data: .npy windows (memory-mapped, multi-GB sets never load into RAM) or synthetic EEG made on the fly.
def synthetic_window(seed, split, index, label, cfg):
    """A TUAB-shaped window: noise, an alpha rhythm and slow (delta) waves; abnormal ones carry more delta and less
    alpha, as abnormal EEG does. Deterministic from (seed, split, index): workers and resumes make the same data."""
    rng = np.random.default_rng([seed, split, index, 7])
    channels, length = cfg["data.synthetic.channels"], cfg["data.synthetic.length"]
    t = np.arange(length) / cfg["data.synthetic.sample_rate"]
    effect = cfg["data.synthetic.effect"] * label
    gain = rng.uniform(0.6, 1.6)  # per-recording amplitude, so total power alone does not give the answer
    alpha = (1.0 - 0.3 * effect) * np.sin(2 * np.pi * rng.uniform(8, 12) * t + rng.uniform(0, 2 * np.pi, (channels, 1)))
    delta = (0.4 + effect) * np.sin(2 * np.pi * rng.uniform(1, 4) * t + rng.uniform(0, 2 * np.pi, (channels, 1)))
    noise = rng.standard_normal((channels, length))
    return (gain * (alpha + delta + noise)).astype(np.float32)


class WindowSet(torch.utils.data.Dataset):
    """Indexed by an array of sample indices, so one fetch returns one micro-batch (x [n, C, T], y [n])."""

    def __init__(self, cfg, split):
        self.cfg, self.split = cfg, split
        self.x_path, self.y_path = (cfg[f"data.{split}_x"],
                                    cfg[f"data.{split}_y"]) if cfg["data.train_x"] else (None, None)
        if self.x_path:
            x = load_npy(cfg, f"data.{split}_x")
            self.labels = class_ids(self.y_path, f"data.{split}_y")
            self.shape = x.shape
            if self.labels.ndim != 1:
                raise ConfigError([("C3", f"data.{split}_y",
                                    f"{self.y_path} has shape {self.labels.shape}; labels must "
                                    "be one class id per window, shape [N] (save y.reshape(-1) instead)")])
            if x.ndim != 3 or len(self.labels) != x.shape[0] or not len(self.labels):  # C3: no window: min() below
                raise ConfigError([("C3", f"data.{split}_x", f"{self.x_path} has shape {x.shape} and its labels "
                                    f"{len(self.labels)} rows; expected X [N, C, T] and y [N], N >= 1")])
            if self.labels.min() < 0 or self.labels.max() >= cfg["head.num_classes"]:
                raise ConfigError([("C3", f"data.{split}_y", f"labels span {self.labels.min()}..{self.labels.max()}, "
                                    f"head.num_classes is {cfg['head.num_classes']}")])
            self.top_class = int(self.labels.max())  # the whole file's, before data.limit (data_sets checks it)
        else:
            n = cfg[f"data.synthetic.num_{split}"] if split in ("train", "val") else 0
            rng = np.random.default_rng([cfg["seed"], {"train": 0, "val": 1}.get(split, 2)])
            self.labels, self.top_class = (rng.random(n) < 0.5).astype(np.int64), 1  # normal 0, abnormal 1
            self.shape = (n, cfg["data.synthetic.channels"], cfg["data.synthetic.length"])
        if cfg["data.limit"] is not None:
            self.labels = self.labels[:cfg["data.limit"]]
            self.shape = (len(self.labels), *self.shape[1:])
        if self.x_path:  # C9: read once per content with its digest (content_record), not found as NaN steps
            bad = content_record(self.x_path).get("nonfinite_row")
            if bad is not None and bad < len(self.labels):
                raise ConfigError([("C9", f"data.{split}_x", f"{self.x_path} holds NaN or inf in window {bad} (the "
                                    "first such window); a window with a non-finite value cannot train or be scored: "
                                    "repair or drop it (np.isfinite(x).all(axis=(1, 2)) finds them all)")])
        self.x = None  # opened lazily: each DataLoader worker maps the file itself

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, indices):
        indices = np.asarray(indices, dtype=np.int64)
        if self.x_path:
            if self.x is None:
                self.x = np.load(self.x_path, mmap_mode="r")
            x = np.asarray(self.x[indices], dtype=np.float32)
        else:
            split = {"train": 0, "val": 1}[self.split]
            x = np.stack([synthetic_window(self.cfg["seed"], split, i, self.labels[i], self.cfg) for i in indices]) \
                if len(indices) else np.zeros((0, *self.shape[1:]), np.float32)
        return torch.from_numpy(x), torch.from_numpy(self.labels[indices])


def load_npy(cfg, key, refuse=(IsADirectoryError, PermissionError, ValueError)):  # a missing file: check_file's
    try:
        return np.load(cfg[key], mmap_mode="r")
    except refuse as err:  # C3: a directory, an unreadable file or no .npy (text): one line, never np.load's traceback
        problems = []
        check_file(cfg, key, problems, ())  # a directory, a file it may not read: the run's own line (the tools')
        said = getattr(err, "strerror", None) or ("shorter than its .npy header says (a copy cut short?)"
                                                  if "greater than file size" in str(err) else "not in .npy format")
        raise ConfigError(problems or [("C3", key, f"{cfg[key]}: {said}; give the file np.save wrote")]) from None


def class_ids(path, key):
    """C3: a labels file as int64 class ids. Strings ('abnormal'), Python objects or fractional / non-finite
    numbers are refused in one line naming the file and the fix, not a ValueError from astype."""
    try:
        y = np.asarray(load_npy({key: path}, key, refuse=OSError))
    except ValueError:  # Python objects (a list of strings saved as is): np.load cannot map them
        y = np.array([], object)
    whole = y.dtype.kind in "biu" or (y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all())
    if whole:
        return y.astype(np.int64)
    shown = f" ({', '.join(map(repr, np.unique(y)[:3].tolist()))}, ...)" if y.dtype.kind in "USf" else ""
    raise ConfigError([("C3", key, f"{path} holds labels of dtype {y.dtype}{shown}; labels must be integer class ids "
                        "0..head.num_classes-1: map them and save again, e.g. np.save(path, (y == 'abnormal')"
                        ".astype(np.int64))")])


def data_sets(cfg):
    """R10: every split the run reads, with its refusals (shapes, labels, channels, C9's NaN/inf), before anything is
    written: train(), --dry_run and diagnose_and_fix.py call it on the real config (the same line)."""
    sets = {split: WindowSet(cfg, split) for split in ("train", "val", "test") if split != "test" or cfg["data.test_x"]}
    train_set = sets["train"]
    for other in sets.values():  # C3: the backbone and the head are built for the training windows' channels and
        if other.shape[1:] != train_set.shape[1:]:  # length (a pooling backbone takes any length: a meaningless AUROC)
            raise ConfigError([("C3", f"data.{other.split}_x", f"{other.x_path or 'synthetic'} has {other.shape[1]} "
                                f"channels x {other.shape[2]} samples, data.train_x has {train_set.shape[1]} x "
                                f"{train_set.shape[2]}; every split needs the same channels in the same order and "
                                "windows of the same length")])
    top = max(s.top_class for s in sets.values())  # C3: a class no label holds is a typo, never a probe to train
    if top + 1 < cfg["head.num_classes"]:  # all 0: head.num_classes cannot be 1, the labels are the mistake
        fix = f"set head.num_classes: {top + 1}" if top else "a probe needs two classes: check the data.*_y files"
        raise ConfigError([("C3", "head.num_classes", f"is {cfg['head.num_classes']}, but the labels of every split "
                            f"are 0..{top}: the head would learn a class no window has, and AUROC and balanced "
                            f"accuracy would not be the task's; {fix}")])
    return sets


def train_set_size(cfg):
    """Training windows, a .npy file's from its header alone (the tools size schedules with this)."""
    n = load_npy(cfg, "data.train_x").shape[0] if cfg["data.train_x"] else cfg["data.synthetic.num_train"]
    return n if cfg["data.limit"] is None else min(n, cfg["data.limit"])


# -----------------------------------------------------------------------------
# Model: a frozen backbone (built-in encoder or any "package.module:callable") and a trained probe head.
class EEGEncoder(nn.Module):
    """Small conv + transformer encoder: [B, C, T] -> [B, 2*width] (mean and log-power of the tokens)."""

    def __init__(self, in_channels, width=32, depth=1, heads=4):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(in_channels, width, 15, stride=4, padding=7), nn.GELU(),
                                  nn.Conv1d(width, width, 9, stride=4, padding=4), nn.GELU())
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)

    def forward(self, x):
        tokens = self.transformer(self.conv(x).transpose(1, 2))
        return torch.cat([tokens.mean(1), tokens.pow(2).mean(1).add(1e-6).log()], dim=1)


@contextlib.contextmanager
def seeded_init(seed):
    """Module initialisation drawn from `seed` (the same weights on every process), then every global torch RNG
    stream (CPU, CUDA) restored: each process keeps its own seed_everything stream for its dropout masks (R4)."""
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(seed)
        yield


def build_backbone(cfg, in_channels):
    """Build, load and freeze: eval mode for every submodule (BatchNorm statistics never move, dropout is
    off), no grad, never in the optimizer. Bad kwargs and checkpoints are config errors (C3)."""
    target, kwargs = cfg["backbone.target"], cfg["backbone.kwargs"]
    factory, args = (EEGEncoder, (in_channels,)) if target is None else \
        (import_target(target, "backbone.target", cfg["launch_dir"]), ())
    try:
        with seeded_init(cfg["seed"]):
            backbone = factory(*args, **kwargs)
    except Exception as err:  # C3: one line naming the key to fix
        if isinstance(err, TypeError) or target is None:  # a keyword it does not take, a value the encoder refuses
            raise ConfigError([("C3", "backbone.kwargs", f"{kwargs} rejected by {target or 'the built-in encoder'}: "
                                f"{err}")]) from None
        where = backbones(cfg).model_code_frame(err)  # the user's build raised: where in their code
        raise ConfigError([("C3", "backbone.target", f"{target} raised {type(err).__name__}: "
                            f"{(str(err).strip().splitlines() or [''])[0]}" + (f" in {where}" if where else "")
                            + f" with backbone.kwargs {kwargs}; fix the build function")]) from None
    if not isinstance(backbone, nn.Module):
        raise ConfigError([("C3", "backbone.target",
                            f"{target} returned a {type(backbone).__name__}, not an nn.Module")])
    if cfg["backbone.checkpoint"]:
        backbones(cfg).load_backbone_checkpoint(backbone, cfg["backbone.checkpoint"])
    backbone.requires_grad_(False)
    return backbone.eval()


# Your own backbone (docs/probe-backbones.md): what only it needs (a weights file, an output that is not one
# [B, D] tensor, a pool, its build file's hash) is probe_backbones.py, a companion file beside this script,
# loaded at config resolution when a key below is set. The built-in encoder's path stays here.
BACKBONE_KEYS = ("backbone.target", "backbone.checkpoint", "backbone.output", "backbone.pool")


def backbones(cfg):
    key = next((k for k in BACKBONE_KEYS if cfg[k] is not None), None)
    return companion("probe_backbones", key) if key else None


def feature_tensor(out, output):
    if torch.is_tensor(out) and output is None:
        return out
    return companion("probe_backbones", "backbone.output").feature_tensor(out, output)


def pool_features(feats, pool):
    """[B, D] features as they are; any other shape (or a backbone.pool) as probe_backbones.py pools it."""
    if pool is None and feats.ndim == 2:
        return feats
    return companion("probe_backbones", "backbone.pool").pool_features(feats, pool)


def backbone_output(backbone, x, device, cfg):
    with torch.no_grad(), autocast(device, cfg["train.precision"]):
        out = backbone(to_device(x, device))
    return feature_tensor(out, cfg["backbone.output"]).float()


def extract_features(backbone, x, device, cfg):
    return pool_features(backbone_output(backbone, x, device, cfg), cfg["backbone.pool"])


def check_backbone(backbone, cfg, device, splits):
    """One batch of every split through the backbone before anything is written (C3): a model built for other
    channels or an output not [B, D] after backbone.pool fail here in one line (data_sets() made the splits alike).
    Returns the unpooled output's shape and the first training windows' features (feature_inputs keeps them)."""
    found = []
    for dataset in splits:
        x, _ = dataset[np.arange(min(2, len(dataset)))]
        try:
            raw = backbone_output(backbone, x, device, cfg)
        except ConfigError:
            raise
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0]
            inside = backbones(cfg).model_code_frame(err) if cfg["backbone.target"] else None  # the built-in: none
            # synthetic data: data.train_x is null, naming it would send the user to a key they never set
            batch = f"data.{dataset.split}_x" if dataset.x_path else f"synthetic {dataset.split}"
            raise ConfigError([("C3", "backbone.target" if cfg["backbone.target"] else "backbone.kwargs",
                                f"the backbone fails on a {batch} batch of shape {tuple(x.shape)}: "
                                f"{type(err).__name__}: {first}; "
                                + (f"the error came from the model's own forward ({inside}): check the layers you "
                                   "changed and backbone.kwargs against the data" if inside else
                                   "check backbone.kwargs against the data"))]) from None
        found.append((tuple(raw.shape[1:]), pool_features(raw, cfg["backbone.pool"]).cpu()))
    return found[0]  # the training split's (train() lists it first); data_sets() refused windows of other shapes


# -----------------------------------------------------------------------------
# What the features depend on: one description (feature_inputs), compared on resume (S7, R11) and hashed into
# the feature cache's file names (feature_cache_key, R11). Nothing stale is used silently.
def code_sha256(path):
    return read_content(path)["sha256"] if path and os.path.isfile(path) else None


def data_identity(cfg, split, part="x"):
    """A split's windows ("x") or labels ("y"): the file's bytes and sha256 (content_record, R11: not its path or
    times); synthetic, the data.synthetic.* values (the seed: resume() checks it, S7, feature_cache_key adds it)."""
    if cfg["data.train_x"]:
        record = content_record(cfg[f"data.{split}_{part}"])
        return {"bytes": record["bytes"], "sha256": record["sha256"]}
    return {k: v for k, v in cfg.items() if k.startswith("data.synthetic.")}


def config_inputs(cfg):
    """The part of feature_inputs known without building the backbone (already_complete and launch.sh use it)."""
    build = backbones(cfg).build_file(cfg) if cfg["backbone.target"] else None  # R11: the user's build file
    return {"backbone.target": cfg["backbone.target"], "backbone.kwargs": cfg["backbone.kwargs"],
            "backbone.output": cfg["backbone.output"], "backbone.pool": cfg["backbone.pool"],
            "train.precision": cfg["train.precision"], "backbone build file": build,
            "data.train_x content": data_identity(cfg, "train"),
            "data.train_y content": data_identity(cfg, "train", "y")}


def feature_inputs(cfg, digest, sample, window_shape):
    """S7/R11: everything the training features depend on, saved in every checkpoint (run["inputs"]) and compared
    by check_resume_inputs: settings, build file, the backbone's tensors (digest), the windows' [channels, samples]
    (E11: --evaluate scores no other), feature size, training data, and the first two windows' features (a change
    in code no hash here sees: the library that defines the class, the built-in encoder's own code)."""
    return {**config_inputs(cfg), "backbone digest": digest, "window shape": [int(n) for n in window_shape],
            "feature dim": int(sample.shape[1]), "first features": sample.float()}


def input_changes(saved, now):
    """[(key, what changed)] between two feature_inputs; the first features compare within float tolerance
    (the same backbone on another device type differs in the last bits)."""
    changes = []
    for key, value in now.items():
        if key not in saved:  # a key the checkpoint does not record: nothing to compare it with
            continue
        old = saved[key]
        if key == "first features":
            scale = float(old.abs().max()) if torch.is_tensor(old) and old.numel() else 0.0
            if torch.is_tensor(old) and old.shape == value.shape and \
                    not torch.allclose(old, value, rtol=1e-3, atol=1e-3 * scale + 1e-6):
                changes.append((key,
                                "the backbone's features of the first training windows differ (its code changed?)"))
        elif key == "backbone build file":
            if (old or {}).get("sha256") != (value or {}).get("sha256"):
                changes.append((key, f"{(value or old)['path']} changed"))
        elif old != value and not (key.endswith(" content") and "sampled_sha256" in old
                                   # a record made before R11 hashed whole files
                                   and old["size"] == value.get("bytes")):
            what = {"data.train_x content": "the training windows changed",
                    "data.train_y content": "the labels changed",
                    "backbone digest": "the backbone's tensors changed (backbone.checkpoint?)"}
            changes.append((key, what.get(key, f"{old!r} -> {value!r}")))
    return changes


def check_resume_inputs(cfg, run_dir, mode, inputs, world, num_samples):
    """S7/R11: the head in a checkpoint was trained on the features these inputs give. A resume on other
    features (another backbone.pool, kwargs, output, build file, weights, feature size or training data), or
    one resume() refuses (resume_changes), is refused here, one line, before anything in the run dir is written."""
    check_resume_mode(run_dir, mode)  # R1/C3: --run_dir a file, --resume none on checkpoints, a --resume PATH not there
    if mode == "none":
        return
    # the checkpoint a resume would start from (last.pt, else last.prev.pt: resume() says why, R6)
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    ckpt, source = load_latest_checkpoint(last if mode == "auto" else mode)
    if not isinstance(ckpt, dict) or ckpt.get("task") != cfg["task"]:
        return  # nothing to resume, or resume() explains
    if not ckpt.get("finished"):  # R1/S7: resume()'s refusals (seed, world size, schedule), before the cache is written
        resume_changes({"cfg": cfg, "plan": plan_schedule(cfg, num_samples, world), "dist": {"world": world}},
                       ckpt, source)
    problem = finished_run_problem(cfg, ckpt, run_dir) if ckpt.get("finished") else None
    if problem:
        raise problem
    changes = input_changes(ckpt.get("inputs") or {}, inputs)
    if changes:
        fix = ("a finished run is never continued: start a new run with another run_name (--set run_name=NEW) or "
               "--run_dir NEW" if ckpt.get("finished") else
               "restore them, or start a new run (--set run_name=NEW or --run_dir NEW)")
        raise ConfigError([("S7", changes[0][0],
                            f"changed since the checkpoint in {run_dir} (step {ckpt.get('global_step')}), "
                            f"whose head was trained on the features they give: "  # the first key heads the line
                            + "; ".join([changes[0][1]] + [f"{key}: {text}" for key, text in changes[1:]])
                            + f"; {fix}; nothing was touched")])


def feature_cache_key(cfg, inputs, split, n, device, class_file):
    """R11: the one key of a split's cached features, the only way feature_cache() reuses a file: what the resume
    check compares (feature_inputs), the split's own windows (data_identity), the file that defines the backbone's
    class (a library upgrade) and how they are computed."""
    data = data_identity(cfg, split)
    what = {"format": 3, **{k: v for k, v in inputs.items() if not k.startswith(("first features", "data.train_"))},
            "backbone build file": (inputs["backbone build file"] or {}).get("sha256"),
            "class file": code_sha256(class_file), "split": split, "windows": n, "data": data, "seed": cfg["seed"],
            "batch": cfg["train.eval_batch_size"], "device": device.type, "torch": str(torch.__version__)}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def compute_features(run, backbone, dataset, n):
    """The first n windows' features, a tqdm bar on a terminal, else a log line a minute (a large backbone is slow)."""
    cfg, d = run["cfg"], run["dist"]
    size, started = cfg["train.eval_batch_size"], time.monotonic()
    bar, said = None, started
    if d["main"] and sys.stderr.isatty() and not run["quiet"]:
        from tqdm import tqdm
        bar = run["bar"] = tqdm(total=n, unit="window", desc=f"{dataset.split} features", dynamic_ncols=True,
                                leave=False)
    log(run, f"features: computing {n} {dataset.split} windows")
    chunks = []
    for start in range(0, n, size):
        x, _ = dataset[np.arange(start, min(start + size, n))]
        chunks.append(extract_features(backbone, x, d["device"], cfg).cpu())
        if bar is not None:
            bar.update(len(x))
        elif time.monotonic() - said >= 60:
            said = time.monotonic()
            log(run, f"features: {start + len(x)}/{n} {dataset.split} windows ({(start + len(x)) / n:.0%})")
        if run["stop_signal"] is not None:  # R8: stop at the next window batch; the cache file is written whole or not
            log(run, f"stopped by signal {run['stop_signal']} while caching the {dataset.split} features "
                     f"({start + len(x)}/{n} windows, none saved); the same command computes them again")
            exit_process(128 + int(run["stop_signal"]))
    end_progress(run)
    log(run, f"features: {n} {dataset.split} windows in {time.monotonic() - started:.1f} s")
    return torch.cat(chunks)


def feature_cache(run, backbone, dataset, limit=None):
    """A split's features in one pass (the backbone is frozen, the data unaugmented: every epoch would recompute
    these numbers), kept in <run_dir>/features/ under a name made of what they depend on (feature_cache_key,
    R11): a resume loads them, features of other inputs are never loaded."""
    n = min(len(dataset), limit or len(dataset))
    class_file = getattr(sys.modules.get(type(backbone).__module__), "__file__", None)
    key = feature_cache_key(run["cfg"], run["inputs"], dataset.split, n, run["dist"]["device"], class_file)
    directory = os.path.join(run["run_dir"], "features")
    path = os.path.join(directory, f"{dataset.split}-{n}-{key}.pt")
    if os.path.exists(path):
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
            if torch.is_tensor(feats) and feats.shape[0] == n:
                log(run, f"features: {n} {dataset.split} windows loaded from {path}")
                return feats
        except Exception as err:  # a torn file: compute again
            log(run, f"WARNING: {path} is unreadable ({type(err).__name__}); computing the features again")
    feats = compute_features(run, backbone, dataset, n)
    if run["dist"]["main"]:
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):  # features of an older backbone or data: no longer any use
            if name.startswith(f"{dataset.split}-{n}-") and name.endswith(".pt"):
                os.unlink(os.path.join(directory, name))
        atomic_save(feats, path)
    return feats


def use_feature_cache(cfg, num_samples, feature_dim):
    if cfg["backbone.cache_features"] != "auto":
        return cfg["backbone.cache_features"]
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        avail = 4 << 30
    return num_samples * feature_dim * 4 < avail / 4


class ProbeHead(nn.Module):
    """Fixed standardisation (train-set mean/std, saved with the head), optional dropout, one linear layer. Per-
    sample arithmetic only, no BatchNorm: an update must not depend on how a step is split into micro-batches
    (G2; with head.dropout > 0 the masks differ with the split, as they do with any seed)."""

    def __init__(self, dim, num_classes, mean, std, dropout=0.0):
        super().__init__()
        self.register_buffer("feature_mean", mean)
        self.register_buffer("feature_std", std)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, feats):
        return self.linear(self.dropout((feats - self.feature_mean) / self.feature_std))


def build_head(cfg, sample_features):
    dim = sample_features.shape[1]
    mean, std = torch.zeros(dim), torch.ones(dim)
    if cfg["head.standardize"]:
        finite = sample_features[torch.isfinite(sample_features).all(1)]  # one bad window must not poison it
        if len(finite) > 1:  # else none to standardise by: the steps are G4's
            mean, std = finite.mean(0), finite.std(0).clamp_min(1e-6)
    with seeded_init(cfg["seed"]):
        return ProbeHead(dim, cfg["head.num_classes"], mean, std, cfg["head.dropout"])


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
# The run: data -> frozen backbone -> feature cache -> head, optimizer, schedule -> resume -> fit.
def print_plan(run, resumed, cached):
    cfg, plan, d = run["cfg"], run["plan"], run["dist"]
    marks = schedule_landmarks(cfg, plan)
    b, a, w, n = plan["batch_size"], plan["grad_accum"], plan["world_size"], plan["num_samples"]
    source = f"files {cfg['data.train_x']}, ..." if cfg["data.train_x"] else "SYNTHETIC EEG (data.train_x is null)"
    evals = "".join(f", {len(labels)} {split} windows" for split, (_, labels) in run["eval_sources"].items())
    log(run, f"data: {source}; {n} train windows{evals}, shape {tuple(run['train_set'].shape[1:])}, feature cache "
             f"{'on' if cached else 'off'}")
    log(run, f"steps: ceil({n} / ({b} x {w} processes)) = {plan['micro_batches_per_epoch']} micro-batches per epoch; "
             f"ceil({plan['micro_batches_per_epoch']} / grad_accum {a}) = {plan['steps_per_epoch']} optimizer "
             "steps per epoch; " + run_length_text(cfg, plan))
    log(run, f"schedule: {cfg['schedule.type']}, warmup {plan['warmup_steps']} optimizer steps, "
             f"LR {marks['initial']:.4g} at step 1 -> peak {marks['peak']:.4g} at step {marks['peak_step']} -> "
             f"{marks['final']:.4g} at step {plan['total_steps']}")
    # R11: where the weights came from; load_backbone_checkpoint() loads every tensor of the backbone or refuses
    weights = (f"{len(run['backbone'].state_dict())} tensors loaded from {cfg['backbone.checkpoint']}"
               if cfg["backbone.checkpoint"] else f"no backbone.checkpoint: seeded init (seed {cfg['seed']})")
    log(run, f"backbone: {cfg['backbone.target'] or 'built-in encoder'}, "
             f"{sum(p.numel() for p in run['backbone'].parameters())} parameters, {weights}, frozen in eval mode; "
             f"output [B, {', '.join(map(str, run['backbone_output_shape']))}] -> "
             f"backbone.pool {cfg['backbone.pool'] or 'none'} -> {run['module'].linear.in_features} features -> "
             f"head (dropout {cfg['head.dropout']:g})")
    log(run, f"devices: {d['world']} process(es) on {d['device']}, precision {cfg['train.precision']}; "
             + (f"resuming at step {run['state']['global_step']}" if resumed else "starting at step 0"))


def already_complete(cfg, plan, run_dir, mode, d):
    """The step of a finished run's last.pt when this command would only find it complete, else None: a
    restart of a finished run says so before building anything (the backbone, the feature cache). Anything
    less plain (a changed schedule, another world size) goes the full way through resume(), which explains."""
    path = os.path.join(run_dir, "checkpoints", "last.pt") if mode == "auto" else mode
    step = None
    if mode != "none" and os.path.isfile(path):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if ckpt.get("finished") and ckpt.get("task") == cfg["task"] and ckpt.get("world_size") == d["world"] \
                    and ckpt.get("schedule") == schedule_signature(cfg, plan) \
                    and finished_run_verdict(cfg, ckpt, run_dir) is None:
                step = ckpt["global_step"]
        except Exception:  # unreadable: resume() falls back to last.prev.pt and says so; a bad target: build_backbone;
            pass  # a relaunch with other values: resume() refuses it (finished_run_problem)
    steps = all_gather_list([step], d["world"])
    return step if len(set(steps)) == 1 else None


def finished_run_pending(cfg, ckpt, run_dir):
    """Why a finished run is not simply complete, in words, or None (already_complete and launch.sh ask): what its
    features depend on changed where the config does not show it (build file, training data: train() refuses,
    S7/R11), or its export is missing, killed before it was published (R12: train() writes it)."""
    changes = input_changes(ckpt.get("inputs") or {}, config_inputs(cfg))
    if not os.path.isdir(os.path.join(run_dir, "export")):
        changes.append(("export", f"{os.path.join(run_dir, 'export')} is missing; the script writes it"))
    return "; ".join(f"{key}: {text}" for key, text in changes) or None


def build_probe_run(cfg, run_dir, resume_mode, d, plan, sets, stop_after, quiet):
    """The frozen backbone (checked on every split), the feature cache when it fits, the head, its optimizer and
    schedule, in the run dict. Returns (run, the backbone's digest, the cached train features or None)."""
    train_set = sets["train"]
    backbone = build_backbone(cfg, train_set.shape[1]).to(d["device"])
    shape, first = check_backbone(backbone, cfg, d["device"], sets.values())  # every split, before anything is written
    digest = tensor_digest(backbone)
    inputs = feature_inputs(cfg, digest, first, train_set.shape[1:])
    check_resume_inputs(cfg, run_dir, resume_mode, inputs, d["world"], len(train_set))  # S7/R11/R1: writes nothing
    run = open_run(run_dir, cfg, d)
    install_stop_handlers(run)  # R8: before the feature cache, which may take hours on a large backbone
    run.update(quiet=quiet, stop_after=stop_after, plan=plan, train_set=train_set, backbone_output_shape=shape,
               inputs=inputs)
    cached = use_feature_cache(cfg, len(train_set), inputs["feature dim"])
    train_feats = feature_cache(run, backbone, train_set) if cached else None
    run["eval_sources"] = {k: (feature_cache(run, backbone, s) if cached else s, s.labels)
                           for k, s in sets.items() if k != "train"}
    # uncached: the first 2048 windows' features, for the standardisation only
    sample = train_feats if cached else feature_cache(run, backbone, train_set, limit=2048)
    module = build_head(cfg, sample).to(d["device"])
    # DDP copies process 0's weights and buffers to every process at construction; the head's buffers are
    # fixed, so the default per-forward buffer broadcast only copies equal values.
    model = torch.nn.parallel.DistributedDataParallel(module) if d["world"] > 1 else module
    params = list(module.parameters())  # only the head: the frozen backbone is never in the optimizer
    optimizer = build_optimizer(cfg, params)
    run.update(backbone=backbone, module=module, model=model, params=params, optimizer=optimizer,
               scheduler=build_schedule(optimizer, cfg, plan),
               scaler=make_grad_scaler(d["device"], cfg["train.precision"]))
    return run, digest, train_feats


def probe_task(run, train_feats, test_set):
    """What fit() needs: batches (cached features, or windows through the frozen backbone), the loss, the eval."""
    cfg, d, train_set, backbone = run["cfg"], run["dist"], run["train_set"], run["backbone"]
    labels = torch.from_numpy(train_set.labels)

    def batches(index_lists):
        if train_feats is not None:
            for idx in index_lists:
                idx = torch.from_numpy(idx)
                yield to_device(train_feats[idx], d["device"]), to_device(labels[idx], d["device"])
        else:
            # R4: the loader's own generator, not the global torch RNG: each iterator draws a base seed for its
            # workers, and a resumed run creates one iterator more than an uninterrupted one, which would shift
            # every later dropout mask. The workers draw nothing (the windows are deterministic): one seed serves.
            # E7: workers beyond the cores this process may use only compete for them (torch warns twice an epoch)
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            loader = torch.utils.data.DataLoader(train_set, batch_size=None, sampler=index_lists,
                                                 num_workers=min(cfg["train.num_workers"], cores),
                                                 pin_memory=d["device"].type == "cuda",
                                                 generator=torch.Generator().manual_seed(cfg["seed"]))
            for x, y in loader:
                yield extract_features(backbone, x, d["device"], cfg), to_device(y, d["device"])

    def loss(model, batch):
        feats, y = batch
        return F.cross_entropy(model(feats).float(), y, reduction="sum"), {}

    return {"batches": batches, "count": len, "count_name": "samples", "loss": loss,
            "evaluate": lambda run: evaluate(run, "val"), "final_eval": test_set is not None}


def finish_probe(run, test_set):
    """After the loop: the test split scored with best.pt, the run saved as finished, the summary, the export."""
    st, module = run["state"], run["module"]
    if not st["finished"]:
        if test_set is not None:
            best_path, last_weights = os.path.join(run["ckpt_dir"], "best.pt"), host_copy(module.state_dict())
            weights = "best.pt"
            if os.path.exists(best_path):
                module.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["model"])
            else:  # the best metric was never finite
                weights = f"the last weights, step {st['global_step']}: no best.pt"
            test = evaluate(run, "test")
            write_metrics(run, {"step": st["best_step"] or st["global_step"], **test})
            log(run, f"test ({weights}): " + " ".join(f"{k}={v:.5g}" for k, v in test.items()))
            module.load_state_dict(last_weights)  # last.pt keeps the last step's weights
        st["finished"] = True
        save_last(run)
    log(run, f"done: {st['global_step']} optimizer steps, {st['skipped_steps']} skipped; last eval "
             + " ".join(f"{k}={v:.4f}" for k, v in (st["last_eval"] or {}).items()) + f"; {best_text(run)}")
    export_probe(run)


# ---- The training loop, in the order it runs: train -> fit -> optimizer_step -> evaluate. What it
# calls only when an option is on (the feature cache, metric sinks) was chosen before train().
def train(cfg, run_dir, resume_mode="auto", stop_after=None, quiet=False):
    """Run or continue one probe training (build_probe_run, resume, fit, finish_probe): (outcome, run)."""
    d = setup_distributed(cfg)
    seed_everything(cfg["seed"], d["rank"])
    sets = data_sets(cfg)
    train_set, test_set = sets["train"], sets.get("test")
    plan = plan_schedule(cfg, len(train_set), d["world"])  # raises ConfigError before anything is written
    done = already_complete(cfg, plan, run_dir, resume_mode, d)
    if done is not None:
        run = open_run(run_dir, cfg, d)
        run.update(quiet=quiet, plan=plan)
        log_run_complete(run, done)
        return "complete", run
    run, digest, train_feats = build_probe_run(cfg, run_dir, resume_mode, d, plan, sets, stop_after, quiet)
    resumed = resume(run, resume_mode)
    st = run["state"]
    if st["finished"]:
        log_run_complete(run, st["global_step"])
        if not os.path.isdir(os.path.join(run_dir, "export")):  # killed between the last save and the export
            export_probe(run)
        return "complete", run
    write_resolved_config(run)
    open_sinks(run)  # E10: after resume(), which set the step the sinks continue from
    print_plan(run, resumed, train_feats is not None)
    task = probe_task(run, train_feats, test_set)
    if st["trained"]:  # R1: training ended but its final evaluation did not (it died there): run only that
        log(run, f"training ended at step {st['global_step']}, its final evaluation did not run; running it now")
        outcome = "finished"
    else:
        outcome = fit(run, task)
        if tensor_digest(run["backbone"]) != digest:
            raise TrainingAborted("the frozen backbone's tensors changed during training")
    if outcome in ("finished", "early_stopped"):
        finish_probe(run, test_set)
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


def evaluate(run, split):
    """Loss, AUROC and balanced accuracy over a whole split; each process scores its share and the
    predictions from every process are gathered before any metric (not a mean of per-process AUROCs)."""
    d, cfg = run["dist"], run["cfg"]
    source, labels = run["eval_sources"][split]
    mine = np.array_split(np.arange(len(labels)), d["world"])[d["rank"]]
    run["module"].eval()
    rows = []
    with torch.no_grad():
        for start in range(0, len(mine), cfg["train.eval_batch_size"]):
            idx = mine[start:start + cfg["train.eval_batch_size"]]
            feats = source[torch.from_numpy(idx)] if torch.is_tensor(source) else \
                extract_features(run["backbone"], source[idx][0], d["device"], cfg)
            logits = run["module"](feats.to(d["device"])).float()
            y = torch.from_numpy(labels[idx]).to(d["device"])
            loss = F.cross_entropy(logits, y, reduction="none")
            rows.extend(zip(logits.softmax(1).cpu().tolist(), loss.cpu().tolist()))
    rows = all_gather_list(rows, d["world"])
    present = np.unique(labels)
    if len(present) < 2 and split not in run.setdefault("one_class_warned", set()):
        run["one_class_warned"].add(split)
        log(run, f"WARNING: the {split} split holds only class {present.tolist()} ({len(labels)} windows): "
                 f"{split}/auroc is undefined and reported as NaN, so it cannot pick best.pt (a label-sorted file "
                 "cut by data.limit?)")
    probs = np.array([r[0] for r in rows])
    losses = np.array([r[1] for r in rows])
    if "predictions" in run:  # --evaluate writes them per window (E11)
        run["predictions"][split] = probs
    if probs.shape[1] == 2:
        roc = auroc(probs[:, 1], labels == 1)
    else:  # one-vs-rest, macro average over classes
        roc = float(np.nanmean([auroc(probs[:, c], labels == c) for c in range(probs.shape[1])]))
    return {f"{split}/auroc": roc, f"{split}/bacc": balanced_accuracy(probs.argmax(1), labels),
            f"{split}/loss": float(losses.mean())}


# -----------------------------------------------------------------------------
# Metrics: rank-based AUROC (equal to scikit-learn's roc_auc_score, ties as midranks), balanced accuracy.
def auroc(scores, labels):
    """P(score of a positive > score of a negative), ties counting one half, via midranks."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranked = scores[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    ends = np.r_[starts[1:], len(ranked)]
    midranks = (starts + ends + 1) / 2.0  # 1-based average rank of each tie group
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(midranks, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def balanced_accuracy(predictions, labels):
    classes = np.unique(labels)
    return float(np.mean([(predictions[labels == c] == c).mean() for c in classes]))


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
# Export (E11): the best head with the reference to its frozen backbone, loadable in one line
# (model = train_probe.load_export("runs/<run>/export")). Loading it and --evaluate (saved weights scored on a
# config's data by the run's own evaluate()) are the companion file probe_evaluate.py.
def model_config(cfg):
    """The keys that rebuild the network and its features: backbone (its seeded init), head, precision."""
    return {k: v for k, v in cfg.items() if k in ("seed", "train.precision", "launch_dir")  # C8: where its module is
            or k.startswith(("backbone.", "head."))}


def export_probe(run):
    """best.pt's head (the last weights when no eval was finite) into <run_dir>/export/: head.pt (a state dict),
    probe.json (the backbone reference: model_config(), in_channels, window shape) and the run's config.yaml,
    written into a temporary directory and published whole (publish_directory): no half export, never none (R12)."""
    if not run["dist"]["main"]:
        return None
    best_path, out = os.path.join(run["ckpt_dir"], "best.pt"), os.path.join(run["run_dir"], "export")
    best = torch.load(best_path, map_location="cpu", weights_only=True) if os.path.exists(best_path) else None
    state = best["model"] if best else host_copy(run["module"].state_dict())
    tmp = tempfile.mkdtemp(dir=run["run_dir"], prefix=f".export-{os.getpid()}-")  # R12: a leftover names its writer
    os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would hide the export from the people it is for
    try:
        torch.save(state, os.path.join(tmp, "head.pt"))
        meta = {"format": "probe_head", "file": "head.pt", "in_channels": run["train_set"].shape[1],
                "window_shape": run["inputs"]["window shape"],  # E11: --evaluate refuses windows of another shape
                "step": best["global_step"] if best else run["state"]["global_step"],
                "config": model_config(run["cfg"]),
                "load": f"import train_probe; model = train_probe.load_export({os.path.abspath(out)!r})"
                        "  # windows [B, C, T] -> logits"}
        atomic_write_text(os.path.join(tmp, "probe.json"), json.dumps(meta, indent=2) + "\n")
        atomic_write_text(os.path.join(tmp, "config.yaml"), config_text(run["cfg"]))  # C8: what --evaluate reads
        publish_directory(tmp, out)  # R12: an existing export is replaced, never deleted first
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    log(run, f"exported the head of step {meta['step']} with its backbone reference to {out}")
    return out


def load_export(export_dir):
    """An export as one module, windows [B, C, T] -> logits, in eval mode (the README's one line)."""
    return companion("probe_evaluate", "load_export", fix="load export/head.pt, a plain state dict, yourself") \
        .load_export(export_dir)


# -----------------------------------------------------------------------------
# --dry_run (E5, S10): every code path on tiny data in seconds, before a long run is launched.
DRY_RUN_SETTINGS = ["train.epochs=2", "train.max_steps=null", "train.batch_size=4", "train.grad_accum=2",
                    "train.log_every=1", "train.eval_every=3", "train.save_every_steps=2", "train.patience=null",
                    "train.num_workers=0", "train.eval_batch_size=8", "schedule.warmup=2", "schedule.total_steps=null",
                    "expect.initial_lr=null", "expect.peak_lr=null", "expect.final_lr=null", "data.limit=26",
                    "data.synthetic.num_train=26", "data.synthetic.num_val=16",  # the test split too (E5)
                    "log.tensorboard=false", "log.wandb=null", "log.mlflow=null"]  # the checks run, no dashboards fill


def dry_run(config_path, overrides, train_fn=train, run_dir=None, resume_mode="auto"):
    """Check the real config's full schedule, then train/eval/save/stop/resume a tiny copy: 0 when all checks held."""
    cfg, _ = resolve_config(config_path, overrides)
    data_sets(cfg)  # R10/C9: the real data's refusals, the run's line and exit 2 (the tiny runs read 26 windows)
    d = setup_distributed(cfg)  # under torchrun the tiny runs use every process: the DDP paths are checked too
    # S7/R11: a run dir whose checkpoint the real run would refuse to continue (its training data edited, other
    # features' settings, another schedule) is refused here with the run's line, before the real run is launched on it
    check_resume_inputs(cfg, run_dir or os.path.join("runs", cfg["run_name"]), resume_mode, config_inputs(cfg),
                        d["world"], train_set_size(cfg))
    print_main = write_stdout if d["main"] else (lambda *args: None)  # R8: `--dry_run | head` ends without a traceback
    results = []

    def check(ok, what):
        results.append(ok)
        print_main(f"  {'ok  ' if ok else 'FAIL'} {what}")

    def train_together(*args, **kwargs):  # returns once process 0 has written every file of that run
        outcome_and_run = train_fn(*args, **kwargs)
        if d["world"] > 1:
            dist.barrier()
        return outcome_and_run

    where = f" on {d['world']} processes" if d["world"] > 1 else ""
    print_main(f"dry run of {config_path or 'the built-in defaults'}{where}")
    try:
        plan = plan_schedule(cfg, train_set_size(cfg), d["world"])
        failures = check_lr_curve(lr_curve(cfg, plan), cfg, plan)
        check(not failures, f"full schedule: {plan['total_steps']} optimizer steps, S10/S5 checks"
                            + "".join(f"\n       {rid}: {msg}" for rid, msg in failures))
    except ConfigError as err:
        check(False, "full schedule: " + "; ".join(f"{rid} {key}: {msg}" for rid, key, msg in err.problems))
    # N processes x batch 4 over N x 26 windows: the same step counts, short last group included, as one process
    per_world = [f"data.limit={26 * d['world']}", f"data.synthetic.num_train={26 * d['world']}"]
    tiny, _ = resolve_config(config_path, list(overrides) + DRY_RUN_SETTINGS + per_world)
    # E5: under 26 windows a process, more epochs: the evals at steps 3, 6 and the stop at 5 come before the end
    tiny["train.epochs"] = dry_run_epochs(train_set_size(tiny), d["world"])
    # Every process trains into process 0's temporary directory and reads the same files back afterwards
    # (processes on one node share its filesystem; launch.sh runs a multi-node job's dry run on one node).
    with tempfile.TemporaryDirectory(prefix="dry_run_") if d["main"] else contextlib.nullcontext() as tmp:
        tmp = all_gather_list([tmp], d["world"])[0]
        a, b = os.path.join(tmp, "uninterrupted"), os.path.join(tmp, "interrupted")
        start = time.perf_counter()
        outcome, run = train_together(tiny, a, "none", quiet=True)
        plan = run["plan"]
        check(outcome == "finished" and run["state"]["global_step"] == plan["total_steps"],
              f"train: {plan['total_steps']} optimizer steps over {plan['epochs']} epochs of {plan['num_samples']} "
              "windows" + (" with a short last accumulation group (G1)" if plan["micro_batches_per_epoch"] % 2 else ""))
        records = [json.loads(line) for line in open(os.path.join(a, "metrics.jsonl"))]
        logged = np.array([r["lr"] for r in records if "lr" in r])
        check(len(logged) == plan["total_steps"] and np.array_equal(logged, lr_curve(tiny, plan)),
              "logged LR equals the schedule's own curve at every step (S1, S8)")
        check(not check_lr_curve(logged, tiny, plan), "tiny run's LR passes the S10 checks")
        evals = [r["step"] for r in records if any(k.startswith("val/") for k in r)]
        check(evals == [3, 6, plan["total_steps"]], f"eval at steps {evals} (E5)")
        last = torch.load(os.path.join(a, "checkpoints", "last.pt"), map_location="cpu", weights_only=True)
        check(last["global_step"] == last["scheduler"]["last_epoch"] == plan["total_steps"],
              "checkpoint loads with weights_only=True; global_step == scheduler steps (R2, R7)")
        never = run["state"]["best_value"] is None  # a one-class val split in the first 26 windows: warned, no best
        check(os.path.exists(os.path.join(a, "checkpoints", "best.pt")) or never,
              f"no best.pt: {tiny['train.best_metric']} was never finite in the tiny run (its first val windows hold "
              "one class: a label-sorted file?); a full run warns in train.log if it happens there"
              if never else "best.pt written")
        if tiny["data.test_x"]:
            tested = [r for r in records if "test/loss" in r]
            check(len(tested) == 1 and run["state"]["finished"],
                  "test split evaluated once at the end, with best.pt if there is one (E5)")
        outcome, _ = train_together(tiny, b, "none", stop_after=5, quiet=True)
        check(outcome == "stopped", "stop at step 5 saves and exits (R8 path)")
        outcome, run = train_together(tiny, b, "auto", quiet=True)
        check(outcome == "finished" and checkpoint_tensors_equal(os.path.join(a, "checkpoints", "last.pt"),
                                                                 os.path.join(b, "checkpoints", "last.pt")),
              "resume from that save ends bit-identical to the uninterrupted run (R1-R5)")
        outcome, _ = train_together(tiny, b, "auto", quiet=True)
        check(outcome == "complete", "a finished run restarted says it is complete")
        print_main(f"  tiny runs took {time.perf_counter() - start:.1f} s")
        if d["world"] > 1:
            dist.barrier()  # every process has read the files before process 0 deletes the directory
    ok = all(results)
    print_main("dry run passed" if ok else "dry run FAILED")
    return 0 if ok else 1


# -----------------------------------------------------------------------------
# Prepared windows: prepare_tuab.py turns the TUAB download into .npy windows with a manifest.json of what they
# are (C7). Every run, dry run and diagnose compares what data.* says with the manifest (C6); your own .npy
# windows, without a manifest, are read as they are.
# (Written in lower case: the electrodes c3 and c4 would read as catalogue row ids to tests/test_failure_modes.py.)
REFERENTIAL_19 = "fp1 fp2 f3 f4 c3 c4 p3 p4 o1 o2 f7 f8 t3 t4 t5 t6 fz cz pz".upper().split()
TCP_22 = ("fp1-f7 f7-t3 t3-t5 t5-o1 fp2-f8 f8-t4 t4-t6 t6-o2 a1-t3 t3-c3 c3-cz cz-c4 c4-t4 t4-a2 fp1-f3 f3-c3 c3-p3 "
          "p3-o1 fp2-f4 f4-c4 c4-p4 p4-o2").upper().split()  # TUH's 01_tcp_ar montage: 22 bipolar pairs
# 10-10 names of electrodes TUH labels the 10-20 way
ELECTRODE_ALIASES = {"T7": "T3", "T8": "T4", "P7": "T5", "P8": "T6"}
INCOMPLETE = "INCOMPLETE"  # in --out while a preparation runs, and after one was killed: the data are not ready


def window_channels(cfg):
    """The windows' channels in order, upper case, 10-10 names as TUH's 10-20 ones: data.channels or the montage's."""
    names = cfg["data.channels"] or (TCP_22 if cfg["data.montage"] == "tcp" else REFERENTIAL_19)
    return ["-".join(ELECTRODE_ALIASES.get(e, e) for e in name.strip().upper().split("-")) for name in names]


def window_settings(cfg):
    """What a recording's windows depend on besides its bytes: prepare_tuab.py's cache key, the run's check (C6)."""
    rate, seconds = cfg["data.sample_rate"], cfg["data.window_seconds"]
    return {"sample_rate": rate, "window_seconds": seconds, "window_samples": int(round(rate * seconds)),
            "channels": window_channels(cfg), "units": cfg["data.units"], "bandpass": cfg["data.bandpass"],
            "notch": cfg["data.notch"]}


def window_setting_problems(cfg):
    """C3: data.* values that describe windows no preparation could make."""
    p, rate, seconds = [], cfg["data.sample_rate"], cfg["data.window_seconds"]
    if rate <= 0:
        p.append(("C3", "data.sample_rate", f"{rate!r} must be > 0"))
    elif seconds <= 0 or abs(rate * seconds - round(rate * seconds)) > 1e-9:
        p.append(("C3", "data.window_seconds", f"{seconds!r} x data.sample_rate {rate:g} is not a whole number of "
                  "samples; choose a window of whole samples (4 s at 256 Hz = 1024)"))
    if not 0 < cfg["data.val_fraction"] < 1:
        p.append(("C3", "data.val_fraction", f"{cfg['data.val_fraction']!r} must be between 0 and 1"))
    band = cfg["data.bandpass"]
    if band is not None and not (len(band) == 2 and 0 < band[0] < band[1] < rate / 2):
        p.append(("C3", "data.bandpass", f"{band!r} must be [low, high] with 0 < low < high < data.sample_rate / 2 "
                  f"({rate / 2:g} Hz), or null"))
    if cfg["data.notch"] is not None and not 0 < cfg["data.notch"] < rate / 2:
        p.append(("C3", "data.notch", f"{cfg['data.notch']!r} must be between 0 and data.sample_rate / 2, or null"))
    names = window_channels(cfg)
    bad = [n for n in names if not re.fullmatch(r"[A-Z0-9]+(-[A-Z0-9]+)?", n)]
    if bad or len(set(names)) != len(names):
        p.append(("C3", "data.channels", f"{cfg['data.channels']!r}: give distinct electrodes (FP1) or bipolar pairs "
                  f"(FP1-F7)" + (f"; not a channel: {bad}" if bad else "; a channel appears twice")))
    return p


def read_manifest(directory):
    """C6: prepare_tuab.py's manifest.json in `directory`, else None (none, unreadable, or another tool's)."""
    try:
        with open(os.path.join(directory, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("made_by") == "prepare_tuab.py" else None


def prepared_data_problems(cfg):
    """C6: windows prepare_tuab.py made (a manifest.json beside them) must be what the config says: the same
    sample rate, window length, channels, units, filters and val share, the files as prepared, and a finished
    preparation. resolve_config() calls it, so the run, --dry_run and diagnose_and_fix.py refuse alike."""
    keys = [k for k in PATH_KEYS if k.startswith("data.") and cfg[k] and os.path.isfile(cfg[k])]
    problems, want = [], {**window_settings(cfg), "val_fraction": cfg["data.val_fraction"]}
    for directory in sorted({os.path.dirname(os.path.abspath(cfg[k])) for k in keys}):
        mine = [k for k in keys if os.path.dirname(os.path.abspath(cfg[k])) == directory]
        again = f"python prepare_tuab.py SRC --out {directory} --config CONFIG"
        if os.path.exists(os.path.join(directory, INCOMPLETE)):
            problems.append(("C6", mine[0], f"{directory} holds an unfinished preparation (its {INCOMPLETE} file); "
                             f"run the same command again to finish it ({again})"))
            continue
        manifest = read_manifest(directory)
        if manifest is None:  # your own windows, beside no manifest.json or another tool's: nothing to compare with
            continue
        made = (manifest.get("inputs") or {}).get("settings") or {}
        for name, value in want.items():
            if name != "window_samples" and made.get(name) != value:
                problems.append(("C6", f"data.{name}", f"{value!r} but {directory}/manifest.json says the windows were "
                                 f"prepared with {made.get(name)!r}; set data.{name} to that, or prepare again with "
                                 f"this config: {again}"))
        for key in mine:
            meta = manifest.get("outputs", {}).get(os.path.basename(cfg[key]))
            if meta and os.path.getsize(cfg[key]) != meta["bytes"]:
                problems.append(("C6", key,
                                 f"{cfg[key]} is {os.path.getsize(cfg[key])} bytes, {directory}/manifest.json "
                                 f"says {meta['bytes']}: it changed after it was prepared; prepare again: {again}"))
    return problems


# -----------------------------------------------------------------------------
def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg.split("=")[0] == "--prepare_tuab" for arg in argv):  # C3: the preparation is its own tool now
        print(ConfigError([("C3", "--prepare_tuab", "moved to the kit's prepare_tuab.py (copy it beside this script): "
                            "python prepare_tuab.py SRC --out DIR --config CONFIG")]), file=sys.stderr)
        raise SystemExit(2)  # as argparse exits on a bad option (launch.sh's preflight calls parse_args too)
    parser = one_line_parser(__doc__)
    parser.add_argument("--config", help="YAML config (omit for the built-in defaults)")
    parser.add_argument("--set", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys: --set optim.lr=3e-4 train.grad_accum=4 (repeatable; "
                             "backbone.kwargs.depth=4 sets one entry of a mapping)")
    parser.add_argument("--dry_run", action="store_true", help="check every code path on tiny data and exit")
    parser.add_argument("--resume", default="auto",
                        help="auto (default): continue from the run dir's last.pt; none; or a path")
    parser.add_argument("--run_dir", help="default runs/<run_name>")
    parser.add_argument("--evaluate", metavar="PATH", help="instead of training: score a checkpoint, a run directory "
                        "(its best.pt) or an export directory on the --config's data; the last line is JSON")
    parser.add_argument("--help_config", action="store_true",
                        help="print every config key with its default, type and meaning, and exit")
    args = parser.parse_args(argv)
    args.set = [item for group in args.set for item in group]  # --set a=1 b=2 and --set a=1 --set b=2 alike
    return args


# C3: which config key loads which companion file (--help_config names it beside the key); the loaders are backbones()
# and metric_sinks(), tests/test_config_text.py holds this table to them.
COMPANION_KEYS = {**dict.fromkeys(BACKBONE_KEYS, "probe_backbones"), **dict.fromkeys(SINK_KEYS, "metric_sinks")}


def main(argv=None):
    args = parse_args(argv)
    if args.help_config:
        write_stdout(config_reference(CONFIG, os.path.basename(__file__), COMPANION_KEYS))  # R8: `| head` ok
        return 0
    try:
        if args.evaluate:
            scorer = companion("probe_evaluate", "--evaluate", fix="run without --evaluate")
            return scorer.evaluate_saved(args.config, args.set, args.evaluate)
        if args.dry_run:
            return dry_run(args.config, args.set, run_dir=args.run_dir, resume_mode=args.resume)
        cfg, notes = resolve_config(args.config, args.set)
        for rid, key, msg in notes:
            print(f"note {rid}: {key}: {msg}", file=sys.stderr)
        outcome, run = train(cfg, args.run_dir or os.path.join("runs", cfg["run_name"]), args.resume)
        close_sinks(run, ok=outcome != "stopped")
        if dist.is_initialized():
            # every process leaves its last collective (the final save) before any closes its connections: a peer
            # gone first would fail the slower one mid-collective (the exit itself is exit_process()'s job)
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

"""Find the catalogue's mistakes in a training config, a metrics log or a checkpoint; write a fixed config.

    python diagnose_and_fix.py --config configs/probe_synthetic.yaml
    python diagnose_and_fix.py --config configs/tuab_4s.yaml --num_samples 409455 --world_size 4 --device_memory 80
    python diagnose_and_fix.py --log runs/probe_synthetic/metrics.jsonl        # config: the run's config.yaml
    python diagnose_and_fix.py --checkpoint runs/probe_synthetic/checkpoints/last.pt
    python diagnose_and_fix.py --log runs/A/metrics.jsonl [--log runs/B/metrics.jsonl] --plot runs.png  # or --plot -
    python diagnose_and_fix.py --config C --fix --output C.fixed.yaml [--json]

Every finding carries its FAILURE_MODES.md row id, a severity (critical, warning, info), one line of evidence
with the numbers and one line saying how to fix it. Exit code 0: no critical finding; 1: one or more (their count
is in the summary line and in --json's counts); 2: refused input (ruff's, mypy's and pytest's convention, so a
script tells bad input from a diagnosis). Input the run refuses as a whole is refused here as the run refuses it,
one line on stderr and exit code 2: command-line misuse (e.g. --fix without --output), an input file that is
missing or a directory, and a config file that holds no config (empty, not YAML, not text, not a mapping: the run's
own line). A config that holds keys is diagnosed: each problem the run would refuse (an unknown key, a wrong type)
is a critical finding.

It re-implements nothing of training: it imports the script the config's `task` names (train_probe.py,
train_distill.py) and judges the config with that script's own loader (resolve_config), data size
(train_set_size), accumulation rule (plan_schedule / optimizer_steps_per_epoch), schedule (lr_curve,
schedule_landmarks, check_lr_curve) and checkpoint signature (schedule_signature). docs/diagnose_and_fix.md lists
every check, its id and severity, and the plain-text log format it accepts besides metrics.jsonl.

--plot draws what the run(s) did on a shared axis of optimizer steps, with every --log finding marked at its
steps by its row id (docs/plots.md): a PNG with matplotlib (optional), ASCII panels on stdout without it or
with `--plot -`. Its code is diagnose_plot.py, a companion file beside this tool, loaded only for --plot.
"""
import argparse
import bisect
import contextlib
import copy
import difflib
import importlib
import importlib.util
import io
import json
import math
import os
import pickle
import re
import sys
import tempfile
import time

import numpy as np
import torch
import yaml

REPO = os.path.dirname(os.path.abspath(__file__))
SEVERITIES = ("critical", "warning", "info")
REMOVE = "<remove>"          # a change that deletes a key from the config
WARMUP_BAND = (0.05, 0.30)   # S3: the sane warmup share of a run
MEMORY_WARN, MEMORY_CRITICAL = 0.75, 0.90  # E6: shares of device memory (the reference run died at 96-98%)
KD_FP16_MAX_TEMPERATURE = 2.0  # G6: the reference case's NaNs came at T = 3 in fp16; its fix was T = 2
LOSS_WEIGHT_RATIO = 10.0     # E2: one configured loss weight this many times another dominates before any data


class UsageError(Exception):
    """The command line itself is unusable: one line, exit code 2 (a bad key of a config is a finding instead)."""


class Refused(Exception):
    """C3: a config file that holds no config, refused with the training script's own line, exit code 2."""


# -----------------------------------------------------------------------------
# Findings: id, severity, evidence line, fix line, and the config changes --fix applies for it.
def finding(rid, severity, evidence, fix, source="config", changes=(), at=()):
    """at: the (first, last) optimizer-step spans a log finding is about ((s, s) for one step); --plot marks
    them there."""
    assert severity in SEVERITIES
    return {"id": rid, "severity": severity, "source": source, "evidence": evidence, "fix": fix,
            "changes": [(key, value) for key, value in changes], "at": [(int(a), int(b)) for a, b in at]}


# -----------------------------------------------------------------------------
# Command line.
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="exit code: 0 no critical finding, "
                                     "1 one or more (their count is in the report), 2 refused input")  # C3
    parser.add_argument("--config", help="YAML config (default: the config.yaml beside --log, or the checkpoint's)")
    parser.add_argument("--set", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys as the training script would: --set a=1 b=2 (repeatable)")
    parser.add_argument("--num_samples", type=int, help="training samples per epoch (after data.limit) when the "
                        "data is not on this machine")
    parser.add_argument("--world_size", type=int, default=None, help="processes the run uses (default: the run's "
                        "checkpoint says, --checkpoint or checkpoints/last.pt beside --log; else 1)")
    parser.add_argument("--device_memory", type=float, help="GiB of memory per device (default: the detected GPU)")
    parser.add_argument("--log", action="append", help="metrics.jsonl of a run, or a plain-text log with "
                        "step=/lr=/loss= fields; repeat it to diagnose (and --plot) several runs")
    parser.add_argument("--checkpoint", help="a checkpoint (.pt) written by the training script")
    parser.add_argument("--fix", action="store_true", help="write a corrected config to --output")
    parser.add_argument("--output", help="where --fix writes (the input is overwritten only when named here)")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON instead of text")
    parser.add_argument("--plot", metavar="OUT", help="draw the --log run(s), findings marked (with diagnose_plot.py "
                        "beside this tool): OUT.png/.svg/.pdf with matplotlib; '-' (or no matplotlib): ASCII panels")

    def one_line_error(message):
        raise UsageError(message)

    parser.error = one_line_error
    args = parser.parse_args(argv)
    args.set = [item for group in args.set for item in group]  # --set a=1 b=2 and --set a=1 --set b=2 alike
    if args.fix and not args.output:
        raise UsageError("--fix needs --output FILE (give the config's own path to overwrite it on purpose)")
    if args.output and not args.fix:
        raise UsageError("--output is only used with --fix")
    folder = os.path.dirname(os.path.abspath(args.output)) if args.output else None
    if args.output and (os.path.isdir(args.output) or not os.path.isdir(folder)):  # C3: not a traceback at the end
        raise UsageError(f"--output {args.output}: name a file in an existing directory")
    if args.num_samples is not None and args.num_samples < 1:
        raise UsageError(f"--num_samples {args.num_samples} must be >= 1")
    if args.world_size is not None and args.world_size < 1:
        raise UsageError(f"--world_size {args.world_size} must be >= 1")
    if args.device_memory is not None and not args.device_memory > 0:
        raise UsageError(f"--device_memory {args.device_memory} must be > 0 (GiB)")
    if not (args.config or args.log or args.checkpoint):
        raise UsageError("give --config, --log or --checkpoint (see --help)")
    what = {"--config": "the config (a run's config.yaml)", "--log": "the run's metrics.jsonl",
            "--checkpoint": "a checkpoint (runs/<run>/checkpoints/last.pt or best.pt)"}
    given = [("--config", args.config), ("--checkpoint", args.checkpoint)] + [("--log", p) for p in args.log or []]
    for flag, path in given:
        if path and not os.path.isfile(path):  # C3: a missing input (or a directory) is bad input: one line, exit 2
            said = "is a directory" if os.path.isdir(path) else "no such file"
            raise UsageError(f"{flag} {path}: {said}; give the path of {what[flag]}")
        if flag == "--log" and path.endswith((".yaml", ".yml")):  # C3: a config given as the log: not 'no records'
            raise UsageError(f"--log {path}: a YAML config, not a log; give it as --config, and --log {what[flag]}")
    if args.log and len(args.log) > 1 and (args.fix or args.checkpoint):
        raise UsageError("--fix and --checkpoint take one run: give a single --log with them")
    if args.plot is not None:
        plotting().check_plot_inputs(args.log, args.plot)
    return args


# -----------------------------------------------------------------------------
# The training script the config's task names: its loader and schedule are the one truth.
def training_script(task):
    """train_<task>.py imported from this directory, or None when there is no such script."""
    if not isinstance(task, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", task):
        return None
    if not os.path.isfile(os.path.join(REPO, f"train_{task}.py")):
        return None
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    return importlib.import_module(f"train_{task}")


def known_tasks():
    return sorted(name[6:-3] for name in os.listdir(REPO) if re.fullmatch(r"train_[a-z][a-z0-9_]*\.py", name))


# -----------------------------------------------------------------------------
# The config as a nested tree: read it, apply --set, edit keys (repairs and --fix work on the tree).
def kit_script():
    """train_probe.py, else train_distill.py: what this tool takes from either one's shared blocks (load_config's
    refusal of a file that holds no config, C3; write_stdout, R8; unflatten); None when copied without them."""
    return training_script("probe") or training_script("distill")


def read_config_tree(path):
    """(tree, findings): the file as the script its task names reads it, a key given twice (C2) or text cut by a
    comment (C1) a critical finding. A file that holds no config (empty, not YAML, not text, not a mapping) is no
    input to judge: Refused with the run's own line (C3), as the run refuses it before it starts."""
    rules, tree = kit_script(), None
    with contextlib.suppress(OSError, ValueError, yaml.YAMLError), open(path) as f:
        tree = yaml.safe_load(f)  # only the task, to pick the script
    if rules is None:  # copied without the scripts: the task's finding names the one to copy
        return tree if isinstance(tree, dict) else {}, []
    try:
        rules.load_config(path, (), rules.CONFIG)
    except rules.ConfigError as err:
        whole = [problem for problem in err.problems if problem[1] in (path, "--config")]
        if whole:
            raise Refused(str(rules.ConfigError(whole))) from None
    script = training_script(config_task(tree))
    if script is not None:  # read again as the script reads it: a key given twice (C2), text kept as written (C1)
        try:
            tree = script.read_yaml(path, script.CONFIG)
        except script.ConfigError as err:
            return None, [finding(rid, "critical", f"{key}: {message}",
                                  "fix the file there; training refuses it at launch")
                          for rid, key, message in err.problems]
    return tree, []


def tree_get(tree, key):
    """(present, value) of a dotted key, nested (optim: {lr: ..}) or written literally ("optim.lr": ..)."""
    if key in tree:
        return True, tree[key]
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def tree_remove(tree, key):
    if key in tree:
        del tree[key]
        return
    parts = key.split(".")
    chain = [tree]
    for part in parts[:-1]:
        node = chain[-1].get(part) if isinstance(chain[-1], dict) else None
        if not isinstance(node, dict):
            return
        chain.append(node)
    chain[-1].pop(parts[-1], None)
    for depth in range(len(parts) - 1, 0, -1):  # drop parents the removal left empty
        if chain[depth] == {}:
            del chain[depth - 1][parts[depth - 1]]


def tree_set(tree, key, value, schema):
    """Known keys are set nested, and so is a key inside a free-form mapping (backbone.kwargs.depth); unknown
    ones literally, so the loader sees exactly the dotted key it would see from --set (and reports it as C2)."""
    inside_mapping = any(schema[k][1] == "dict" and key.startswith(k + ".") for k in schema if schema[k])
    if key not in schema and not inside_mapping:
        tree[key] = value
        return
    if "." in key:
        tree.pop(key, None)  # a literal "section.key" entry would shadow the nested one
    node = tree
    for part in key.split(".")[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[key.split(".")[-1]] = value


def apply_change(tree, key, value, schema):
    """Apply one change; returns the old value (REMOVE when the key was absent)."""
    present, old = tree_get(tree, key)
    if value == REMOVE:
        tree_remove(tree, key)
    else:
        tree_set(tree, key, value, schema)
    return old if present else REMOVE


def apply_overrides(tree, overrides, script, findings):
    """--set key=value, parsed as the training script parses it (a YAML value, the text as typed for a
    string-typed key, later ones win)."""
    schema = script.CONFIG
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            findings.append(finding("C3", "critical", f"--set '{item}' is not key=value",
                                    "write it as --set section.key=value, e.g. --set optim.lr=3.0e-4"))
            continue
        tree_set(tree, key, script.literal_text(text, key in schema and schema[key][1] in ("str", "str?")), schema)


def config_task(tree):
    present, task = tree_get(tree, "task")
    return task if present and task is not None else "probe"


# -----------------------------------------------------------------------------
# Settle: resolve and plan the config exactly as training would. Each problem becomes a finding and a
# repair of the tree, and the loader runs again, so one pass reports every problem (the loader itself
# stops at its first failing stage) and the repaired tree is what --fix writes.
def resolve(script, tree, check_files):
    with tempfile.TemporaryDirectory(prefix="diagnose_") as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(tree, f, sort_keys=False)
        return script.resolve_config(path if tree else None, (), check_files=check_files)  # {}: the defaults (C3)


def is_missing_file(message):
    return "not found" in message and message.startswith("file ")


def repair(script, tree, rid, key, message, attempt):
    """(finding id, evidence, fix line, changes) for one loader problem. changes=[] means not fixable here."""
    schema = script.CONFIG
    present, value = tree_get(tree, key)
    where = f"{key}: {message}"
    if rid == "C2":  # the loader's own suggestion ("did you mean optim.lr?") is the one the user sees at launch
        evidence = f"{key}: {value!r} is not a key of train_{script.TASK}.py's config; training stops at launch"
        close = re.search(r"did you mean (\S+)\?", message)
        if close and not tree_get(tree, close.group(1))[0]:
            return "C2", evidence, f"rename it to {close.group(1)}", [(key, REMOVE), (close.group(1), value)]
        why = f"{close.group(1)} is already set" if close else "no valid key is close; see the config reference"
        return "C2", evidence, f"remove it ({why})", [(key, REMOVE)]
    if rid == "C6":  # windows prepared with other settings: only the user knows which side is right
        return "C6", where, "prepare the data again with this config, or set the key to what the manifest says", []
    if rid == "C10":  # the prepared data's manifest decides: the loader's line ends with its fix, never a default
        return "C10", where, message.rsplit("; ", 1)[-1], []
    if key not in schema:  # a whole-file or --set problem: nothing to edit in the tree
        return rid, where, "see the message", []
    default, kind, _doc = schema[key]
    kind = (True, False) if kind == "bool" else kind  # C1: 'ture' is true mistyped: its fix was the default, false
    if rid == "C1":
        rid = "S6" if key == "schedule.type" else "C1"
        new = default
        if isinstance(kind, tuple):
            text = str(value).lower()
            inside = sorted((c for c in kind if str(c).lower() in text), key=lambda c: -len(str(c)))
            close = [str(inside[0]).lower()] if inside else \
                difflib.get_close_matches(text, [str(c).lower() for c in kind], n=1, cutoff=0.5)
            new = next((c for c in kind if str(c).lower() == close[0]), default) if close else default
        elif kind.rstrip("?") == "int" and isinstance(value, float) and math.isfinite(value) and round(value) >= 1:
            new = int(round(value))
        closest = " (the closest valid choice)" if isinstance(kind, tuple) else ""
        return rid, where, f"set {key} to {new!r}{closest}", [(key, new)]
    if is_missing_file(message):
        return "C3", where, f"fix the path of {key}, or copy the file to this machine", []
    if key == "train.epochs" and "exactly one" in message:
        if present and value is not None:
            return "C3", where, "keep train.epochs and set train.max_steps to null", [("train.max_steps", None)]
        return "C3", where, f"set train.epochs to {default}", [("train.epochs", default)]
    if "are all 0" in message:  # the loader's E2 check: no loss term at all
        return "E2", where, f"set {key} to {default!r} (labels back in the loss)", [(key, default)]
    if key == "train.device":
        return "C3", where, "set train.device to auto", [(key, "auto")]
    if key == "schedule.warmup":
        return "S3", where, "set schedule.warmup to 0.1 (10% of the optimizer steps)", [(key, 0.1)]
    if kind in ("str", "str?") or key.endswith(("vocab_size", "pad_token")):  # paths, names, tokenizer facts
        return rid, where, f"set {key} by hand: only you know the right path or value", []
    if attempt == 0 and isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        return rid, where, f"set {key} to {-value!r} (the sign looks like a slip)", [(key, -value)]
    if present and value != default:
        return rid, where, f"set {key} to its default {default!r}", [(key, default)]
    return rid, where, "set it by hand", []


def plan_repair(cfg, rid, message):
    """Changes for a plan_schedule problem (S2 explicit total, S3 warmup vs run length, which `message` gives)."""
    if rid == "S2":
        return "set schedule.total_steps to null: it is derived from the data", [("schedule.total_steps", None)]
    found = re.search(r"run has (?:only )?(\d+) optimizer step", message)
    total = int(found.group(1)) if found else None
    if rid == "S3" and total:
        if cfg["schedule.type"] == "onecycle" and round(0.1 * total) < 2:
            if total > 2:
                return "set schedule.warmup to 2 optimizer steps (onecycle's minimum)", [("schedule.warmup", 2)]
            return "the run is too short for onecycle; lengthen it", []
        return "set schedule.warmup to 0.1 (10% of the optimizer steps)", [("schedule.warmup", 0.1)]
    return "lengthen the run (train.epochs / train.max_steps)", []


def settle(script, tree, opts, findings):
    """Resolve, size and plan the config, repairing `tree` as problems appear. Returns (cfg, plan)."""
    check_files, attempts, reported = True, {}, {}

    def report(rid, severity, key, evidence, fix, changes):
        slot = (rid, key)
        attempts[slot] = attempts.get(slot, 0) + 1
        if slot in reported:  # the same problem again after a repair: keep one finding, show the last state
            reported[slot].update(evidence=evidence, fix=fix)
            reported[slot]["changes"] += changes
        else:
            reported[slot] = finding(rid, severity, evidence, fix, changes=changes)
            findings.append(reported[slot])
        for k, v in changes:
            apply_change(tree, k, v, script.CONFIG)
        return bool(changes)

    for _ in range(30):
        try:
            cfg, notes = resolve(script, tree, check_files)
        except script.ConfigError as err:
            progress = False
            missing = [(key, message[5:].split(" not found")[0])
                       for _, key, message in err.problems if is_missing_file(message)]
            if missing and check_files:  # one finding for all of them; without a size the run cannot be judged
                made = next((m.split("; ", 1)[1].removesuffix(", or fix the path") + "; or " for _, _, m in
                             err.problems if is_missing_file(m) and "make the data first" in m), "")
                findings.append(missing_files_finding(missing, opts, made))
                check_files, progress = False, True
            for rid, key, message in err.problems:
                if is_missing_file(message):
                    continue
                attempt = attempts.get((rid, key), 0)
                rid2, evidence, fix, changes = repair(script, tree, rid, key, message, attempt)
                if attempt >= 3:
                    changes = []
                progress |= report(rid2, "critical", key, evidence, fix, changes)
            if not progress:
                return None, None
            continue
        for rid, key, message in notes:
            if (rid, key) in reported:
                continue
            if rid == "C1":  # a string the loader cast to a number: legal, but say so
                report(rid, "warning", key, f"{key}: {message} (YAML 1.1 needs a dot: 3e-4 is a string, 3.0e-4 a "
                       "number)", f"write {key}: {cfg[key]!r} as a number", [(key, cfg[key])])
            else:  # the loader's other notes, e.g. a key that this configuration ignores
                report(rid, "info", key, f"{key}: {message}", "nothing to fix if that is intended", [])
        num_samples = opts["num_samples"] or (None if check_files or not opts.get("log") else opts.get("run_samples"))
        if num_samples is None:
            try:
                num_samples = script.train_set_size(cfg)
            except Exception as err:  # a missing or corrupt data file the script cannot size
                if not check_files:
                    findings.append(finding("S2", "info", "the training data is not on this machine, so the run's "
                                            "length is unknown; the schedule checks were skipped",
                                            "pass --num_samples N (training samples per epoch) to check the schedule"))
                else:  # C3: a data file the script refuses (a directory, no .npy) is the run's own line
                    findings += check_run_inputs(script, cfg, opts) or [finding(
                        "C3", "critical", f"cannot size the training set: {type(err).__name__}: {err}",
                        "check the data files the config names")]
                return cfg, None
        try:
            return cfg, script.plan_schedule(cfg, num_samples, opts["world_size"])
        except script.ConfigError as err:
            progress = False
            for rid, key, message in err.problems:
                fix, changes = plan_repair(cfg, rid, message)
                if attempts.get((rid, key), 0) >= 3:
                    changes = []
                progress |= report(rid, "critical", key, f"{key} {message}", fix, changes)
            if not progress:
                return cfg, None
    return None, None


def missing_files_finding(missing, opts, made=""):
    """C3: one finding for the files [(key, path)] not on this machine: info when the run can still be judged (by
    --num_samples, or a log sized by its checkpoint), else critical; made: the run's words naming the tool to run."""
    listing = ", ".join(f"{key} ({path})" for key, path in missing)
    if not all(os.path.isabs(path) for _, path in missing):  # where relative paths are read, said once
        listing += f" (relative to the current directory, {os.getcwd()})"
    if opts["num_samples"]:
        return finding("C3", "info", f"not on this machine: {listing}; the run is sized with "
                       f"--num_samples {opts['num_samples']}", "make sure the files exist where the run starts")
    if opts.get("log"):  # C8: a run directory copied elsewhere; judging its log needs no data
        sized = (f"; the run is sized as its checkpoint records ({opts['run_samples']} training samples "
                 "per epoch)" if opts.get("run_samples") else "")
        return finding("C3", "info", f"not on this machine: {listing}; the log diagnosis does "
                       f"not need them{sized}", "nothing to fix to read the log; the files must "
                       "exist where the run starts again")
    return finding("C3", "critical", f"not found: {listing}",
                   f"{made}fix the paths, copy the files here, or pass --num_samples N to judge "
                   "the config without its data")


# -----------------------------------------------------------------------------
# Config checks on the settled config and its plan (catalogue rows with C in the diagnose column).
def check_plan(script, cfg, plan):
    """S2: the derivation of the run's length, printed so the user can check it against their own numbers."""
    n, b, w, a = plan["num_samples"], plan["batch_size"], plan["world_size"], plan["grad_accum"]
    per_epoch, total = plan["steps_per_epoch"], plan["total_steps"]
    length = f"x {plan['epochs']} epochs = {total} optimizer steps" if cfg["train.max_steps"] is None else \
        f"per epoch; train.max_steps = {total} optimizer steps ({total / per_epoch:.3g} epochs)"
    return [finding("S2", "info",
                    f"ceil({n} samples / ({b} x {w} processes)) = {plan['micro_batches_per_epoch']} micro-batches per "
                    f"epoch; ceil({plan['micro_batches_per_epoch']} / grad_accum {a}) = {per_epoch} optimizer steps "
                    f"{length}; warmup {plan['warmup_steps']} optimizer steps",
                    "nothing to fix; every count the schedule uses is this one")]


def check_warmup(cfg, plan):
    """S3: warmup counted in optimizer steps, inside the sane 5-30% band."""
    warm, total, accum = plan["warmup_steps"], plan["total_steps"], plan["grad_accum"]
    share = warm / total
    low, high = WARMUP_BAND
    if low <= share <= high:
        return []
    if warm == 0 and cfg["schedule.type"] == "constant":
        return [finding("S3", "info", "constant schedule without warmup: the first step already uses the full LR",
                        "add schedule.warmup: 0.05 if early steps are unstable")]
    hint = ""
    if cfg["schedule.warmup"] >= 1 and accum > 1 and low <= warm / accum / total <= high:
        hint = f"; if {warm} counts micro-batches, that is {warm // accum} optimizer steps ({warm / accum / total:.0%})"
    return [finding("S3", "warning", f"warmup is {warm} of {total} optimizer steps ({share:.1%}), outside the "
                    f"{low:.0%}-{high:.0%} band{hint}", "set schedule.warmup to 0.1 (a fraction of the run)",
                    changes=[("schedule.warmup", 0.1)])]


def check_momentum_cycling(cfg):
    """S4: OneCycleLR cycle_momentum with Adam-family optimizers rewrites beta1."""
    if cfg["schedule.type"] != "onecycle" or not cfg["schedule.cycle_momentum"] or cfg["optim.name"] == "sgd":
        return []
    beta1 = cfg["optim.betas"][0] if "optim.betas" in cfg else 0.9
    return [finding("S4", "warning", f"onecycle with cycle_momentum true and {cfg['optim.name']}: torch replaces "
                    f"beta1 {beta1:g} with 0.95 at step 1 and cycles it 0.95 -> 0.85, ignoring optim.betas",
                    "set schedule.cycle_momentum: false (keep the betas you configured)",
                    changes=[("schedule.cycle_momentum", False)])]


def check_curve(script, cfg, plan, curve, findings=()):
    """S5/S10: the real torch curve against the config's expectations and the sanity checks."""
    guessed = any(f["id"] in ("C1", "S6") and f["severity"] == "critical" and f["changes"] for f in findings)
    peak_step = int(np.argmax(curve)) + 1
    found = [finding("S5", "info", f"torch's {cfg['schedule.type']} schedule: step 1 LR {curve[0]:.4g}, peak "
                     f"{curve.max():.4g} at step {peak_step}, last step ({len(curve)}) {curve[-1]:.4g}",
                     "nothing to fix; state these in the expect: block to have every dry run check them")]
    actual = {"initial": float(curve[0]), "peak": float(curve.max()), "final": float(curve[-1])}
    for rid, message in script.check_lr_curve(curve, cfg, plan):
        named = re.match(r"expect\.(initial|peak|final)_lr", message)
        if rid == "S5" and named and guessed:  # S5: the expect: block says what the user meant; a curve drawn with a
            continue  # guessed value (C1 above) is no reason to report it, nor for --fix to rewrite it
        if rid == "S5" and named:
            key, value = f"expect.{named.group(1)}_lr", float(f"{actual[named.group(1)]:.6g}")
            onecycle_floor = cfg["schedule.type"] == "onecycle" and named.group(1) == "final"
            hint = " (OneCycleLR's floor is lr / (div_factor * final_div_factor))" if onecycle_floor else ""
            found.append(finding("S5", "critical", message + hint,
                                 f"set {key} to {value!r}, or change the schedule if you wanted the stated value",
                                 changes=[(key, value)]))
            continue
        changes, fix = [], "the configured schedule cannot work as written; fix the schedule keys"
        if "stays at" in message and cfg["schedule.type"] in ("cosine", "linear", "wsd") \
                and cfg["schedule.final_lr_ratio"] == 1:
            fix, changes = "final_lr_ratio 1 keeps the LR at its peak: say so with schedule.type: constant", \
                [("schedule.type", "constant")]
        elif "does not rise" in message and cfg["schedule.div_factor"] == 1:
            fix, changes = "div_factor 1 means no warmup ramp: set schedule.div_factor to 25", \
                [("schedule.div_factor", 25.0)]
        found.append(finding(rid, "critical", message, fix, changes=changes))
    return found


def check_intervals(cfg, plan):
    """E4: eval/save/log intervals against the derived run length; early stopping against warmup."""
    total, per_epoch, warm = plan["total_steps"], plan["steps_per_epoch"], plan["warmup_steps"]
    found = []
    interval = cfg["train.eval_every"] or per_epoch
    if interval > total:
        source = f"train.eval_every {cfg['train.eval_every']}" if cfg["train.eval_every"] else \
            f"once per epoch = {per_epoch} steps"
        new = max(1, total // 10)
        found.append(finding("E4", "warning", f"eval interval {interval} optimizer steps ({source}) is longer than "
                             f"the {total}-step run: only the final eval happens, so best.pt and early stopping see "
                             "one point", f"set train.eval_every to {new}", changes=[("train.eval_every", new)]))
    save_steps = cfg["train.save_every_steps"]
    if cfg["train.save_every_minutes"] is None and (save_steps is None or save_steps > total):
        source = f"train.save_every_steps {save_steps} is longer than the {total}-step run" if save_steps else \
            "train.save_every_steps is null"
        found.append(finding("E4", "info", f"no periodic checkpoint before the end: train.save_every_minutes is null "
                             f"and {source}; SIGTERM still saves (R8), a SIGKILL or crash loses the run",
                             "set train.save_every_minutes (default 5) or a train.save_every_steps below the run "
                             "length"))
    if cfg["train.log_every"] > total:
        new = max(1, total // 20)
        found.append(finding("E4", "warning", f"train.log_every {cfg['train.log_every']} is longer than the "
                             f"{total}-step run: the log holds only the first and last step",
                             f"set train.log_every to {new}", changes=[("train.log_every", new)]))
    patience, interval = cfg["train.patience"], min(cfg["train.eval_every"] or per_epoch, total)
    if patience is not None and patience * interval < warm:
        new = math.ceil(warm / interval)
        found.append(finding("E4", "warning", f"early stopping after {patience} evals x {interval} steps = "
                             f"{patience * interval} steps without improvement, shorter than the {warm}-step warmup: "
                             "the run can stop before the LR reaches its peak",
                             f"set train.patience to {new} (covers the warmup)", changes=[("train.patience", new)]))
    return found


def check_precision(cfg):
    """G5: fp16 where the hardware has bf16 (bf16 needs no GradScaler and does not overflow)."""
    if cfg["train.precision"] != "fp16":
        return []
    on_gpu = cfg["train.device"] != "cpu" and torch.cuda.is_available()
    if on_gpu and torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(0)
        return [finding("G5", "warning", f"train.precision fp16 on {name}, which has bf16: fp16 needs a GradScaler "
                        "and skips steps on overflow", "set train.precision to bf16",
                        changes=[("train.precision", "bf16")])]
    where = "a GPU without bf16" if on_gpu else "a machine without a GPU (nothing to compare)"
    return [finding("G5", "info", f"train.precision fp16 judged on {where}",
                    "on a GPU with bf16 (A100, H100, RTX 30xx and newer) prefer bf16: same speed, no overflow skips")]


def distill_keys(cfg):
    """The distillation keys these checks read, when the config has them (train_distill.py's CONFIG)."""
    return {k: cfg[k] for k in ("kd.enabled", "kd.temperature", "kd.alpha", "kd.beta", "kd.gamma", "kd.divergence",
                                "kd.jsd_beta", "kd.on_policy_fraction", "kd.seq_kd", "kd.hidden_layers") if k in cfg}


def check_kd_temperature(cfg):
    """G6: a high KD temperature in fp16."""
    kd = distill_keys(cfg)
    if "kd.temperature" not in kd or not kd.get("kd.enabled", True) or cfg["train.precision"] != "fp16":
        return []
    t = kd["kd.temperature"]
    if t <= KD_FP16_MAX_TEMPERATURE:
        return []
    return [finding("G6", "warning", f"kd.temperature {t:g} with fp16: the KD term is scaled by T^2 = {t * t:g} and "
                    "fp16 gradients overflow sooner (the reference run's NaN KD losses came at T = 3 in fp16)",
                    f"set kd.temperature to {KD_FP16_MAX_TEMPERATURE:g}, or train in bf16",
                    changes=[("kd.temperature", KD_FP16_MAX_TEMPERATURE)])]


def check_loss_weights(cfg):
    """E2: the configured loss weights, before any data (the log check sees the real component shares)."""
    kd = distill_keys(cfg)
    weights = {k: kd[k] for k in ("kd.alpha", "kd.beta", "kd.gamma") if k in kd}
    if not weights or not kd.get("kd.enabled", True):
        return []
    listing = ", ".join(f"{k}={v:g}" for k, v in weights.items())
    on = {k: v for k, v in weights.items() if v > 0}
    if len(on) > 1:
        big, small = max(on, key=on.get), min(on, key=on.get)
        if on[big] >= LOSS_WEIGHT_RATIO * on[small]:
            new = float(f"{LOSS_WEIGHT_RATIO / 2 * on[small]:.4g}")
            return [finding("E2", "warning", f"{big} is {on[big] / on[small]:.0f}x {small} ({listing}): one term will "
                            "dominate the gradient before the losses' own scales are even counted",
                            f"lower {big} to {new:g} ({LOSS_WEIGHT_RATIO / 2:g}x {small}), then read the real "
                            "loss/<name> shares in metrics.jsonl (--log) and rebalance", changes=[(big, new)])]
    if kd.get("kd.enabled", True) and weights.get("kd.beta", 1) <= 0 and not kd.get("kd.seq_kd"):  # seq_kd: Kim & Rush
        # a labels-only baseline beside a KD run (docs/train_distill.md): the teacher only reports val/agreement
        # and runs no forward in the steps, so this is a deliberate run, not a loud finding
        return [finding("E2", "info", f"kd.beta is 0 ({listing}): no KD term, a baseline without distillation; the "
                        "teacher is run only at evals, for val/agreement",
                        "set kd.beta > 0 to distil, or kd.enabled: false to train without a teacher")]
    return check_objective_shares(kd)


def check_objective_shares(kd):
    """E2 per term with the objective keys: on-policy micro-batches train the divergence only, so CE and the
    hidden-state term weigh on the other (1 - kd.on_policy_fraction) of them; at 1 their weights do nothing."""
    fraction = kd.get("kd.on_policy_fraction", 0)
    if not kd.get("kd.enabled", True) or not fraction:
        return []
    data_terms = [k for k in ("kd.alpha", "kd.gamma") if kd.get(k, 0) > 0]
    divergence = kd.get("kd.divergence", "forward_kl")
    if divergence == "jsd":
        divergence += f" (beta {kd.get('kd.jsd_beta', 0.5):g})"
    if fraction >= 1 and data_terms:
        idle = " and ".join(data_terms) + (" weigh" if data_terms[1:] else " weighs")
        return [finding("E2", "warning", f"kd.on_policy_fraction is 1: every micro-batch is the student's own text, "
                        f"trained on the {divergence} term only, so {idle} nothing",
                        # the change that holds for any data: prompt-only rows need kd.on_policy_fraction 1 (C10)
                        "set " + " and ".join(f"{k}: 0" for k in data_terms) + " (GKD's loss at lmbda 1), or, on data "
                        "with completions, lower kd.on_policy_fraction (GKD uses 0.5)",
                        changes=[(k, 0.0) for k in data_terms])]
    layers = kd.get("kd.hidden_layers")
    shares = [f"{divergence} x kd.beta {kd.get('kd.beta', 0):g} on every micro-batch",
              f"CE x kd.alpha {kd.get('kd.alpha', 0):g} and the hidden-state term x kd.gamma {kd.get('kd.gamma', 0):g}"
              + (f" ({len(layers)} layer pairs)" if layers else "")
              + f" on the {'teacher-written (kd.seq_kd)' if kd.get('kd.seq_kd') else 'data'} micro-batches "
              f"({1 - fraction:.0%})"]
    return [finding("E2", "info", "terms per micro-batch: " + "; ".join(shares),
                    "read the real loss/<name> shares in metrics.jsonl (--log) once the run has started")]


# -----------------------------------------------------------------------------
# E6: memory estimate (weights, gradients, optimizer state, activations/logits) against device memory.
def leaf_outputs(module, run):
    """Sizes (elements) of every leaf module's output during run(): activations to an order of magnitude."""
    sizes = []

    def hook(_m, _i, out):
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if torch.is_tensor(t):
                sizes.append(t.numel())
    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    return sizes, result


def probe_memory(script, cfg, plan, device="meta"):
    """Probe: frozen backbone weights + trained head (weights, grads, AdamW state) + the larger of feature
    extraction (no grad: input + the two largest activations) and a head micro-batch. Built on the meta
    device: no memory is allocated, no data read; device "cpu" (a backbone whose __init__ reads a tensor's
    value, which meta tensors do not have): built for real and run on one sample, sizes scaled to the batch."""
    if cfg["data.train_x"] and os.path.exists(cfg["data.train_x"]):
        channels, length = np.load(cfg["data.train_x"], mmap_mode="r").shape[1:3]
    else:
        channels, length = cfg["data.synthetic.channels"], cfg["data.synthetic.length"]
    where = torch.device(device)
    with where:
        backbone = script.build_backbone(dict(cfg, **{"backbone.checkpoint": None}), channels)

    def extraction(batch):
        run = batch if device == "meta" else 1  # a real forward on one sample; activations grow with the batch
        x = torch.zeros(run, channels, length, device=where)
        with torch.no_grad():
            fp32 = dict(cfg, **{"train.precision": "fp32"})
            sizes, feats = leaf_outputs(backbone, lambda: script.extract_features(backbone, x, where, fp32))
        top = sorted(sizes)[-2:] or [0]
        return 4 * (x.numel() + sum(top)) * (batch // run), feats.shape[1]

    eval_act, dim = extraction(cfg["train.eval_batch_size"])
    train_act = extraction(plan["batch_size"])[0]
    head_params = dim * cfg["head.num_classes"] + cfg["head.num_classes"]
    state = 2 if cfg["optim.name"] == "adamw" else 1
    return {"weights (frozen backbone)": 4 * sum(p.numel() for p in backbone.parameters()),
            "trained head: weights, gradients, optimizer state": 4 * head_params * (2 + state),
            f"activations: largest of eval batch {cfg['train.eval_batch_size']} / micro-batch {plan['batch_size']}":
                max(eval_act, train_act + 4 * plan["batch_size"] * (dim + cfg["head.num_classes"]))}


def hf_teacher_on_meta(script, path, hidden):
    """E6: a Hugging Face teacher built from its config.json alone on the meta device (no weights read, no
    download); train_distill.py loads it in fp32, so its weights count 4 bytes per parameter."""
    auto = script.transformers_module()
    model = auto.AutoModelForCausalLM.from_config(auto.AutoConfig.from_pretrained(path, local_files_only=True))
    return script.hf_models("kd.hf_teacher_dir").HFCausalLM(model, hidden)


def generation_lengths(script, cfg):
    """E6: (longest prompt, new tokens after it) of a generated micro-batch: kd.prompt_tokens and kd.max_new_tokens
    of windows; on prepared examples (C10) the data's own prompts, each example's as the run takes it
    (example_prompts over every train example), and the longest sequence they make."""
    prompt, new = script.generating(cfg).on_policy_lengths(cfg)  # on_policy.py's
    if not cfg["data.train_bin"] or script.example_bounds(cfg, "train") is None:
        return prompt, new
    train, prompt, total = script.TokenWindows(cfg, "train"), 0, 0
    for rows in np.array_split(np.arange(len(train)), max(1, len(train) // 1024)):
        prompts, news, live = script.generating(cfg).example_prompts(train[rows][1], cfg)
        if live.any():
            prompt, total = max(prompt, int(prompts[live].max())), max(total, int((prompts + news)[live].max()))
    return prompt, total - prompt


def generation_bytes(script, module, batch, prompt, new, vocab, act_bytes):
    """E6: one generation's peak for `module` (a Trainable: the student, or the teacher writing for kd.seq_kd).
    With a KV cache (the built-in GPT, Hugging Face models): the prompt's forward, the keys and values of every
    block for the whole sequence (prompt + new - 1 tokens), one position's logits with their fp32 softmax and
    fp64 sums; a user's module reruns the longest prefix instead."""
    length, cached = prompt + new - 1, getattr(module.lm, "kv_cache", False)
    idx = torch.zeros(batch, prompt if cached else length, dtype=torch.long, device="meta")
    sizes, _ = leaf_outputs(module, lambda: module(idx))
    blocks = len(script.model_blocks(module.lm))
    cache = 2 * blocks * batch * length * (module.lm.width or 0) * act_bytes if cached else 0
    return act_bytes * sum(sorted(sizes)[-2:]) + cache + batch * (1 if cached else length) * vocab * (act_bytes + 4 + 8)


def distill_memory(script, cfg, plan, device="meta"):
    """Distill: the frozen teacher's weights (fp32, a Hugging Face teacher too), the trained network's weights,
    gradients and optimizer state, its activations for one micro-batch (leaf-module outputs of a meta-device
    forward), and the logits: student and teacher [batch, seq, vocab] in the autocast dtype plus the fp32
    copies the KD and CE losses make (G6) and the logits' gradient. The larger of a training micro-batch and an
    eval batch.
    device "cpu" (a model whose __init__ reads a tensor's value, as Hugging Face Llama/GPT-2 do, fails on the
    meta device): built for real, its forward run on one window, activation sizes scaled to the batch."""
    vocab, seq = script.vocab_size(cfg), cfg["data.seq_len"]
    arch = ("n_layer", "n_head", "n_embd")
    offline = cfg["kd.enabled"] and cfg.get("kd.teacher_cache") is not None  # no teacher in memory: its top-k is read
    with torch.device(device):
        teacher = None
        if not cfg["kd.enabled"] or offline:
            pass
        elif cfg["kd.hf_teacher_dir"] is not None:
            teacher = hf_teacher_on_meta(script, cfg["kd.hf_teacher_dir"], cfg["kd.gamma"] > 0)  # or the CPU
        elif cfg.get("teacher.target") is not None:  # the user's callable, built on the meta device
            factory = script.import_target(cfg["teacher.target"], "teacher.target", cfg.get("launch_dir"))
            teacher = script.user_models("teacher.target").TargetLM(factory(**cfg["teacher.kwargs"]), cfg["kd.gamma"])
        else:
            teacher = script.GPT(vocab, seq, **{d: cfg[f"teacher.{d}"] for d in arch})
        trainable = script.build_trainable(cfg, teacher)
    # kd.hidden_layers: one projection per layer pair, trained like the network (counted on their own line)
    projections = sum(p.numel() for p in trainable.proj.parameters()) \
        if isinstance(trainable.proj, torch.nn.ModuleList) else 0
    trained = sum(p.numel() for p in trainable.parameters()) - projections
    frozen = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    act_bytes = 2 if cfg["train.precision"] in ("bf16", "fp16") else 4
    models = 2 if cfg["kd.enabled"] and not offline else 1  # offline: the cached top-k, no teacher logits

    blocks = script.model_blocks(trainable.lm)
    checkpointed = cfg.get("train.activation_checkpointing") and len(blocks)

    def batch_bytes(batch, grad, length=seq):
        run = batch if device == "meta" else 1  # a real forward on one window; activations grow with the batch
        idx = torch.zeros(run, length, dtype=torch.long, device=device)
        with torch.no_grad() if device != "meta" else contextlib.nullcontext():
            sizes, _ = leaf_outputs(trainable, lambda: trainable(idx, project=trainable.proj is not None))
        sizes = [size * (batch // run) for size in sizes]
        activations = act_bytes * (sum(sizes) if grad else sum(sorted(sizes)[-2:]))
        if grad and checkpointed:  # each block keeps its input; one block's inside is rebuilt at a time
            activations = act_bytes * (sum(sizes) // len(blocks)
                                       + len(blocks) * batch * length * (trainable.lm.width or 0))
        # D6: one chunk's logits at a time
        positions = min(batch * length, cfg.get("kd.chunk_tokens") or batch * length)
        logits = positions * vocab * (models * act_bytes + (2 * models + int(grad)) * 4)
        return activations + logits

    state = 2 if cfg["optim.name"] == "adamw" else 1
    world = plan["world_size"] if cfg.get("train.strategy") == "fsdp" else 1
    sharded = f", sharded over {world} processes + one block gathered (D1)" if world > 1 else ""
    gathered = 4 * max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0) if world > 1 else 0
    candidates = {f"micro-batch {plan['batch_size']}": batch_bytes(plan["batch_size"], True),
                  f"eval batch {cfg['train.eval_batch_size']}": batch_bytes(cfg["train.eval_batch_size"], False)}
    if script.on_policy_used(cfg) and not offline:
        # on-policy (and kd.seq_kd: the teacher writes): generation, no gradient, a peak of its own before the
        # micro-batch's forward (it competes with the others rather than adding to them); under FSDP the whole
        # student is gathered for it (D1), the teacher is never sharded
        prompt, new = generation_lengths(script, cfg)
        whole = act_bytes * trained if world > 1 else 0
        writers = [("on-policy", trainable, whole)] * (cfg["kd.on_policy_fraction"] > 0)
        if cfg.get("kd.seq_kd") and cfg["kd.on_policy_fraction"] < 1:
            writers.append(("seq_kd teacher", script.Trainable(teacher), 0))
        for name, module, gathered in writers:
            what = ", KV cache" * bool(getattr(module.lm, "kv_cache", False)) + \
                ", the whole student gathered (D1)" * bool(gathered)
            candidates[f"{name} generation ({prompt} + {new} tokens{what})"] = \
                generation_bytes(script, module, plan["batch_size"], prompt, new, vocab, act_bytes) + gathered
    parts = {"weights (frozen teacher)": 4 * frozen,
             f"trained weights, gradients, optimizer state{sharded}": 4 * trained * (2 + state) / world + gathered}
    if projections:
        parts[f"kd.hidden_layers' {len(trainable.proj)} projections, gradients, optimizer state"] = \
            4 * projections * (2 + state)
    parts[f"activations + logits: largest of {' / '.join(candidates)} x {seq} tokens x vocab {vocab}"] = \
        max(candidates.values())
    return parts


def device_memory_bytes(cfg, opts):
    """(bytes, description) of one device: --device_memory, or the visible GPU; (None, why) otherwise."""
    if opts["device_memory"]:
        return opts["device_memory"] * 2**30, f"--device_memory {opts['device_memory']:g} GiB"
    if cfg["train.device"] != "cpu" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"{props.name} ({props.total_memory / 2**30:.1f} GiB)"
    return None, "no GPU here and no --device_memory"


META_VALUE_READS = ("cannot be called on meta tensors", "Cannot copy out of meta tensor")  # .item(), .tolist() on meta


def check_memory(script, cfg, plan, opts):
    estimator = probe_memory if script.TASK == "probe" else distill_memory
    built = "the models built on the meta device (no memory used)"
    try:
        parts = estimator(script, cfg, plan)
    except Exception as meta_err:  # a model whose __init__ calls .item() (HF Llama/GPT-2, some braindecode nets)
        why = f"{type(meta_err).__name__}: {(str(meta_err).splitlines() or [''])[0][:120]}"
        reads = any(text in str(meta_err) for text in META_VALUE_READS)  # E6: expected, said plainly; others as is
        try:  # E6: then for real on the CPU, one sample through the forward
            parts = estimator(script, cfg, plan, device="cpu")
            built = "the models built on the CPU: " + ("they read a tensor's value, which the meta device does not hold"
                                                       if reads else f"the meta-device build failed ({why})")
        except Exception as err:
            return [finding("E6", "info", f"no memory estimate: building the model failed on the meta device ({why}) "
                            f"and on the CPU ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]})",
                            "fix the model's config first (the run would fail the same way); then watch the first "
                            "steps' memory")]
    if parts is None:
        return [finding("E6", "info", f"no memory estimate for task {script.TASK}", "watch the first steps' memory")]
    total = sum(parts.values())
    listing = " + ".join(f"{name} {size / 2**30:.3g}" for name, size in parts.items() if size)
    capacity, where = device_memory_bytes(cfg, opts)
    evidence = f"estimated {total / 2**30:.3g} GiB per process ({listing} GiB; {built})"
    if capacity is None:
        return [finding("E6", "info", f"{evidence}; {where} to compare with",
                        "pass --device_memory GIB to check it against the target GPU")]
    share = total / capacity
    evidence += f" = {share:.0%} of {where}"
    if share <= MEMORY_WARN:
        return [finding("E6", "info", evidence, "nothing to fix")]
    severity = "critical" if share > MEMORY_CRITICAL else "warning"
    changes = shrink_batches(script, cfg, plan, capacity)
    fix = "; ".join(f"set {k} to {v}" for k, v in changes) or "use a smaller model or a larger device"
    if any(k == "train.grad_accum" for k, _ in changes):
        fix += " (the same samples per optimizer step)"
    return [finding("E6", severity, evidence + " (one spike from OOM above ~90%)", fix, changes=changes)]


def check_run_inputs(script, cfg, opts):
    """R10: what the training run refuses before its first step, found by the script's own checks (distill's run_inputs:
    its token files, teacher or teacher cache, network; the probe's data_sets, check_backbone), with the run's line."""
    files = ("data.train_bin", "data.val_bin", "kd.teacher_checkpoint", "kd.hf_teacher_dir", "student.hf_dir",
             *(f"data.{split}_{part}" for split in ("train", "val", "test") for part in "xy"))
    if any(cfg.get(k) and not os.path.exists(cfg[k]) for k in files):
        return []  # files not on this machine: settle() said so
    d = {"rank": 0, "world": opts["world_size"], "device": torch.device("cpu"), "main": True}
    try:
        if hasattr(script, "run_inputs"):
            script.run_inputs(cfg, d, lambda line: None, build_cache=False)
        else:  # the probe: its data (shapes, labels, C9's NaN/inf), then a batch of each split through its backbone
            sets = script.data_sets(cfg)
            script.check_backbone(script.build_backbone(cfg, sets["train"].shape[1]), cfg, d["device"], sets.values())
    except script.ConfigError as err:
        return [finding(rid, "critical", f"{key}: {msg}", "the run stops with this line (config error, exit 2) "
                        "before its first step; fix what it names") for rid, key, msg in err.problems]
    return []


def check_teacher_cache(script, cfg, usable=True):
    """E6 for the disk: kd.teacher_cache's size (positions x k x bytes, plus ids and the rest bucket) before it is
    built, from the training script's own teacher_cache_size (teacher_cache.py); a warning when it exceeds the free
    disk space.
    usable: check_run_inputs found nothing against it (a complete cache built for another run is not "built")."""
    if not (cfg.get("kd.enabled") and cfg.get("kd.teacher_cache")
            and (cfg.get("kd.top_k") or cfg.get("kd.teacher_cache_mode") == "sampled")):
        return []
    path, code = cfg["kd.teacher_cache"], script.caching(cfg)
    try:
        size, how = code.teacher_cache_size(cfg)
    except Exception as err:  # data files this machine lacks: C3 already says so
        return [finding("E6", "info", f"no teacher-cache size: {type(err).__name__}: {err}",
                        "fix the data paths first")]
    try:
        complete = usable and bool((code.read_manifest(path) or {}).get("complete"))  # the run's own reader
    except script.ConfigError:  # no cache's manifest: check_run_inputs says the run's line
        complete = False
    free = code.free_disk_bytes(path)
    evidence = (f"kd.teacher_cache {path}: {how}; {free / 2**30:,.1f} GiB free there"
                + ("; already built" if complete else ""))
    if size > free and not complete:
        return [finding("E6", "warning", evidence + f": the cache needs {size / 2**30:,.2f} GiB, more than is free",
                        "free disk space, put kd.teacher_cache on a larger disk, or halve it with "
                        "kd.teacher_cache_dtype: fp16 or a smaller kd.top_k")]
    return [finding("E6", "info", evidence, "nothing to fix")]


def shrink_batches(script, cfg, plan, capacity):
    """Halve the micro-batch (and double grad_accum, keeping the optimizer batch) and the eval batch until
    the estimate is under MEMORY_WARN of the device."""
    estimator = probe_memory if script.TASK == "probe" else distill_memory
    trial, trial_plan = dict(cfg), dict(plan)
    for _ in range(16):
        if sum(estimator(script, trial, trial_plan).values()) <= MEMORY_WARN * capacity:
            break
        shrunk = False
        if trial["train.eval_batch_size"] > 1 and trial["train.eval_batch_size"] >= trial_plan["batch_size"]:
            trial["train.eval_batch_size"] //= 2
            shrunk = True
        if trial_plan["batch_size"] > 1 and not shrunk:
            trial["train.batch_size"] = trial_plan["batch_size"] = trial_plan["batch_size"] // 2
            trial["train.grad_accum"] *= 2
            shrunk = True
        if not shrunk:
            return []
    else:
        return []
    keys = ("train.batch_size", "train.grad_accum", "train.eval_batch_size")
    return [(k, trial[k]) for k in keys if trial[k] != cfg[k]]


# -----------------------------------------------------------------------------
# Log checks: metrics.jsonl (or the plain-text fallback), the last record per step, against lr_curve().
TEXT_FIELD = re.compile(r"""(?<![\w/.-])["']?([A-Za-z_][\w/.-]*)["']?\s*[=:]\s*"""
                        r"""([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf(?:inity)?)|null|None)"""
                        r"""(?![\w.])""",
                        re.IGNORECASE)
TEXT_ALIASES = {"learning_rate": "lr", "train_loss": "loss", "gnorm": "grad_norm", "global_step": "step"}


def text_record(line):
    """One plain-text log line -> a record of its name=value fields (docs/diagnose_and_fix.md gives the format)."""
    record = {}
    for name, text in TEXT_FIELD.findall(line):
        name = TEXT_ALIASES.get(name, name)
        if name.startswith("eval_") or name.startswith("eval/"):
            name = "val/" + name[5:]
        low = text.lower()
        record[name] = None if low in ("null", "none") else float(low.replace("infinity", "inf"))
    return record


def read_log(path):
    """(train {step: record}, evals {step: record}, info) keeping the LAST record of each step (a resumed
    run logs the steps after its checkpoint again). Non-finite values become nan."""
    with open(path, errors="replace") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    jsonl = bool(lines) and lines[0].lstrip().startswith("{")
    train, evals, info = {}, {}, {"format": "jsonl" if jsonl else "text", "bad_lines": [], "relogged": 0,
                                  "resumes": 0, "lines": len(lines), "events": []}
    for number, line in enumerate(lines, 1):
        if jsonl:
            try:
                record = json.loads(line)
                assert isinstance(record, dict)
            except (ValueError, AssertionError):
                info["bad_lines"].append(number)
                continue
        else:
            record = text_record(line)
        for key in record.get("nonfinite") or ():  # G4: the kit writes NaN/inf as null and names them here
            record[key] = float("nan")
        if record.get("event") == "resume":
            info["resumes"] += 1
        step = record.get("step")
        if "event" in record and finite(step):  # resume, finished, early_stopped, stopped: --plot marks them
            info["events"].append((str(record["event"]), int(step)))
        if "event" in record or not isinstance(step, (int, float)) or isinstance(step, bool) or not math.isfinite(step):
            continue
        step = int(step)
        record = {k: (float("nan") if v is None and k != "step" else v) for k, v in record.items()}
        if "lr" in record or "loss" in record:
            info["relogged"] += step in train
            train[step] = record  # R1/R5: after a resume the steps past the checkpoint come again; the last counts
        if any(k.startswith("val/") for k in record):
            evals[step] = {k: v for k, v in record.items() if k.startswith("val/")}
    return train, evals, info


def finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def runs_of(mask):
    """[(start, end)] index ranges (inclusive) where mask is True."""
    spans, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i - 1))
            start = None
    return spans


def check_log_lr(script, cfg, plan, curve, train, tol):
    """S2 (LR at its floor long before the end), S1 (LR constant where the schedule moves), S9 (LR departs
    from lr_curve()), each with the step range; steps explained by one finding are not reported twice."""
    found = []
    total = plan["total_steps"]
    steps = [s for s in sorted(train) if finite(train[s].get("lr"))]
    beyond = [s for s in steps if s > total or s < 1]
    if beyond:
        found.append(finding("S2", "warning", f"the log has LR records at steps {beyond[0]}-{beyond[-1]}, outside this "
                             f"config's 1-{total}: the run used another length (data size, batch, accumulation, "
                             "world size or epochs)", "diagnose with the run's own config.yaml, --num_samples and "
                             "--world_size", source="log", at=[(beyond[0], beyond[-1])]))
    steps = [s for s in steps if 1 <= s <= total]
    if len(steps) < 2:
        return found
    lr = np.array([train[s]["lr"] for s in steps])
    want = curve[np.array(steps) - 1]

    def close(a, b):
        return np.abs(a - b) <= tol * np.maximum(np.abs(a), np.abs(b)) + 1e-15

    explained = np.zeros(len(steps), bool)
    # S2: from some step on, the LR sits at the schedule's floor although the schedule is not there yet
    floor = min(float(curve.min()), float(curve[-1]))
    at_floor = close(lr, floor) | (lr <= floor)
    first = len(steps)
    while first > 0 and at_floor[first - 1]:
        first -= 1
    if first < len(steps) and not close(want[first], floor) and len(steps) - first >= 3 \
            and steps[-1] - steps[first] >= 0.05 * total:
        s0 = steps[first]
        ratio = total / s0
        hint = f" (the run is {ratio:.1f}x longer than the schedule that was used; grad_accum is " \
               f"{plan['grad_accum']}: a schedule sized in micro-batches?)" if ratio > 1.5 else ""
        found.append(finding("S2", "critical", f"LR at its floor {floor:.3g} from step {s0} to {steps[-1]} "
                             f"({s0 / total:.0%} into the {total}-step run); the configured schedule is at "
                             f"{want[first]:.3g} there and reaches the floor only at step {total}{hint}",
                             "size the schedule in optimizer steps (the kit's plan_schedule does) and resume with "
                             "the kit's script", source="log", at=[(s0, steps[-1])]))
        explained[first:] = True
    # S1: the logged LR stays constant over a long window where the schedule is designed to move
    marks = script.schedule_landmarks(cfg, plan)
    designed_flat = np.zeros(total + 1, bool)
    designed_flat[[i + 1 for i in marks["flat_steps"]]] = True
    same = np.r_[False, close(lr[1:], lr[:-1])] & ~explained
    windows = []
    for a, b in runs_of(same):
        a -= 1  # the window starts at the record the first repeat equals
        s_a, s_b = steps[a], steps[b]
        moving = int((~designed_flat[s_a:s_b + 1]).sum())
        curve_moves = not close(want[a], want[b])
        curve_flat = bool(np.all(curve[s_a - 1:s_b] == curve[s_a - 1]))
        if b - a + 1 >= 3 and moving >= max(3, 0.02 * total) and (curve_moves or curve_flat):
            windows.append((a, b, curve_moves))
            explained[a:b + 1] = True
    if windows:
        a, b, moves = max(windows, key=lambda w: steps[w[1]] - steps[w[0]])
        why = (f"the configured schedule moves from {want[a]:.4g} to {want[b]:.4g} there: the scheduler is not "
               "stepped once per optimizer step") if moves else \
            (f"the config's own {cfg['schedule.type']} curve is flat there too: a schedule type that should decay "
             "does not (final_lr_ratio 1?)")
        found.append(finding("S1", "critical", f"LR constant at {lr[a]:.4g} over steps {steps[a]}-{steps[b]} "
                             f"({b - a + 1} records; {len(windows)} such window(s)); {why}",
                             "step the scheduler right after every optimizer step and nowhere else" if moves else
                             "use schedule.type constant if a flat LR is intended, else final_lr_ratio < 1",
                             source="log", at=[(steps[w[0]], steps[w[1]]) for w in windows]))
    # S9: any other departure from the curve the config implies
    off = ~close(lr, want) & ~explained
    if off.any():
        idx = np.flatnonzero(off)
        worst = idx[np.argmax(np.abs(np.log(np.maximum(lr[idx], 1e-30) / np.maximum(want[idx], 1e-30))))]
        found.append(finding("S9", "critical", f"at {len(idx)} logged steps in {steps[idx[0]]}-{steps[idx[-1]]} the "
                             f"LR departs from the configured curve (worst: step {steps[worst]} logged "
                             f"{lr[worst]:.4g}, schedule {want[worst]:.4g})", "let the scheduler own the LR: remove "
                             "plateau schedulers and manual LR writes, and diagnose with the run's own config",
                             source="log", at=[(steps[a], steps[b]) for a, b in runs_of(off)]))
    return found


def lr_at(train, step):
    """The LR of the last train record at or before `step` (None when no record says)."""
    logged = [s for s in train if s <= step and finite(train[s].get("lr"))]
    return train[max(logged)]["lr"] if logged else None


def check_log_evals(rules, evals, train):
    """E1 (identical evals in a row, by the scripts' own frozen_evals(): a converged model whose loss sits at
    its floor with the LR above 0, or whose LR annealed to nothing against the log's peak, is not frozen) and E3
    (perplexity vs loss)."""
    found, steps = [], sorted(evals)
    peak = max((r["lr"] for r in train.values() if finite(r.get("lr"))), default=1.0)  # E1: the annealed tail is quiet

    def frozen(i):
        lr = lr_at(train, steps[i])
        return rules.frozen_evals(evals[steps[i - 1]], evals[steps[i]], peak if lr is None else lr, peak) is not None
    repeats = np.array([frozen(i) for i in range(1, len(steps))], bool)
    spans = runs_of(repeats)
    if spans:
        a, b = max(spans, key=lambda s: s[1] - s[0])
        count = b - a + 2
        first = evals[steps[a]]
        shown = ", ".join(f"{k}={v:.5g}" for k, v in list(first.items())[:3])
        found.append(finding("E1", "critical" if count >= 3 else "warning",
                             f"{count} evals in a row identical ({shown}) at steps {steps[a]}-{steps[b + 1]}: the "
                             "model stopped changing", "check the LR in the log (S1, S2, S10) and that the trained "
                             "parameters are in the optimizer", source="log",
                             at=[(steps[a], steps[b + 1]) for a, b in spans]))
    bad = [s for s in steps if finite(evals[s].get("val/ppl")) and finite(evals[s].get("val/loss"))
           and not math.isclose(math.log(max(evals[s]["val/ppl"], 1e-300)), evals[s]["val/loss"],
                                rel_tol=1e-3, abs_tol=1e-3)]
    if bad:
        s = bad[0]
        found.append(finding("E3", "warning", f"val/ppl {evals[s]['val/ppl']:.4g} is not exp(val/loss) = "
                             f"exp({evals[s]['val/loss']:.4g}) at {len(bad)} evals, steps {bad[0]}-{bad[-1]}",
                             "compute perplexity as exp(summed token CE / token count) over the eval set",
                             source="log", at=[(s, s) for s in bad]))
    return found


def check_nonfinite(train, steps):
    """G4: non-finite loss/gradient records; G5: fp16 steps the GradScaler skipped on gradient overflow
    (finite loss, inf gradient, a "scale" field in the log). Every skipped step has a record in the kit's
    logs, whatever train.log_every is."""
    found, last = [], max(steps[-1], 1)
    has_guard = any("skipped_steps" in train[s] for s in steps)
    skipped = max((train[s]["skipped_steps"] for s in steps if finite(train[s].get("skipped_steps"))), default=0)
    fp16 = any("scale" in train[s] for s in steps)
    bad_loss = [s for s in steps if "loss" in train[s] and not finite(train[s]["loss"])]
    bad_grad = [s for s in steps if "grad_norm" in train[s] and not finite(train[s]["grad_norm"]) and s not in bad_loss]
    overflow = bad_grad if fp16 else []
    if fp16 and not any("grad_norm" in train[s] for s in steps):  # no norm logged: each halving of the scale is a skip
        scales = [(s, train[s]["scale"]) for s in steps if finite(train[s].get("scale"))]
        overflow = [s for (_, before), (s, now) in zip(scales, scales[1:]) if now < before]
    nonfinite = bad_loss if fp16 else sorted(bad_loss + bad_grad)
    if nonfinite:
        share = len(nonfinite) / last
        tail = len(nonfinite) >= 3 and nonfinite[-3:] == steps[-3:]
        severity = "critical" if not has_guard or share > 0.01 or tail else "warning"
        guard = f"skipped_steps reached {int(skipped)}" if has_guard else \
            "no skipped_steps field: the NaN may have reached the weights"
        found.append(finding("G4", severity, f"non-finite loss/gradient at {len(nonfinite)} steps ({share:.1%} of "
                             f"{last}), steps {nonfinite[0]}-{nonfinite[-1]} (first: "
                             f"{', '.join(map(str, nonfinite[:5]))}); {guard}"
                             + ("; the log ends in a non-finite streak" if tail else ""),
                             "find the bad batches (data with NaN/inf, too high LR); the guard skips them but they "
                             "are lost steps", source="log", at=[(s, s) for s in nonfinite]))
    # G2: a step with no token to score (train_distill.py's empty_step()) is recorded with skipped_steps and no
    # loss or gradient; the run said WARNING G2 at each, so the log's diagnosis says it too
    empty = [s for s in steps if "skipped_steps" in train[s] and "loss" not in train[s] and "grad_norm" not in train[s]]
    if empty:  # all: nothing trained at all (a run that truncated every completion away ended 'done', exit 0)
        generated = any(k.startswith(("on_policy/", "seq_kd/")) for s in steps for k in train[s])  # E14's records
        found.append(finding("G2", "critical" if len(empty) == last else "warning", f"{len(empty)} of {last} steps "
                             f"({len(empty) / last:.1%}) had no token to score and were skipped, no update (steps "
                             f"{', '.join(map(str, empty[:8]))}" + (", ..." if len(empty) > 8 else "")
                             + "; the run said WARNING G2 at each)",
                             "on-policy KD (E14) whose windows hold padding inside their first kd.prompt_tokens: a "
                             "shorter kd.prompt_tokens, or data with fewer padded windows" if generated else
                             "windows with no trained target: examples whose completions data.too_long truncate "
                             "cut away (a longer data.seq_len, or data.too_long drop), or data.pad_token padding",
                             source="log", at=[(s, s) for s in empty]))
    share = len(overflow) / last
    if share > 0.05 and len(overflow) >= 3:
        early = sum(s <= 20 for s in overflow)
        found.append(finding("G5", "critical" if share > 0.25 else "warning",
                             f"GradScaler skipped {len(overflow)} of {last} steps ({share:.0%}) on fp16 overflow, "
                             f"steps {overflow[0]}-{overflow[-1]} ({early} of them in the first 20 steps while the "
                             f"scale calibrates); scale now {train[steps[-1]].get('scale', float('nan')):.4g}",
                             "train in bf16 where the GPU has it; otherwise lower the LR or check the data's scale "
                             "(never hand-set init_scale)", source="log", at=[(s, s) for s in overflow]))
    return found


def check_grad_norms(cfg, train, steps):
    """G3: spikes against the running median of the previous 20 records, steps above the configured
    train.grad_norm_warn, and a norm that trends up 10x from the first quarter to the last."""
    found = []
    norms = [(s, train[s]["grad_norm"]) for s in steps if finite(train[s].get("grad_norm"))]
    spikes = []
    for i in range(5, len(norms)):
        median = float(np.median([n for _, n in norms[max(0, i - 20):i]]))
        if norms[i][1] > 10 * median and norms[i][1] > 1e-6:
            spikes.append((norms[i][0], norms[i][1], median))
    above = [(s, n) for s, n in norms if "train.grad_norm_warn" in cfg and n > cfg["train.grad_norm_warn"]]
    parts = []
    if spikes:
        s, n, m = max(spikes, key=lambda x: x[1] / max(x[2], 1e-30))
        parts.append(f"{len(spikes)} spike(s) over 10x the running median, steps {spikes[0][0]}-{spikes[-1][0]} "
                     f"(largest {n:.4g} at step {s}, {n / max(m, 1e-30):.0f}x the median {m:.3g})")
    if above:
        parts.append(f"{len(above)} step(s) above train.grad_norm_warn {cfg['train.grad_norm_warn']:g}, steps "
                     f"{above[0][0]}-{above[-1][0]}")
    if parts:
        found.append(finding("G3", "warning", "gradient norm: " + "; ".join(parts), "look at the batches of those "
                             "steps; keep train.clip_grad_norm set; lower the LR if spikes repeat", source="log",
                             at=sorted({(s, s) for s, *_ in spikes + above})))
    if len(norms) >= 16:
        q = len(norms) // 4
        first, late = np.median([n for _, n in norms[:q]]), np.median([n for _, n in norms[-q:]])
        if late > 10 * first:
            found.append(finding("G3", "warning", f"gradient norm rising: median {first:.3g} over steps "
                                 f"{norms[0][0]}-{norms[q - 1][0]}, {late:.3g} over steps {norms[-q][0]}-"
                                 f"{norms[-1][0]}", "lower the LR or lengthen the warmup; check for a diverging loss",
                                 source="log", at=[(norms[-q][0], norms[-1][0])]))
    return found


def check_loss_trend(train, steps):
    """S10: the loss is how people notice a stuck LR: the median of the last quarter of the records is not
    5% below the median of the first quarter."""
    losses = [(s, train[s]["loss"]) for s in steps if finite(train[s].get("loss"))]
    if len(losses) < 8:
        return []
    q = max(2, len(losses) // 4)
    first, late = float(np.median([v for _, v in losses[:q]])), float(np.median([v for _, v in losses[-q:]]))
    if late < first * 0.95:
        return []
    return [finding("S10", "warning", f"train loss not decreasing: median {first:.4g} over steps {losses[0][0]}-"
                    f"{losses[q - 1][0]}, {late:.4g} over steps {losses[-q][0]}-{losses[-1][0]} "
                    f"({late / first - 1:+.1%})", "check the LR the log shows (S1, S2) and the data/labels; a zero "
                    "or frozen LR trains nothing", source="log",
                    at=[(losses[-q][0], losses[-1][0])])]


def check_loss_components(rules, cfg, train, steps):
    """E2: a logged loss/<name> term above train.max_loss_share of their sum, by the scripts' own
    dominating_loss() (3 records in a row; the label CE not judged)."""
    names = sorted({k for s in steps for k in train[s] if k.startswith("loss/")})
    if len(names) < 2:
        return []
    limit = cfg.get("train.max_loss_share", rules.CONFIG["train.max_loss_share"][0])
    records = [(s, {k[len("loss/"):]: train[s][k] for k in names}) for s in steps
               if all(finite(train[s].get(k)) for k in names)]
    found = []
    for name, (a, b, count, top) in rules.dominating_loss(records, limit).items():
        above = [abs(p[name]) / max(sum(abs(v) for v in p.values()), 1e-300) > limit for _, p in records]
        found.append(finding("E2", "warning", f"loss/{name} is above train.max_loss_share {limit:.0%} of the summed "
                             f"loss components at {count} of {len(records)} records, steps {a}-{b} (up to {top:.0%})",
                             f"lower the weight of loss/{name} (or raise the others) until no term is above the share",
                             source="log", at=[(records[i][0], records[j][0]) for i, j in runs_of(above)]))
    return found


THROUGHPUT_WINDOW = 5  # E7: records in the rolling median a drop is judged on


def check_throughput(train, steps, evals=()):
    """E7: samples_per_s (or another *_per_s) whose rolling median (5 records) stays below half the run's
    median for 3+ records in a row. Left out, as saw-teeth of a healthy run and not slowdowns: the first
    record (start-up), the first record of each epoch (a cached loader's epoch start) and each record whose
    window holds an evaluation or a checkpoint save (the first after an eval)."""
    rate_key = "samples_per_s" if any("samples_per_s" in train[s] for s in steps) else \
        next((k for s in steps for k in train[s] if k.endswith("_per_s")), None)
    eval_steps = sorted(evals)
    keep = []
    for i, s in enumerate(steps[1:], 1):
        prev = steps[i - 1]
        new_epoch = train[s].get("epoch") is not None and train[s].get("epoch") != train[prev].get("epoch")
        at = bisect.bisect_left(eval_steps, prev)
        after_eval = at < len(eval_steps) and eval_steps[at] < s  # an eval at prev <= e < s ran inside the window
        if rate_key and finite(train[s].get(rate_key)) and not new_epoch and not after_eval:
            keep.append((s, train[s][rate_key]))
    if len(keep) < 6:
        return []
    median = float(np.median([r for _, r in keep]))
    half = THROUGHPUT_WINDOW // 2
    rates = [(s, float(np.median([r for _, r in keep[max(0, i - half):i + half + 1]])))
             for i, (s, _) in enumerate(keep)]
    low = [(a, b) for a, b in runs_of([r < 0.5 * median for _, r in rates]) if b - a + 1 >= 3]
    if not low:
        return []
    a, b = max(low, key=lambda x: x[1] - x[0])
    worst = min(r for _, r in rates[a:b + 1])
    return [finding("E7", "warning", f"{rate_key} (rolling median of {THROUGHPUT_WINDOW} records) fell to {worst:.4g} "
                    f"({worst / median:.0%} of the run's median "
                    f"{median:.4g}) over steps {rates[a][0]}-{rates[b][0]} ({b - a + 1} records; {len(low)} such "
                    "drop(s))", "look for data-loading stalls, other jobs on the node, thermal throttling, or "
                    "evaluation/checkpointing inside the window", source="log",
                    at=[(rates[a][0], rates[b][0]) for a, b in low])]


def check_log(path, script, cfg, plan, curve):
    try:
        train, evals, info = read_log(path)
    except OSError as err:
        return [finding("C3", "critical", f"log {path} cannot be read ({err})", "check the path", source="log")]
    found = []
    kind = "metrics.jsonl records" if info["format"] == "jsonl" else "plain-text lines with step= fields"
    found.append(finding("E5", "info", f"{path}: {info['lines']} lines read as {kind}: {len(train)} train steps, "
                         f"{len(evals)} evals" + (f", {info['relogged']} steps logged again after "
                                                  f"{info['resumes']} resume(s), the last record kept"
                                                  if info["relogged"] else ""),
                         "nothing to fix", source="log"))
    if info["bad_lines"]:
        found.append(finding("R6", "info", f"{len(info['bad_lines'])} unparsable line(s) skipped (line "
                             f"{info['bad_lines'][0]}); a torn last line after a kill is normal",
                             "nothing to fix unless lines in the middle are torn", source="log"))
    if not train and not evals:
        found.append(finding("E7", "warning", f"{path} holds no records with a step", "pass a metrics.jsonl, or a "
                             "text log with step= and lr=/loss= fields (docs/diagnose_and_fix.md)", source="log"))
        return found
    if plan is not None and curve is not None:
        tol = 1e-6 if info["format"] == "jsonl" else 1e-3  # text logs print about 4 significant digits
        found += check_log_lr(script, cfg, plan, curve, train, tol)
    elif cfg is not None:
        found.append(finding("S9", "info", "the LR checks need the run's length; they were skipped",
                             "pass --num_samples (or fix the config findings above)", source="log"))
    rules = script or training_script("probe")  # E1/E2: the scripts' own rules (identical in both)
    found += check_log_evals(rules, evals, train)
    steps = sorted(train)
    if steps:
        found += check_nonfinite(train, steps) + check_grad_norms(cfg or {}, train, steps)
        found += check_loss_trend(train, steps) + check_loss_components(rules, cfg or {}, train, steps)
        found += check_throughput(train, steps, evals)
    return found


# -----------------------------------------------------------------------------
# Checkpoint checks: readable (R6), weights_only (R7), loop position (R1, R2, R4), schedule keys (S7).
def load_checkpoint(path):
    """(checkpoint, findings): never unpickles arbitrary objects (weights_only=True only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True), []  # R7: never the full unpickler
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Weights only load failed" in str(err):
            unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            detail = f"it pickles {unsupported.group(1)}" if unsupported else str(err).splitlines()[0]
            return None, [finding("R7", "critical", f"{path} does not load with weights_only=True ({detail[:160]})",
                                  "store RNG and loop state as tensors and plain types (the kit's scripts do); "
                                  "load it with weights_only=False only if you trust its origin", source="checkpoint")]
        error = err
    except Exception as err:  # a torn zip, a truncated file: whatever the reader meets
        error = err
    prev = path[:-3] + ".prev.pt" if path.endswith(".pt") else None
    fallback = ""
    if prev and os.path.exists(prev):
        try:
            torch.load(prev, map_location="cpu", weights_only=True)
            fallback = f"; {os.path.basename(prev)} is readable and resume falls back to it"
        except Exception:
            fallback = f"; {os.path.basename(prev)} is unreadable too"
    return None, [finding("R6", "critical", f"{path} is unreadable ({type(error).__name__}: "
                          f"{str(error).splitlines()[0][:160] if str(error) else ''}){fallback}",
                          "the save was torn (kill or full disk): resume from the previous checkpoint; save with "
                          "temp file + fsync + rename", source="checkpoint")]


def prev_shards_note(path, script):
    """R6, D2: for a sharded last.pt whose directory is gone, whether the run's fallback (last.prev.pt and the
    directory it names) is whole."""
    prev = path[:-3] + ".prev.pt" if path.endswith("last.pt") else None
    if prev is None or not os.path.exists(prev):
        return ""
    try:
        ckpt = torch.load(prev, map_location="cpu", weights_only=True)
        whole = not (ckpt.get("shards") and script.shard_reader().missing_shards(ckpt, prev))
    except Exception:
        whole = False
    return f"; {os.path.basename(prev)} is {'whole, and resume falls back to it (R6)' if whole else 'not whole either'}"


def optimizer_step_counts(optimizer_state):
    steps = set()
    for state in (optimizer_state or {}).get("state", {}).values():
        if isinstance(state, dict) and "step" in state:
            step = state["step"]
            steps.add(int(step.item() if hasattr(step, "item") else step))
    return steps


def check_checkpoint(path, script, cfg, plan, opts):
    """What a resume from this checkpoint would find: its step counters (R2), RNG (R4) and data position (R1),
    and whether the config, the features' inputs and --world_size match it (S7)."""
    ckpt, found = load_checkpoint(path)
    if ckpt is None:
        return found
    src = "checkpoint"
    if not isinstance(ckpt, dict) or "global_step" not in ckpt:
        keys = ", ".join(sorted(map(str, ckpt))[:8]) if isinstance(ckpt, dict) else type(ckpt).__name__
        return [finding("R2", "critical", f"{path} has no global_step (keys: {keys}): a resume restarts the schedule "
                        "from warmup", "save global_step (optimizer steps taken) with the model, optimizer and "
                        "scheduler state", source=src)]
    gs, skipped = int(ckpt["global_step"]), int(ckpt.get("skipped_steps", 0))
    found.append(finding("R6", "info", f"{path} loads with weights_only=True: step {gs}, {skipped} skipped, "
                         f"finished {bool(ckpt.get('finished'))}, task {ckpt.get('task')}, torch "
                         f"{ckpt.get('torch_version')}", "nothing to fix", source=src))
    found += scheduler_step_problems(ckpt, gs)
    optimizer = ckpt.get("optimizer")
    if ckpt.get("shards"):  # D2: a sharded checkpoint's optimizer state is in the DCP directory it names
        try:
            steps = script.shard_reader().shard_tensors(ckpt, path, "optimizer.state.")
        except script.ConfigError as err:  # D2: what the run refuses, with the same line
            return found + [finding("D2", "critical", err.problems[0][2] + prev_shards_note(path, script),
                                    "copy the directory beside the checkpoint, or check the run's export/", source=src)]
        optimizer = {"state": {k: {"step": v} for k, v in steps.items() if k.endswith(".step")}}
    found += optimizer_step_problems(ckpt, optimizer, gs, skipped)
    found += rng_and_position_problems(ckpt, script, gs)
    found += resume_match_problems(ckpt, script, cfg, plan, opts)
    return found


def scheduler_step_problems(ckpt, gs):
    """R2: the scheduler stepped once per optimizer step, skipped ones included."""
    found, src = [], "checkpoint"
    sched = ckpt.get("scheduler") or {}
    if "last_epoch" not in sched:
        found.append(finding("R2", "critical", "no scheduler state_dict (last_epoch) in the checkpoint",
                             "save scheduler.state_dict() and load it on resume (R3)", source=src))
    elif int(sched["last_epoch"]) != gs:
        found.append(finding("R2", "critical", f"global_step {gs} but the scheduler has stepped {sched['last_epoch']} "
                             "times: the LR after resume will not be the one this step should use",
                             "step the scheduler exactly once per optimizer step, skipped steps included", source=src))
    return found


def optimizer_step_problems(ckpt, optimizer, gs, skipped):
    """R2: the optimizer's own step count is global_step - skipped_steps, the same for every parameter."""
    found, src = [], "checkpoint"
    counts = optimizer_step_counts(optimizer)
    if len(counts) > 1:
        found.append(finding("R2", "critical", f"the optimizer's parameters disagree on their step count "
                             f"{sorted(counts)}",
                             "step every parameter group together", source=src))
    elif counts and counts != {gs - skipped}:
        found.append(finding("R2", "critical", f"the optimizer has taken {counts.pop()} steps, global_step - "
                             f"skipped_steps = {gs} - {skipped} = {gs - skipped}", "count global_step once per "
                             "optimizer step and skipped_steps once per skipped step", source=src))
    elif not counts and gs - skipped > 0 and (ckpt.get("optimizer") or {}).get("state") == {} \
            and (ckpt.get("config") or {}).get("optim.name") != "sgd":
        found.append(finding("R2", "critical", f"global_step {gs} with {skipped} skipped, but the optimizer has no "
                             "state: it never stepped", "save optimizer.state_dict() after real steps", source=src))
    return found


def rng_and_position_problems(ckpt, script, gs):
    """R4: an RNG state per process; R1: the data position that global_step implies."""
    found, src = [], "checkpoint"
    rng = ckpt.get("rng")
    parts = ("torch", "numpy", "python")
    if not isinstance(rng, list) or not rng or not all(isinstance(r, dict) and all(p in r for p in parts) for r in rng):
        found.append(finding("R4", "critical", "RNG state missing or incomplete (need torch, numpy and python per "
                             f"process; got {type(rng).__name__})", "save torch/CUDA/numpy/python RNG states per rank",
                             source=src))
    elif len(rng) != ckpt.get("world_size", len(rng)):
        found.append(finding("R4", "critical", f"{len(rng)} RNG states for world_size {ckpt.get('world_size')}",
                             "gather every rank's RNG state", source=src))
    position = ckpt.get("data_position")
    ck_cfg = ckpt.get("config") or {}
    sig = ckpt.get("schedule") or {}
    if not isinstance(position, dict) or not {"epoch", "step_in_epoch", "seed"} <= set(position):
        found.append(finding("R1", "critical", f"data position missing or incomplete ({position!r})",
                             "save the epoch, step in epoch and data seed with the checkpoint", source=src))
    elif all(k in ck_cfg for k in ("train.batch_size", "train.grad_accum")) and "num_samples" in sig:
        per_epoch = script.optimizer_steps_per_epoch(sig["num_samples"], ck_cfg["train.batch_size"],
                                                     ck_cfg["train.grad_accum"], ckpt.get("world_size", 1))
        where = position["epoch"] * per_epoch + position["step_in_epoch"]
        if where != gs:
            found.append(finding("R1", "critical", f"data position epoch {position['epoch']} step "
                                 f"{position['step_in_epoch']} = step {where} of {per_epoch}-step epochs, but "
                                 f"global_step is {gs}: resume would repeat or skip data",
                                 "derive the data position from global_step", source=src))
    return found


def resume_match_problems(ckpt, script, cfg, plan, opts):
    """S7/R1: what the script compares before it resumes: the seed, the features' inputs, the task, the number
    of processes and the schedule."""
    found, src = [], "checkpoint"
    gs, position = int(ckpt["global_step"]), ckpt.get("data_position")
    sig = ckpt.get("schedule") or {}
    if cfg is not None and isinstance(position, dict) and position.get("seed", cfg["seed"]) != cfg["seed"]:
        found.append(finding("S7", "critical", f"seed {cfg['seed']}, but this checkpoint was trained with seed "
                             f"{position['seed']}: the data order of the epoch in progress depends on it (R5); the "
                             "script refuses to resume", f"restore seed: {position['seed']}, or start a new run "
                             "(another run_name or --run_dir)", source=src))
    if cfg is not None and isinstance(ckpt.get("inputs"), dict) and hasattr(script, "config_inputs"):
        try:  # S7/R11: what the probe's features depend on, as check_resume_inputs compares it (the settings,
            changes = script.input_changes(ckpt["inputs"], script.config_inputs(cfg))  # build file, data)
        except script.ConfigError:  # the target does not import: the config checks say so
            changes = []
        except FileNotFoundError:  # C8: the data is not on this machine (a copied run dir); settle() says so once
            changes = []
        except OSError as err:
            changes = [("data.train_x", f"unreadable ({err})")]
        if changes:
            found.append(finding("S7", "critical", "what the features depend on changed since this checkpoint: "
                                 + "; ".join(f"{k}: {t}" for k, t in changes) + "; the script refuses to resume "
                                 "(its head was trained on the old features)", "restore them, or start a new run "
                                 "(another run_name or --run_dir)", source=src))
    if cfg is not None and ckpt.get("task") not in (None, cfg["task"]):
        found.append(finding("R1", "critical", f"a '{ckpt.get('task')}' checkpoint, the config's task is "
                             f"'{cfg['task']}'",
                             "resume it with its own script and config", source=src))
    if ckpt.get("world_size", 1) != opts["world_size"]:
        found.append(finding("S7", "critical", f"written by {ckpt.get('world_size')} process(es), this diagnosis is "
                             "for "
                             f"--world_size {opts['world_size']}: the data order and step counts depend on it",
                             f"resume with {ckpt.get('world_size')} process(es) (or pass --world_size)", source=src))
    elif cfg is not None and plan is not None:
        now = script.schedule_signature(cfg, plan)
        changed = {k: (sig.get(k), v) for k, v in now.items() if sig.get(k) != v}
        if changed:
            what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            allowed = cfg.get("train.allow_schedule_change")
            found.append(finding("S7", "warning" if allowed else "critical",
                                 f"schedule keys changed since this checkpoint: {what}" +
                                 ("; allowed, so the LR jumps to the new curve at resume" if allowed else
                                  "; the script refuses to resume"),
                                 "restore those values to continue the same curve, or set "
                                 "train.allow_schedule_change: true to switch curves on purpose", source=src))
        elif gs > plan["total_steps"]:
            found.append(finding("S7", "critical", f"global_step {gs} is past the schedule's {plan['total_steps']} "
                                 "steps", "resume with the run's own config", source=src))
    return found


# -----------------------------------------------------------------------------
# The whole diagnosis, and --fix.
def diagnose_tree(tree, name, opts, with_runs=True):
    """All config findings for a config tree (+ log and checkpoint checks when with_runs). Returns a report:
    findings, the repaired tree, the script, cfg and plan."""
    findings = []
    report = {"findings": findings, "tree": None, "script": None, "cfg": None, "plan": None, "curve": None,
              "config": name}
    if tree is None:
        return report
    tree, as_read = copy.deepcopy(tree), copy.deepcopy(tree)
    for item in opts["overrides"]:  # --set task=... picks the script, as it would for the training launch
        key, sep, value = item.partition("=")
        if sep and key.strip() == "task":
            tree_set(tree, "task", value.strip(), {"task": None})
    task = config_task(tree)
    script = training_script(task)
    if script is None:
        close = difflib.get_close_matches(str(task), known_tasks(), n=1, cutoff=0.5)
        copy_it = f"copy train_{task}.py beside diagnose_and_fix.py (its checks are the script's)"  # C3: copied alone
        findings.append(finding("C3", "critical", f"task: {task!r} has no training script train_{task}.py (tasks here: "
                                f"{', '.join(known_tasks()) or 'none'})", f"set task to {close[0]}" if close else
                                f"set task to one of the tasks listed, or {copy_it}" if known_tasks() else copy_it,
                                changes=[("task", close[0])] if close else []))
        if not close:
            return report
        tree_set(tree, "task", close[0], {"task": None})
        script = training_script(close[0])
    apply_overrides(tree, opts["overrides"], script, findings)
    apply_overrides(as_read, opts["overrides"], script, [])  # what --fix starts from: file + --set
    report.update(script=script, tree=tree, original=as_read)
    cfg, plan = settle(script, tree, opts, findings)
    curve = script.lr_curve(cfg, plan) if plan is not None else None
    report.update(cfg=cfg, plan=plan, curve=curve)
    if plan is not None:
        findings += check_plan(script, cfg, plan)
        findings += check_warmup(cfg, plan)
        findings += check_momentum_cycling(cfg)
        findings += check_curve(script, cfg, plan, curve, findings)
        findings += check_intervals(cfg, plan)
        findings += check_memory(script, cfg, plan, opts)
        refusals = check_run_inputs(script, cfg, opts)
        findings += refusals
        findings += check_teacher_cache(script, cfg, usable=not refusals)
    if cfg is not None:
        findings += check_precision(cfg)
        findings += check_kd_temperature(cfg)
        findings += check_loss_weights(cfg)
    if with_runs and opts.get("log"):
        findings += check_log(opts["log"], script, cfg, plan, curve)
    if with_runs and opts.get("checkpoint"):
        findings += check_checkpoint(opts["checkpoint"], script, cfg, plan, opts)
    return report


def fix_tree(report, opts):
    """Apply every change the findings carry to the config as read (settle's repairs included, in the order
    they were made), diagnose the result again, repeat until nothing changes.
    Returns (fixed tree, [(key, old, new, id, why)], the fixed tree's report)."""
    tree = copy.deepcopy(report["original"])
    changes, current = [], report
    for _ in range(5):
        applied = False
        for f in current["findings"]:
            for key, value in f["changes"]:
                present, old = tree_get(tree, key)
                old = old if present else REMOVE
                if old == value or key.startswith("expect.") and any(c[3] in ("C1", "S6") for c in changes):
                    continue  # S5: the expect: block is never fitted to a curve drawn with a guessed value (C1)
                apply_change(tree, key, value, current["script"].CONFIG)
                changes.append((key, old, value, f["id"], f["evidence"]))
                applied = True
        if not applied:
            break
        current = diagnose_tree(tree, "the fixed config", dict(opts, overrides=[]), with_runs=False)
        if current["script"] is None:
            break
    return tree, changes, current


def inline_yaml(value):
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def fixed_config_text(tree, changes, source, remaining):
    lines = [f"# Fixed by diagnose_and_fix.py from {source} on {time.strftime('%Y-%m-%d %H:%M')}.",
             "# Every change and why (row ids: FAILURE_MODES.md):"]
    for key, old, new, rid, why in changes:
        before = "(absent)" if old == REMOVE else inline_yaml(old)
        after = "(removed)" if new == REMOVE else inline_yaml(new)
        lines.append(f"#   {key}: {before} -> {after}   [{rid}] {why}")
    if not changes:
        lines.append("#   (none)")
    if remaining:
        lines.append("# Not fixed automatically (needs your decision):")
        lines += [f"#   [{f['id']} {f['severity']}] {f['evidence']} -- {f['fix']}" for f in remaining]
    return "\n".join(lines) + "\n" + yaml.safe_dump(tree, sort_keys=False, default_flow_style=False)


def write_atomic(path, text):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".diagnose-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -----------------------------------------------------------------------------
# --plot: its code is diagnose_plot.py beside this tool, loaded when --plot is given.
PLOTTING = {}  # the loaded module, once


def plotting():
    """diagnose_plot.py from this tool's own directory (never from sys.path, as the training scripts load their
    companion files), loaded once and handed this tool as `kit`. Missing: one line, exit 2."""
    if not PLOTTING:
        path = os.path.join(REPO, "diagnose_plot.py")
        if not os.path.isfile(path):
            raise UsageError("--plot needs diagnose_plot.py beside diagnose_and_fix.py (copy it from the kit), or "
                             "leave --plot unset")
        spec = importlib.util.spec_from_file_location(f"{__name__}.diagnose_plot", path)
        module = importlib.util.module_from_spec(spec)
        own = sys.modules.get(__name__)
        module.kit = own if getattr(own, "__dict__", None) is globals() else argparse.Namespace(**globals())
        spec.loader.exec_module(module)
        PLOTTING["module"] = module
    return PLOTTING["module"]


# -----------------------------------------------------------------------------
# Output.
def counts(findings):
    return {s: sum(f["severity"] == s for f in findings) for s in SEVERITIES}


def exit_code(findings):
    """C3: 1 when any finding is critical, else 0; main() exits 2 for refused input. Never the count (it was, capped
    at 100): two critical findings exited 2, as refused input does, so a cron job could not tell them apart."""
    return 1 if counts(findings)["critical"] else 0


def report_text(findings, header, fixed):
    lines = [header]
    order = {"config": 0, "log": 1, "checkpoint": 2}
    for f in sorted(findings, key=lambda f: (order[f["source"]], SEVERITIES.index(f["severity"]))):
        lines += [f"{f['severity'].upper():8} {f['id']:4} [{f['source']}] {f['evidence']}", f"{'':14}fix: {f['fix']}"]
    n = counts(findings)
    lines.append(f"{n['critical']} critical, {n['warning']} warning, {n['info']} info; exit code {exit_code(findings)}")
    return "\n".join(lines + [fixed] * bool(fixed))


def to_json(report, findings, fix_info):
    return {"config": report["config"], "task": report["script"].TASK if report["script"] else None,
            "plan": report["plan"], "counts": counts(findings), "exit_code": exit_code(findings),
            "findings": [{**{k: f[k] for k in ("id", "severity", "source", "evidence", "fix", "at")},
                          "changes": [{"key": k, "value": None if v == REMOVE else v, "remove": v == REMOVE}
                                      for k, v in f["changes"]]}
                         for f in findings],
            "fix": fix_info}


def default_config(args, log):
    """--config, else the config.yaml the run wrote next to the log, else the checkpoint's own config."""
    if args.config:
        return args.config, None
    if log:
        beside = os.path.join(os.path.dirname(os.path.abspath(log)), "config.yaml")
        if os.path.isfile(beside):
            return beside, None
    if args.checkpoint:
        try:
            ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
            if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict):  # flat keys, nested as in a file
                return f"{args.checkpoint} (its saved config)", kit_script().unflatten(ckpt["config"])
        except Exception:
            pass  # the checkpoint check reports why it does not load
    return None, None


def diagnose_run(args, opts):
    """(config name, report, findings) for the config and the one log (opts["log"]) and checkpoint."""
    name, tree = default_config(args, opts["log"])
    findings = []
    if name is None:
        findings.append(finding("C3", "info", "no config given or found beside the log/checkpoint: config-dependent "
                                "checks skipped", "pass --config (the run's config.yaml)"))
    elif tree is None:
        tree, findings = read_config_tree(name)
    report = diagnose_tree(tree, name, opts)
    if tree is None:  # no usable config: the log and checkpoint are still checked on their own
        if opts["log"]:
            report["findings"] += check_log(opts["log"], None, None, None, None)
        if args.checkpoint:
            report["findings"] += check_checkpoint(args.checkpoint, training_script("probe"), None, None, opts)
    return name, report, findings + report["findings"]


def run_world_size(args, log):
    """--world_size, else the processes the run itself used: the world_size its checkpoint records (--checkpoint,
    or checkpoints/last.pt beside the log), so a healthy two-process run is judged as one (S2, S9); else 1."""
    if args.world_size is not None:
        return args.world_size
    return run_record(args, log).get("world_size", 1)


def run_record(args, log):
    """What the run's own checkpoint (--checkpoint, or checkpoints/last.pt beside the log) says of its size:
    {"world_size", "num_samples"} (C8: a run dir copied without its data keeps its LR checks); {} without one."""
    candidates = [args.checkpoint] + ([os.path.join(os.path.dirname(os.path.abspath(log)), "checkpoints", "last.pt")]
                                      if log else [])
    for path in candidates:
        if path and os.path.isfile(path):
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # the checkpoint check reports it; here it only cannot say the run's size
                continue
            if isinstance(ckpt, dict) and isinstance(ckpt.get("world_size"), int) and ckpt["world_size"] >= 1:
                samples = (ckpt.get("schedule") or {}).get("num_samples")
                return {"world_size": ckpt["world_size"], "num_samples": samples if isinstance(samples, int) else None}
    return {}


def main(argv=None):
    try:
        return diagnose_all(parse_args(argv))
    except UsageError as err:  # the command line; or the picture --plot could not write after all (disk full, say)
        print(f"diagnose_and_fix.py: {err}", file=sys.stderr)
    except Refused as err:  # C3: the run's own line
        print(err, file=sys.stderr)
    return 2


def diagnose_all(args):
    """Every run's diagnosis, --fix, the report and --plot; returns the exit code (1: a critical finding in any run)."""
    say = getattr(kit_script(), "write_stdout", print)  # R8: `| head` ends without a traceback, after every check
    opts = {"overrides": args.set, "num_samples": args.num_samples, "world_size": run_world_size(args, None),
            "device_memory": args.device_memory, "log": None, "checkpoint": args.checkpoint}
    results = [(log, *diagnose_run(args, dict(opts, log=log, world_size=run_world_size(args, log),
                                              run_samples=run_record(args, log).get("num_samples"))))
               for log in args.log or [None]]
    fixed_line, fix_info = None, None
    if args.fix:  # parse_args allows --fix with one run only
        _, name, report, _ = results[0]
        if report["tree"] is None:
            fixed_line = f"--fix: nothing written: {name} has no usable config to start from (see the findings)"
            fix_info = {"output": None, "written": False, "changes": [], "remaining_critical": None}
        else:
            tree_out, changes, after = fix_tree(report, opts)
            remaining = [f for f in after["findings"] if f["severity"] != "info"]
            write_atomic(args.output, fixed_config_text(tree_out, changes, name, remaining))
            left = counts(after["findings"])["critical"]
            fixed_line = (f"--fix: wrote {args.output} with {len(changes)} change(s); it diagnoses with "
                          f"{left} critical finding(s)" + ("" if left == 0 else ": " + "; ".join(
                              f"{f['id']} {f['evidence']}" for f in after["findings"] if f["severity"] == "critical")))
            fix_info = {"output": args.output, "written": True, "remaining_critical": left,
                        "changes": [{"key": k, "from": None if o == REMOVE else o, "to": None if n == REMOVE else n,
                                     "removed": n == REMOVE, "id": rid, "why": why} for k, o, n, rid, why in changes]}
    if args.json:
        reports = [to_json(report, findings, fix_info) for _, _, report, findings in results]
        say(json.dumps(reports[0] if len(reports) == 1 else reports, indent=1, default=str))
    else:
        for log, name, report, findings in results:
            task = report["script"].TASK if report["script"] else "?"
            parts = [f"config {name} (task {task})" if name else "no config"]
            parts += [f"log {log}"] if log else []
            parts += [f"checkpoint {args.checkpoint}"] if args.checkpoint else []
            say(report_text(findings, "diagnose_and_fix.py: " + ", ".join(parts), fixed_line))
    if args.plot is not None:
        views = [plotting().run_view(log, report, findings) for log, _, report, findings in results]
        plotting().plot_runs(views, args.plot, out=(lambda text: print(text, file=sys.stderr)) if args.json else say)
    return max(exit_code(findings) for *_, findings in results)


if __name__ == "__main__":
    sys.exit(main())

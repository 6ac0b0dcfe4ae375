"""--evaluate (E11, C8) for train_distill.py.

Saved weights scored on a config's val windows by the run's own evaluate(), so the numbers are the run's: CE,
perplexity and, with a teacher (or its complete cache), teacher agreement. PATH is a checkpoint, a run directory
(its best.pt) or an export directory (loaded as its users load it: the script's load_export()).

A companion file: train_distill.py loads it (companion() in its shared config block) for --evaluate only, and
hands itself over as `kit`; the data, the networks, the metrics and the refusals are the script's own
(kit.TokenWindows, kit.build_trainable, kit.evaluate, kit.ConfigError). The block `evaluate command` at the end
is byte-identical in probe_evaluate.py (tests/test_shared_blocks.py).
"""
import json
import math
import os
import sys
import types

import torch
import torch.nn as nn

kit: types.ModuleType  # the training script that loaded this file: companion() sets it before this code runs


class ExportedLM(nn.Module):
    """An exported language model in the shape evaluate() calls: tokens -> (logits, hidden or None)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, x, positions=None):  # C10: a packed val set's positions, as evaluate() gives the run's model
        if positions is None:
            return kit.split_outputs(self.lm(x))
        if isinstance(self.lm, kit.GPT):
            return self.lm(x, positions=positions)
        hf = kit.hf_models("--evaluate", "set data.packing=false")  # a Hugging Face export: its block-diagonal mask
        return hf.HFCausalLM(self.lm, False)(x, positions=positions)


def teacher_cache(cfg, d, val_set, windows):
    """R9: the offline run's complete teacher cache, checked against this run as training checks it; else None
    (E11: an evaluation builds nothing, a cache takes hours at real size)."""
    manifest = kit.caching(cfg).read_manifest(cfg["kd.teacher_cache"])
    if manifest is not None and manifest["complete"]:
        return kit.caching(cfg).prepare_teacher_cache(cfg, d, kit.TokenWindows(cfg, "train"), val_set, windows,
                                                      print if d["main"] else (lambda line: None))
    if d["main"]:
        print(f"note E11: kd.teacher_cache: {cfg['kd.teacher_cache']} is {'incomplete' if manifest else 'absent'} and "
              "--evaluate builds no cache: scored without it, val/agreement left out (build it with --cache_teacher, "
              "or set kd.teacher_cache=null to compare with the teacher itself)", file=sys.stderr)
    return None


def evaluate_saved(config_path, overrides, path):
    """--evaluate PATH: val/loss (token CE), val/ppl and, with a teacher (or its cache), val/agreement."""
    kind, source = evaluation_weights(path)
    cfg, scoring = evaluation_config(config_path, overrides, kind, source)  # C8: the run's own unless keys named
    d = kit.setup_distributed(cfg)
    val_set = kit.TokenWindows(cfg, "val")
    windows = kit.eval_windows(cfg, len(val_set))
    offline = cfg["kd.enabled"] and cfg["kd.teacher_cache"] is not None
    teacher = kit.build_teacher(cfg, d["device"]) if cfg["kd.enabled"] and not offline else None
    cache = teacher_cache(cfg, d, val_set, windows) if offline else None
    if kind == "export":
        if not any(os.path.isfile(os.path.join(source, f)) for f in ("model.json", "config.json")):
            raise kit.ConfigError([("C3", "--evaluate", f"{source} holds no model.json or config.json, so it is no "
                                    f"export of train_distill.py; {evaluation_choices(source)}")])
        module, weights = ExportedLM(kit.load_export(source)), f"export {source}"
    else:
        ckpt = read_checkpoint(source, kit.TASK)
        # E11: the network as trained, without the KD projection: it only ever fed the hidden-state loss, and a
        # teacher of another width here would not fit it. The data and the teacher: evaluation_config (C8).
        module = kit.build_trainable(ckpt["config"], None)
        state = kit.saved_weights(ckpt, source, "--evaluate")  # D4: a sharded run's checkpoint names its DCP directory
        module.load_state_dict({k: v for k, v in state.items() if not k.startswith("proj.")})
        weights = f"{source} (step {ckpt['global_step']})"
    run = {"cfg": cfg, "dist": d, "module": module.to(d["device"]), "val_set": val_set, "val_windows": windows,
           "teacher": teacher, "teacher_cache": cache, "sharded": None}  # one whole copy of the weights on each process
    metrics = kit.evaluate(run)
    if d["main"]:
        print(scoring)  # C8: which data, with which config
        report_evaluation(path, weights, metrics)
    return 0


def scored_data(cfg):
    """The windows an evaluation scores, in words (C8): counted on the val split, as evaluate() takes them (40
    examples under data.val_windows 512 are 40 scored, not 512)."""
    total = kit.window_count(cfg, "val")
    scored = len(kit.eval_windows(cfg, total))
    windows = f"every one of {total} rows" if scored == total else f"{scored} of {total} rows"
    data = cfg["data.val_bin"] or f"the built-in corpus's val text ({cfg['data.builtin.val_bytes']} bytes)"
    return f"{windows} of {cfg['data.seq_len']} tokens of {data}"


# ==== shared: evaluate command (identical in probe_evaluate.py and distill_evaluate.py) ====
# --evaluate PATH --config CONFIG (E11): what both scripts' evaluations share; the task's own part is evaluate_saved()
# above. Edit it in probe_evaluate.py, then python tests/shared_blocks.py --write copies it into distill_evaluate.py.
def evaluation_weights(path):
    """What --evaluate PATH names: ("export", dir) for an export directory, else ("checkpoint", file): a run
    directory's best.pt (its last.pt when no eval was ever finite), or a checkpoint file itself."""
    checkpoints = os.path.join(path, "checkpoints")
    if os.path.isdir(checkpoints):
        for name in ("best.pt", "last.pt"):
            if os.path.isfile(os.path.join(checkpoints, name)):
                return "checkpoint", os.path.join(checkpoints, name)
        raise kit.ConfigError([("C3", "--evaluate", f"{path} is a run directory without checkpoints/best.pt or "
                                "last.pt")])
    if any(os.path.isfile(os.path.join(path, n)) for n in ("best.pt", "last.pt")):  # runs/x/checkpoints itself
        raise kit.ConfigError([("E11", "--evaluate", f"{path} is a directory of checkpoints; "
                                f"{evaluation_choices(path)}")])
    if os.path.isdir(path):
        return "export", path
    if os.path.isfile(path):
        return "checkpoint", path
    raise kit.ConfigError([("C3", "--evaluate", f"{path} not found; {evaluation_choices(path)}")])


def run_directory_of(path):
    """The run directory `path` is or lies in (the run dir, its checkpoints/ or a file there, its export/), or None."""
    parent = os.path.dirname(path.rstrip(os.sep)) or "."
    candidates = [path, parent, os.path.dirname(parent) or "."]
    return next((p for p in candidates if os.path.isdir(os.path.join(p, "checkpoints"))), None)


def evaluation_choices(path):
    """E11: the way out of every --evaluate refusal, with the paths of the run that `path` lies in, if any."""
    run = run_directory_of(path)
    if run is None:
        return "give a run directory (runs/<run_name>), a checkpoint (its checkpoints/best.pt) or its export/"
    return (f"give the run directory {run}, a checkpoint such as {os.path.join(run, 'checkpoints', 'best.pt')} or "
            f"the export {os.path.join(run, 'export')}")


def read_checkpoint(path, task):
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive; a log or a text file is none
    try:
        if not zipped:
            raise ValueError("not a file torch.save wrote")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # R7
    except Exception as err:  # a torn file, something that is not a checkpoint: one line, not torch's advice (E11)
        first = str(err).strip().split(". ")[0].splitlines()[0] if str(err).strip() else type(err).__name__
        raise kit.ConfigError([("E11", "--evaluate", f"{path} is not a readable checkpoint ({first}); "
                                f"{evaluation_choices(path)}")]) from None
    if not isinstance(ckpt, dict) or ckpt.get("task") != task or not ("model" in ckpt or ckpt.get("shards")):
        raise kit.ConfigError([("C3", "--evaluate", f"{path} is not a {task} checkpoint of this kit (written by "
                                f"{kit.KIT_TASKS[task]}); {evaluation_choices(path)}")])
    return ckpt


def evaluation_config(config_path, overrides, kind, source):
    """C8/E11: (the config --evaluate scores with, the line saying so): the run's own (a checkpoint's, an export's
    config.yaml) under --config and --set, else --config alone; neither is refused (it would score the defaults)."""
    saved, where = None, None
    if kind == "checkpoint":
        saved, where = read_checkpoint(source, kit.TASK)["config"], source
    elif os.path.isfile(os.path.join(source, "config.yaml")):
        where = os.path.join(source, "config.yaml")
        saved = kit._flatten(kit.read_yaml(where, kit.CONFIG), kit.CONFIG)
    elif not config_path:
        raise kit.ConfigError([("C3", "--evaluate", f"{source} holds no config.yaml, the config of the run it comes "
                                "from (an export written before exports kept it): give that run's, --config "
                                "runs/<run_name>/config.yaml")])
    try:
        cfg, _ = kit.resolve_config(config_path, overrides, base=saved)
    except kit.ConfigError as err:  # E11: the training files an evaluation never reads need not be on this machine
        needed = [p for p in err.problems if not (p[1] in kit.TRAINING_ONLY_FILES and p[2].startswith("file "))]
        if needed:
            raise kit.ConfigError(needed) from None
        cfg, _ = kit.resolve_config(config_path, overrides, check_files=False, base=saved)
    run_cfg = kit.absolute_paths(saved, kit.PATH_KEYS) if saved else {}  # a run saved before paths were absolute
    differ = [f"{k} {v!r} (the run's: {run_cfg[k]!r})" for k, v in cfg.items() if k in run_cfg and v != run_cfg[k]
              and k not in ("launch_dir", "run_name")]
    return cfg, (f"scoring {scored_data(cfg)} with " + (f"the run's config ({where})" if saved else config_path)
                 + (f" + {config_path}" if saved and config_path else "") + (" + --set" if overrides else "")
                 + (f"; not the run's: {', '.join(differ)}" if differ else ""))


def report_evaluation(path, weights, metrics):
    """A line per split for people, then one JSON line for scripts: always the last line of the output."""
    splits = {}
    for key, value in metrics.items():
        split, _, name = key.partition("/")
        splits.setdefault(split, []).append(f"{name} {value:.6g}")
    print(f"evaluated {weights}")
    for split, parts in splits.items():
        print(f"  {split}: " + ", ".join(parts))
    clean = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}  # strict JSON, as metrics.jsonl
    print(json.dumps({"path": path, "weights": weights, **clean}), flush=True)
# ==== end shared: evaluate command ====

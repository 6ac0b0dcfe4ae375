"""--evaluate (E11, C8) for train_distill.py.

Saved weights scored on a config's val windows by the run's own evaluate(), so the numbers are the run's: CE,
perplexity and, with a teacher (or its complete cache), teacher agreement. PATH is a checkpoint, a run directory
(its best.pt) or an export directory (loaded as its users load it: the script's load_export()).

A companion file: train_distill.py loads it (companion() in its shared config block) for --evaluate only, and
hands itself over as `kit`; the data, the networks, the metrics and the refusals are the script's own
(kit.TokenWindows, kit.build_trainable, kit.evaluate, kit.ConfigError).
"""
import os
import sys
import types

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
    kind, source = kit.evaluation_weights(path)
    cfg, scoring = kit.evaluation_config(config_path, overrides, kind, source)  # C8: the run's own unless keys named
    d = kit.setup_distributed(cfg)
    val_set = kit.TokenWindows(cfg, "val")
    windows = kit.eval_windows(cfg, len(val_set))
    offline = cfg["kd.enabled"] and cfg["kd.teacher_cache"] is not None
    teacher = kit.build_teacher(cfg, d["device"]) if cfg["kd.enabled"] and not offline else None
    cache = teacher_cache(cfg, d, val_set, windows) if offline else None
    if kind == "export":
        if not any(os.path.isfile(os.path.join(source, f)) for f in ("model.json", "config.json")):
            raise kit.ConfigError([("C3", "--evaluate", f"{source} holds no model.json or config.json, so it is no "
                                    f"export of train_distill.py; {kit.evaluation_choices(source)}")])
        module, weights = ExportedLM(kit.load_export(source)), f"export {source}"
    else:
        ckpt = kit.read_checkpoint(source, kit.TASK)
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
        kit.report_evaluation(path, weights, metrics)
    return 0

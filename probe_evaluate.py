"""--evaluate and load_export (E11, C8) for train_probe.py.

Saved weights scored on a config's data by the run's own evaluate(), so the numbers are the run's: a
checkpoint, a run directory (its best.pt) or an export directory; the per-window predictions and, with
matplotlib, ROC and confusion-matrix PNGs beside them. load_export() turns an export (head.pt, probe.json, the
backbone reference) back into one module, windows [B, C, T] -> logits.

A companion file: train_probe.py loads it (companion() in its shared config block) for --evaluate and
load_export(), and hands itself over as `kit`; the backbone, the head, the metrics and the refusals are the
script's own (kit.build_backbone, kit.ProbeHead, kit.evaluate, kit.ConfigError), and the export it reads is
the one the script's export_probe() writes at the end of every run. The block `evaluate command` at the end is
byte-identical in distill_evaluate.py (tests/test_shared_blocks.py).
"""
import json
import math
import os
import sys
import types

import numpy as np
import torch
import torch.nn as nn

kit: types.ModuleType  # the training script that loaded this file: companion() sets it before this code runs


class ExportedProbe(nn.Module):
    """Windows [B, C, T] -> logits [B, classes]: the frozen backbone, its features (backbone.output, .pool), the
    head."""

    def __init__(self, backbone, head, cfg):
        super().__init__()
        self.backbone, self.head, self.cfg = backbone, head, cfg

    def forward(self, x):
        return self.head(kit.extract_features(self.backbone, x, x.device, self.cfg))


def head_from_state(cfg, state):
    dim = state["linear.weight"].shape[1]
    head = kit.ProbeHead(dim, cfg["head.num_classes"], torch.zeros(dim), torch.ones(dim), cfg["head.dropout"])
    head.load_state_dict(state)  # the standardisation buffers and the linear layer
    return head


def load_export(export_dir):
    """An export as one module, windows [B, C, T] -> logits, in eval mode (the README's one line)."""
    with open(os.path.join(export_dir, "probe.json")) as f:
        meta = json.load(f)
    cfg = {**{k: default for k, (default, _, _) in kit.CONFIG.items()}, **meta["config"]}
    weights = cfg["backbone.checkpoint"]
    if weights and not os.path.isfile(weights):  # C8: the export refers to the backbone's weights, it holds no copy
        raise kit.ConfigError([("C3", "backbone.checkpoint", f"the export {export_dir} needs the backbone weights "
                                f"{weights}, which are not there: put that file back (or a copy at that path)")])
    state = torch.load(os.path.join(export_dir, meta["file"]), map_location="cpu", weights_only=True)
    model = ExportedProbe(kit.build_backbone(cfg, meta["in_channels"]), head_from_state(cfg, state), cfg).eval()
    model.window_shape = meta.get("window_shape") or [meta["in_channels"], None]  # an older export: the channels
    return model


def check_window_shape(trained, sets, weights):
    """E11: the windows scored have the [channels, samples] the run trained on (None = not recorded). Other
    channels through a channel-agnostic backbone, or other lengths through a pooled one, still give features
    of the head's width, and numbers that mean nothing; the export and the checkpoint are checked alike."""
    for s in sets.values():
        if trained and any(want not in (None, got) for want, got in zip(trained, s.shape[1:])):
            key = f"data.{s.split}_x" if s.x_path else \
                f"data.synthetic.{'channels' if s.shape[1] != trained[0] else 'length'}"
            raise kit.ConfigError([("E11", key, f"{s.x_path or 'synthetic'} holds windows of {s.shape[1]} channels x "
                                    f"{s.shape[2]} samples, {weights} was trained on {trained[0]} x "
                                    f"{trained[1] or '?'}: its backbone and head cannot read them; evaluate windows "
                                    "with the training channels, in their order, and the training window length")])


def evaluate_saved(config_path, overrides, path):
    """--evaluate PATH: AUROC, balanced accuracy and loss on the run's (or the config's) val and test splits."""
    kind, source = evaluation_weights(path)
    # C8: the run's own config unless keys are named
    cfg, scoring = evaluation_config(config_path, overrides, kind, source)
    d = kit.setup_distributed(cfg)
    sets = {split: kit.WindowSet(cfg, split) for split in ("val", "test") if split == "val" or cfg["data.test_x"]}
    if kind == "export":
        if not os.path.isfile(os.path.join(source, "probe.json")):
            raise kit.ConfigError([("C3", "--evaluate", f"{source} holds no probe.json, so it is no export of "
                                    f"train_probe.py; {evaluation_choices(source)}")])
        model = load_export(source)
        model_cfg = {**cfg, **kit.model_config(model.cfg)}
        backbone, head, weights = model.backbone, model.head, f"export {source}"
        trained = model.window_shape
    else:
        ckpt = read_checkpoint(source, kit.TASK)
        model_cfg = {**cfg, **kit.model_config(ckpt["config"])}  # the network as trained; the data: evaluation_config
        trained = (ckpt.get("inputs") or {}).get("window shape")  # None in a checkpoint older than E11's check
        weights = f"{source} (step {ckpt['global_step']})"
        backbone = kit.build_backbone(model_cfg, trained[0] if trained else sets["val"].shape[1])
        head = head_from_state(model_cfg, ckpt["model"])
    check_window_shape(trained, sets, weights)  # E11: one rule for the export and the checkpoint
    backbone = backbone.to(d["device"])
    dim = kit.check_backbone(backbone, model_cfg, d["device"], sets.values())[1].shape[1]
    if dim != head.linear.in_features:
        raise kit.ConfigError([("C3", "--evaluate", f"the backbone gives {dim} features, the head in {source} takes "
                                f"{head.linear.in_features}; evaluate with the config the run trained with")])
    run = {"cfg": model_cfg, "dist": d, "module": head.to(d["device"]), "backbone": backbone, "bar": None,
           "quiet": True, "log_file": sys.stderr, "eval_sources": {k: (s, s.labels) for k, s in sets.items()},
           "predictions": {}}
    metrics = {}
    for split in sets:
        metrics.update(kit.evaluate(run, split))
    if d["main"]:
        print(scoring)  # C8: which data, with which config
        write_predictions(evaluation_out_dir(path), {k: (s.labels, run["predictions"][k]) for k, s in sets.items()})
        report_evaluation(path, weights, metrics)
    return 0


def evaluation_out_dir(path):
    """Where --evaluate's per-window files go: <run dir>/evaluation/ for a path in a run (the run directory,
    its checkpoints/*.pt, its export/), else evaluation/ in the directory named or holding the path."""
    run = run_directory_of(path)
    return os.path.join(run or (path if os.path.isdir(path) else os.path.dirname(path) or "."), "evaluation")


def write_predictions(out, splits):
    """E11: what braindecode and scikit-learn users look at beside the numbers: <split>_predictions.csv (index,
    label, the argmax prediction, the score: P(last class), every class's probability with more than two) and,
    when matplotlib is installed, <split>_roc.png and <split>_confusion.png. One line says where."""
    try:
        os.makedirs(out, exist_ok=True)
        for split, (labels, probs) in splits.items():
            two = probs.shape[1] == 2
            scores = ["score"] if two else [f"score_{c}" for c in range(probs.shape[1])]
            header = ",".join(["index", "label", "prediction", *scores])
            # 9 digits: the float32 probabilities exactly, so the CSV's AUROC is the printed one to the last bit
            rows = [f"{i},{y},{p.argmax()}," + (f"{p[1]:.9g}" if two else ",".join(f"{v:.9g}" for v in p))
                    for i, (y, p) in enumerate(zip(labels.tolist(), probs))]
            kit.atomic_write_text(os.path.join(out, f"{split}_predictions.csv"), "\n".join([header, *rows]) + "\n")
        plotted = plot_evaluation(out, splits)
    except OSError as err:
        print(f"per-window predictions not written: {out}: {err.strerror or err}", flush=True)
        return
    names = ", ".join(f"{s}_predictions.csv" + (f", {s}_roc.png, {s}_confusion.png" if plotted else "") for s in splits)
    print(f"per-window predictions: {out}/ ({names})" + ("" if plotted else "; ROC and confusion-matrix PNGs need "
                                                          "matplotlib, which is not installed"), flush=True)


def roc_curve_points(scores, positive):
    """(false positive rate, true positive rate) at every distinct score, highest first, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    last = np.r_[np.flatnonzero(scores[1:] != scores[:-1]), len(scores) - 1]  # the end of each tie group
    tp, fp = np.cumsum(positive)[last], np.cumsum(~positive)[last]
    return np.r_[0, fp / max(fp[-1], 1)], np.r_[0, tp / max(tp[-1], 1)]


def plot_evaluation(out, splits):
    """<split>_roc.png (one-vs-rest per class with more than two) and <split>_confusion.png; False without
    matplotlib (never required). matplotlib's object API: no pyplot state, no display."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    for split, (labels, probs) in splits.items():
        fig = Figure(figsize=(4.5, 4.5))
        ax = fig.subplots()
        for c in [probs.shape[1] - 1] if probs.shape[1] == 2 else range(probs.shape[1]):
            fpr, tpr = roc_curve_points(probs[:, c], labels == c)
            ax.plot(fpr, tpr, label=f"class {c}: AUROC {kit.auroc(probs[:, c], labels == c):.4f}")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{split} ROC ({len(labels)} windows)")
        ax.legend(loc="lower right")
        fig.savefig(os.path.join(out, f"{split}_roc.png"), dpi=100, bbox_inches="tight")
        n = probs.shape[1]
        counts = np.zeros((n, n), np.int64)
        np.add.at(counts, (labels, probs.argmax(1)), 1)
        fig = Figure(figsize=(4, 4))
        ax = fig.subplots()
        ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(counts.max()), 1))
        for (i, j), v in np.ndenumerate(counts):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > counts.max() / 2 else "black")
        ax.set(xticks=range(n), yticks=range(n), xlabel="predicted class", ylabel="true class",
               title=f"{split} confusion (bacc {kit.balanced_accuracy(probs.argmax(1), labels):.4f})")
        fig.savefig(os.path.join(out, f"{split}_confusion.png"), dpi=100, bbox_inches="tight")
    return True


def scored_data(cfg):
    """The windows an evaluation scores, in words (C8)."""
    if cfg["data.val_x"] is None:
        return f"the synthetic windows (data.synthetic.*, seed {cfg['seed']})"
    return f"val {cfg['data.val_x']}" + (f", test {cfg['data.test_x']}" if cfg["data.test_x"] else "")


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

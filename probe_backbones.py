"""Your own backbone for train_probe.py: backbone.target, backbone.checkpoint, backbone.output, backbone.pool (C3, R7,
R11; docs/probe-backbones.md).

What the built-in encoder never needs: a state-dict file loaded into the backbone whatever its wrapper and name
prefix (Lightning, DDP), the features picked out of a tuple, dict or ModelOutput, pooled to [B, D] as
backbone.pool says, the messages that name the pool values that fit a shape and the model's own frame an error
came from, and the hash of the user's build file (R11).

A companion file: train_probe.py loads it (companion() in its shared config block, through backbones() in
resolve_config()) when any of those keys is set, and hands itself over as `kit`; the refusals are the script's
ConfigError, and the script keeps the paths the built-in encoder takes (one tensor [B, D], no pool).
"""
import os
import sys
import traceback
import types

import torch

kit: types.ModuleType  # the training script that loaded this file: companion() sets it before this code runs


def load_backbone_checkpoint(backbone, path):
    """A state dict (name -> tensor), plain or inside a dict under state_dict (Lightning), model_state_dict or
    model. Names may carry a prefix (Lightning's "model." or "backbone.", DDP's "module."): the one prefix that
    leaves exactly the backbone's names is stripped. Loaded with weights_only=True: no code runs (R7)."""
    key = "backbone.checkpoint"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        detail = next((line.strip() for line in str(err).split("WeightsUnpickler error:")[-1].splitlines()
                       if line.strip()), type(err).__name__)
        if "Unsupported global" in detail:
            raise kit.ConfigError([("R7", key, f"{path} holds pickled Python objects, which torch.load("
                                    f"weights_only=True) refuses ({detail.split(' was not')[0]}); if you trust the "
                                    f"file, convert it once: python -c \"import torch; c = torch.load('{path}', "
                                    "weights_only=False); torch.save(c.get('state_dict', c) if isinstance(c, dict) "
                                    "else c.state_dict(), 'backbone_weights.pt')\" and set backbone.checkpoint to "
                                    "backbone_weights.pt")]) from None
        raise kit.ConfigError([("C3", key, f"{path} is not a readable torch checkpoint ({detail})")]) from None
    if isinstance(state, dict) and not all(torch.is_tensor(v) for v in state.values()):
        inner = next((state[k] for k in ("state_dict", "model_state_dict", "model")
                      if isinstance(state.get(k), dict)), None)
        if inner is None:
            raise kit.ConfigError([("C3", key,
                                    f"{path} is a dict with keys {sorted(map(str, state))[:8]} and no state dict "
                                    "(name -> tensor) under state_dict, model_state_dict or model")])
        state = inner
    if not isinstance(state, dict) or not state:
        raise kit.ConfigError([("C3", key, f"{path} holds a {type(state).__name__}, not a state dict "
                                "(name -> tensor)")])
    want = set(backbone.state_dict())
    anchors = sorted(want)[:3]
    prefixes = {""} | {name[:-len(a)] for name in state for a in anchors if name.endswith("." + a)}
    for prefix in sorted(prefixes, key=len):
        found = {name[len(prefix):]: value for name, value in state.items() if name.startswith(prefix)}
        if set(found) == want:
            break
    else:
        missing, extra = sorted(want - set(state)), sorted(set(state) - want)
        raise kit.ConfigError([("C3", key, f"{path} does not fit the backbone: {len(missing)} of its {len(want)} "
                                f"tensors missing (e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}), "
                                "and no name prefix such as 'model.' or 'backbone.' fixes it; check backbone.target "
                                "and backbone.kwargs")])
    bad = next((name for name, t in found.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad:  # C9: every feature would be NaN: G4 aborts the run after the whole feature cache, blaming the data
        raise kit.ConfigError([("C9", key, f"{path}: tensor {bad} holds NaN or inf (weights saved after a pretraining "
                                "diverged?); every feature would be NaN: give a checkpoint from before that")])
    try:
        backbone.load_state_dict(found)
    except RuntimeError as err:  # a shape mismatch: "size mismatch for conv.weight: copying a param with shape ..."
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise kit.ConfigError([("C3", key, f"{path} does not fit the backbone: {detail}")]) from None


POOL_CHOICES = ("mean_tokens ([B, N, D] -> mean over N), mean_time ([B, D, T] -> mean over T), cls (token 0 of "
                "[B, N, D]) or flatten")


def pool_choices(shape):
    """The backbone.pool values that work for a feature shape, for the messages: 3-D outputs are tokens or a
    time series; 4-D [B, F, T, 1] / [B, F, 1, T] (braindecode's ShallowFBCSPNet, Deep4Net, EEGNet) a time
    series with a singleton axis, which mean_time averages; anything else only flattens."""
    if len(shape) == 3:
        return POOL_CHOICES
    if len(shape) == 4 and 1 in shape[2:]:
        return f"mean_time ([B, {', '.join(map(str, shape[1:]))}] -> mean over its time axis) or flatten"
    return "flatten"


def feature_tensor(out, output):
    """The features in a backbone's output, by one rule: a tensor is itself; a tuple or list gives its first
    element (Hugging Face's return_dict=False order); a dict or a ModelOutput (a dict whose None fields are
    not keys) gives last_hidden_state, else its only tensor. backbone.output names another key or index."""
    if torch.is_tensor(out):
        if output is not None:
            raise kit.ConfigError([("C3", "backbone.output",
                                    f"is {output!r} but the backbone returns one tensor; set it to null")])
        return out
    if isinstance(out, dict):
        tensors = {k: v for k, v in out.items() if torch.is_tensor(v)}
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items())
        if output is not None:
            if output not in tensors:
                raise kit.ConfigError([("C3", "backbone.output", f"{output!r} is not a tensor key of the backbone's "
                                        f"{type(out).__name__} (tensors: {shapes or 'none'})")])
            pick = tensors[output]
        elif "last_hidden_state" in tensors or len(tensors) == 1:
            pick = tensors.get("last_hidden_state", next(iter(tensors.values())))
        else:
            raise kit.ConfigError([("C3", "backbone.output", f"the backbone returns a {type(out).__name__} with "
                                    f"tensors {shapes or 'none'}; set backbone.output to the key of the features")])
        where = f"key {output!r} (keys: {shapes})"
    elif isinstance(out, (tuple, list)):
        index = 0 if output is None else int(output) if str(output).lstrip("-").isdigit() else None
        if index is None or not -len(out) <= index < len(out):
            raise kit.ConfigError([("C3", "backbone.output",
                                    f"is {output!r} but the backbone returns a {type(out).__name__} "
                                    f"of {len(out)} items; give an index from 0 to {len(out) - 1}")])
        pick, where = out[index], f"item {index} of {len(out)}"
    else:
        raise kit.ConfigError([("C3", "backbone.target", f"the backbone returns a {type(out).__name__}; expected a "
                                "tensor, a tuple/list, a dict or a ModelOutput")])
    if not torch.is_tensor(pick):
        raise kit.ConfigError([("C3", "backbone.output", f"the backbone output's {where} is a {type(pick).__name__}, "
                                "not a tensor; set backbone.output to the key or index of the features")])
    return pick


def pool_features(feats, pool):
    """[B, ...] -> [B, D] as backbone.pool says. A non-2-D output is never pooled by a guess: [B, N, D] tokens
    and [B, D, T] time series are both 3-D, and pooling the wrong axis still trains, badly."""
    if pool is None:
        if feats.ndim != 2:
            raise kit.ConfigError([("C3", "backbone.pool", f"is null but the backbone's features have shape "
                                    f"{tuple(feats.shape)}, not [B, D]; set backbone.pool to "
                                    f"{pool_choices(feats.shape)}")])
        return feats
    if pool == "flatten":  # C3: a [B] output (one number a window), which pool_choices offers it, too: [B, 1]
        return feats.reshape(len(feats), -1)
    if pool == "mean_time" and feats.ndim == 4 and 1 in feats.shape[2:]:
        return feats.flatten(2).mean(2)  # [B, F, T, 1] or [B, F, 1, T]: the singleton axis is not time
    if feats.ndim != 3:
        raise kit.ConfigError([("C3", "backbone.pool", f"{pool} needs a 3-D output but the features have shape "
                                f"{tuple(feats.shape)}; set backbone.pool to {pool_choices(feats.shape)}"
                                + (", or null for a [B, D] output" if feats.ndim != 2 else
                                   " (or null: it is [B, D])"))])
    if pool == "mean_tokens":
        return feats.mean(1)
    if pool == "mean_time":
        return feats.mean(2)
    return feats[:, 0]  # cls


def model_code_frame(err):
    """Where a model's own code (not torch's, not the kit's: the script's or this file's) raised err or called
    what raised it: the innermost such frame of the traceback as 'Class.forward (file.py:line)', or None."""
    torch_dir, found = os.path.dirname(torch.__file__), None
    kit_files = {os.path.abspath(kit.__file__), os.path.abspath(__file__)}
    for frame, line in traceback.walk_tb(err.__traceback__):
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(torch_dir + os.sep) and path not in kit_files:
            found = f"{getattr(frame.f_code, 'co_qualname', frame.f_code.co_name)} ({os.path.basename(path)}:{line})"
    return found


def build_file(cfg):
    """R11: the user's build file, the module file of backbone.target ('mymod:build' -> mymod.py), hashed. Not
    the file that defines the returned class (braindecode's deep4.py for a Deep4Net that mymod.py builds): an
    edit of mymod.py changes the features just as well. Compared by content (the path is for messages: a moved
    project is the same backbone)."""
    kit.import_target(cfg["backbone.target"], "backbone.target", cfg["launch_dir"])
    path = getattr(sys.modules[cfg["backbone.target"].partition(":")[0]], "__file__", None)
    return {"path": path, "sha256": kit.code_sha256(path)}

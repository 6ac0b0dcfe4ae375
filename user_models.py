"""A user's own network (student.target, teacher.target: 'package.module:callable') for train_distill.py.

The callable's nn.Module behind the kit's language-model interface (TargetLM: token ids -> logits and, on
request, hidden states), checked once at build with one forward (target_lm): logits of the vocabulary's size,
hidden states when the hidden-state term needs them. A callable that returns a Hugging Face model is driven as
one (hf_models.py). docs/distill_models.md says what the forward may return.

A companion file: train_distill.py loads it (companion() in its shared config block, through user_models()) when
a config names a callable, or a teacher checkpoint holds a user's module, and hands itself over as `kit`.
"""
import sys
import types

import torch
import torch.nn as nn

kit: types.ModuleType  # the training script that loaded this file: companion() sets it before this code runs


class TargetLM(nn.Module):
    """A user's nn.Module (student.target, teacher.target) behind the same interface. Its forward takes
    token ids [B, T] and returns logits [B, T, vocab]; or a tuple/list (logits, hidden [B, T, D], ...); or
    an object or dict with logits (and hidden_states, whose last entry is taken). Hidden states are
    needed only with kd.gamma > 0; width is read from them when the module returns them. No KV cache: generation
    reruns the whole prefix for each new token."""
    kv_cache = False

    def __init__(self, model, hidden):
        super().__init__()
        self.model, self.hidden, self.width, self.layers, self.depth = model, bool(hidden), None, None, None

    def forward(self, idx, positions=None):  # positions: never given, packing_check refuses data.packing (C10)
        out = self.model(idx)
        logits, hidden = kit.split_outputs(out)
        if self.layers is not None:
            states = kit.layer_states(out)
            return logits, [states[i] for i in self.layers]
        return logits, (hidden if self.hidden else None)


def is_hf_model(module):
    return "transformers" in sys.modules and isinstance(module, sys.modules["transformers"].PreTrainedModel)


def target_lm(cfg, arch, key, who, hidden):
    """The user's module from its callable, checked with one forward of a [1, data.seq_len] batch of
    token ids in eval mode without gradients (no dropout, no RNG draw): logits of the vocabulary's size
    and, with kd.gamma > 0, hidden states; their width sizes the projection. A callable returning a
    Hugging Face model is driven as one (use_cache=False, hidden states on request, its position limit)."""
    module = kit.import_target(arch["target"], key, cfg["launch_dir"])(**arch["kwargs"])
    if not isinstance(module, nn.Module):
        raise kit.ConfigError([("C3", key, f"{arch['target']} returned a {type(module).__name__}, not a "
                                "torch.nn.Module")])
    module = module.float()
    if is_hf_model(module):
        fix = f"make {arch['target']} return a module that is not a transformers model"
        return kit.hf_models(key, fix).hf_lm(module, cfg, key, who, hidden)
    lm, seq_len, vocab = TargetLM(module, hidden), cfg["data.seq_len"], kit.vocab_size(cfg)
    mode = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, seq_len, dtype=torch.long))
            (logits, states), every = kit.split_outputs(out), kit.layer_states(out)
    except Exception as err:  # a position table shorter than data.seq_len, a wrong input convention, ...
        raise kit.ConfigError([("C3", key, f"{arch['target']} fails on token ids of shape [1, data.seq_len={seq_len}]"
                                f" ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]})")]) from None
    module.train(mode)
    if not torch.is_tensor(logits) or tuple(logits.shape) != (1, seq_len, vocab):
        shape = list(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise kit.ConfigError([("C3", key,
                                f"{arch['target']} returns logits {shape} for token ids [1, {seq_len}], expected "
                                f"[1, {seq_len}, {vocab}] (data.vocab_size {vocab}); see docs/distill_models.md")])
    if every is not None:  # every layer's state: kd.hidden_layers may pick among them
        lm.depth, lm.widths = len(every) - 1, [h.shape[-1] for h in every]
    if torch.is_tensor(states) and states.dim() == 3 and tuple(states.shape[:2]) == (1, seq_len):
        lm.width = states.shape[-1]
    elif hidden:
        raise kit.ConfigError([("C3", "kd.gamma",
                                f"{cfg['kd.gamma']!r} needs hidden states from {who}, but {arch['target']} "
                                "returns none [B, T, D]; return (logits, hidden) from its forward, or set kd.gamma=0")])
    return lm

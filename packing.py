"""Packing (data.packing, C10) for train_distill.py.

Examples prepared by prepare_text.py packed several to a row of data.seq_len + 1 tokens, first-fit in data order,
with no token attending across examples: a block-diagonal causal mask and each example's own positions (the
built-in GPT and Hugging Face models; a user module cannot be told where a row's examples start and is refused).
The rows' targets, the loss and its token weighting are the script's, the same as with one example a row (G2).

A companion file: train_distill.py loads it (companion() in its shared config block, through packing()) when
data.packing is true, and hands itself over as `kit`.
"""
import types

import numpy as np
import torch

kit: types.ModuleType  # the training script that loaded this file: companion() sets it before this code runs

FIX = "set data.packing false"


def packing_problems(cfg, examples_known):
    """C10: what cannot be packed (nothing but prepared examples can), as the script's config problems.
    examples_known: the token files passed their checks, so the train split's example bounds can be read."""
    problems = []
    if cfg["data.train_bin"] is None:
        problems.append(("C10", "data.packing", "true, but the built-in corpus holds no examples (its windows are full "
                         f"already); {FIX}"))
    elif examples_known and kit.example_bounds(cfg, "train") is None:
        problems.append(("C10", "data.packing", f"true, but {cfg['data.train_bin']} holds no examples prepared by "
                         f"prepare_text.py (a token stream's windows are full already); {FIX}"))
    if kit.on_policy_used(cfg):
        problems.append(("C10", "data.packing", "true, but micro-batches are generated (kd.on_policy_fraction > 0 or "
                         f"kd.seq_kd): each example continues its own prompt, one example a row; {FIX}"))
    return problems


def first_fit_rows(lengths, room):
    """The row of each example (lengths, in data order): first-fit, each example into the first row with room for
    it; a tree of the rows' free room finds it in log(rows) steps."""
    row_of = np.arange(len(lengths))
    leaves = 1 << max(1, len(lengths)).bit_length()
    free = [room] * (2 * leaves)  # the most room left in any row below each node of the tree
    for i, n in enumerate(lengths.tolist()):
        node = 1
        while node < leaves:
            node = 2 * node + (free[2 * node] < n)
        row_of[i], free[node] = node - leaves, free[node] - n
        while node > 1 and free[node // 2] != max(free[node], free[node ^ 1]):
            node //= 2
            free[node] = max(free[2 * node], free[2 * node + 1])
    return row_of


def block_causal_mask(positions):
    """[B, 1, T, T], True where token i of a packed row attends to token j: j <= i in i's own example, which
    starts positions[i] tokens before i."""
    i = torch.arange(positions.shape[1], device=positions.device)
    return ((i[None, None, :] <= i[None, :, None]) & (i[None, None, :] >= (i - positions)[:, :, None]))[:, None]


def packing_check(lm, cfg, key, who):
    """The built-in GPT keeps a packed row's examples apart itself; a user module (ids -> logits) cannot be told
    where examples start: refused; a Hugging Face model is checked by hf_models.py's packing_probe()."""
    if isinstance(lm, kit.GPT):
        return lm
    if kit.is_user_lm(lm):
        raise kit.ConfigError([("C10", "data.packing", f"true, but {who} ({key}) is a user module (token ids -> "
                                f"logits) that cannot be told where a packed row's examples start; {FIX} (one "
                                "example a row, padded)")])
    return kit.hf_models(key).packing_probe(lm, cfg, key, who, f"{FIX} (one example a row, padded)")

"""The chunked loss (kd.chunk_tokens, D6) for train_distill.py.

A loss that never holds the whole vocabulary (kd.chunk_tokens): the head, CE and KD terms computed a
chunk of positions at a time from the last hidden states, as Liger Kernel's fused distillation losses do,
with the kit's own loss functions on each chunk, so the numbers are the unchunked path's up to the order
of the sums. ChunkedLoss takes each chunk's gradient in the forward and keeps it, so a chunk's logits are
freed before the next chunk's and never recomputed: the peak holds chunk x vocab logits (student and
teacher), never batch x seq x vocab.

A companion file: train_distill.py loads it (companion() in its shared config block) when kd.chunk_tokens is
set, and hands itself over as `kit`; the loss terms here are the script's own (kit.token_cross_entropy,
kit.kd_kl, kit.kd_kl_topk), so the numbers are the unchunked path's up to the order of the sums.
"""
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

kit: types.ModuleType  # the training script that loaded this file: companion() sets it before this code runs


def chunk_problems(cfg):
    """objective_problems() of kd.chunk_tokens (C3): a distillation's other divergences and layer maps."""
    kind = cfg["kd.divergence"]
    if cfg["kd.enabled"] and (kind != "forward_kl" or (cfg["kd.hidden_layers"] and cfg["kd.gamma"] > 0)):
        what = f"kd.divergence {kind}" if kind != "forward_kl" else "kd.hidden_layers"
        return [("C3", "kd.chunk_tokens", f"{cfg['kd.chunk_tokens']!r}: the chunked loss computes forward KL on the "
                 f"last hidden state only, not {what}; set kd.chunk_tokens=0")]
    return []


def linear_head(lm, key):
    """(weight [V, D], bias or None) of a network whose logits are its last hidden state times a matrix: the
    built-in GPT (tied embedding), a Hugging Face causal LM without logit scaling or soft-capping."""
    if isinstance(lm, kit.GPT):
        return lm.wte.weight, None
    if kit.is_hf_lm(lm):
        config = lm.model.config.get_text_config()
        scaled = [f"config.{n} {getattr(config, n)!r}" for n in ("final_logit_softcapping", "logit_scale",
                                                                 "logits_scaling")
                  if getattr(config, n, None) not in (None, 1, 1.0)]
        head = lm.model.get_output_embeddings()
        if isinstance(head, nn.Linear) and not scaled:
            return head.weight, head.bias
        why = f"its {scaled[0]} changes the logits after the head" if scaled else "its head is not a Linear"
    else:
        why = "a user module's logits are not known to be a linear map of a hidden state"
    raise kit.ConfigError([("D6", "kd.chunk_tokens", f"{key}: {why}; set kd.chunk_tokens=0")])


def chunk_terms(hidden, weight, bias, targets, real, teacher, online, alpha, beta, temperature, top_k):
    """CE and KD sums of one chunk of positions ([n, D] hidden states): the head, then the same
    token_cross_entropy, kd_kl and kd_kl_topk the unchunked loss runs. teacher: online, its hidden states
    [n, D'] and head (weight, bias); offline, the cached top-k of these positions (log p, ids, log p of the rest)."""
    logits = F.linear(hidden, weight, bias)[None]
    zero = logits.new_zeros((), dtype=torch.float32)
    ce = kit.token_cross_entropy(logits, targets[None]) if alpha > 0 else zero
    if beta == 0:
        return ce, zero
    if online:
        with torch.no_grad():
            t_logits = F.linear(*teacher)[None]
        kl = kit.kd_kl(logits, t_logits, temperature, top_k)
    else:
        kl = kit.kd_kl_topk(logits, *(t[None] for t in teacher), temperature)
    return ce, torch.where(real[None], kl, 0.0).sum()


def chunked_scores(hidden, head, targets, chunk):
    """Eval without gradient (D6): (summed token CE, or None without targets; the first-ranked ids [B, T]) of
    [B, T, D] hidden states through the head, `chunk` positions at a time."""
    flat, ce, ids = hidden.flatten(0, 1), 0.0, []
    for start in range(0, flat.shape[0], chunk):
        logits = F.linear(flat[start:start + chunk], *head)[None]
        if targets is not None:
            ce = ce + kit.token_cross_entropy(logits, targets.flatten()[start:start + chunk][None])
        ids.append(kit.first_token(logits)[0])
    return (ce if targets is not None else None), torch.cat(ids).view(hidden.shape[:2])


class ChunkedLoss(torch.autograd.Function):
    """D6: weight_ce x CE + weight_kd x KD over every position, a chunk at a time, each chunk's gradient taken
    in the forward (autograd through the same chunk_terms) and kept, as Liger Kernel's fused linear losses do:
    the backward only scales what was kept, so no chunk's logits outlive its own step or are recomputed.
    Returns (total, CE sum, KD sum); only total is differentiable (the other two are for the log)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, teacher, online, weights, temperature, top_k, chunk):
        flat, targets = hidden.detach().flatten(0, 1), targets.flatten()
        real = targets != kit.IGNORE
        per_position = (teacher[0].flatten(0, 1),) if online else tuple(t.flatten(0, 1) for t in teacher)
        shared = tuple(teacher[1:]) if online else ()
        params = [p.detach() for p in (weight, bias) if p is not None]
        grad_hidden, grad_params = torch.zeros_like(flat), [torch.zeros_like(p) for p in params]
        ce = kd = torch.zeros((), dtype=torch.float32, device=flat.device)
        for start in range(0, flat.shape[0], chunk):
            part = slice(start, start + chunk)
            with torch.enable_grad():
                h, ps = flat[part].requires_grad_(), [p.requires_grad_() for p in params]
                c, k = chunk_terms(h, ps[0], ps[1] if bias is not None else None, targets[part], real[part],
                                   tuple(t[part] for t in per_position) + shared, online, *weights, temperature, top_k)
                total = weights[0] * c + weights[1] * k
                grads = torch.autograd.grad(total, [h, *ps]) if total.requires_grad else [None] * (1 + len(ps))
            if grads[0] is not None:
                grad_hidden[part] = grads[0]
                for acc, g in zip(grad_params, grads[1:]):
                    acc += g
            ce, kd = ce + c.detach(), kd + k.detach()
        ctx.save_for_backward(grad_hidden.view_as(hidden), *grad_params)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(ce, kd)
        return weights[0] * ce + weights[1] * kd, ce, kd

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        grad_hidden, grad_weight, *grad_bias = ctx.saved_tensors
        bias = grad_bias[0] * grad_total if ctx.has_bias else None
        return grad_hidden * grad_total, grad_weight * grad_total, bias, None, None, None, None, None, None, None


def chunked_terms(hidden, head, targets, teacher, online, alpha, beta, temperature, top_k, chunk):
    """(alpha x CE + beta x KD, CE sum, KD sum) over every position of [B, T, D] hidden states, `chunk`
    positions at a time (D6); the first is what the backward runs through."""
    return ChunkedLoss.apply(hidden, head[0], head[1], targets, tuple(teacher), online, (alpha, beta), temperature,
                             top_k, chunk)


def make_chunked_loss(run):
    """D6: chunked_loss(model, batch), the loss train_distill.py's make_loss() uses with kd.chunk_tokens set."""
    cfg, teacher = run["cfg"], run["teacher"]
    cache = run.get("teacher_cache")
    alpha, beta, gamma = cfg["kd.alpha"], cfg["kd.beta"], cfg["kd.gamma"]
    temperature, top_k = cfg["kd.temperature"], cfg["kd.top_k"]
    chunk, key = cfg["kd.chunk_tokens"], kit.trained_key(cfg)

    def chunked_loss(model, batch, on_policy=False):  # D6: make_loss()'s terms, never a [batch, seq, vocab] tensor
        """on_policy (E14): on_policy.py's loss of a micro-batch the student wrote, the divergence alone on the
        generated tokens y marks."""
        x, y, pos, cached = kit.batch_parts(batch, run["train_set"].packed)  # C10: packed rows carry positions
        hidden, projected = model(x, project=teacher is not None and gamma > 0, logits=False, positions=pos)
        head = linear_head(run["module"].lm, key)  # read after the forward: FSDP swaps the parameters it gathers
        if teacher is None and cache is None:
            return chunked_terms(hidden, head, y, (), False, 1.0, 0.0, temperature, top_k, chunk)[0], {}
        t_hidden, online = None, False
        if not cached and (beta > 0 or gamma > 0):
            with torch.no_grad():
                _, t_hidden = teacher(x, logits=False, positions=pos)
            online = beta > 0
        side = tuple(cached) if cached else (t_hidden, *linear_head(teacher, "the teacher")) if online else ()
        weight_ce = 0.0 if on_policy else alpha
        total, ce, kd = chunked_terms(hidden, head, y, side, online, weight_ce, beta * temperature ** 2, temperature,
                                      top_k, chunk)
        parts = {"ce": alpha * ce} if weight_ce > 0 else {}  # G8: chunk_terms computed no CE at kd.alpha 0
        if beta > 0:
            parts["kd"] = beta * temperature ** 2 * kd
        if gamma > 0 and on_policy:  # E14: the projection scores nothing; at weight 0 DDP needs no unused search
            total = total + 0.0 * projected.float().sum()
        elif gamma > 0:
            parts["hidden"] = gamma * torch.where(y != kit.IGNORE, kit.hidden_loss(projected, t_hidden), 0.0).sum()
            total = total + parts["hidden"]
        return total, parts

    return chunked_loss

"""The divergences beside forward KL (kd.divergence: reverse_kl, jsd, skew_kl, tvd; E12, E13) for train_distill.py.

D(p, q) between the teacher's p = softmax(teacher / T) and the student's q = softmax(student / T), both at the same
temperature, on the full vocabulary or coarsened to the teacher's top-k tokens + one bucket (kd.top_k, a top-k
kd.teacher_cache) where the divergence allows it (the script's topk_allows(), E12). Forward KL, the default, is
the script's own kd_kl / kd_kl_topk; the scale that keeps the gradient's size independent of T is its
divergence_scale().

A companion file: train_distill.py loads it (companion() in its shared config block, through divergences()) when
a distillation's kd.divergence is not forward_kl, and hands itself over as `kit`.
"""
import math
import types

import torch
import torch.nn.functional as F

kit: types.ModuleType  # the training script that loaded this file: companion() sets it before this code runs


def kd_divergence(student_logits, kind, temperature, teacher_logits, top_k, cached, jsd_beta, skew_alpha, log_q):
    """The script's kd_divergence() for a kind other than forward_kl, in fp32 whatever the autocast dtype (G6)."""
    with torch.autocast(student_logits.device.type, enabled=False):
        log_q = kit.log_probs(student_logits, temperature) if log_q is None else log_q  # E13: the student at T ...
        if cached is None and top_k is None:
            log_p = F.log_softmax(teacher_logits.float() / temperature, -1)  # ... and the teacher at the same T
        else:
            assert kit.topk_allows(kind, jsd_beta), kind  # E12: resolve_config refuses the combination
            log_p, log_q = coarsen(log_q, *(cached or kit.teacher_topk(teacher_logits, temperature, top_k)))
        return divergence(log_p, log_q, kind, jsd_beta, skew_alpha)


def divergence(log_p, log_q, kind, jsd_beta=0.5, skew_alpha=0.1):
    """D(p, q) per position, summed over the last dimension of fp32 log-probabilities (the vocabulary, or the
    k + 1 outcomes of top-k KD). The published formulas:
      forward_kl  KL(p || q) = sum p (log p - log q)                    (Hinton et al.; mean-seeking)
      reverse_kl  KL(q || p)                                            (MiniLLM; mode-seeking)
      jsd         b KL(p || m) + (1 - b) KL(q || m), m = b p + (1 - b) q, b = kd.jsd_beta; b = 0 is forward KL
                  and b = 1 reverse KL, exactly (GKD, eq. 1; TRL's GKDTrainer.generalized_jsd_loss)
      skew_kl     KL(p || a p + (1 - a) q), a = kd.skew_alpha; a = 0 is forward KL (DistiLLM's skew KL)
      tvd         (1/2) sum |p - q|                                      (total variation)
    A zero probability contributes 0, not nan (xlogy_ratio)."""
    if kit.is_forward_kl(kind, jsd_beta, skew_alpha):
        return kit.xlogy_ratio(log_p, log_q).sum(-1)
    if kind == "reverse_kl" or (kind == "jsd" and jsd_beta == 1):
        return kit.xlogy_ratio(log_q, log_p).sum(-1)
    if kind == "jsd":
        log_m = torch.logaddexp(log_p + math.log(jsd_beta), log_q + math.log1p(-jsd_beta))
        return jsd_beta * kit.xlogy_ratio(log_p, log_m).sum(-1) + (1 - jsd_beta) * kit.xlogy_ratio(log_q, log_m).sum(-1)
    if kind == "skew_kl":
        log_m = torch.logaddexp(log_p + math.log(skew_alpha), log_q + math.log1p(-skew_alpha))
        return kit.xlogy_ratio(log_p, log_m).sum(-1)
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise AssertionError(f"unknown divergence {kind}")


def coarsen(log_q, log_p_top, index, log_rest):
    """(log p, log q) over the k + 1 outcomes of top-k KD: the teacher's top-k tokens and one bucket for all
    the others (each model's exact remaining mass, a logsumexp over the excluded logits); the bucket is left
    out when empty (k = vocab), whose logsumexp of nothing would put nan into the gradient."""
    log_q_top = log_q.gather(-1, index)
    if index.shape[-1] == log_q.shape[-1]:
        return log_p_top, log_q_top
    rest_q = log_q.scatter(-1, index, float("-inf")).logsumexp(-1)
    return torch.cat([log_p_top, log_rest.unsqueeze(-1)], -1), torch.cat([log_q_top, rest_q.unsqueeze(-1)], -1)

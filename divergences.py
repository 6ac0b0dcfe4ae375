"""The divergences beside forward KL (kd.divergence: reverse_kl, jsd, skew_kl, tvd; E12, E13) for train_distill.py.

D(p, q) between the teacher's p = softmax(teacher / T) and the student's q = softmax(student / T), both at the same
temperature, on the full vocabulary or coarsened to the teacher's top-k tokens + one bucket (kd.top_k, a top-k
kd.teacher_cache) where the divergence allows it (topk_allows(), E12). Forward KL, the default, is
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


def divergence_problems(cfg):
    """objective_problems() of kd.divergence (E12): a sampled kd.teacher_cache takes forward KL only
    (is_forward_kl), top-k (kd.top_k, a top-k kd.teacher_cache) the divergences topk_allows() names."""
    kind, k, cache = cfg["kd.divergence"], cfg["kd.top_k"], cfg["kd.teacher_cache"]
    what = f"jsd with kd.jsd_beta {cfg['kd.jsd_beta']:g}" if kind == "jsd" else kind
    sampled = cache is not None and cfg["kd.teacher_cache_mode"] == "sampled"
    if sampled and not is_forward_kl(kind, cfg["kd.jsd_beta"], cfg["kd.skew_alpha"]):
        return [("E12", "kd.divergence", f"{what}, but a sampled kd.teacher_cache (kd.teacher_cache_mode sampled) "
                 "gives an unbiased gradient of forward KL only: its loss is linear in the sampled weights, this "
                 "divergence is not, so its estimate would be biased; set kd.divergence=forward_kl or "
                 "kd.teacher_cache_mode=topk")]
    if (k is not None or cache is not None) and not topk_allows(kind, cfg["kd.jsd_beta"]):
        source = "an offline kd.teacher_cache stores" if cache is not None else f"kd.top_k {k} keeps"
        return [("E12", "kd.divergence",
                 f"{what} weighs by the student's probabilities, but {source} only the teacher's "
                 "top-k tokens: where the student puts its tail mass would go unscored; set kd.top_k=null (online "
                 "full-vocabulary KD) or kd.divergence to forward_kl, skew_kl or tvd"
                 + (" (or kd.jsd_beta=0)" if kind == "jsd" else ""))]
    return []


def is_forward_kl(kind, jsd_beta, skew_alpha):
    """Whether this divergence is forward KL exactly (jsd at b = 0 and skew_kl at a = 0 are): the only one
    a sampled teacher cache estimates without bias (E12)."""
    return kind == "forward_kl" or (kind == "jsd" and jsd_beta == 0) or (kind == "skew_kl" and skew_alpha == 0)


def topk_allows(kind, jsd_beta):
    """E12: whether kd.top_k (and kd.teacher_cache, top-k too) may coarsen this divergence to the teacher's top-k +
    one bucket: a lower bound (data processing) whose gap decides. p-weighted ones (forward, skew KL) lose the
    teacher's tail mass times a divergence of the tails, tvd at most that mass: small. reverse KL and jsd (b > 0)
    weigh by the student's q, whose tail mass nothing keeps small, over unknown teacher probabilities: lost."""
    return kind in ("forward_kl", "skew_kl", "tvd") or (kind == "jsd" and jsd_beta == 0)


def kd_divergence(student_logits, kind, temperature, teacher_logits, top_k, cached, jsd_beta, skew_alpha, log_q):
    """The script's kd_divergence() for a kind other than forward_kl, in fp32 whatever the autocast dtype (G6)."""
    with torch.autocast(student_logits.device.type, enabled=False):
        log_q = kit.log_probs(student_logits, temperature) if log_q is None else log_q  # E13: the student at T ...
        if cached is None and top_k is None:
            log_p = F.log_softmax(teacher_logits.float() / temperature, -1)  # ... and the teacher at the same T
        else:
            assert topk_allows(kind, jsd_beta), kind  # E12: resolve_config refuses the combination
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
    if is_forward_kl(kind, jsd_beta, skew_alpha):
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

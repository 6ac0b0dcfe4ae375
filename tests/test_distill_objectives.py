"""train_distill.py's distillation objectives (issue 26): kd.divergence, on-policy data, layer maps.

Each divergence against its published formula in float64 numpy, jsd against TRL's own
GKDTrainer.generalized_jsd_loss, the top-k rule (E12), the temperature on both sides (E13), on-policy tokens
scored by the teacher on the student's own sequence (E14) and resumed bit-exactly after a SIGKILL (R4), the
layer map's projections and its one-line errors. Tiny token files and a teacher made by the script
(tests/test_distill.py's fixtures).
"""
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_distill as T  # noqa: E402
from run_records import distill_killed_and_resumed  # noqa: E402
from test_distill import (LOOP, MODELS, PAD, VOCAB, ckpt, data, kd_settings, run, loss_setup,  # noqa: E402,F401
                          teacher)


# ----------------------------------------------------------------------------- the published formulas
def log_softmax64(logits, temperature):
    z = logits.double().numpy() / temperature
    return z - np.logaddexp.reduce(z, axis=-1, keepdims=True)


def kl64(log_a, log_b):
    """KL(a || b) = sum a (log a - log b), 0 where a = 0."""
    a = np.exp(log_a)
    return np.where(a > 0, a * (log_a - log_b), 0.0).sum(-1)


def reference(kind, log_p, log_q, beta=0.5, alpha=0.1):
    """The formulas as the papers write them, on probabilities (not log space), float64."""
    p, q = np.exp(log_p), np.exp(log_q)
    if kind == "forward_kl":
        return kl64(log_p, log_q)
    if kind == "reverse_kl":
        return kl64(log_q, log_p)
    if kind == "jsd":  # GKD eq. 1 with TRL's endpoints: beta 0 = KL(p || q), beta 1 = KL(q || p)
        if beta == 0:
            return kl64(log_p, log_q)
        if beta == 1:
            return kl64(log_q, log_p)
        log_m = np.log(beta * p + (1 - beta) * q)
        return beta * kl64(log_p, log_m) + (1 - beta) * kl64(log_q, log_m)
    if kind == "skew_kl":  # DistiLLM: KL(p || alpha p + (1 - alpha) q)
        return kl64(log_p, np.log(alpha * p + (1 - alpha) * q))
    if kind == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    raise AssertionError(kind)


def coarsened64(log_p, log_q, k):
    """The k + 1 outcomes of top-k KD in float64: the teacher's top-k tokens and one bucket for the rest."""
    order = np.argsort(-log_p, axis=-1, kind="stable")
    top, rest = order[:, :k], order[:, k:]
    lp, lq = np.take_along_axis(log_p, top, -1), np.take_along_axis(log_q, top, -1)
    if rest.shape[1]:
        lp = np.concatenate([lp, np.logaddexp.reduce(np.take_along_axis(log_p, rest, -1), axis=-1)[:, None]], -1)
        lq = np.concatenate([lq, np.logaddexp.reduce(np.take_along_axis(log_q, rest, -1), axis=-1)[:, None]], -1)
    return lp, lq


def random_logits(seed, rows=48, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=gen) * scale, torch.randn(rows, VOCAB, generator=gen) * scale


CASES = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"jsd_beta": 0.0}), ("jsd", {"jsd_beta": 0.5}),
         ("jsd", {"jsd_beta": 0.9}), ("jsd", {"jsd_beta": 1.0}), ("skew_kl", {"skew_alpha": 0.1}),
         ("skew_kl", {"skew_alpha": 0.5}), ("tvd", {})]
CASE_IDS = [kind + "".join(f"_{v:g}" for v in extra.values()) for kind, extra in CASES]


@pytest.mark.parametrize("kind,extra", CASES, ids=CASE_IDS)
def test_e13_each_divergence_equals_its_published_formula_with_t_on_both_sides(kind, extra):
    """Random logits at T = 1 and T = 2.5: kd_divergence equals the paper's formula on softmax(teacher / T) and
    softmax(student / T). A temperature applied to one side only (E13) fails at T = 2.5."""
    s, t = random_logits(0)
    for temperature in (1.0, 2.5):
        got = T.kd_divergence(s, kind, temperature, t, **extra)
        want = reference(kind, log_softmax64(t, temperature), log_softmax64(s, temperature),
                         extra.get("jsd_beta", 0.5), extra.get("skew_alpha", 0.1))
        assert got.dtype == torch.float32 and np.allclose(got.numpy(), want, rtol=1e-4, atol=1e-6), temperature
    assert float(T.kd_divergence(t, kind, 2.5, t, **extra).abs().max()) < 1e-6  # D(p, p) = 0


def test_divergence_scale_is_t_squared_for_the_kls_and_jsd_and_t_for_tvd():
    """The stated scaling, and why: at high T the gradient of each KL-type divergence in the student's logits
    shrinks as 1/T^2, tvd's as 1/T, so scale x gradient stays the same size from T = 4 to T = 8."""
    s, t = random_logits(1, rows=256, scale=1.0)
    for kind, extra in CASES:
        norms = []
        for temperature in (4.0, 8.0):
            student = s.clone().requires_grad_(True)
            value = T.divergence_scale(kind, temperature) * T.kd_divergence(student, kind, temperature, t, **extra).sum()
            norms.append(float(torch.autograd.grad(value, student)[0].norm()))
        assert 0.8 < norms[1] / norms[0] < 1.25, (kind, extra, norms)
    assert T.divergence_scale("tvd", 3.0) == 3.0 and T.divergence_scale("reverse_kl", 3.0) == 9.0


@pytest.fixture(scope="module")
def trl_jsd():
    trl = pytest.importorskip("trl")  # installed here and by .ci/run; never a dependency of the kit
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer
    assert trl.__version__
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_jsd_equals_trl_gkd_generalized_jsd_loss(trl_jsd, beta):
    """kd.divergence jsd with kd.jsd_beta = beta is TRL's generalized JSD, position by position and summed over
    the real tokens of a padded batch, at T = 2 (TRL divides both logits by T and applies no T^2)."""
    gen = torch.Generator().manual_seed(4)
    s, t = torch.randn(3, 7, VOCAB, generator=gen) * 3, torch.randn(3, 7, VOCAB, generator=gen) * 3
    labels = torch.randint(0, VOCAB, (3, 7), generator=gen)
    labels[0, 5:] = labels[2, :2] = -100
    ours = T.kd_divergence(s, "jsd", 2.0, t, jsd_beta=beta)
    theirs = trl_jsd(s, t, beta=beta, temperature=2.0, reduction="none").sum(-1)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    real = labels != -100
    summed = trl_jsd(s, t, labels=labels, beta=beta, temperature=2.0, reduction="sum")
    assert torch.allclose(torch.where(real, ours, 0.0).sum(), summed, rtol=1e-5)


ALLOWED = [case for case in CASES
           if T.companion("divergences", "kd.divergence").topk_allows(case[0], case[1].get("jsd_beta", 0.5))]


@pytest.mark.parametrize("kind,extra", ALLOWED, ids=[kind + "".join(f"_{v:g}" for v in e.values()) for kind, e in ALLOWED])
def test_topk_divergence_is_the_coarsened_formula_and_equals_full_at_k_equal_vocab(kind, extra):
    """Where top-k is allowed: the divergence of the k + 1 outcome distributions, online (the teacher's logits)
    and offline (teacher_topk's numbers, as the cache stores them) alike; at k = vocab the full divergence,
    values and gradients."""
    s, t = random_logits(5)
    log_p, log_q = log_softmax64(t, 2.0), log_softmax64(s, 2.0)
    for k in (1, 5, VOCAB - 1):
        got = T.kd_divergence(s, kind, 2.0, t, top_k=k, **extra)
        want = reference(kind, *coarsened64(log_p, log_q, k), extra.get("jsd_beta", 0.5), extra.get("skew_alpha", 0.1))
        assert np.allclose(got.numpy(), want, rtol=1e-4, atol=1e-6), k
        offline = T.kd_divergence(s, kind, 2.0, cached=T.teacher_topk(t, 2.0, k), **extra)
        assert torch.equal(got, offline)
        assert bool((got <= T.kd_divergence(s, kind, 2.0, t, **extra) + 1e-6).all())  # a lower bound (data processing)
    student = s.clone().requires_grad_(True)
    full = torch.autograd.grad(T.kd_divergence(student, kind, 2.0, t, **extra).sum(), student)[0]
    topk = torch.autograd.grad(T.kd_divergence(student, kind, 2.0, t, top_k=VOCAB, **extra).sum(), student)[0]
    assert torch.allclose(full, topk, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_g6_every_divergence_runs_in_fp32_on_low_precision_logits(dtype):
    """fp16/bf16 logits under CPU autocast (which runs log_softmax in fp16 itself): every divergence equals the
    float64 formula on the same rounded inputs to fp32 accuracy, at T = 4."""
    s, t = random_logits(6)
    s, t = s.to(dtype), t.to(dtype)
    for kind, extra in CASES:
        with torch.autocast("cpu", dtype=dtype):
            got = T.kd_divergence(s, kind, 4.0, t, **extra)
        want = reference(kind, log_softmax64(t.float(), 4.0), log_softmax64(s.float(), 4.0),
                         extra.get("jsd_beta", 0.5), extra.get("skew_alpha", 0.1))
        assert got.dtype == torch.float32 and np.allclose(got.numpy(), want, rtol=2e-5, atol=1e-6), kind


# ----------------------------------------------------------------------------- config refusals, one line each
REFUSED = [(["kd.divergence=reverse_kl", "kd.top_k=8"], "kd.divergence", "E12"),
           (["kd.divergence=jsd", "kd.jsd_beta=0.5", "kd.top_k=8"], "kd.divergence", "E12"),
           (["kd.divergence=reverse_kl", "kd.top_k=8", "kd.gamma=0", "kd.teacher_cache=CACHE"], "kd.divergence", "E12"),
           (["kd.top_k=null", "kd.gamma=0", "kd.on_policy_fraction=0.5", "kd.top_k=8", "kd.teacher_cache=CACHE"],
            "kd.on_policy_fraction", "C3"),
           (["kd.jsd_beta=1.5"], "kd.jsd_beta", "C3"), (["kd.skew_alpha=1"], "kd.skew_alpha", "C3"),
           (["kd.on_policy_fraction=0.5", "kd.prompt_tokens=10", "kd.max_new_tokens=10"], "kd.max_new_tokens", "C3"),
           (["kd.on_policy_fraction=0.5", "kd.beta=0"], "kd.on_policy_fraction", "C3"),
           (["kd.hidden_layers=[[1, 2]]", "kd.gamma=0.5"], "kd.hidden_layers", "C3"),
           (["kd.hidden_layers=[[2, 1]]", "kd.gamma=0.5"], "kd.hidden_layers", "C3"),
           (["kd.hidden_layers=[[1]]"], "kd.hidden_layers", "C1"),
           (["kd.divergence=tvd", "kd.chunk_tokens=32"], "kd.chunk_tokens", "C3"),
           (["kd.hidden_layers=[[1, 1]]", "kd.chunk_tokens=32"], "kd.chunk_tokens", "C3")]


@pytest.mark.parametrize("settings,key,row", REFUSED, ids=[f"{r[2]}_{r[1]}_{i}" for i, r in enumerate(REFUSED)])
def test_e12_c3_objective_configs_are_refused_with_one_line(settings, key, row, data, teacher, tmp_path, capsys):
    """Exit 2, one line naming the key, nothing written: top-k or an offline cache with a divergence that weighs
    by the student (E12), on-policy data with a cache (--cache_teacher builds one: refused the same way),
    impossible values, a layer map deeper than a network (the 1-layer teacher and student)."""
    settings = [item.replace("CACHE", str(tmp_path / "cache")) for item in settings]
    for extra in ([], ["--cache_teacher"]) if "kd.teacher_cache=" in " ".join(settings) else ([],):
        argv = ["--run_dir", str(tmp_path / "run")] + extra
        for item in kd_settings(data, teacher, *settings):
            argv += ["--set", item]
        assert T.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0], err
        assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "cache")
    if row != "C3":  # the catalogue row the refusal upholds
        with pytest.raises(T.ConfigError) as err:
            T.resolve_config(None, kd_settings(data, teacher, *settings))
        assert [problem[0] for problem in err.value.problems] == [row]


# ----------------------------------------------------------------------------- on-policy data
def on_policy():
    """on_policy.py as train_distill.py loads it beside itself (the code of generation is that companion's)."""
    return T.companion("on_policy", "kd.on_policy_fraction")


def on_policy_run(cfg, frozen, step=0):
    """What make_task reads of a run, for calling the on-policy loss directly."""
    windows = T.TokenWindows(cfg, "train")
    module = T.build_trainable(cfg, frozen)
    run_ = {"cfg": cfg, "dist": {"device": torch.device("cpu"), "rank": 0, "world": 1}, "train_set": windows,
            "teacher": frozen, "module": module, "state": {"global_step": step}}
    return run_, T.make_task(run_), windows, module


def test_e14_on_policy_loss_is_the_divergence_on_the_generated_tokens_the_teacher_scores(data, teacher):
    """An on-policy micro-batch, against an independent computation: the student's samples redrawn from the same
    generator, the teacher and the student run on that one sequence, the divergence (reverse KL, T^2) summed over
    the generated targets of windows whose prompt holds no padding and nowhere else: not the prompt, not the
    data's label mask (E14). The loop's token count is exactly those targets (G2)."""
    cfg, _ = T.resolve_config(None, kd_settings(data, teacher, "kd.top_k=null", "kd.divergence=reverse_kl",
                                                "kd.on_policy_fraction=1", "kd.sample_temperature=0.8"))
    frozen = T.build_teacher(cfg, torch.device("cpu"))
    run_, task, windows, module = on_policy_run(cfg, frozen, step=6)
    prompt, new = on_policy().on_policy_lengths(cfg)
    indices = np.arange(len(windows))
    x, y = windows[indices]
    padded_prompt = (x[:, :prompt] == 0).any(1)
    assert 0 < int(padded_prompt.sum()) < len(x)  # the row mask matters
    total, parts = task["loss"](module, (x, y))
    assert set(parts) == {"kd"}  # on-policy: the divergence only
    gen = on_policy().on_policy_generator(cfg, 7, 0, 0, torch.device("cpu"))
    seq = x[:, :prompt]
    with torch.no_grad():  # the whole prefix rerun for every token, each row's token by inverse-CDF sampling
        for _ in range(new):
            probs = F.softmax(module.lm(seq)[0][:, -1] / 0.8, -1).double()
            u = torch.rand(len(x), generator=gen, dtype=torch.float64)
            token = (probs.cumsum(-1) <= (u * probs.sum(-1))[:, None]).sum(-1, keepdim=True)
            seq = torch.cat([seq, token], 1)
        inputs = seq[:, :-1]
        log_q = F.log_softmax(module.lm(inputs)[0] / 2, -1)
        log_p = F.log_softmax(frozen(inputs)[0] / 2, -1)
        reverse = (log_q.exp() * (log_q - log_p)).sum(-1)
    scored = reverse[~padded_prompt][:, prompt - 1:]
    assert torch.allclose(total.detach(), 0.5 * 4 * scored.sum(), rtol=1e-5)
    assert task["step_count"]([indices], 7) == scored.numel() == int((~padded_prompt).sum()) * new
    assert not torch.equal(seq[:, prompt:], x[:, prompt:prompt + new])  # the student's tokens, not the data's


def counting_teacher_settings(data, *extra):
    """A distillation from zoo.CountingLM (a user module, no KV cache): its greedy continuation of token t is
    t + 1, t + 2, ... (mod the vocabulary), so the tokens it writes are known."""
    return data + MODELS[3:] + LOOP + ["kd.enabled=true", "teacher.target=zoo:counting_lm",
                                       f"teacher.kwargs={{vocab: {VOCAB}}}", "kd.top_k=null", "kd.gamma=0",
                                       "kd.alpha=0.5", "kd.beta=0.5", "kd.temperature=2", *extra]


def test_e14_seq_kd_micro_batches_train_on_the_teachers_continuation_as_labels_and_the_others_are_on_policy(data):
    """kd.seq_kd as GKD's training_step: a micro-batch is on-policy (the student writes) where on_policy_draw says
    so, else the teacher writes its completion; none keeps the data's. With a teacher whose greedy continuation is
    known (kd.sample_temperature 0): the sequence is each window's prompt then the teacher's tokens, the labels
    exactly those tokens (IGNORE on the prompt and on windows whose prompt holds padding), and the micro-batch's
    loss is the data loss on them, kd.alpha CE on the teacher's tokens + kd.beta T^2 KL there; the step counts
    those tokens (G2). The teacher stays frozen and in eval mode."""
    cfg, _ = T.resolve_config(None, counting_teacher_settings(
        data, "kd.seq_kd=true", "kd.on_policy_fraction=0.5", "kd.sample_temperature=0", "kd.prompt_tokens=6",
        "kd.max_new_tokens=5"))
    frozen = T.build_teacher(cfg, torch.device("cpu"))
    run_, task, windows, module = on_policy_run(cfg, frozen)
    pieces = on_policy().make_on_policy(run_, T.make_kd_term(cfg))
    writers = []
    for step in range(40):
        run_["state"]["global_step"] = step
        writers += [(pieces["draw_next"](), on_policy().on_policy_draw(cfg, step + 1, micro)) for micro in range(2)]
    assert all(who == ("student" if on else "teacher") for who, on in writers)
    assert {who for who, _ in writers} == {"student", "teacher"}
    step = next(s for s in range(1, 100) if not on_policy().on_policy_draw(cfg, s, 0))  # micro-batch 0: the teacher's
    indices = np.arange(len(windows))
    x, y = windows[indices]
    prompt, new = 6, 5
    real = ~(x[:, :prompt] == PAD).any(1)
    assert 0 < int(real.sum()) < len(x)
    seq = torch.cat([x[:, :prompt], (x[:, prompt - 1:prompt] + torch.arange(1, new + 1)) % VOCAB], 1)
    want = torch.full((len(x), prompt + new - 1), T.IGNORE)
    want[real, prompt - 1:] = seq[real, prompt:]
    run_["state"]["global_step"] = step - 1
    assert pieces["draw_next"]() == "teacher"
    inputs, targets = pieces["generated"]((x, y))
    assert torch.equal(targets, want) and torch.equal(inputs[real], seq[real, :-1])
    total, parts = task["loss"](module, (x, y))
    assert set(parts) == {"ce", "kd"}  # the data loss's terms, on the teacher's tokens
    mask = want != T.IGNORE
    with torch.no_grad():
        logits = module.lm(seq[:, :-1])[0]
        ce = F.cross_entropy(logits[mask], want[mask], reduction="sum")
        log_q, log_p = F.log_softmax(logits / 2, -1), F.log_softmax(frozen(seq[:, :-1])[0] / 2, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)[mask].sum()
    assert torch.allclose(parts["ce"].detach(), 0.5 * ce, rtol=1e-5)
    assert torch.allclose(parts["kd"].detach(), 0.5 * 4 * kl, rtol=1e-5)
    assert task["step_count"]([indices], step) == int(mask.sum()) == int(real.sum()) * new
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_e14_seq_kd_labels_are_those_trl_gkd_makes_when_its_teacher_generates(tmp_path):
    """TRL's GKDTrainer with seq_kd has the teacher write the completion (generate_on_policy_outputs with the
    student's end ids): its labels are the generated tokens up to and including the first end id, -100 on the
    prompt and after the end, shifted one to the left in compute_loss. The kit's labels for the same Hugging Face
    teacher, greedy, are exactly those."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    import transformers
    import zoo
    model = transformers.AutoModelForCausalLM.from_pretrained(zoo.hf_gpt2(tmp_path / "teacher")).eval()
    cfg, _ = T.resolve_config(None, ["kd.enabled=true", "teacher.target=zoo:tiny_causal_lm", "data.seq_len=32",
                                     "kd.seq_kd=true", "kd.sample_temperature=0", "kd.prompt_tokens=8",
                                     "kd.max_new_tokens=16"])
    prompt = torch.randint(1, 256, (8, 8), generator=torch.Generator().manual_seed(0))
    eos = [176, 181, 143, 112]  # tokens this greedy teacher turns to after a few repeats, in 4 of the 8 rows
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        _, _, labels = gkd.GKDTrainer.generate_on_policy_outputs(
            model, {"prompts": prompt, "prompt_attention_mask": torch.ones_like(prompt)}, config)
    writer = T.Trainable(T.hf_models("student.hf_dir").HFCausalLM(model, False)).eval()
    x = torch.cat([prompt, torch.zeros(8, 24, dtype=torch.long)], 1)
    _, targets = on_policy().on_policy_batch(writer, x, cfg, None, torch.Generator().manual_seed(0), torch.tensor(eos))
    width = labels.shape[1] - 1
    ended = (labels[:, 8:] == T.IGNORE).any(1)
    assert 0 < int(ended.sum()) < 8  # rows end at an end id, others run to kd.max_new_tokens
    assert torch.equal(targets[:, :width], labels[:, 1:]) and (targets[:, width:] == T.IGNORE).all()


def test_on_policy_draws_are_the_same_on_every_process_and_each_process_samples_its_own():
    """Which micro-batches are on-policy depends on (seed, step, micro-batch) only, so every DDP process takes the
    same ones (their loss parts line up in the all-reduce); the samples also on the process, so each generates its
    own share with its own stream. About the configured fraction of micro-batches is drawn."""
    cfg, _ = T.resolve_config(None, ["kd.enabled=true", "teacher.target=zoo:tiny_causal_lm", "kd.on_policy_fraction=0.3"])
    draws = [on_policy().on_policy_draw(cfg, step, micro) for step in range(1, 201) for micro in range(4)]
    assert 0.25 < np.mean(draws) < 0.35
    assert draws == [on_policy().on_policy_draw(cfg, step, micro) for step in range(1, 201) for micro in range(4)]
    cpu = torch.device("cpu")
    a, b = (on_policy().on_policy_generator(cfg, 3, 1, rank, cpu).initial_seed() for rank in (0, 1))
    assert a != b and a == on_policy().on_policy_generator(cfg, 3, 1, 0, cpu).initial_seed()
    assert on_policy().on_policy_generator(cfg, 3, 2, 0, cpu).initial_seed() != a


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_r4_on_policy_resume_is_bit_exact_after_sigkill(strategy, data, teacher, tmp_path):
    """On-policy 0.5 with JSD: uninterrupted vs SIGKILLed inside step 5 and run again, as processes; the
    checkpoints are bit-identical and every step's loss equal. Generation cost is in the step records. Under
    train.strategy fsdp too (D1: generation runs through the sharded root module, which gathers the weights)."""
    settings = kd_settings(data, teacher, "kd.top_k=null", "kd.divergence=jsd", "kd.on_policy_fraction=0.5",
                           "kd.prompt_tokens=6", "kd.max_new_tokens=5", f"train.strategy={strategy}")
    a, b, _ = distill_killed_and_resumed(settings, tmp_path)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[s]["loss"] == b[s]["loss"] and a[s]["loss/kd"] == b[s]["loss/kd"] for s in a)
    on = [a[s]["on_policy/micro_batches"] for s in sorted(a)]
    assert 0 < sum(on) < 15 and all(a[s]["on_policy/tokens"] % 5 == 0 and 5 * 2 * a[s]["on_policy/micro_batches"]
                                    <= a[s]["on_policy/tokens"] <= 5 * 3 * a[s]["on_policy/micro_batches"] for s in a)
    assert all(a[s]["on_policy/gen_s"] >= 0 and (a[s]["on_policy/gen_s"] > 0) == (a[s]["on_policy/micro_batches"] > 0)
               for s in a)


PROMPT = 12  # kd.prompt_tokens of the padded-prompt corpus: 2 of its 20 windows hold a real prompt that long


def padded_prompt_data(data, path):
    """data's settings on a training file of 20 one-window documents where padding sits inside the prompt of
    all but windows 3 and 11 (documents of 2-10 tokens; those two of 14), as in a corpus of short documents
    with a long kd.prompt_tokens: most on-policy micro-batches score nothing, and some steps nothing at all."""
    from test_distill import write_tokens
    rng = np.random.default_rng(1)
    docs = [np.arange(14 if i in (3, 11) else int(rng.integers(2, 11))) % (VOCAB - 1) + 1 for i in range(20)]
    write_tokens(path, docs)
    return data + [f"data.train_bin={path}"]


def empty_steps(cfg, windows, world=1):
    """The steps whose micro-batches are all on-policy and hold no window with a real prompt, computed from the
    data here: the steps with no scored token. Also whether some scored micro-batch leaves a process nothing."""
    x, _ = windows[np.arange(len(windows))]
    real = ~(x[:, :PROMPT] == PAD).any(1).numpy()
    plan = T.plan_schedule(cfg, len(windows), world)
    empty, lopsided, n = [], False, 0
    for epoch in range(plan["epochs"]):
        order = T.epoch_order(len(windows), cfg["train.batch_size"], cfg["train.grad_accum"], world, cfg["seed"], epoch)
        for step in order:
            n += 1
            drawn = [on_policy().on_policy_draw(cfg, n, m) for m in range(len(step))]
            if all(drawn) and not any(real[m].any() for m in step):
                empty.append(n)
            lopsided |= any(d and real[m].any() and not all(real[T.rank_share(m, r, world)].any() for r in range(world))
                            for d, m in zip(drawn, step))
    return empty, lopsided


def test_g2_a_step_with_no_scored_token_is_skipped_counted_and_resumes_bit_exact(data, teacher, tmp_path):
    """Issue 31: on-policy KD on padded data where most prompts hold padding crashed with ZeroDivisionError
    (a step of on-policy micro-batches with no scored token divided by a count of 0). Such a step is skipped
    (no forward, no update, the LR schedule moves on), counted with the skipped steps (global_step - skipped =
    the optimizer's updates, R2), logged without a loss (not a G4 NaN) with a WARNING G2 line; a run stopped at
    such a step and resumed ends bit-identical to the uninterrupted one."""
    settings = kd_settings(padded_prompt_data(data, tmp_path / "short.bin"), teacher, "kd.top_k=null", "kd.gamma=0",
                           "kd.on_policy_fraction=0.5", f"kd.prompt_tokens={PROMPT}", "kd.max_new_tokens=3")
    cfg, _ = T.resolve_config(None, settings)
    empty, _ = empty_steps(cfg, T.TokenWindows(cfg, "train"))
    assert empty == [5, 7], empty  # the corpus and the seed give two such steps of the 8
    _, outcome, a = run(settings, tmp_path / "a")
    assert outcome == "finished" and a["state"]["skipped_steps"] == 2
    last = ckpt(str(tmp_path / "a"))
    assert T.optimizer_step_count(last) == last["global_step"] - last["skipped_steps"] == 6
    trains, _, _ = T.read_metrics(str(tmp_path / "a"))
    assert sorted(trains) == list(range(1, 9)) and [s for s in trains if "loss" not in trains[s]] == empty
    assert "nonfinite" not in trains[5] and trains[5]["skipped_steps"] == 1 and trains[7]["skipped_steps"] == 2
    with open(tmp_path / "a" / "train.log") as f:
        warned = [line for line in f if "WARNING" in line]
    assert [line.split("WARNING ")[1][:18] for line in warned] == ["G2: step 5 skipped", "G2: step 7 skipped"]
    assert "kd.prompt_tokens" in warned[0]
    # diagnose --log says what the run warned (it found 0 warnings in a run that skipped a third of its steps)
    import diagnose_and_fix as dx
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        dx.main(["--log", str(tmp_path / "a" / "metrics.jsonl"), "--json"])
    g2 = [f for f in json.loads(out.getvalue())["findings"] if f["id"] in ("G2", "G4")]
    assert [(f["id"], f["severity"]) for f in g2] == [("G2", "warning")] and "(steps 5, 7;" in g2[0]["evidence"], g2
    _, outcome, _ = run(settings, tmp_path / "b", stop_after=5)
    assert outcome == "stopped" and ckpt(str(tmp_path / "b"))["global_step"] == 5
    _, outcome, _ = run(settings, tmp_path / "b", resume="auto")
    assert outcome == "finished"
    a_last, b_last = (tmp_path / name / "checkpoints" / "last.pt" for name in "ab")
    assert T.checkpoint_tensors_equal(a_last, b_last)
    resumed, _, _ = T.read_metrics(str(tmp_path / "b"))
    assert all(trains[s].get("loss") == resumed[s].get("loss") for s in trains)


def test_g2_two_processes_skip_the_same_empty_steps_and_a_process_with_nothing_to_score_still_steps(data, teacher,
                                                                                                     tmp_path):
    """The same corpus on 2 processes (launch.sh --gpus cpu:2, gloo): count 0 is the whole global step's, so both
    processes skip steps 5 and 7 together (no collective left waiting, no division by 0), and an on-policy
    micro-batch whose real prompts all sit on one process leaves the other a loss of 0 over 0 tokens, which
    it backpropagates like any micro-batch: the run finishes, its checkpoint counts 6 updates in 8 steps."""
    from test_launch import launch, write_config
    settings = kd_settings(padded_prompt_data(data, tmp_path / "short.bin"), teacher, "kd.top_k=null", "kd.gamma=0",
                           "kd.on_policy_fraction=0.5", f"kd.prompt_tokens={PROMPT}", "kd.max_new_tokens=3",
                           "train.grad_accum=1")
    cfg, _ = T.resolve_config(None, settings)
    assert empty_steps(cfg, T.TokenWindows(cfg, "train"), world=2) == ([5, 7], True)
    config = write_config(tmp_path, "task: distill\n", name="distill.yaml")
    sets = [a for item in settings for a in ("--set", item)]
    out = launch(config, "--gpus", "cpu:2", "--", *sets, "--run_dir", str(tmp_path / "two"), cwd=tmp_path,
                 env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    last = ckpt(str(tmp_path / "two"))
    assert last["world_size"] == 2 and last["finished"] and last["skipped_steps"] == 2
    assert T.optimizer_step_count(last) == 6
    trains, _, _ = T.read_metrics(str(tmp_path / "two"))
    assert [s for s in sorted(trains) if "loss" not in trains[s]] == [5, 7]


FSDP_GENERATION = """
import copy, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import train_distill as T
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
module = T.Trainable(T.GPT(64, 32, 2, 2, 16))
reference = copy.deepcopy(module)
fsdp = T.companion("fsdp_sharding", "train.strategy")
generate = T.companion("on_policy", "kd.on_policy_fraction").generate
fsdp.shard_model(module, "fp32")
prompt = torch.randint(1, 64, (3, 4), generator=torch.Generator().manual_seed(rank))
eos = torch.arange(64) if rank == 0 else None  # every id ends a row on process 0: it stops after one token
live = torch.tensor([True, True, rank == 1])
with fsdp.gathered_for_generation(module):
    seq = generate(module, prompt, 20, 1.0, torch.Generator().manual_seed(rank), eos=eos, live=live,
                   grad_free=torch.no_grad)  # as make_on_policy under FSDP
assert torch.equal(seq, generate(reference, prompt, 20, 1.0, torch.Generator().manual_seed(rank), eos=eos, live=live))
from torch.distributed.tensor import DTensor
assert all(isinstance(p, DTensor) for p in module.parameters())  # sharded again
logits, _ = module(torch.randint(1, 64, (2, 8)))
logits.sum().backward()  # and training goes on
dist.barrier()
# one write of the whole line: two processes share this stdout pipe, and a print's pieces interleave
os.write(1, f"generated {rank} {int((seq[:, 4:] != 0).sum())}\\n".encode())
"""


def test_d1_fsdp_generation_lets_each_process_stop_on_its_own_rows(tmp_path):
    """Two FSDP processes generate: process 0's rows all end after one token, process 1's run 20. The prompt's
    forward gathers every unit's weights on both processes and they stay gathered (gathered_for_generation), so
    process 1's token steps need no partner: without it, each of its steps would wait for an all-gather that
    process 0 never joins. The tokens equal the unsharded model's; the weights are sharded again after."""
    script = tmp_path / "fsdp_generation.py"
    script.write_text(FSDP_GENERATION)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), ROOT]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert sorted(line.split()[:2] for line in out.stdout.splitlines() if line.startswith("generated")) == \
        [["generated", "0"], ["generated", "1"]]


def generation_model(kind, tmp_path):
    """A tiny student behind the kit's interface: the built-in GPT or a Hugging Face GPT-2 / Llama (tests/zoo.py)."""
    torch.manual_seed(0)
    if kind == "builtin":
        return T.Trainable(T.GPT(256, 64, 2, 2, 32))
    transformers = pytest.importorskip("transformers")
    import zoo
    path = (zoo.hf_gpt2 if kind == "hf_gpt2" else zoo.hf_llama)(tmp_path / kind)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).float()
    return T.Trainable(T.hf_models("student.hf_dir").HFCausalLM(model, False))


def positions_seen(module):
    """The number of positions of every forward the language model runs (a forward hook), in order."""
    seen = []
    module.lm.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    return seen


@pytest.mark.parametrize("kind", ["builtin", "hf_gpt2", "hf_llama"])
def test_e14_kv_cache_generation_gives_the_tokens_of_the_whole_prefix_rerun(kind, tmp_path):
    """generate() with the KV cache (the built-in GPT's own, a Hugging Face model's past_key_values) against the
    same model rerunning the whole prefix for every token, fp32 on the CPU: greedy decoding gives the same tokens,
    and so does sampling with the same generator. With the cache, each token after the prompt runs one position."""
    module = generation_model(kind, tmp_path)
    module.train()
    prompt = torch.randint(1, 256, (6, 8), generator=torch.Generator().manual_seed(1))
    seen = positions_seen(module)
    for temperature in (0.0, 1.0):
        del seen[:]
        cached = on_policy().generate(module, prompt, 40, temperature, torch.Generator().manual_seed(3))
        assert seen == [(6, 8)] + [(6, 1)] * 39  # the prompt once, then one new position per token
        rerun = on_policy().generate(module, prompt, 40, temperature, torch.Generator().manual_seed(3), use_cache=False)
        assert torch.equal(cached, rerun) and torch.equal(cached[:, :8], prompt), temperature
    assert module.training  # generation ran in eval mode and gave the mode back
    sampled = on_policy().generate(module, prompt, 40, 1.0, torch.Generator().manual_seed(4))
    assert not torch.equal(sampled, cached)  # another generator, other samples: the draws come from it


def test_e14_a_row_ends_at_its_end_id_and_costs_nothing_after(tmp_path):
    """kd.eos_token: a row's tokens after its first end id are the fill and it leaves the batch before the next
    forward; a window without a real prompt runs the prompt's forward only. The rows still generating are drawn
    as before (one number per row and step, ended or not): the cached and the rerun paths agree. In the on-policy
    batch a target after the end is not scored."""
    module = generation_model("builtin", tmp_path)
    prompt = torch.randint(1, 256, (8, 8), generator=torch.Generator().manual_seed(2))
    prompt[7, 3] = 0  # padding (id 0) inside the last window's prompt
    live, eos = torch.tensor([True] * 7 + [False]), torch.arange(0, 256, 8)  # 1 id in 8 ends a row
    seen = positions_seen(module)
    seq = on_policy().generate(module, prompt, 40, 1.0, torch.Generator().manual_seed(5), eos=eos, fill=0, live=live)
    ends = [next((j for j in range(40) if int(seq[r, 8 + j]) in eos.tolist()), None) for r in range(7)]
    assert sum(e is not None for e in ends) >= 4, ends  # rows do end
    assert (seq[7, 8:] == 0).all()  # no real prompt: nothing generated
    for r, e in enumerate(ends):
        assert e is None or (seq[r, 9 + e:] == 0).all()
    going = [sum(e is None or e >= t for e in ends) for t in range(1, 40)]
    assert [rows for rows, _ in seen] == [8] + [n for n in going if n]  # the model saw only the rows still going
    rerun = on_policy().generate(module, prompt, 40, 1.0, torch.Generator().manual_seed(5), eos=eos, fill=0,
                                 live=live, use_cache=False)
    assert torch.equal(seq, rerun)
    cfg, _ = T.resolve_config(None, ["kd.enabled=true", "teacher.target=zoo:tiny_causal_lm", "data.seq_len=48",
                                     "kd.on_policy_fraction=1", "kd.prompt_tokens=8", "kd.max_new_tokens=40"])
    x = torch.cat([prompt, torch.zeros(8, 40, dtype=torch.long)], 1)
    inputs, targets = on_policy().on_policy_batch(module, x, cfg, 0, torch.Generator().manual_seed(5), eos)
    assert torch.equal(inputs, seq[:, :-1])  # the same rows live (pad 0), the same fill, the same draws
    mask = targets != T.IGNORE
    assert torch.equal(targets[mask], seq[:, 1:][mask])  # the labels are the generated tokens (TRL's)
    scored = mask[:, 7:].sum(1).tolist()
    assert scored == [40 if e is None else e + 1 for e in ends] + [0]  # up to and including the end id


def test_e5_dry_run_covers_on_policy_data_and_a_divergence(capsys):
    """The dry run of an on-policy JSD config trains, resumes bit-exactly and reports the generation it ran: the
    student's micro-batches and, with kd.seq_kd, the teacher's (GKD's order: no micro-batch keeps the data's)."""
    # a KD config names its teacher (issue 22: kd.enabled false is plain LM training, with no KD keys)
    assert T.main(["--dry_run", "--set", "kd.enabled=true", "teacher.target=zoo:tiny_causal_lm", "kd.gamma=0",
                   "kd.divergence=jsd", "kd.on_policy_fraction=0.5", "kd.seq_kd=true"]) == 0
    out = capsys.readouterr().out
    assert "dry run passed" in out and "on-policy: the student generated" in out
    assert "seq_kd: the teacher wrote the completions of" in out


# ----------------------------------------------------------------------------- layer maps
def layer_norm_mse(s, t):
    return (F.layer_norm(s, s.shape[-1:]) - F.layer_norm(t, t.shape[-1:])).pow(2).mean(-1)


def gpt_states(gpt, x):
    """Every layer's state of the built-in GPT, computed here: embeddings, after each block, the last through ln_f."""
    h = gpt.wte(x) + gpt.wpe(torch.arange(x.shape[1]))
    states = [h]
    for block in gpt.blocks:
        h = block(h)
        states.append(h)
    states[-1] = gpt.ln_f(h)
    return states


def test_layer_maps_give_one_projection_per_pair_for_builtin_hf_and_user_modules(data, teacher, tmp_path):
    """kd.hidden_layers on the built-in GPT, a Hugging Face GPT-2 and a user module that lists its layers (widths
    24/32/32): one projection per pair (student width at s -> teacher width at t), none at kd.gamma 0, and the
    hidden part of the loss equal to gamma x the mean over pairs of the layer-normalised MSE between the projected
    student state and the teacher state, computed here from the models' own layers. A user module returning its
    last state only is one line naming the key."""
    import zoo
    hf = zoo.hf_gpt2(tmp_path / "gpt2", vocab=VOCAB, dropout=0.0)
    students = {"builtin": ([], [[0, 1], [1, 0], [1, 1]]),
                "hf": ([f"student.hf_dir={hf}"], [[2, 1], [1, 0]]),
                "user": (["student.target=zoo:layered_causal_lm", f"student.kwargs={{vocab: {VOCAB}}}"], [[0, 1], [2, 1]])}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    for name, (student, pairs) in students.items():
        cfg, _ = T.resolve_config(None, kd_settings(data, teacher, *student, "kd.top_k=null", "kd.gamma=0.7",
                                                    f"kd.hidden_layers={pairs}"))
        frozen, module, task, windows = loss_setup(cfg)
        x, y = windows[np.arange(6)]
        _, parts = task["loss"](module, (x, y))
        with torch.no_grad():
            lm = module.lm.model if name != "builtin" else module.lm
            if name == "builtin":
                states = gpt_states(lm, x)
            elif name == "hf":
                states = lm(input_ids=x, output_hidden_states=True).hidden_states
            else:
                states = lm(x)[1]
            t_states = gpt_states(frozen, x)
            per_pair = [layer_norm_mse(proj(states[s]), t_states[t]) for proj, (s, t) in zip(module.proj, pairs)]
            want = 0.7 * torch.where(y != -100, sum(per_pair) / len(pairs), 0.0).sum()
        assert isinstance(module.proj, torch.nn.ModuleList) and len(module.proj) == len(pairs), name
        assert [(p.in_features, p.out_features) for p in module.proj] == \
            [(states[s].shape[-1], 32) for s, _ in pairs], name
        assert torch.allclose(parts["hidden"].detach(), want, rtol=1e-5), name
        off, _ = T.resolve_config(None, kd_settings(data, teacher, *student, "kd.gamma=0", f"kd.hidden_layers={pairs}"))
        assert not isinstance(T.build_trainable(off, T.build_teacher(off, torch.device("cpu"))).proj, torch.nn.ModuleList)
    last_only, _ = T.resolve_config(None, kd_settings(data, teacher, "student.target=zoo:tiny_causal_lm",
                                                      f"student.kwargs={{vocab: {VOCAB}}}", "kd.hidden_layers=[[1, 1]]"))
    with pytest.raises(T.ConfigError) as err:
        T.build_trainable(last_only, T.build_teacher(last_only, torch.device("cpu")))
    assert len(err.value.problems) == 1 and err.value.problems[0][1] == "kd.hidden_layers"


# ----------------------------------------------------------------------------- diagnose_and_fix.py
def diagnose(tmp_path, settings):
    import contextlib
    import io
    import json
    import diagnose_and_fix as dx
    config = tmp_path / "config.yaml"
    config.write_text("task: distill\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = dx.main(["--config", str(config), "--json"] + [a for item in settings for a in ("--set", item)])
    return code, json.loads(out.getvalue())["findings"]


def test_e6_e2_diagnose_counts_generation_and_layer_map_projections_and_on_policy_term_shares(data, teacher, tmp_path):
    """E6: the memory estimate lists kd.hidden_layers' projections (their parameters, as build_trainable makes
    them) and weighs the on-policy generation against the micro-batch and the eval batch; E2: the terms each kind
    of micro-batch trains (info), and a warning when kd.on_policy_fraction 1 leaves kd.alpha and kd.gamma nothing
    to weigh. A healthy objective config raises no warning."""
    objective = ["kd.top_k=null", "kd.divergence=jsd", "kd.on_policy_fraction=0.5", "kd.hidden_layers=[[0, 1], [1, 1]]"]
    code, findings = diagnose(tmp_path, kd_settings(data, teacher, *objective))
    assert code == 0 and not [f for f in findings if f["severity"] != "info"], findings
    e6 = next(f["evidence"] for f in findings if f["id"] == "E6")
    assert "kd.hidden_layers' 2 projections" in e6 and "on-policy generation (8 + 8 tokens, KV cache)" in e6, e6
    e2 = next(f["evidence"] for f in findings if f["id"] == "E2")
    assert "jsd (beta 0.5)" in e2 and "(50%)" in e2 and "2 layer pairs" in e2, e2
    cfg, _ = T.resolve_config(None, kd_settings(data, teacher, *objective))
    module = T.build_trainable(cfg, T.build_teacher(cfg, torch.device("cpu")))
    size = 4 * sum(p.numel() for p in module.proj.parameters()) * 4 / 2 ** 30  # weights, gradients, AdamW's 2 moments
    assert f"optimizer state {size:.3g} +" in e6
    code, findings = diagnose(tmp_path, kd_settings(data, teacher, *objective, "kd.on_policy_fraction=1"))
    warned = [f for f in findings if f["severity"] == "warning"]
    assert [f["id"] for f in warned] == ["E2"] and "kd.alpha and kd.gamma weigh nothing" in warned[0]["evidence"]
    # --fix zeroes the idle weights: lowering kd.on_policy_fraction made prompt-only data a refused config (C10)
    changes = [(c["key"], c["value"]) for c in warned[0]["changes"]]
    assert changes == [("kd.alpha", 0.0), ("kd.gamma", 0.0)], warned[0]
    code, findings = diagnose(tmp_path, kd_settings(data, teacher, *objective, "kd.on_policy_fraction=1", "kd.gamma=0"))
    assert "so kd.alpha weighs nothing" in next(f["evidence"] for f in findings if f["severity"] == "warning")


def test_g8_on_policy_under_two_processes_each_generates_its_own_share(data, teacher, tmp_path):
    """torchrun, 2 processes, on-policy 0.5 with the hidden-state term on: the projection, unused by an
    on-policy micro-batch's loss, takes part at weight 0 (DDP searches for no unused parameter, torch warns nothing), both processes take the same micro-batches on-policy (their loss
    parts line up in the all-reduce, or the run fails), and process 0 generated for its half of each global
    micro-batch only; rows may end (kd.eos_token) at other steps on each process. train.strategy fsdp (D1) gives
    DDP's run to round-off: generation runs through the sharded root (its hooks gather the weights). With kd.seq_kd
    (E14) the other micro-batches are the teacher's, each process writing its own share with the unsharded teacher
    (no collective), trained as data ones (CE and the hidden term too)."""
    settings = kd_settings(data, teacher, "kd.top_k=null", "kd.on_policy_fraction=0.5", "kd.prompt_tokens=6",
                           "kd.max_new_tokens=5", "train.batch_size=2", "train.grad_accum=1", "train.epochs=1",
                           "kd.eos_token=7", "kd.seq_kd=true")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.join(ROOT, "train_distill.py")]
    env = {**{k: v for k, v in os.environ.items() if k != "KIT_FAULT_KILL_AT"}, "OMP_NUM_THREADS": "1"}
    runs = {}
    for strategy in ("ddp", "fsdp"):
        out = subprocess.run(argv + ["--run_dir", str(tmp_path / strategy)] + [
            a for item in settings + [f"train.strategy={strategy}"] for a in ("--set", item)],
            env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        # a healthy run warns nothing: not even torch's find_unused_parameters advice, wrong for this run
        assert "Warning" not in out.stdout + out.stderr, out.stderr[-2000:]
        runs[strategy] = T.read_metrics(str(tmp_path / strategy))
    records, evals = runs["ddp"][:2]
    assert ckpt(tmp_path / "ddp")["world_size"] == 2 and len(records) == 5  # 20 windows / (2 x 2) per step
    micro = sum(r["on_policy/micro_batches"] for r in records.values())
    assert 0 < micro < 5 and sum(r["on_policy/tokens"] for r in records.values()) == micro * 2 * 5  # 2 of 4 windows
    assert sum(r["seq_kd/micro_batches"] for r in records.values()) == 5 - micro  # no micro-batch keeps the data's
    fsdp, fsdp_evals = runs["fsdp"][:2]
    for key in ("loss", "loss/kd", "loss/ce", "loss/hidden", "grad_norm"):
        assert np.allclose([r.get(key, 0) for r in records.values()], [r.get(key, 0) for r in fsdp.values()],
                           rtol=1e-5), key
    assert np.allclose([r["val/loss"] for r in evals.values()], [r["val/loss"] for r in fsdp_evals.values()], rtol=1e-5)
    assert [r["on_policy/tokens"] for r in records.values()] == [r["on_policy/tokens"] for r in fsdp.values()]
    sharded = ckpt(tmp_path / "fsdp")
    weights = T.shard_reader().read_shards(os.path.join(tmp_path, "fsdp", "checkpoints", sharded["shards"]))
    plain = ckpt(tmp_path / "ddp")["model"]
    # AdamW divides by the gradient's own scale: where a gradient is near 0 its round-off moves the weight by more
    # (seen: 1.1e-6 on a bias of 0.005 after 5 steps, the losses equal to 1e-5 at every step)
    assert all(torch.allclose(weights[k], plain[k], rtol=1e-4, atol=5e-6) for k in plain)

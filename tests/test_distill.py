"""train_distill.py: the loop's guarantees (FAILURE_MODES.md rows in the test names) plus distillation's own.

Tiny nanoGPT-style token files with padding (so micro-batches hold different numbers of real target
tokens), a 1-layer teacher made by the script itself (kd.enabled false), a 1-layer student.
"""
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_distill as T  # noqa: E402
from run_records import distill_killed_and_resumed, loud_findings, records, teacher_run  # noqa: E402

VOCAB, SEQ, PAD = 40, 16, 0
MODELS = ["teacher.n_layer=1", "teacher.n_head=2", "teacher.n_embd=32",
          "student.n_layer=1", "student.n_head=2", "student.n_embd=16"]
# 20 train windows, batch 3, accumulation 2: micro-batches 3,3 | 3,3 | 3,3 | 2 per epoch, so each
# epoch ends with a short last group (G1), and padding makes the token counts differ (G2).
LOOP = ["train.epochs=2", "train.max_steps=null", "train.batch_size=3", "train.grad_accum=2", "train.log_every=1",
        "train.eval_every=4", "train.save_every_steps=2", "train.eval_batch_size=8", "schedule.warmup=2",
        "optim.lr=0.003", "data.val_windows=null"]


def write_tokens(path, docs):
    """Documents laid out as the built-in corpus does: each padded to whole windows with at least one pad."""
    parts = []
    for doc in docs:
        doc = doc[:-1] if len(doc) % SEQ == 0 else doc
        parts += [doc, np.full((-len(doc)) % SEQ, PAD)]
    np.concatenate(parts + [np.full(1, PAD)]).astype(np.uint16).tofile(path)


def documents(rng, total):
    """Learnable token streams (a noisy walk over ids 1..VOCAB-1) of uneven lengths."""
    docs, size = [], 0
    while size < total:
        n = int(rng.integers(5, 3 * SEQ))
        steps = rng.choice([1, 2, 3], size=n, p=[0.6, 0.3, 0.1])
        docs.append((np.cumsum(steps) + rng.integers(VOCAB)) % (VOCAB - 1) + 1)
        size += n + (-n) % SEQ
    return docs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    write_tokens(d / "train.bin", documents(rng, 20 * SEQ))
    write_tokens(d / "val.bin", documents(rng, 8 * SEQ))
    return [f"data.train_bin={d / 'train.bin'}", f"data.val_bin={d / 'val.bin'}", f"data.vocab_size={VOCAB}",
            f"data.seq_len={SEQ}", f"data.pad_token={PAD}", "data.limit=20"]


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    """A teacher made the documented way: plain LM training by train_distill.py with kd.enabled false."""
    run_dir = tmp_path_factory.mktemp("teacher")
    cfg, _ = T.resolve_config(None, teacher_run(data + MODELS + LOOP) + ["train.epochs=3"])
    outcome, _ = T.train(cfg, str(run_dir), "none", quiet=True)
    assert outcome == "finished"
    return str(run_dir / "checkpoints" / "best.pt")


def kd_settings(data, teacher, *extra):
    return data + MODELS + LOOP + ["kd.enabled=true", f"kd.teacher_checkpoint={teacher}", "kd.alpha=0.5",
                                   "kd.beta=0.5", "kd.gamma=0.2", "kd.temperature=2", "kd.top_k=8", *extra]


def run(settings, run_dir, **kwargs):
    cfg, _ = T.resolve_config(None, settings)
    outcome, state = T.train(cfg, str(run_dir), kwargs.pop("resume", "none"), quiet=True, **kwargs)
    return cfg, outcome, state


@pytest.fixture(scope="module")
def kd_run(data, teacher, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("kd")
    cfg, outcome, state = run(kd_settings(data, teacher), run_dir)
    assert outcome == "finished"
    return cfg, state, str(run_dir)


def loss_setup(cfg):
    """What the loop builds for a distillation config: the frozen teacher, the trainable student, the task
    (its loss) and the training windows."""
    frozen = T.build_teacher(cfg, torch.device("cpu"))
    windows = T.TokenWindows(cfg, "train")
    task = T.make_task({"cfg": cfg, "dist": {"device": torch.device("cpu")}, "train_set": windows, "teacher": frozen})
    return frozen, T.build_trainable(cfg, frozen), task, windows


def ckpt(run_dir, name="last.pt"):
    return torch.load(os.path.join(run_dir, "checkpoints", name), map_location="cpu", weights_only=True)


class CallCounter:
    """Wraps kd_kl (called once per training micro-batch, never by eval) to poison one call."""

    def __init__(self, poison_call, value):
        self.calls, self.poison_call, self.value, self.real = 0, poison_call, value, T.kd_kl

    def __call__(self, *args, **kwargs):
        out = self.real(*args, **kwargs)
        self.calls += 1
        return out * self.value if self.calls - 1 == self.poison_call else out


# ----------------------------------------------------------------------------- the loop's rows
def test_r4_resume_is_bit_exact_after_sigkill(data, teacher, tmp_path):
    """The same command line, uninterrupted vs SIGKILLed inside step 5 and run again, as processes."""
    a, b, interrupted = distill_killed_and_resumed(kd_settings(data, teacher), tmp_path)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[s]["loss"] == b[s]["loss"] and a[s]["lr"] == b[s]["lr"] for s in a)
    assert loud_findings(str(interrupted)) == []  # the false-positive corpus: a killed and resumed KD run


def test_g2_accumulation_with_short_last_group_and_unequal_token_counts_equals_one_big_batch(data, teacher, tmp_path):
    """3 + 2 micro-batches of 2 windows against 2 batches of 6 and 4: same samples per optimizer step
    (epoch_order slices one permutation), SGD without momentum, so equal weights == equal gradients."""
    common = kd_settings(data, teacher, "data.limit=10", "train.epochs=1", "optim.name=sgd", "optim.momentum=0",
                         "optim.weight_decay=0", "optim.lr=0.5", "schedule.type=constant", "schedule.warmup=0",
                         "train.clip_grad_norm=null", "train.eval_every=null")
    small = common + ["train.batch_size=2", "train.grad_accum=3"]
    big = common + ["train.batch_size=6", "train.grad_accum=1"]
    cfg, _ = T.resolve_config(None, small)
    steps = T.epoch_order(10, 2, 3, 1, cfg["seed"], 0)
    windows = T.TokenWindows(cfg, "train")
    counts = [windows.count(m) for step in steps for m in step]
    assert [len(s) for s in steps] == [3, 2] and len(set(counts)) > 1, counts  # short last group, uneven tokens
    assert T.plan_schedule(cfg, 10)["total_steps"] == 2
    _, out_small, run_small = run(small, tmp_path / "small")
    _, out_big, run_big = run(big, tmp_path / "big")
    assert out_small == out_big == "finished"
    for (name, p), q in zip(run_small["module"].state_dict().items(), run_big["module"].state_dict().values()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name
    start = T.build_trainable(cfg, run_small["teacher"]).state_dict()
    assert not torch.allclose(start["lm.wte.weight"], run_small["module"].state_dict()["lm.wte.weight"])
    a, b = T.read_metrics(str(tmp_path / "small"))[0], T.read_metrics(str(tmp_path / "big"))[0]
    for step in (1, 2):
        for key in ("loss", "loss/ce", "loss/kd", "loss/hidden"):
            assert math.isclose(a[step][key], b[step][key], rel_tol=1e-5), (step, key)
    # and the value itself: step 1's CE term is alpha x (summed CE / real target tokens) at the initial weights
    x, y = windows[np.concatenate(steps[0])]
    with torch.no_grad():
        logits, _ = T.build_trainable(cfg, run_small["teacher"])(x)
    ce = F.cross_entropy(logits.double().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    assert math.isclose(a[1]["loss/ce"], 0.5 * float(ce) / int((y != -100).sum()), rel_tol=1e-5)


def test_g4_nonfinite_step_is_skipped_counted_and_leaves_the_weights(kd_run, data, teacher, tmp_path, monkeypatch):
    _, outcome, _ = run(kd_settings(data, teacher), tmp_path / "clean", stop_after=2)
    assert outcome == "stopped"
    monkeypatch.setattr(T, "kd_kl", CallCounter(poison_call=4, value=float("nan")))  # step 3, micro-batch 0
    cfg, outcome, state = run(kd_settings(data, teacher), tmp_path / "nan", stop_after=3)
    assert outcome == "stopped" and state["state"]["skipped_steps"] == 1
    records = T.read_metrics(str(tmp_path / "nan"))[0]
    assert records[3]["loss"] is None and "loss" in records[3]["nonfinite"] and records[3]["skipped_steps"] == 1
    assert records[2]["skipped_steps"] == 0 and math.isfinite(records[2]["loss"])
    last = ckpt(tmp_path / "nan")
    assert last["global_step"] == last["scheduler"]["last_epoch"] == 3  # the schedule still advanced (S1)
    assert T.optimizer_step_count(last) == 2
    assert T.checkpoint_tensors_equal(os.path.join(tmp_path, "clean", "checkpoints", "last.pt"),
                                      os.path.join(tmp_path, "nan", "checkpoints", "last.pt"))


def test_s1_logged_lr_equals_lr_curve_at_every_step(kd_run):
    cfg, state, run_dir = kd_run
    trains = T.read_metrics(run_dir)[0]
    logged = np.array([trains[s]["lr"] for s in sorted(trains)])
    assert len(logged) == state["plan"]["total_steps"] == 8
    assert np.array_equal(logged, T.lr_curve(cfg, state["plan"]))
    assert not T.check_lr_curve(logged, cfg, state["plan"])


BAD = [  # (settings added to a valid KD config, key the one line must name)
    (["kd.temprature=3"], "did you mean kd.temperature"),
    (["optim.lr=abc"], "optim.lr"),
    (["kd.temperature=0"], "kd.temperature"),
    (["kd.alpha=-5"], "kd.alpha: -5.0 must be >= 0"),  # alone: not also 'kd.alpha, kd.beta and kd.gamma are all 0'
    (["kd.teacher_checkpoint=null"], "kd.teacher_checkpoint"),
    (["kd.teacher_checkpoint=/nonexistent/best.pt"], "kd.teacher_checkpoint"),
    (["student.n_embd=31"], "student.n_embd"),
    (["kd.top_k=41"], "kd.top_k"),
    (["data.val_bin=null"], "data.val_bin"),
    (["data.vocab_size=20"], "data.train_bin"),  # ids up to 39 in the file: found before anything is written
    (["teacher.n_layer=3"], "teacher.n_layer"),  # does not match the checkpoint
    (["data.seq_len=32"], "data.seq_len"),  # longer than the teacher's position table
    (["train.epochs=null"], "train.epochs"),
    (["train.best_metric=val/auroc"], "train.best_metric"),
]


@pytest.mark.parametrize("bad,key", BAD, ids=[b[0][0] for b in BAD])
def test_c3_bad_configs_exit_2_with_one_line(bad, key, data, teacher, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["--run_dir", str(run_dir)]
    for item in kd_settings(data, teacher, *bad):
        argv += ["--set", item]
    assert T.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error:") and key in lines[0], lines
    assert not run_dir.exists()  # nothing written


def test_c3_malformed_yaml_from_the_command_line_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: distill\nkd: [unclosed\n")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train_distill.py"), "--config", str(bad)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "not valid YAML" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_c3_hf_teacher_without_transformers_is_a_config_error(data, tmp_path, capsys, monkeypatch):
    # transformers stays optional at run time: a machine without it is simulated (CI installs it)
    monkeypatch.setattr(T, "transformers_installed", lambda: False)
    (tmp_path / "config.json").write_text("{}")
    argv = []
    for item in data + MODELS + ["kd.enabled=true", f"kd.hf_teacher_dir={tmp_path}"]:
        argv += ["--set", item]
    assert T.main(argv + ["--run_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kd.hf_teacher_dir" in err[0] and "transformers" in err[0]


# ----------------------------------------------------------------------------- distillation's own
def coarsened_kl_reference(student, teacher, temperature, k):
    """float64 numpy, in log space: KL over the teacher's top-k tokens plus one bucket holding the rest."""
    s, t = student.double().numpy() / temperature, teacher.double().numpy() / temperature
    log_q = s - np.logaddexp.reduce(s, axis=-1, keepdims=True)
    log_p = t - np.logaddexp.reduce(t, axis=-1, keepdims=True)
    order = np.argsort(-log_p, axis=-1, kind="stable")
    top, rest = order[:, :k], order[:, k:]
    lp, lq = np.take_along_axis(log_p, top, -1), np.take_along_axis(log_q, top, -1)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    if rest.shape[1]:
        rp = np.logaddexp.reduce(np.take_along_axis(log_p, rest, -1), axis=-1)
        rq = np.logaddexp.reduce(np.take_along_axis(log_q, rest, -1), axis=-1)
        kl = kl + np.exp(rp) * (rp - rq)
    return kl


def test_topk_kd_equals_full_kd_at_k_equal_vocab():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(64, VOCAB, generator=gen).mul(3).requires_grad_(True)
    t = torch.randn(64, VOCAB, generator=gen).mul(3)
    full = T.kd_kl(s, t, 2.0, None)
    topk = T.kd_kl(s, t, 2.0, VOCAB)
    assert torch.allclose(full, topk, rtol=1e-5, atol=1e-7)
    g_full, = torch.autograd.grad(full.sum(), s)
    g_topk, = torch.autograd.grad(T.kd_kl(s, t, 2.0, VOCAB).sum(), s)
    assert torch.allclose(g_full, g_topk, rtol=1e-5, atol=1e-7)
    ref = coarsened_kl_reference(s.detach(), t, 2.0, VOCAB)
    assert np.allclose(full.detach().numpy(), ref, rtol=1e-4, atol=1e-6)


def test_topk_kd_is_the_coarsened_kl_and_a_lower_bound_of_full_kd():
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(64, VOCAB, generator=gen) * 3, torch.randn(64, VOCAB, generator=gen) * 3
    for k in (1, 5, VOCAB - 1):
        topk = T.kd_kl(s, t, 2.0, k)
        assert np.allclose(topk.numpy(), coarsened_kl_reference(s, t, 2.0, k), rtol=1e-4, atol=1e-6), k
        assert bool((topk <= T.kd_kl(s, t, 2.0, None) + 1e-6).all())  # biased low (data-processing inequality)
    assert float((T.kd_kl(s, t, 2.0, 5) - T.kd_kl(s, t, 2.0, None)).abs().max()) > 1e-3  # and really biased


@pytest.mark.parametrize("temp", [3, 1])
def test_distillation_loss_is_alpha_ce_plus_beta_t2_kl_plus_gamma_hidden_over_real_tokens(data, teacher, temp):
    """The task's loss against an independent formula (torch's kl_div, full vocabulary), real targets only;
    at T = 1 the CE term reads the KD term's log-probabilities (G8), at T = 3 it has its own."""
    cfg, _ = T.resolve_config(None, kd_settings(data, teacher, "kd.top_k=null", "kd.alpha=0.3", "kd.beta=0.6",
                                                "kd.gamma=0.7", f"kd.temperature={temp}"))
    frozen, module, task, windows = loss_setup(cfg)
    x, y = windows[np.arange(6)]
    total, parts = task["loss"](module, (x, y))
    real = y != -100
    assert int(real.sum()) < real.numel()  # padding present: the mask matters
    with torch.no_grad():
        logits, projected = module(x, project=True)
        t_logits, t_hidden = frozen(x)
        ce = F.cross_entropy(logits[real], y[real], reduction="sum")
        kl = F.kl_div(F.log_softmax(logits[real] / temp, -1), F.log_softmax(t_logits[real] / temp, -1),
                      log_target=True, reduction="sum")
        ln = torch.nn.LayerNorm(32, elementwise_affine=False)
        hidden = (ln(projected[real]) - ln(t_hidden[real])).pow(2).mean(-1).sum()
    want = {"ce": 0.3 * ce, "kd": 0.6 * temp ** 2 * kl, "hidden": 0.7 * hidden}
    assert set(parts) == set(want)
    for name, value in want.items():
        assert torch.allclose(parts[name].detach(), value, rtol=1e-5), name
    assert torch.allclose(total.detach(), sum(want.values()), rtol=1e-5)
    assert windows.count(np.arange(6)) == int(real.sum())  # the loop divides these sums by exactly this count


def refuse(name):
    def called(*args, **kwargs):
        raise AssertionError(f"{name} computed although its weight is 0")
    return called


@pytest.mark.parametrize("top_k", [None, 8], ids=["full", "top8"])
def test_g8_no_cross_entropy_hidden_states_or_projection_at_weight_0_and_the_loss_is_the_reference(
        data, teacher, top_k, monkeypatch):
    """kd.alpha 0, kd.gamma 0 (the recipe of a pure-KD run): no CE is computed, the teacher is asked for no
    hidden states, the student has no projection parameters; the loss is still exactly beta T^2 KL over
    the real targets, against torch's kl_div."""
    cfg, _ = T.resolve_config(None, kd_settings(data, teacher, f"kd.top_k={'null' if top_k is None else top_k}",
                                                "kd.alpha=0", "kd.beta=0.6", "kd.gamma=0", "kd.temperature=1"))
    frozen, module, task, windows = loss_setup(cfg)
    x, y = windows[np.arange(6)]
    assert module.proj is None and not any(k.startswith("proj.") for k in module.state_dict())
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in module.lm.parameters())
    assert T.build_trainable({**cfg, "kd.gamma": 0.1}, frozen).proj is not None  # the term on: its projection back
    for name in ("token_cross_entropy", "nll_sum", "hidden_loss"):
        monkeypatch.setattr(T, name, refuse(name))
    total, parts = task["loss"](module, (x, y))
    assert set(parts) == {"kd"}
    real = y != -100
    with torch.no_grad():
        s, t = module(x)[0][real], frozen(x)[0][real]
        if top_k is None:
            want = 0.6 * F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
        else:
            want = 0.6 * coarsened_kl_reference(s, t, 1.0, top_k).sum()
    assert math.isclose(float(total.detach()), float(want), rel_tol=1e-5)
    total.backward()  # and it trains: every student parameter gets a gradient (none is left unused, for DDP)
    assert all(p.grad is not None for p in module.parameters())


def test_g8_ce_from_the_shared_log_probs_is_bit_identical_to_cross_entropy():
    """At T = 1 the CE term reads the KD term's log-probabilities (nll_loss of log_softmax is what
    F.cross_entropy computes): the same bits, not only close."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 16, VOCAB, generator=gen) * 3
    y = torch.randint(0, VOCAB, (3, 16), generator=gen)
    y[0, :5] = -100
    assert torch.equal(T.nll_sum(T.log_probs(logits), y), T.token_cross_entropy(logits, y))


def test_g8_kd_kl_where_both_models_mask_a_token_is_finite_with_finite_gradients():
    """A vocabulary entry both models mask with -inf (a padded vocabulary) adds 0, not nan (0 * -inf)."""
    gen = torch.Generator().manual_seed(5)
    s = (torch.randn(8, VOCAB, generator=gen) * 3)
    t = torch.randn(8, VOCAB, generator=gen) * 3
    s[:, -4:], t[:, -4:] = float("-inf"), float("-inf")
    s.requires_grad_(True)
    kl = T.kd_kl(s, t, 2.0)
    (grad,) = torch.autograd.grad(kl.sum(), s)
    assert bool(torch.isfinite(kl).all()) and bool(torch.isfinite(grad).all())
    ref = coarsened_kl_reference(s.detach()[:, :-4], t[:, :-4], 2.0, VOCAB - 4)
    assert np.allclose(kl.detach().numpy(), ref, rtol=1e-5, atol=1e-7)


def test_g8_checkpoint_with_the_old_unused_projection_resumes_exactly_and_the_reverse_is_one_line(
        data, teacher, tmp_path, monkeypatch, capsys):
    """A last.pt written at kd.gamma 0 by the kit before G8 (the projection built, never trained) resumes and
    ends bit-identical to an uninterrupted run; a gamma-0 checkpoint resumed at kd.gamma > 0 is a config error."""
    settings = kd_settings(data, teacher, "kd.gamma=0", "train.epochs=1")  # 4 steps
    _, outcome, whole = run(settings, tmp_path / "whole")
    assert outcome == "finished"
    new_build = T.build_trainable
    monkeypatch.setattr(T, "build_trainable", lambda cfg, frozen: T.Trainable(  # the kit before G8
        new_build(cfg, frozen).lm, frozen.width if frozen is not None else None).train())
    _, outcome, _ = run(settings, tmp_path / "old", stop_after=2)
    assert outcome == "stopped" and "proj.weight" in ckpt(tmp_path / "old")["model"]
    monkeypatch.setattr(T, "build_trainable", new_build)
    _, outcome, resumed = run(settings, tmp_path / "old", resume="auto")
    assert outcome == "finished" and resumed["module"].proj is None
    assert T.checkpoint_tensors_equal(os.path.join(tmp_path, "whole", "checkpoints", "last.pt"),
                                      os.path.join(tmp_path, "old", "checkpoints", "last.pt"))
    _, outcome, _ = run(settings, tmp_path / "g0", stop_after=2)
    argv = ["--run_dir", str(tmp_path / "g0")] + [a for item in settings + ["kd.gamma=0.2"] for a in ("--set", item)]
    assert T.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kd.gamma" in err[-1] and "kd.gamma=0" in err[-1], err
    assert ckpt(tmp_path / "g0")["global_step"] == 2  # nothing lost


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("top_k", [None, 8], ids=["full", "top8"])
def test_g6_kd_loss_finite_and_correct_at_t4_with_low_precision_logits(dtype, top_k):
    """Logits near fp16's range (|x| up to 3e4) under autocast: the KL must equal a float64 reference."""
    gen = torch.Generator().manual_seed(2)
    s = (torch.randn(32, VOCAB, generator=gen) * 1e4).clamp(-3e4, 3e4).to(dtype)
    t = (torch.randn(32, VOCAB, generator=gen) * 1e4).clamp(-3e4, 3e4).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        kl = T.kd_kl(s, t, 4.0, top_k)
    assert kl.dtype == torch.float32 and bool(torch.isfinite(kl).all())
    ref = coarsened_kl_reference(s.float(), t.float(), 4.0, top_k or VOCAB)
    assert np.allclose(kl.numpy(), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("top_k", [None, 8], ids=["full", "top8"])
def test_g6_kd_log_softmax_runs_in_fp32_on_low_precision_logits(dtype, top_k):
    """Ordinary logits (|x| ~ 3) handed over in fp16/bf16, as autocast makes them: the KL must match a float64
    reference of the same (rounded) inputs to fp32 accuracy. Log-probabilities computed in the low
    precision itself would be off by its rounding (bf16 keeps 3 significant digits): this catches a
    log_softmax moved back before the .float()."""
    gen = torch.Generator().manual_seed(3)
    s = (torch.randn(64, VOCAB, generator=gen) * 3).to(dtype)
    # the teacher's logits all distinct after rounding: a tie at the k-th place would make the top-k set ambiguous
    levels = torch.linspace(-6, 6, VOCAB)
    t = torch.stack([levels[torch.randperm(VOCAB, generator=gen)] for _ in range(64)]).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        kl = T.kd_kl(s, t, 2.0, top_k)
    ref = coarsened_kl_reference(s.float(), t.float(), 2.0, top_k or VOCAB)
    assert kl.dtype == torch.float32 and np.allclose(kl.numpy(), ref, rtol=2e-5, atol=1e-6)


def test_g1_fp16_accumulation_short_last_group_and_scaler_skip_keep_schedule(data, teacher, tmp_path, monkeypatch):
    """fp16 + GradScaler, 3 + 2 micro-batches per epoch, one step forced to overflow: no "No inf checks
    were recorded", the scaler backs off, the step is counted, the scheduler still advances."""
    monkeypatch.setattr(T, "kd_kl", CallCounter(poison_call=3, value=float("inf")))  # step 2, micro-batch 0
    cfg, outcome, state = run(kd_settings(data, teacher, "train.precision=fp16", "data.limit=10",
                                          "train.batch_size=2", "train.grad_accum=3", "train.epochs=3",
                                          "schedule.warmup=1"), tmp_path)
    assert outcome == "finished" and state["plan"]["total_steps"] == 6
    trains = T.read_metrics(str(tmp_path))[0]
    assert trains[2]["loss"] is None and trains[2]["skipped_steps"] == 1 and state["state"]["skipped_steps"] == 1
    assert trains[2]["scale"] < trains[1]["scale"]  # GradScaler's own back-off, public API only (G5)
    logged = np.array([trains[s]["lr"] for s in sorted(trains)])
    assert np.array_equal(logged, T.lr_curve(cfg, state["plan"]))  # S1: advanced on the skipped step too
    last = ckpt(tmp_path)
    assert last["global_step"] == last["scheduler"]["last_epoch"] == 6 and T.optimizer_step_count(last) == 5
    assert all(math.isfinite(trains[s]["loss"]) for s in trains if s != 2)


def test_g5_e5_dry_run_counts_a_step_the_gradscaler_skips_once(data, tmp_path, monkeypatch):
    """A step the GradScaler skips (gradients overflowed) logs a finite loss: the dry run's fp16 check counted it
    as finite and as skipped and FAILed a healthy config (a new user's Hugging Face Llama overflowed at the
    default scale). A huge initial scale makes the first steps overflow here."""
    monkeypatch.setattr(T, "make_grad_scaler", lambda device, precision: torch.amp.GradScaler(
        device.type, init_scale=2.0 ** 127) if precision == "fp16" else None)
    cfg, _ = T.resolve_config(None, teacher_run(data + MODELS + LOOP) + ["train.precision=fp16"])
    plan = T.plan_schedule(cfg, T.train_set_size(cfg), 1)
    results = []
    with warnings.catch_warnings(record=True) as caught:  # S1: the skipped steps up to the SequentialLR milestone
        warnings.simplefilter("always")                  # give no "lr_scheduler.step() before optimizer.step()"
        T.check_precision_run(cfg, cfg, plan, str(tmp_path), T.train, lambda ok, what: results.append((ok, what)))
    assert not [str(w.message) for w in caught if "lr_scheduler" in str(w.message)]
    trains = T.read_metrics(str(tmp_path))[0]
    skipped = [s for s in trains if trains[s]["skipped_steps"] > trains.get(s - 1, {}).get("skipped_steps", 0)]
    assert skipped and all(math.isfinite(trains[s]["loss"]) for s in skipped)  # overflowed grads, finite losses
    assert results == [(True, f"fp16: {plan['total_steps']} steps, {len(skipped)} skipped by the GradScaler, CE "
                                "in fp32, LR on schedule (G5, G6)")]


def test_e3_val_ppl_is_exp_of_token_weighted_ce(kd_run):
    cfg, state, run_dir = kd_run
    last_eval = T.read_metrics(run_dir)[1][8]
    module = T.build_trainable(cfg, state["teacher"])
    module.load_state_dict(ckpt(run_dir)["model"])
    module.eval()
    val = T.TokenWindows(cfg, "val")
    x, y = val[np.arange(len(val))]
    with torch.no_grad():
        logits, _ = module(x)
        t_logits, _ = state["teacher"](x)
    ce = F.cross_entropy(logits.double().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none").view(y.shape)
    real = y != -100
    token_weighted = float(ce.sum() / real.sum())
    mean_of_means = float((ce.sum(1) / real.sum(1)).mean())
    assert abs(token_weighted - mean_of_means) > 1e-3  # the windows really hold different token counts
    assert math.isclose(last_eval["val/loss"], token_weighted, rel_tol=1e-6)
    assert math.isclose(last_eval["val/ppl"], math.exp(token_weighted), rel_tol=1e-6)
    agree = int(((logits.argmax(-1) == t_logits.argmax(-1)) & real).sum()) / int(real.sum())
    assert math.isclose(last_eval["val/agreement"], agree, rel_tol=1e-9)
    assert T.perplexity(800.0) == float("inf") and math.isnan(T.perplexity(float("nan")))


def test_teacher_frozen_and_unchanged_by_training(kd_run, teacher):
    cfg, state, _ = kd_run
    frozen = state["teacher"]
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    in_optimizer = {id(p) for group in state["optimizer"].param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in frozen.parameters()}
    assert T.tensor_digest(frozen) == T.tensor_digest(T.build_teacher(cfg, torch.device("cpu"))) == state["teacher_digest"]
    saved = torch.load(teacher, map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(saved["lm." + k], v) for k, v in frozen.state_dict().items())
    assert all(k.startswith(("lm.", "proj.")) for k in ckpt(kd_run[2])["model"])  # no teacher in the student's checkpoint


def test_g2_token_count_is_the_number_of_real_targets(data):
    cfg, _ = T.resolve_config(None, data)
    windows = T.TokenWindows(cfg, "train")
    rng = np.random.default_rng(3)
    for _ in range(5):
        idx = rng.choice(len(windows), size=6, replace=False)
        _, y = windows[idx]
        assert windows.count(idx) == int((y != T.IGNORE).sum()) < 6 * SEQ or windows.count(idx) == 6 * SEQ


def test_builtin_corpus_is_deterministic_split_and_padded():
    train = T.builtin_corpus("train", 32, 30000)
    assert np.array_equal(train, T.builtin_corpus.__wrapped__("train", 32, 30000))  # rebuilt from disk: same bytes
    val = T.builtin_corpus("val", 32, 30000)
    assert (len(train) - 1) % 32 == 0 and train[-1] == T.BUILTIN_PAD and (train == T.BUILTIN_PAD).any()
    cfg, _ = T.resolve_config(None, ["data.seq_len=32", "data.builtin.train_bytes=30000"])
    windows = T.TokenWindows(cfg, "train")
    counts = [windows.count([i]) for i in range(len(windows))]
    assert max(counts) == 32 and min(counts) < 32  # padded file tails: uneven real-token counts
    assert not np.array_equal(train[:len(val)], val)


def test_e5_dry_run_without_config_passes(capsys):
    assert T.main(["--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "fp16" in out and "bf16" in out and "bit-identical" in out


@pytest.mark.parametrize("windows", [1, 20])
def test_e5_dry_run_on_token_files_of_few_short_windows_passes_and_refuses_with_the_runs_line(tmp_path, capsys,
                                                                                               windows):
    """Token files the run accepts (8-token windows, one val window): the dry run's tiny runs were 16 tokens
    long and 2 epochs, so it refused a val file the run takes ('fewer than one window of data.seq_len + 1 =
    17'), or, under 26 windows, FAILed its own eval checks (20) or refused 'warmup 2 of 2 steps' (1).
    Now windows no longer than the run's and more epochs of few windows; what the run refuses, it refuses too."""
    rng = np.random.default_rng(windows)
    rng.integers(1, VOCAB, windows * 8 + 1).astype(np.uint16).tofile(tmp_path / "train.bin")
    rng.integers(1, VOCAB, 9).astype(np.uint16).tofile(tmp_path / "val.bin")
    sets = [a for s in [f"data.train_bin={tmp_path / 'train.bin'}", f"data.val_bin={tmp_path / 'val.bin'}",
                        f"data.vocab_size={VOCAB}", "data.seq_len=8", "train.batch_size=1", "train.epochs=2",
                        "train.max_steps=null", "schedule.warmup=0", "kd.enabled=false", *MODELS[3:]]
            for a in ("--set", s)]
    assert T.main(["--dry_run", *sets]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and f"epochs of {windows} windows" in out and "eval at steps [3, 6, " in out, out
    # under torchrun the epochs follow each process's share: 2 x batch 4 take 20 windows in 2 steps an epoch
    cfg, _ = T.resolve_config(None, sets[1::2])
    assert f"train.epochs={7 if windows == 1 else 4}" in T.dry_run_settings(cfg, [], {"world": 2})
    if windows == 1:  # one val token short: the run's line, from the run and the dry run alike, exit 2
        (tmp_path / "val.bin").write_bytes((tmp_path / "val.bin").read_bytes()[:-2])
        lines = [(T.main([*flags, *sets, "--run_dir", str(tmp_path / "run")]), capsys.readouterr().err)
                 for flags in ([], ["--dry_run"])]
        assert lines[0] == lines[1] and lines[0][0] == 2 and "holds 8 tokens, fewer than one window of data.seq_len" \
            " + 1 = 9" in lines[0][1] and lines[0][1].count("\n") == 1, lines
        assert not (tmp_path / "run").exists()


def test_hf_teacher_from_a_local_directory(data, tmp_path):
    transformers = pytest.importorskip("transformers", reason=f"transformers is not installed for {sys.executable}")
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=1, n_head=2,
                                     bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    settings = data + MODELS + LOOP + ["kd.enabled=true", f"kd.hf_teacher_dir={tmp_path / 'hf'}", "kd.gamma=0.2"]
    cfg, outcome, state = run(settings, tmp_path / "run")
    assert outcome == "finished"
    assert state["teacher"].width == 32 and state["module"].proj.out_features == 32
    assert T.tensor_digest(state["teacher"]) == state["teacher_digest"]
    assert all(math.isfinite(r["loss/kd"]) for r in T.read_metrics(str(tmp_path / "run"))[0].values())


def test_e2_a_dominating_loss_term_is_warned_once_with_its_step_range_and_a_healthy_kd_run_is_quiet(data, teacher,
                                                                                                    tmp_path):
    """The script's own E2 check (the rule diagnose_and_fix.py calls too, dominating_loss): the hidden-state
    term weighted 100x the others takes well over the default train.max_loss_share, and train.log says so
    ONCE, with the steps it covers; the ordinary KD weights (CE carrying most of the loss) say nothing."""
    run(kd_settings(data, teacher, "kd.alpha=0.01", "kd.beta=0.01", "kd.gamma=1", "train.log_every=1"), tmp_path / "a")
    lines = [l for l in open(tmp_path / "a" / "train.log") if "WARNING E2" in l]
    assert len(lines) == 1 and "loss/hidden is above train.max_loss_share 90% of the loss at" in lines[0], [
        (r["step"], r.get("loss/ce"), r.get("loss/hidden")) for r in records(tmp_path / "a")]
    assert "logged steps in 1-3" in lines[0]  # warned at the third record in a row, with the range so far
    run(kd_settings(data, teacher, "kd.alpha=0.5", "kd.beta=0.5", "kd.gamma=0.1", "train.log_every=1"), tmp_path / "b")
    assert "WARNING" not in open(tmp_path / "b" / "train.log").read()


def test_e7_every_train_record_carries_samples_and_tokens_per_second(kd_run):
    """Throughput is logged with every train record (E7), so a slow stretch is visible in metrics.jsonl and
    diagnose_and_fix.py can flag it: windows per second and real target tokens per second, both positive."""
    _, state, run_dir = kd_run
    trains = T.read_metrics(run_dir)[0]
    assert sorted(trains) == list(range(1, state["plan"]["total_steps"] + 1))
    for record in trains.values():
        assert record["samples_per_s"] > 0 and record["tokens_per_s"] > 0
        assert record["tokens_per_s"] > record["samples_per_s"]  # a window holds many target tokens

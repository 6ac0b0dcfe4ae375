"""train_probe.py against the failure catalogue: each test names the row it pins."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_probe as tp  # noqa: E402
from run_records import PROBE_TINY as TINY, last_per_step, records, run_together  # noqa: E402


def config(*extra):
    cfg, _ = tp.resolve_config(None, TINY + list(extra))
    return cfg


def script_call(*args, env=None):
    """train_probe.py with these arguments as run_together() takes it: (argv, subprocess keyword arguments)."""
    argv = [sys.executable, os.path.join(ROOT, "train_probe.py"), *args]
    return argv, {"cwd": ROOT, "env": {**os.environ, **(env or {})}}


def run_script(*args, env=None, **kw):
    argv, where = script_call(*args, env=env)
    return subprocess.run(argv, capture_output=True, text=True, timeout=240, **where, **kw)


def sets(*overrides):
    return [a for o in overrides for a in ("--set", o)]


def ckpt(run_dir, name="last.pt"):
    return torch.load(os.path.join(run_dir, "checkpoints", name), map_location="cpu", weights_only=True)


def test_e5_dry_run_passes_with_no_config():
    out = run_script("--dry_run")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "dry run passed" in out.stdout and "FAIL" not in out.stdout


def test_e5_dry_run_fails_when_expected_final_lr_is_wrong():
    # S5: 0.003 / 25 / 1000 = 1.2e-7 is OneCycleLR's floor; a config expecting 3e-6 must not pass.
    out = run_script("--dry_run", *sets("optim.lr=3e-3", "schedule.final_div_factor=1000", "expect.final_lr=3e-6"))
    assert out.returncode == 1
    assert "S5" in out.stdout and "dry run FAILED" in out.stdout


@pytest.mark.parametrize("n", [3, 10, 24])
def test_e5_dry_run_on_prepared_data_of_fewer_than_26_training_windows_passes(tmp_path, n, capsys, monkeypatch):
    """Fewer training windows than the tiny runs take (26) make fewer steps an epoch: the dry run trains more
    epochs of what exists, so every check (evals at 3 and 6, a stop at step 5, resume) still runs and holds.
    (train_probe.main in this process, from the kit's root as the other dry-run tests' processes run it: the
    epoch rule is the subject here, not the process; test_e5_dry_run_passes_with_no_config runs the command.)"""
    rng = np.random.default_rng(0)
    for split, size in (("train", n), ("val", 8)):
        np.save(tmp_path / f"{split}_x.npy", rng.standard_normal((size, 4, 128)).astype(np.float32))
        np.save(tmp_path / f"{split}_y.npy", (np.arange(size) % 2).astype(np.int64))
    data = [f"data.{s}_{k}={tmp_path}/{s}_{k}.npy" for s in ("train", "val") for k in ("x", "y")]
    monkeypatch.chdir(ROOT)
    code = tp.main(["--dry_run", *sets(*data, "backbone.kwargs.width=8", "backbone.kwargs.heads=2")])
    out = capsys.readouterr()
    assert code == 0 and "FAIL" not in out.out, out.out + out.err
    assert f"epochs of {n} windows" in out.out and "eval at steps [3, 6, " in out.out

@pytest.mark.parametrize("kill_at,cache", [("7:1", "true"), ("5:0", "false"), ("4:0", "true")],
                         ids=["mid_epoch_mid_accumulation", "epoch_boundary_uncached", "short_last_group"])
def test_r4_r5_resume_after_sigkill_is_bit_exact(tmp_path, kill_at, cache):
    base = sets(*TINY, f"backbone.cache_features={cache}", "train.save_every_steps=2")
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    done, died = run_together(script_call(*base, "--run_dir", whole),
                              script_call(*base, "--run_dir", killed, env={"KIT_FAULT_KILL_AT": kill_at}))
    assert done.returncode == 0, done.stderr
    assert died.returncode == -signal.SIGKILL, died.stderr
    resumed = run_script(*base, "--run_dir", killed)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    for name in ("last.pt", "best.pt"):  # best.pt too: a best held in memory at the kill is recomputed, not lost
        assert tp.checkpoint_tensors_equal(os.path.join(whole, "checkpoints", name),
                                           os.path.join(killed, "checkpoints", name)), name
    a, b = ckpt(whole), ckpt(killed)
    assert a["global_step"] == b["global_step"] == 12
    assert a["last_eval"] == b["last_eval"]


@pytest.mark.parametrize("minutes,saved_at", [("1.0e-9", 4), ("null", None), ("5.0", None)],
                         ids=["due_after_every_step", "no_time_trigger", "default_5_minutes"])
def test_r8_last_pt_follows_the_time_trigger_and_nothing_else_by_default(tmp_path, minutes, saved_at):
    # No step trigger (train.save_every_steps null, the default): last.pt comes from the time trigger alone.
    # A few-second run with the default 5 minutes writes no periodic checkpoint before a SIGKILL at step 5.
    run_dir = str(tmp_path / "run")
    died = run_script(*sets(*TINY, f"train.save_every_minutes={minutes}"), "--run_dir", run_dir,
                      env={"KIT_FAULT_KILL_AT": "5:0"})
    assert died.returncode == -signal.SIGKILL, died.stderr
    if saved_at is None:
        assert not os.path.exists(os.path.join(run_dir, "checkpoints", "last.pt"))
    else:
        assert ckpt(run_dir)["global_step"] == saved_at


def test_r6_a_best_pt_held_in_memory_is_written_with_last_pt_and_equals_an_immediate_write(tmp_path):
    # Default train.save_every_minutes: the first better eval writes best.pt, later ones wait in memory for
    # the next last.pt. What lands on disk must be the checkpoint of the best eval's step, bit for bit the
    # one an immediate write (save_every_minutes null) leaves, and it must agree with last.pt.
    _, late = tp.train(config("train.epochs=5"), str(tmp_path / "late"), "none", quiet=True)
    _, now = tp.train(config("train.epochs=5", "train.save_every_minutes=null"), str(tmp_path / "now"), "none", quiet=True)
    best, last = ckpt(str(tmp_path / "late"), "best.pt"), ckpt(str(tmp_path / "late"))
    # val/auroc peaks at step 12 of 20: held in memory for 8 steps of training, neither the first eval nor the last
    assert best["global_step"] == last["best_step"] == late["state"]["best_step"] == 12 and last["global_step"] == 20
    assert late["best_pending"] is None
    assert tp.checkpoint_tensors_equal(str(tmp_path / "late/checkpoints/best.pt"), str(tmp_path / "now/checkpoints/best.pt"))
    assert torch.equal(best["model"]["linear.weight"], ckpt(str(tmp_path / "now"), "best.pt")["model"]["linear.weight"])


def test_r4_resume_at_a_random_step_is_bit_exact(tmp_path):
    step = random.Random(2026).randint(2, 11)  # fixed seed: deterministic, but not a hand-picked step
    cfg = config("train.save_every_steps=1")
    tp.train(cfg, str(tmp_path / "a"), "none", quiet=True)
    assert tp.train(cfg, str(tmp_path / "b"), "none", stop_after=step, quiet=True)[0] == "stopped"
    assert tp.train(cfg, str(tmp_path / "b"), "auto", quiet=True)[0] == "finished"
    assert tp.checkpoint_tensors_equal(str(tmp_path / "a/checkpoints/last.pt"), str(tmp_path / "b/checkpoints/last.pt"))


def test_g1_g2_short_last_accumulation_group_steps_once_and_equals_one_big_batch(tmp_path):
    # 14 samples in micro-batches of 3 with grad_accum 3: steps of [3, 3, 3] and [3, 2] samples. The last
    # group is short (2 micro-batches, not 3) and its micro-batches differ in size, so dividing by grad_accum
    # or averaging per-micro-batch means would both change the update. The same samples in batches of 9
    # without accumulation ([9], [5]) must give the same update (G2), and the short group must step exactly
    # once (G1): 2 optimizer steps per epoch.
    common = ["data.synthetic.num_train=14", "train.epochs=2", "optim.name=sgd", "optim.momentum=0",
              "optim.weight_decay=0", "schedule.type=constant", "schedule.warmup=0", "optim.lr=0.5",
              "train.clip_grad_norm=null"]
    acc = config(*common, "train.batch_size=3", "train.grad_accum=3")
    big = config(*common, "train.batch_size=9", "train.grad_accum=1")
    steps = tp.epoch_order(14, 3, 3, 1, acc["seed"], 0)
    assert [[len(m) for m in s] for s in steps] == [[3, 3, 3], [3, 2]]
    _, run_acc = tp.train(acc, str(tmp_path / "acc"), "none", quiet=True)
    _, run_big = tp.train(big, str(tmp_path / "big"), "none", quiet=True)
    assert run_acc["plan"]["steps_per_epoch"] == 2 and run_acc["state"]["global_step"] == 4
    assert run_acc["scheduler"].last_epoch == 4
    for p, q in zip(run_acc["module"].parameters(), run_big["module"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert last_per_step(records(str(tmp_path / "acc")), "loss") == pytest.approx(
        last_per_step(records(str(tmp_path / "big")), "loss"), rel=1e-5)


@pytest.mark.parametrize("norm_wanted", [0.02, 6.0, 9.9999, "exactly 10", 10.0, 22.0, 2e4])  # max_norm is 10
def test_g3_total_grad_norm_and_the_skipped_identity_clip_match_clip_grad_norm_bit_for_bit(norm_wanted):
    # The loop reads the norm back with the loss and clips only where clip_grad_norm_'s factor is below 1.0
    # (G3); both must leave exactly the bits torch's own clip_grad_norm_ leaves, below and above max_norm.
    torch.manual_seed(0)
    shapes = [(7, 64), (7,), (3, 5, 2)]
    grads = [torch.randn(s) for s in shapes]
    if norm_wanted == "exactly 10":  # torch's factor 10 / (10 + 1e-6) still rounds below 1.0 in float32
        shapes, grads, norm_wanted = [(2,)], [torch.tensor([6.0, 8.0])], 10.0
    grads = [g * (norm_wanted / torch.nn.utils.get_total_norm(grads)) for g in grads]
    ours, theirs = [torch.nn.Parameter(torch.zeros(s)) for s in shapes], [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for a, b, g in zip(ours, theirs, grads):
        a.grad, b.grad = g.clone(), g.clone()
    norm = tp.total_grad_norm([p.grad for p in ours])
    expected = torch.nn.utils.clip_grad_norm_(theirs, 10.0)
    assert torch.equal(norm, expected)
    tp.clip_gradients(ours, 10.0, norm, norm.item())
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))
    clipped = any(not torch.equal(b.grad, g) for b, g in zip(theirs, grads))
    assert clipped == (norm_wanted >= 10.0)  # both sides of max_norm are covered


def nan_dataset(tmp_path, bad_index=7):
    """Window 7 holds 3e38: finite (a NaN in the data is refused before the run, C9), but the built-in
    encoder's log-power overflows on it, so its features and every step that reads it are non-finite."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("val", 16)):
        x = rng.standard_normal((n, 4, 128)).astype(np.float32)
        y = (np.arange(n) % 2).astype(np.int64)
        if split == "train":
            x[bad_index, 1, 5] = 3e38
        np.save(tmp_path / f"{split}_x.npy", x)
        np.save(tmp_path / f"{split}_y.npy", y)
    return [f"data.{s}_{k}={tmp_path}/{s}_{k}.npy" for s in ("train", "val") for k in ("x", "y")]


def test_g4_nan_batch_is_skipped_counted_logged_and_run_continues(tmp_path):
    run_dir = str(tmp_path / "run")  # in this process: the skip is the subject (the next tests run the command)
    assert tp.train(config(*nan_dataset(tmp_path)), run_dir, "none", quiet=True)[0] == "finished"
    recs = records(run_dir)
    bad = [r for r in recs if "nonfinite" in r]
    assert len(bad) == 3 and all(r["loss"] is None for r in bad)  # one step per epoch holds window 7
    c = ckpt(run_dir)
    assert c["skipped_steps"] == 3 and c["global_step"] == 12 and c["finished"]
    assert all(torch.isfinite(t).all() for t in c["model"].values())
    assert max(s["step"] for s in c["optimizer"]["state"].values()) == 12 - 3  # skipped steps never reach AdamW
    assert c["scheduler"]["last_epoch"] == 12  # S1: the schedule still advanced once per step
    assert "WARNING G4" in open(os.path.join(run_dir, "train.log")).read()


def test_g4_s1_non_finite_first_steps_say_g4_alone_without_torchs_scheduler_advice(tmp_path):
    """Issue 31: a skipped first step printed torch's `lr_scheduler.step()` before `optimizer.step()` advice
    (the schedule advances on skipped steps on purpose, S1). Half the windows overflow: steps 1-2 are skipped,
    the run stops on G4, and its one line is all stderr holds."""
    out = run_script(*sets(*TINY, *nan_dataset(tmp_path, slice(0, 20)), "train.max_bad_steps=2"),
                     "--run_dir", str(tmp_path / "run"))
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr
    assert "G4: 2 non-finite steps in a row up to step 2" in out.stderr


def test_g4_consecutive_bad_steps_abort_with_saved_state(tmp_path):
    run_dir = str(tmp_path / "run")
    out = run_script(*sets(*TINY, *nan_dataset(tmp_path), "train.max_bad_steps=1"), "--run_dir", run_dir)
    assert out.returncode == 1
    assert "G4" in out.stderr and "Traceback" not in out.stderr
    assert ckpt(run_dir)["skipped_steps"] == 1


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "linear", "wsd", "constant"])
def test_s1_s8_logged_lr_equals_the_schedule_curve_at_every_step(tmp_path, schedule):
    cfg = config(f"schedule.type={schedule}", "schedule.final_lr_ratio=0.05", "train.epochs=4")
    _, run = tp.train(cfg, str(tmp_path / schedule), "none", quiet=True)
    logged = np.array(last_per_step(records(str(tmp_path / schedule)), "lr"))
    expected = tp.lr_curve(cfg, run["plan"])
    assert len(logged) == run["plan"]["total_steps"] == 16
    assert np.array_equal(logged, expected)
    assert tp.check_lr_curve(logged, cfg, run["plan"]) == []


def test_s9_an_lr_written_by_a_chained_scheduler_path_aborts(tmp_path, monkeypatch):
    # A write before the scheduler's step: chainable schedulers (cosine) carry it into every later LR.
    real_step = torch.optim.AdamW.step

    def step_and_meddle(self, *a, **kw):
        out = real_step(self, *a, **kw)
        for group in self.param_groups:
            group["lr"] *= 0.5
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_and_meddle)
    with pytest.raises(tp.TrainingAborted, match="S9: at step [23] "):
        tp.train(config("schedule.type=cosine"), str(tmp_path / "run"), "none", quiet=True)


def test_s9_a_plateau_rule_writing_the_lr_after_eval_aborts(tmp_path, monkeypatch):
    real_record_eval = tp.record_eval

    def reduce_on_plateau(run, metrics):
        for group in run["optimizer"].param_groups:
            group["lr"] *= 0.5
        return real_record_eval(run, metrics)

    monkeypatch.setattr(tp, "record_eval", reduce_on_plateau)
    with pytest.raises(tp.TrainingAborted, match="S9: at step 3 "):
        tp.train(config("schedule.type=onecycle", "train.eval_every=2"), str(tmp_path / "run"), "none", quiet=True)


def test_s10_check_lr_curve_flags_a_frozen_or_zero_curve():
    cfg = config("schedule.type=cosine")
    plan = tp.plan_schedule(cfg, 400)
    curve = tp.lr_curve(cfg, plan)
    frozen = curve.copy()
    frozen[10:60] = frozen[10]
    zero = curve.copy()
    zero[20:] = 0.0
    assert tp.check_lr_curve(curve, cfg, plan) == []
    assert any("stays at" in m for _, m in tp.check_lr_curve(frozen, cfg, plan))
    assert any("LR is 0" in m for _, m in tp.check_lr_curve(zero, cfg, plan))


@pytest.mark.parametrize("yaml_text,key", [
    ("optim:\n  lr: abc\n", "optim.lr"),
    ("optim:\n  maxlr: 0.001\n", "optim.maxlr"),
    ("data:\n  train_x: /nonexistent/x.npy\n  train_y: {tmp}/y.npy\n  val_x: {tmp}/x.npy\n  val_y: {tmp}/y.npy\n",
     "data.train_x"),
    ("train:\n  grad_accum: 0\n", "train.grad_accum"),
    ("optim:\n  lr: -0.001\n", "optim.lr"),
    ("optim: [lr: 1\n", "bad.yaml"),
    ("task: distill\n", "task"),
    ("schedule:\n  type: cosine_restarts\n", "schedule.type"),
    ("schedule:\n  warmup: 5000\n", "schedule.warmup"),
], ids=["c1_string_not_a_number", "c2_misspelt_key", "c3_missing_file", "c3_grad_accum_0", "c3_negative_lr",
        "c3_malformed_yaml", "c3_wrong_task", "s6_unknown_schedule", "s3_warmup_longer_than_run"])
def test_c1_c2_c3_bad_config_exits_2_with_one_line_and_keeps_the_run_dir(tmp_path, yaml_text, key):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"precious")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    np.save(tmp_path / "x.npy", np.zeros((4, 2, 8), np.float32))
    np.save(tmp_path / "y.npy", np.zeros(4, np.int64))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text.replace("{tmp}", str(tmp_path)))
    out = run_script("--config", str(path), "--run_dir", str(run_dir))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert key in lines[0] and "Traceback" not in out.stderr
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == b"precious"
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_c2_misspelt_key_suggests_the_closest_valid_key():
    with pytest.raises(tp.ConfigError, match="did you mean optim.lr"):
        tp.resolve_config(None, ["optim.lrr=0.1"])


def test_c1_string_learning_rate_is_cast_and_noted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 3e-4\n")  # YAML 1.1: a string, not a float
    cfg, notes = tp.resolve_config(str(path))
    assert cfg["optim.lr"] == 3e-4 and isinstance(cfg["optim.lr"], float)
    assert notes and notes[0][:2] == ("C1", "optim.lr")


def test_c1_set_values_are_parsed_as_yaml_then_cast_without_a_note():
    cfg, notes = tp.resolve_config(None, ["optim.lr=3e-4", "train.epochs=5", "optim.betas=[0.9, 0.95]",
                                          "backbone.cache_features=false", "train.patience=null"])
    assert (cfg["optim.lr"], cfg["train.epochs"], cfg["optim.betas"]) == (3e-4, 5, [0.9, 0.95])
    assert notes == []  # the README's own `--set optim.lr=1e-3` is a number typed on the command line, not a YAML slip
    assert cfg["backbone.cache_features"] is False and cfg["train.patience"] is None
    with pytest.raises(tp.ConfigError, match="train.epochs"):
        tp.resolve_config(None, ["train.epochs=2.5"])


def test_backbone_is_frozen_and_bit_identical_after_training(tmp_path):
    backbone = tp.build_backbone(config(), 4)
    torch.nn.init.normal_(backbone.conv[0].weight)  # weights that differ from the seeded init
    torch.save(backbone.state_dict(), tmp_path / "backbone.pt")
    cfg = config(f"backbone.checkpoint={tmp_path}/backbone.pt", "backbone.cache_features=false")
    _, run = tp.train(cfg, str(tmp_path / "run"), "none", quiet=True)
    saved = torch.load(tmp_path / "backbone.pt", weights_only=True)
    after = run["backbone"].state_dict()
    assert all(torch.equal(saved[k], after[k]) for k in saved)
    assert not run["backbone"].training and not any(p.requires_grad for p in run["backbone"].parameters())
    optimized = {id(p) for g in run["optimizer"].param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in run["backbone"].parameters()}


def test_feature_cache_gives_the_same_training_as_the_uncached_path(tmp_path):
    _, on = tp.train(config("backbone.cache_features=true"), str(tmp_path / "on"), "none", quiet=True)
    _, off = tp.train(config("backbone.cache_features=false"), str(tmp_path / "off"), "none", quiet=True)
    for p, q in zip(on["module"].parameters(), off["module"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def brute_force_auroc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg))


def test_auroc_equals_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.random(500) + 0.3 * labels, 1)  # heavy ties
    assert tp.auroc(scores, labels) == pytest.approx(brute_force_auroc(scores, labels), abs=1e-12)
    assert tp.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # scikit-learn's documented example
    assert tp.auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        return
    assert tp.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_run_dir_layout_records_and_checkpoint_contract(tmp_path):
    run_dir = str(tmp_path / "run")
    tp.train(config("train.eval_every=5"), run_dir, "none", quiet=True)
    for name in ("config.yaml", "metrics.jsonl", "train.log", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    recs = records(run_dir)
    train_recs = [r for r in recs if "lr" in r]
    assert [r["step"] for r in train_recs] == list(range(1, 13))
    assert {"step", "epoch", "lr", "loss", "grad_norm", "samples_per_s"} <= set(train_recs[0])  # E7: throughput
    assert [r["epoch"] for r in train_recs] == [1] * 4 + [2] * 4 + [3] * 4
    evals = [r for r in recs if "val/auroc" in r]
    assert [r["step"] for r in evals] == [5, 10, 12] and {"val/bacc", "val/loss"} <= set(evals[0])
    c = ckpt(run_dir)  # R7: weights_only load
    for key in ("model", "optimizer", "scheduler", "rng", "global_step", "data_position", "config", "world_size"):
        assert key in c
    assert c["global_step"] == c["scheduler"]["last_epoch"] == 12  # R2
    assert c["data_position"] == {"epoch": 3, "step_in_epoch": 0, "seed": 0}


def test_r1_resume_none_refuses_a_run_dir_with_checkpoints(tmp_path):
    run_dir = str(tmp_path / "run")
    tp.train(config(), run_dir, "none", quiet=True)
    before = open(os.path.join(run_dir, "checkpoints/last.pt"), "rb").read()
    out = run_script(*sets(*TINY), "--run_dir", run_dir, "--resume", "none")
    assert out.returncode == 2 and "--resume" in out.stderr
    assert open(os.path.join(run_dir, "checkpoints/last.pt"), "rb").read() == before


def test_r1_c3_a_refused_resume_mode_leaves_every_file_of_the_run_dir_byte_identical(tmp_path):
    """--resume none on checkpoints (R1), a --resume PATH not there (C3), or a resume of an interrupted run that
    resume() refuses (S7: another schedule, data.limit; another seed) is refused before the feature cache is
    computed, the run dir opened or a feature file written: 'nothing was touched' holds for every file, and no new
    file appears. The dry run refuses the same, with the same line."""
    run_dir = str(tmp_path / "run")
    tp.train(config(), run_dir, "none", stop_after=5, quiet=True)

    def files():
        return {os.path.join(d, n): open(os.path.join(d, n), "rb").read() for d, _, ns in os.walk(run_dir) for n in ns}
    before = files()
    assert any(os.sep + "features" + os.sep in path for path in before)  # the cache a late refusal rewrote
    for mode, extra, line in (("none", [], "already holds checkpoints"),
                              (str(tmp_path / "gone.pt"), [], "gone.pt not found"),
                              ("auto", ["data.limit=20"], "num_samples 38 -> 20"), ("auto", ["seed=1"], "seed=0")):
        with pytest.raises(tp.ConfigError, match=line) as refused:
            tp.train(config(*extra), run_dir, mode, quiet=True)
        assert files() == before
        with pytest.raises(tp.ConfigError) as dry:
            tp.dry_run(None, TINY + extra, run_dir=run_dir, resume_mode=mode)
        assert str(dry.value) == str(refused.value) and files() == before


def test_finished_run_restarted_says_complete(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    tp.train(config(), run_dir, "none", quiet=True)
    capsys.readouterr()
    assert tp.main([*sets(*TINY), "--run_dir", run_dir]) == 0  # the restart, in this process
    assert "already complete" in capsys.readouterr().out


def test_r6_torn_last_checkpoint_falls_back_to_the_previous_one(tmp_path):
    cfg = config("train.save_every_steps=2")
    tp.train(cfg, str(tmp_path / "a"), "none", quiet=True)
    tp.train(cfg, str(tmp_path / "b"), "none", stop_after=7, quiet=True)
    last = tmp_path / "b/checkpoints/last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # a kill during a non-atomic write would leave this
    outcome, run = tp.train(cfg, str(tmp_path / "b"), "auto", quiet=True)
    assert outcome == "finished"
    assert "R6" in (tmp_path / "b/train.log").read_text()
    assert tp.checkpoint_tensors_equal(str(tmp_path / "a/checkpoints/last.pt"), str(last))


def test_s7_resume_with_a_changed_schedule_is_refused_unless_allowed(tmp_path):
    run_dir = str(tmp_path / "run")
    tp.train(config(), run_dir, "none", stop_after=5, quiet=True)
    with pytest.raises(tp.ConfigError, match="train.epochs 3 -> 4"):
        tp.train(config("train.epochs=4"), run_dir, "auto", quiet=True)
    outcome, run = tp.train(config("train.epochs=4", "train.allow_schedule_change=true"), run_dir, "auto", quiet=True)
    assert outcome == "finished" and run["state"]["global_step"] == 16
    assert run["scheduler"].last_epoch == 16


def test_r8_sigterm_finishes_the_step_saves_and_resume_is_bit_exact(tmp_path):
    base = sets(*TINY, "train.save_every_steps=1000")  # 12 steps, no periodic save: last.pt is the signal's
    whole, stopped = str(tmp_path / "whole"), str(tmp_path / "stopped")
    # held before step 5 until the signal (KIT_FAULT_HOLD_AT): however busy the machine, the run cannot finish
    # before this test sends its signal, so it needs no long run to outlast the wait
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_probe.py"), *base, "--run_dir", stopped],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "KIT_FAULT_HOLD_AT": "5"})
    deadline = time.time() + 120
    while time.time() < deadline:
        path = os.path.join(stopped, "metrics.jsonl")
        if os.path.exists(path) and sum(1 for _ in open(path)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    c = ckpt(stopped)
    assert 0 < c["global_step"] <= 5 and not c["finished"]  # the step in flight finished, then the save
    resumed, done = run_together(script_call(*base, "--run_dir", stopped), script_call(*base, "--run_dir", whole))
    assert resumed.returncode == done.returncode == 0, resumed.stderr + done.stderr
    assert "resumed from" in resumed.stdout
    assert tp.checkpoint_tensors_equal(os.path.join(whole, "checkpoints/last.pt"),
                                       os.path.join(stopped, "checkpoints/last.pt"))


def test_e1_identical_evals_are_flagged(tmp_path):
    run_dir = str(tmp_path / "run")
    tp.train(config("optim.lr=1e-15", "train.eval_every=4"), run_dir, "none", quiet=True)  # weights cannot move
    assert "WARNING E1" in open(os.path.join(run_dir, "train.log")).read()


def test_early_stopping_counts_patience_in_evals(tmp_path):
    outcome, run = tp.train(config("optim.lr=1e-15", "train.eval_every=1", "train.patience=2"),
                            str(tmp_path / "run"), "none", quiet=True)
    assert outcome == "early_stopped" and run["state"]["global_step"] == 3
    assert ckpt(str(tmp_path / "run"))["finished"]


def test_r8_a_relaunch_after_a_kill_before_the_first_save_says_it_starts_again_at_step_0(tmp_path):
    """A run killed 15 s in, before train.save_every_minutes' first save: its relaunch started at step 0 with
    'starting at step 0' alone, as if nothing had run (the README says a killed run resumes). It says the earlier
    attempt left a log but no checkpoint; a fresh run says nothing of the kind."""
    cfg, _ = tp.resolve_config(None, TINY + ["train.epochs=1"])
    run_dir = str(tmp_path / "run")
    assert tp.train(cfg, run_dir, "auto", quiet=True)[0] == "finished"
    shutil.rmtree(os.path.join(run_dir, "checkpoints"))  # what the killed attempt leaves: its log, no checkpoint
    assert tp.train(cfg, run_dir, "auto", quiet=True)[0] == "finished"
    with open(os.path.join(run_dir, "train.log")) as f:
        notes = [line for line in f if "note R8" in line]
    assert len(notes) == 1 and "no checkpoint (it stopped before its first save" in notes[0], notes
    assert "starting again at step 0" in notes[0]

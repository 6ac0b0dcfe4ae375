"""Warnings that fire on healthy runs are defects (issue 22): E1 on a converged model, E2 on an ordinary
KD run, E7 on the saw-tooth throughput of a cached probe, S5 when --set moves the schedule away from the
config's expect: block. Each rule is one function of the scripts (frozen_evals, dominating_loss,
drop_stale_expectations) that the in-run warning and diagnose_and_fix.py both call; the tests pin that
the healthy case is quiet and the failure the row is about is still caught."""
import contextlib
import io
import json
import math
import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import diagnose_and_fix as dx  # noqa: E402
import train_distill as td  # noqa: E402
import train_probe as tp  # noqa: E402
from run_records import PROBE_TINY as TINY, loud_findings, records  # noqa: E402
SHARE = tp.CONFIG["train.max_loss_share"][0]


def diagnose(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = dx.main([*argv, "--json"])
    return code, json.loads(out.getvalue())


def loud(report, rid=None):
    return [f for f in report["findings"] if f["severity"] != "info" and (rid is None or f["id"] == rid)]


def write_log(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


# ----------------------------------------------------------------------------- E2
def kd_records(shares_of_ce, kd_over_hidden=2.0):
    """Loss components of a KD run whose CE is the given share of the loss at each logged step."""
    out = []
    for i, ce in enumerate(shares_of_ce):
        rest = 1.0 - ce
        out.append((10 * (i + 1), {"ce": ce, "kd": rest * kd_over_hidden / (1 + kd_over_hidden),
                                   "hidden": rest / (1 + kd_over_hidden)}))
    return out


def test_e2_default_share_is_quiet_on_a_healthy_kd_run_and_catches_the_seeds_40x_feature_loss():
    assert td.CONFIG["train.max_loss_share"][0] == SHARE  # one default in both scripts
    # healthy: the KD term leads while the student is far from its teacher, then CE carries 90-100%
    healthy = kd_records([0.35, 0.5, 0.7, 0.9, 0.93, 0.96, 0.97, 0.99, 0.995, 0.999])
    assert td.dominating_loss(healthy, SHARE) == {}
    # the seed's failure: the feature (hidden-state) loss 40x the KD loss, CE about as large as KD
    seed = [(s, {"ce": 1.0, "kd": 1.0, "hidden": 40.0}) for s in range(10, 110, 10)]
    found = td.dominating_loss(seed, SHARE)
    assert list(found) == ["hidden"] and found["hidden"][:3] == (10, 100, 10) and found["hidden"][3] > 0.95
    # one noisy record over the share is not a weighting; three in a row are
    spike = kd_records([0.5, 0.5, 0.01, 0.5, 0.5], kd_over_hidden=100)
    assert td.dominating_loss(spike, SHARE) == {}
    assert set(td.dominating_loss(kd_records([0.5, 0.01, 0.01, 0.01, 0.5], kd_over_hidden=100), SHARE)) == {"kd"}


def test_e2_diagnose_uses_the_scripts_rule_and_names_the_step_range(tmp_path):
    steps = range(1, 31)
    healthy = [{"step": s, "lr": 1e-3, "loss": 2.0, "loss/ce": 0.9 + 0.003 * s, "loss/kd": 0.05, "loss/hidden": 0.01}
               for s in steps]
    _, report = diagnose("--log", write_log(tmp_path / "healthy.jsonl", healthy))
    assert loud(report, "E2") == []  # the old median-share rule said "loss/ce is 95%" here
    seed = [{**r, "loss/hidden": 40.0 * r["loss/kd"] if 10 <= r["step"] <= 20 else r["loss/hidden"],
             "loss/ce": r["loss/kd"] if 10 <= r["step"] <= 20 else r["loss/ce"]} for r in healthy]
    _, report = diagnose("--log", write_log(tmp_path / "seed.jsonl", seed))
    [e2] = loud(report, "E2")
    assert e2["evidence"].startswith("loss/hidden is above train.max_loss_share 90%") and "steps 10-20" in e2["evidence"]


# ----------------------------------------------------------------------------- E1
def test_e1_converged_model_is_not_frozen_but_lr_0_and_unmoved_weights_are():
    saturated = {"val/loss": 1.5e-7, "val/acc": 1.0, "val/auroc": 1.0}
    assert tp.frozen_evals(saturated, dict(saturated), 1.4e-3, 1.4e-3) is None  # from the log: loss at its floor, LR > 0
    assert tp.frozen_evals(saturated, dict(saturated), 1.4e-3, 1.4e-3, moved=True) is None
    assert "did not move" in tp.frozen_evals(saturated, dict(saturated), 1.4e-3, 1.4e-3, moved=False)
    assert "LR is 0" in tp.frozen_evals(saturated, dict(saturated), 0.0, 0.0)
    stuck = {"val/loss": 0.6931, "val/acc": 0.5}
    assert "stopped changing" in tp.frozen_evals(stuck, dict(stuck), 1e-3, 1e-3)
    assert tp.frozen_evals(stuck, {**stuck, "val/acc": 0.51}, 1e-3, 1e-3) is None


def test_e1_evals_repeating_where_the_schedule_annealed_the_lr_to_nothing_are_not_frozen():
    """Issue 31: a healthy OneCycle run's last evals, at LR 4e-9 of a 1e-3 peak, repeat to the last bit (the
    steps move the weights less than they show, or not at all): not frozen, from the log or in the run. An LR
    that is tiny from the start (1e-30, its own peak) or 0 throughout still is."""
    converged = {"val/loss": 0.4127, "val/auroc": 0.93}
    for moved in (None, False, True):
        assert tp.frozen_evals(converged, dict(converged), 4e-9, 1e-3, moved) is None
        assert td.frozen_evals(converged, dict(converged), 0.0, 1e-3, moved) is None  # cosine to 0: its last step
    assert tp.frozen_evals(converged, dict(converged), 1e-30, 1e-30) is not None
    assert tp.frozen_evals(converged, dict(converged), 2e-6, 1e-3, moved=False) is not None  # 1/500 of the peak


def test_e1_a_healthy_onecycle_probe_whose_last_evals_repeat_at_an_annealed_lr_is_quiet(tmp_path):
    """The false-positive corpus (issue 31): OneCycle from 1e-2 down to 4e-10 (final_div_factor 1e6), an eval
    after every step. The last step moves no weight enough to show, so its eval repeats the one before to the
    last bit: diagnose_and_fix.py --log said `2 evals in a row identical ... at steps 11-12` (and the run, at 120
    steps where no weight moved at all, `the trained parameters did not move at LR 4e-10`)."""
    settings = TINY + ["train.eval_every=1", "schedule.type=onecycle", "schedule.final_div_factor=1e6"]
    run_dir = str(tmp_path / "run")
    assert tp.train(tp.resolve_config(None, settings)[0], run_dir, "none", quiet=True)[0] == "finished"
    evals = [r for r in records(run_dir) if "val/loss" in r]
    assert evals[-1] == {**evals[-2], "step": evals[-1]["step"]}  # the case itself: identical last evals
    assert loud_findings(run_dir) == []


def test_e1_diagnose_of_a_converged_probe_log_reports_no_e1(tmp_path):
    """The issue's EEGPT-style probe: val loss saturated at 1.5e-7, AUROC 1.0, LR 1.4e-3, gradient norm
    1.6e-5, 15 identical evals. The same log with a val loss of 0.69 is a frozen model (E1 critical)."""
    records = []
    for s in range(1, 161):
        records.append({"step": s, "epoch": 1 + (s - 1) // 10, "lr": 1.4e-3, "loss": 0.5 / s, "grad_norm": 1.6e-5,
                        "samples_per_s": 1000.0})
        if s % 10 == 0:
            records.append({"step": s, "val/loss": 1.5e-7 if s > 10 else 0.3, "val/acc": 1.0, "val/auroc": 1.0})
    code, report = diagnose("--log", write_log(tmp_path / "converged.jsonl", records))
    assert loud(report, "E1") == [] and code == 0
    frozen = [{**r, "val/loss": 0.69} if "val/loss" in r else r for r in records]
    _, report = diagnose("--log", write_log(tmp_path / "frozen.jsonl", frozen))
    assert [f["severity"] for f in loud(report, "E1")] == ["critical"]


def test_e1_in_run_warning_is_quiet_on_saturated_evals_while_the_weights_move(tmp_path, monkeypatch):
    """A converged probe's evals repeat to the last bit while training still moves its weights: no warning.
    (tests/test_probe.py::test_e1_identical_evals_are_flagged: at LR 1e-15 the weights do not move.)"""
    monkeypatch.setattr(tp, "evaluate", lambda run, split: {"val/loss": 1.5e-7, "val/acc": 1.0, "val/auroc": 1.0})
    cfg, _ = tp.resolve_config(None, TINY + ["train.eval_every=1", "train.epochs=1"])
    outcome, run = tp.train(cfg, str(tmp_path / "run"), "none", quiet=True)
    log = open(tmp_path / "run" / "train.log").read()
    assert outcome == "finished" and log.count("eval step") >= 3 and "WARNING E1" not in log


# ----------------------------------------------------------------------------- E7
# samples_per_s of a real healthy run of configs/probe_synthetic.yaml (the README's main job) on this kit's
# 2-core test machine while other jobs ran: 32 optimizer steps per epoch, an eval at each epoch's end,
# log_every 20, cached features (a train step costs less than the eval and epoch start in its window).
PROBE_SYNTHETIC_RATES = {1: 142, 20: 1161, 40: 679, 60: 3049, 80: 1345, 100: 438, 120: 1282, 140: 2796, 160: 676,
                         180: 860, 200: 531, 220: 520, 240: 283, 260: 268, 280: 2876, 300: 810, 320: 854, 340: 1087,
                         360: 869, 380: 258, 400: 462, 420: 408, 440: 2376, 460: 2496, 480: 271, 500: 460, 520: 640,
                         540: 362, 560: 264, 580: 254, 600: 289, 620: 321, 640: 563}


def test_e7_saw_tooth_of_a_cached_probe_is_not_a_drop_but_a_sustained_slowdown_is(tmp_path):
    """The real run above was flagged `E7 samples_per_s fell to 254 (42% of the run's median)`: a healthy
    run. Its records whose window holds an eval or an epoch start are left out and the rest judged on a
    rolling median: no E7. A stall over 6 ordinary records in a row (a tenth of the rate) is still one."""
    def records(rates):
        out = [{"step": s, "epoch": 1 + (s - 1) // 32, "lr": 1e-3, "loss": 1.0 / s, "samples_per_s": float(r)}
               for s, r in rates.items()]
        out += [{"step": e, "val/loss": 1.0 / e} for e in range(32, 641, 32)]
        return sorted(out, key=lambda r: (r["step"], "val/loss" in r))
    _, report = diagnose("--log", write_log(tmp_path / "real.jsonl", records(PROBE_SYNTHETIC_RATES)))
    assert loud(report, "E7") == []
    steps = sorted(PROBE_SYNTHETIC_RATES)
    ordinary = [s for p, s in zip(steps, steps[1:])
                if (p - 1) // 32 == (s - 1) // 32 and not any(p <= e < s for e in range(32, 641, 32))]
    stall = {s: 0.1 * r if s in ordinary[3:9] else r for s, r in PROBE_SYNTHETIC_RATES.items()}
    _, report = diagnose("--log", write_log(tmp_path / "stall.jsonl", records(stall)))
    [e7] = loud(report, "E7")
    [(a, b)] = e7["at"]
    assert e7["severity"] == "warning" and ordinary[3] <= a <= b <= ordinary[8], (ordinary, e7["evidence"])


# ----------------------------------------------------------------------------- S5
def test_e7_more_loader_workers_than_cores_train_without_torchs_warning(tmp_path, monkeypatch):
    """configs/tuab_4s.yaml's train.num_workers: 4 with the feature cache off, on a 2-core machine: torch's
    'This DataLoader will create 4 worker processes ...' UserWarning twice an epoch. Here one core and 3 workers."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    cfg, _ = tp.resolve_config(None, TINY + ["backbone.cache_features=false", "train.num_workers=3", "train.epochs=1"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tp.train(cfg, str(tmp_path / "run"), "none", quiet=True)[0] == "finished"
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []  # not other tests' files


def test_s5_set_optim_lr_against_the_configs_expect_block_is_said_at_the_start_and_dropped(tmp_path):
    """The README's example: configs/probe_synthetic.yaml (expect: for lr 3e-3) with --set optim.lr=1e-3.
    The run notes it before its first step, trains, and its config.yaml carries no stale expect.*, so
    diagnose_and_fix.py --config of the run reports no S5."""
    path = os.path.join(ROOT, "configs", "probe_synthetic.yaml")
    cfg, _ = tp.resolve_config(path, TINY + ["train.epochs=1", "optim.lr=1e-3"])
    assert cfg["expect.final_lr"] == 1.2e-7
    outcome, _ = tp.train(cfg, str(tmp_path / "run"), "none", quiet=True)
    lines = open(tmp_path / "run" / "train.log").read().splitlines()
    note = [i for i, line in enumerate(lines) if "note S5" in line]
    first_step = next(i for i, line in enumerate(lines) if " step 1/" in line)
    assert outcome == "finished" and len(note) == 1 and note[0] < first_step
    assert "expect.final_lr is 1.2e-07" in lines[note[0]] and "4e-08" in lines[note[0]]
    _, report = diagnose("--config", str(tmp_path / "run" / "config.yaml"))
    assert loud(report, "S5") == []
    assert math.isclose(tp.resolve_config(path, TINY)[0]["expect.peak_lr"], 3e-3)  # the file's own run keeps it


# ----------------------------------------------------------------------------- E6
def e6(report):
    [found] = [f for f in report["findings"] if f["id"] == "E6" and "kd.teacher_cache" not in f["evidence"]]
    return found


def test_e6_memory_estimate_of_a_module_calling_item_in_init_is_built_on_the_cpu_and_says_so(tmp_path):
    path = tmp_path / "probe.yaml"
    path.write_text("task: probe\n")
    _, report = diagnose("--config", str(path), "--set", "backbone.target=zoo:item_in_init", "--set",
                         "backbone.kwargs={channels: 4}", "--set", "backbone.pool=mean_time",
                         *[a for s in TINY[:4] for a in ("--set", s)])
    found = e6(report)
    assert found["evidence"].startswith("estimated ") and "built on the CPU" in found["evidence"]
    assert "read a tensor's value" in found["evidence"] and "Error" not in found["evidence"]  # the expected failure
    zoo_cfg = ["backbone.kwargs={channels: 4}", "backbone.pool=mean_time"] + TINY[:4]
    meta = dx.probe_memory(tp, tp.resolve_config(None, ["backbone.target=zoo:conv_time"] + zoo_cfg)[0], {"batch_size": 4})
    cfg, _ = tp.resolve_config(None, ["backbone.target=zoo:item_in_init"] + zoo_cfg)
    assert dx.probe_memory(tp, cfg, {"batch_size": 4}, device="cpu") == meta  # the same numbers as a meta build


def test_e6_memory_estimate_of_hf_llama_teacher_and_gpt2_student_is_built_on_the_cpu(tmp_path):
    pytest.importorskip("transformers")
    import zoo
    teacher, student = zoo.hf_llama(tmp_path / "llama"), zoo.hf_gpt2(tmp_path / "gpt2")
    path = tmp_path / "kd.yaml"
    path.write_text("task: distill\n")
    _, report = diagnose("--config", str(path), "--set", "kd.enabled=true", "--set", f"kd.hf_teacher_dir={teacher}",
                         "--set", f"student.hf_dir={student}", "--set", "data.seq_len=64",
                         "--set", "data.builtin.train_bytes=20000", "--set", "data.builtin.val_bytes=5000")
    found = e6(report)
    assert found["evidence"].startswith("estimated ") and "built on the CPU" in found["evidence"], found
    assert "read a tensor's value" in found["evidence"] and "Error" not in found["evidence"], found  # a clean line

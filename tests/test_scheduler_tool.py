"""test_scheduler_dry_run.py (the top-level tool): its checks fail on the seeded mistakes, its inputs
fail cleanly, and its lr.csv is exactly the LR real training logs. Row ids refer to FAILURE_MODES.md."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = os.path.join(ROOT, "configs", "schedule_checks")
PROBE_CONFIG = os.path.join(ROOT, "configs", "probe_synthetic.yaml")


def load_tool():
    spec = importlib.util.spec_from_file_location("scheduler_dry_run_tool", os.path.join(ROOT, "test_scheduler_dry_run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = load_tool()
probe = tool.load_script("probe")  # the very module the tool uses, so monkeypatching reaches it


def run_tool(capsys, *argv):
    code = tool.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_csv(path):
    with open(path) as f:
        assert f.readline() == "step,lr\n"
        rows = [line.split(",") for line in f.read().splitlines()]
    steps = [int(s) for s, _ in rows]
    assert steps == list(range(1, len(rows) + 1))  # 1-based optimizer steps, every one of them
    return np.array([float(v) for _, v in rows])


def fail_lines(out):
    return [line.strip() for line in out.splitlines() if line.strip().startswith("FAIL")]


def write_yaml(path, tree):
    with open(path, "w") as f:
        yaml.safe_dump(tree, f)
    return path


def logged_lr(metrics_path):
    """step -> lr from metrics.jsonl; after a resume the LAST record for a step is the one that counts."""
    lrs = {}
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            if "lr" in record:
                lrs[record["step"]] = record["lr"]
    return lrs


# -----------------------------------------------------------------------------
# Passing configs, one per training script.
def test_probe_config_passes_with_derivation_table_plot_and_csv(capsys, tmp_path):
    code, out, err = run_tool(capsys, PROBE_CONFIG, "--out", tmp_path)
    assert code == 0, out + err
    cfg, _ = probe.resolve_config(PROBE_CONFIG, check_files=False)
    plan = probe.plan_schedule(cfg, probe.train_set_size(cfg))
    assert f"= {plan['micro_batches_per_epoch']} per epoch" in out and f"= {plan['total_steps']} optimizer steps" in out
    for row in ("step 1", "end of warmup", "peak", "25% of the run", "50% of the run", "75% of the run", "100% = final step"):
        assert row in out
    plot = [line for line in out.splitlines() if line[10:11] == "|"]
    assert len(plot) == tool.PLOT_HEIGHT and all(len(line) == 11 + tool.PLOT_WIDTH for line in plot)
    assert not fail_lines(out)
    curve = read_csv(tmp_path / "lr.csv")
    assert np.array_equal(curve, probe.lr_curve(cfg, plan))  # exact, not approximately
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "lr.png").exists()
    except ImportError:
        assert not (tmp_path / "lr.png").exists() and "matplotlib is not installed" in out


def distill_or_skip(name):
    path = os.path.join(ROOT, "configs", name)
    if not os.path.exists(os.path.join(ROOT, "train_distill.py")):
        pytest.skip("train_distill.py is not in this checkout yet")
    if not os.path.exists(path):
        pytest.skip(f"configs/{name} is not in this checkout yet")
    return path


def test_distill_demo_config_passes(capsys, tmp_path):
    path = distill_or_skip("distill_demo.yaml")  # the built-in corpus: its size is known on any machine
    code, out, err = run_tool(capsys, path, "--out", tmp_path)
    assert code == 0, out + err
    assert "task distill -> train_distill.py" in out and not fail_lines(out)
    distill = sys.modules["train_distill"]
    cfg, _ = distill.resolve_config(path, check_files=False)
    plan = distill.plan_schedule(cfg, distill.train_set_size(cfg))
    assert np.array_equal(read_csv(tmp_path / "lr.csv"), distill.lr_curve(cfg, plan))


def test_distill_reference_config_passes_with_num_samples(capsys, tmp_path):
    path = distill_or_skip("distill_reference.yaml")  # real token files that are not on this machine
    code, out, err = run_tool(capsys, path, "--num_samples", 100000, "--world_size", 2, "--out", tmp_path)
    assert code == 0, out + err
    assert "ceil(100000 / (batch_size" in out and "x world_size 2)" in out and not fail_lines(out)


def test_default_out_dir_is_runs_run_name_schedule(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_tool(capsys, PROBE_CONFIG)
    assert code == 0
    assert (tmp_path / "runs" / "probe_synthetic" / "schedule" / "lr.csv").exists()


# -----------------------------------------------------------------------------
# The seeded mistakes: each fails with its row id.
def test_s5_expected_final_lr_torch_will_not_produce_is_flagged(capsys, tmp_path):
    code, out, _ = run_tool(capsys, os.path.join(CHECKS, "expect_final_lr_wrong.yaml"), "--out", tmp_path)
    assert code == 1
    fails = fail_lines(out)
    assert len(fails) == 1 and fails[0].startswith("FAIL S5") and "expect.final_lr" in fails[0] and "1.2e-07" in fails[0]


def test_s3_warmup_longer_than_run_is_flagged(capsys, tmp_path):
    code, out, _ = run_tool(capsys, os.path.join(CHECKS, "warmup_longer_than_run.yaml"), "--out", tmp_path)
    assert code == 1
    fails = fail_lines(out)
    assert len(fails) == 1 and fails[0].startswith("FAIL S3") and "640 optimizer steps" in fails[0]
    assert "= 640 optimizer steps" in out  # the derivation of the real run length is still shown
    assert not (tmp_path / "lr.csv").exists()


def test_s2_schedule_sized_in_micro_batches_is_flagged(capsys, tmp_path):
    code, out, _ = run_tool(capsys, os.path.join(CHECKS, "schedule_in_micro_batches.yaml"), "--out", tmp_path)
    assert code == 1
    fails = fail_lines(out)
    assert len(fails) == 1 and fails[0].startswith("FAIL S2") and "16x" in fails[0]
    assert "ceil(64 / grad_accum 16) = 4 per epoch" in out
    assert not (tmp_path / "lr.csv").exists()


# -----------------------------------------------------------------------------
# The checks the seeded configs cannot reach: broken code must make them fail (proof they can).
def test_r3_resume_check_fails_when_scheduler_state_is_not_restored(capsys, tmp_path, monkeypatch):
    # the classic resume bug: a fresh scheduler whose position is not restored restarts its curve
    monkeypatch.setattr(torch.optim.lr_scheduler.OneCycleLR, "load_state_dict", lambda self, state: None)
    code, out, _ = run_tool(capsys, PROBE_CONFIG, "--out", tmp_path, "--resume_at", 100)
    assert code == 1
    fails = fail_lines(out)
    assert len(fails) == 1 and fails[0].startswith("FAIL R3") and "after step 100" in fails[0] and "from step 102" in fails[0]


def test_s7_scheduler_sized_shorter_than_run_is_flagged(capsys, tmp_path, monkeypatch):
    real = probe.build_schedule
    monkeypatch.setattr(probe, "build_schedule",
                        lambda opt, cfg, plan: real(opt, cfg, {**plan, "total_steps": plan["total_steps"] - 1}))
    code, out, _ = run_tool(capsys, PROBE_CONFIG, "--out", tmp_path)
    assert code == 1
    fails = fail_lines(out)
    assert len(fails) == 1 and fails[0].startswith("FAIL S7") and "Tried to step" in fails[0]
    assert not (tmp_path / "lr.csv").exists()


def test_s10_schedule_that_does_not_move_is_flagged(capsys, tmp_path, monkeypatch):
    # S6/S10: the config says cosine but the code runs a constant LR
    monkeypatch.setattr(probe, "build_schedule", lambda opt, cfg, plan: torch.optim.lr_scheduler.ConstantLR(opt, 1.0, 0))
    code, out, _ = run_tool(capsys, PROBE_CONFIG, "--set", "schedule.type=cosine", "--set", "expect.initial_lr=null",
                            "--set", "expect.final_lr=null", "--out", tmp_path)
    assert code == 1
    fails = fail_lines(out)
    assert fails and all(f.startswith("FAIL S10") for f in fails)
    assert any("where the schedule should move" in f for f in fails)


# -----------------------------------------------------------------------------
# Inputs: sizes from headers or --num_samples, world size, and bad input as one line with exit 2.
def test_npy_header_sizes_the_schedule_and_world_size_divides_micro_batches(capsys, tmp_path):
    for split, n in (("train", 77), ("val", 5)):
        np.save(tmp_path / f"{split}_x.npy", np.zeros((n, 2, 8), np.float32))
        np.save(tmp_path / f"{split}_y.npy", np.zeros(n, np.int64))
    config = write_yaml(tmp_path / "npy.yaml", {
        "task": "probe", "train": {"epochs": 3, "batch_size": 4, "grad_accum": 2},
        "data": {f"{s}_{k}": str(tmp_path / f"{s}_{k}.npy") for s in ("train", "val") for k in ("x", "y")}})
    code, out, _ = run_tool(capsys, config, "--world_size", 2, "--out", tmp_path / "o")
    assert code == 0, out
    assert "77  (train_probe.train_set_size: size/header of data.train_x" in out
    assert "ceil(77 / (batch_size 4 x world_size 2)) = 10 per epoch" in out
    assert "ceil(10 / grad_accum 2) = 5 per epoch" in out and "5 x 3 epochs = 15 optimizer steps" in out
    assert len(read_csv(tmp_path / "o" / "lr.csv")) == 15


def test_data_not_on_this_machine_needs_num_samples(capsys, tmp_path):
    config = write_yaml(tmp_path / "remote.yaml", {
        "task": "probe", "data": {f"{s}_{k}": f"/nonexistent/{s}_{k}.npy" for s in ("train", "val") for k in ("x", "y")}})
    code, out, err = run_tool(capsys, config, "--out", tmp_path / "o")
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert "not on this machine" in err and "--num_samples" in err
    assert not (tmp_path / "o").exists()
    code, out, _ = run_tool(capsys, config, "--num_samples", 409455, "--out", tmp_path / "o")
    assert code == 0 and "409455  (--num_samples)" in out


@pytest.mark.parametrize("yaml_text, argv, names", [
    ("task: probe\noptim:\n  maxlr: 1.0e-3\n", [], "optim.maxlr"),                # C2 with its suggestion
    ("task: probe\ntrain:\n  grad_accum: 0\n", [], "train.grad_accum"),            # C3
    ("task: probe\noptim:\n  lr: fast\n", [], "optim.lr"),                         # C1
    ("task: nosuch\n", [], "train_nosuch.py"),                                     # no script for the task
    ("task: probe\n", ["--num_samples", "0"], "--num_samples"),
    ("task: probe\n", ["--world_size", "0"], "--world_size"),
    ("task: probe\n", ["--resume_at", "100000"], "--resume_at"),
    ("task: probe\n", ["--bogus"], "--bogus"),
])
def test_bad_input_exits_2_with_one_line_naming_it(capsys, tmp_path, yaml_text, argv, names):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    code, out, err = run_tool(capsys, config, *argv, "--out", tmp_path / "o")
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and names in err
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file_exits_2_and_leaves_it_alone(capsys, tmp_path):
    target = tmp_path / "lr_here"
    target.write_text("mine")
    code, out, err = run_tool(capsys, PROBE_CONFIG, "--out", target)
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and "--out" in err
    assert target.read_text() == "mine"


def test_malformed_config_exits_2_with_one_line_and_no_traceback(tmp_path):
    config = tmp_path / "malformed.yaml"
    config.write_text("task: probe\noptim:\n  lr: [1.0e-3,\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "test_scheduler_dry_run.py"), str(config),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


# -----------------------------------------------------------------------------
# The claim that matters: lr.csv is the LR real training uses, step for step (S1, S8, R3).
# 90 samples / batch 4 = 23 micro-batches -> 12 optimizer steps per epoch (a short last group) -> 36 steps
TINY = ["data.synthetic.num_train=90", "data.synthetic.num_val=16", "data.synthetic.length=256",
        "train.batch_size=4", "train.grad_accum=2", "train.epochs=3", "train.log_every=1", "train.eval_batch_size=64",
        "expect.initial_lr=null", "expect.peak_lr=null", "expect.final_lr=null"]


def train_probe(run_dir, settings, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "KIT_FAULT_KILL_AT"}
    env.update(env_extra or {})
    argv = [sys.executable, os.path.join(ROOT, "train_probe.py"), "--config", PROBE_CONFIG, "--run_dir", str(run_dir)]
    for item in settings:
        argv += ["--set", item]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)


def test_lr_csv_equals_lr_logged_by_real_training_at_every_step(capsys, tmp_path):
    import train_probe as tp  # the real run in this process (the next test's killed and resumed run is processes)
    assert tp.train(tp.resolve_config(PROBE_CONFIG, TINY)[0], str(tmp_path / "run"), "none", quiet=True)[0] == "finished"
    code, out, _ = run_tool(capsys, PROBE_CONFIG, *[a for s in TINY for a in ("--set", s)], "--out", tmp_path / "sched")
    assert code == 0, out
    curve = read_csv(tmp_path / "sched" / "lr.csv")
    logged = logged_lr(tmp_path / "run" / "metrics.jsonl")
    assert len(curve) == 36 and sorted(logged) == list(range(1, 37))
    assert [logged[s] for s in range(1, 37)] == curve.tolist()  # exact float equality at every step


def test_lr_csv_equals_lr_logged_by_a_killed_and_resumed_run(capsys, tmp_path):
    settings = TINY + ["schedule.type=wsd", "train.save_every_steps=7"]  # SequentialLR phases across the resume
    killed = train_probe(tmp_path / "run", settings, {"KIT_FAULT_KILL_AT": "20:0"})
    assert killed.returncode == -9, killed.stderr  # SIGKILLed before step 20; last save at step 14
    resumed = train_probe(tmp_path / "run", settings)
    assert resumed.returncode == 0, resumed.stderr
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        events = [json.loads(line) for line in f if '"event"' in line]
    assert [e["step"] for e in events if e["event"] == "resume"] == [14]  # it continued, it did not restart
    code, out, _ = run_tool(capsys, PROBE_CONFIG, *[a for s in settings for a in ("--set", s)],
                            "--resume_at", 14, "--out", tmp_path / "sched")
    assert code == 0, out
    curve = read_csv(tmp_path / "sched" / "lr.csv")
    logged = logged_lr(tmp_path / "run" / "metrics.jsonl")
    assert sorted(logged) == list(range(1, 37))
    assert [logged[s] for s in range(1, 37)] == curve.tolist()


class StopAfterTheScheduleCheck(Exception):
    pass


@pytest.mark.parametrize("task", ["probe", "distill"])
def test_s2_max_steps_alone_replaces_the_default_epochs_with_a_note(capsys, tmp_path, task):
    """train.max_steps named, train.epochs nowhere: the run is those steps (the Hugging Face Trainer's rule),
    and one note says the default epochs stepped aside; the script, its dry run and this tool agree. A --set of
    either replaces the other named in the file (the later word), with the note; both named at one level (both in
    the file, or both by --set): today's refusal, exactly one of them."""
    script = tool.load_script(task)
    cfg, notes = script.resolve_config(None, ["train.max_steps=30"])
    assert (cfg["train.epochs"], cfg["train.max_steps"]) == (None, 30)
    note = (f"train.epochs: null instead of its default {script.CONFIG['train.epochs'][0]}: train.max_steps 30 sets "
            "the run's length")
    assert [f"{key}: {msg}" for rid, key, msg in notes if rid == "S2"] == [note]
    config = tmp_path / "run.yaml"
    config.write_text(f"task: {task}\n")
    code, out, _ = run_tool(capsys, config, "--set", "train.max_steps=30", "--out", tmp_path / "sched")
    assert code == 0 and f"note S2: {note}\n" in out and "train.max_steps = 30 optimizer steps" in out, out

    def stop(*args, **kwargs):  # the dry run's tiny runs are other tests' business
        raise StopAfterTheScheduleCheck
    with pytest.raises(StopAfterTheScheduleCheck):
        script.dry_run(str(config), ["train.max_steps=30"], train_fn=stop)
    assert "ok   full schedule: 30 optimizer steps" in capsys.readouterr().out
    config.write_text(f"task: {task}\ntrain: {{epochs: 2}}\n")
    # --set names the later value: it replaces the file's, whichever of the two the file names
    for settings, want, note in ((["train.max_steps=30"], (None, 30), "train.epochs: null instead of the config "
                                  "file's 2: train.max_steps 30 sets the run's length"),
                                 (["train.epochs=3"], (3, None), None)):
        cfg, notes = script.resolve_config(str(config), settings)
        assert (cfg["train.epochs"], cfg["train.max_steps"]) == want
        assert [f"{key}: {msg}" for rid, key, msg in notes if rid == "S2"] == ([note] if note else [])
    steps = tmp_path / "steps.yaml"
    steps.write_text(f"task: {task}\ntrain: {{epochs: null, max_steps: 30}}\n")
    cfg, notes = script.resolve_config(str(steps), ["train.epochs=3"])
    assert (cfg["train.epochs"], cfg["train.max_steps"]) == (3, None)
    assert [f"{key}: {msg}" for rid, key, msg in notes if rid == "S2"] == [
        "train.max_steps: null instead of the config file's 30: train.epochs 3 sets the run's length"]
    config.write_text(f"task: {task}\ntrain: {{epochs: 2, max_steps: 30}}\n")  # both named at one level: refused
    for path, settings in ((None, ["train.epochs=2", "train.max_steps=30"]), (str(config), [])):
        with pytest.raises(script.ConfigError) as err:
            script.resolve_config(path, settings)
        assert [(rid, key) for rid, key, _ in err.value.problems] == [("C3", "train.epochs")]
        assert "set exactly one of them" in str(err.value)
    code, out, err = run_tool(capsys, config)
    assert code == 2 and err.strip().splitlines() == ["config error: train.epochs: 2 and train.max_steps: set exactly "
                                                      "one of them (the other null)"], err

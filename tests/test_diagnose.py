"""diagnose_and_fix.py against the failure catalogue.

Config side: every configs/broken/*.yaml is caught with the id and severity its header names, every good
config in configs/ is clean, and --fix output diagnoses clean and loads in the training script.
Log and checkpoint side: logs and checkpoints of REAL short runs of the training scripts, with the fault
made by the run itself (a window whose loss overflows, an outlier window, fp16 overflow, an LR of 1e-30, a cosine
schedule that cannot decay, a dominating distillation term) or by a documented edit of the real log/checkpoint.
"""
import contextlib
import copy
import glob
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import diagnose_and_fix as dx  # noqa: E402
from run_records import teacher_run  # noqa: E402

BROKEN = sorted(glob.glob(os.path.join(ROOT, "configs", "broken", "*.yaml")))
GOOD = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))  # broken/ and schedule_checks/ are subdirectories
HAS_DISTILL = os.path.isfile(os.path.join(ROOT, "train_distill.py"))
NEEDS_DISTILL = pytest.mark.skipif(not HAS_DISTILL, reason="train_distill.py is not in this checkout yet")
# The catalogue rows whose diagnose column has C (FAILURE_MODES.md); each needs a broken config.
CONFIG_ROWS = {"S2", "S3", "S4", "S5", "S6", "E4", "E6", "G5", "C1", "C2", "C3"}
CONFIG_ROWS |= {"E2", "G6", "E12"} if HAS_DISTILL else set()


def diagnose(*argv):
    """Run the tool in-process with --json; returns (exit code, report)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = dx.main([*argv, "--json"])
    report = json.loads(out.getvalue())
    assert report["exit_code"] == code == (1 if report["counts"]["critical"] else 0)  # C3: 2 is refused input
    return code, report


def flagged(report, source=None):
    """{(id, severity)} of the critical and warning findings."""
    return {(f["id"], f["severity"]) for f in report["findings"]
            if f["severity"] != "info" and (source is None or f["source"] == source)}


def find(report, rid, source=None):
    hits = [f for f in report["findings"] if f["id"] == rid and (source is None or f["source"] == source)]
    assert hits, f"no {rid} finding in {[(f['id'], f['severity'], f['evidence']) for f in report['findings']]}"
    return hits[0]


def header(path):
    """The machine-readable lines of a broken config's header comment."""
    text = open(path).read()
    expect = re.search(r"^# expect: (\S+) (critical|warning|info)$", text, re.M)
    gpu = re.search(r"^# expect with a bf16 GPU: (\S+) (critical|warning|info)$", text, re.M)
    args = re.search(r"^# diagnose with: (.*)$", text, re.M)
    task = re.search(r"^task: (\w+)", text, re.M)
    return {"expect": (expect.group(1), expect.group(2)), "gpu": gpu and (gpu.group(1), gpu.group(2)),
            "args": args.group(1).split() if args else [], "fixable": "# fixable: no" not in text,
            "task": task.group(1) if task else "probe",
            "named": text.startswith(f"# Broken on purpose: {expect.group(1)}")}


def expected(head):
    if head["gpu"] and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return head["gpu"]
    return head["expect"]


def skip_without_script(head):
    if not os.path.isfile(os.path.join(ROOT, f"train_{head['task']}.py")):
        pytest.skip(f"train_{head['task']}.py is not in this checkout yet")


def broken_id(path):
    return os.path.basename(path)[:-5]


# -----------------------------------------------------------------------------
# Config checks
def test_every_config_row_of_the_catalogue_has_a_broken_config_named_in_its_header():
    heads = [header(p) for p in BROKEN]
    assert all(h["named"] for h in heads), "each broken config starts with '# Broken on purpose: <ID>'"
    assert CONFIG_ROWS <= {h["expect"][0] for h in heads}


@pytest.mark.parametrize("path", BROKEN, ids=broken_id)
def test_broken_config_is_caught_with_its_id_and_severity(path):
    head = header(path)
    skip_without_script(head)
    rid, severity = expected(head)
    code, report = diagnose("--config", path, *head["args"])
    if severity == "info":
        assert find(report, rid)["severity"] == "info"
        assert flagged(report) == set() and code == 0
    else:  # exactly this mistake: the rest of each broken config is valid
        assert flagged(report) == {(rid, severity)}
        assert code == (1 if severity == "critical" else 0) and report["counts"]["critical"] == (severity == "critical")
    for f in report["findings"]:
        assert f["evidence"] and f["fix"]


@pytest.mark.parametrize("path", GOOD, ids=lambda p: os.path.basename(p))
def test_good_configs_are_clean(path):
    """No critical or warning finding. Files this machine lacks (real data, a teacher checkpoint the
    README's first command makes) are the only exception; then the schedule is judged with --num_samples."""
    code, report = diagnose("--config", path)
    missing = [f for f in report["findings"] if f["id"] == "C3" and f["evidence"].startswith("not found:")]
    assert flagged(report) - {("C3", "critical")} == set()
    assert code == report["counts"]["critical"] == len(missing) <= 1
    if report["plan"] is None:
        assert missing, "without missing files the run's length must be known"
        stated = re.search(r"--num_samples (\d+)", open(path).read())  # a size the config's comments give
        code, report = diagnose("--config", path, "--num_samples", stated.group(1) if stated else "100000")
        assert report["plan"] is not None and flagged(report) == set() and code == 0


@pytest.mark.parametrize("path", [p for p in BROKEN if header(p)["fixable"]], ids=broken_id)
def test_fix_output_diagnoses_clean_and_loads_in_the_training_script(path, tmp_path):
    head = header(path)
    skip_without_script(head)
    before = open(path, "rb").read()
    out = tmp_path / "fixed.yaml"
    code, report = diagnose("--config", path, *head["args"], "--fix", "--output", str(out))
    assert code == (1 if report["counts"]["critical"] else 0)  # the exit code is the input's diagnosis
    assert open(path, "rb").read() == before  # the input is never touched
    assert report["fix"]["written"] and report["fix"]["remaining_critical"] == 0
    rid, severity = expected(head)
    text = out.read_text()
    assert text.startswith("# Fixed by diagnose_and_fix.py")
    for change in report["fix"]["changes"]:  # the header lists every change with its row id
        assert re.search(rf"^#   {re.escape(change['key'])}: .* \[{change['id']}\]", text, re.M)
    if severity != "info":
        assert report["fix"]["changes"], "a flagged mistake with a known fix must change the config"
    code, fixed = diagnose("--config", str(out), *head["args"])
    assert code == 0 and (rid, severity) not in flagged(fixed)
    script = dx.training_script(head["task"])
    cfg, _ = script.resolve_config(str(out), (), check_files="--num_samples" not in head["args"])
    assert cfg["task"] == head["task"]


def test_fix_refuses_without_output_and_overwrites_the_input_only_when_named(tmp_path):
    src = tmp_path / "s4.yaml"
    src.write_text(open(os.path.join(ROOT, "configs", "broken", "s4_onecycle_cycle_momentum_adamw.yaml")).read())
    before = src.read_text()
    assert dx.main(["--config", str(src), "--fix"]) == 2
    assert src.read_text() == before
    diagnose("--config", str(src), "--fix", "--output", str(src))  # the same path, given on purpose
    assert src.read_text() != before
    code, report = diagnose("--config", str(src))
    assert code == 0 and ("S4", "warning") not in flagged(report)


@pytest.mark.parametrize("text", [b"task: probe\noptim:\n  lr: [5.0e-4\n  name: adamw\n", b"- a list\n- a list\n",
                                  b"run_name: caf\xe9\n", b"\xff\xfe\x00binary"],
                         ids=["not_yaml", "not_a_mapping", "latin_1", "binary"])  # empty: tests/test_config_cli.py
def test_c3_a_config_file_that_holds_no_config_is_refused_with_the_runs_line_and_exit_2(text, tmp_path, capsys):
    """The run refuses these before it starts (exit 2, one line); diagnose made each one CRITICAL C3 finding, exit
    1, the exit code of a config it had judged (a binary file: 'cannot be read (UnicodeDecodeError ...)'). A file
    with no config is no input to judge: the run's own line, exit 2, nothing on stdout, --fix writes nothing."""
    path = tmp_path / "config.yaml"
    path.write_bytes(text)
    with pytest.raises(dx.training_script("probe").ConfigError) as refused:
        dx.training_script("probe").resolve_config(str(path))
    for extra in ([], ["--fix", "--output", str(tmp_path / "fixed.yaml")], ["--json"]):
        assert dx.main(["--config", str(path), *extra]) == 2
        out, err = capsys.readouterr()
        assert (out, err) == ("", f"{refused.value}\n") and len(err.splitlines()) == 1, (out, err)
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_c3_diagnose_exit_codes_tell_refused_input_from_critical_findings(tmp_path, capsys):
    """The exit code was the number of critical findings: two findings exited 2, as refused input does, so a cron
    job or CI step could not tell bad input from a diagnosis without parsing stdout. Now 0 = no critical finding,
    1 = one or more (the count is in the summary line and --json's counts), 2 = refused input (ruff, mypy, pytest)."""
    two = tmp_path / "two.yaml"
    two.write_text("train:\n  grad_accum: 0\n  batch_size: many\n")
    code, report = diagnose("--config", str(two))
    assert flagged(report) == {("C3", "critical"), ("C1", "critical")}  # train.grad_accum, train.batch_size
    assert (code, report["exit_code"], report["counts"]["critical"]) == (1, 1, 2)
    assert dx.main(["--config", str(two)]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("2 critical, 0 warning, ")
    assert dx.main(["--config", str(two), "--fix", "--output", str(tmp_path / "fixed.yaml")]) == 1  # the input's
    capsys.readouterr()
    (tmp_path / "empty.yaml").write_text("")  # refused: the run's one line, nothing on stdout
    assert dx.main(["--config", str(tmp_path / "empty.yaml"), "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "is empty (no keys)" in err, (out, err)


def test_c1_string_number_is_reported_not_silent_and_bad_values_all_reported_at_once(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("optim:\n  lr: 3e-4\n  maxlr: 1\ntrain:\n  grad_accum: 0\n  batch_size: many\n")
    code, report = diagnose("--config", str(path))
    assert flagged(report) == {("C1", "warning"), ("C2", "critical"), ("C3", "critical"), ("C1", "critical")}
    assert code == 1 and report["counts"]["critical"] == 3
    assert "'3e-4'" in find(report, "C1")["evidence"] or any("'3e-4'" in f["evidence"] for f in report["findings"])


def test_c1_a_mistyped_boolean_is_fixed_to_the_closest_word_not_the_default(tmp_path):
    # a new user's 'kd.enabled: ture': the fix said 'set kd.enabled to False' (the default), and the fixed config
    # was refused again (kd.hf_teacher_dir set with kd.enabled false); 'ture' is true, 'flase' false
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  allow_schedule_change: ture\n")
    code, report = diagnose("--config", str(path), "--fix", "--output", str(tmp_path / "fixed.yaml"))
    assert code == report["counts"]["critical"] == 1
    assert find(report, "C1")["fix"] == "set train.allow_schedule_change to True (the closest valid choice)"
    assert yaml.safe_load((tmp_path / "fixed.yaml").read_text())["train"]["allow_schedule_change"] is True


def test_s2_steps_are_derived_from_samples_batch_accumulation_and_world_size():
    """4000 samples, batch 64, 2 processes -> ceil(4000/128) = 32 micro-batches -> ceil(32/2) = 16 steps
    per epoch x 20 epochs = 320; the same config on one process has 640."""
    path = os.path.join(ROOT, "configs", "probe_synthetic.yaml")
    _, one = diagnose("--config", path)
    _, two = diagnose("--config", path, "--world_size", "2")
    assert one["plan"]["total_steps"] == 640 and two["plan"]["total_steps"] == 320
    assert "= 32 micro-batches per epoch; ceil(32 / grad_accum 2) = 16 optimizer steps" in find(two, "S2")["evidence"]
    _, n = diagnose("--config", path, "--num_samples", "1000", "--set", "train.grad_accum=4")
    assert n["plan"]["steps_per_epoch"] == 4 and n["plan"]["total_steps"] == 80


def test_s5_real_initial_peak_and_final_lr_are_printed():
    _, report = diagnose("--config", os.path.join(ROOT, "configs", "broken", "s5_expected_final_lr_wrong.yaml"))
    info = [f for f in report["findings"] if f["id"] == "S5" and f["severity"] == "info"][0]
    assert "step 1 LR 0.00012" in info["evidence"] and "peak 0.003" in info["evidence"]
    assert "last step (1260) 1.2e-07" in info["evidence"]
    critical = [f for f in report["findings"] if f["id"] == "S5" and f["severity"] == "critical"][0]
    assert critical["changes"] == [{"key": "expect.final_lr", "value": 1.2e-07, "remove": False}]


# -----------------------------------------------------------------------------
# Real short runs (started once, in parallel) and their logs/checkpoints.
TINY_PROBE = ["data.synthetic.num_train=256", "data.synthetic.num_val=64", "data.synthetic.channels=4",
              "data.synthetic.length=128", "backbone.kwargs={width: 8, heads: 2}", "train.epochs=4",
              "train.batch_size=16", "train.log_every=1", "train.eval_every=8", "optim.lr=3e-3"]
NPY_PROBE = ["backbone.target=torch.nn:Flatten", "head.standardize=false", "train.epochs=4", "train.batch_size=8",
             "train.log_every=1", "optim.lr=3e-3"]
TINY_DISTILL = ["train.epochs=null", "train.max_steps=6", "train.batch_size=4", "train.log_every=1",
                "train.eval_every=3", "data.seq_len=32", "data.builtin.train_bytes=20000",
                "data.builtin.val_bytes=5000",
                "data.val_windows=8", "teacher.n_layer=1", "teacher.n_embd=32", "teacher.n_head=2", "student.n_layer=1",
                "student.n_embd=16", "student.n_head=2", "schedule.warmup=2"]


def npy_data(directory, scale=1.0, nan_window=None, outlier_window=None):
    """128 windows [4, 64] of Gaussian noise, class 1 shifted by 0.3; optionally one window of 3e38 (finite, so
    not refused as a NaN would be (C9), but its loss overflows: the run's non-finite steps) and one window
    multiplied by -1000 (its logits then point the wrong way: a gradient spike)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 4, 64)).astype(np.float32)
    y = (rng.random(128) < 0.5).astype(np.int64)
    x[y == 1] += 0.3
    val_x, val_y = x[:32].copy(), y[:32].copy()
    x *= scale
    if nan_window is not None:
        x[nan_window] = 3e38
    if outlier_window is not None:
        x[outlier_window] *= -1000
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for name, array in (("train_x", x), ("train_y", y), ("val_x", val_x), ("val_y", val_y)):
        paths[name] = os.path.join(directory, f"{name}.npy")
        np.save(paths[name], array)
    return [f"data.{k}={v}" for k, v in paths.items()]


def launch(script, run_dir, overrides):
    cmd = [sys.executable, os.path.join(ROOT, script), "--run_dir", str(run_dir), "--resume", "none"]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("diagnose_runs")
    jobs = {
        "clean": ("train_probe.py", TINY_PROBE),
        # E1 / S10: an LR of 1e-30 is legal but moves no fp32 weight: evals repeat exactly, the loss stays flat
        "frozen": ("train_probe.py", TINY_PROBE + ["optim.lr=1e-30"]),
        # S1: cosine with final_lr_ratio 1 cannot decay: the LR the run logs is flat where the type should move
        "flat": ("train_probe.py", TINY_PROBE + ["schedule.type=cosine", "schedule.final_lr_ratio=1.0"]),
        # G4 + G3: a window whose loss overflows (its steps are skipped) and a -1000x outlier (gradient spikes)
        "faulty": ("train_probe.py", NPY_PROBE + npy_data(base / "faulty_data", nan_window=5, outlier_window=77)),
        # G5: fp16 with raw 200x features: GradScaler overflows and skips steps while it backs off
        "fp16": ("train_probe.py", NPY_PROBE + npy_data(base / "fp16_data", scale=200.0)
                 + ["train.precision=fp16", "train.epochs=2", "optim.lr=5e-4"]),
    }
    procs = {}
    if HAS_DISTILL:  # first: the student needs its checkpoint while the probe runs go on
        procs["teacher"] = launch("train_distill.py", base / "teacher", teacher_run(TINY_DISTILL))
    procs.update({name: launch(script, base / name, overrides) for name, (script, overrides) in jobs.items()})
    pending = list(procs)
    while pending:
        name = pending.pop(0)
        out = procs[name].communicate(timeout=300)[0]
        assert procs[name].returncode == 0, f"{name} run failed:\n{out}"
        if name == "teacher":  # E2: the hidden-state term weighted 1000x the others dominates the components
            procs["student"] = launch("train_distill.py", base / "student", TINY_DISTILL + [
                "kd.enabled=true", f"kd.teacher_checkpoint={base / 'teacher' / 'checkpoints' / 'last.pt'}",
                "kd.alpha=0.01", "kd.beta=0.01", "kd.gamma=10"])
            pending.append("student")
    return {name: base / name for name in procs}


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def edited_log(run_dir, tmp_path, edit):
    """A copy of a real run's metrics.jsonl with `edit(records)` applied, next to the run's config.yaml
    (so the tool finds the config the run used)."""
    records = read_jsonl(run_dir / "metrics.jsonl")
    edit(records)
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    write_jsonl(tmp_path / "metrics.jsonl", records)
    return str(tmp_path / "metrics.jsonl")


def train_records(records, first=None, last=None):
    return [r for r in records if "lr" in r and (first is None or first <= r["step"] <= (last or 10**9))]


def test_clean_run_log_and_checkpoint_have_no_findings(runs):
    code, report = diagnose("--log", str(runs["clean"] / "metrics.jsonl"),
                            "--checkpoint", str(runs["clean"] / "checkpoints" / "last.pt"))
    assert code == 0
    # throughput (E7) depends on what else the machine runs at that moment: not asserted
    assert flagged(report) - {("E7", "warning")} == set()
    assert "64 train steps, 8 evals" in find(report, "E5", "log")["evidence"]


def test_s1_lr_frozen_by_a_documented_log_edit_is_flagged_with_its_step_range(runs, tmp_path):
    """Edit: the LR of steps 10-40 overwritten with step 10's value, as a scheduler stepped once per
    epoch (or not at all) would log it."""
    def freeze(records):
        frozen = train_records(records, 10, 10)[0]["lr"]
        for r in train_records(records, 10, 40):
            r["lr"] = frozen
    _, report = diagnose("--log", edited_log(runs["clean"], tmp_path, freeze))
    s1 = find(report, "S1", "log")
    assert s1["severity"] == "critical" and "steps 10-40" in s1["evidence"] and "moves from" in s1["evidence"]
    assert ("S9", "critical") not in flagged(report, "log")  # the frozen window is one finding, not two


def test_c3_a_missing_input_file_is_one_line_and_exit_2_not_a_finding(tmp_path, capsys):
    """A --config, --log or --checkpoint that does not exist is bad input to the tool (one line naming the flag,
    the path and what to give, exit 2), not a critical finding among others with exit 1."""
    config = os.path.join(ROOT, "configs", "probe_synthetic.yaml")
    for argv, flag in ((["--log", str(tmp_path / "metrics.jsonl")], "--log"), (["--config", str(tmp_path / "x.yaml")],
                       "--config"), (["--config", config, "--checkpoint", str(tmp_path / "last.pt")], "--checkpoint")):
        assert dx.main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and f"{flag} {tmp_path}/" in err, err
        assert "no such file; give the path of" in err


def test_c3_a_directory_given_for_an_input_file_is_one_line_and_exit_2_not_a_finding(tmp_path, capsys):
    """A new user's --config runs/ was 'CRITICAL C3 config runs cannot be read (IsADirectoryError ...)', exit 1."""
    for flag in ("--config", "--log", "--checkpoint"):
        assert dx.main([flag, str(tmp_path)]) == 2
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        said = f"diagnose_and_fix.py: {flag} {tmp_path}: is a directory; give the path of "
        assert out == "" and len(lines) == 1 and lines[0].startswith(said), err


def test_c3_a_config_given_as_the_log_is_one_line_and_exit_2_not_a_log_without_records(capsys):
    """A new user's --log my_probe.yaml was read as a plain-text log: 'WARNING E7 holds no records with a step',
    exit 0, as if the run had logged nothing."""
    config = os.path.join(ROOT, "configs", "probe_synthetic.yaml")
    assert dx.main(["--log", config]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"diagnose_and_fix.py: --log {config}: a YAML config, not a log; give it as --config, "
                          "and --log the run's metrics.jsonl\n")


def test_c3_a_fix_output_in_a_missing_directory_or_a_directory_is_one_line_and_exit_2(tmp_path, capsys):
    """--fix --output nodir/fixed.yaml (or under a file, or a directory) diagnosed the whole config, then ended in a
    FileNotFoundError / NotADirectoryError traceback (exit 1) when it wrote the result."""
    config = os.path.join(ROOT, "configs", "probe_synthetic.yaml")
    (tmp_path / "notes").write_text("mine\n")
    for output in (tmp_path / "nodir" / "fixed.yaml", tmp_path / "notes" / "fixed.yaml", tmp_path):
        assert dx.main(["--config", config, "--fix", "--output", str(output)]) == 2
        out, err = capsys.readouterr()
        assert (out, err) == ("", f"diagnose_and_fix.py: --output {output}: name a file in an existing directory\n")
    assert os.listdir(tmp_path) == ["notes"]


def test_c3_files_not_on_this_machine_are_one_finding_naming_each_path_and_the_directory_once(tmp_path, monkeypatch):
    """TUAB's six files before stage 1: each entry read 'data.train_x (data/tuab_4s/train_x.npy not found (a relative
    path is read from the current directory, /home/...))', the same parenthesis six times in one line."""
    monkeypatch.chdir(tmp_path)
    for extra, severity in (([], "critical"), (["--num_samples", "1000"], "info")):
        _, report = diagnose("--config", os.path.join(ROOT, "configs", "tuab_4s.yaml"), *extra)
        [said] = [f["evidence"] for f in report["findings"] if f["id"] == "C3" and f["severity"] == severity]
        assert "data.train_x (data/tuab_4s/train_x.npy), data.train_y (data/tuab_4s/train_y.npy)" in said, said
        assert said.count(str(tmp_path)) == 1 and "not found (" not in said, said


def test_s5_c1_a_guessed_value_is_no_reason_to_report_or_rewrite_the_expect_block(tmp_path):
    """A new user's optim.lr typo: the C1 repair assumes the default LR, and the expect: block (peak 0.003, what the
    user meant) came out as three S5 criticals, then --fix rewrote it to the default's curve."""
    src, out = os.path.join(ROOT, "configs", "probe_synthetic.yaml"), tmp_path / "fixed.yaml"
    code, report = diagnose("--config", src, "--set", "optim.lr=3e-3x", "--fix", "--output", str(out))
    assert code == report["counts"]["critical"] == 1 and flagged(report) == {("C1", "critical")}, flagged(report)
    fixed, stated = yaml.safe_load(out.read_text()), yaml.safe_load(open(src))
    assert {k: float(v) for k, v in fixed["expect"].items()} == {k: float(v) for k, v in stated["expect"].items()}
    assert report["fix"]["remaining_critical"] == 3  # the S5 lines for the user to decide: the LR or the expect: block


def test_s1_constant_lr_from_a_real_run_whose_cosine_cannot_decay(runs):
    code, report = diagnose("--log", str(runs["flat"] / "metrics.jsonl"))
    assert find(report, "S1", "log")["severity"] == "critical"
    assert "flat there too" in find(report, "S1", "log")["evidence"]
    assert find(report, "S10", "config")["severity"] == "critical"  # the config side says the same
    assert code == 1 and report["counts"]["critical"] == 2


def test_s2_lr_at_its_floor_long_before_the_end_is_flagged(runs, tmp_path):
    """Edit: LR 0 from step 8 of 64, as a schedule sized in micro-batches (8x too short) would end."""
    def end_early(records):
        for r in train_records(records, 8):
            r["lr"] = 0.0
    _, report = diagnose("--log", edited_log(runs["clean"], tmp_path, end_early))
    s2 = find(report, "S2", "log")
    assert s2["severity"] == "critical" and "from step 8 to 64" in s2["evidence"]
    assert {f["id"] for f in report["findings"] if f["source"] == "log" and f["severity"] == "critical"} == {"S2"}


def test_s9_lr_departing_from_the_configured_curve_is_flagged(runs, tmp_path):
    """Edit: the LR halved from step 30 on, as a plateau rule writing the LR would leave it."""
    def halve(records):
        for r in train_records(records, 30):
            r["lr"] /= 2
    _, report = diagnose("--log", edited_log(runs["clean"], tmp_path, halve))
    s9 = find(report, "S9", "log")
    assert s9["severity"] == "critical" and "in 30-64" in s9["evidence"] and "35 logged steps" in s9["evidence"]


@pytest.mark.parametrize("corrupt", ["first", "last"])
def test_resumed_log_keeps_the_last_record_of_each_step(runs, tmp_path, corrupt):
    """Edit: steps 20-30 logged again after a resume event (as a resumed run does); one copy carries a
    wrong LR. Only a wrong LAST copy is what the run used."""
    def relog(records):
        again = copy.deepcopy(train_records(records, 20, 30))
        bad = train_records(records, 20, 30) if corrupt == "first" else again
        for r in bad:
            r["lr"] *= 3
        records += [{"event": "resume", "step": 19}] + again
    _, report = diagnose("--log", edited_log(runs["clean"], tmp_path, relog))
    assert "11 steps logged again after 1 resume(s)" in find(report, "E5", "log")["evidence"]
    if corrupt == "first":
        assert not flagged(report, "log") - {("E7", "warning")}
    else:
        assert "in 20-30" in find(report, "S9", "log")["evidence"]


def test_e1_frozen_evals_and_s10_flat_loss_from_a_real_run_at_lr_1e30(runs):
    code, report = diagnose("--log", str(runs["frozen"] / "metrics.jsonl"))
    e1 = find(report, "E1", "log")
    assert e1["severity"] == "critical"
    # the evals of steps 8-56; the one at 64, where OneCycle has annealed the LR to 4e-6 of its peak, is quiet
    assert "7 evals in a row identical" in e1["evidence"] and "steps 8-56" in e1["evidence"]
    assert find(report, "S10", "log")["severity"] == "warning"
    _, clean = diagnose("--log", str(runs["clean"] / "metrics.jsonl"))
    assert not [f for f in clean["findings"] if f["id"] in ("E1", "S10")]


def test_g4_nan_window_skips_and_g3_outlier_spikes_from_a_real_run(runs):
    records = read_jsonl(runs["faulty"] / "metrics.jsonl")
    skipped = [r["step"] for r in records if "nonfinite" in r and "loss" in r["nonfinite"]]
    assert len(skipped) >= 2  # one per epoch: the overflowing window is in one batch of each
    _, report = diagnose("--log", str(runs["faulty"] / "metrics.jsonl"))
    g4 = find(report, "G4", "log")
    assert g4["severity"] == "critical"  # more than 1% of the steps lost
    assert f"at {len(skipped)} steps" in g4["evidence"] and f"steps {skipped[0]}-{skipped[-1]}" in g4["evidence"]
    assert f"skipped_steps reached {len(skipped)}" in g4["evidence"]
    assert find(report, "G3", "log")["severity"] == "warning"
    assert "spike(s) over 10x the running median" in find(report, "G3", "log")["evidence"]


def test_g5_fp16_overflow_skip_rate_from_a_real_run(runs):
    records = read_jsonl(runs["fp16"] / "metrics.jsonl")
    overflow = [r["step"] for r in records if r.get("nonfinite") == ["grad_norm"]]
    assert len(overflow) >= 3 and all("scale" in r for r in records if "lr" in r)
    _, report = diagnose("--log", str(runs["fp16"] / "metrics.jsonl"))
    g5 = find(report, "G5", "log")
    assert g5["severity"] in ("warning", "critical") and f"skipped {len(overflow)} of 32 steps" in g5["evidence"]
    assert not [f for f in report["findings"] if f["id"] == "G4"]  # overflow skips are G5, not NaN data


def test_g5_skips_read_from_the_loss_scale_when_no_gradient_norm_is_logged(runs, tmp_path):
    """Edit: grad_norm and nonfinite removed, as a trainer that logs only the GradScaler's scale would;
    each halving of the scale is one skipped step."""
    def scale_only(records):
        for r in records:
            r.pop("grad_norm", None)
            r.pop("nonfinite", None)
    _, report = diagnose("--log", edited_log(runs["fp16"], tmp_path, scale_only))
    scales = [r["scale"] for r in read_jsonl(runs["fp16"] / "metrics.jsonl") if "scale" in r]
    halvings = sum(now < before for before, now in zip(scales, scales[1:]))
    assert halvings >= 3 and f"skipped {halvings} of 32 steps" in find(report, "G5", "log")["evidence"]


@NEEDS_DISTILL
def test_e2_dominating_loss_component_from_a_real_distillation_run(runs):
    code, report = diagnose("--log", str(runs["student"] / "metrics.jsonl"))
    e2_log = find(report, "E2", "log")
    assert e2_log["severity"] == "warning" and e2_log["evidence"].startswith("loss/hidden is")
    assert find(report, "E2", "config")["severity"] == "warning"  # kd.gamma 1000x kd.alpha, seen before any data


@NEEDS_DISTILL
def test_e3_perplexity_inconsistent_with_loss_is_flagged(runs, tmp_path):
    """Edit: val/ppl multiplied by 1e6 (the reference run reported 485 million)."""
    def absurd(records):
        for r in records:
            if "val/ppl" in r:
                r["val/ppl"] *= 1e6
    _, report = diagnose("--log", edited_log(runs["student"], tmp_path, absurd))
    assert find(report, "E3", "log")["severity"] == "warning"
    _, real = diagnose("--log", str(runs["student"] / "metrics.jsonl"))
    assert not [f for f in real["findings"] if f["id"] == "E3"]


def test_e7_throughput_drop_is_flagged_with_its_step_range(runs, tmp_path):
    """Edit: samples_per_s set to a steady 1000 (a quiet machine), then 100 over steps 20-30."""
    def slow(records):
        for r in train_records(records):
            r["samples_per_s"] = 100.0 if 20 <= r["step"] <= 30 else 1000.0
    _, report = diagnose("--log", edited_log(runs["clean"], tmp_path, slow))
    e7 = find(report, "E7", "log")
    assert e7["severity"] == "warning" and "over steps 20-30 (" in e7["evidence"]  # the record holding an eval left out


def text_log(records):
    """The documented plain-text fallback: one line per record, name=value fields."""
    lines = []
    for r in records:
        if "lr" in r:
            lines.append(f"2026-01-01 12:00:00 INFO step={r['step']} epoch={r['epoch']} lr={r['lr']:.6e} "
                         f"loss={r['loss']:.5f} grad_norm={r['grad_norm']:.4f} samples_per_s=1000")
        elif any(k.startswith("val/") for k in r):
            lines.append(f"eval step={r['step']} " + " ".join(f"{k}={v:.6f}" for k, v in r.items() if k != "step"))
    return "\n".join(lines) + "\n"


def test_plain_text_log_fallback_reads_step_lr_loss_fields(runs, tmp_path):
    records = read_jsonl(runs["clean"] / "metrics.jsonl")
    (tmp_path / "config.yaml").write_text((runs["clean"] / "config.yaml").read_text())
    (tmp_path / "train.log").write_text(text_log(records))
    code, report = diagnose("--log", str(tmp_path / "train.log"))
    assert "read as plain-text lines" in find(report, "E5", "log")["evidence"]
    assert "64 train steps, 8 evals" in find(report, "E5", "log")["evidence"]
    assert code == 0 and not flagged(report, "log")
    for r in train_records(records, 10, 40):  # the same S1 edit as the jsonl test, in text form
        r["lr"] = train_records(records, 10, 10)[0]["lr"]
    (tmp_path / "train.log").write_text(text_log(records))
    _, report = diagnose("--log", str(tmp_path / "train.log"))
    assert "steps 10-40" in find(report, "S1", "log")["evidence"]


def test_text_record_accepts_the_documented_field_forms():
    record = dx.text_record("12:00:01 step=120, lr: 3.0e-4 'loss'=nan learning_rate=1e-3 eval_loss=2.5 "
                            "loss/kd=0.5 gnorm=inf skipped=x tokens_per_s=1.5e3")
    assert record["step"] == 120 and record["lr"] == 1e-3  # the alias given later wins, like a later record
    assert np.isnan(record["loss"]) and record["grad_norm"] == float("inf") and record["val/loss"] == 2.5
    assert record["loss/kd"] == 0.5 and record["tokens_per_s"] == 1500.0 and "skipped" not in record


# -----------------------------------------------------------------------------
# Checkpoint checks on the real checkpoint and tampered copies of it.
def tampered(runs, tmp_path, edit):
    ckpt = torch.load(runs["clean"] / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    edit(ckpt)
    path = tmp_path / "last.pt"
    torch.save(ckpt, path)
    return str(path)


def checkpoint_report(runs, path, *extra):
    return diagnose("--config", str(runs["clean"] / "config.yaml"), "--checkpoint", path, *extra)


def test_real_checkpoint_passes_r1_r2_r4_r6_r7_s7(runs):
    code, report = checkpoint_report(runs, str(runs["clean"] / "checkpoints" / "last.pt"))
    assert code == 0 and not flagged(report)
    assert "loads with weights_only=True: step 64" in find(report, "R6", "checkpoint")["evidence"]


def test_r2_r1_global_step_disagreeing_with_scheduler_optimizer_and_data_position(runs, tmp_path):
    def bump(ckpt):
        ckpt["global_step"] -= 3
    code, report = checkpoint_report(runs, tampered(runs, tmp_path, bump))
    evidence = " | ".join(f["evidence"] for f in report["findings"] if f["severity"] == "critical")
    assert "global_step 61 but the scheduler has stepped 64 times" in evidence
    assert "the optimizer has taken 64 steps, global_step - skipped_steps = 61 - 0 = 61" in evidence
    assert flagged(report) == {("R2", "critical"), ("R1", "critical")} and code == 1
    assert report["counts"]["critical"] == 3


def test_r4_r1_missing_rng_and_data_position(runs, tmp_path):
    def strip(ckpt):
        del ckpt["rng"], ckpt["data_position"]
    code, report = checkpoint_report(runs, tampered(runs, tmp_path, strip))
    assert flagged(report) == {("R4", "critical"), ("R1", "critical")} and code == 1
    assert report["counts"]["critical"] == 2


def test_r7_checkpoint_needing_weights_only_false_is_flagged_without_unpickling_it(runs, tmp_path):
    def numpy_rng(ckpt):
        ckpt["rng"][0]["numpy"] = np.random.get_state()  # numpy arrays and a tuple: needs the full unpickler
    code, report = checkpoint_report(runs, tampered(runs, tmp_path, numpy_rng))
    assert flagged(report) == {("R7", "critical")} and code == report["counts"]["critical"] == 1
    assert "numpy" in find(report, "R7")["evidence"]


def test_r6_torn_checkpoint_is_flagged_and_the_readable_previous_one_named(runs, tmp_path):
    whole = (runs["clean"] / "checkpoints" / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(whole[:len(whole) // 3])  # a kill during a non-atomic save
    (tmp_path / "last.prev.pt").write_bytes(whole)
    code, report = checkpoint_report(runs, str(tmp_path / "last.pt"))
    r6 = find(report, "R6", "checkpoint")
    assert r6["severity"] == "critical" and "last.prev.pt is readable" in r6["evidence"]
    assert code == report["counts"]["critical"] == 1


def test_s7_schedule_keys_changed_since_the_checkpoint(runs):
    path = str(runs["clean"] / "checkpoints" / "last.pt")
    code, report = checkpoint_report(runs, path, "--set", "train.epochs=5")
    s7 = find(report, "S7", "checkpoint")
    assert s7["severity"] == "critical" and "train.epochs 4 -> 5" in s7["evidence"]
    assert code == report["counts"]["critical"] == 1
    _, allowed = checkpoint_report(runs, path, "--set", "train.epochs=5", "--set", "train.allow_schedule_change=true")
    assert find(allowed, "S7", "checkpoint")["severity"] == "warning"
    _, world = checkpoint_report(runs, path, "--world_size", "2")
    assert "written by 1 process(es)" in find(world, "S7", "checkpoint")["evidence"]


def test_s7_a_changed_seed_is_flagged_like_the_script_refuses_it(runs):
    code, report = checkpoint_report(runs, str(runs["clean"] / "checkpoints" / "last.pt"), "--set", "seed=7")
    s7 = find(report, "S7", "checkpoint")
    assert s7["severity"] == "critical" and "trained with seed 0" in s7["evidence"] and "restore seed: 0" in s7["fix"]
    assert code == report["counts"]["critical"] == 1


@NEEDS_DISTILL
def test_e6_memory_estimate_counts_a_hugging_face_teacher_in_fp32(tmp_path):
    # The estimate builds the teacher from its config.json on the meta device (no weight is read); the
    # directory still holds weights, which a teacher must have (C3).
    transformers = pytest.importorskip("transformers", reason=f"transformers is not installed for {sys.executable}")
    import train_distill as td
    config = transformers.GPT2Config(vocab_size=256, n_positions=128, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    cfg, _ = td.resolve_config(None, ["kd.enabled=true", f"kd.hf_teacher_dir={tmp_path}"])
    plan = td.plan_schedule(cfg, td.train_set_size(cfg))
    parts = dx.distill_memory(td, cfg, plan)
    real = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(tmp_path))
    assert parts["weights (frozen teacher)"] == 4 * sum(p.numel() for p in real.parameters()) > 0


@NEEDS_DISTILL
def test_e6_a_hugging_face_students_memory_line_is_clean_and_an_unexpected_meta_failure_is_still_shown(tmp_path,
                                                                                                      monkeypatch):
    """An HF student with weights: on the meta device no weights are read (transformers 5 refuses from_pretrained
    there), and its forward reading a tensor's value (the expected failure) sends the estimate to the CPU with a
    plain line, no cut-off error text. Any other meta-device failure is still named in the line."""
    transformers = pytest.importorskip("transformers", reason=f"transformers is not installed for {sys.executable}")
    import train_distill as td
    config = transformers.GPT2Config(vocab_size=256, n_positions=128, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    cfg, _ = td.resolve_config(None, [f"student.hf_dir={tmp_path}", "data.seq_len=64"])
    plan = td.plan_schedule(cfg, td.train_set_size(cfg))
    [line] = dx.check_memory(td, cfg, plan, {"device_memory": None})
    assert line["id"] == "E6" and line["evidence"].startswith("estimated "), line
    assert "read a tensor's value" in line["evidence"] and not re.search(r"Error|failed|from_pretrained",
                                                                          line["evidence"]), line["evidence"]

    def estimator(script, cfg, plan, device="meta"):
        if device == "meta":
            raise ValueError("a real bug in the model's __init__")
        return {"weights": 2**20}

    monkeypatch.setattr(dx, "distill_memory", estimator)
    [line] = dx.check_memory(td, cfg, plan, {"device_memory": None})
    assert "the meta-device build failed (ValueError: a real bug in the model's __init__)" in line["evidence"]


@NEEDS_DISTILL
def test_e6_memory_estimate_follows_the_teacher_the_run_loads_user_module_or_none_offline(tmp_path):
    # teacher.target: the user's module, built on the meta device, counted in fp32; kd.teacher_cache: the run
    # loads no teacher at all (its cached top-k is read), so no teacher weights and no teacher logits.
    import train_distill as td
    import zoo
    base = ["kd.enabled=true", "data.seq_len=32", "kd.gamma=0"]
    cfg, _ = td.resolve_config(None, base + ["teacher.target=zoo:tiny_causal_lm"])
    plan = td.plan_schedule(cfg, td.train_set_size(cfg))
    online = dx.distill_memory(td, cfg, plan)
    assert online["weights (frozen teacher)"] == 4 * sum(p.numel() for p in zoo.tiny_causal_lm().parameters()) > 0
    cfg, _ = td.resolve_config(None, base + ["teacher.target=zoo:tiny_causal_lm", "kd.top_k=8",
                                             f"kd.teacher_cache={tmp_path / 'cache'}"])
    offline = dx.distill_memory(td, cfg, plan)
    assert offline["weights (frozen teacher)"] == 0
    logits = [k for k in online if k.startswith("activations")][0]
    assert offline[logits] < online[logits]


def test_d1_d6_e6_memory_estimate_divides_sharded_state_and_counts_one_chunk_and_checkpointed_blocks():
    """train.strategy fsdp on N processes: the trained state (weights, gradients, optimizer) / N plus one block
    gathered; kd.chunk_tokens: one chunk's logits instead of the micro-batch's; activation checkpointing: each
    block's input plus one block's inside, less than every block's activations."""
    import train_distill as td
    base = ["kd.enabled=true", "teacher.target=zoo:tiny_causal_lm", "data.seq_len=32", "kd.gamma=0",
            "student.n_layer=4", "student.n_embd=64", "student.n_head=2", "train.batch_size=8",
            "train.eval_batch_size=1"]  # the training micro-batch is the larger of the two

    def estimate(*extra, world=1):
        cfg, _ = td.resolve_config(None, base + list(extra))
        parts = dx.distill_memory(td, cfg, td.plan_schedule(cfg, td.train_set_size(cfg), world))
        state = [v for k, v in parts.items() if k.startswith("trained weights")][0]
        return state, [v for k, v in parts.items() if k.startswith("activations")][0]

    state, acts = estimate()
    sharded, _ = estimate("train.strategy=fsdp", world=4)
    block = 4 * sum(p.numel() for p in td.GPT(256, 32, 4, 2, 64).blocks[0].parameters())
    assert sharded == state / 4 + block
    assert estimate("train.strategy=fsdp", world=1)[0] == state  # one process: nothing to divide
    _, chunked, = estimate("kd.chunk_tokens=16")
    assert chunked < estimate("kd.chunk_tokens=64")[1] < acts  # one chunk's logits, not a whole batch's
    _, checkpointed = estimate("train.activation_checkpointing=true")
    assert checkpointed < acts


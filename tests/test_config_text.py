"""The config text is taken literally (issue 21) and its messages are one line each (issue 22).

YAML silently keeps the last of two equal keys, and YAML 1.1 rewrites plain text (007 -> 7, 12:30 -> 750,
yes -> True, 2024_01 -> 202401, `exp #2` -> 'exp'): both scripts, --dry_run and diagnose_and_fix.py read the
file through the scripts' shared read_yaml(), so each refuses or keeps the text the same way. launch.sh
reports a YAML syntax error with the line, column and reason; a mistyped section is one line; --help_config
prints each section once, its columns aligned.
"""
import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import diagnose_and_fix as dx  # noqa: E402
import train_distill as td  # noqa: E402
import train_probe as tp  # noqa: E402
from test_launch import launch  # noqa: E402

SCRIPTS = {"probe": tp, "distill": td}
DUPLICATED = """\
task: {task}
optim:
  lr: 1.0e-3
train:
  batch_size: 4
optim:
  weight_decay: 0.0
"""


def config_errors(script, path=None, overrides=()):
    with pytest.raises(script.ConfigError) as err:
        script.resolve_config(path, overrides, check_files=False)
    return err.value.problems


def diagnose(path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = dx.main(["--config", str(path), "--json"])
    return code, json.loads(out.getvalue())["findings"]


@pytest.mark.parametrize("task", sorted(SCRIPTS))
def test_c2_a_key_given_twice_is_refused_naming_it_and_both_lines(task, tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(DUPLICATED.format(task=task))
    problems = config_errors(SCRIPTS[task], str(path))
    assert len(problems) == 1 and problems[0][:2] == ("C2", "optim"), problems
    assert "at lines 2 and 6" in problems[0][2]
    # a nested key too, named by its dotted path
    path.write_text(f"task: {task}\ntrain:\n  batch_size: 4\n  batch_size: 8\n")
    problems = config_errors(SCRIPTS[task], str(path))
    assert [p[:2] for p in problems] == [("C2", "train.batch_size")] and "at lines 3 and 4" in problems[0][2]
    # the tools refuse it too: diagnose reads the file as the script does (YAML alone would keep batch_size 8)
    code, findings = diagnose(path)
    assert code == 1 and [(f["id"], f["severity"]) for f in findings] == [("C2", "critical")], findings
    assert "train.batch_size" in findings[0]["evidence"] and "lines 3 and 4" in findings[0]["evidence"]


REWRITTEN = ["007", "12:30", "yes", "2024_01", "1e3", "0x1F", "2024-01-05", "on"]  # YAML 1.1: 7, 750, True, ...


@pytest.mark.parametrize("text", REWRITTEN)
def test_c1_a_string_key_keeps_the_text_as_written_in_the_file_and_on_set(text, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"task: distill\nrun_name: {text}\ntrain:\n  best_metric: {text}\n")
    cfg, _ = td.load_config(str(path), [], td.CONFIG)
    assert cfg["run_name"] == text and cfg["train.best_metric"] == text
    cfg, _ = tp.load_config(None, [f"run_name={text}", f"data.train_x={text}"], tp.CONFIG)
    assert cfg["run_name"] == text and cfg["data.train_x"] == text
    # diagnose --fix writes the text back so that it reads as the same string
    dx_tree, findings = dx.read_config_tree(str(path))
    assert findings == [] and dx_tree["run_name"] == text


def test_c1_quoting_null_and_typed_keys_still_work_as_yaml():
    cfg, _ = td.load_config(None, ['run_name="quoted 007"', "data.train_bin=null", "kd.teacher_cache=~",
                                   "train.max_steps=12", "kd.enabled=yes", "student.hf_dir="], td.CONFIG)
    assert cfg["run_name"] == "quoted 007" and cfg["data.train_bin"] is None and cfg["kd.teacher_cache"] is None
    assert cfg["train.max_steps"] == 12 and cfg["kd.enabled"] is True and cfg["student.hf_dir"] is None
    cfg, _ = td.load_config(None, ["run_name=exp #2"], td.CONFIG)  # --set has no comments: the text as typed
    assert cfg["run_name"] == "exp #2"


def test_c1_a_string_cut_short_by_a_comment_is_refused_saying_how_to_quote_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: distill\nrun_name: exp #2\ntrain:\n  best_metric: val/loss  # the usual comment\n")
    problems = config_errors(td, str(path))
    assert len(problems) == 1 and problems[0][:2] == ("C1", "run_name"), problems
    assert "'exp #2'" in problems[0][2] and "as 'exp'" in problems[0][2] and 'run_name: "exp #2"' in problems[0][2]
    path.write_text("task: distill\nrun_name: 'exp #2'\ntrain:\n  best_metric: val/loss  # the usual comment\n")
    assert td.resolve_config(str(path), check_files=False)[0]["run_name"] == "exp #2"


def test_c2_a_mistyped_section_is_one_line_naming_the_closest_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: probe\ntrian:\n  epochs: 2\n  batch_size: 4\n  grad_accum: 2\n  log_every: 1\n"
                    "  eval_every: 1\n  patience: 2\n  precision: fp32\n  device: cpu\n")
    problems = config_errors(tp, str(path))
    assert problems == [("C2", "trian", "unknown section (8 keys: epochs, batch_size, grad_accum, log_every, "
                         "eval_every, patience, precision, device); did you mean train?")]


def test_c3_launch_sh_names_the_line_column_and_reason_of_a_yaml_syntax_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task: probe\ntrain:\n  epochs: 3\n   batch_size: 4\n")
    out = launch(str(path), "--show", cwd=tmp_path)
    assert out.returncode == 2 and out.stdout == "", out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [f"launch.sh: {path} is not valid YAML (line 4, column 14: mapping values "
                                               "are not allowed here); fix the syntax there"]
    with pytest.raises(tp.ConfigError) as err:  # the scripts say the same
        tp.load_config(str(path), [], tp.CONFIG)
    assert "(line 4, column 14: mapping values are not allowed here)" in str(err.value)


@pytest.mark.parametrize("task", sorted(SCRIPTS))
def test_help_config_prints_each_section_once_with_aligned_columns(task):
    script = SCRIPTS[task]
    text = script.config_reference(script.CONFIG, f"train_{task}.py", script.COMPANION_KEYS)
    sections = [line for line in text.splitlines() if line and not line.startswith(" ") and line.islower()]
    assert len(sections) == len(set(sections)), sections
    rows = [line for line in text.splitlines() if line.startswith("  ") and line.split()[0] in script.CONFIG]
    assert len(rows) == len(script.CONFIG)
    # the default, type and meaning columns start at the same offset on every row; a long list of choices
    # puts the meaning on the next line, at that offset
    lines = text.splitlines()
    columns = set()
    for i, line in enumerate(lines):
        if not (line.startswith("  ") and line.split()[0] in script.CONFIG):
            continue
        fields, at = re.split(r"\s{2,}", line.strip(), maxsplit=3), 0
        starts = []
        for field in fields:
            at = line.index(field, at)
            starts.append(at)
            at += len(field)
        if len(fields) == 3:  # the meaning on the next line
            starts.append(len(lines[i + 1]) - len(lines[i + 1].lstrip()))
        columns.add(tuple(starts))
    assert len(columns) == 1, sorted(columns)


# C3: a value of each key that makes resolve_config() load a companion file (KD on where a key needs it)
LOADS_A_COMPANION = {
    "probe": {"backbone.target": "m:f", "backbone.checkpoint": "w.pt", "backbone.output": "0",
              "backbone.pool": "mean_time", "log.tensorboard": "true", "log.wandb": "p", "log.mlflow": "sqlite:///m.db"},
    "distill": {"train.strategy": "fsdp", "train.activation_checkpointing": "true", "log.tensorboard": "true",
                "log.wandb": "p", "log.mlflow": "sqlite:///m.db", "data.packing": "true", "teacher.target": "m:f",
                "student.hf_dir": "d", "student.target": "m:f", "kd.divergence": "jsd", "kd.on_policy_fraction": "0.5",
                "kd.seq_kd": "true", "kd.prompt_tokens": "4", "kd.max_new_tokens": "4", "kd.sample_temperature": "0.5",
                "kd.eos_token": "0", "kd.hf_teacher_dir": "d", "kd.teacher_cache": "c", "kd.chunk_tokens": "4"}}


class Loaded(Exception):
    pass


@pytest.mark.parametrize("task", sorted(SCRIPTS))
def test_c3_help_config_names_the_companion_file_each_key_loads(task, monkeypatch):
    """--help_config names, beside each key that loads a companion, the very file resolve_config() loads for it,
    and no other key (a user copying the script alone learns which file a key needs before setting it)."""
    script, name = SCRIPTS[task], f"train_{task}.py"
    text = subprocess.run([sys.executable, os.path.join(ROOT, name), "--help_config"], capture_output=True,
                          text=True, check=True).stdout
    annotated = {}
    for match in re.finditer(r"^  (\S+)\s.*(?:\n {8,}\S.*)?", text, re.M):
        found = re.findall(rf"\[set: needs (\w+)\.py beside {name}\]", match.group(0))
        if found:
            annotated[match.group(1)] = found[0]
    assert set(annotated) == set(LOADS_A_COMPANION[task]), set(annotated) ^ set(LOADS_A_COMPANION[task])

    def companion(file, feature, fix=None):
        raise Loaded(file, feature)

    monkeypatch.setattr(script, "companion", companion)
    for key, value in LOADS_A_COMPANION[task].items():
        extra = ["kd.enabled=true"] if key.startswith(("kd.", "teacher.")) else []
        with pytest.raises(Loaded) as loaded:
            script.resolve_config(None, [f"{key}={value}"] + extra, check_files=False)
        assert loaded.value.args == (annotated[key], key), (key, loaded.value.args)

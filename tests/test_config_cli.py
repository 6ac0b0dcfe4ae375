"""--set as the usage line promises: several pairs after one flag, repeated flags, and dotted keys into a
free-form mapping (backbone.kwargs.depth=4), in both training scripts and both tools; anything else dotted
is still an unknown key (C2)."""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import diagnose_and_fix  # noqa: E402
import test_scheduler_dry_run  # noqa: E402
import train_distill as td  # noqa: E402
import train_probe as tp  # noqa: E402

SYNTHETIC = os.path.join(ROOT, "configs", "probe_synthetic.yaml")


def call(*args, cwd=ROOT):
    """python ARGS as run_together() takes it."""
    return [sys.executable, *args], {"cwd": cwd}


def run(*args, cwd=ROOT):
    argv, where = call(*args, cwd=cwd)
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **where)


@pytest.mark.parametrize("script", [tp, td], ids=["train_probe", "train_distill"])
def test_c1_set_takes_several_pairs_after_one_flag_and_repeated_flags(script):
    one_flag = script.parse_args(["--set", "optim.lr=1e-3", "train.grad_accum=4", "seed=3"]).set
    repeated = script.parse_args(["--set", "optim.lr=1e-3", "--set", "train.grad_accum=4", "--set", "seed=3"]).set
    mixed = script.parse_args(["--set", "optim.lr=1e-3", "train.grad_accum=4", "--dry_run", "--set", "seed=3"])
    assert one_flag == repeated == mixed.set == ["optim.lr=1e-3", "train.grad_accum=4", "seed=3"] and mixed.dry_run
    cfg, _ = script.resolve_config(None, one_flag)
    assert (cfg["optim.lr"], cfg["train.grad_accum"], cfg["seed"]) == (1e-3, 4, 3)  # C1: each value cast to its type


@pytest.mark.parametrize("tool,first", [(test_scheduler_dry_run, [SYNTHETIC]), (diagnose_and_fix, ["--config", SYNTHETIC])],
                         ids=["test_scheduler_dry_run", "diagnose_and_fix"])
def test_tools_take_the_same_set_forms(tool, first):
    one_flag = tool.parse_args([*first, "--set", "train.epochs=2", "train.grad_accum=1"]).set
    repeated = tool.parse_args([*first, "--set", "train.epochs=2", "--set", "train.grad_accum=1"]).set
    assert one_flag == repeated == ["train.epochs=2", "train.grad_accum=1"]


def test_diagnose_plans_with_several_pairs_after_one_flag():
    out = run("diagnose_and_fix.py", "--config", SYNTHETIC, "--json", "--set", "train.epochs=2", "train.grad_accum=1")
    plan = json.loads(out.stdout)["plan"]
    assert plan["grad_accum"] == 1 and plan["total_steps"] == 2 * plan["steps_per_epoch"] == 2 * 63, out.stderr


def test_set_dotted_key_sets_one_entry_of_a_mapping_merged_with_the_yaml_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("backbone:\n  kwargs:\n    width: 16\n")
    cfg, _ = tp.resolve_config(str(path), tp.parse_args(["--set", "backbone.kwargs.depth=2", "backbone.kwargs.x.y=1"]).set)
    assert cfg["backbone.kwargs"] == {"width": 16, "depth": 2, "x": {"y": 1}}
    cfg, _ = tp.resolve_config(None, ["backbone.kwargs.depth=2"])  # no mapping in a file: into the default's copy
    assert cfg["backbone.kwargs"] == {"depth": 2}
    assert tp.CONFIG["backbone.kwargs"][0] == {} and tp.resolve_config(None)[0]["backbone.kwargs"] == {}, \
        "the default mapping must not be modified"
    cfg, _ = tp.resolve_config(str(path), ["backbone.kwargs.depth=2"])
    backbone = tp.build_backbone(cfg, in_channels=3)  # the built-in encoder really gets both keyword arguments
    assert len(backbone.transformer.layers) == 2 and backbone.conv[0].out_channels == 16
    cfg, _ = tp.resolve_config(str(path), ["backbone.kwargs={depth: 3}", "backbone.kwargs.heads=1"])  # later wins
    assert cfg["backbone.kwargs"] == {"depth": 3, "heads": 1}


def test_diagnose_fix_writes_a_dotted_mapping_key_nested(tmp_path):
    out_path = tmp_path / "fixed.yaml"
    out = run("diagnose_and_fix.py", "--config", SYNTHETIC, "--set", "backbone.kwargs.depth=2", "optim.lrr=1",
              "--fix", "--output", str(out_path))
    fixed = yaml.safe_load(out_path.read_text())
    assert fixed["backbone"]["kwargs"] == {"depth": 2}, out.stdout
    assert "lrr" not in json.dumps(fixed)  # the unknown key was removed (C2), the mapping key kept
    cfg, _ = tp.resolve_config(str(out_path))
    assert cfg["backbone.kwargs"] == {"depth": 2}


def test_c2_an_unknown_dotted_key_is_still_an_error(tmp_path):
    for bad in ("backbone.kwargz.depth=4", "optim.lr.x=1", "optim.lrr=1"):
        with pytest.raises(tp.ConfigError) as err:
            tp.resolve_config(None, [bad])
        assert [(rid, key) for rid, key, _ in err.value.problems] == [("C2", bad.partition("=")[0])]
    out = run(os.path.join(ROOT, "train_probe.py"), "--set", "backbone.kwargz.depth=4", "optim.lrr=1",
              "--run_dir", str(tmp_path / "run"), cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 2 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("config error: backbone.kwargz.depth: unknown key")
    assert lines[1].startswith("config error: optim.lrr: unknown key; did you mean optim.lr?")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script,keys,tool", [
    (tp, ["data.train_x=X/train_x.npy", "data.train_y=X/train_y.npy", "data.val_x=X/val_x.npy",
          "data.val_y=X/val_y.npy"], "prepare_tuab.py TUAB_DIR --config CONFIG"),  # the windows the config says
    (td, ["data.train_bin=X/train.bin", "data.val_bin=X/val.bin", "data.vocab_size=256"], "prepare_text.py")],
    ids=["train_probe", "train_distill"])
def test_c3_a_data_directory_that_does_not_exist_names_the_tool_that_makes_it(script, keys, tool, tmp_path, capsys):
    """Stage 2 before stage 1 (the README's tuab_4s.yaml before prepare_tuab.py): every data file was 'not found;
    fix the path'. A missing directory says to make the data first, with the tool; the run, its dry run and
    diagnose say it; a file missing from a directory that exists is still 'fix the path'."""
    missing = [k.replace("X/", f"{tmp_path}/never_made/") for k in keys]
    with pytest.raises(script.ConfigError) as err:
        script.resolve_config(None, missing)
    first = err.value.problems[0][2]
    assert f"its directory {tmp_path}/never_made does not exist: make the data first" in first and tool in first
    assert script.main(["--dry_run", *[a for k in missing for a in ("--set", k)]]) == 2
    assert capsys.readouterr().err.splitlines()[0] == f"config error: {err.value.problems[0][1]}: {first}"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"task": script.TASK}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        diagnose_and_fix.main(["--config", str(config), "--json", *[a for k in missing for a in ("--set", k)]])
    c3 = [f for f in json.loads(out.getvalue())["findings"] if f["id"] == "C3" and f["severity"] == "critical"]
    assert len(c3) == 1 and tool in c3[0]["fix"] and "make the data first" in c3[0]["fix"], c3
    with pytest.raises(script.ConfigError) as err:
        script.resolve_config(None, [k.replace("X/", f"{tmp_path}/") for k in keys])
    assert err.value.problems[0][2].endswith("; fix the path")


@pytest.mark.parametrize("script", [tp, td], ids=["train_probe", "train_distill"])
def test_c1_a_word_for_an_integer_key_says_a_whole_number_is_expected(script):
    """`train.batch_size: lots` said 'expected a number', and 2.5 then says 'a whole number': one word for it."""
    for key, kind in (("train.batch_size", "a whole number"), ("optim.lr", "a number")):
        with pytest.raises(script.ConfigError) as err:
            script.resolve_config(None, [f"{key}=lots"])
        assert str(err.value) == f"config error: {key}: got 'lots', expected {kind}"


@pytest.mark.parametrize("tool", ["train_probe", "train_distill", "prepare_tuab", "prepare_text", "diagnose_and_fix",
                                  "test_scheduler_dry_run"])
def test_c3_a_wrong_or_missing_option_is_one_line_and_exit_2_in_every_script_and_tool(tool, capsys):
    """A new user's mistyped flag (issue 32): one line naming the option and --help, exit 2, not argparse's usage
    block; the same for an option without its value."""
    module = __import__(tool)
    for argv in (["--bogus", "x"], ["--set"]):
        try:
            code = module.main(argv)
        except SystemExit as exit_:
            code = exit_.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "usage:" not in err[0], (argv, err)
        assert argv[0] in err[0] or "--set" in err[0] or "required" in err[0], err


def test_c3_each_preparation_tool_says_every_bad_input_at_once_one_line_each(tmp_path, capsys, monkeypatch):
    """A new user's trial: prepare_tuab.py said only that SRC was missing; fixed, the next run said --out was a file,
    the next that --workers was 0. prepare_text.py with --out a file was a FileExistsError traceback after the
    tokenizer had loaded. Both now say every problem with their input at once, one line each, exit 2, nothing made."""
    import importlib.util
    import prepare_text
    import prepare_tuab
    (tmp_path / "afile").write_text("keep")
    (tmp_path / "locked").mkdir()
    nowhere, afile = str(tmp_path / "nowhere"), str(tmp_path / "afile")
    no_mne = ["SRC"] if importlib.util.find_spec("mne") is None else []
    no_hf = [] if prepare_text.transformers_installed() else ["--demo_chat"]
    cases = [(prepare_tuab, [nowhere, "--out", f"{afile}/x", "--workers", "0", "--set", "data.val_fraction=1.5"],
              ["SRC", "--out", "data.val_fraction", "--workers"] + no_mne),
             (prepare_tuab, [nowhere, "--out", str(tmp_path / "locked" / "x")], ["SRC", "--out"] + no_mne),
             (prepare_text, [nowhere, "--tokenizer", nowhere, "--out", afile, "--chat_template", nowhere],
              ["--tokenizer", "--out", "--chat_template", "SOURCES"]),
             (prepare_text, ["--demo_chat", "5", "--val_fraction", "2", "--out", str(tmp_path / "locked" / "x")],
              ["--demo_chat"] + no_hf + ["--val_fraction", "--out"])]
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).endswith("locked"))  # as root all is writable
    for tool, argv, keys in cases:
        assert tool.main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert [line.split(": ")[1] for line in lines] == keys and all(
            line.startswith("config error: ") for line in lines), lines
        assert ("afile is a file" in lines[keys.index("--out")]) != ("locked may not be written" in lines[
            keys.index("--out")]), lines
    assert sorted(os.listdir(tmp_path)) == ["afile", "locked"] and not os.listdir(tmp_path / "locked")
    assert (tmp_path / "afile").read_text() == "keep"


@pytest.mark.parametrize("text", ["", "# nothing set yet\n"], ids=["no_bytes", "only_a_comment"])
def test_c3_an_empty_config_is_refused_by_both_scripts_their_dry_runs_launch_sh_and_diagnose(text, tmp_path):
    """A new user's empty --config trained the defaults without a word, and was task 'probe' to launch.sh and
    diagnose but 'distill' to train_distill.py: every reader now refuses it with one line naming the file, exit 2
    (diagnose made it one CRITICAL C3 finding, exit 1, the code of a config it had judged)."""
    from run_records import launch_call, run_together
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    line = (f"config error: {path}: is empty (no keys); write the keys to change in it, or omit --config to train the "
            "defaults")
    # six processes, each refusing on its own: started together (run_together), judged one by one
    scripts = [(script, extra) for script in ("train_probe.py", "train_distill.py") for extra in ([], ["--dry_run"])]
    *outs, launched, diagnosed = run_together(
        *[call(os.path.join(ROOT, script), "--config", str(path), *extra, cwd=tmp_path) for script, extra in scripts],
        launch_call(str(path), "--gpus", "cpu", cwd=tmp_path),
        call(os.path.join(ROOT, "diagnose_and_fix.py"), "--config", str(path), "--json"))
    for (script, extra), out in zip(scripts, outs):
        assert (out.returncode, out.stderr.strip().splitlines()) == (2, [line]), (script, extra, out.stderr)
    assert launched.returncode == 2 and launched.stderr.strip().splitlines() == [line], launched.stderr
    assert os.listdir(tmp_path) == ["empty.yaml"]  # no run dir, from any of them
    assert (diagnosed.returncode, diagnosed.stdout, diagnosed.stderr.strip().splitlines()) == (2, "", [line]), \
        diagnosed.stderr


@pytest.mark.parametrize("script", [tp, td], ids=["train_probe", "train_distill"])
def test_c3_a_config_that_is_a_directory_or_may_not_be_read_is_one_line_naming_it(script, tmp_path, monkeypatch):
    """--config DIR said 'file DIR not found'; a config the user may not read (chmod 000) was read_yaml's
    PermissionError traceback from both scripts, and one that is not UTF-8 text (saved as Latin-1, or binary) its
    UnicodeDecodeError traceback. Tests run as root, who reads anything: os.access says no."""
    out = run(script.__file__, "--config", str(tmp_path), "--dry_run", cwd=tmp_path)
    assert (out.returncode, out.stderr.strip().splitlines()) == (2, [
        f"config error: --config: {tmp_path} is a directory; give the path of a YAML config file"]), out.stderr
    path = tmp_path / "config.yaml"
    path.write_text("seed: 1\n")
    real = os.access
    monkeypatch.setattr(os, "access", lambda name, mode, **kw: str(name) != str(path) and real(name, mode, **kw))
    with pytest.raises(script.ConfigError) as refused:
        script.resolve_config(str(path))
    assert str(refused.value) == (f"config error: --config: file {path} may not be read (permission denied); fix "
                                  "its permissions")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"seed: 1\nrun_name: caf\xe9\n")
    with pytest.raises(script.ConfigError) as refused:
        script.resolve_config(str(latin))
    assert str(refused.value) == (f"config error: {latin}: is not utf-8 text (invalid continuation byte at byte 21); "
                                  "save it as utf-8")


def test_c3_a_run_dir_that_is_a_file_is_one_line_from_either_script_its_dry_run_and_launch_sh(tmp_path, capsys):
    """--run_dir naming a file (a new user's typo: --run_dir my_probe.yaml) was makedirs' NotADirectoryError
    traceback (exit 1; train_distill.py's until the check moved to the shared check_resume_mode()), and launch.sh's
    `mkdir: cannot create directory` (exit 1) for a run_name whose runs/<name> is a file; the dry run passed it.
    Now one line, exit 2, the file untouched."""
    from run_records import launch
    path = tmp_path / "runs" / "notes"
    path.parent.mkdir()
    path.write_text("mine\n")
    line = "config error: --run_dir: {} is a file, not a directory; give another --run_dir"
    for script, extra in ((tp, []), (tp, ["--dry_run"]), (td, []), (td, ["--dry_run"])):
        assert script.main(["--run_dir", str(path), *extra]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [line.format(path)]
    out = launch(SYNTHETIC, "--", "--set", "run_name=notes", cwd=tmp_path)  # it makes the run dir for its lock first
    assert (out.returncode, out.stderr.strip().splitlines()) == (2, [line.format("runs/notes")])
    assert path.read_text() == "mine\n"


@pytest.mark.parametrize("script, key, name", [(td, "data.train_bin", "train.bin"), (tp, "data.train_x", "train_x.npy")],
                         ids=["train_distill", "train_probe"])
def test_c3_a_data_path_that_is_a_directory_or_may_not_be_read_is_one_line_naming_the_key(script, key, name, tmp_path,
                                                                                          monkeypatch):
    """train_distill.py read a token file that is a directory or one the user may not read into a PermissionError
    traceback (TokenWindows, first_id_past): the shared check_file() refuses both by key, before anything starts.
    Tests run as root, who reads anything: os.access says no."""
    (tmp_path / name).mkdir()
    with pytest.raises(script.ConfigError) as refused:
        script.resolve_config(None, [f"{key}={tmp_path / name}"])
    assert ("C3", key, f"{tmp_path / name} is a directory, not a file; fix the path") in refused.value.problems
    if script is td:  # the whole run: one line, exit 2, no traceback
        (tmp_path / "val.bin").write_bytes(b"\0" * 64)
        out = run(script.__file__, "--set", f"{key}={tmp_path / name}", f"data.val_bin={tmp_path / 'val.bin'}",
                  "data.vocab_size=256", "--dry_run", cwd=tmp_path)
        assert (out.returncode, out.stderr.strip().splitlines()) == (2, [
            f"config error: {key}: {tmp_path / name} is a directory, not a file; fix the path"]), out.stderr
    os.rmdir(tmp_path / name)
    path = tmp_path / name
    path.write_bytes(b"\0" * 64)
    real = os.access
    monkeypatch.setattr(os, "access", lambda where, mode, **kw: str(where) != str(path) and real(where, mode, **kw))
    with pytest.raises(script.ConfigError) as refused:
        script.resolve_config(None, [f"{key}={path}"])
    assert ("C3", key, f"file {path} may not be read (permission denied); fix its permissions") in refused.value.problems

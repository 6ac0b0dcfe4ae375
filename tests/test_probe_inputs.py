"""Issues 21 and 31: the probe never trains on stale features or on data it cannot learn from. What its features
depend on (backbone.pool, kwargs, output, the user's build file, the backbone's tensors, the feature size, the
training data) keys the feature cache (R11) and is compared when a run resumes (S7): a change is one line,
exit 2, nothing overwritten. A data file is known by the SHA-256 of all its bytes (content_record), and a
NaN/inf window (C9) or labels that are not class ids (C3) are refused by the run, the dry run and
diagnose_and_fix.py with one and the same line.

The backbone is a zoo model built by a user's own build file (`mymod_r11.py:build`, the way a braindecode
Deep4Net is built by the user's `mymod.py`): the class lives in zoo.py, so only the build file's content can
say that the features changed.
"""
import importlib.util
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch

from test_probe import TINY, ckpt, sets
from test_probe_backbones import TESTS, run_in, save_splits
import diagnose_and_fix as dx
import train_probe as tp

BUILD_FILE = '''import zoo
SCALE = 1.0  # the edit between the kill and the relaunch: another input scale, the same class and weights


def build(channels, **kwargs):
    net = zoo.token_transformer(channels, **kwargs)
    net.register_forward_pre_hook(lambda module, args: (args[0] * SCALE,))
    return net
'''
BASE = TINY + ["backbone.target=mymod_r11:build", "backbone.kwargs={channels: 4}", "backbone.pool=mean_tokens",
               "backbone.cache_features=true", "train.save_every_steps=2"]


def tree_bytes(run_dir):
    """Every file of the run dir and its bytes."""
    found = {}
    for parent, _, names in os.walk(run_dir):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, run_dir)] = f.read()
    return found


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A user's project: zoo.py, the build file mymod_r11.py, and a run SIGKILLed at step 7 (last.pt at 6)."""
    project = tmp_path_factory.mktemp("project")
    shutil.copy(os.path.join(TESTS, "zoo.py"), project / "zoo.py")
    (project / "mymod_r11.py").write_text(BUILD_FILE)
    died = run_in(project, *sets(*BASE), "--run_dir", "runs/r", env={"KIT_FAULT_KILL_AT": "7:1"})
    assert died.returncode == -signal.SIGKILL, died.stderr
    run_dir = project / "runs" / "r"
    assert ckpt(str(run_dir))["global_step"] == 6 and len(os.listdir(run_dir / "features")) == 2
    return project, run_dir


def relaunch(capsys, monkeypatch, project, *extra):
    """train_probe.main from the project directory, as `python train_probe.py --set ...` there: (code, stdout, stderr lines)."""
    monkeypatch.chdir(project)
    code = tp.main([*sets(*BASE, *extra), "--run_dir", "runs/r"])
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


def test_r11_s7_a_killed_run_relaunched_on_other_features_exits_2_naming_the_key_and_touches_nothing(
        killed, capsys, monkeypatch):
    project, run_dir = killed
    before = tree_bytes(run_dir)
    for extra, key, says in [
        (["backbone.pool=cls"], "backbone.pool", "'mean_tokens' -> 'cls'"),  # the same feature size, other features
        (["backbone.kwargs={channels: 4, dim: 8}"], "backbone.kwargs", "{'channels': 4, 'dim': 8}"),  # 16 -> 8 features
    ]:
        code, out, err = relaunch(capsys, monkeypatch, project, *extra)
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"config error: {key}: changed since the checkpoint in runs/r (step 6)"), err[0]
        assert says in err[0] and "nothing was touched" in err[0] and "resumed" not in out
        assert tree_bytes(run_dir) == before  # feature files, checkpoints, logs: byte for byte
    assert "feature dim: 16 -> 8" in relaunch(capsys, monkeypatch, project, "backbone.kwargs={channels: 4, dim: 8}")[2][0]
    # The build file edited between the kill and the relaunch: the same class, weights and feature size.
    (project / "mymod_r11.py").write_text(BUILD_FILE.replace("SCALE = 1.0", "SCALE = 2.0"))
    try:
        code, out, err = relaunch(capsys, monkeypatch, project)
    finally:
        (project / "mymod_r11.py").write_text(BUILD_FILE)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("config error: backbone build file: ") and "mymod_r11.py changed" in err[0]
    assert tree_bytes(run_dir) == before


def test_r11_a_finished_run_rerun_with_a_changed_kwarg_or_build_file_is_refused_not_complete(killed, capsys, monkeypatch):
    project, run_dir = killed
    code, out, err = relaunch(capsys, monkeypatch, project)  # the same settings: resumes and finishes
    assert code == 0 and "resumed from" in out and "loaded from" in out, err
    assert ckpt(str(run_dir))["finished"]
    before = tree_bytes(run_dir)
    code, out, err = relaunch(capsys, monkeypatch, project, "backbone.kwargs={channels: 4, heads: 4}")
    assert code == 2 and len(err) == 1 and "holds a finished run" in err[0] and "backbone.kwargs" in err[0], err
    assert "complete" not in out and "loaded from" not in out
    (project / "mymod_r11.py").write_text(BUILD_FILE + "# an edit\n")
    try:
        assert tp.finished_run_pending(tp.resolve_config(None, BASE)[0], ckpt(str(run_dir)), "runs/r")  # launch.sh asks
        code, out, err = relaunch(capsys, monkeypatch, project)
    finally:
        (project / "mymod_r11.py").write_text(BUILD_FILE)
    assert code == 2 and len(err) == 1 and "mymod_r11.py changed" in err[0] and "never continued" in err[0], err
    assert tree_bytes(run_dir) == before
    code, out, err = relaunch(capsys, monkeypatch, project)
    assert code == 0 and "run already complete at step 12" in out


def test_r11_s7_diagnose_flags_a_checkpoint_whose_features_came_from_other_settings(killed, monkeypatch):
    import contextlib
    import io
    import json
    import diagnose_and_fix as dx
    project, run_dir = killed
    monkeypatch.chdir(project)

    def report(*extra):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = dx.main([*[a for o in BASE + list(extra) for a in ("--set", o)], "--checkpoint",
                            str(run_dir / "checkpoints" / "last.pt"), "--json"])
        return code, [f for f in json.loads(out.getvalue())["findings"] if f["id"] == "S7" and f["source"] == "checkpoint"]

    assert report()[1] == []
    code, s7 = report("backbone.pool=cls")
    assert code == 1 and s7[0]["severity"] == "critical" and "backbone.pool: 'mean_tokens' -> 'cls'" in s7[0]["evidence"]


# ----------------------------------------------------------------------------- issue 31: data content, C9, C3
def test_r11_an_edit_between_sampled_blocks_with_the_mtime_put_back_is_refused_and_its_features_not_reused(
        tmp_path, capsys):
    """The user's trial: 96 windows of 19 x 1024 (7.5 MB) through her own encoder (zoo EEGNet), the run stopped
    at step 6; windows 40-43 multiplied by 100 in place through a memory map, the mtime put back as `touch -r`
    does. 16 sampled 64 KiB blocks missed the edit: the relaunch resumed, and a new run loaded the old features."""
    rng = np.random.default_rng(0)
    files = []
    for split, n in (("train", 96), ("val", 16)):
        np.save(tmp_path / f"{split}_x.npy", rng.standard_normal((n, 19, 1024)).astype(np.float32))
        np.save(tmp_path / f"{split}_y.npy", (np.arange(n) % 2).astype(np.int64))
        files += [f"data.{split}_{k}={tmp_path}/{split}_{k}.npy" for k in "xy"]
    settings = TINY + files + ["backbone.target=zoo:eegnet", "backbone.kwargs={channels: 19}",
                               "backbone.cache_features=true", "train.batch_size=16"]
    run_dir = str(tmp_path / "run")
    cfg = tp.resolve_config(None, settings)[0]
    assert tp.train(cfg, run_dir, "none", stop_after=2, quiet=True)[0] == "stopped"
    before = tree_bytes(run_dir)
    path = tmp_path / "train_x.npy"
    times = os.stat(path)
    x = np.load(path, mmap_mode="r+")
    x[40:44] *= 100
    x.flush()
    del x
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    code = tp.main([*sets(*settings), "--run_dir", run_dir])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("config error: data.train_x content: changed since the checkpoint") and \
        "the training windows changed" in err[0] and err[0].count("data.train_x content") == 1, err[0]
    assert tree_bytes(run_dir) == before
    # the dry run of that relaunch refuses it with the same line (it passed, and the real run then refused)
    assert tp.main([*sets(*settings), "--run_dir", run_dir, "--dry_run"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == err
    assert tree_bytes(run_dir) == before
    shutil.rmtree(os.path.join(run_dir, "checkpoints"))  # started again from scratch in the same directory
    tp.train(cfg, run_dir, "none", stop_after=2, quiet=True)
    log = open(os.path.join(run_dir, "train.log")).read().split("features: computing 96 train windows")
    assert len(log) == 3 and "train windows loaded from" not in log[2]  # computed again, never the old file


def test_r11_a_checkpoint_recorded_before_whole_file_hashes_is_compared_on_its_size():
    """A run saved by the sampled-block version (size + sampled_sha256) still resumes on a file of its size: its
    record cannot be compared with a whole-file hash, and refusing it would lose the run."""
    old = {"data.train_x content": {"size": 100, "sampled_sha256": "ab"}}
    assert tp.input_changes(old, {"data.train_x content": {"bytes": 100, "sha256": "cd"}}) == []
    assert tp.input_changes(old, {"data.train_x content": {"bytes": 101, "sha256": "cd"}})


CASES = {  # what is written into a split's file -> the key and the words of the refusal
    "nan_val": ("val_x", lambda x: x.__setitem__((5, 2, 7), np.nan), "data.val_x", "NaN or inf in window 5"),
    "inf_train": ("train_x", lambda x: x.__setitem__((3, 0, 0), np.inf), "data.train_x", "NaN or inf in window 3"),
    "string_labels": ("train_y", None, "data.train_y", "labels of dtype <U8 ('abnormal', 'normal', ...)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_c9_c3_a_nan_window_or_string_labels_are_one_line_from_the_run_the_dry_run_and_diagnose(case, tmp_path, capsys):
    """Issue 31: one NaN in val_x gave val/loss=nan and an AUROC computed anyway (exit 0); one in a training
    window 30 G4 skipped steps that never named it; string labels a ValueError traceback. Found in the read
    that hashes the file (C9), named by file and window, exit 2, nothing written; the same line from --dry_run
    and diagnose_and_fix.py --config."""
    name, edit, key, says = CASES[case]
    settings = TINY + save_splits(tmp_path)
    if edit:
        x = np.load(tmp_path / f"{name}.npy")
        edit(x)
        np.save(tmp_path / f"{name}.npy", x)
    else:
        np.save(tmp_path / f"{name}.npy", np.array(["normal", "abnormal"] * 6))
    assert says in one_line_everywhere(settings, key, tmp_path, capsys)


LINE_CASES = {  # a new user's trial: what gave exit 0 with meaningless numbers, or a traceback, and diagnose's
    # exit 0 -> the settings and the words of the one line
    "val_windows_of_another_length": (["lengths"], "data.val_x",
                                      "has 4 channels x 64 samples, data.train_x has 4 x 128"),
    "empty_val_file": (["empty"], "data.val_x", "has shape (0, 4, 128) and its labels 0 rows"),
    "truncated_val_file": (["cut"], "data.val_x", "val_x.npy: shorter than its .npy header says (a copy cut short?)"),
    "more_classes_than_labels": (["head.num_classes=3"], "head.num_classes", "are 0..1: the head would learn a class"),
    "labels_of_one_class": (["zeros"], "head.num_classes", "are 0..0: the head would learn a class no window has, "
                            "and AUROC and balanced accuracy would not be the task's; a probe needs two classes"),
    "a_build_that_raises": (["backbone.target=zoo:fetching_weights", "backbone.kwargs={channels: 4}"],
                            "backbone.target",
                            "raised RuntimeError: the weights server is unreachable in fetching_weights (zoo.py:"),
    "nan_weights": (["nan_weights"], "backbone.checkpoint", "w.pt: tensor net.0.weight holds NaN or inf"),
    "a_3d_output_without_pool": (["backbone.target=zoo:conv_time", "backbone.kwargs={channels: 4}"], "backbone.pool",
                                 "features have shape (2, 16, 32), not [B, D]"),
}


@pytest.mark.parametrize("case", sorted(LINE_CASES))
def test_c3_what_the_backbone_or_the_head_cannot_use_is_one_line_from_the_run_the_dry_run_and_diagnose(
        case, tmp_path, capsys):
    """Val windows half as long through a pooling backbone trained to val/auroc 0.35 (exit 0); head.num_classes 3 on
    0/1 labels trained a 3-way head (exit 0); a build function that raised, or an empty split, was a traceback. Each
    is now the run's one line (exit 2, nothing written), the same from --dry_run, and diagnose's critical finding
    (it built the backbone for its memory estimate and said 'info')."""
    extra, key, says = LINE_CASES[case]
    files = save_splits(tmp_path, lengths=(128, 64) if extra == ["lengths"] else (128, 128))
    if extra == ["empty"]:
        np.save(tmp_path / "val_x.npy", np.zeros((0, 4, 128), np.float32))
        np.save(tmp_path / "val_y.npy", np.zeros(0, np.int64))
    if extra == ["cut"]:  # an interrupted copy: a whole header, part of the data ('not in .npy format' before)
        (tmp_path / "val_x.npy").write_bytes((tmp_path / "val_x.npy").read_bytes()[:1000])
    for split in ("train", "val") if extra == ["zeros"] else ():  # a file of normal windows only, twice
        np.save(tmp_path / f"{split}_y.npy", np.zeros(12 if split == "train" else 8, np.int64))
    if extra == ["nan_weights"]:  # a diverged pretraining's weights: the run computed every feature, then G4 aborted
        state = tp.build_backbone(tp.resolve_config(None, TINY + ["backbone.target=zoo:conv_time",
                                                                 "backbone.kwargs={channels: 4}"])[0], 4).state_dict()
        state["net.0.weight"][0, 0, 0] = float("nan")
        torch.save(state, tmp_path / "w.pt")
        extra = ["backbone.target=zoo:conv_time", "backbone.kwargs={channels: 4}", "backbone.pool=mean_time",
                 f"backbone.checkpoint={tmp_path / 'w.pt'}"]
    settings = TINY + files + [e for e in extra if "=" in e]
    assert says in one_line_everywhere(settings, key, tmp_path, capsys)


def one_line_everywhere(settings, key, tmp_path, capsys):
    """The run's one line (exit 2, nothing written), the same from --dry_run and as diagnose's one critical finding."""
    lines = []
    for extra in ([], ["--dry_run"]):
        code = tp.main([*sets(*settings), "--run_dir", str(tmp_path / "run"), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith(f"config error: {key}: "), err
        lines.append(err[0])
    assert lines[0] == lines[1] and not (tmp_path / "run").exists()
    capsys.readouterr()
    (tmp_path / "probe.yaml").write_text("task: probe\n")
    dx.main(["--config", str(tmp_path / "probe.yaml"), *sets(*settings), "--json"])
    found = [f for f in json.loads(capsys.readouterr().out)["findings"] if f["severity"] == "critical"]
    assert [f"config error: {f['evidence']}" for f in found] == lines[:1]
    return lines[0]


@pytest.mark.parametrize("name, says", [("train_x", " is a directory, not a file; fix the path"),
                                        ("val_x", ": not in .npy format; give the file np.save wrote"),
                                        ("val_y", " is a directory, not a file; fix the path")])
def test_c3_a_data_file_that_is_a_directory_or_no_npy_is_one_line_from_the_run_the_dry_run_and_diagnose(
        name, says, tmp_path, capsys):
    """A new user's data.train_x naming a directory, or a text file saved as .npy: np.load's traceback, exit 1, from
    the run and the dry run, and diagnose's 'cannot size the training set: IsADirectoryError ...'."""
    settings = TINY + save_splits(tmp_path)
    os.remove(tmp_path / f"{name}.npy")
    if "directory" in says:  # check_file() refuses it by key, before load_npy() would
        os.mkdir(tmp_path / f"{name}.npy")
    else:
        (tmp_path / f"{name}.npy").write_text("0.1 0.2 0.3\n")
    line = one_line_everywhere(settings, f"data.{name}", tmp_path, capsys)
    assert line.endswith(f"{name}.npy{says}"), line
    if name == "train_x":  # the schedule tool sizes the run from this file's header: the same line, exit 2
        path = os.path.join(os.path.dirname(tp.__file__), "test_scheduler_dry_run.py")
        spec = importlib.util.spec_from_file_location("lr_tool", path)
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        assert tool.main([str(tmp_path / "probe.yaml"), *sets(*settings)]) == 2
        assert capsys.readouterr().err.strip() == line


@pytest.mark.parametrize("manifest", ['[{"file": "train_x.npy"}]', '{"exported_by": "my_pipeline", "files": 4}'],
                         ids=["a_list", "another_tools_mapping"])
def test_c6_your_own_windows_beside_another_tools_manifest_json_are_read_as_they_are(manifest, tmp_path):
    # a new user's windows exported with their own tool's manifest.json: a JSON list was an AttributeError traceback,
    # a mapping 'manifest.json is unreadable; prepare again: python prepare_tuab.py ...', a tool they never ran
    keys = save_splits(tmp_path)
    (tmp_path / "manifest.json").write_text(manifest)
    cfg, _ = tp.resolve_config(None, TINY + keys)
    assert cfg["data.train_x"] == str(tmp_path / "train_x.npy") and tp.read_manifest(str(tmp_path)) is None

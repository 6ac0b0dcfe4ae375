"""A run is read from any directory (C8, E11): a user launches a probe and a distillation run from her own
directory with relative paths (data files, backbone.checkpoint) and her own modules (backbone.target:
my_encoder:build, student.target / teacher.target: my_lm:build, in that directory). Diagnose, --evaluate,
the dry run of the finished run and load_export, run later from another directory in a fresh interpreter,
read the same files and modules and give the run's own numbers.

The two runs are made once, as processes launched from the user's directory, and shared by the tests here.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_probe as tp  # noqa: E402
from run_records import records  # noqa: E402

ENCODER = '''import torch.nn as nn


class Encoder(nn.Module):
    def __init__(self, channels=4, width=8):
        super().__init__()
        self.conv = nn.Conv1d(channels, width, 7, stride=4)

    def forward(self, x):
        return self.conv(x).abs().mean(-1)  # [B, width]: the windows' amplitude per filter


def build(**kwargs):
    return Encoder(**kwargs)
'''
LM = '''import torch.nn as nn


class TinyLM(nn.Module):
    def __init__(self, vocab=64, width=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, idx):
        h, _ = self.rnn(self.embed(idx))
        return self.head(h), h


def build(**kwargs):
    return TinyLM(**kwargs)
'''
PROBE = ["data.train_x=data/train_x.npy", "data.train_y=data/train_y.npy", "data.val_x=data/val_x.npy",
         "data.val_y=data/val_y.npy", "data.test_x=data/test_x.npy", "data.test_y=data/test_y.npy",
         "backbone.target=my_encoder:build", "backbone.checkpoint=data/encoder_pretrained.pt", "train.batch_size=4",
         "train.grad_accum=3", "train.epochs=3", "train.log_every=1", "train.eval_batch_size=16",
         "schedule.warmup=2", "optim.lr=0.01"]
DISTILL = ["data.train_bin=data/train.bin", "data.val_bin=data/val.bin", "data.vocab_size=64", "data.seq_len=16",
           "data.limit=40", "data.val_windows=8", "train.epochs=1", "train.batch_size=4", "train.eval_every=5",
           "schedule.warmup=2", "student.target=my_lm:build", "kd.enabled=true", "teacher.target=my_lm:build",
           "teacher.kwargs={width: 24}", "kd.gamma=0", "train.max_loss_share=1"]


def quiet_env(**extra):
    return {**{k: v for k, v in os.environ.items() if not k.startswith("KIT_FAULT")}, **extra}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The user's directory (data, her modules) with runs/probe and runs/lm launched from it, relative paths only."""
    user = tmp_path_factory.mktemp("user")
    (user / "data").mkdir()
    (user / "my_encoder.py").write_text(ENCODER)
    (user / "my_lm.py").write_text(LM)
    rng = np.random.default_rng(0)
    for split, n in (("train", 38), ("val", 24), ("test", 16)):
        y = (np.arange(n) % 2).astype(np.int64)
        x = rng.standard_normal((n, 4, 128)).astype(np.float32) * (1 + 2 * y[:, None, None])  # abnormal: louder
        np.save(user / "data" / f"{split}_x.npy", x.astype(np.float32))
        np.save(user / "data" / f"{split}_y.npy", y)
    torch.manual_seed(0)
    torch.save(torch.nn.Conv1d(4, 8, 7, stride=4).state_dict(), user / "data" / "encoder_raw.pt")
    state = torch.load(user / "data" / "encoder_raw.pt", weights_only=True)
    torch.save({f"conv.{k}": v for k, v in state.items()}, user / "data" / "encoder_pretrained.pt")
    for split, n in (("train", 4000), ("val", 1000)):
        ((np.arange(n) * 7 + rng.integers(0, 3, n)) % 64).astype(np.uint16).tofile(user / "data" / f"{split}.bin")
    launches = []  # both at once: most of a tiny run's time is the interpreter importing torch
    for script, run, settings in (("train_probe.py", "runs/probe", PROBE), ("train_distill.py", "runs/lm", DISTILL)):
        argv = [sys.executable, os.path.join(ROOT, script), "--run_dir", run] + [a for s in settings for a in ("--set", s)]
        launches.append(subprocess.Popen(argv, cwd=user, env=quiet_env(), stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True))
    for launch in launches:
        assert launch.wait() == 0, launch.stderr.read()
    return user


READER = r'''
import contextlib, io, json, sys
import numpy as np, torch
import diagnose_and_fix as dx, train_distill as td, train_probe as tp

def run(main, argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()

probe, lm = sys.argv[1], sys.argv[2]
got = {"loud": {}, "evaluated": {}}
for run_dir in (probe, lm):
    for argv in (["--log", run_dir + "/metrics.jsonl"], ["--checkpoint", run_dir + "/checkpoints/last.pt"],
                 ["--config", run_dir + "/config.yaml"]):
        code, text = run(dx.main, argv + ["--json"])
        got["loud"][" ".join(argv)] = [[f["id"], f["severity"], f["evidence"]] for f in json.loads(text)["findings"]
                                       if f["severity"] != "info" and f["id"] != "E7"]
    for path in (run_dir, run_dir + "/export"):
        code, text = run((tp if run_dir == probe else td).main, ["--evaluate", path])
        got["evaluated"][path] = [code, text.splitlines()[0], json.loads(text.splitlines()[-1])]
with torch.no_grad():
    got["probe_logits"] = list(tp.load_export(probe + "/export")(torch.from_numpy(np.load(sys.argv[3])[:3])).shape)
    got["lm_logits"] = list(td.load_export(lm + "/export")(torch.zeros(2, 16, dtype=torch.long))[0].shape)
got["dry_run"] = run(tp.main, ["--dry_run", "--config", probe + "/config.yaml"])
print(json.dumps(got))
'''


MOVED = r'''
import contextlib, io, json, sys
import diagnose_and_fix as dx, train_probe as tp

out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = dx.main(["--log", sys.argv[1] + "/metrics.jsonl", "--json"])
try:
    tp.load_export(sys.argv[1] + "/export")
    refusal = None
except tp.ConfigError as err:
    refusal = str(err)
print(json.dumps([code, out.getvalue(), refusal]))
'''


def read_from(directory, user):
    """READER in a fresh interpreter whose current directory is `directory`; only the kit is on its path."""
    argv = [sys.executable, "-c", READER, str(user / "runs" / "probe"), str(user / "runs" / "lm"),
            str(user / "data" / "val_x.npy")]
    done = subprocess.run(argv, cwd=directory, env=quiet_env(PYTHONPATH=ROOT), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def own_numbers(run_dir):
    """The run's eval record at its best.pt's step (the probe's test record is written at that step too)."""
    best = torch.load(os.path.join(run_dir, "checkpoints", "best.pt"), map_location="cpu", weights_only=True)
    return {k: v for r in records(run_dir) if r.get("step") == best["global_step"] for k, v in r.items()
            if k.startswith(("val/", "test/"))}


def test_c8_e11_runs_launched_with_relative_paths_read_from_another_directory_give_no_false_finding_and_their_own_numbers(
        launched, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    got = read_from(elsewhere, launched)
    assert got["loud"] == {argv: [] for argv in got["loud"]} and len(got["loud"]) == 6
    for run in ("probe", "lm"):
        run_dir = str(launched / "runs" / run)
        with open(os.path.join(run_dir, "train.log")) as f:
            assert [line for line in f if "WARNING" in line] == []
        want = own_numbers(run_dir)
        assert {"val/loss", "val/auroc" if run == "probe" else "val/agreement"} <= set(want)
        for path in (run_dir, run_dir + "/export"):
            code, first, metrics = got["evaluated"][path]
            assert code == 0 and {k: metrics[k] for k in want} == want, path  # the run's own data, the same bits
            assert first.startswith("scoring ") and "with the run's config" in first, first
            assert str(launched / "data" / ("val_x.npy" if run == "probe" else "val.bin")) in first
    assert got["probe_logits"] == [3, 2] and got["lm_logits"] == [2, 16, 64]
    code, text = got["dry_run"]
    assert code == 0 and "dry run passed" in text, text


def test_c8_a_run_dir_copied_away_from_its_data_is_diagnosed_with_one_info_line_and_its_export_names_what_is_missing(
        launched, tmp_path):
    laptop = tmp_path / "laptop"
    shutil.copytree(launched / "runs" / "probe", laptop / "probe")
    data, hidden = launched / "data", launched / "data_elsewhere"
    os.rename(data, hidden)
    try:
        done = subprocess.run([sys.executable, "-c", MOVED, str(laptop / "probe")], cwd=tmp_path,
                              env=quiet_env(PYTHONPATH=ROOT), capture_output=True, text=True)
    finally:
        os.rename(hidden, data)
    assert done.returncode == 0, done.stderr
    code, report, refusal = json.loads(done.stdout.splitlines()[-1])
    assert code == 0, report  # no critical finding
    findings = json.loads(report)["findings"]
    missing = [f for f in findings if f["id"] == "C3"]
    assert len(missing) == 1 and missing[0]["severity"] == "info", missing
    assert str(data / "train_x.npy") in missing[0]["evidence"] and "does not need them" in missing[0]["evidence"]
    # the run's length comes from its checkpoint, so the LR of every logged step is still checked
    assert any(f["id"] == "S2" and "38 samples" in f["evidence"] for f in findings), findings
    assert [f for f in findings if f["severity"] != "info" and f["id"] != "E7"] == []
    assert refusal.startswith("config error: backbone.checkpoint: ") and str(data / "encoder_pretrained.pt") in refusal


def test_c8_e11_evaluate_without_the_runs_config_refuses_and_names_keys_that_are_not_the_runs(launched, tmp_path,
                                                                                              capsys):
    export = tmp_path / "export"
    shutil.copytree(launched / "runs" / "probe" / "export", export)
    os.remove(export / "config.yaml")  # an export written before exports carried the run's config
    assert tp.main(["--evaluate", str(export)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no config.yaml" in err[0] and "--config" in err[0], err
    # a config file on top of the run's own config: its keys win, and each one that is not the run's is named
    other = tmp_path / "other.yaml"
    other.write_text(f"data:\n  val_x: {launched}/data/test_x.npy\n  val_y: {launched}/data/test_y.npy\n")
    assert tp.main(["--evaluate", str(launched / "runs" / "probe"), "--config", str(other)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert f"scoring val {launched}/data/test_x.npy" in first and f"+ {other}" in first
    assert f"not the run's: data.val_x '{launched}/data/test_x.npy' (the run's: '{launched}/data/val_x.npy')" in first


def test_c8_a_target_module_found_nowhere_names_the_launch_directory(tmp_path):
    gone = str(tmp_path / "gone")
    with pytest.raises(tp.ConfigError) as err:
        tp.import_target("c8_no_such_module:build", "backbone.target", gone)
    (rid, key, message), = err.value.problems
    assert key == "backbone.target" and f"launched from {gone}, which is not on this machine" in message
    assert "PYTHONPATH" in message


def test_c8_a_finished_run_saved_with_relative_paths_is_still_the_same_run(tmp_path, monkeypatch):
    # A run recorded before paths were absolute (config.yaml and checkpoints with data/x.npy) relaunched from its
    # directory is the same run (complete), not "values differ"; nor is a relaunch from another directory that
    # names the same absolute files (launch_dir is where it started, not what it is).
    monkeypatch.chdir(tmp_path)
    cfg, _ = tp.resolve_config(None, ["backbone.checkpoint=enc.pt"], check_files=False)
    assert cfg["backbone.checkpoint"] == str(tmp_path / "enc.pt") and cfg["launch_dir"] == str(tmp_path)
    old = {**cfg, "backbone.checkpoint": "enc.pt"}
    del old["launch_dir"]
    assert tp.finished_run_problem(cfg, {"config": old}, "runs/x") is None
    assert tp.finished_run_problem(cfg, {"config": {**cfg, "launch_dir": "/elsewhere"}}, "runs/x") is None
    assert tp.finished_run_problem(cfg, {"config": {**old, "backbone.checkpoint": "other.pt"}}, "runs/x") is not None

"""The built-in corpus is the same bytes on every machine, and what is trained on it is keyed by them (issue 21).

It used to be the running interpreter's standard-library sources, whose bytes differ between Python patch
versions: the demo's data, its measured table, every teacher trained on it and the two halves of
tests/test_ddp.py's distillation comparison (one in-process, one through launch.sh) moved with the Python
that ran them. It is generated now (builtin_document(): random.Random(n).random() only, the one stream
Python promises to keep); a checkpoint records the sha256 of the data it was trained on, and resuming it or
distilling from it on other bytes is refused.
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_distill as td  # noqa: E402
from run_records import teacher_run  # noqa: E402

# sha256 of the demo's two splits (configs/distill_demo*.yaml: 64-byte windows, 2,000,000 / 200,000 bytes), the
# same under Python 3.9 to 3.13 (checked when the corpus was made); a change here changes the demo's table.
DEMO_SHA256 = {"train": "04ab31d17c921104f0bf426f5a6c7e70f2bad10aa401df039b63ebfb47bc36ae",
               "val": "815180c22fe12220600829032392068d8b297e609b77df54208d40b1d4d71012"}
TINY = ["data.seq_len=32", "data.builtin.train_bytes=6000", "data.builtin.val_bytes=3000", "data.val_windows=8",
        "teacher.n_layer=1", "teacher.n_head=2", "teacher.n_embd=16", "student.n_layer=1", "student.n_head=2",
        "student.n_embd=16", "train.epochs=null", "train.max_steps=4", "train.batch_size=2", "train.log_every=1",
        "train.eval_every=2", "train.save_every_steps=1", "schedule.warmup=1"]


def test_c4_the_demo_corpus_is_the_same_bytes_on_every_machine():
    cfg, _ = td.resolve_config(os.path.join(ROOT, "configs", "distill_demo_teacher.yaml"))
    assert td.builtin_digest(cfg) == DEMO_SHA256
    assert td.builtin_corpus_problem() is None  # the generator's pinned check holds on this Python
    windows = td.TokenWindows(cfg, "val")
    assert windows.digest == DEMO_SHA256["val"] and DEMO_SHA256["val"][:12] in windows.source
    assert "Python" not in windows.source.split("generated")[0]  # no interpreter version in what the data is


@pytest.fixture(scope="module")
def stopped_teacher(tmp_path_factory):
    """A kd.enabled=false run on a slice of the corpus, stopped after 2 of its 4 steps: last.pt is partial."""
    run_dir = str(tmp_path_factory.mktemp("teacher") / "run")
    cfg, _ = td.resolve_config(None, teacher_run(TINY))
    outcome, _ = td.train(cfg, run_dir, "none", stop_after=2, quiet=True)
    assert outcome == "stopped"
    return cfg, run_dir


def as_an_older_version_wrote_it(path, out):
    """The checkpoint as a kit that read the stdlib wrote it: no data digest (or another one)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["data_digest"] == td.builtin_digest(ckpt["config"])
    del ckpt["data_digest"]
    torch.save(ckpt, out)


def test_c4_a_teacher_trained_on_another_builtin_corpus_is_refused(stopped_teacher, tmp_path):
    _, run_dir = stopped_teacher
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    kd = TINY + ["kd.enabled=true", "kd.top_k=4"]
    td.resolve_config(None, kd + [f"kd.teacher_checkpoint={last}"])  # its own corpus: accepted
    old = str(tmp_path / "old.pt")
    as_an_older_version_wrote_it(last, old)
    with pytest.raises(td.ConfigError) as err:  # resolve_config: the run, --dry_run and diagnose all refuse it
        td.resolve_config(None, kd + [f"kd.teacher_checkpoint={old}"])
    assert [p[:2] for p in err.value.problems] == [("C3", "kd.teacher_checkpoint")]
    assert "trained on another built-in corpus" in err.value.problems[0][2]


def test_s7_c4_resuming_on_other_data_than_the_checkpoint_was_trained_on_is_refused(stopped_teacher, tmp_path):
    cfg, run_dir = stopped_teacher
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    as_an_older_version_wrote_it(last, str(tmp_path / "last.pt"))
    os.replace(str(tmp_path / "last.pt"), last)
    before = {name: open(os.path.join(run_dir, "checkpoints", name), "rb").read()
              for name in os.listdir(os.path.join(run_dir, "checkpoints"))}
    with pytest.raises(td.ConfigError) as err:
        td.train(cfg, run_dir, "auto", quiet=True)
    assert [p[:2] for p in err.value.problems] == [("S7", "--run_dir")]
    assert "trained on other data" in err.value.problems[0][2]
    after = {name: open(os.path.join(run_dir, "checkpoints", name), "rb").read()
             for name in os.listdir(os.path.join(run_dir, "checkpoints"))}
    assert after == before  # nothing overwritten

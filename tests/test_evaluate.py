"""--evaluate (E11): what it refuses and what it writes, on the built-in encoder and on a user's backbone.

Two tiny probe runs on .npy windows of 4 channels x 128 samples (the built-in encoder, and tests/zoo.py's
BatchNorm/dropout conv_time pooled over time, which reads any window length) are shared by every test here.
"""
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_probe as tp  # noqa: E402

SETTINGS = ["train.batch_size=4", "train.grad_accum=3", "train.epochs=3", "train.eval_batch_size=16",
            "schedule.warmup=2", "optim.lr=0.01"]
BACKBONES = {"builtin": ["backbone.kwargs={width: 8, heads: 2}"],
             "zoo": ["backbone.target=zoo:conv_time", "backbone.kwargs={channels: 4, width: 8}",
                     "backbone.pool=mean_time"]}


def windows(path, n, channels=4, length=128, seed=0):
    rng = np.random.default_rng(seed)
    np.save(f"{path}_x.npy", rng.standard_normal((n, channels, length)).astype(np.float32))
    np.save(f"{path}_y.npy", (np.arange(n) % 2).astype(np.int64))
    return f"{path}_x.npy"


@pytest.fixture(scope="module")
def probe_runs(tmp_path_factory):
    """{"builtin"/"zoo": (run dir, its --set values)}: finished runs with best.pt and export/."""
    tmp = tmp_path_factory.mktemp("evaluate")
    windows(tmp / "train", 38)
    windows(tmp / "val", 24, seed=1)
    data = [f"data.{s}_{k}={tmp}/{s}_{k}.npy" for s in ("train", "val") for k in ("x", "y")]
    runs = {}
    for name, backbone in BACKBONES.items():
        cfg, _ = tp.resolve_config(None, SETTINGS + data + backbone)
        outcome, _ = tp.train(cfg, str(tmp / name), "none", quiet=True)
        assert outcome == "finished"
        runs[name] = (tmp / name, SETTINGS + data + backbone)
    return {"tmp": tmp, **runs}


def sets(values):
    return [a for v in values for a in ("--set", v)]


def listing(directory):
    return sorted(os.path.join(root, f) for root, _, files in os.walk(directory) for f in files)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_e11_probe_evaluate_refuses_windows_of_other_channels_or_length_than_the_run_trained_on(probe_runs, name,
                                                                                                 capsys):
    # A run on 4 x 128 windows scored on 2-channel or 64-sample windows: the built-in encoder is rebuilt for any
    # channel count and both backbones pool any length, so the head got features of its width and printed an
    # AUROC, exit 0. The checkpoint and the export are refused alike: one line naming data.val_x, exit 2.
    run_dir, values = probe_runs[name]
    tmp = probe_runs["tmp"]
    other = {"channels": windows(tmp / "val2ch", 24, channels=2), "length": windows(tmp / "val64", 24, length=64)}
    before = listing(run_dir)
    for what, path in other.items():
        if name == "zoo" and what == "channels":
            continue  # its kwargs fix 4 channels: the backbone itself fails on 2, refused as before
        for target in (str(run_dir), str(run_dir / "export"), str(run_dir / "checkpoints" / "best.pt")):
            assert tp.main(["--evaluate", target, *sets(values + [f"data.val_x={path}"])]) == 2, (what, target)
            out, err = capsys.readouterr()
            assert out == "" and len(err.strip().splitlines()) == 1, err
            assert err.startswith("config error: data.val_x: ") and "was trained on 4 x 128" in err, err
    assert listing(run_dir) == before  # nothing written
    # the run's own windows still evaluate
    assert tp.main(["--evaluate", str(run_dir), *sets(values)]) == 0
    assert "val/auroc" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


DISTILL = ["data.seq_len=16", "data.limit=20", "data.val_windows=8", "data.builtin.train_bytes=40000",
           "data.builtin.val_bytes=8000", "train.epochs=1", "train.batch_size=4", "train.grad_accum=1",
           "train.eval_every=3", "train.save_every_minutes=null", "train.eval_batch_size=4", "schedule.warmup=2",
           "student.n_layer=1", "student.n_head=2", "student.n_embd=16", "kd.enabled=true",
           "teacher.target=zoo:tiny_causal_lm", "train.max_loss_share=1"]  # kd.gamma 0.1: a projection 16 -> 32


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory):
    """A finished KD run (a user module as the teacher, width 32) and its best eval's numbers."""
    import torch
    import train_distill as td
    run_dir = tmp_path_factory.mktemp("distill") / "run"
    cfg, _ = td.resolve_config(None, DISTILL)
    outcome, _ = td.train(cfg, str(run_dir), "none", quiet=True)
    assert outcome == "finished"
    best = torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert tuple(best["model"]["proj.weight"].shape) == (32, 16)
    return run_dir, td.read_metrics(str(run_dir))[1][best["global_step"]]


def test_e11_distill_evaluate_with_a_teacher_of_another_width_needs_no_projection(distill_run, capsys):
    # The KD projection (student 16 -> teacher 32) only fed the hidden-state loss; a teacher of width 24 here
    # crashed the load on proj.weight's size. The student's numbers are the run's own.
    import train_distill as td
    run_dir, want = distill_run
    assert td.main(["--evaluate", str(run_dir), *sets(DISTILL + ["teacher.kwargs={width: 24}"])]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (got["val/loss"], got["val/ppl"]) == (want["val/loss"], want["val/ppl"])
    assert "val/agreement" in got  # scored against the teacher of --set, as asked


def test_e11_distill_evaluate_with_an_absent_teacher_cache_builds_nothing_and_scores_without_it(distill_run, tmp_path,
                                                                                                 capsys):
    # kd.teacher_cache naming a directory that does not exist: --evaluate built the whole cache (hours at real
    # size) as a side effect. It builds nothing, says so in one line, and scores loss and ppl without it.
    import train_distill as td
    run_dir, want = distill_run
    cache = tmp_path / "cache"
    offline = DISTILL + [f"kd.teacher_cache={cache}", "kd.top_k=4", "kd.gamma=0"]
    before = listing(run_dir)
    assert td.main(["--evaluate", str(run_dir), *sets(offline)]) == 0
    out, err = capsys.readouterr()
    assert not os.path.exists(cache) and listing(run_dir) == before
    notes = [line for line in err.splitlines() if line.strip()]
    assert len(notes) == 1 and notes[0].startswith("note E11: kd.teacher_cache: ") and "builds no cache" in notes[0], err
    got = json.loads(out.strip().splitlines()[-1])
    assert (got["val/loss"], got["val/ppl"]) == (want["val/loss"], want["val/ppl"]) and "val/agreement" not in got


def one_line_pointing_at_what_evaluate_scores(err, run_dir):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: --evaluate: "), err
    assert all(str(p) in lines[0] for p in (run_dir, run_dir / "checkpoints" / "best.pt", run_dir / "export")), err
    return lines[0]


def test_e11_evaluate_of_a_log_or_the_checkpoints_directory_says_in_one_line_what_it_scores(probe_runs, distill_run,
                                                                                           capsys):
    # train.log gave 7 lines of torch's weights_only advice; checkpoints/ said "holds no probe.json".
    import train_distill as td
    for main, (run_dir, values) in ((tp.main, probe_runs["builtin"]), (td.main, (distill_run[0], DISTILL))):
        assert main(["--evaluate", str(run_dir / "train.log"), *sets(values)]) == 2
        line = one_line_pointing_at_what_evaluate_scores(capsys.readouterr().err, run_dir)
        assert "weights_only" not in line and "train.log is not a readable checkpoint" in line
        assert main(["--evaluate", str(run_dir / "checkpoints"), *sets(values)]) == 2
        line = one_line_pointing_at_what_evaluate_scores(capsys.readouterr().err, run_dir)
        assert "is a directory of checkpoints" in line and "probe.json" not in line


def read_csv(path):
    with open(path) as f:
        header, *rows = [line.rstrip("\n").split(",") for line in f]
    return header, rows


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_e11_probe_evaluate_writes_per_window_predictions_a_roc_curve_and_a_confusion_matrix(probe_runs, name,
                                                                                             capsys):
    # What braindecode / scikit-learn users look at beside the numbers: the CSV's scores are the ones the AUROC
    # and bacc of the JSON line came from, its labels the val file's, one row per window in file order.
    pytest.importorskip("matplotlib")
    run_dir, values = probe_runs[name]
    out = run_dir / "evaluation"
    for target in (run_dir, run_dir / "export"):
        if out.exists():
            for f in out.iterdir():
                f.unlink()
        assert tp.main(["--evaluate", str(target), *sets(values)]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        got = json.loads(lines[-1])
        assert [line for line in lines if str(out) in line] == [
            f"per-window predictions: {out}/ (val_predictions.csv, val_roc.png, val_confusion.png)"]
        header, rows = read_csv(out / "val_predictions.csv")
        assert header == ["index", "label", "prediction", "score"]
        labels = np.load(probe_runs["tmp"] / "val_y.npy")
        assert [int(r[0]) for r in rows] == list(range(len(labels))) and [int(r[1]) for r in rows] == labels.tolist()
        scores, predicted = np.array([float(r[3]) for r in rows]), np.array([int(r[2]) for r in rows])
        assert tp.auroc(scores, labels == 1) == got["val/auroc"]
        assert tp.balanced_accuracy(predicted, labels) == got["val/bacc"]
        for png in ("val_roc.png", "val_confusion.png"):
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_e11_probe_evaluate_without_matplotlib_writes_the_csv_and_says_the_pngs_need_it(probe_runs, monkeypatch,
                                                                                      capsys):
    run_dir, values = probe_runs["builtin"]
    out = run_dir / "evaluation"
    if out.exists():
        for f in out.iterdir():
            f.unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert tp.main(["--evaluate", str(run_dir), *sets(values)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if str(out) in x]
    assert line == [f"per-window predictions: {out}/ (val_predictions.csv); ROC and confusion-matrix PNGs need "
                    "matplotlib, which is not installed"]
    assert sorted(os.listdir(out)) == ["val_predictions.csv"]


def test_e11_roc_curve_points_enclose_the_auroc_with_ties_and_more_than_two_classes_get_a_score_each(tmp_path):
    rng = np.random.default_rng(3)
    scores, labels = rng.integers(0, 6, 200) / 5.0, rng.random(200) < 0.4  # many ties
    scorer = tp.companion("probe_evaluate", "--evaluate")  # --evaluate's code is that companion file's
    fpr, tpr = scorer.roc_curve_points(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    area = float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2))  # ties: the diagonal step, half credit
    assert area == pytest.approx(tp.auroc(scores, labels), abs=1e-12)
    probs = rng.dirichlet(np.ones(3), 5)
    scorer.write_predictions(str(tmp_path), {"test": (np.array([0, 1, 2, 2, 1]), probs)})
    header, rows = read_csv(tmp_path / "test_predictions.csv")
    assert header == ["index", "label", "prediction", "score_0", "score_1", "score_2"]
    assert [int(r[2]) for r in rows] == probs.argmax(1).tolist()


def test_e11_evaluate_with_other_data_settings_than_the_runs_names_each_key_that_differs(probe_runs, distill_run,
                                                                                       capsys):
    # Another data.seq_len or data.val_windows (or any data setting) gave other numbers with no word that they
    # were not the run's settings. The first line names every key that differs, with the run's value; the
    # run's own settings give no such words (a note on a healthy evaluation would be a false alarm).
    import train_distill as td
    run_dir, want = distill_run
    for target in (run_dir, run_dir / "export"):
        assert td.main(["--evaluate", str(target), "--set", "data.seq_len=8", "data.val_windows=4"]) == 0
        first, *_, last = capsys.readouterr().out.strip().splitlines()
        assert first.endswith("not the run's: data.seq_len 8 (the run's: 16), data.val_windows 4 (the run's: 8)"), first
        assert json.loads(last)["val/loss"] != want["val/loss"]
        assert td.main(["--evaluate", str(target)]) == 0
        out = capsys.readouterr().out
        assert "not the run's" not in out and json.loads(out.strip().splitlines()[-1])["val/loss"] == want["val/loss"]
    probe_dir, _ = probe_runs["builtin"]
    assert tp.main(["--evaluate", str(probe_dir), "--set", "data.limit=10"]) == 0
    assert "not the run's: data.limit 10 (the run's: None)" in capsys.readouterr().out.splitlines()[0]


def test_c8_e11_distill_evaluate_states_the_rows_it_scored_counted_on_the_val_split(distill_run, capsys):
    # data.val_windows is an upper bound: the line said "scoring 512 windows" of a val split holding 40 examples.
    # data.limit 20 leaves 20 val rows; the run's data.val_windows 8 scores 8 of them, 50 scores all 20.
    import train_distill as td
    run_dir, _ = distill_run
    for extra, words in (([], "scoring 8 of 20 rows of 16 tokens"), (["--set", "data.val_windows=50"],
                                                                      "scoring every one of 20 rows of 16 tokens")):
        assert td.main(["--evaluate", str(run_dir), *extra]) == 0
        assert words in capsys.readouterr().out


def test_e11_probe_evaluate_needs_no_training_file(probe_runs, capsys):
    """A run dir and its val windows on a laptop, the training windows left on the cluster: --evaluate refused
    with 'data.train_x: file ... not found', a file it never reads. It scores the val split, the run's numbers;
    a missing val file is still refused in one line."""
    run_dir, values = probe_runs["builtin"]
    assert tp.main(["--evaluate", str(run_dir), *sets(values)]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    train_x = probe_runs["tmp"] / "train_x.npy"
    os.rename(train_x, str(train_x) + ".away")
    try:
        for target in (run_dir, run_dir / "export"):
            assert tp.main(["--evaluate", str(target), *sets(values)]) == 0, capsys.readouterr().err
            got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            assert got["val/auroc"] == expected["val/auroc"] and got["val/loss"] == expected["val/loss"]
        assert tp.main(["--evaluate", str(run_dir), *sets(values), "--set", "data.val_x=/nonexistent/val_x.npy"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("config error: data.val_x: file /nonexistent/val_x.npy not found")
    finally:
        os.rename(str(train_x) + ".away", train_x)

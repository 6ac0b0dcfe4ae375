"""diagnose_and_fix.py --plot on the logs of REAL short runs of the training scripts.

Each run's plot must mark exactly the findings `--log` reports for the same log (row id, severity and the
finding's own step spans), plus the run's resumes, stops, early stops and skipped steps read from its
records; the PNG is a valid image of the documented size; without matplotlib the same panels print as
text. The runs: a clean one, a per-epoch stepped LR (a real log rewritten as a scheduler stepped once per
epoch would log it), one SIGKILLed and resumed, one with NaN batches (skipped steps), one that stops early,
and a distillation run (loss components).
"""
import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import diagnose_and_fix as dx  # noqa: E402
import train_probe as tp  # noqa: E402
from run_records import teacher_run  # noqa: E402

drawing = dx.plotting()  # --plot's code: diagnose_plot.py, the tool's companion file

# 16 optimizer steps per epoch, 4 epochs: 64 steps, an eval every 8
PROBE = ["data.synthetic.num_train=256", "data.synthetic.num_val=64", "data.synthetic.channels=4",
         "data.synthetic.length=128", "backbone.kwargs={width: 8, heads: 2}", "train.epochs=4",
         "train.batch_size=16", "train.log_every=1", "train.eval_every=8", "optim.lr=3e-3"]
PNG_SIZE = (int(drawing.PLOT_INCHES[0] * drawing.PLOT_DPI), int(drawing.PLOT_INCHES[1] * drawing.PLOT_DPI))
KILL_STEP, SAVED_STEP = 25, 20


def nan_data(directory):
    """40 train windows, window 7 with 3e38 (finite: a NaN is refused before the run, C9; the encoder's
    features of it are not): with the probe's 4 x 3 accumulation one step per epoch holds it."""
    rng = np.random.default_rng(0)
    paths = []
    for split, n in (("train", 40), ("val", 16)):
        x = rng.standard_normal((n, 4, 128)).astype(np.float32)
        if split == "train":
            x[7, 1, 5] = 3e38
        np.save(directory / f"{split}_x.npy", x)
        np.save(directory / f"{split}_y.npy", (np.arange(n) % 2).astype(np.int64))
        paths += [f"data.{split}_{k}={directory}/{split}_{k}.npy" for k in ("x", "y")]
    return paths


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("plot_runs")
    # SIGKILLed before step 25 (last.pt at step 20), then resumed: steps 21-24 are logged twice
    cmd = [sys.executable, os.path.join(ROOT, "train_probe.py"), "--run_dir", str(base / "resumed"), "--resume", "none"]
    killed = subprocess.Popen(cmd + [a for o in PROBE + ["train.save_every_steps=10"] for a in ("--set", o)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "KIT_FAULT_KILL_AT": f"{KILL_STEP}:0"})
    tp.train(tp.resolve_config(None, PROBE)[0], str(base / "clean"), "none", quiet=True)
    (base / "nan_data").mkdir()
    tiny = ["data.synthetic.num_train=38", "data.synthetic.num_val=24", "data.synthetic.channels=4",
            "data.synthetic.length=128", "backbone.kwargs={width: 8, heads: 2}", "train.batch_size=4",
            "train.grad_accum=3", "train.epochs=3", "train.log_every=1", "schedule.warmup=2", "optim.lr=0.01"]
    tp.train(tp.resolve_config(None, tiny[4:] + nan_data(base / "nan_data"))[0], str(base / "skipped"), "none",
             quiet=True)
    # lr 1e-15 moves no weight: every eval equals the first (E1) and patience 2 stops the run at step 3
    tp.train(tp.resolve_config(None, tiny + ["optim.lr=1e-15", "train.eval_every=1", "train.patience=2"])[0],
             str(base / "early"), "none", quiet=True)
    assert killed.wait(timeout=300) == -9, killed.communicate()[0]
    outcome, _ = tp.train(tp.resolve_config(None, PROBE + ["train.save_every_steps=10"])[0], str(base / "resumed"),
                          "auto", quiet=True)
    assert outcome == "finished"
    return base


@pytest.fixture(scope="module")
def epoch_stepped(runs):
    """The clean run's log with each step's LR replaced by the LR of its epoch's first step: the staircase a
    scheduler stepped once per epoch (instead of once per optimizer step) logs. Beside it the run's config."""
    directory = runs / "epoch_stepped"
    directory.mkdir()
    records = read_jsonl(runs / "clean" / "metrics.jsonl")
    first = {}
    for r in records:
        if "lr" in r:
            r["lr"] = first.setdefault(r["epoch"], r["lr"])
    with open(directory / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    (directory / "config.yaml").write_text((runs / "clean" / "config.yaml").read_text())
    return directory


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory):
    """A tiny teacher, then a student distilled from it with the hidden-state term weighted 1000x (E2)."""
    td = pytest.importorskip("train_distill")
    base = tmp_path_factory.mktemp("plot_distill")
    tiny = ["train.epochs=null", "train.max_steps=8", "train.batch_size=4", "train.log_every=1",
            "train.eval_every=4", "data.seq_len=32", "data.builtin.train_bytes=20000", "data.builtin.val_bytes=5000",
            "data.val_windows=8", "teacher.n_layer=1", "teacher.n_embd=32", "teacher.n_head=2", "student.n_layer=1",
            "student.n_embd=16", "student.n_head=2", "schedule.warmup=2"]
    td.train(td.resolve_config(None, teacher_run(tiny))[0], str(base / "teacher"), "none", quiet=True)
    student = tiny + ["kd.enabled=true", f"kd.teacher_checkpoint={base / 'teacher' / 'checkpoints' / 'last.pt'}",
                      "kd.alpha=0.01", "kd.beta=0.01", "kd.gamma=10"]
    td.train(td.resolve_config(None, student)[0], str(base / "student"), "none", quiet=True)
    return base


def log_report(log):
    """`--log` without --plot, its own invocation: (exit code, report)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = dx.main(["--log", str(log), "--json"])
    return code, json.loads(out.getvalue())


def log_findings(log):
    """What `--log` reports: [(id, severity, spans)] of the log findings that name steps."""
    _, report = log_report(log)
    return [(f["id"], f["severity"], [tuple(s) for s in f["at"]]) for f in report["findings"]
            if f["source"] == "log" and f["at"]]


def plot(monkeypatch, *argv):
    """--plot in-process; returns (exit code, stdout, stderr, the views drawn, what plot_runs returned)."""
    drawn = {}
    real = drawing.plot_runs

    def spy(views, path, out=None):
        drawn["views"] = views
        drawn["result"] = real(views, path, out)
        return drawn["result"]
    monkeypatch.setattr(drawing, "plot_runs", spy)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = dx.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue(), drawn.get("views"), drawn.get("result")


def png_size(path):
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def marked(view, kind=None):
    return [m for m in view["markers"] if kind is None or m["kind"] == kind]


def finding_marks(view):
    return [(m["label"], m["severity"], m["spans"]) for m in marked(view, "finding")]


def series(view, panel, label):
    hits = [s for s in view["series"][panel] if s[0] == label]
    assert hits, f"no {label} on the {panel} panel: {[s[0] for s in view['series'][panel]]}"
    return hits[0][1], hits[0][2]


def plot_one(monkeypatch, log, tmp_path):
    png = tmp_path / "run.png"
    code, out, _, views, _ = plot(monkeypatch, "--log", log, "--plot", png)
    assert png_size(png) == PNG_SIZE
    assert f"plot: wrote {png}" in out
    return code, views[0]


def test_e5_clean_run_plot_marks_exactly_the_log_findings_and_is_a_png_of_the_documented_size(runs, monkeypatch,
                                                                                                 tmp_path):
    log = runs / "clean" / "metrics.jsonl"
    code, view = plot_one(monkeypatch, log, tmp_path)
    assert finding_marks(view) == log_findings(log)
    assert {m["label"] for m in view["markers"]} <= {"E7"}  # a clean run: at most a throughput dip of a busy host
    steps, losses = series(view, "loss", "train loss")
    assert steps == list(range(1, 65)) and len(series(view, "loss", "val/loss")[0]) == 8
    assert {s[0] for s in view["series"]["val"]} == {"val/auroc", "val/bacc"}
    assert series(view, "grad_norm", "clip 1")[1] == [1.0, 1.0]  # train.clip_grad_norm of the run's config


def test_s1_epoch_stepped_lr_is_marked_over_each_epoch_and_parts_from_the_configured_curve(epoch_stepped,
                                                                                          monkeypatch, tmp_path):
    log = epoch_stepped / "metrics.jsonl"
    _, view = plot_one(monkeypatch, log, tmp_path)
    assert finding_marks(view) == log_findings(log)
    s1 = [m for m in marked(view, "finding") if m["label"] == "S1"]
    assert len(s1) == 1 and s1[0]["severity"] == "critical" and s1[0]["panel"] == "lr"
    assert s1[0]["spans"] == [(1, 16), (17, 32), (33, 48), (49, 64)]  # the four epochs of 16 steps
    # the configured curve is the training script's own lr_curve for the run's saved config.yaml
    cfg, _ = tp.resolve_config(str(epoch_stepped / "config.yaml"))
    want = tp.lr_curve(cfg, tp.plan_schedule(cfg, tp.train_set_size(cfg)))
    steps, curve = series(view, "lr", "configured LR")
    assert steps == list(range(1, 65)) and curve == want.tolist()
    logged = dict(zip(*series(view, "lr", "logged LR")))
    assert logged[16] == logged[1] != want[15]  # the two lines part


def test_r1_resumed_run_is_marked_at_its_checkpoint_step_and_relogged_steps_plot_once(runs, monkeypatch, tmp_path):
    log = runs / "resumed" / "metrics.jsonl"
    records = read_jsonl(log)
    assert [r["step"] for r in records if r.get("event") == "resume"] == [SAVED_STEP]
    assert sum(r.get("step") == KILL_STEP - 1 and "lr" in r for r in records) == 2  # logged before the kill and after
    _, view = plot_one(monkeypatch, log, tmp_path)
    assert finding_marks(view) == log_findings(log)
    assert [m["spans"] for m in marked(view, "resume")] == [[(SAVED_STEP, SAVED_STEP)]]
    assert not marked(view, "stopped")  # a SIGKILL writes no event; the resume shows where it continued
    assert series(view, "loss", "train loss")[0] == list(range(1, 65))


def test_g4_skipped_steps_are_marked_where_the_records_are_non_finite(runs, monkeypatch, tmp_path):
    log = runs / "skipped" / "metrics.jsonl"
    bad = [r["step"] for r in read_jsonl(log) if "nonfinite" in r]
    assert len(bad) == 3
    _, view = plot_one(monkeypatch, log, tmp_path)
    assert finding_marks(view) == log_findings(log)
    assert [m["spans"] for m in marked(view, "skipped")] == [[(s, s) for s in bad]]
    g4 = [m for m in marked(view, "finding") if m["label"] == "G4"]
    assert len(g4) == 1 and g4[0]["spans"] == [(s, s) for s in bad] and g4[0]["panel"] == "grad_norm"


def test_e1_early_stop_is_marked_at_its_step_with_the_identical_evals(runs, monkeypatch, tmp_path):
    log = runs / "early" / "metrics.jsonl"
    stop = [r["step"] for r in read_jsonl(log) if r.get("event") == "early_stopped"]
    assert stop == [3]
    _, view = plot_one(monkeypatch, log, tmp_path)
    assert finding_marks(view) == log_findings(log)
    assert [m["spans"] for m in marked(view, "early_stopped")] == [[(3, 3)]]
    assert [(m["label"], m["spans"]) for m in marked(view, "finding") if m["label"] == "E1"] == [("E1", [(1, 3)])]


def test_e2_distillation_loss_components_are_drawn_and_the_dominating_term_marked(distill_run, monkeypatch, tmp_path):
    log = distill_run / "student" / "metrics.jsonl"
    _, view = plot_one(monkeypatch, log, tmp_path)
    assert finding_marks(view) == log_findings(log)
    components = sorted({k for r in read_jsonl(log) for k in r if k.startswith("loss/")})
    assert len(components) == 3
    assert [s[0] for s in view["series"]["loss"] if s[3] == "component"] == components
    assert "E2" in [m["label"] for m in marked(view, "finding")]
    assert series(view, "throughput", "tokens_per_s")[0] == list(range(1, 9))
    assert {s[0] for s in view["series"]["val"]} == {"val/agreement"}  # val/ppl = exp(val/loss) is left out


def test_several_runs_overlay_with_a_legend_by_run_name(runs, distill_run, monkeypatch, tmp_path):
    logs = [runs / "clean" / "metrics.jsonl", runs / "resumed" / "metrics.jsonl",
            distill_run / "teacher" / "metrics.jsonl"]
    png = tmp_path / "runs.png"
    code, out, _, views, (kind, legend) = plot(monkeypatch, *[a for log in logs for a in ("--log", log)], "--plot", png)
    assert png_size(png) == PNG_SIZE
    assert [v["name"] for v in views] == ["clean", "resumed", "teacher"]
    assert legend == [f"{v['name']} ({v['log']})" for v in views]
    assert out.count("diagnose_and_fix.py: config") == 3  # each run's findings, from its own config.yaml
    for view, log in zip(views, logs):
        assert finding_marks(view) == log_findings(log)


def test_without_matplotlib_the_same_panels_print_as_text_with_the_marks(runs, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    png = tmp_path / "run.png"
    log = runs / "skipped" / "metrics.jsonl"
    code, out, err, views, (kind, legend) = plot(monkeypatch, "--log", log, "--plot", png)
    assert kind == "ascii" and legend == ["* skipped (" + str(log) + ")"] and not png.exists()
    assert err.strip().splitlines() == [f"plot: {png} not written: matplotlib is not installed for {sys.executable} "
                                        f"({sys.executable} -m pip install matplotlib); the ASCII panels show the same"]
    for panel in drawing.PLOT_PANELS:
        assert f"\n{panel}: " in out
    grad_panel = out.split("\ngrad_norm: ")[1].split("\nthroughput: ")[0]
    marks = [line for line in grad_panel.splitlines() if line.strip().startswith("marks")]
    assert len(marks) == 1 and "G4" in marks[0] and "x" in marks[0]
    assert code == log_report(log)[0]  # the exit code stays the diagnosis's


def test_plot_dash_prints_the_ascii_panels_even_with_matplotlib(runs, monkeypatch, tmp_path):
    code, out, err, views, (kind, _) = plot(monkeypatch, "--log", runs / "resumed" / "metrics.jsonl", "--plot", "-")
    assert kind == "ascii" and err == "" and not list(tmp_path.iterdir())
    loss_marks = out.split("\nloss: ")[1].split("\nval: ")[0]
    assert any(line.strip().startswith("marks") and "R" in line for line in loss_marks.splitlines())


@pytest.mark.parametrize("case", ["missing log", "garbage log", "no steps", "unwritable out", "out is a dir",
                                  "bad extension"])
def test_c3_bad_plot_input_is_one_line_exit_2_and_nothing_written(runs, monkeypatch, tmp_path, case):
    log, out = runs / "clean" / "metrics.jsonl", tmp_path / "run.png"
    if case == "missing log":
        log = tmp_path / "nope" / "metrics.jsonl"
    elif case == "garbage log":
        log = tmp_path / "metrics.jsonl"
        log.write_text("{not json\n\x00\x01 binary\n")
    elif case == "no steps":
        log = tmp_path / "metrics.jsonl"
        log.write_text('{"event": "finished"}\n{"loss": 1.0}\n')
    elif case == "unwritable out":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "run.png"  # a parent that is a file: no permission bits involved (root)
    elif case == "out is a dir":
        out = tmp_path
    else:
        out = tmp_path / "run.jpeg2"
    before = sorted(os.listdir(tmp_path))
    code, stdout, stderr, views, _ = plot(monkeypatch, "--log", log, "--plot", out)
    assert code == 2 and stdout == "" and views is None
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("diagnose_and_fix.py: --")
    assert sorted(os.listdir(tmp_path)) == before


def test_c3_plot_without_its_companion_file_is_one_line_exit_2(tmp_path):
    """diagnose_and_fix.py copied without diagnose_plot.py (--plot's code): the same one line as the training
    scripts give for a missing companion, exit 2, nothing written; without --plot it runs as before."""
    shutil.copy(os.path.join(ROOT, "diagnose_and_fix.py"), tmp_path)
    (tmp_path / "train.log").write_text("step=1 lr=0.1 loss=2.0\nstep=2 lr=0.1 loss=1.9\n")

    def tool(*args):
        return subprocess.run([sys.executable, "diagnose_and_fix.py", "--log", "train.log", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    out = tool("--plot", "run.png")
    assert out.returncode == 2 and out.stdout == "" and out.stderr.strip().splitlines() == [
        "diagnose_and_fix.py: --plot needs diagnose_plot.py beside diagnose_and_fix.py (copy it from the kit), or "
        "leave --plot unset"], out.stderr
    assert sorted(os.listdir(tmp_path)) == ["diagnose_and_fix.py", "train.log"]
    assert tool().returncode == 0
    assert "diagnose_plot.py" in tool("--help").stdout  # the file --plot needs, named where the option is


def test_loss_panel_top_is_clipped_only_when_the_first_steps_dwarf_the_rest():
    """A start-up loss of 7 over a later 2 would leave later differences a few pixels: the top is 1.15 x 2."""
    def view(first):
        train = {s: {"step": s, "loss": first if s <= 5 else 2.0 - s / 1000} for s in range(1, 101)}
        return {"series": drawing.panel_series(train, {}, {}, None)}
    assert drawing.loss_top([view(7.0)]) == pytest.approx(1.15 * 1.99)
    assert drawing.loss_top([view(3.0)]) is None
    text = drawing.ascii_panels([{**view(7.0), "name": "a", "log": "a", "markers": [], "findings": [],
                                  "curve_note": None}])
    assert "[clipped at 2.29: the first steps are higher]" in text


@pytest.mark.parametrize("curve", ["clipped start-up", "unclipped"])
def test_loss_panel_never_goes_under_zero_for_a_positive_loss_and_every_title_fits(curve):
    """A positive loss ending near 0 after a start-up of 6 (the top clipped) or a steady fall from 0.5: the axis
    starts at >= 0 (matplotlib's margin put it at -0.27 and -0.01) just under the lowest value, and every
    title, the loss panel's with its clipping note too, lies inside the figure and clear of the run legend."""
    pytest.importorskip("matplotlib")
    if curve == "clipped start-up":
        loss = lambda s: 6.0 if s <= 5 else 0.02 + 0.3 / s  # noqa: E731
    else:
        loss = lambda s: 0.5 - 0.0049 * s  # noqa: E731
    train = {s: {"step": s, "loss": loss(s)} for s in range(1, 101)}
    view = {"series": drawing.panel_series(train, {}, {}, None), "name": "a", "log": "a", "markers": [], "findings": [],
            "curve_note": None}
    fig, axes, legend = drawing.build_figure([view])
    try:
        bottom, top = axes["loss"].get_ylim()
        lowest = min(loss(s) for s in train)
        assert 0 <= bottom < lowest and top > max(loss(s) for s in range(11, 101))
        assert ("y clipped at" in axes["loss"].get_title(loc="left")) == (curve == "clipped start-up")
        renderer = fig.canvas.get_renderer()
        for panel, ax in axes.items():
            box = ax._left_title.get_window_extent(renderer)  # the title, set with loc="left"
            assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1, panel
            assert not box.overlaps(legend.get_window_extent(renderer)), panel
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


# ----------------------------------------------------------------------------- pictures that read right (issue 22)
def views_of(monkeypatch, tmp_path, *logs):
    code, _, _, views, _ = plot(monkeypatch, *[a for log in logs for a in ("--log", log)], "--plot", "-")  # no PNG: faster
    return views


def copy_run(src, dst):
    dst.mkdir()
    for name in ("metrics.jsonl", "config.yaml"):
        (dst / name).write_text((src / name).read_text())
    return dst / "metrics.jsonl"


def test_e2_labels_of_two_runs_are_apart_and_its_band_leaves_the_loss_lines_visible(distill_run, monkeypatch,
                                                                                    tmp_path):
    other = copy_run(distill_run / "student", tmp_path / "student_b")
    views = views_of(monkeypatch, tmp_path, distill_run / "student" / "metrics.jsonl", other)
    fig, axes, _ = drawing.build_figure(views)
    try:
        labels = [t for t in axes["loss"].texts if (t.get_gid() or "").startswith("finding E2")]
        assert len(labels) == 2 and len({t.get_position() for t in labels}) == 2  # one per run, not on one spot
        panel = axes["loss"].get_window_extent()
        bands = [p.get_window_extent() for p in axes["loss"].patches]
        assert bands and all(b.height <= 0.1 * panel.height for b in bands)  # a band at the foot, not a veil
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


def test_e7_label_of_a_probe_is_not_under_the_throughput_legend(runs, monkeypatch, tmp_path):
    log = copy_run(runs / "clean", tmp_path / "slow_end")
    recs = read_jsonl(log)
    for r in recs:  # a real slowdown over the last 12 steps: E7 is marked at the right end, under the legend's corner
        if "samples_per_s" in r:
            r["samples_per_s"] = 50.0 if r["step"] > 52 else 1000.0
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    [view] = views_of(monkeypatch, tmp_path, log)
    fig, axes, _ = drawing.build_figure([view])
    try:
        [label] = [t for t in axes["throughput"].texts if (t.get_gid() or "").startswith("finding E7")]
        renderer = fig.canvas.get_renderer()
        assert not axes["throughput"].get_legend().get_window_extent(renderer).overlaps(label.get_window_extent(renderer))
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


def test_kd_train_ce_is_drawn_beside_val_ce_the_weighted_sum_labelled_and_logged_lr_drawn_as_points(
        distill_run, monkeypatch, tmp_path):
    log = distill_run / "student" / "metrics.jsonl"
    [view] = views_of(monkeypatch, tmp_path, log)
    recs = [r for r in read_jsonl(log) if "loss/ce" in r]
    steps, ce = series(view, "loss", "train CE (loss/ce / kd.alpha)")
    assert steps == [r["step"] for r in recs] and ce == pytest.approx([r["loss/ce"] / 0.01 for r in recs])  # kd.alpha 0.01
    assert series(view, "loss", "train loss (weighted sum)")[1] == [r["loss"] for r in recs]
    assert "train loss" not in [s[0] for s in view["series"]["loss"]]
    fig, axes, _ = drawing.build_figure([view])
    try:
        [logged] = [line for line in axes["lr"].lines if line.get_marker() == "."]
        assert logged.get_linestyle() == "None"  # the logged LR: points at the logged steps, nothing in between
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


def test_loss_panel_top_keeps_every_run_visible_when_runs_differ_in_length():
    """A run killed at step 100 beside one of 1000 steps (or its configured LR curve of 1800): the 10% of start-up
    steps is each run's own, so the short run's loss, still high, stays under the top instead of vanishing above
    it (the top was 1.15 x the long run's last loss, clipping all of the short one)."""
    def view(last, loss, configured=None):
        train = {s: {"step": s, "loss": loss(s), "lr": 1e-3} for s in range(1, last + 1)}
        return {"series": drawing.panel_series(train, {}, {}, configured)}
    long_run = view(1000, lambda s: 5.0 if s <= 20 else 0.05)
    short_run = view(100, lambda s: 5.0 if s <= 5 else 0.6, configured=np.full(1800, 1e-3))
    top = drawing.loss_top([long_run, short_run])
    assert top == pytest.approx(1.15 * 0.6)
    assert drawing.loss_top([short_run]) == pytest.approx(1.15 * 0.6)

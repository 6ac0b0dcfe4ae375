"""Seeing a run where users look: progress lines with an ETA (E7), metric sinks (E10), --evaluate (E11).

One probe run with all three sinks on, killed mid-epoch and resumed, is shared by the sink tests: each
reads its backend's files with that library's own reader and compares them with metrics.jsonl. The same
run's best.pt and export are scored again with --evaluate.
"""
import glob
import importlib.util
import io
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_distill as td  # noqa: E402
import train_probe as tp  # noqa: E402
from run_records import records  # noqa: E402

TINY = ["data.synthetic.num_train=38", "data.synthetic.num_val=24", "data.synthetic.channels=4",
        "data.synthetic.length=128", "backbone.kwargs={width: 8, heads: 2}", "train.batch_size=4",
        "train.grad_accum=3", "train.epochs=3", "train.eval_batch_size=16", "schedule.warmup=2", "optim.lr=0.01"]
STEP_LINE = re.compile(r" step (\d+)/12 epoch .* elapsed \d+:\d\d:\d\d [0-9.e+-]+ steps/s ETA (\d+:\d\d:\d\d|\?)$")
PROGRESS_LINE = re.compile(r" progress: step (\d+)/12 \(\d+%\) elapsed \d+:\d\d:\d\d [0-9.e+-]+ steps/s ETA (\d+:\d\d:\d\d|\?)$")


def sinks_of(script):
    """metric_sinks.py as the script loads it beside itself (the sinks' code is that companion's)."""
    return script.companion("metric_sinks", "log.tensorboard")


def npy_split(directory, split, n):
    rng = np.random.default_rng(len(split))
    np.save(directory / f"{split}_x.npy", rng.standard_normal((n, 4, 128)).astype(np.float32))
    np.save(directory / f"{split}_y.npy", (np.arange(n) % 2).astype(np.int64))
    return [f"data.{split}_x={directory}/{split}_x.npy", f"data.{split}_y={directory}/{split}_y.npy"]


@pytest.fixture(scope="module")
def sink_run(tmp_path_factory):
    """12 optimizer steps (3 epochs of 4), every step logged, last.pt every 4 steps; SIGKILLed before step 7
    (steps 5 and 6 already sent to every sink), then resumed to the end. Runs as a subprocess, so stdout is
    no terminal (progress lines, every step with train.progress_every_s 0)."""
    tmp = tmp_path_factory.mktemp("sinks")
    data = npy_split(tmp, "train", 38) + npy_split(tmp, "val", 24) + npy_split(tmp, "test", 20)
    settings = TINY + data + ["train.log_every=1", "train.save_every_steps=4", "train.progress_every_s=0",
                              "log.tensorboard=true", "log.wandb=kit-tests", f"log.mlflow=sqlite:///{tmp}/mlflow.db"]
    run_dir, wandb_dir = tmp / "run", tmp / "wandb"
    os.makedirs(wandb_dir)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, os.path.join(ROOT, "train_probe.py"), "--run_dir", str(run_dir)]
    command += [a for s in settings for a in ("--set", s)]

    def run(extra_env):
        return subprocess.run(command, cwd=tmp, capture_output=True, text=True, env={**env, **extra_env}, timeout=400)

    died = run({"KIT_FAULT_KILL_AT": "7:0"})
    assert died.returncode == -signal.SIGKILL, died.stdout + died.stderr
    resumed = run({})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "WARNING" not in resumed.stdout and not resumed.stderr.strip(), resumed.stderr  # a healthy run is quiet
    return {"tmp": tmp, "run_dir": str(run_dir), "wandb_dir": str(wandb_dir), "mlflow": f"sqlite:///{tmp}/mlflow.db",
            "settings": settings, "died": died, "resumed": resumed}


def expected(run_dir):
    """{(step, key): value} of metrics.jsonl, finite numbers only, the last record of a step winning, and
    the steps the killed process logged past its checkpoint (sent to the sinks before the kill)."""
    want, seen, repeated = {}, set(), set()
    for r in records(run_dir):
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                if (r["step"], k) in seen:
                    repeated.add((r["step"], k))
                seen.add((r["step"], k))
                want[(r["step"], k)] = float(v)
    return want, repeated


def assert_matches_jsonl(got, run_dir, exact_timing, name=str):
    """got: [(step, key, value)] as a sink holds them. Each (step, key) once, the same set as metrics.jsonl,
    the same values (throughput of the steps run twice differs between the two processes: W&B and MLflow
    keep the first, TensorBoard the resumed one). name: the sink's name of a metrics.jsonl key."""
    want, repeated = expected(run_dir)
    want = {(s, name(k)): v for (s, k), v in want.items()}
    repeated = {(s, name(k)) for s, k in repeated}
    pairs = [(s, k) for s, k, _ in got]
    assert len(pairs) == len(set(pairs)), sorted(p for p in pairs if pairs.count(p) > 1)
    assert set(pairs) == set(want)
    assert {5, 6} <= {s for s, _ in repeated}, "the kill must come after steps 5 and 6 reached the sinks"
    for step, key, value in got:
        if key.endswith("_per_s") and (step, key) in repeated and not exact_timing:
            continue
        assert value == pytest.approx(want[(step, key)], rel=1e-6, abs=1e-12), (step, key)


def test_e7_without_a_terminal_every_log_line_has_an_eta_and_progress_lines_come_at_the_set_interval(sink_run):
    # progress_every_s 0: a progress line after every step; every step line carries elapsed, steps/s, ETA.
    lines = sink_run["resumed"].stdout.splitlines()
    steps = [int(m.group(1)) for m in map(STEP_LINE.search, lines) if m]
    progress = [int(m.group(1)) for m in map(PROGRESS_LINE.search, lines) if m]
    assert steps == list(range(5, 13)), lines
    assert progress == list(range(5, 13)), lines
    assert tp.CONFIG["train.progress_every_s"][0] == 60.0


def test_e10_tensorboard_holds_every_jsonl_record_once_across_a_sigkill_and_resume(sink_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    acc = EventAccumulator(os.path.join(sink_run["run_dir"], "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    got = [(e.step, tag, e.value) for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)]
    assert_matches_jsonl(got, sink_run["run_dir"], exact_timing=True)  # purge_step: the resumed values count
    # The marker every TensorBoard reader honours, not only this accumulator's out-of-order guess: the resumed
    # writer opens with SessionLog START at the step after the checkpoint (4), dropping the killed run's 5 and 6.
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    starts = [e.step for path in sorted(glob.glob(os.path.join(sink_run["run_dir"], "tb", "events.*")))
              for e in EventFileLoader(path).Load() if e.HasField("session_log") and e.session_log.status == 1]
    assert sorted(starts) == [1, 5]
    hparams = {}
    for content in acc.PluginTagToContent("hparams").values():
        info = plugin_data_pb2.HParamsPluginData.FromString(content)
        if info.HasField("session_start_info"):
            hparams = info.session_start_info.hparams
    assert hparams["optim.lr"].number_value == 0.01 and hparams["train.save_every_steps"].number_value == 4


def wandb_records(path):
    """The records of a W&B .wandb file, parsed with W&B's own protobuf classes (wandb 0.31 ships no Python
    scanner: the file is LevelDB-log framed, 7-byte header, 32 KiB blocks of crc/length/type chunks)."""
    from wandb.proto import wandb_internal_pb2
    with open(path, "rb") as f:
        data = f.read()
    assert struct.unpack("<4sHB", data[:7])[:2] == (b":W&B", 0xBEE1)
    pos, chunks = 7, []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += left
            continue
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def test_e10_wandb_offline_resumes_the_same_run_id_and_holds_every_jsonl_record_from_the_checkpoint_on(sink_run):
    with open(os.path.join(sink_run["run_dir"], "sinks.json")) as f:
        run_id = json.load(f)["log.wandb"]["id"]
    files = sorted(glob.glob(os.path.join(sink_run["wandb_dir"], "wandb", "offline-run-*", "run-*.wandb")))
    assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb") for f in files)  # the kill, the resume
    rows, config = {}, {}
    for path in files:
        rows[path] = []
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                rows[path] += [(row["step"], k, v) for k, v in row.items() if not k.startswith("_") and k != "step"]
            elif kind == "run":
                assert record.run.run_id == run_id
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    # The resumed process sent every record from the checkpoint (step 4) on, and the final test record; what
    # the killed one had handed to W&B is what W&B kept of it (its offline mode keeps nothing unflushed).
    want, repeated = expected(sink_run["run_dir"])
    resumed = rows[files[1]]
    assert sorted((s, k) for s, k, _ in resumed) == sorted(p for p in want if p[0] > 4 or p[1].startswith("test/"))
    for step, key, value in resumed + rows[files[0]]:
        if not (key.endswith("_per_s") and (step, key) in repeated):
            assert value == pytest.approx(want[(step, key)], rel=1e-12), (step, key)
    assert config["optim"]["lr"] == 0.01 and config["log"]["wandb"] == "kit-tests"


def mlflow_metrics(uri):
    """(the one MLflow run in the store at uri, [(step, name, value)] of its metrics), read by MLflow's client."""
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    got = [(m.step, key, m.value) for key in runs[0].data.metrics for m in client.get_metric_history(runs[0].info.run_id, key)]
    return runs[0], got


def test_e10_mlflow_sqlite_store_resumes_the_same_run_and_holds_every_jsonl_record_once(sink_run):
    """The README's store (sqlite:///, no server, the mlflow pip installs today): one run across the kill."""
    run, got = mlflow_metrics(sink_run["mlflow"])
    assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == "0.01"
    assert_matches_jsonl(got, sink_run["run_dir"], exact_timing=False, name=sinks_of(tp).mlflow_name)


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_e10_mlflow_on_a_distillation_run_holds_the_loss_and_its_parts_in_every_store(store, tmp_path, monkeypatch):
    """Issue 31: a KD run logs loss beside loss/ce and loss/kd; MLflow's file store keeps each metric as a file, so
    loss/ce failed at step 1 (Not a directory) and the run ended KILLED. In MLflow every name has '.' for '/',
    in every store: the run ends FINISHED with every record of metrics.jsonl, and no WARNING."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db" if store == "sqlite" else f"file:{tmp_path}/mlruns"
    settings = [s for s in td.DRY_RUN_SETTINGS if not s.startswith(("log.mlflow", "train.epochs", "train.max_steps"))]
    settings += ["kd.enabled=true", "teacher.target=zoo:tiny_causal_lm", "kd.gamma=0", "train.epochs=null",
                 "train.max_steps=3", "train.eval_every=3", f"log.mlflow={uri}"]
    assert td.main(["--run_dir", str(tmp_path / "run"), "--set", *settings]) == 0  # main closes the sinks
    assert "WARNING" not in (tmp_path / "run" / "train.log").read_text()
    run, got = mlflow_metrics(uri)
    assert run.info.status == "FINISHED"
    assert {"loss", "loss.ce", "loss.kd", "val.loss", "val.agreement"} <= {name for _, name, _ in got}
    want, _ = expected(str(tmp_path / "run"))
    assert sorted((s, k, v) for s, k, v in got) == sorted((s, sinks_of(td).mlflow_name(k), v) for (s, k), v in want.items())


def test_e10_a_database_store_without_sqlalchemy_is_a_config_error_naming_the_install(tmp_path, monkeypatch, capsys):
    """mlflow-skinny has no sqlite store without sqlalchemy and alembic (a registry error at start-up): the run,
    and its dry run, refuse it first in one line that names the install."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else real(name, *a))
    for argv in (["--run_dir", str(tmp_path / "run")], ["--dry_run"]):
        assert tp.main([*argv, "--set", *TINY, f"log.mlflow=sqlite:///{tmp_path}/mlflow.db"]) == 2
        err = capsys.readouterr().err
        assert "log.mlflow" in err and "needs sqlalchemy beside mlflow" in err and "pip install mlflow" in err, err
    assert not (tmp_path / "run").exists()


def test_e10_a_missing_sink_package_is_a_config_error_naming_it_and_the_interpreter(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    run_dir = tmp_path / "run"
    assert tp.main(["--run_dir", str(run_dir), "--set", *TINY, "log.wandb=proj"]) == 2
    err = capsys.readouterr().err
    assert "log.wandb" in err and "wandb package" in err and sys.executable in err and "Traceback" not in err
    assert not run_dir.exists()  # before anything is written
    assert tp.main(["--dry_run", "--set", "log.wandb=proj"]) == 2  # the dry run refuses it too
    assert "log.wandb" in capsys.readouterr().err


def test_e10_sinks_open_on_process_0_only(tmp_path):
    cfg, _ = tp.resolve_config(None, TINY + ["log.tensorboard=true"])
    run = {"cfg": cfg, "dist": {"main": False}, "run_dir": str(tmp_path), "state": {"global_step": 0}}
    tp.open_sinks(run)
    assert run["sinks"] == [] and os.listdir(tmp_path) == []


def test_e10_a_failing_backend_warns_once_and_is_off_while_the_others_go_on(tmp_path):
    log_file, received = io.StringIO(), []

    def broken(step, values):
        raise ConnectionError("server gone")

    run = {"dist": {"main": True}, "bar": None, "quiet": True, "log_file": log_file, "state": {"global_step": 3},
           "sinks": [{"key": "log.mlflow", "send": broken, "close": lambda ok: None},
                     {"key": "log.tensorboard", "send": lambda step, values: received.append((step, values)),
                      "close": lambda ok: None}]}
    for step in (3, 4):
        sinks_of(tp).send_to_sinks(run, {"step": step, "loss": 0.5, "nonfinite": ["x"], "x": None})
    assert [s["key"] for s in run["sinks"]] == ["log.tensorboard"]
    assert received == [(3, {"loss": 0.5}), (4, {"loss": 0.5})]
    warnings = [line for line in log_file.getvalue().splitlines() if "WARNING E10" in line]
    assert len(warnings) == 1 and "log.mlflow failed at step 3" in warnings[0] and "server gone" in warnings[0]


def test_e10_a_sink_that_cannot_start_warns_and_the_run_goes_on(tmp_path):
    cfg, _ = tp.resolve_config(None, TINY + ["log.tensorboard=true"])
    (tmp_path / "tb").write_text("a file where the event directory would go")
    log_path = tmp_path / "train.log"
    run = {"cfg": cfg, "dist": {"main": True}, "run_dir": str(tmp_path), "state": {"global_step": 0},
           "bar": None, "quiet": True, "log_file": open(log_path, "w")}
    tp.open_sinks(run)
    run["log_file"].close()
    assert run["sinks"] == []
    assert "WARNING E10: log.tensorboard could not start" in log_path.read_text()


def evaluated(main, argv, capsys):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the last line is the JSON one


def test_e11_probe_evaluate_of_the_run_dir_and_of_its_export_gives_the_runs_own_final_numbers(sink_run, capsys):
    run_dir, settings = sink_run["run_dir"], sink_run["settings"]
    recs = records(run_dir)
    best_step = [r for r in recs if "test/auroc" in r][-1]["step"]  # the test record is written at best.pt's step
    want = {k: v for r in recs if r.get("step") == best_step and ("val/loss" in r or "test/loss" in r)
            for k, v in r.items() if k != "step"}
    assert set(want) == {f"{s}/{m}" for s in ("val", "test") for m in ("auroc", "bacc", "loss")}
    argv = [a for x in settings for a in ("--set", x)]
    for path in (run_dir, os.path.join(run_dir, "export")):
        got = evaluated(tp.main, ["--evaluate", path, *argv], capsys)
        assert {k: got[k] for k in want} == want, path  # the same evaluate(), the same weights: the same bits
    # The README's one line: the export loads as a module, windows -> logits, without the training code.
    model = tp.load_export(os.path.join(run_dir, "export"))
    x = np.load(sink_run["tmp"] / "val_x.npy")[:5]
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    assert logits.shape == (5, 2) and torch.isfinite(logits).all()


DISTILL = ["data.seq_len=16", "data.limit=20", "data.val_windows=8", "data.builtin.train_bytes=40000",
           "data.builtin.val_bytes=8000", "train.epochs=1", "train.batch_size=4", "train.grad_accum=1",
           "train.eval_every=3", "train.save_every_minutes=null", "train.eval_batch_size=4", "schedule.warmup=2",
           "student.n_layer=1", "student.n_head=2", "student.n_embd=16", "kd.enabled=true",
           "teacher.target=zoo:tiny_causal_lm", "train.max_loss_share=1"]


def test_e11_distill_evaluate_of_the_run_dir_and_of_its_export_gives_the_runs_own_val_numbers(tmp_path, capsys):
    cfg, _ = td.resolve_config(None, DISTILL)
    run_dir = str(tmp_path / "run")
    outcome, _ = td.train(cfg, run_dir, "none", quiet=True)
    assert outcome == "finished"
    _, evals, _ = td.read_metrics(run_dir)
    best_step = torch.load(os.path.join(run_dir, "checkpoints", "best.pt"), weights_only=True)["global_step"]
    want = {k: v for k, v in evals[best_step].items() if k != "step"}
    assert set(want) == {"val/loss", "val/ppl", "val/agreement"}
    argv = [a for x in DISTILL for a in ("--set", x)]
    for path in (run_dir, os.path.join(run_dir, "export")):
        got = evaluated(td.main, ["--evaluate", path, *argv], capsys)
        assert {k: got[k] for k in want} == want, path


def test_e11_evaluate_refuses_a_path_that_is_nothing_it_can_score(tmp_path, capsys):
    assert tp.main(["--evaluate", str(tmp_path / "missing"), "--set", *TINY]) == 2
    assert "--evaluate" in capsys.readouterr().err
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert tp.main(["--evaluate", str(tmp_path / "run"), "--set", *TINY]) == 2
    assert "without checkpoints/best.pt" in capsys.readouterr().err


def test_g7_e10_sinks_add_no_host_read_to_the_step(tmp_path):
    # The sinks get the host numbers write_metrics already has: with TensorBoard on and a record every step,
    # fit() still reads the device once per optimizer step (bench.py counts every Tensor read, by caller).
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench
    small = ["data.synthetic.num_train=40", "data.synthetic.num_val=16", "data.synthetic.length=256", "train.batch_size=8",
             "schedule.warmup=2", "train.eval_batch_size=16", "train.epochs=2", "train.log_every=1", "log.tensorboard=true"]
    run, task, _ = bench.capture_run(bench.LOOP_SETTINGS + small, str(tmp_path / "run"))
    try:
        assert [sink["key"] for sink in run["sinks"]] == ["log.tensorboard"]
        syncs = bench.bench_syncs(run, task)
    finally:
        tp.close_sinks(run)
        bench.close_run(run)
    assert syncs["steps"] == 6 and syncs["per_step"] == 1, syncs["sites"]
    assert syncs["sites"] == ["train_probe.py:optimizer_step .tolist()"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run["run_dir"], "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 7))  # the sink did receive every step

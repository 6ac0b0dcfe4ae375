"""DDP under torchrun (CPU, gloo), launched the way users launch it: ./launch.sh CONFIG --gpus cpu:2.

The reference is one uninterrupted two-process run (module fixture). Against it: one process with twice
the batch ends equal within fp tolerance (G2), and a two-process run SIGKILLed mid-epoch and relaunched
with the same command ends bit-identical (R4/R5).
"""
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from test_launch import ROOT, launch, launch_env, two_nodes, write_config

sys.path.insert(0, ROOT)
import train_probe as tp  # noqa: E402
from run_records import last_per_step, loud_findings, records, teacher_run  # noqa: E402


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # launch.sh's own choice on 2 cores; pinned so a bigger machine compares alike


@contextlib.contextmanager
def one_thread():
    """The in-process reference runs with one intra-op thread, as each launch.sh --gpus cpu:2 worker does
    (OMP_NUM_THREADS=1): the same reduction orders on both sides, so the comparisons measure the batch
    split (G2, E3) and not the thread count, and they come out the same on every run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def ckpt(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoints", "last.pt"), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp")
    return path, write_config(path)


@pytest.fixture(scope="module")
def two_process_run(workdir):
    """2 processes x batch 3, grad_accum 2, 27 windows: 9 optimizer steps, uninterrupted."""
    path, cfg = workdir
    run_dir = str(path / "two")
    out = launch(cfg, "--gpus", "cpu:2", "--", "--run_dir", run_dir, cwd=path, env=ONE_THREAD)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "= 2 process(es)" in out.stdout and "torchrun --standalone --nproc_per_node=2" in out.stdout
    return run_dir


@pytest.fixture(scope="module")
def killed_two_process_run(workdir):
    """The same run SIGKILLed (both processes) before micro-batch 1 of step 5, mid-epoch 2; last save: step 4."""
    path, cfg = workdir
    run_dir = str(path / "killed")
    out = launch(cfg, "--gpus", "cpu:2", "--", "--run_dir", run_dir, cwd=path, env={"KIT_FAULT_KILL_AT": "5:1", **ONE_THREAD})
    assert out.returncode == 128 + signal.SIGKILL, out.stdout + out.stderr  # the worker's status, not torchrun's 1
    assert ckpt(run_dir)["global_step"] == 4 and ckpt(run_dir)["world_size"] == 2
    return run_dir


@pytest.fixture(scope="module")
def one_process_run(workdir):
    """1 process x batch 6: the same global micro-batches, so the same 9 optimizer steps."""
    path, cfg = workdir
    one, _ = tp.resolve_config(cfg, ["train.batch_size=6"])
    with one_thread():
        outcome, run = tp.train(one, str(path / "one"), "none", quiet=True)
    assert outcome == "finished" and run["plan"]["total_steps"] == 9
    return str(path / "one")


def copy_run(run_dir, tmp_path):
    dest = str(tmp_path / os.path.basename(run_dir))
    shutil.copytree(run_dir, dest)
    return dest


# ---------------------------------------------------------------------------------------------------
def test_g2_two_processes_with_batch_b_end_equal_to_one_process_with_batch_2b(workdir, one_process_run,
                                                                             two_process_run):
    path, cfg = workdir
    a, b = ckpt(one_process_run), ckpt(two_process_run)
    assert a["world_size"] == 1 and b["world_size"] == 2 and len(b["rng"]) == 2
    assert a["global_step"] == b["global_step"] == 9
    for name in a["model"]:
        assert torch.allclose(a["model"][name], b["model"][name], rtol=1e-5, atol=1e-7), name
    initial = tp.build_head(tp.resolve_config(cfg)[0], torch.randn(4, 16)).linear.weight  # seeded init
    assert not torch.allclose(b["model"]["linear.weight"], initial, atol=1e-3)  # it did train
    # the logged global loss and LR agree step for step (the loss is all-reduced over processes)
    ra, rb = records(one_process_run), records(two_process_run)
    assert np.allclose(last_per_step(ra, "loss"), last_per_step(rb, "loss"), rtol=1e-5)
    assert last_per_step(ra, "lr") == last_per_step(rb, "lr")


def test_eval_auroc_is_over_every_processs_predictions_not_a_mean_of_per_process_aurocs(one_process_run,
                                                                                          two_process_run):
    # 20 val windows, 10 scored by each process; gathered, the metrics equal the one-process ones.
    ea = [r for r in records(one_process_run) if "val/auroc" in r]
    eb = [r for r in records(two_process_run) if "val/auroc" in r]
    assert [r["step"] for r in ea] == [r["step"] for r in eb] == [3, 6, 9]
    for ra, rb in zip(ea, eb):
        for key in ("val/auroc", "val/bacc", "val/loss"):
            assert abs(ra[key] - rb[key]) < 1e-6, (key, ra, rb)


def test_r4_r5_two_process_run_killed_and_relaunched_through_launch_sh_is_bit_identical(
        workdir, two_process_run, killed_two_process_run, tmp_path):
    path, cfg = workdir
    run_dir = copy_run(killed_two_process_run, tmp_path)
    out = launch(cfg, "--gpus", "cpu:2", "--", "--run_dir", run_dir, cwd=path, env=ONE_THREAD)  # the same command line
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resumed from" in out.stdout and "at optimizer step 4" in out.stdout
    assert tp.checkpoint_tensors_equal(os.path.join(two_process_run, "checkpoints", "last.pt"),
                                       os.path.join(run_dir, "checkpoints", "last.pt"))
    a, b = ckpt(two_process_run), ckpt(run_dir)
    assert a["global_step"] == b["global_step"] == 9 and b["finished"]
    assert a["last_eval"] == b["last_eval"] and a["best_step"] == b["best_step"]
    assert last_per_step(records(two_process_run), "loss") == last_per_step(records(run_dir), "loss")
    assert loud_findings(run_dir) == []  # the false-positive corpus: a killed and resumed healthy run


def test_false_positive_corpus_healthy_one_and_two_process_probe_runs_get_no_warning(one_process_run,
                                                                                    two_process_run):
    """diagnose_and_fix.py --config/--log/--checkpoint and the script's own train.log on healthy runs
    (the module's own runs, reused): no warning, no critical (issue 22)."""
    assert loud_findings(one_process_run) == [] and loud_findings(two_process_run) == []


def test_d5_two_nodes_killed_and_relaunched_end_bit_identical_to_the_one_node_run(workdir, two_process_run, tmp_path):
    """Two launch.sh invocations as node 0 and node 1 (one CPU process each, gloo, MASTER_ADDR=127.0.0.1).
    Node 1's process is SIGKILLed in step 5: node 0's process, waiting in that step's all-reduce, fails at
    once on the closed connection (gloo: "Connection reset/closed by peer"; no timeout is involved) and its torchrun
    ends. The same two commands then resume and end bit-identical to the one-node two-process run."""
    path, cfg = workdir
    run_dir = str(tmp_path / "nodes")
    args = (cfg, "--gpus", "cpu", "--", "--run_dir", run_dir)
    node0, node1 = two_nodes(*args, cwd=path, env=ONE_THREAD, node_env={1: {"KIT_FAULT_KILL_AT": "5:1"}})
    assert node1.returncode == 128 + signal.SIGKILL, node1.stdout
    # gloo says "Connection reset by peer" or "Connection closed by peer", by when the peer's socket closed
    assert node0.returncode != 0 and re.search(r"Connection (reset|closed) by peer", node0.stdout), node0.stdout
    assert ckpt(run_dir)["global_step"] == 4 and ckpt(run_dir)["world_size"] == 2
    node0, node1 = two_nodes(*args, cwd=path, env=ONE_THREAD)
    assert node0.returncode == node1.returncode == 0, node0.stdout + node1.stdout
    assert tp.checkpoint_tensors_equal(os.path.join(two_process_run, "checkpoints", "last.pt"),
                                       os.path.join(run_dir, "checkpoints", "last.pt"))


def test_s7_resume_with_a_different_world_size_is_refused_with_exit_2(workdir, killed_two_process_run, tmp_path):
    path, cfg = workdir
    run_dir = copy_run(killed_two_process_run, tmp_path)
    before = open(os.path.join(run_dir, "checkpoints", "last.pt"), "rb").read()
    # the script itself, one process on a two-process checkpoint
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train_probe.py"), "--config", cfg, "--run_dir", run_dir],
                         cwd=path, capture_output=True, text=True, env=launch_env(), timeout=120)
    assert out.returncode == 2, out.stderr
    assert "written by 2 process(es), this run has 1" in out.stderr and "Traceback" not in out.stderr
    # launch.sh refuses before starting anything, and says which --gpus would continue it
    out = launch(cfg, "--gpus", "cpu", "--", "--run_dir", run_dir, cwd=path)
    assert out.returncode == 2
    assert "written by 2 process(es), this launch has 1" in out.stderr and "--gpus cpu:2" in out.stderr
    assert open(os.path.join(run_dir, "checkpoints", "last.pt"), "rb").read() == before


def test_distill_two_process_kd_run_equals_one_process_with_twice_the_batch(tmp_path):
    """Smoke test of train_distill.py under torchrun: a tiny teacher (1 process), then KD students on 2
    processes x batch 2 and on 1 process x batch 4: token-weighted losses (G2) make them equal."""
    if not os.path.exists(os.path.join(ROOT, "train_distill.py")):
        pytest.skip("train_distill.py does not exist yet")
    import train_distill as td
    tiny = [s for s in td.DRY_RUN_SETTINGS + ["teacher.n_layer=1", "teacher.n_head=2", "teacher.n_embd=32"]
            if not s.startswith("train.batch_size=")]
    # one epoch of 26 windows = 7 global micro-batches of 4 (the last holds 2, split 1 + 1 over two processes)
    # in 4 optimizer steps (the last a short group of one micro-batch); 32 val windows per eval
    tiny += ["train.epochs=null", "train.max_steps=4", "data.val_windows=32"]
    teacher_cfg, _ = td.resolve_config(None, teacher_run(tiny) + ["train.batch_size=4"])
    with one_thread():
        assert td.train(teacher_cfg, str(tmp_path / "teacher"), "none", quiet=True)[0] == "finished"
    kd = tiny + ["kd.enabled=true", "kd.hf_teacher_dir=null",
                 f"kd.teacher_checkpoint={tmp_path / 'teacher' / 'checkpoints' / 'best.pt'}"]
    one_cfg, _ = td.resolve_config(None, kd + ["train.batch_size=4"])
    with one_thread():
        outcome, run = td.train(one_cfg, str(tmp_path / "one"), "none", quiet=True)
    assert outcome == "finished"
    cfg = write_config(tmp_path, "task: distill\nrun_name: distill_smoke\n", name="distill.yaml")
    sets = [a for o in kd + ["train.batch_size=2"] for a in ("--set", o)]
    out = launch(cfg, "--gpus", "cpu:2", "--", *sets, "--run_dir", str(tmp_path / "two"), cwd=tmp_path, env=ONE_THREAD)
    assert out.returncode == 0, out.stdout + out.stderr
    a, b = ckpt(str(tmp_path / "one")), ckpt(str(tmp_path / "two"))
    assert run["plan"]["micro_batches_per_epoch"] == 7 and run["plan"]["total_steps"] == 4
    assert b["world_size"] == 2 and a["global_step"] == b["global_step"] == 4 and b["finished"]
    for name in a["model"]:
        assert torch.allclose(a["model"][name], b["model"][name], rtol=1e-4, atol=1e-6), name
    ra, rb = records(str(tmp_path / "one")), records(str(tmp_path / "two"))
    assert np.allclose(last_per_step(ra, "loss"), last_per_step(rb, "loss"), rtol=1e-5)
    # perplexity from the CE sums and token counts of every process, not a mean of per-process values (E3)
    ea, eb = [r for r in ra if "val/ppl" in r], [r for r in rb if "val/ppl" in r]
    assert [r["step"] for r in ea] == [r["step"] for r in eb] and ea
    assert all(abs(x["val/ppl"] - y["val/ppl"]) <= 1e-5 * x["val/ppl"] for x, y in zip(ea, eb))
    # the false-positive corpus: healthy plain-LM, one-process and two-process KD runs get no warning (but the
    # config check's S3/E4, right about a 4-step run with a 2-step warmup and 3-step evals)
    for name in ("teacher", "one", "two"):
        assert [f for f in loud_findings(str(tmp_path / name)) if f[0] not in ("S3", "E4")] == [], name


@pytest.mark.parametrize("script, world", [("train_probe", "2"), ("train_distill", "2"), ("train_probe", "1")])
def test_multi_process_exit_skips_py_finalize_so_gloo_threads_cannot_abort_a_finished_run(script, world, tmp_path):
    """A finished torchrun worker must exit with its status, never 134: gloo's worker threads may still be
    releasing the last collective's Python tensors when the interpreter finalizes, and a thread that asks
    for the GIL then is killed inside a C++ destructor (std::terminate). exit_process() ends multi-process
    runs without Py_Finalize (no atexit handler runs: the marker stays absent) after flushing stdout;
    a single process exits normally."""
    marker = tmp_path / "finalized"
    code = (f"import atexit, sys; sys.path.insert(0, {ROOT!r}); import {script} as s; "
            f"atexit.register(lambda: open({str(marker)!r}, 'w').close()); print('flushed', end=''); s.exit_process(7)")
    env = {**launch_env(), "WORLD_SIZE": world}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 7 and out.stdout == "flushed", out.stderr
    assert marker.exists() == (world == "1")

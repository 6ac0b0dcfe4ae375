"""train.strategy: fsdp (FSDP2's fully_shard, DCP checkpoints) and train.activation_checkpointing, on the
CPU with gloo, launched the way users launch it: ./launch.sh CONFIG --gpus cpu:2 -- --set train.strategy=fsdp.

One tiny teacher (in-process), then KD students: one unsharded process with the global micro-batch (the
reference DDP equals, tests/test_ddp.py), one uninterrupted two-process FSDP run, the same run SIGKILLed and
relaunched, and a chain that changes the number of processes twice (2 -> 1 -> 2) on the same global
micro-batch. 17 eval windows split 9 + 8 over two processes: 2 eval batches of 8 on one, 1 on the other.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import zoo
from test_ddp import ONE_THREAD, ckpt, one_thread
from test_launch import ROOT, launch, launch_env, two_nodes, write_config
from run_records import last_per_step, records, teacher_run

sys.path.insert(0, ROOT)
import train_distill as td  # noqa: E402

# 26 windows, global micro-batch 4 (2 per process x 2, or 4 x 1), grad_accum 2: 7 micro-batches, 4 optimizer
# steps an epoch; 6 steps in all; last.pt every 2 steps, evals at 3 and 6.
TINY = [s for s in td.DRY_RUN_SETTINGS + ["teacher.n_layer=1", "teacher.n_head=2", "teacher.n_embd=32"]
        if not s.startswith(("train.epochs", "train.max_steps", "train.batch_size", "data.val_windows"))]
TINY += ["train.epochs=null", "train.max_steps=6", "data.val_windows=17", "train.max_loss_share=1"]


def sharding():
    """fsdp_sharding.py as train_distill.py loads it beside itself (the FSDP and DCP code is that companion's)."""
    return td.companion("fsdp_sharding", "train.strategy")


def sets(settings):
    return [a for s in settings for a in ("--set", s)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    path = tmp_path_factory.mktemp("fsdp")
    teacher_cfg, _ = td.resolve_config(None, teacher_run(TINY) + ["train.batch_size=4"])
    with one_thread():
        assert td.train(teacher_cfg, str(path / "teacher"), "none", quiet=True)[0] == "finished"
    kd = TINY + ["kd.enabled=true", f"kd.teacher_checkpoint={path / 'teacher' / 'checkpoints' / 'best.pt'}"]
    cfg = write_config(path, "task: distill\nrun_name: fsdp\n", name="distill.yaml")
    return path, cfg, kd


def run_fsdp(work, name, gpus="cpu:2", batch=2, env=None):
    path, cfg, kd = work
    out = launch(cfg, "--gpus", gpus, "--", *sets(kd + [f"train.batch_size={batch}", "train.strategy=fsdp"]),
                 "--run_dir", str(path / name), cwd=path, env={**ONE_THREAD, **(env or {})})
    return out, str(path / name)


@pytest.fixture(scope="module")
def unsharded(work):
    """One process, batch 4, no sharding: what DDP's two processes of batch 2 equal (tests/test_ddp.py)."""
    path, _, kd = work
    cfg, _ = td.resolve_config(None, kd + ["train.batch_size=4"])
    with one_thread():
        assert td.train(cfg, str(path / "unsharded"), "none", quiet=True)[0] == "finished"
    return str(path / "unsharded")


@pytest.fixture(scope="module")
def fsdp_run(work):
    out, run_dir = run_fsdp(work, "fsdp")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Warning" not in out.stdout + out.stderr, out.stdout + out.stderr  # a healthy run warns of nothing
    return run_dir


@pytest.fixture(scope="module")
def killed_fsdp_run(work):
    """SIGKILLed before micro-batch 1 of step 5; the last save is step 4 (a DCP directory and last.pt)."""
    out, run_dir = run_fsdp(work, "killed", env={"KIT_FAULT_KILL_AT": "5:1"})
    assert out.returncode == 128 + signal.SIGKILL, out.stdout + out.stderr
    assert ckpt(run_dir)["global_step"] == 4 and ckpt(run_dir)["shards"] == "last-step00000004"
    keep = str(work[0] / "killed_copy")
    shutil.copytree(run_dir, keep)
    return keep


def test_d1_fsdp_on_two_processes_equals_the_unsharded_run_to_round_off(fsdp_run, unsharded):
    """Losses, gradient norms (D1: the norm of every process's shard, not the local one), evals (uneven eval
    shares: every process runs as many forwards) and the final weights."""
    a, b = records(unsharded), records(fsdp_run)
    for key in ("loss", "grad_norm", "lr"):
        assert np.allclose(last_per_step(a, key), last_per_step(b, key), rtol=1e-5), key
    assert np.allclose(last_per_step(a, "val/loss"), last_per_step(b, "val/loss"), rtol=1e-6)
    assert last_per_step(a, "val/agreement") == last_per_step(b, "val/agreement")
    last = ckpt(fsdp_run)
    assert last["finished"] and last["world_size"] == 2 and last["model"] is None and last["optimizer"] is None
    sharded = sharding().read_shards(os.path.join(fsdp_run, "checkpoints", last["shards"]))
    plain = ckpt(unsharded)["model"]
    assert sharded.keys() == plain.keys()
    for name in plain:
        assert torch.allclose(sharded[name], plain[name], rtol=1e-4, atol=1e-6), name


def test_d2_fsdp_run_killed_and_relaunched_is_bit_identical(work, fsdp_run, killed_fsdp_run, tmp_path):
    run_dir = str(tmp_path / "killed")
    shutil.copytree(killed_fsdp_run, run_dir)
    path, cfg, kd = work  # the same command as the killed run's
    out = launch(cfg, "--gpus", "cpu:2", "--", *sets(kd + ["train.batch_size=2", "train.strategy=fsdp"]),
                 "--run_dir", run_dir, cwd=path, env=ONE_THREAD)
    assert out.returncode == 0, out.stdout + out.stderr
    assert td.checkpoint_tensors_equal(os.path.join(fsdp_run, "checkpoints", "last.pt"),
                                       os.path.join(run_dir, "checkpoints", "last.pt"))
    assert last_per_step(records(fsdp_run), "loss") == last_per_step(records(run_dir), "loss")
    # only the DCP directories the checkpoint files name are left, no temporary ones
    left = sorted(n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if not n.endswith(".pt"))
    named = {torch.load(os.path.join(run_dir, "checkpoints", n), weights_only=True)["shards"]
             for n in ("last.pt", "last.prev.pt", "best.pt", "best.prev.pt")
             if os.path.exists(os.path.join(run_dir, "checkpoints", n))}
    assert set(left) == named, left


def test_d3_fsdp_run_continues_on_another_number_of_processes_with_the_same_global_micro_batch(
        work, fsdp_run, killed_fsdp_run, tmp_path):
    """2 processes (killed in step 5, saved at 4) -> 1 process of batch 4 saving every step (killed in step 6,
    saved at 5) -> 2 processes again: R5's rule
    (the same global micro-batch) keeps the data order and the schedule exact; the result equals the
    uninterrupted run to float round-off."""
    path, cfg, kd = work
    run_dir = str(tmp_path / "chain")
    shutil.copytree(killed_fsdp_run, run_dir)
    fsdp = kd + ["train.strategy=fsdp"]
    # another global micro-batch is refused before anything starts, naming the batch size that would fit
    out = launch(cfg, "--gpus", "cpu", "--", *sets(fsdp + ["train.batch_size=2"]), "--run_dir", run_dir, cwd=path)
    assert out.returncode == 2 and "train.batch_size=4" in out.stderr, out.stderr
    out = launch(cfg, "--gpus", "cpu", "--", *sets(fsdp + ["train.batch_size=4", "train.save_every_steps=1"]),
                 "--run_dir", run_dir, cwd=path, env={"KIT_FAULT_KILL_AT": "6:0", **ONE_THREAD})
    assert out.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), out.stdout + out.stderr  # one process: no torchrun
    assert ckpt(run_dir)["global_step"] == 5 and ckpt(run_dir)["world_size"] == 1
    log = open(os.path.join(run_dir, "train.log")).read()
    assert "note R5: continuing a 2-process checkpoint on 1 process(es)" in log
    out = launch(cfg, "--gpus", "cpu:2", "--", *sets(fsdp + ["train.batch_size=2", "train.save_every_steps=1"]),
                 "--run_dir", run_dir, cwd=path, env=ONE_THREAD)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "note R5: continuing a 1-process checkpoint on 2 process(es)" in open(os.path.join(run_dir, "train.log")).read()
    a, b = records(fsdp_run), records(run_dir)
    assert last_per_step(a, "lr") == last_per_step(b, "lr")  # the schedule position is exact
    assert np.allclose(last_per_step(a, "loss"), last_per_step(b, "loss"), rtol=1e-5)
    assert np.allclose(last_per_step(a, "val/loss"), last_per_step(b, "val/loss"), rtol=1e-5)


def test_d1_fsdp_on_two_nodes_is_bit_identical_to_one_node_with_two_processes(work, fsdp_run):
    """Node 0 and node 1 (one process each) hold ranks 0 and 1 as one node's two processes do: the same
    shards, the same collectives, the same bits."""
    path, cfg, kd = work
    run_dir = str(path / "two_nodes")
    node0, node1 = two_nodes(cfg, "--gpus", "cpu", "--", *sets(kd + ["train.batch_size=2", "train.strategy=fsdp"]),
                             "--run_dir", run_dir, cwd=path, env=ONE_THREAD)
    assert node0.returncode == node1.returncode == 0, node0.stdout + node1.stdout
    assert td.checkpoint_tensors_equal(os.path.join(fsdp_run, "checkpoints", "last.pt"),
                                       os.path.join(run_dir, "checkpoints", "last.pt"))


def test_d4_fsdp_export_is_one_state_dict_with_the_best_weights(fsdp_run):
    best = torch.load(os.path.join(fsdp_run, "checkpoints", "best.pt"), map_location="cpu", weights_only=True)
    weights = sharding().read_shards(os.path.join(fsdp_run, "checkpoints", best["shards"]))
    module = td.load_export(os.path.join(fsdp_run, "export"))
    exported = module.state_dict()
    assert exported.keys() == {k[len("lm."):] for k in weights if k.startswith("lm.")}
    for name, value in exported.items():
        assert torch.equal(value, weights["lm." + name]), name


def test_d2_resume_under_another_strategy_is_refused_in_one_line(work, killed_fsdp_run, tmp_path):
    path, cfg, kd = work
    run_dir = str(tmp_path / "other")
    shutil.copytree(killed_fsdp_run, run_dir)
    before = open(os.path.join(run_dir, "checkpoints", "last.pt"), "rb").read()
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train_distill.py"), "--config", cfg,
                          *sets(kd + ["train.batch_size=4"]), "--run_dir", run_dir],
                         cwd=path, capture_output=True, text=True, env=launch_env(), timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "saved with train.strategy=fsdp" in out.stderr
    assert open(os.path.join(run_dir, "checkpoints", "last.pt"), "rb").read() == before


@pytest.mark.parametrize("model", ["builtin", "hf_gpt2", "hf_llama"])
def test_activation_checkpointing_changes_no_bit_of_training(model, tmp_path):
    """Recomputed blocks (with the RNG state they first saw: GPT-2's dropout masks) give the same steps."""
    settings = teacher_run(TINY) + ["train.batch_size=4", "train.max_steps=3", "train.eval_every=3"]
    if model != "builtin":
        pytest.importorskip("transformers")
        build = zoo.hf_gpt2 if model == "hf_gpt2" else zoo.hf_llama
        # kd.enabled false trains student.*: a callable returning the Hugging Face model
        settings += [f"student.target=transformers:AutoModelForCausalLM.from_pretrained",
                     f"student.kwargs={{pretrained_model_name_or_path: {build(tmp_path / model)}}}"]
    results = {}
    for ac in ("false", "true"):
        cfg, _ = td.resolve_config(None, settings + [f"train.activation_checkpointing={ac}"])
        with one_thread():
            outcome, run = td.train(cfg, str(tmp_path / ac), "none", quiet=True)
        assert outcome == "finished"
        if ac == "true":
            assert all(type(b).__name__ == "CheckpointWrapper" for b in td.model_blocks(run["module"]))
        results[ac] = (last_per_step(records(str(tmp_path / ac)), "loss"), ckpt(str(tmp_path / ac))["model"])
    assert results["false"][0] == results["true"][0]
    assert results["false"][1].keys() == results["true"][1].keys()  # the wrapper leaves the saved names alone
    assert all(torch.equal(results["false"][1][k], results["true"][1][k]) for k in results["false"][1])


def test_activation_checkpointing_on_a_model_without_blocks_is_one_config_error(tmp_path):
    cfg, _ = td.resolve_config(None, teacher_run(TINY) + ["train.batch_size=4", "student.target=zoo:tiny_causal_lm",
                                             "train.activation_checkpointing=true"])
    with pytest.raises(td.ConfigError) as err:
        td.train(cfg, str(tmp_path / "run"), "none", quiet=True)
    assert "train.activation_checkpointing" in str(err.value) and "nn.ModuleList" in str(err.value)
    assert not os.path.exists(tmp_path / "run")


def test_d2_a_sharded_best_pt_copied_alone_is_one_line_naming_its_directory(work, fsdp_run, tmp_path, capsys):
    """Issue 31: an FSDP best.pt copied without its DCP directory, as a teacher, to --evaluate, to --dry_run and
    to diagnose_and_fix.py (--checkpoint, and --config naming it as the teacher), was a 37-line FileNotFoundError
    on .../.metadata. Now every one says the same line: a sharded checkpoint, the directory it needs, export/;
    the run exits 2 and makes no run directory."""
    import diagnose_and_fix as dx
    path, cfg, kd = work
    best = tmp_path / "sent" / "best.pt"
    best.parent.mkdir()
    shutil.copy(os.path.join(fsdp_run, "checkpoints", "best.pt"), best)
    name = torch.load(best, weights_only=True)["shards"]
    line = (f"{best} is a sharded checkpoint (train.strategy fsdp): its weights are in the directory {name}/ beside "
            f"it, which is missing; copy {name}/ from the run's checkpoints/ next to it, or use the run's export/")
    as_teacher = kd + ["train.batch_size=4", f"kd.teacher_checkpoint={best}", "teacher.n_embd=16"]  # the student's
    for argv, key in [(["--evaluate", str(best)], "--evaluate"), (["--dry_run"], "kd.teacher_checkpoint"),
                      (["--run_dir", str(tmp_path / "new")], "kd.teacher_checkpoint")]:
        settings = kd + ["train.batch_size=4"] if key == "--evaluate" else as_teacher
        assert td.main(["--config", cfg, *sets(settings), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert f"config error: {key}: {line}" in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "new")
    for argv, source in [(["--checkpoint", str(best)], "checkpoint"), (["--config", cfg, *sets(as_teacher)], "config")]:
        assert dx.main([*argv, "--json"]) == 1
        found = [f for f in json.loads(capsys.readouterr().out)["findings"] if f["severity"] == "critical"]
        assert [(f["id"], f["source"]) for f in found] == [("D2", source)] and line in found[0]["evidence"], found


def test_r6_d2_a_last_pt_whose_shard_directory_is_missing_falls_back_to_last_prev_pt(work, fsdp_run, killed_fsdp_run,
                                                                                    tmp_path):
    """Issue 31: last.pt naming a DCP directory that is gone (deleted, not copied) was `AssertionError: metadata
    is None` on every process; it is a torn checkpoint like any other (R6): diagnose_and_fix.py says so, the
    relaunch too, continues from last.prev.pt (step 2) and ends bit-identical to the uninterrupted run."""
    path, cfg, kd = work
    run_dir = str(tmp_path / "killed")
    shutil.copytree(killed_fsdp_run, run_dir)
    shutil.rmtree(os.path.join(run_dir, "checkpoints", ckpt(run_dir)["shards"]))
    import contextlib
    import io
    import diagnose_and_fix as dx
    report = io.StringIO()
    with contextlib.redirect_stdout(report):  # diagnose says what the relaunch will do
        dx.main(["--checkpoint", os.path.join(run_dir, "checkpoints", "last.pt"), "--json"])
    found = [f for f in json.loads(report.getvalue())["findings"] if f["severity"] == "critical"]
    assert [f["id"] for f in found] == ["D2"]
    assert "last.prev.pt is whole, and resume falls back to it" in found[0]["evidence"]
    out = launch(cfg, "--gpus", "cpu:2", "--", *sets(kd + ["train.batch_size=2", "train.strategy=fsdp"]),
                 "--run_dir", run_dir, cwd=path, env=ONE_THREAD)
    assert out.returncode == 0, out.stdout + out.stderr
    log = open(os.path.join(run_dir, "train.log")).read()
    assert f"WARNING R6: {run_dir}/checkpoints/last.pt is a sharded checkpoint (train.strategy fsdp): its weights " \
           "are in the directory last-step00000004/ beside it, which is missing; trying the previous checkpoint" in log
    assert td.checkpoint_tensors_equal(os.path.join(fsdp_run, "checkpoints", "last.pt"),
                                       os.path.join(run_dir, "checkpoints", "last.pt"))

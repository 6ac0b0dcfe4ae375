"""R4 with a model that draws random numbers in training: head.dropout > 0.

Until a model draws random numbers, nothing can tell whether resume() restores the RNG. With dropout on the
probe head, a run SIGKILLed mid-epoch and resumed must end bit-identical to an uninterrupted one, and the RNG
state in a last.pt written after the resume must equal the uninterrupted run's at the same step: both fail
when resume() skips set_rng_state, and the uncached path's fails when the DataLoader draws its base seed from
the global torch RNG (one iterator more in a resumed run).
"""
import os
import shutil
import signal

import pytest
import torch

from test_launch import launch, write_config, TINY_YAML
from run_records import run_together
from test_probe import TINY, ckpt, run_script, script_call, sets
import train_probe as tp


def rng_equal(a, b):
    """Every RNG state of every process: torch CPU, CUDA, numpy and python."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(rng_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(rng_equal(x, y) for x, y in zip(a, b))
    return a == b


def checkpoints_equal(path_a, path_b):
    a = torch.load(path_a, map_location="cpu", weights_only=True)
    b = torch.load(path_b, map_location="cpu", weights_only=True)
    return a["global_step"] == b["global_step"] and rng_equal(a["rng"], b["rng"]) \
        and tp.checkpoint_tensors_equal(path_a, path_b)


# 4 optimizer steps per epoch (TINY): step 5 is one step into epoch 2, step 11 three steps into epoch 3.
@pytest.mark.parametrize("cache", ["true", "false"], ids=["cached_features", "uncached_dataloader"])
def test_r4_dropout_run_sigkilled_mid_epoch_and_resumed_is_bit_identical_rng_state_included(tmp_path, cache):
    base = sets(*TINY, "head.dropout=0.5", f"backbone.cache_features={cache}", "train.save_every_steps=1")
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    done, died = run_together(script_call(*base, "--run_dir", whole),
                              script_call(*base, "--run_dir", killed, env={"KIT_FAULT_KILL_AT": "6:1"}))
    assert done.returncode == 0, done.stderr
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert ckpt(killed)["global_step"] == 5
    # resumed mid-epoch 2 and killed again mid-epoch 3: its last.pt (step 11) was written after a resume
    died = run_script(*base, "--run_dir", killed, env={"KIT_FAULT_KILL_AT": "12:0"})
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert "resumed from" in died.stdout and "at optimizer step 5" in died.stdout
    # the uninterrupted run's step-11 checkpoint is its last.prev.pt (a save after every step)
    assert checkpoints_equal(os.path.join(whole, "checkpoints", "last.prev.pt"),
                             os.path.join(killed, "checkpoints", "last.pt"))
    resumed = run_script(*base, "--run_dir", killed)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("last.pt", "best.pt"):
        assert checkpoints_equal(os.path.join(whole, "checkpoints", name), os.path.join(killed, "checkpoints", name))
    # dropout did draw: the same run without it ends elsewhere (so the equality above is not trivial)
    cfg, _ = tp.resolve_config(None, TINY + [f"backbone.cache_features={cache}"])
    _, plain = tp.train(cfg, str(tmp_path / "plain"), "none", quiet=True)
    assert not torch.equal(plain["module"].linear.weight, ckpt(whole)["model"]["linear.weight"])


def test_r4_two_process_dropout_run_resumed_mid_epoch_saves_the_uninterrupted_rng_states(tmp_path):
    """2 processes (gloo) through launch.sh: 3 optimizer steps per epoch, a save after every step. The first
    launch is SIGKILLed before step 6, so its last.pt (step 5) and last.prev.pt (step 4) are the uninterrupted
    run's. A copy resumed from step 4 (one step into epoch 2, a fresh DataLoader iterator on each process) and
    killed at the same point must write the same step-5 last.pt: weights and both processes' RNG states."""
    text = TINY_YAML.replace("backbone: {kwargs: {width: 8, heads: 2}}",
                             "backbone: {kwargs: {width: 8, heads: 2}, cache_features: false}\nhead: {dropout: 0.5}")
    assert "dropout" in text
    cfg = write_config(tmp_path, text)
    first, copy = str(tmp_path / "first"), str(tmp_path / "copy")
    out = launch(cfg, "--gpus", "cpu:2", "--", "--run_dir", first, cwd=tmp_path, env={"KIT_FAULT_KILL_AT": "6:0"})
    assert out.returncode == 128 + signal.SIGKILL, out.stdout + out.stderr
    assert ckpt(first)["global_step"] == 5 and len(ckpt(first)["rng"]) == 2
    shutil.copytree(first, copy)
    os.replace(os.path.join(copy, "checkpoints", "last.prev.pt"), os.path.join(copy, "checkpoints", "last.pt"))
    assert ckpt(copy)["global_step"] == 4
    out = launch(cfg, "--gpus", "cpu:2", "--", "--run_dir", copy, cwd=tmp_path, env={"KIT_FAULT_KILL_AT": "6:0"})
    assert out.returncode == 128 + signal.SIGKILL, out.stdout + out.stderr
    assert "at optimizer step 4" in out.stdout
    assert checkpoints_equal(os.path.join(first, "checkpoints", "last.pt"), os.path.join(copy, "checkpoints", "last.pt"))


def test_r4_each_process_draws_its_own_dropout_masks(tmp_path, monkeypatch):
    # seed_everything gives process r the torch seed seed + r. Building the backbone and the head (seeded alike on
    # every process: one init) must not reset that stream, or every process would drop the same features of its
    # samples. Two one-process runs, the second seeded as process 1 would be: same data, same init, so only the
    # dropout masks can make their heads differ.
    cfg, _ = tp.resolve_config(None, TINY + ["head.dropout=0.5"])
    real = tp.seed_everything
    heads = []
    for rank in (0, 1):
        monkeypatch.setattr(tp, "seed_everything", lambda seed, _rank, r=rank: real(seed, r))
        _, run = tp.train(cfg, str(tmp_path / f"rank{rank}"), "none", quiet=True)
        heads.append(run["module"])
    assert torch.equal(heads[0].feature_mean, heads[1].feature_mean)  # the same features, the same data
    assert not torch.equal(heads[0].linear.weight, heads[1].linear.weight)


def test_r4_the_suite_computes_on_one_intra_op_thread_since_float32_bits_depend_on_the_count():
    """The tests compare runs and processes bit for bit: conftest.py pins one intra-op thread for the pytest
    process and everything it starts. Why it must: the same float32 kernel gives the same bits every time at one
    thread count and other bits at another (LayerNorm's weight gradient is summed per thread's rows)."""
    from run_records import launch_env
    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    assert launch_env()["OMP_NUM_THREADS"] == "1" and "OMP_NUM_THREADS" not in launch_env({"OMP_NUM_THREADS": None})
    x, dy = torch.randn(48, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(), torch.ones(48, 32)
    norm = torch.nn.LayerNorm(32)
    norm.weight.data.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))

    def weight_grad(threads):
        torch.set_num_threads(threads)
        try:
            return torch.autograd.grad(norm(x), norm.weight, x.detach() * dy)[0]
        finally:
            torch.set_num_threads(1)
    assert torch.equal(weight_grad(1), weight_grad(1)) and torch.equal(weight_grad(2), weight_grad(2))
    assert not torch.equal(weight_grad(1), weight_grad(2))

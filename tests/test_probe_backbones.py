"""Probe backbones users bring (issue "Real models"): any nn.Module, its output as a tensor, tuple, dict or
ModelOutput, pooled by backbone.pool; BatchNorm statistics that never move; bad backbone input caught before
the run dir is touched; a feature cache on disk that a resume reuses. The zoo is tests/zoo.py.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from test_probe import ROOT, TINY, ckpt, sets
from test_probe_rng import checkpoints_equal
import train_probe as tp

TESTS = os.path.dirname(os.path.abspath(__file__))
CHANNELS = ["backbone.kwargs={channels: 4}"]  # TINY's windows: 4 channels x 128 samples
ZOO = {  # name: overrides; every model has dropout, so eval mode during feature extraction is visible
    "eegnet": ["backbone.target=zoo:eegnet"],  # BatchNorm + dropout, [B, D]: backbone.pool null
    "tokens_cls": ["backbone.target=zoo:token_transformer", "backbone.pool=cls"],  # [B, 1 + N, D]
    "conv_time": ["backbone.target=zoo:conv_time", "backbone.pool=mean_time"],  # BatchNorm, [B, D, T]
    "dict_tokens": ["backbone.target=zoo:dict_encoder", "backbone.pool=mean_tokens"],  # dict: last_hidden_state
    "model_output": ["backbone.target=zoo:dict_encoder", "backbone.kwargs={channels: 4, model_output: true}",
                     "backbone.output=pooler_output"],  # transformers' BaseModelOutputWithPooling
}


def zoo_overrides(name, *extra):
    return TINY + CHANNELS + ZOO[name] + list(extra)


def zoo_config(name, *extra):
    return tp.resolve_config(None, zoo_overrides(name, *extra))[0]


def start_in(cwd, *args, env=None, script=None):
    """The script as a user runs it: from their project directory, no PYTHONPATH. Started, not waited for."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "PYTHONPATH"}
    return subprocess.Popen([sys.executable, script or os.path.join(ROOT, "train_probe.py"), *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc, timeout=240):
    """A started process's CompletedProcess, as subprocess.run returns it."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_in(cwd, *args, env=None, script=None):
    return finish(start_in(cwd, *args, env=env, script=script))


def main_exit(capsys, *overrides, run_dir):
    """train_probe.main in this process: (exit code, stderr lines)."""
    code = tp.main([*sets(*overrides), "--run_dir", str(run_dir)])
    return code, capsys.readouterr().err.strip().splitlines()


# ---------------------------------------------------------------------------------------------------------
# The digest, the output rule, the pools
def test_digest_covers_integer_0_dim_and_non_persistent_buffers():
    net = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3), torch.nn.BatchNorm1d(3))
    net.register_buffer("window", torch.ones(4, dtype=torch.bfloat16), persistent=False)
    base = tp.tensor_digest(net)  # BatchNorm's num_batches_tracked is a 0-dim int64: no crash
    for change in (lambda: net[1].num_batches_tracked.add_(1), lambda: net[1].running_mean.add_(1e-7),
                   lambda: net.window.mul_(2)):
        change()
        assert tp.tensor_digest(net) != base
        base = tp.tensor_digest(net)


def test_feature_tensor_rule_for_tensor_tuple_dict_and_model_output():
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    a, b = torch.randn(2, 5, 3), torch.randn(2, 3)
    assert tp.feature_tensor(a, None) is a
    assert tp.feature_tensor((a, b), None) is a and tp.feature_tensor([a, b], "1") is b
    assert tp.feature_tensor({"pooler_output": b, "last_hidden_state": a}, None) is a
    assert tp.feature_tensor({"features": b, "note": "x"}, None) is b  # the only tensor
    assert tp.feature_tensor(BaseModelOutputWithPooling(last_hidden_state=a, pooler_output=b), None) is a
    assert tp.feature_tensor(BaseModelOutputWithPooling(last_hidden_state=a, pooler_output=b), "pooler_output") is b
    with pytest.raises(tp.ConfigError, match=r"backbone.output: .*tensors emb \(2, 3\), tok \(2, 5, 3\)"):
        tp.feature_tensor({"emb": b, "tok": a}, None)  # two tensors, neither named last_hidden_state: no guess
    with pytest.raises(tp.ConfigError, match="backbone.output: 'pooled' is not a tensor key"):
        tp.feature_tensor({"last_hidden_state": a}, "pooled")
    with pytest.raises(tp.ConfigError, match="backbone.output"):
        tp.feature_tensor(a, "last_hidden_state")


def test_c3_a_one_number_a_window_output_is_offered_flatten_and_flatten_makes_it_one_feature():
    """A backbone returning [B] (a score a window, a user's trial): the refusal said 'set backbone.pool to flatten',
    and flatten then raised an IndexError traceback (exit 1)."""
    x = torch.arange(3, dtype=torch.float32)
    with pytest.raises(tp.ConfigError, match=r"shape \(3,\), not \[B, D\]; set backbone.pool to flatten$"):
        tp.pool_features(x, None)
    assert torch.equal(tp.pool_features(x, "flatten"), x.reshape(3, 1))


def test_backbone_pool_choices_pool_the_axis_they_name_and_a_3d_output_needs_one():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    assert torch.equal(tp.pool_features(x, "mean_tokens"), x.mean(1))
    assert torch.equal(tp.pool_features(x, "mean_time"), x.mean(2))
    assert torch.equal(tp.pool_features(x, "cls"), x[:, 0])
    assert torch.equal(tp.pool_features(x, "flatten"), x.reshape(2, 12))
    assert tp.pool_features(x[:, 0], None) is not None
    with pytest.raises(tp.ConfigError, match=r"backbone.pool: is null but .*shape \(2, 3, 4\).*mean_tokens.*mean_time"):
        tp.pool_features(x, None)
    with pytest.raises(tp.ConfigError, match="backbone.pool: mean_time needs a 3-D output"):
        tp.pool_features(x[:, 0], "mean_time")
    assert tp.resolve_config(None, ["backbone.pool=none"])[0]["backbone.pool"] is None  # none and null: one meaning


# ---------------------------------------------------------------------------------------------------------
# The zoo: dry run, SIGKILL + resume, frozen BatchNorm, no silent pooling
@pytest.mark.parametrize("name", list(ZOO))
def test_e5_zoo_backbone_dry_run_passes(name, capsys):
    assert tp.dry_run(None, zoo_overrides(name, "head.dropout=0.2")) == 0, capsys.readouterr().out


@pytest.mark.parametrize("name,cache", [("eegnet", "false"), ("tokens_cls", "true"), ("conv_time", "true"),
                                        ("model_output", "false")])
def test_r4_zoo_backbone_resume_after_sigkill_is_bit_exact_and_batchnorm_never_moves(tmp_path, name, cache):
    extra = ["head.dropout=0.3", f"backbone.cache_features={cache}", "train.save_every_steps=2"]
    cfg = zoo_config(name, *extra)
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    base = sets(*zoo_overrides(name, *extra))
    # the run to kill trains on the other core while this process trains the uninterrupted one
    dying = start_in(TESTS, *base, "--run_dir", killed, env={"KIT_FAULT_KILL_AT": "7:1"})  # zoo imports from cwd
    outcome, run = tp.train(cfg, whole, "none", quiet=True)
    assert outcome == "finished"
    # frozen: every submodule still in eval mode, every parameter and buffer (running stats, counters) as built
    fresh = tp.build_backbone(cfg, 4)
    assert not any(m.training for m in run["backbone"].modules())
    assert tp.tensor_digest(run["backbone"]) == tp.tensor_digest(fresh)
    for (key, after), before in zip(run["backbone"].state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(after, before), key
    died = finish(dying)
    assert died.returncode == -signal.SIGKILL, died.stderr
    resumed = run_in(TESTS, *base, "--run_dir", killed)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    for file in ("last.pt", "best.pt"):
        assert checkpoints_equal(os.path.join(whole, "checkpoints", file), os.path.join(killed, "checkpoints", file))


def test_batchnorm_in_train_mode_would_move_and_the_digest_check_would_abort(tmp_path, monkeypatch):
    # The guard the zoo test relies on: a backbone put in train mode moves its BatchNorm statistics, and the
    # digest check after training (over buffers too) refuses to call that run a success.
    real = tp.extract_features

    def in_train_mode(backbone, *args):
        backbone.train()
        return real(backbone, *args)

    monkeypatch.setattr(tp, "extract_features", in_train_mode)
    with pytest.raises(tp.TrainingAborted, match="frozen backbone"):
        tp.train(zoo_config("conv_time", "backbone.cache_features=false"), str(tmp_path / "run"), "none", quiet=True)


@pytest.mark.parametrize("target,shape", [("zoo:token_transformer", "(2, 9, 16)"), ("zoo:conv_time", "(2, 16, 32)"),
                                          ("zoo:dict_encoder", "(2, 8, 16)")])
def test_c3_a_3d_output_without_backbone_pool_exits_2_naming_the_shape(tmp_path, target, shape):
    run_dir = tmp_path / "run"
    out = run_in(TESTS, *sets(*TINY, *CHANNELS, f"backbone.target={target}"), "--run_dir", str(run_dir))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("config error: backbone.pool:") and shape in lines[0]
    assert "mean_tokens" in lines[0] and "mean_time" in lines[0] and "cls" in lines[0]
    assert not run_dir.exists()


@pytest.mark.parametrize("layout,shape", [("ft1", "(2, 16, 32, 1)"), ("f1t", "(2, 16, 1, 32)")])
def test_c3_a_4d_braindecode_style_output_is_offered_only_the_pools_that_work_and_mean_time_takes_its_time_axis(
        tmp_path, capsys, layout, shape):
    """[B, F, T, 1] (ShallowFBCSPNet, Deep4Net) and [B, F, 1, T] (EEGNet): the pool-null error offers mean_time
    and flatten only (mean_tokens and cls do not apply to them), and mean_time averages the time axis."""
    zoo_model = ["backbone.target=zoo:conv_map", f"backbone.kwargs={{channels: 4, layout: {layout}}}"]
    code, lines = main_exit(capsys, *TINY, *zoo_model, run_dir=tmp_path / "run")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("config error: backbone.pool:") and shape in lines[0]
    assert "mean_time" in lines[0] and "flatten" in lines[0] and "mean_tokens" not in lines[0] and "cls" not in lines[0]
    cfg = tp.resolve_config(None, TINY + zoo_model + ["backbone.pool=mean_time"])[0]
    backbone = tp.build_backbone(cfg, 4)
    x = torch.randn(3, 4, 128)
    with torch.no_grad():
        want = backbone.net(x).mean(2)  # the [B, F, T] map before the singleton axis, averaged over T
    assert torch.allclose(tp.extract_features(backbone, x, torch.device("cpu"), cfg), want)
    assert not (tmp_path / "run").exists()


def test_c3_a_backbone_that_raises_inside_its_own_forward_says_the_error_came_from_the_models_forward(tmp_path, capsys):
    code, lines = main_exit(capsys, *TINY, "backbone.target=zoo:replaced_head", "backbone.kwargs={channels: 4}",
                            run_dir=tmp_path / "run")
    assert code == 2 and len(lines) == 1, lines
    assert "the error came from the model's own forward (ReplacedHead.forward (zoo.py:" in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------
# Bad backbone input: one line, exit 2, nothing written (every split goes through the backbone first)
def save_splits(tmp_path, channels=(4, 4), label_shape=None, lengths=(128, 128)):
    import numpy as np
    rng = np.random.default_rng(0)
    for split, n, c, t in (("train", 12, channels[0], lengths[0]), ("val", 8, channels[1], lengths[1])):
        np.save(tmp_path / f"{split}_x.npy", rng.standard_normal((n, c, t)).astype(np.float32))
        y = (np.arange(n) % 2).astype(np.int64)
        np.save(tmp_path / f"{split}_y.npy", y.reshape(label_shape(n)) if label_shape else y)
    return [f"data.{s}_{k}={tmp_path}/{s}_{k}.npy" for s in ("train", "val") for k in ("x", "y")]


def test_c3_backbone_kwargs_the_callable_rejects_exit_2(tmp_path, capsys):
    code, lines = main_exit(capsys, *TINY, "backbone.target=zoo:eegnet", "backbone.kwargs={channels: 4, widht: 8}",
                            run_dir=tmp_path / "run")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("config error: backbone.kwargs:")
    assert "widht" in lines[0] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("data", ["synthetic", "files"])
def test_c3_a_backbone_built_for_other_channels_fails_on_the_first_batch_exit_2(tmp_path, capsys, data):
    """The line names the batch's source: the data.train_x file, or synthetic data (data.train_x is null then,
    and naming it would send the user to a key they never set)."""
    files = save_splits(tmp_path) if data == "files" else []
    code, lines = main_exit(capsys, *TINY, *files, "backbone.target=zoo:conv_time", "backbone.kwargs={channels: 19}",
                            "backbone.pool=mean_time", run_dir=tmp_path / "run")
    assert code == 2 and len(lines) == 1, lines
    batch = "a data.train_x batch" if data == "files" else "a synthetic train batch"
    assert lines[0].startswith("config error: backbone.target:") and f"{batch} of shape (2, 4, 128)" in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_c3_splits_with_different_channels_exit_2(tmp_path, capsys):
    code, lines = main_exit(capsys, *TINY, *save_splits(tmp_path, channels=(4, 3)), run_dir=tmp_path / "run")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("config error: data.val_x:")
    assert "3 channels" in lines[0] and "has 4" in lines[0] and not (tmp_path / "run").exists()


def test_c3_val_windows_of_another_length_exit_2_before_the_backbone_runs(tmp_path, capsys):
    # val windows half as long: flattened, their features were half the size the head is built for (a backbone.pool
    # error after every split went through the backbone); mean-pooled, they trained. Both are data_sets()'s line now.
    code, lines = main_exit(capsys, *TINY, *save_splits(tmp_path, lengths=(128, 64)), "backbone.target=zoo:conv_time",
                            "backbone.kwargs={channels: 4}", "backbone.pool=flatten", run_dir=tmp_path / "run")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("config error: data.val_x:"), lines
    assert "4 channels x 64 samples, data.train_x has 4 x 128" in lines[0] and not (tmp_path / "run").exists()


def test_c3_labels_shaped_n_by_1_exit_2(tmp_path, capsys):
    code, lines = main_exit(capsys, *TINY, *save_splits(tmp_path, label_shape=lambda n: (n, 1)), run_dir=tmp_path / "run")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("config error: data.train_y:")
    assert "(12, 1)" in lines[0] and "reshape(-1)" in lines[0] and not (tmp_path / "run").exists()


def perturbed_eegnet_state():
    cfg = zoo_config("eegnet")
    net = tp.build_backbone(cfg, 4)
    with torch.no_grad():
        for t in net.state_dict().values():
            t.add_(0.5) if t.is_floating_point() else t.add_(3)  # running stats and counters too
    return cfg, net.state_dict()


@pytest.mark.parametrize("wrap", ["plain", "lightning_model", "lightning_backbone_and_head", "ddp_module"])
def test_backbone_checkpoint_in_lightning_or_ddp_form_is_loaded(tmp_path, wrap):
    cfg, state = perturbed_eegnet_state()
    files = {"plain": state,
             "lightning_model": {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3},
             "lightning_backbone_and_head": {"state_dict": {**{f"backbone.{k}": v for k, v in state.items()},
                                                            "head.weight": torch.zeros(2, 32)}, "global_step": 9},
             "ddp_module": {f"module.{k}": v for k, v in state.items()}}
    torch.save(files[wrap], tmp_path / "backbone.ckpt")
    net = tp.build_backbone(dict(cfg, **{"backbone.checkpoint": str(tmp_path / "backbone.ckpt")}), 4)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_r11_train_log_names_the_backbone_checkpoint_and_how_many_tensors_it_loaded(tmp_path):
    # train.log said "N parameters" and never which weights: a run that silently fell back to the seeded init
    # looked the same as one on the pretrained file. A Lightning file (BatchNorm buffers and a head beside the
    # backbone): every one of the backbone's tensors, parameters and buffers, comes from it.
    cfg, state = perturbed_eegnet_state()
    path = tmp_path / "pretrained.ckpt"
    lightning = {**{f"backbone.{k}": v for k, v in state.items()}, "head.weight": torch.zeros(2, 32)}
    torch.save({"state_dict": lightning}, path)
    for checkpoint, want in ((path, f"{len(state)} tensors loaded from {path}"), (None, "seeded init (seed 0)")):
        run_dir = tmp_path / f"run_{checkpoint is None}"
        extra = [f"backbone.checkpoint={checkpoint}"] if checkpoint else []
        outcome, _ = tp.train(zoo_config("eegnet", "train.epochs=1", *extra), str(run_dir), "none", quiet=True)
        assert outcome == "finished"
        lines = [line for line in (run_dir / "train.log").read_text().splitlines() if " backbone: " in line]
        assert len(lines) == 1 and want in lines[0], lines


@pytest.mark.parametrize("content,row,words", [
    ("pickled", "backbone.checkpoint", ["weights_only=True", "argparse.Namespace", "weights_only=False", "torch.save"]),
    ("other_model", "backbone.checkpoint", ["does not fit the backbone", "missing"]),
    ("shape", "backbone.checkpoint", ["size mismatch"]),
    ("garbage", "backbone.checkpoint", ["not a readable torch checkpoint"]),
], ids=["refused_by_weights_only", "other_names", "other_shapes", "not_a_checkpoint"])
def test_c3_bad_backbone_checkpoint_exits_2_saying_what_was_found(tmp_path, capsys, content, row, words):
    _, state = perturbed_eegnet_state()
    path = tmp_path / "backbone.ckpt"
    if content == "pickled":  # a Lightning checkpoint whose hyper_parameters hold an argparse.Namespace
        torch.save({"state_dict": state, "hyper_parameters": argparse.Namespace(lr=1e-3)}, path)
    elif content == "other_model":
        torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    elif content == "shape":
        torch.save({k: torch.cat([v, v]) if v.ndim else v for k, v in state.items()}, path)
    else:
        path.write_bytes(b"not a checkpoint")
    code, lines = main_exit(capsys, *TINY, *CHANNELS, *ZOO["eegnet"], f"backbone.checkpoint={path}",
                            run_dir=tmp_path / "run")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"config error: {row}:") and all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "run").exists()


def test_c3_backbone_target_imports_from_the_working_directory_when_the_script_is_copied_into_a_subfolder(tmp_path):
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "train_probe.py"), project / "scripts" / "train_probe.py")
    shutil.copy(os.path.join(ROOT, "probe_backbones.py"), project / "scripts")  # a user's backbone: its companion
    shutil.copy(os.path.join(TESTS, "zoo.py"), project / "mymodels.py")
    out = run_in(project, *sets(*TINY, *CHANNELS, "backbone.target=mymodels:eegnet", "train.epochs=1"),
                 "--run_dir", "runs/eegnet", script="scripts/train_probe.py")
    assert out.returncode == 0, out.stderr
    assert ckpt(str(project / "runs" / "eegnet"))["finished"]


# ---------------------------------------------------------------------------------------------------------
# The feature cache on disk; a finished run is complete before anything is built
def test_feature_cache_is_kept_in_the_run_dir_and_a_resume_does_not_recompute_it(tmp_path, monkeypatch):
    cfg = zoo_config("eegnet", "backbone.cache_features=true", "train.save_every_steps=2")
    run_dir = tmp_path / "run"
    assert tp.train(cfg, str(run_dir), "none", stop_after=5, quiet=True)[0] == "stopped"
    cached = sorted(os.listdir(run_dir / "features"))
    assert [name.split("-")[:2] for name in cached] == [["train", "38"], ["val", "24"]]
    log = (run_dir / "train.log").read_text()
    assert "features: computing 38 train windows" in log and "features: 38 train windows in" in log  # progress
    computed = []
    real = tp.compute_features
    monkeypatch.setattr(tp, "compute_features", lambda *a: computed.append(a[2].split) or real(*a))
    outcome, run = tp.train(cfg, str(run_dir), "auto", quiet=True)
    assert outcome == "finished" and computed == []
    assert "train windows loaded from" in (run_dir / "train.log").read_text()
    # what the key depends on: the backbone's tensors, the data, how the features are pooled
    inputs, cpu = run["inputs"], torch.device("cpu")

    def key(cfg=cfg, **changed):
        return tp.feature_cache_key(cfg, {**inputs, **changed}, "train", 38, cpu, None)

    assert key() == key() and key() != key(**{"backbone digest": "other"})
    assert key() != key(dict(cfg, seed=1)) and key() != key(**{"backbone.pool": "flatten"})
    assert key() != key(**{"backbone.kwargs": {"channels": 4, "f1": 8}})


def test_r11_feature_cache_key_follows_the_data_file(tmp_path):
    """Content, not names: a touch (another mtime, the same bytes) keeps the key; one flipped byte of the last
    window with the mtime put back changes it."""
    cfg = tp.resolve_config(None, TINY + save_splits(tmp_path))[0]
    inputs, cpu = tp.config_inputs(cfg), torch.device("cpu")
    key = tp.feature_cache_key(cfg, inputs, "train", 12, cpu, None)
    os.utime(tmp_path / "train_x.npy", ns=(1, 1))
    assert key == tp.feature_cache_key(cfg, inputs, "train", 12, cpu, None)
    with open(tmp_path / "train_x.npy", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    os.utime(tmp_path / "train_x.npy", ns=(1, 1))
    assert key != tp.feature_cache_key(cfg, inputs, "train", 12, cpu, None)


def test_a_finished_run_says_complete_before_building_the_backbone(tmp_path, monkeypatch):
    cfg = zoo_config("eegnet")
    assert tp.train(cfg, str(tmp_path / "run"), "none", quiet=True)[0] == "finished"

    def no_building(*args):
        raise AssertionError("the backbone was built for a finished run")

    monkeypatch.setattr(tp, "build_backbone", no_building)
    assert tp.train(cfg, str(tmp_path / "run"), "auto", quiet=True)[0] == "complete"
    assert "run already complete at step 12" in (tmp_path / "run" / "train.log").read_text()

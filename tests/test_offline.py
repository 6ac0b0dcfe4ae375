"""Offline distillation (kd.teacher_cache): the teacher's top-k cached once, the student trained with no
teacher in memory. The same tiny token files, teacher and loop as tests/test_distill.py."""
import hashlib
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from test_distill import LOOP, MODELS, ROOT, ckpt, data, kd_settings, run, teacher  # noqa: F401 (fixtures)
import train_distill as T
from run_records import run_together, teacher_run

# Builds and runs compared byte for byte across processes run at one intra-op thread, as every process of the suite
# (conftest.py, R4); what is compared byte for byte with a process's output comes from a process too
# (killed_build_beside_its_reference).
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("KIT_FAULT_KILL_AT", "KIT_FAULT_CACHE_KILL_AT")}


def cache_code():
    """teacher_cache.py as train_distill.py loads it beside itself (the offline cache's code is that companion's)."""
    return T.companion("teacher_cache", "kd.teacher_cache")


def offline(data, teacher, cache, *extra):
    return kd_settings(data, teacher, "kd.gamma=0", f"kd.teacher_cache={cache}", *extra)


def file_hashes(directory):
    return {name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(directory))}


def build(settings):
    cfg, _ = T.resolve_config(None, settings)
    outcome, got = T.train(cfg, "unused", "none", quiet=True, cache_only=True)
    assert outcome == "cached" and got["teacher_cache"]["manifest"]["complete"]
    return cfg, got["teacher_cache"]


def killed_build_beside_its_reference(settings, reference, cwd):
    """--cache_teacher of `settings` SIGKILLed inside its 3rd chunk and, at the same time (run_together: two
    processes of one thread each), the reference a killed and resumed build must equal byte for byte: the same
    command with the `reference` cache path, never killed. Returns the killed build's CompletedProcess."""
    killed, done = run_together(
        (command(settings, "--cache_teacher"), {"env": {**CLEAN_ENV, "KIT_FAULT_CACHE_KILL_AT": "3"}, "cwd": cwd}),
        (command(reference, "--cache_teacher"), {"env": CLEAN_ENV, "cwd": cwd}))
    assert done.returncode == 0, done.stderr
    assert killed.returncode == -9, killed.stderr
    return killed


def command(settings, *flags, run_dir=None):
    argv = [sys.executable, os.path.join(ROOT, "train_distill.py"), *flags]
    argv += ["--run_dir", str(run_dir)] if run_dir else []
    return argv + [a for item in settings for a in ("--set", item)]


@pytest.fixture(scope="module")
def cache(data, teacher, tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "teacher_cache"
    build(offline(data, teacher, path))
    return str(path)


# ----------------------------------------------------------------------------- the loss: the same function, the same numbers
def test_offline_topk_loss_and_gradients_are_bit_identical_to_online_given_the_same_teacher_numbers(tmp_path):
    """kd_kl(top_k) is kd_kl_topk(teacher_topk(...)); the cache stores teacher_topk's numbers (fp32, ids as
    uint16) and gives them back bit for bit, so the offline loss and its gradient equal the online ones."""
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(4, 16, 40, generator=gen) * 3
    s_on = (torch.randn(4, 16, 40, generator=gen) * 3).requires_grad_(True)
    s_off = s_on.detach().clone().requires_grad_(True)
    online = T.kd_kl(s_on, t, 2.0, 8)
    top, index, rest = T.teacher_topk(t, 2.0, 8)
    stored = {"values": top.numpy(), "index": index.numpy().astype(np.uint16), "rest": rest.numpy()}
    for name, array in stored.items():
        np.memmap(tmp_path / name, dtype=array.dtype, mode="w+", shape=array.shape)[:] = array
    read = {name: np.memmap(tmp_path / name, dtype=a.dtype, mode="r", shape=a.shape) for name, a in stored.items()}
    cached = (torch.from_numpy(read["values"][np.arange(4)]).float(), torch.from_numpy(read["index"][np.arange(4)]).long(),
              torch.from_numpy(read["rest"][np.arange(4)]).float())
    off = T.kd_kl_topk(s_off, *cached, 2.0)
    assert torch.equal(online, off)
    (g_on,), (g_off,) = torch.autograd.grad(online.sum(), s_on), torch.autograd.grad(off.sum(), s_off)
    assert torch.equal(g_on, g_off) and float(g_on.abs().max()) > 0


def test_offline_task_loss_and_gradients_are_bit_identical_to_online_topk(data, teacher, cache):
    """Through the real task: micro-batch = windows 0..7, the cache's first chunk (train.eval_batch_size 8),
    so the teacher's forward is the same batch both ways and the whole loss and every gradient are equal."""
    cfg_on, _ = T.resolve_config(None, kd_settings(data, teacher, "kd.gamma=0"))
    cfg_off, _ = T.resolve_config(None, offline(data, teacher, cache))
    windows = T.TokenWindows(cfg_on, "train")
    frozen = T.build_teacher(cfg_on, torch.device("cpu"))
    cpu = {"device": torch.device("cpu")}
    online = T.make_task({"cfg": cfg_on, "dist": cpu, "train_set": windows, "teacher": frozen})
    got = cache_code().prepare_teacher_cache(cfg_off, {"main": True, "world": 1, "rank": 0, **cpu}, windows,
                                  T.TokenWindows(cfg_off, "val"), T.eval_windows(cfg_off, T.window_count(cfg_off, "val")), print)
    off = T.make_task({"cfg": cfg_off, "dist": cpu, "train_set": windows, "teacher": None, "teacher_cache": got})
    idx = np.arange(8)
    batch_on, batch_off = next(online["batches"]([idx])), next(off["batches"]([idx]))
    assert len(batch_on) == 2 and len(batch_off) == 5  # offline batches carry (log_p_top, index, log_rest)
    grads, losses = [], []
    for task, batch in ((online, batch_on), (off, batch_off)):
        module = T.build_trainable(cfg_off, None)
        total, parts = task["loss"](module, batch)
        total.backward()
        losses.append({k: v.detach() for k, v in parts.items()})
        grads.append([p.grad for p in module.lm.parameters()])
    assert set(losses[0]) == set(losses[1]) == {"ce", "kd"} and float(losses[0]["kd"]) > 0
    assert all(torch.equal(losses[0][k], losses[1][k]) for k in losses[0])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


# ----------------------------------------------------------------------------- training from the cache
def test_offline_training_loads_no_teacher(data, teacher, cache, tmp_path, monkeypatch):
    """With a complete cache no teacher is built, loaded or even named: build_teacher and the checkpoint
    loader fail if called, and the config names no teacher at all."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("a teacher was loaded in an offline run")
    monkeypatch.setattr(T, "build_teacher", refuse)
    monkeypatch.setattr(T, "load_teacher_checkpoint", refuse)
    monkeypatch.setattr(T.hf_models("kd.hf_teacher_dir"), "load_hf_teacher", refuse)  # hf_models.py's loader
    cfg, outcome, state = run(offline(data, teacher, cache, "kd.teacher_checkpoint=null"), tmp_path / "run")
    assert outcome == "finished" and state["teacher"] is None
    assert all(k.startswith("lm.") for k in state["module"].state_dict())  # no projection, no teacher tensors
    params = {id(p) for p in state["module"].parameters()}
    assert params == {id(p) for g in state["optimizer"].param_groups for p in g["params"]}
    trains, evals, _ = T.read_metrics(str(tmp_path / "run"))
    assert all(r["loss/kd"] > 0 for r in trains.values()) and all("val/agreement" in e for e in evals.values())


def test_offline_run_matches_online_topk_to_float32_roundoff_and_val_agreement_is_the_cached_top1(
        data, teacher, cache, tmp_path):
    """End to end (8 steps, fp32): the run from the cache and the online top-k run from the same teacher end
    with the same weights up to float32 round-off (the teacher's batched forward may round differently);
    val/agreement is the student's top-1 against the cached teacher top-1 (index[..., 0])."""
    _, out_on, run_on = run(kd_settings(data, teacher, "kd.gamma=0"), tmp_path / "online")
    cfg, out_off, run_off = run(offline(data, teacher, cache), tmp_path / "offline")
    assert out_on == out_off == "finished"
    on, off = ckpt(tmp_path / "online")["model"], ckpt(tmp_path / "offline")["model"]
    diff = max(float((on[k] - off[k]).abs().max()) for k in off)
    assert diff <= 1e-5, diff
    moved = T.build_trainable(cfg, None).state_dict()
    assert max(float((moved[k] - off[k]).abs().max()) for k in off) > 1e-3  # the runs did train
    e_on, e_off = T.read_metrics(str(tmp_path / "online"))[1], T.read_metrics(str(tmp_path / "offline"))[1]
    assert sorted(e_on) == sorted(e_off) and all(abs(e_on[s]["val/loss"] - e_off[s]["val/loss"]) < 1e-4 for s in e_on)
    # val/agreement recomputed from the checkpoint and the cache's val top-1
    module = T.build_trainable(cfg, None)
    module.load_state_dict(off)
    module.eval()
    val, rows = run_off["val_set"], np.arange(len(run_off["val_windows"]))
    x, y = val[run_off["val_windows"]]
    with torch.no_grad():
        logits, _ = module(x)
    top1 = run_off["teacher_cache"]["val"].teacher(rows)[1][..., 0]
    real = y != T.IGNORE
    want = int(((logits.argmax(-1) == top1) & real).sum()) / int(real.sum())
    assert abs(e_off[max(e_off)]["val/agreement"] - want) < 1e-12
    with torch.no_grad():  # the cached top-1 is the teacher's argmax
        assert torch.equal(top1, run_on["teacher"](x)[0].argmax(-1))


def test_r4_offline_resume_is_bit_exact_after_sigkill(data, teacher, cache, tmp_path):
    settings = offline(data, teacher, cache)
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    clean, killed = run_together((command(settings, run_dir=uninterrupted), {"env": CLEAN_ENV}),
                                 (command(settings, run_dir=interrupted), {"env": {**CLEAN_ENV, "KIT_FAULT_KILL_AT": "5:1"}}))
    assert clean.returncode == 0, clean.stderr
    assert killed.returncode == -9, killed.stderr
    assert ckpt(interrupted)["global_step"] == 4
    resumed = subprocess.run(command(settings, run_dir=interrupted), env=CLEAN_ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert T.checkpoint_tensors_equal(os.path.join(uninterrupted, "checkpoints", "last.pt"),
                                      os.path.join(interrupted, "checkpoints", "last.pt"))
    a, b = T.read_metrics(str(uninterrupted))[0], T.read_metrics(str(interrupted))[0]
    assert sorted(a) == sorted(b) == list(range(1, 9)) and all(a[s]["loss"] == b[s]["loss"] for s in a)


# ----------------------------------------------------------------------------- the build
def test_cache_build_killed_mid_chunk_resumes_to_the_same_bytes(data, teacher, tmp_path):
    """--cache_teacher SIGKILLed inside its 3rd chunk (its values written, ids/rest/done byte not), then the
    same command again: every file, manifest included, equals the uninterrupted build's, byte for byte."""
    settings = offline(data, teacher, tmp_path / "c")
    killed_build_beside_its_reference(settings, offline(data, teacher, tmp_path / "ref"), tmp_path)
    manifest = json.load(open(tmp_path / "c" / "manifest.json"))
    assert not manifest["complete"] and np.fromfile(tmp_path / "c" / "train.done", np.uint8).tolist() == [1, 1, 0]
    assert not (tmp_path / "runs").exists()  # the build alone makes no run dir
    resumed = subprocess.run(command(settings, "--cache_teacher"), env=CLEAN_ENV, capture_output=True, text=True,
                             cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    chunks = sum(-(-n // manifest["chunk"]) for n in manifest["windows"].values())
    assert "continuing" in resumed.stdout and f"{chunks - 2}/{chunks - 2} chunks" in resumed.stdout  # only what was left
    assert file_hashes(tmp_path / "c") == file_hashes(tmp_path / "ref")


def test_cache_holds_teacher_topk_of_every_train_and_eval_window(data, teacher, cache):
    cfg, _ = T.resolve_config(None, offline(data, teacher, cache))
    frozen = T.build_teacher(cfg, torch.device("cpu"))
    manifest = cache_code().read_manifest(cache)
    train, val = T.TokenWindows(cfg, "train"), T.TokenWindows(cfg, "val")
    ids = T.eval_windows(cfg, len(val))
    assert manifest["windows"] == {"train": len(train), "val": len(ids)} and manifest["complete"]
    assert manifest["teacher"]["tensor_digest"] == T.tensor_digest(frozen)
    for split, windows, rows in (("train", train, np.arange(len(train))), ("val", val, ids)):
        reader = cache_code().TeacherCacheWindows(windows, cache, manifest, split)
        with torch.no_grad():
            want = T.teacher_topk(frozen(windows[rows][0])[0], 2.0, 8)
        got = reader.teacher(np.arange(len(rows)))
        for a, b in zip(got, want):
            assert torch.allclose(a, b.to(a.dtype), rtol=1e-6, atol=1e-6), split


def test_a_cache_reader_pickles_as_a_spawned_dataloader_worker_gets_it(data, teacher, cache):
    """Its class lives in teacher_cache.py, loaded by path (never importable by name): a pickled reader is rebuilt
    through the script's cache_reader, its arrays unopened (the worker maps them itself), the same numbers."""
    cfg, _ = T.resolve_config(None, offline(data, teacher, cache))
    reader = cache_code().TeacherCacheWindows(T.TokenWindows(cfg, "train"), cache, cache_code().read_manifest(cache),
                                              "train")
    want = reader.teacher(np.arange(3))
    copy = pickle.loads(pickle.dumps(reader))
    assert type(copy) is type(reader) and copy.arrays is None and reader.arrays is not None
    assert all(torch.equal(a, b) for a, b in zip(copy.teacher(np.arange(3)), want))


def test_fp16_cache_is_half_the_value_bytes_and_close(data, teacher, cache, tmp_path):
    _, half = build(offline(data, teacher, tmp_path / "c16", "kd.teacher_cache_dtype=fp16"))
    full = cache_code().read_manifest(cache)
    assert half["manifest"]["value_dtype"] == "float16"
    assert os.path.getsize(tmp_path / "c16" / "train.values") * 2 == os.path.getsize(os.path.join(cache, "train.values"))
    a = half["train"].teacher(np.arange(4))
    b = cache_code().TeacherCacheWindows(half["train"].windows, cache, full, "train").teacher(np.arange(4))
    assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], rtol=2e-3, atol=2e-3)


# ----------------------------------------------------------------------------- refusals (C3)
def other_teacher(data, tmp_path):
    cfg, _ = T.resolve_config(None, teacher_run(data + MODELS + LOOP) + ["train.epochs=1", "seed=1"])
    assert T.train(cfg, str(tmp_path / "t2"), "none", quiet=True)[0] == "finished"
    return str(tmp_path / "t2" / "checkpoints" / "best.pt")


MISMATCH = [(["kd.top_k=4"], "kd.top_k"), (["kd.temperature=3"], "kd.temperature"), (["data.seq_len=8"], "data.seq_len"),
            (["data.limit=12"], "data.limit"), (["data.val_windows=3"], "data.val_windows"),
            (["kd.teacher_cache_dtype=fp16"], "kd.teacher_cache_dtype"), (["train.precision=bf16"], "train.precision"),
            ("OTHER_TEACHER", "kd.teacher_checkpoint"), ("OTHER_DATA", "data.train_bin")]


@pytest.mark.parametrize("change,key", MISMATCH, ids=[m[1] for m in MISMATCH])
def test_c3_cache_built_for_another_run_is_refused_naming_the_field(change, key, data, teacher, cache, tmp_path, capsys):
    before = file_hashes(cache)
    settings = offline(data, teacher, cache)
    if change == "OTHER_TEACHER":
        settings = offline(data, other_teacher(data, tmp_path), cache)
    elif change == "OTHER_DATA":
        other = tmp_path / "train.bin"
        np.fromfile(data[0].split("=", 1)[1], np.uint16)[::-1].copy().tofile(other)  # same size, other tokens
        settings = offline([f"data.train_bin={other}"] + data[1:], teacher, cache)
    else:
        settings = settings + change
    argv = ["--run_dir", str(tmp_path / "run")] + [a for item in settings for a in ("--set", item)]
    assert T.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: {key}:") and "teacher cache" in lines[0], lines
    assert not (tmp_path / "run").exists() and file_hashes(cache) == before


OFFLINE_BAD = [(["kd.gamma=0.2"], "kd.gamma"), (["kd.top_k=null"], "kd.top_k"),
               (["kd.teacher_checkpoint=null"], "kd.teacher_checkpoint")]  # the cache below is absent: nothing to build from


@pytest.mark.parametrize("bad,key", OFFLINE_BAD, ids=[b[1] for b in OFFLINE_BAD])
def test_c3_offline_config_errors(bad, key, data, teacher, tmp_path, capsys):
    argv = ["--run_dir", str(tmp_path / "run")]
    for item in offline(data, teacher, tmp_path / "absent_cache") + bad:
        argv += ["--set", item]
    assert T.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: {key}:"), lines
    assert not (tmp_path / "run").exists() and not (tmp_path / "absent_cache").exists()


def test_c3_cache_teacher_flag_needs_a_cache_path(data, teacher, tmp_path, capsys):
    argv = ["--cache_teacher", "--run_dir", str(tmp_path / "run")]
    for item in kd_settings(data, teacher):
        argv += ["--set", item]
    assert T.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--cache_teacher" in lines[0] and "kd.teacher_cache" in lines[0]


def test_cache_size_is_stated_before_the_build(data, teacher):
    cfg, _ = T.resolve_config(None, offline(data, teacher, "/nonexistent/c"))
    size, how = cache_code().teacher_cache_size(cfg)
    train, val = T.train_set_size(cfg), len(T.eval_windows(cfg, T.window_count(cfg, "val")))
    assert size == (train + val) * 16 * (8 * (4 + 2) + 4) and f"{(train + val) * 16:,} positions" in how


def test_e6_diagnose_states_the_cache_size_and_warns_when_the_disk_is_too_small(data, teacher, tmp_path, monkeypatch):
    import contextlib
    import io

    import diagnose_and_fix as dx
    config = tmp_path / "offline.yaml"
    import yaml
    cfg, _ = T.resolve_config(None, offline(data, teacher, tmp_path / "c"))
    config.write_text(yaml.safe_dump(T.unflatten({k: cfg[k] for k in cfg if k.startswith(("kd.", "data.", "teacher.", "student.", "task"))})))

    def diagnose():
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            dx.main(["--config", str(config), "--json"])
        report = json.loads(out.getvalue())
        return [f for f in report["findings"] if f["id"] == "E6" and "kd.teacher_cache" in f["evidence"]]

    size, how = cache_code().teacher_cache_size(cfg)
    found = diagnose()
    assert len(found) == 1 and found[0]["severity"] == "info" and how in found[0]["evidence"]
    monkeypatch.setattr(cache_code(), "free_disk_bytes", lambda path: size - 1)
    found = diagnose()
    assert len(found) == 1 and found[0]["severity"] == "warning" and "more than is free" in found[0]["evidence"]
    assert not (tmp_path / "c").exists()


def build_in_one_and_two_processes(one, two, cwd):
    """--cache_teacher with settings `one` in one process and `two` in two under torchrun, at the same thread
    count; both must exit 0."""
    env = CLEAN_ENV
    done = subprocess.run(command(one, "--cache_teacher"), env=env, capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stderr
    argv = command(two, "--cache_teacher")
    done = subprocess.run([argv[0], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *argv[1:]],
                          env=env, capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr


def test_torchrun_processes_write_their_shares_into_the_same_files(data, teacher, tmp_path):
    """Two processes under torchrun build the cache (disjoint ranges of chunks each, process 0 the manifest):
    the same bytes as one process's build, at the same thread count."""
    build_in_one_and_two_processes(offline(data, teacher, tmp_path / "one"), offline(data, teacher, tmp_path / "two"),
                                   tmp_path)
    manifest = json.load(open(tmp_path / "two" / "manifest.json"))
    assert manifest["complete"] and file_hashes(tmp_path / "one") == file_hashes(tmp_path / "two")

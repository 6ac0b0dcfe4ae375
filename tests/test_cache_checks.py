"""Issue 21, the distillation side: nothing stale is used silently, and a green check means the run starts.

The teacher cache is keyed on content (token files rewritten in place, teacher weights that change behind an
unchanged config), one process builds it at a time, val/agreement has one tie rule online and offline, and
every refusal the run makes before its first step is made by --dry_run and diagnose_and_fix.py with the same
line. Tiny token files and teacher from tests/test_distill.py; user modules written into tmp_path.
"""
import contextlib
import fcntl
import io
import json
import os
import subprocess
import textwrap

import numpy as np
import pytest
import torch
import yaml

from test_distill import LOOP, MODELS, ROOT, VOCAB, data, kd_settings  # noqa: F401 (fixtures)
from test_offline import CLEAN_ENV, build, cache_code, command, file_hashes, offline
import diagnose_and_fix as dx
import train_distill as T
from run_records import launch, teacher_run

CPU = {"main": True, "world": 1, "rank": 0, "device": torch.device("cpu")}

# A user's module (teacher.target / student.target): token ids -> logits, weights from a kwargs file or from a
# file an environment variable names (a path no config key shows), an optional position table, and logits
# rounded to steps of `step` (ties, as bf16 makes them).
USER_LM = '''
import os
import torch
import torch.nn as nn

SCALE = 1.0


class LM(nn.Module):
    def __init__(self, vocab=40, width=16, weights=None, env=None, positions=None, step=None):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab)
        self.pos = nn.Embedding(positions, width) if positions else None
        self.step = step
        path = weights or (os.environ.get(env) if env else None)
        if path:
            self.load_state_dict(torch.load(path, weights_only=True))

    def forward(self, idx):
        h = self.embed(idx)
        if self.pos is not None:
            h = h + self.pos(torch.arange(idx.shape[1]))
        logits = self.head(h) * SCALE
        return logits if self.step is None else (logits / self.step).round() * self.step


def build(**kwargs):
    return LM(**kwargs)
'''


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    """A kd.teacher_checkpoint of the built-in GPT, as a kd.enabled=false run saves it, untrained: what the cache
    holds of it does not matter here, only that it is this teacher's."""
    cfg, _ = T.resolve_config(None, teacher_run(data + MODELS + LOOP))
    torch.manual_seed(0)
    lm = T.GPT(VOCAB, cfg["data.seq_len"], **T.trained_arch(cfg))
    path = tmp_path_factory.mktemp("teacher") / "best.pt"
    torch.save({"task": "distill", "config": cfg, "model": {f"lm.{k}": v for k, v in lm.state_dict().items()}}, path)
    return str(path)


def user_module(tmp_path, monkeypatch, name):
    """USER_LM as tmp_path/<name>.py, importable as '<name>:build' (a fresh name per test: no import cache)."""
    (tmp_path / f"{name}.py").write_text(USER_LM)
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:build"


def lm_weights(path, seed):
    """A state dict of USER_LM's shapes, drawn from `seed`, saved at path."""
    gen = torch.Generator().manual_seed(seed)
    torch.save({"embed.weight": torch.randn(VOCAB, 16, generator=gen), "head.weight": torch.randn(VOCAB, 16, generator=gen),
                "head.bias": torch.randn(VOCAB, generator=gen)}, path)
    return str(path)


def argv_of(settings, *flags):
    return [*flags] + [a for item in settings for a in ("--set", item)]


def run_main(settings, *flags):
    """train_distill.py's main in-process: (exit code, stdout, stderr lines)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = T.main(argv_of(settings, *flags))
    return code, out.getvalue(), err.getvalue().strip().splitlines()


def diagnose(settings, tmp_path):
    """diagnose_and_fix.py --config on these settings written as a YAML file: its findings."""
    config = tmp_path / "diagnosed.yaml"
    flat = {"task": "distill", **{key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in settings)}}
    config.write_text(yaml.safe_dump(T.unflatten(flat), sort_keys=False))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        dx.main(["--config", str(config), "--json"])
    return json.loads(out.getvalue())["findings"]


def offline_user(data, target, cache, *extra):
    return data + MODELS + LOOP + ["kd.enabled=true", f"teacher.target={target}", "kd.gamma=0", "kd.top_k=8",
                                   "kd.temperature=2", f"kd.teacher_cache={cache}", *extra]


def refused(settings, key, tmp_path, word="teacher cache"):
    code, _, lines = run_main(settings, "--run_dir", str(tmp_path / "run"))
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"config error: {key}:") and word in lines[0], lines
    assert not (tmp_path / "run").exists()
    return lines[0]


def refused_alike(settings, key, tmp_path, word):
    """R10: the run, --dry_run and diagnose_and_fix.py refuse these settings with the same one line naming `key`."""
    line = refused(settings, key, tmp_path, word)
    code, _, lines = run_main(settings, "--dry_run")
    assert code == 2 and lines == [line], (key, lines)
    found = [f for f in diagnose(settings, tmp_path) if f["severity"] == "critical"]
    assert any(f["evidence"] == line.removeprefix("config error: ") for f in found), (key, line, found)


# ----------------------------------------------------------------------------- R9: token files keyed on content
def test_r9_token_file_rewritten_in_place_is_refused(data, teacher, tmp_path):
    """The issue's case: after the cache is built, train.bin's tokens are reversed in place (same path, same
    size); the offline run refuses the cache with one line, before any run dir, and leaves it untouched."""
    train_bin = tmp_path / "train.bin"
    train_bin.write_bytes(open(data[0].split("=", 1)[1], "rb").read())
    mine = [f"data.train_bin={train_bin}"] + data[1:]
    cfg, _ = build(offline(mine, teacher, tmp_path / "cache"))
    before = file_hashes(tmp_path / "cache")
    tokens = np.memmap(train_bin, dtype=np.uint16, mode="r+")
    tokens[:] = tokens[::-1].copy()
    tokens.flush()
    del tokens
    line = refused(offline(mine, teacher, tmp_path / "cache"), "data.train_bin", tmp_path, "other train tokens")
    assert "sha256" in line and file_hashes(tmp_path / "cache") == before


def test_r9_token_file_copied_elsewhere_with_the_same_bytes_reuses_the_cache(data, teacher, tmp_path):
    """Content, not names: the same tokens at another path (new times: read whole again) use the same cache."""
    cfg, got = build(offline(data, teacher, tmp_path / "cache"))
    copy = tmp_path / "copy.bin"
    copy.write_bytes(open(data[0].split("=", 1)[1], "rb").read())
    code, out, err = run_main(offline([f"data.train_bin={copy}"] + data[1:], teacher, tmp_path / "cache"), "--cache_teacher")
    assert code == 0 and "is complete and matches this run" in out and not err, err


def test_r9_content_record_reads_a_file_whole_only_when_its_size_or_times_changed(tmp_path, monkeypatch):
    """The one content rule of both scripts: a file is read whole once per content; its record (CONTENT_CACHE)
    is used while size, mtime, ctime and sampled blocks hold. An in-place edit with the mtime put back is read."""
    monkeypatch.setattr(T, "CONTENT_CACHE", str(tmp_path / "records"))
    path = tmp_path / "t.bin"
    np.arange(1 << 20, dtype=np.uint16).tofile(path)  # 2 MiB: 16 sampled blocks of 64 KiB leave gaps
    first = T.content_record(str(path))
    [memo] = (tmp_path / "records").iterdir()
    memo.write_text(memo.read_text().replace(first["sha256"], "recorded"))
    assert T.content_record(str(path))["sha256"] == "recorded"  # not read again: the record is taken
    times = os.stat(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r+")
    tokens[50_000:50_010] = 7  # bytes 100,000-100,020: between the first two sampled blocks
    tokens.flush()
    del tokens
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    again = T.content_record(str(path))
    assert again["sha256"] not in (first["sha256"], "recorded")


def test_s7_c4_a_distillation_resumed_on_a_token_file_edited_in_place_with_its_mtime_put_back_is_refused(data, tmp_path):
    """The same content rule on resume (issue 31): a checkpoint records its token files' sha256, so a train.bin
    edited in place after the kill (mtime put back) is refused, where the run used to continue on it."""
    files = []
    for setting in data[:2]:
        key, path = setting.split("=", 1)
        (tmp_path / os.path.basename(path)).write_bytes(open(path, "rb").read())
        files.append(f"{key}={tmp_path / os.path.basename(path)}")
    settings = teacher_run(files + data[2:] + MODELS + LOOP)
    run_dir = str(tmp_path / "run")
    assert T.train(T.resolve_config(None, settings)[0], run_dir, "none", stop_after=2, quiet=True)[0] == "stopped"
    path = tmp_path / "train.bin"
    times = os.stat(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r+")
    tokens[100:110] = tokens[100:110][::-1].copy()
    tokens.flush()
    del tokens
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    code, _, lines = run_main(settings, "--run_dir", run_dir)
    assert code == 2 and len(lines) == 1 and "was trained on other data than this run reads" in lines[0], lines
    # its dry run refuses the same relaunch with the same line (it passed, then the launch refused)
    assert run_main(settings, "--run_dir", run_dir, "--dry_run")[::2] == (2, lines)


# ----------------------------------------------------------------------------- R9: the teacher actually loaded
def test_r9_teacher_target_whose_kwargs_weights_file_is_overwritten_is_refused(data, tmp_path, monkeypatch):
    target = user_module(tmp_path, monkeypatch, "lm_kwargs_file")
    weights = lm_weights(tmp_path / "w.pt", 0)
    settings = offline_user(data, target, tmp_path / "cache", f"teacher.kwargs={{weights: {weights}}}")
    build(settings)
    lm_weights(tmp_path / "w.pt", 1)
    refused(settings, "teacher.target", tmp_path, "kwargs.weights")


def test_r9_teacher_target_whose_weights_come_from_a_path_no_key_names_is_checked_by_loading_it(data, tmp_path, monkeypatch):
    """The callable reads its weights from a file an environment variable names: its code and kwargs are
    unchanged, so only the tensor digest of the teacher actually loaded can see the new weights."""
    target = user_module(tmp_path, monkeypatch, "lm_env_file")
    monkeypatch.setenv("H21_TEACHER_WEIGHTS", lm_weights(tmp_path / "w.pt", 0))
    settings = offline_user(data, target, tmp_path / "cache", "teacher.kwargs={env: H21_TEACHER_WEIGHTS}")
    build(settings)
    code, out, _ = run_main(settings, "--cache_teacher")
    assert code == 0 and "nothing to build" in out  # the same teacher, loaded and checked: accepted
    lm_weights(tmp_path / "w.pt", 1)
    line = refused(settings, "teacher.target", tmp_path, "loads tensors with digest")
    assert "seed" in line


def test_r9_seed_initialised_teacher_target_with_another_seed_is_refused(data, tmp_path, monkeypatch):
    target = user_module(tmp_path, monkeypatch, "lm_seeded")
    settings = offline_user(data, target, tmp_path / "cache")
    build(settings + ["seed=0"])
    refused(settings + ["seed=1"], "teacher.target", tmp_path, "loads tensors with digest")


def test_r9_checkpoint_holding_a_user_module_whose_code_changed_is_refused(data, tmp_path, monkeypatch):
    """kd.teacher_checkpoint whose saved network is a user module: its module's source is part of the teacher
    (a forward that changes gives other outputs from the same tensors)."""
    target = user_module(tmp_path, monkeypatch, "lm_in_checkpoint")
    cfg, _ = T.resolve_config(None, data + ["kd.enabled=false", f"student.target={target}"])  # trains student.*
    module = T.build_teacher({**cfg, "kd.enabled": True, "kd.gamma": 0.0, "teacher.target": target}, torch.device("cpu"))
    ckpt = tmp_path / "teacher.pt"
    torch.save({"task": "distill", "config": cfg, "model": {f"lm.{k}": v for k, v in module.state_dict().items()}}, ckpt)
    settings = offline(data, str(ckpt), tmp_path / "cache")
    build(settings)
    (tmp_path / "lm_in_checkpoint.py").write_text(USER_LM.replace("SCALE = 1.0", "SCALE = 2.0"))
    refused(settings, "kd.teacher_checkpoint", tmp_path, "module")


@pytest.mark.skipif(not T.transformers_installed(), reason="transformers is not installed")
def test_r9_hf_teacher_directory_whose_weights_changed_is_refused(data, tmp_path):
    import zoo
    hf = zoo.hf_gpt2(tmp_path / "hf", vocab=VOCAB)
    settings = data + MODELS + LOOP + ["kd.enabled=true", f"kd.hf_teacher_dir={hf}", "kd.gamma=0", "kd.top_k=8",
                                       f"kd.teacher_cache={tmp_path / 'cache'}"]
    build(settings)
    zoo.hf_gpt2(tmp_path / "hf", vocab=VOCAB, seed=1)  # the same directory, other weights
    refused(settings, "kd.hf_teacher_dir", tmp_path, "hf_dir/model.safetensors")


# ----------------------------------------------------------------------------- R9: one builder per cache
def test_r9_a_second_builder_waits_for_the_lock_naming_the_pid_then_builds_nothing(data, teacher, tmp_path):
    """The cache's lock is held (as by a build in progress, pid = this test's) over an incomplete cache: a
    --cache_teacher process says who holds it and waits; once the holder has completed the cache and let go,
    it finds the cache complete and writes nothing."""
    settings = offline(data, teacher, tmp_path / "cache")
    build(settings)
    manifest_path = tmp_path / "cache" / "manifest.json"
    complete = manifest_path.read_text()
    manifest_path.write_text(json.dumps(dict(json.loads(complete), complete=False)))
    with open(tmp_path / "cache" / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.seek(0)
        held.truncate()
        held.write(f"{os.getpid()}\n")
        held.flush()
        second = subprocess.Popen(command(settings, "--cache_teacher"), env=CLEAN_ENV, cwd=tmp_path, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        seen = []
        for line in second.stdout:  # blocks until the line comes (or the process ends without it)
            seen.append(line)
            if "being built by pid" in line:
                break
        assert seen and f"being built by pid {os.getpid()}" in seen[-1], seen
        before = file_hashes(tmp_path / "cache")
        manifest_path.write_text(complete)  # the holder finishes ...
        fcntl.flock(held, fcntl.LOCK_UN)  # ... and lets go
    out, err = second.communicate()
    assert second.returncode == 0, err
    assert "completed by another process" in out and "building" not in out and "continuing" not in out, out
    after = file_hashes(tmp_path / "cache")
    assert {k: v for k, v in after.items() if k not in (".lock", "manifest.json")} == \
        {k: v for k, v in before.items() if k not in (".lock", "manifest.json")}


def test_r9_cache_teacher_on_a_complete_cache_says_so(data, teacher, tmp_path):
    settings = offline(data, teacher, tmp_path / "cache")
    build(settings)
    code, out, err = run_main(settings, "--cache_teacher")
    assert code == 0 and not err and "is complete and matches this run" in out and "nothing to build" in out


# ----------------------------------------------------------------------------- E3: one tie rule for val/agreement
def test_e3_teacher_topk_puts_the_first_of_tied_tokens_first_as_argmax_does():
    """bf16-rounded logits tie often; torch.topk orders ties as it likes. index[..., 0] must be the token
    first_token (argmax: the lowest id among the maximal logits) picks, also when more than k tokens tie."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 16, VOCAB, generator=gen) * 0.5).bfloat16()
    logits[0, 0] = 0.0  # every token ties
    ties = (logits.float() == logits.float().max(-1, keepdim=True).values).sum(-1) > 1
    assert int(ties.sum()) >= 10
    for k in (1, 4, 8):
        values, index, _ = T.teacher_topk(logits, 2.0, k)
        assert torch.equal(index[..., 0], logits.float().argmax(-1)) and torch.equal(index[..., 0], T.first_token(logits))
        assert all(len(set(row.tolist())) == k for row in index.reshape(-1, k))  # still k distinct tokens
        assert bool((values[..., :-1] >= values[..., 1:]).all())
        full = torch.log_softmax(logits.float() / 2.0, -1)
        assert torch.equal(values, full.gather(-1, index))  # the values are those tokens' own log p


def test_e3_val_agreement_teacher_top1_is_the_same_online_and_offline_on_tied_logits(data, tmp_path, monkeypatch):
    """A teacher whose logits are rounded to steps (ties at the top): the teacher top-1 that evaluate() compares
    the student with is the same tensor online (the teacher's logits) and offline (the cache's index 0)."""
    target = user_module(tmp_path, monkeypatch, "lm_ties")
    settings = offline_user(data, target, tmp_path / "cache", "teacher.kwargs={step: 0.5}")
    cfg, cache = build(settings)
    online_cfg = {**cfg, "kd.teacher_cache": None}
    val = T.TokenWindows(cfg, "val")
    windows = T.eval_windows(cfg, len(val))
    frozen = T.build_teacher(online_cfg, torch.device("cpu"))
    with torch.no_grad():
        logits = frozen(val[windows][0])[0]
    assert int(((logits == logits.max(-1, keepdim=True).values).sum(-1) > 1).sum()) > 20  # many tied top-1s
    student = T.build_trainable(cfg, None)
    runs = [{"dist": CPU, "cfg": c, "val_set": val, "val_windows": windows, "module": student, "teacher": t, "sharded": None,
             "teacher_cache": k} for c, t, k in ((online_cfg, frozen, None), (cfg, None, cache))]
    metrics = [T.evaluate(r) for r in runs]
    assert runs[0]["teacher_top1"].keys() == runs[1]["teacher_top1"].keys()
    assert all(torch.equal(runs[0]["teacher_top1"][s], runs[1]["teacher_top1"][s]) for s in runs[0]["teacher_top1"])
    assert metrics[0]["val/agreement"] == metrics[1]["val/agreement"]


# ----------------------------------------------------------------------------- R10: the checks agree with the run
def deep_bad_token(data, tmp_path):
    """train.bin with 1.5M padding tokens appended and one id past the vocabulary deep inside them."""
    tokens = np.fromfile(data[0].split("=", 1)[1], np.uint16)
    tail = np.zeros(1_500_000, np.uint16)
    tail[1_234_567] = 64834
    path = tmp_path / "deep.bin"
    np.concatenate([tokens, tail]).tofile(path)
    return [f"data.train_bin={path}"] + data[1:], len(tokens) + 1_234_567


def test_r10_every_refusal_before_the_first_step_is_a_dry_run_and_a_diagnose_refusal_with_the_same_line(
        data, teacher, tmp_path, monkeypatch):
    """The run's refusals before its first step, each made by train_distill.py (exit 2, one line, no run dir),
    by its --dry_run (exit 2, the same line) and by diagnose_and_fix.py --config (a critical finding whose
    evidence is that line): a cache built with another kd.top_k, a cache of rewritten tokens, a teacher
    changed behind its cache, an absent cache with no teacher, a token id past the vocabulary deep in a file,
    a teacher's position table shorter than data.seq_len, a student of another vocabulary, a device."""
    build(offline(data, teacher, tmp_path / "cache"))
    rewritten = tmp_path / "rewritten.bin"
    rewritten.write_bytes(open(data[0].split("=", 1)[1], "rb").read())
    rewritten_data = [f"data.train_bin={rewritten}"] + data[1:]
    build(offline(rewritten_data, teacher, tmp_path / "cache_r"))
    np.fromfile(rewritten, np.uint16)[::-1].copy().tofile(rewritten)
    target = user_module(tmp_path, monkeypatch, "lm_walk")
    build(offline_user(data, target, tmp_path / "cache_u", "seed=0"))
    deep, offset = deep_bad_token(data, tmp_path)
    cases = [
        (offline(data, teacher, tmp_path / "cache", "kd.top_k=4"), "kd.top_k", "built with kd.top_k 8"),
        (offline(rewritten_data, teacher, tmp_path / "cache_r"), "data.train_bin", "other train tokens"),
        (offline_user(data, target, tmp_path / "cache_u", "seed=1"), "teacher.target", "loads tensors"),
        (offline(data, teacher, tmp_path / "absent", "kd.teacher_checkpoint=null"), "kd.teacher_checkpoint", "absent"),
        (kd_settings(deep, teacher), "data.train_bin", f"at token {offset:,}"),
        (data + MODELS + LOOP + ["kd.enabled=true", f"teacher.target={target}", "teacher.kwargs={positions: 20}",
                                 "data.seq_len=32"], "teacher.target", "data.seq_len=32"),
        (kd_settings(data, teacher, f"student.target={target}", "student.kwargs={vocab: 30}"), "student.target",
         "data.vocab_size 40"),
        (kd_settings(data, teacher, "train.device=cuda"), "train.device", "cuda"),
    ]
    for settings, key, word in cases:
        refused_alike(settings, key, tmp_path, word)
        assert not any("already built" in f["evidence"] for f in diagnose(settings, tmp_path) if "E6" == f["id"])


def test_r10_a_token_id_past_the_vocabulary_deep_in_a_file_stops_before_the_run_dir_naming_the_offset(
        data, teacher, tmp_path):
    deep, offset = deep_bad_token(data, tmp_path)
    line = refused(kd_settings(deep, teacher), "data.train_bin", tmp_path, "token id 64834 >= data.vocab_size 40")
    assert f"at token {offset:,} (byte offset {2 * offset:,})" in line and "deep.bin" in line


def test_c3_r10_the_same_refusal_through_launch_sh_leaves_no_run_dir_behind(data, teacher, tmp_path):
    """launch.sh makes runs/<name>/ for its lock before the script runs; the script's refusal (here the deep
    bad token id, found before step 1) removes that directory again: nothing is left, as without launch.sh."""
    deep, offset = deep_bad_token(data, tmp_path)
    cfg, _ = T.resolve_config(None, kd_settings(deep, teacher, "run_name=bad"))
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(T.unflatten(cfg), sort_keys=False))
    done = launch(str(config), "--gpus", "cpu", cwd=tmp_path)
    assert done.returncode == 2 and f"at token {offset:,}" in done.stderr, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "runs" / "bad").exists()
    (tmp_path / "runs" / "bad").mkdir(parents=True)  # a run dir that was there before is left alone
    (tmp_path / "runs" / "bad" / "notes.txt").write_text("mine")
    done = launch(str(config), "--gpus", "cpu", cwd=tmp_path)
    assert done.returncode == 2 and (tmp_path / "runs" / "bad" / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- R10: --cache_teacher makes no run dir
def test_r10_cache_teacher_after_a_finished_online_run_is_not_refused_and_launch_sh_makes_no_lock(data, teacher, tmp_path):
    settings = kd_settings(data, teacher, "kd.gamma=0", "run_name=kd")
    cfg, _ = T.resolve_config(None, settings)
    assert T.train(cfg, str(tmp_path / "runs" / "kd"), "none", quiet=True)[0] == "finished"
    config = tmp_path / "kd.yaml"
    config.write_text(yaml.safe_dump(T.unflatten(cfg), sort_keys=False))
    done = launch(str(config), "--gpus", "cpu", "--", "--cache_teacher", "--set",
                  f"kd.teacher_cache={tmp_path / 'cache'}", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "holds a finished run" not in done.stderr and cache_code().read_manifest(str(tmp_path / "cache"))["complete"]
    assert not (tmp_path / "runs" / "kd" / "launch.lock").exists()


# ----------------------------------------------------------------------------- C3: the missing-teacher hint
def test_c3_missing_teacher_hint_keeps_an_absolute_path_absolute(tmp_path):
    path = str(tmp_path / "elsewhere" / "runs" / "t" / "checkpoints" / "best.pt")
    hint = T.how_to_make_teacher(path)
    assert f"--run_dir {tmp_path / 'elsewhere' / 'runs' / 't'}," in hint, hint

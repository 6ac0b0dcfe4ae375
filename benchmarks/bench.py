"""Benchmarks of the kit: loop overhead, host syncs, feature cache, top-k KD, the dry-run tool, a peer.

    python benchmarks/bench.py --quick          # about 6 minutes on 2 idle CPU cores
    python benchmarks/bench.py                  # more repeats, the full 20-epoch cache run: about 13 minutes
    python benchmarks/bench.py --write_results  # also rewrite benchmarks/results.md with this machine's numbers
    python benchmarks/bench.py --calibration runs/a/checkpoints/best.pt ...  # val loss, ppl, next-token ECE

Every number comes from the kit's own code: the loop is train_probe.py's real `fit`/`optimizer_step`
on the run and task its real `train()` builds, the KD loss is train_distill.py's `kd_kl`, the dry run is
`lr_curve` and test_scheduler_dry_run.py. Timings use time.perf_counter with warm-ups and repeats; the
sides of a comparison run alternately (so slow drifts hit both) and each side counts its fastest repeat
(other processes only ever add time). Prints a table and, as its last line, one JSON object.
"""
import argparse
import contextlib
import copy
import io
import json
import logging
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]
sys.path.append(os.path.join(REPO, "tests"))  # zoo.py: the tiny models and chat tokenizer the tests build
sys.modules.setdefault("bench", sys.modules[__name__])  # backbone.target "bench:wide_backbone" finds this module

import train_probe as tp  # noqa: E402

PROBE_CONFIG = os.path.join(REPO, "configs", "probe_synthetic.yaml")
# The loop benchmarks run the schema's default cadences: a train record every 10 steps (train.log_every),
# last.pt every 5 minutes of training and at the end (train.save_every_minutes 5, train.save_every_steps null),
# eval once per epoch (timed apart, see below) with best.pt written at every improvement (kept in the kit's time).
LOOP_SETTINGS = ["train.log_every=10", "train.save_every_steps=null", "train.save_every_minutes=5", "train.eval_every=null",
                 "backbone.cache_features=true"]
# "Realistic": configs/tuab_4s.yaml as it is (batch 64, log every 100 steps, last.pt every 2000 steps and
# at the end, eval once per epoch) on a TUAB-sized epoch of 131,072 windows (TUAB has 409,455: its epochs
# are three times longer still) and a 1024-wide feature vector (a foundation model's embedding size).
TUAB_CONFIG = os.path.join(REPO, "configs", "tuab_4s.yaml")
REALISTIC_WINDOWS, REALISTIC_SETTINGS = 131_072, [
    "backbone.target=bench:wide_backbone", "backbone.kwargs={dim: 1024, pool: 4}", "backbone.cache_features=true",
    "train.epochs=1", "train.patience=null", "data.test_x=null", "data.test_y=null"]
# Uncached: every step runs the frozen built-in encoder on freshly made windows, as a probe does when
# the features do not fit in RAM (or the data is augmented); a smaller set keeps it short.
UNCACHED_SETTINGS = LOOP_SETTINGS[:-1] + ["backbone.cache_features=false", "data.synthetic.num_train=1024",
                                          "data.synthetic.num_val=64", "train.epochs=2"]
PARAMS = {  # quick / full
    "quick": {"loop_repeats": 9, "real_repeats": 3, "uncached_repeats": 2, "step_blocks": 15, "cache_epochs": 3,
              "cache_repeats": 1, "kd_repeats": 3, "curve_steps": 50_000, "curve_repeats": 3, "peer_repeats": 2,
              "offline_repeats": 2, "kd_chunk_repeats": 2, "trl_repeats": 5, "trl_steps": 40, "onpolicy_repeats": 3,
              "onpolicy_steps": 6, "v128k_repeats": 3, "v128k_steps": 8, "chat_repeats": 5, "chat_steps": 40,
              "packing_repeats": 2},
    "full": {"loop_repeats": 15, "real_repeats": 7, "uncached_repeats": 9, "step_blocks": 31, "cache_epochs": None,
             "cache_repeats": 2, "kd_repeats": 10, "curve_steps": 200_000, "curve_repeats": 5, "peer_repeats": 5,
             "offline_repeats": 5, "kd_chunk_repeats": 5, "trl_repeats": 7, "trl_steps": 60, "onpolicy_repeats": 5,
             "onpolicy_steps": 10, "v128k_repeats": 5, "v128k_steps": 12, "chat_repeats": 7, "chat_steps": 60,
             "packing_repeats": 3},
}
LOOP_PARTS = ("loop", "loop_realistic", "loop_uncached")
PARTS = [*LOOP_PARTS, "syncs", "cache", "topk", "kd_chunk", "offline", "dry_run", "peer", "trl", "onpolicy", "trl_128k",
         "trl_chat", "packing"]
# Offline KD: configs/distill_demo.yaml as it is, except kd.gamma 0 on every side (the hidden-state term needs
# the teacher's hidden states, which a cache does not hold) and fewer windows (the step does not depend on how
# many there are; the cache build's rate is reported per token). The 32k case: the same models and loop on
# generated token files with a 32,000-token vocabulary, batch 8.
DEMO_CONFIG = os.path.join(REPO, "configs", "distill_demo.yaml")
DEMO_TEACHER_CONFIG = os.path.join(REPO, "configs", "distill_demo_teacher.yaml")
OFFLINE_SETTINGS = ["kd.gamma=0", "data.limit=640", "data.val_windows=64", "train.max_steps=null", "train.epochs=1",
                    "train.log_every=1000", "train.eval_every=null", "train.save_every_steps=null"]
OFFLINE_32K = ["train.batch_size=8", "data.limit=160"]
STEP_BLOCK = 50  # optimizer steps per timed block of the hot-step comparison


# -----------------------------------------------------------------------------
# Timing: warm-ups, repeats, the fastest repeat; the sides of a comparison alternate so drifts hit both.
def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_times(sides, repeats, warmup=1, setup=None):
    """{name: [seconds]} for each side over `repeats` rounds. Each round runs every side once, in an
    order that alternates between rounds; `setup(name)` (untimed) runs before each timed call."""
    names = list(sides)
    times = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            if setup:
                setup(name)
            seconds = sides[name]()
            if round_ >= warmup:
                times[name].append(seconds)
    return times


def best(seconds):
    """The fastest repeat: other processes on a shared machine only ever add time (a descheduled thread,
    a disk busy with someone else's fsync), so the minimum is the least disturbed measurement."""
    return min(seconds)


def best_ratio(times, a, b):
    """best(a) / best(b)."""
    return best(times[a]) / best(times[b])


def noise(seconds):
    """How far one side's fastest repeat can be trusted: the second-fastest over the fastest, minus 1. Under
    load the minimum of few repeats is itself noisy; when the two fastest agree, the minimum is close to
    the undisturbed time. None with a single repeat (no estimate)."""
    if len(seconds) < 2:
        return None
    first, second = sorted(seconds)[:2]
    return second / first - 1


def ratio_noise(times, a, b):
    """The noise estimate of best_ratio(times, a, b): the two sides' noise() added (a ratio is off by at most
    about the sum of its parts' relative errors). A ratio's distance from its target below this is not a
    measurement, it is the machine."""
    na, nb = noise(times[a]), noise(times[b])
    return None if na is None or nb is None else na + nb


@contextlib.contextmanager
def quiet_process():
    """No tqdm bar (stderr is not a terminal), no warnings on screen, and the run's signal handlers
    (R8: train() installs them) removed again afterwards so Ctrl-C still stops the benchmark."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)


# -----------------------------------------------------------------------------
# The real probe run: train() builds run and task exactly as a training does, then stops before fit().
def wide_backbone(in_channels=19, dim=1024, pool=64):
    """A cheap frozen encoder with a foundation-model-sized output (the realistic-size benchmark):
    average-pool the window to `pool` samples per channel, then one fixed random projection to `dim`."""
    return nn.Sequential(nn.AdaptiveAvgPool1d(pool), nn.Flatten(), nn.Linear(in_channels * pool, dim), nn.GELU())


def tuab_shaped_data(directory, windows, val_windows=2048, channels=19, length=4):
    """Settings pointing the TUAB config at .npy windows [N, 19, 4] made here (random, labels from their
    sign): the loop's cost does not depend on what the numbers are, only on the sizes."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    settings = []
    for split, n in (("train", windows), ("val", val_windows)):
        x = rng.standard_normal((n, channels, length), dtype=np.float32)
        paths = (os.path.join(directory, f"{split}_x.npy"), os.path.join(directory, f"{split}_y.npy"))
        np.save(paths[0], x)
        np.save(paths[1], (x[:, 0].mean(1) > 0).astype(np.int64))
        settings += [f"data.{split}_x={paths[0]}", f"data.{split}_y={paths[1]}"]
    return settings


def capture_run(overrides, run_dir, config=PROBE_CONFIG):
    """(run, task, cfg) from the real train_probe.train(), captured where it calls fit()."""
    cfg, _ = tp.resolve_config(config, overrides)
    got, real_fit = {}, tp.fit

    def stop_at_fit(run, task):
        got.update(run=run, task=task)
        return "stopped"  # train() returns at once: no test set, no final log line

    tp.fit = stop_at_fit
    try:
        with quiet_process():
            tp.train(cfg, run_dir, "none", quiet=True)
    finally:
        tp.fit = real_fit
    run = got["run"]
    run["snapshot"] = {"module": copy.deepcopy(run["module"].state_dict()), "state": copy.deepcopy(run["state"])}
    return run, got["task"], cfg


def reset_run(run):
    """Back to step 0: initial head weights, a fresh optimizer and scheduler, no checkpoints."""
    cfg, snap = run["cfg"], run["snapshot"]
    run["module"].load_state_dict(snap["module"])
    run["optimizer"] = tp.build_optimizer(cfg, run["params"])
    run["scheduler"] = tp.build_schedule(run["optimizer"], cfg, run["plan"])
    run["state"] = copy.deepcopy(snap["state"])
    run.update(best_written=None, best_pending=None, last_save=time.monotonic())
    shutil.rmtree(run["ckpt_dir"], ignore_errors=True)
    os.makedirs(run["ckpt_dir"])


def kit_fit(run, task, eval_seconds, saves, write_checkpoints=True):
    """tp.fit over the whole plan: guards, logging, checkpoints. Evaluation time is measured apart and
    subtracted (the bare loop has none); the best.pt writes evaluation triggers stay in. `saves` collects
    the seconds of each checkpoint file write; write_checkpoints=False replaces the writes by no-ops (the
    diagnostic side that shows what the disk costs)."""
    evaluate, real_save = task["evaluate"], tp.atomic_save

    def timed_evaluate(r):
        start = time.perf_counter()
        metrics = evaluate(r)
        eval_seconds.append(time.perf_counter() - start)
        return metrics

    def counted_save(obj, path):
        start = time.perf_counter()
        if write_checkpoints:
            real_save(obj, path)
        saves.append(time.perf_counter() - start)

    def go():
        del eval_seconds[:], saves[:]
        tp.atomic_save = counted_save
        try:
            with quiet_process():
                start = time.perf_counter()
                outcome = tp.fit(run, dict(task, evaluate=timed_evaluate))
                elapsed = time.perf_counter() - start
        finally:
            tp.atomic_save = real_save
        assert outcome == "finished" and run["state"]["global_step"] == run["plan"]["total_steps"]
        return elapsed - sum(eval_seconds)

    return go


def bare_adamw(model, cfg):
    return torch.optim.AdamW(model.parameters(), lr=cfg["optim.lr"], betas=tuple(cfg["optim.betas"]),
                             weight_decay=cfg["optim.weight_decay"])


def bare_clip(model, cfg):
    """The recipe's clipping (train.clip_grad_norm, default 1.0) as a bare loop writes it, or nothing."""
    if cfg["train.clip_grad_norm"] is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["train.clip_grad_norm"])


def bare_loop(run, task):
    """The baseline: the same head, cached features, batches and accumulation, with AdamW, the config's
    gradient clipping and the same torch scheduler, and nothing else: forward, backward, clip, step,
    zero_grad, scheduler.step. It trains the same recipe as the kit: bench_loop checks that both end
    with bit-identical weights (`go.model` is the bare side's model)."""
    cfg, plan = run["cfg"], run["plan"]
    model = copy.deepcopy(run["module"])

    def go():
        model.load_state_dict(run["snapshot"]["module"])
        optimizer = bare_adamw(model, cfg)
        scheduler = tp.build_schedule(optimizer, cfg, plan)
        start = time.perf_counter()
        for epoch in range(plan["epochs"]):
            steps = tp.epoch_order(plan["num_samples"], plan["batch_size"], plan["grad_accum"], 1, cfg["seed"], epoch)
            batches = task["batches"]([m for step in steps for m in step])
            for step in steps:
                count = sum(len(m) for m in step)
                for _ in step:
                    feats, y = next(batches)
                    (F.cross_entropy(model(feats), y, reduction="sum") / count).backward()
                bare_clip(model, cfg)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
        return time.perf_counter() - start

    go.model = model
    return go


def step_blocks(run, task, blocks):
    """Hot path only: tp.optimizer_step vs the bare step over the same prefetched micro-batches,
    STEP_BLOCK steps per timed block (no logging, no checkpoints)."""
    plan = run["plan"]
    size = min(STEP_BLOCK, plan["total_steps"])  # the S9 check follows the plan's curve: never step past it
    steps = tp.epoch_order(plan["num_samples"], plan["batch_size"], plan["grad_accum"], 1, run["cfg"]["seed"], 0)
    steps = (steps * math.ceil(size / len(steps)))[:size]
    batches = task["batches"]([m for step in steps for m in step])
    prefetched = [([next(batches) for _ in step], sum(len(m) for m in step)) for step in steps]
    model = copy.deepcopy(run["module"])
    bare = {}

    def kit():
        start = time.perf_counter()
        for micro, count in prefetched:
            tp.optimizer_step(run, task, micro, count)
        return time.perf_counter() - start

    def plain(clip=True):
        optimizer, scheduler = bare["opt"], bare["sched"]
        start = time.perf_counter()
        for micro, count in prefetched:
            for feats, y in micro:
                (F.cross_entropy(model(feats), y, reduction="sum") / count).backward()
            if clip:
                bare_clip(model, run["cfg"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        return time.perf_counter() - start

    def setup(name):
        if name == "kit":
            reset_run(run)
        else:
            model.load_state_dict(run["snapshot"]["module"])
            bare["opt"] = bare_adamw(model, run["cfg"])
            bare["sched"] = tp.build_schedule(bare["opt"], run["cfg"], plan)

    times = paired_times({"kit": kit, "bare": plain, "bare_noclip": lambda: plain(clip=False)}, blocks, warmup=2,
                         setup=setup)
    return {"kit_us": 1e6 * best(times["kit"]) / size, "bare_us": 1e6 * best(times["bare"]) / size,
            "bare_noclip_us": 1e6 * best(times["bare_noclip"]) / size, "ratio": best_ratio(times, "kit", "bare"),
            "ratio_noise": ratio_noise(times, "kit", "bare"), "blocks": blocks}


def bench_loop(name, captured, repeats, blocks):
    """Overhead ratio of the whole loop (fit) and, with blocks > 0, of the hot step alone. A third side,
    fit() with checkpoint writes replaced by no-ops, splits the overhead into disk and per-step parts."""
    run, task, cfg = captured
    eval_seconds, saves = [], []
    sides = {"kit": kit_fit(run, task, eval_seconds, saves), "bare": bare_loop(run, task),
             "kit_no_writes": kit_fit(run, task, [], [], write_checkpoints=False)}
    times = paired_times(sides, repeats, setup=lambda side: reset_run(run) if side != "bare" else None)
    # The same work on both sides: the kit's run and the bare loop end with the same weights, bit for bit.
    same = all(torch.equal(a, b) for a, b in zip(run["module"].state_dict().values(),
                                                 sides["bare"].model.state_dict().values()))
    steps = run["plan"]["total_steps"]
    per_step = {side: 1e3 * best(t) / steps for side, t in times.items()}
    return {"name": name, "cached": cfg["backbone.cache_features"], "log_every": cfg["train.log_every"],
            "save_steps": cfg["train.save_every_steps"], "save_minutes": cfg["train.save_every_minutes"], "steps": steps,
            "steps_per_epoch": run["plan"]["steps_per_epoch"],
            "dim": run["module"].linear.in_features, "batch": cfg["train.batch_size"], "accum": cfg["train.grad_accum"],
            "kit_ms_per_step": per_step["kit"], "bare_ms_per_step": per_step["bare"],
            "no_writes_ms_per_step": per_step["kit_no_writes"], "ratio": best_ratio(times, "kit", "bare"),
            "ratio_no_writes": best_ratio(times, "kit_no_writes", "bare"), "saves": len(saves), "same_weights": same,
            "ratio_noise": ratio_noise(times, "kit", "bare"), "ratio_no_writes_noise": ratio_noise(times, "kit_no_writes", "bare"),
            "repeats": repeats,
            "save_ms": 1e3 * statistics.median(saves) if saves else None,  # the last kit run's saves
            "eval_ms": 1e3 * statistics.median(eval_seconds) if eval_seconds else None,
            "step": step_blocks(run, task, blocks) if blocks else None}


def close_run(run):
    run["log_file"].close()
    run["metrics_file"].close()


# -----------------------------------------------------------------------------
# Host syncs: every Tensor method that reads a value back to Python is counted per optimizer step.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__array__")


@contextlib.contextmanager
def count_host_reads(record):
    """Patch the Tensor methods that copy device data to the host; each call is recorded with the step
    it belongs to and its caller (file, function). Calls nested in another counted call count once."""
    own = {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            if record["on"] and record["depth"] == 0:
                caller = sys._getframe(1).f_code
                record["calls"].append((record["step"], name, caller.co_filename, caller.co_name))
            record["depth"] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                record["depth"] -= 1
        return counted

    for name in HOST_READS:
        setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    try:
        yield record
    finally:
        for name, original in own.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


def bench_syncs(run, task):
    """Host reads per optimizer step during a whole fit() (logging and checkpoint steps included,
    evaluation and E1's weight fingerprint at an eval excluded), split into the loop's own and torch internals."""
    reset_run(run)
    record = {"on": True, "depth": 0, "step": 0, "calls": []}
    real_step, evaluate, fingerprint = tp.optimizer_step, task["evaluate"], tp.param_fingerprint

    def marked_step(r, t, micro, count):
        record["step"] = r["state"]["global_step"] + 1  # later reads (logging, saving) belong to this step
        return real_step(r, t, micro, count)

    def unmarked_evaluate(r):
        record["on"] = False
        try:
            return evaluate(r)
        finally:
            record["on"] = True

    def unmarked_fingerprint(params):  # E1's read of the weights happens at an eval, like the eval itself
        record["on"] = False
        try:
            return fingerprint(params)
        finally:
            record["on"] = True

    tp.optimizer_step, tp.param_fingerprint = marked_step, unmarked_fingerprint
    try:
        with count_host_reads(record), quiet_process():
            tp.fit(run, dict(task, evaluate=unmarked_evaluate))
    finally:
        tp.optimizer_step, tp.param_fingerprint = real_step, fingerprint
    steps = run["plan"]["total_steps"]
    torch_dir = os.path.dirname(torch.__file__)
    loop = [c for c in record["calls"] if not c[2].startswith(torch_dir)]
    internal = [c for c in record["calls"] if c[2].startswith(torch_dir)]
    per_step = [0] * (steps + 1)
    for call in loop:
        per_step[call[0]] += 1
    sites = sorted({f"{os.path.basename(f)}:{fn} .{m}()" for _, m, f, fn in loop})
    torch_sites = sorted({f"torch/{os.path.relpath(f, torch_dir)}:{fn} .{m}()" for _, m, f, fn in internal})
    return {"per_step": len(loop) / steps, "max_in_a_step": max(per_step[1:]), "sites": sites,
            "torch_per_step": len(internal) / steps, "torch_sites": torch_sites, "steps": steps}


# -----------------------------------------------------------------------------
# Feature cache: the real train() on the synthetic config, cache on vs off.
def bench_cache(epochs, repeats, tmp, settings=()):
    extra = list(settings) + ([] if epochs is None else [f"train.epochs={epochs}"])
    cfg_epochs = tp.resolve_config(PROBE_CONFIG, extra)[0]["train.epochs"]
    counter = {"n": 0}

    def one(cache):
        def go():
            counter["n"] += 1
            cfg, _ = tp.resolve_config(PROBE_CONFIG, extra + [f"backbone.cache_features={cache}"])
            with quiet_process():
                start = time.perf_counter()
                outcome, run = tp.train(cfg, os.path.join(tmp, f"cache_{cache}_{counter['n']}"), "none", quiet=True)
                elapsed = time.perf_counter() - start
            close_run(run)
            assert outcome == "finished"
            return elapsed
        return go

    times = paired_times({"on": one("true"), "off": one("false")}, repeats, warmup=0)
    return {"epochs": cfg_epochs, "on_s": best(times["on"]), "off_s": best(times["off"]),
            "speedup": best_ratio(times, "off", "on")}


# -----------------------------------------------------------------------------
# Top-k KD: train_distill.kd_kl, full vs top-k, forward + backward on given logits.
def tensor_peak_bytes(fn):
    """Peak bytes held by torch's CPU allocator while fn runs, above what was held before: the
    profiler records every allocation with the allocator's running total."""
    from torch.profiler import ProfilerActivity, profile
    saved = os.dup(2)  # the profiler's C++ side prints start/stop lines to fd 2
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    events = []

    def walk(node):
        if "Allocation" in str(node.tag):
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    if not events:
        return 0
    events.sort()
    start = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - start


def bench_topk(repeats, vocabs=(32_000, 128_000), rows=256, k=256, temperature=2.0):
    try:
        import train_distill as td
        kd_kl = td.kd_kl
    except (ImportError, AttributeError) as err:
        return {"skipped": f"train_distill.kd_kl not importable ({err})"}
    out = {}
    for vocab in vocabs:
        gen = torch.Generator().manual_seed(vocab)
        teacher = 3 * torch.randn(rows, vocab, generator=gen)
        student = (3 * torch.randn(rows, vocab, generator=gen)).requires_grad_()

        def step(top_k):
            def go():
                loss = kd_kl(student, teacher, temperature, top_k).sum()
                loss.backward()
                student.grad = None
            return go

        sides = {"full": lambda: timed(step(None)), "topk": lambda: timed(step(k)),
                 # where the top-k time goes: selecting the k tokens vs one full-vocabulary pass
                 "select": lambda: timed(lambda: teacher.topk(k, dim=-1)),
                 "log_softmax": lambda: timed(lambda: F.log_softmax(teacher / temperature, -1))}
        times = paired_times(sides, repeats, warmup=1)
        out[vocab] = {"full_ms": 1e3 * best(times["full"]), "topk_ms": 1e3 * best(times["topk"]),
                      "time_ratio": best_ratio(times, "topk", "full"), "select_ms": 1e3 * best(times["select"]),
                      "log_softmax_ms": 1e3 * best(times["log_softmax"]),
                      "full_mb": tensor_peak_bytes(step(None)) / 2**20, "topk_mb": tensor_peak_bytes(step(k)) / 2**20,
                      "logits_mb": rows * vocab * 4 / 2**20}
        out[vocab]["mem_ratio"] = out[vocab]["topk_mb"] / out[vocab]["full_mb"]
        # what an offline (stored) teacher would keep per position: k fp16 values + k int32 ids vs V fp16
        out[vocab]["stored_ratio"] = (k * (2 + 4)) / (vocab * 2)
    out.update(rows=rows, k=k, temperature=temperature)
    return out


# -----------------------------------------------------------------------------
# Chunked KD loss (D6, kd.chunk_tokens): one loss step of make_task from the last hidden states, CE + full
# KD with an online teacher, the head run on both sides; unchunked (the [batch, seq, vocab] logits of both
# networks, as loss() computes them) vs chunked_terms (chunked_loss.py: chunk x vocab at a time, each chunk's
# gradient taken in its forward).
# 4 x 256 positions at vocab 131,072 (128k) and width 64: one logits tensor is 512 MiB, one chunk of 128
# positions 64 MiB; the unchunked step peaks near 3 GiB, seconds per step on one core.
KD_CHUNK = {"batch": 4, "seq": 256, "vocab": 131_072, "width": 64, "chunk": 128, "alpha": 0.5, "beta": 0.5,
            "temperature": 2.0}


def kd_chunk_inputs(td, batch, seq, vocab, width, seed=0, **_):
    """The step's inputs: the student's hidden states and head weight (trained), the teacher's (frozen),
    targets with some padding (IGNORE) so the masking runs too."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, width, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, width, generator=gen) / width ** 0.5).requires_grad_()
    t_hidden = torch.randn(batch, seq, width, generator=gen)
    t_weight = torch.randn(vocab, width, generator=gen) / width ** 0.5
    targets = torch.randint(vocab, (batch, seq), generator=gen)
    targets[:, -seq // 8:] = td.IGNORE  # a padded tail
    return hidden, weight, t_hidden, t_weight, targets


def kd_chunk_step(td, inputs, chunk, alpha, beta, temperature, **_):
    """fn() running one forward + backward of the loss (chunk 0: unchunked), dropping the gradients, returning the loss.
    Both sides are make_task's loss() / chunked_loss() minus the network body, with the kit's functions."""
    hidden, weight, t_hidden, t_weight, targets = inputs
    chunked_terms = td.companion("chunked_loss", "kd.chunk_tokens").chunked_terms  # chunked_loss.py, beside it

    def go():
        if chunk:
            loss = chunked_terms(hidden, (weight, None), targets, (t_hidden, t_weight, None), True, alpha,
                                 beta * temperature ** 2, temperature, None, chunk)[0]
        else:
            logits = F.linear(hidden, weight)
            with torch.no_grad():
                t_logits = F.linear(t_hidden, t_weight)
            ce = td.token_cross_entropy(logits, targets)
            kd = torch.where(targets != td.IGNORE, td.kd_kl(logits, t_logits, temperature), 0.0).sum()
            loss = alpha * ce + beta * temperature ** 2 * kd
        loss.backward()
        hidden.grad = weight.grad = None
        return loss.detach()  # the smoke test checks both sides compute the same loss
    return go


def bench_kd_chunk(repeats, memory_runs=3, sizes=None):
    """Peak memory and time of the loss step, chunked / unchunked.

    Memory is the peak of torch's CPU allocator during the step above what it held before (tensor_peak_bytes:
    the profiler's allocation records carry the allocator's running total). Chosen over a fresh process's
    ru_maxrss: that is a lifetime high-water mark (whatever torch's import or the inputs' set-up touched
    first hides a smaller step peak) and includes what malloc keeps cached after a free, while the allocator's
    count is exactly the tensors the chunking is about, the same to the byte on every run whatever else the
    machine does. Each side is measured `memory_runs` times and every run is reported: they must agree."""
    import train_distill as td
    s = dict(KD_CHUNK, **(sizes or {}))
    inputs = kd_chunk_inputs(td, **s)
    steps = {"unchunked": kd_chunk_step(td, inputs, **dict(s, chunk=0)), "chunked": kd_chunk_step(td, inputs, **s)}
    mem = {name: [tensor_peak_bytes(step) / 2**20 for _ in range(memory_runs)] for name, step in steps.items()}
    times = paired_times({name: (lambda step=step: timed(step)) for name, step in steps.items()}, repeats, warmup=1)
    return {**s, "unchunked_mb": mem["unchunked"], "chunked_mb": mem["chunked"],
            "logits_mb": s["batch"] * s["seq"] * s["vocab"] * 4 / 2**20,
            "mem_ratio": statistics.median(mem["chunked"]) / statistics.median(mem["unchunked"]),
            "unchunked_ms": 1e3 * best(times["unchunked"]), "chunked_ms": 1e3 * best(times["chunked"]),
            "time_ratio": best_ratio(times, "chunked", "unchunked")}


# -----------------------------------------------------------------------------
# Offline KD: train_distill.py's real train() builds each side (online full KD, online top-k, top-k from
# kd.teacher_cache); the benchmark stops it where it calls fit() and times its optimizer_step().
def token_files(directory, vocab, tokens=200_000, seed=0):
    """Settings pointing train_distill.py at generated uint16 token files of this vocabulary."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    settings = []
    for split, n in (("train", tokens), ("val", tokens // 10)):
        path = os.path.join(directory, f"{split}.bin")
        rng.integers(1, vocab, n, dtype=np.uint16).tofile(path)
        settings.append(f"data.{split}_bin={path}")
    return settings + [f"data.vocab_size={vocab}"]


def capture_distill(td, settings, run_dir, config=DEMO_CONFIG, cache_only=False):
    """(run, task) from the real train_distill.train(), captured where it calls fit(); or the cache build alone."""
    cfg, _ = td.resolve_config(config, settings)
    got, real_fit = {}, td.fit

    def stop_at_fit(run, task):
        got.update(run=run, task=task)
        return "stopped"

    td.fit = stop_at_fit
    try:
        with quiet_process():
            outcome, run = td.train(cfg, run_dir, "none", quiet=True, cache_only=cache_only)
    finally:
        td.fit = real_fit
    if cache_only:
        return run["teacher_cache"]
    run = got["run"]
    run["snapshot"] = copy.deepcopy(run["module"].state_dict())
    run["state0"] = copy.deepcopy(run["state"])
    return run, got["task"]


def held_bytes(run):
    """Tensor bytes a run holds between steps: the trained weights and optimizer state, and online the teacher."""
    tensors = list(run["module"].parameters()) + [t for state in run["optimizer"].state.values()
                                                  for t in state.values() if torch.is_tensor(t)]
    tensors += list(run["teacher"].parameters()) if run["teacher"] is not None else []
    return sum(t.nbytes for t in tensors)


def distill_steps(td, run, task, steps):
    """`steps` optimizer steps of the real optimizer_step from step 0, micro-batches read by the task (the
    offline side reads its cache there) inside the timing."""
    def reset():
        run["module"].load_state_dict(run["snapshot"])
        run["optimizer"] = td.build_optimizer(run["cfg"], td.param_groups(run["module"]))
        run["scheduler"] = td.build_schedule(run["optimizer"], run["cfg"], run["plan"])
        run["state"]["global_step"] = 0

    plan = run["plan"]
    order = td.epoch_order(plan["num_samples"], plan["batch_size"], plan["grad_accum"], 1, run["cfg"]["seed"], 0)[:steps]

    def go():
        batches = task["batches"]([m for step in order for m in step])
        start = time.perf_counter()
        for step in order:
            td.optimizer_step(run, task, [next(batches) for _ in step], sum(task["count"](m) for m in step))
        return time.perf_counter() - start

    return reset, go


def bench_offline(repeats, tmp, cases=None, steps=None):
    """Step time and peak tensor memory of offline top-k vs online top-k vs online full KD, plus the cache
    build's time and bytes per token, for each case (the demo config and a 32k vocabulary)."""
    import train_distill as td
    cases = cases or {"demo": [], "32k": OFFLINE_32K + token_files(os.path.join(tmp, "tokens_32k"), 32_000)}
    steps = steps or {"demo": 10, "32k": 3}
    out = {}
    for name, extra in cases.items():
        root = os.path.join(tmp, f"offline_{name}")
        settings = OFFLINE_SETTINGS + list(extra)
        plain = [s for s in settings if not s.startswith("kd.")]  # the teacher run (kd.enabled false) refuses kd.* keys
        teacher_cfg, _ = td.resolve_config(DEMO_TEACHER_CONFIG, plain + ["train.max_steps=2", "train.epochs=null",
                                                                         "data.val_windows=8"])
        with quiet_process():  # a two-step teacher: the step's cost depends on the sizes, not on the weights
            td.train(teacher_cfg, os.path.join(root, "teacher"), "none", quiet=True)
        kd = settings + [f"kd.teacher_checkpoint={os.path.join(root, 'teacher', 'checkpoints', 'last.pt')}"]
        cache_path = os.path.join(root, "cache")
        start = time.perf_counter()
        cache = capture_distill(td, kd + [f"kd.teacher_cache={cache_path}"], os.path.join(root, "unused"), cache_only=True)
        build_s = time.perf_counter() - start
        m = cache["manifest"]
        cache_cfg, _ = td.resolve_config(DEMO_CONFIG, kd + [f"kd.teacher_cache={cache_path}"])
        size, _how = td.caching(cache_cfg).teacher_cache_size(cache_cfg, m["windows"]["train"], m["windows"]["val"])
        positions = (m["windows"]["train"] + m["windows"]["val"]) * m["data.seq_len"]
        # a sampled cache of the same bytes: k - 1 draws in k slots (kd.teacher_cache_mode sampled)
        draws = [f"kd.teacher_cache={os.path.join(root, 'cache_sampled')}", "kd.top_k=null",
                 "kd.teacher_cache_mode=sampled", f"kd.cache_samples={m['kd.top_k'] - 1}"]
        start = time.perf_counter()
        sampled = capture_distill(td, kd + draws, os.path.join(root, "unused"), cache_only=True)["manifest"]
        sampled_build_s = time.perf_counter() - start
        sampled_cfg = td.resolve_config(DEMO_CONFIG, kd + draws)[0]
        sampled_size, _how = td.caching(sampled_cfg).teacher_cache_size(sampled_cfg, sampled["windows"]["train"],
                                                                        sampled["windows"]["val"])
        sides = {"offline_topk": kd + [f"kd.teacher_cache={cache_path}"], "online_topk": kd,
                 "online_full": kd + ["kd.top_k=null"], "offline_sampled": kd + draws}
        runs = {side: capture_distill(td, s, os.path.join(root, side)) for side, s in sides.items()}
        resets, timers = {}, {}
        for side, (run, task) in runs.items():
            resets[side], timers[side] = distill_steps(td, run, task, steps[name])
        times = paired_times(timers, repeats, setup=lambda side: resets[side]())
        row = {"build_s": build_s, "cache_bytes": size, "positions": positions, "bytes_per_token": size / positions,
               "build_tokens_per_s": positions / build_s, "k": m["kd.top_k"], "vocab": m["data.vocab_size"],
               "draws": sampled["kd.cache_samples"], "sampled_build_s": sampled_build_s,
               "sampled_bytes_per_token": sampled_size / positions,
               "steps": steps[name], "batch": runs["online_full"][0]["plan"]["batch_size"],
               "accum": runs["online_full"][0]["plan"]["grad_accum"], "seq_len": m["data.seq_len"]}
        for side, (run, task) in runs.items():
            resets[side]()
            _, one_step = distill_steps(td, run, task, 1)
            one_step()  # the optimizer state exists from here on: held, not part of the step's peak
            transient = tensor_peak_bytes(one_step)
            teacher = sum(p.nbytes for p in run["teacher"].parameters()) if run["teacher"] is not None else 0
            row[side] = {"ms_per_step": 1e3 * best(times[side]) / steps[name], "held_mb": held_bytes(run) / 2**20,
                         "step_peak_mb": transient / 2**20, "teacher_mb": teacher / 2**20}
            row[side]["peak_mb"] = row[side]["held_mb"] + row[side]["step_peak_mb"]
            close_run(run)
        row["sampled_vs_topk_step_ratio"] = row["offline_sampled"]["ms_per_step"] / row["offline_topk"]["ms_per_step"]
        for side in ("offline_topk", "online_topk", "offline_sampled"):
            row[f"{side}_step_ratio"] = row[side]["ms_per_step"] / row["online_full"]["ms_per_step"]
            row[f"{side}_mem_ratio"] = row[side]["peak_mb"] / row["online_full"]["peak_mb"]
        out[name] = row
    return out


def next_token_calibration(td, checkpoint, bins=15, batch=64):
    """val/loss, val/ppl and the expected calibration error of a train_distill.py checkpoint's next-token
    probabilities over its own run's eval windows: positions binned by the top-1 probability (`bins` equal
    widths), ECE = sum over bins of |accuracy - mean confidence| x the bin's share of positions (Guo et al.
    2017). The network is loaded by the script's own checkpoint loader, as a next teacher would be."""
    import yaml
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["config"]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(td.unflatten(saved), f)
    arch = [f"teacher.{dim}={saved[f'student.{dim}']}" for dim in ("n_layer", "n_head", "n_embd")]
    cfg, _ = td.resolve_config(f.name, arch + ["kd.enabled=true", f"kd.teacher_checkpoint={checkpoint}", "kd.gamma=0",
                                               "kd.teacher_cache=null", "kd.teacher_cache_mode=topk", "kd.top_k=null"])
    os.unlink(f.name)
    net, val = td.build_teacher(cfg, torch.device("cpu"), hidden=False), td.TokenWindows(cfg, "val")
    rows = td.eval_windows(cfg, len(val))
    ce, count = 0.0, 0
    conf_sum, correct_sum = torch.zeros(bins, dtype=torch.float64), torch.zeros(bins, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            x, y = val[rows[start:start + batch]]
            log_p = torch.log_softmax(net(x)[0].float(), -1)
            real = y != td.IGNORE
            ce += float(-log_p.gather(-1, y.clamp(min=0)[..., None])[..., 0][real].double().sum())
            count += int(real.sum())
            conf, pred = log_p.exp().max(-1)
            b = (conf[real].double() * bins).long().clamp(max=bins - 1)
            conf_sum += torch.zeros(bins, dtype=torch.float64).index_add_(0, b, conf[real].double())
            correct_sum += torch.zeros(bins, dtype=torch.float64).index_add_(0, b, (pred == y)[real].double())
    ece = float((correct_sum - conf_sum).abs().sum() / count)
    return {"val_loss": ce / count, "val_ppl": math.exp(ce / count), "ece": ece, "positions": count,
            "confidence": float(conf_sum.sum() / count), "accuracy": float(correct_sum.sum() / count)}


# -----------------------------------------------------------------------------
# A distillation peer: TRL's GKDTrainer (never a dependency of the kit) on the same work as train_distill.py,
# and a bare hand-written KD loop of the same recipe (the limit). The equal work, built here, nothing
# downloaded: a GPT-2 student 2 x 128 and teacher 4 x 128 made locally (byte vocabulary, dropout 0), both
# loaded by every side; byte windows of the built-in corpus, 16 x 64 tokens per optimizer step, in the kit's
# order; AdamW with the kit's groups, its LR schedule object (the same LR at every step), clipping at 1.0;
# fp32, one intra-op thread; forward KL at T = 1 over the real targets, summed and divided by their count.
# GKD reads 65-token windows and shifts (its loss compares positions 0..63 with targets 1..64, as the kit's).
TRL_SETTINGS = ["kd.enabled=true", "kd.teacher_checkpoint=null", "kd.alpha=0", "kd.beta=1", "kd.gamma=0",
                "kd.temperature=1", "kd.top_k=null", "data.seq_len=64", "train.batch_size=16", "train.grad_accum=1",
                "train.precision=fp32", "train.epochs=null", "data.val_windows=64", "train.log_every=10",
                "train.eval_every=null", "train.save_every_steps=null", "train.clip_grad_norm=1.0"]
TRL_TOPK = 16  # the offline side: the teacher's top-16 from kd.teacher_cache
TRL_WARMUP = 10  # steps each side runs before its timed steps (allocator, autograd graph, the Trainer's first calls)
TRL_MISSING = "trl is not installed (pip install trl; for this benchmark only)"


def tiny_gpt2_pair(directory, seq_len=64, width=128):
    """(student dir, teacher dir): GPT-2s with a byte vocabulary, 2 x 128 and 4 x 128, saved once; every side
    loads these files. seq_len + 1 positions: GKD's inputs carry the last target too."""
    import transformers
    paths = []
    # the teacher initialised wider (std 0.2): its predictions are peaked, the step-1 KL is O(1), not ~0
    for name, layers, heads, std, seed in (("student", 2, 2, 0.02, 0), ("teacher", 4, 4, 0.2, 1)):
        path = os.path.join(directory, name)
        config = transformers.GPT2Config(vocab_size=256, n_positions=seq_len + 1, n_embd=width, n_layer=layers,
                                         n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         initializer_range=std, bos_token_id=None, eos_token_id=None)
        torch.manual_seed(seed)
        transformers.GPT2LMHeadModel(config).save_pretrained(path)
        paths.append(path)
    return paths


def byte_tokenizer():
    """A 256-token byte tokenizer object for GKDTrainer's processing_class (it only reads pad_token_id here)."""
    import transformers
    from tokenizers import Tokenizer, models
    vocab = {f"<{i}>": i for i in range(256)}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<0>")),
                                                pad_token="<0>", eos_token="<0>")


def reset_distill(td, run):
    """Back to step 0: initial student, a fresh optimizer and schedule, no checkpoints."""
    run["module"].load_state_dict(run["snapshot"])
    run["optimizer"] = td.build_optimizer(run["cfg"], td.param_groups(run["module"]))
    run["scheduler"] = td.build_schedule(run["optimizer"], run["cfg"], run["plan"])
    run["state"] = copy.deepcopy(run["state0"])
    run.update(best_written=None, best_pending=None, last_save=time.monotonic())
    shutil.rmtree(run["ckpt_dir"], ignore_errors=True)
    os.makedirs(run["ckpt_dir"])


def kit_distill_side(td, run, task):
    """The kit's real fit() from step 0 over the whole plan; the time after each optimizer step is stamped (the
    final eval and save come after the last stamp). Returns (stamps, first-step loss, final state dict)."""
    def go():
        reset_distill(td, run)
        stamps, losses, real = [], [], td.optimizer_step

        def stamped(*args):
            out = real(*args)
            stamps.append(time.perf_counter())
            losses.append(out["loss"])
            return out

        td.optimizer_step = stamped
        try:
            with quiet_process():
                assert td.fit(run, task) == "finished"
        finally:
            td.optimizer_step = real
        return stamps, losses[0], run["module"].lm.model.state_dict()
    return go


def bare_distill_side(td, run):
    """The limit: the same models, windows in the same order, loss arithmetic, clipping, AdamW groups and
    schedule, written as a bare loop (no guards, no logging, no checkpoints)."""
    cfg, plan, train_set = run["cfg"], run["plan"], run["train_set"]
    student, teacher = copy.deepcopy(run["module"].lm.model), run["teacher"].model
    start = {k[len("lm.model."):]: v for k, v in run["snapshot"].items()}
    order = td.epoch_order(plan["num_samples"], plan["batch_size"], 1, 1, cfg["seed"], 0)[:plan["total_steps"]]

    def go():
        student.load_state_dict(start)
        optimizer = td.build_optimizer(cfg, td.param_groups(student))
        scheduler = td.build_schedule(optimizer, cfg, plan)
        stamps, losses = [], []
        for (indices,) in order:
            x, y = train_set[indices]
            real = y != -100
            logits = student(input_ids=x, use_cache=False).logits
            with torch.no_grad():
                log_p = F.log_softmax(teacher(input_ids=x, use_cache=False).logits, -1)
                p = log_p.exp()
            kl = torch.where(p > 0, p * (log_p - F.log_softmax(logits, -1)), 0.0).sum(-1)
            loss = torch.where(real, kl, 0.0).sum() / int(real.sum())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg["train.clip_grad_norm"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            stamps.append(time.perf_counter())
            losses.append(loss.detach())
        return stamps, float(losses[0]), student.state_dict()
    return go


def gkd_side(td, run, student_dir, teacher_dir, tmp, prompt=None, new_tokens=None):
    """TRL's GKDTrainer (beta 0, seq_kd False: forward KL) over the same windows in the same order, with the
    kit's optimizer and schedule objects built on its student: lmbda 0 (the given windows, no generation), or
    with `prompt` lmbda 1 (the student continues each window's first `prompt` tokens with `new_tokens` of its
    own, sampled at temperature 1 with model.generate). go(steps) runs `steps` optimizer steps (default: the plan)."""
    import datasets
    import transformers
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    for name in ("transformers", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    cfg, plan, train_set = run["cfg"], run["plan"], run["train_set"]
    order = td.epoch_order(plan["num_samples"], plan["batch_size"], 1, 1, cfg["seed"], 0)[:plan["total_steps"]]
    windows = np.concatenate([train_set.rows(indices)[0] for (indices,) in order])
    y = torch.cat([train_set[indices][1] for (indices,) in order])
    labels = torch.cat([torch.full((len(y), 1), -100), y], 1)  # labels[:, 1:] are the kit's targets
    ones = np.ones_like(windows)
    columns = {"input_ids": windows.tolist(), "attention_mask": ones.tolist(), "labels": labels.tolist()}
    if prompt:  # GKD's on-policy inputs: the prompt alone (every token real), generation replaces the rest
        columns.update(prompts=windows[:, :prompt].tolist(), prompt_attention_mask=ones[:, :prompt].tolist())
    rows = datasets.Dataset.from_dict(columns)

    def collate(items):
        return {key: torch.tensor([item[key] for item in items]) for key in items[0]}

    class InOrder(GKDTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    stamps, losses = [], []

    class Stamp(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    tokenizer, counter = byte_tokenizer(), {"n": 0}
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, local_files_only=True)

    def go(steps=None):
        del stamps[:], losses[:]
        counter["n"] += 1
        steps = steps or plan["total_steps"]
        student = transformers.AutoModelForCausalLM.from_pretrained(student_dir, local_files_only=True)
        optimizer = td.build_optimizer(cfg, td.param_groups(student))
        with warnings.catch_warnings():  # transformers' FutureWarnings about TRL's own defaults, once per round
            warnings.simplefilter("ignore", FutureWarning)
            args = GKDConfig(output_dir=os.path.join(tmp, f"gkd_{counter['n']}"), per_device_train_batch_size=plan["batch_size"],
                             gradient_accumulation_steps=1, max_steps=steps, logging_steps=cfg["train.log_every"],
                             save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=cfg["seed"],
                             max_grad_norm=cfg["train.clip_grad_norm"], lmbda=1.0 if prompt else 0.0, beta=0.0,
                             seq_kd=False, temperature=1.0, max_new_tokens=new_tokens or 128,
                             max_length=cfg["data.seq_len"] + 1, dataloader_num_workers=0, remove_unused_columns=False,
                             # fp32 as the kit: TRL's configs default to bf16 autocast. And no activation
                             # checkpointing, as the kit's default: TRL's configs turn it on (recomputing every
                             # forward in the backward, and generating without a KV cache)
                             bf16=False, fp16=False, gradient_checkpointing=False)
        trainer = InOrder(model=student, teacher_model=teacher, args=args, train_dataset=rows, data_collator=collate,
                          processing_class=tokenizer, optimizers=(optimizer, td.build_schedule(optimizer, cfg, plan)),
                          callbacks=[Stamp()])
        compute_loss = trainer.compute_loss

        def recorded(*args, **kwargs):
            loss = compute_loss(*args, **kwargs)
            losses.append(loss.detach())
            return loss

        trainer.compute_loss = recorded
        if prompt:
            count_generation(trainer, go.generated)
        with quiet_process(), contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
        assert trainer.state.global_step == steps
        return list(stamps), float(losses[0]), student.state_dict()
    go.generated = []
    return go


def count_generation(trainer, generated):
    """The equal-work check of the on-policy row: each GKD generation's (shape, scored tokens) into `generated`."""
    generate_outputs = trainer.generate_on_policy_outputs

    def counted(*args, **kwargs):
        ids, mask, labels = generate_outputs(*args, **kwargs)
        generated.append((tuple(ids.shape), int((labels[:, 1:] != -100).sum())))
        return ids, mask, labels

    trainer.generate_on_policy_outputs = counted


def step_seconds(stamps, warmup=TRL_WARMUP):
    """Median seconds per optimizer step over the steps after the warm-up (a descheduled step is an outlier)."""
    return float(np.median(np.diff(stamps[warmup - 1:])))


def bench_trl(repeats, tmp, steps=40, warmup=TRL_WARMUP, width=128):
    """Seconds per optimizer step of the kit's online full KD, the kit's offline top-k, a bare KD loop and
    TRL's GKDTrainer on the same work; rounds interleave the sides (order alternating), each side counts
    its fastest round. Before timing, the first round checks the work is the same: equal step-1 losses
    (kit, bare, GKD), and the kit and the bare loop end bit-identical."""
    try:
        import trl
        import transformers
    except ImportError:
        return {"skipped": TRL_MISSING}
    import train_distill as td
    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bars in the benchmark's output
    student_dir, teacher_dir = tiny_gpt2_pair(os.path.join(tmp, "trl_models"), width=width)
    base = TRL_SETTINGS + [f"train.max_steps={steps}", f"data.limit={16 * steps}", f"student.hf_dir={student_dir}"]
    online = base + [f"kd.hf_teacher_dir={teacher_dir}"]
    cache = os.path.join(tmp, "trl_cache")
    offline = base + [f"kd.top_k={TRL_TOPK}", f"kd.teacher_cache={cache}"]
    capture_distill(td, online + [f"kd.top_k={TRL_TOPK}", f"kd.teacher_cache={cache}"], os.path.join(tmp, "trl_unused"),
                    cache_only=True)
    runs = {"kit": capture_distill(td, online, os.path.join(tmp, "trl_kit")),
            "kit_offline": capture_distill(td, offline, os.path.join(tmp, "trl_offline"))}
    sides = {"kit": kit_distill_side(td, *runs["kit"]), "bare": bare_distill_side(td, runs["kit"][0]),
             "gkd": gkd_side(td, runs["kit"][0], student_dir, teacher_dir, tmp),
             "kit_offline": kit_distill_side(td, *runs["kit_offline"])}
    first = {name: go() for name, go in sides.items()}  # the check (and everyone's warm-up round)
    loss = {name: out[1] for name, out in first.items()}
    same_bits = all(torch.equal(a, first["bare"][2][k]) for k, a in first["kit"][2].items())
    equal = max(abs(loss[s] - loss["kit"]) for s in ("bare", "gkd")) <= 1e-5 * abs(loss["kit"])
    times = {name: [] for name in sides}
    for round_ in range(repeats):
        for name in (list(sides) if round_ % 2 == 0 else list(sides)[::-1]):
            times[name].append(step_seconds(sides[name]()[0], warmup))
    for run, _task in runs.values():
        close_run(run)
    ms = {name: 1e3 * best(t) for name, t in times.items()}
    out = {"trl_version": trl.__version__, "steps": steps, "warmup": warmup, "rounds": repeats, "ms_per_step": ms,
           "noise": {name: noise(t) for name, t in times.items()}, "first_loss": loss, "equal_first_loss": equal,
           "kit_bare_bit_identical": same_bits, "k": TRL_TOPK}
    for key, a, b in (("trl_step_ratio", "kit", "gkd"), ("trl_offline_step_ratio", "kit_offline", "gkd"),
                      ("distill_overhead_ratio", "kit", "bare")):
        out[key], out[key + "_noise"] = ms[a] / ms[b], ratio_noise(times, a, b)
    return out


# -----------------------------------------------------------------------------
# On-policy distillation against GKDTrainer lmbda 1, and generation alone against model.generate: the TRL row's
# GPT-2 pair (byte vocabulary) with 256 positions; generated byte files (ids 1..255: no padding, so every window's
# prompt is real on both sides); each step the student continues 8 prompts of 64 tokens with 192 sampled tokens
# (temperature 1, no end id) and is trained on forward KL over the generated tokens. The kit's same run at
# kd.on_policy_fraction 0 gives the step without generation: the difference is what generation adds to a step.
ONPOLICY = {"prompt": 64, "new": 192, "batch": 8}


def onpolicy_settings(student_dir, teacher_dir, files, steps, prompt, new, batch, fraction):
    return TRL_SETTINGS + files + [
        f"data.seq_len={prompt + new}", f"train.batch_size={batch}", f"train.max_steps={steps}",
        f"data.limit={batch * steps}", "data.val_windows=8", f"student.hf_dir={student_dir}",
        f"kd.hf_teacher_dir={teacher_dir}", f"kd.on_policy_fraction={fraction}", f"kd.prompt_tokens={prompt}",
        f"kd.max_new_tokens={new}", "kd.sample_temperature=1", "train.log_every=1"]  # each step's tokens on record


def generation_sides(td, run, prompt, new, batch):
    """Generation alone on the run's student and first windows: the kit's generate() (its KV cache and sampler,
    the on-policy path) and transformers' model.generate (sampling, top_k 0, its KV cache)."""
    import transformers
    x, _ = run["train_set"][np.arange(batch)]
    prompts, module, model = x[:, :prompt], run["module"], run["module"].lm.model
    config = transformers.GenerationConfig(max_new_tokens=new, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                           pad_token_id=0)

    def kit():
        seed = torch.Generator().manual_seed(0)
        return timed(lambda: td.generating(run["cfg"]).generate(module, prompts, new, 1.0, seed))

    def hf():
        model.eval()
        with torch.no_grad():
            return timed(lambda: model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                                generation_config=config))
    return {"kit_generate": kit, "hf_generate": hf}


def bench_onpolicy(repeats, tmp, steps=8, warmup=2, width=128, sizes=None):
    """Seconds per optimizer step of the kit's on-policy run (kd.on_policy_fraction 1), the same run at 0, and
    GKDTrainer lmbda 1 on the same models and prompts; and generation alone (kit generate() / model.generate).
    Rounds interleave the sides; each counts its fastest round. Equal work: every side generated batch x new
    tokens a step and scored them (counted on both)."""
    try:
        import trl
        import transformers
    except ImportError:
        return {"skipped": TRL_MISSING}
    import train_distill as td
    transformers.utils.logging.disable_progress_bar()
    s = dict(ONPOLICY, **(sizes or {}))
    prompt, new, batch = s["prompt"], s["new"], s["batch"]
    student_dir, teacher_dir = tiny_gpt2_pair(os.path.join(tmp, "onpolicy_models"), seq_len=prompt + new, width=width)
    files = token_files(os.path.join(tmp, "onpolicy_tokens"), 256, tokens=batch * steps * (prompt + new) * 2)
    runs = {name: capture_distill(td, onpolicy_settings(student_dir, teacher_dir, files, steps, prompt, new, batch, f),
                                  os.path.join(tmp, f"onpolicy_{name}"))
            for name, f in (("kit", 1), ("kit_off", 0))}
    gkd = gkd_side(td, runs["kit"][0], student_dir, teacher_dir, tmp, prompt=prompt, new_tokens=new)
    sides = {"kit": kit_distill_side(td, *runs["kit"]), "kit_off": kit_distill_side(td, *runs["kit_off"]), "gkd": gkd}
    gen = generation_sides(td, runs["kit"][0], prompt, new, batch)
    for go in sides.values():
        go()  # everyone's warm-up round
    kit_tokens = [r["on_policy/tokens"] for r in td.read_metrics(runs["kit"][0]["run_dir"])[0].values()]
    times = {name: [] for name in [*sides, *gen]}
    for round_ in range(repeats):
        for name in (list(times) if round_ % 2 == 0 else list(times)[::-1]):
            if name in sides:
                times[name].append(step_seconds(sides[name]()[0], warmup))
            else:
                times[name].append(gen[name]())
    for run, _task in runs.values():
        close_run(run)
    ms = {name: 1e3 * best(t) for name, t in times.items()}
    out = {"trl_version": trl.__version__, "steps": steps, "warmup": warmup, "rounds": repeats, "ms": ms, **s,
           "noise": {name: noise(t) for name, t in times.items()}, "kit_generated_per_step": sorted(set(kit_tokens)),
           "gkd_generated": sorted(set(gkd.generated))}
    out["equal_work"] = (out["kit_generated_per_step"] == [batch * new]
                         and out["gkd_generated"] == [((batch, prompt + new), batch * new)])
    out["trl_onpolicy_step_ratio"] = ms["kit"] / ms["gkd"]
    out["trl_onpolicy_step_ratio_noise"] = ratio_noise(times, "kit", "gkd")
    # what generation adds to the kit's step, over model.generate's time for the same batch and lengths
    out["onpolicy_extra_ms"] = ms["kit"] - ms["kit_off"]
    out["onpolicy_extra_over_generate"] = out["onpolicy_extra_ms"] / ms["hf_generate"]
    # its noise: the two step times' errors carried into their difference, plus model.generate's
    nk, no, ng = noise(times["kit"]), noise(times["kit_off"]), noise(times["hf_generate"])
    out["onpolicy_extra_over_generate_noise"] = None if None in (nk, no, ng) else \
        (nk * ms["kit"] + no * ms["kit_off"]) / abs(out["onpolicy_extra_ms"]) + ng
    out["generate_tokens_per_s_ratio"] = ms["hf_generate"] / ms["kit_generate"]
    out["generate_tokens_per_s_ratio_noise"] = ratio_noise(times, "hf_generate", "kit_generate")
    return out


# -----------------------------------------------------------------------------
# A 128k vocabulary (Llama 3's 128,256 tokens) on tiny GPT-2s (width 64), so the head and the loss dominate the
# step: the kit's full-vocabulary KD with kd.chunk_tokens (the logits never materialised) against GKDTrainer
# (lmbda 0, beta 0: forward KL over the full [batch, seq, vocab] logits), the TRL row's recipe at batch 4 x 64.
VOCAB_128K = {"vocab": 128_256, "batch": 4, "width": 64, "chunk": 32}


def token_files_u32(directory, vocab, tokens, seed=0):
    """Settings pointing train_distill.py at generated uint32 token files (a vocabulary past uint16's range)."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    settings = []
    for split, n in (("train", tokens), ("val", max(tokens // 10, 2048))):
        path = os.path.join(directory, f"{split}.bin")
        rng.integers(1, vocab, n, dtype=np.uint32).tofile(path)
        settings.append(f"data.{split}_bin={path}")
    return settings + [f"data.vocab_size={vocab}", "data.dtype=uint32"]


def tiny_gpt2_pair_vocab(directory, vocab, width, seq_len=64):
    """tiny_gpt2_pair with another vocabulary: (student 2 x width, teacher 4 x width)."""
    import transformers
    paths = []
    for name, layers, heads, std, seed in (("student", 2, 2, 0.02, 0), ("teacher", 4, 4, 0.2, 1)):
        path = os.path.join(directory, name)
        config = transformers.GPT2Config(vocab_size=vocab, n_positions=seq_len + 1, n_embd=width, n_layer=layers,
                                         n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         initializer_range=std, bos_token_id=None, eos_token_id=None)
        torch.manual_seed(seed)
        transformers.GPT2LMHeadModel(config).save_pretrained(path)
        paths.append(path)
    return paths


def bench_trl_128k(repeats, tmp, steps=8, warmup=2, sizes=None):
    """Seconds per optimizer step and peak tensor memory of the kit's chunked full-vocabulary KD and GKDTrainer
    at vocabulary 128,256, with the equal-work check of the TRL row (the same step-1 loss). Memory: the tensors
    held between steps (weights, optimizer state, the teacher) plus the step's transient peak (tensor_peak_bytes)
    on both sides; GKD's step peak is measured over a whole one-step train() (its optimizer state made there)."""
    try:
        import trl
        import transformers
    except ImportError:
        return {"skipped": TRL_MISSING}
    import train_distill as td
    transformers.utils.logging.disable_progress_bar()
    s = dict(VOCAB_128K, **(sizes or {}))
    student_dir, teacher_dir = tiny_gpt2_pair_vocab(os.path.join(tmp, "v128k_models"), s["vocab"], s["width"])
    files = token_files_u32(os.path.join(tmp, "v128k_tokens"), s["vocab"], s["batch"] * steps * 65 * 2)
    settings = TRL_SETTINGS + files + [f"train.batch_size={s['batch']}", f"train.max_steps={steps}",
                                       f"data.limit={s['batch'] * steps}", "data.val_windows=4",
                                       f"student.hf_dir={student_dir}", f"kd.hf_teacher_dir={teacher_dir}",
                                       f"kd.chunk_tokens={s['chunk']}"]
    run, task = capture_distill(td, settings, os.path.join(tmp, "v128k_kit"))
    sides = {"kit": kit_distill_side(td, run, task), "gkd": gkd_side(td, run, student_dir, teacher_dir, tmp)}
    first = {name: go() for name, go in sides.items()}  # the check (and the warm-up round)
    loss = {name: out[1] for name, out in first.items()}
    equal = abs(loss["gkd"] - loss["kit"]) <= 1e-5 * abs(loss["kit"])
    times = {name: [] for name in sides}
    for round_ in range(repeats):
        for name in (list(sides) if round_ % 2 == 0 else list(sides)[::-1]):
            times[name].append(step_seconds(sides[name]()[0], warmup))
    # memory: the kit after one step (its optimizer state exists: held), then one more step measured
    reset_distill(td, run)
    _, one_step = distill_steps(td, run, task, 1)
    one_step()
    kit_mb = (held_bytes(run) + tensor_peak_bytes(one_step)) / 2**20
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, local_files_only=True)
    gkd_mb = (sum(p.nbytes for p in teacher.parameters()) + tensor_peak_bytes(lambda: sides["gkd"](1))) / 2**20
    close_run(run)
    ms = {name: 1e3 * best(t) for name, t in times.items()}
    return {"trl_version": trl.__version__, "steps": steps, "warmup": warmup, "rounds": repeats, **s, "ms": ms,
            "noise": {name: noise(t) for name, t in times.items()}, "first_loss": loss, "equal_first_loss": equal,
            "kit_mb": kit_mb, "gkd_mb": gkd_mb, "logits_mb": s["batch"] * 64 * s["vocab"] * 4 / 2**20,
            "trl_step_ratio_128k": ms["kit"] / ms["gkd"], "trl_step_ratio_128k_noise": ratio_noise(times, "kit", "gkd"),
            "trl_mem_ratio_128k": kit_mb / gkd_mb}


# -----------------------------------------------------------------------------
# The TRL peer on chat data (C10, E13): a ChatML tokenizer and Llama-style student (2 x width) and teacher
# (4 x width, initialised wider: a peaked teacher) from tests/zoo.py; generated single-turn conversations ({"messages"}:
# an optional system turn, a user turn, the assistant's reply, of varied lengths so rows pad) prepared by
# prepare_text.py for the kit, read raw by GKDTrainer's own collator (DataCollatorForChatML: it renders and
# masks them itself). Same rows in the kit's order, batch 4, JSD at T 1, HF Trainer's own AdamW (weight decay 0,
# the kit's betas and eps), constant LR, clipping at 1.0, fp32. The collator trains the LAST assistant turn of a
# conversation, the kit every assistant turn: on single-turn rows the two masks are the same (checked).
CHAT = {"batch": 4, "width": 128, "beta": 0.5}  # beta: the timed row's JSD (tests/test_trl_chat.py: 0, 0.5, 1)
CHAT_WORDS = "alpha beta gamma delta the fox jumps over lazy dog and runs sort list please explain why".split()


def chat_conversations(n, seed=0):
    """n single-turn conversations of varied lengths (a third with a system turn)."""
    rng = np.random.default_rng(seed)

    def say(low, high):
        return " ".join(rng.choice(CHAT_WORDS, size=int(rng.integers(low, high))))

    rows = []
    for i in range(n):
        turns = [{"role": "system", "content": say(1, 4)}] if i % 3 == 0 else []
        turns += [{"role": "user", "content": say(2, 14)}, {"role": "assistant", "content": say(2, 14)}]
        rows.append({"messages": turns})
    return rows


def chat_equal_work(directory, rows=90, width=32, val_fraction=0.1):
    """The chat pair and data: {"tokenizer", "student", "teacher" (directories), "prepared" (prepare_text.py's --out),
    "data" (its data.* settings), "seq_len", "train_rows" (the raw rows of the train split in prepare_text.py's
    order, which is the kit's example index)}."""
    import prepare_text
    import zoo  # tests/zoo.py: the ChatML tokenizer and Llama builders the tests use
    import yaml
    conversations = chat_conversations(rows)
    tokenizer = zoo.chat_tokenizer(os.path.join(directory, "tokenizer"), [" ".join(CHAT_WORDS)] * 20)
    source = os.path.join(directory, "chat.jsonl")
    with open(source, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in conversations)
    out = os.path.join(directory, "prepared")
    with contextlib.redirect_stdout(io.StringIO()):
        assert prepare_text.main([source, "--tokenizer", tokenizer, "--out", out,
                                  "--val_fraction", str(val_fraction)]) == 0
    with open(os.path.join(out, "data.yaml")) as f:
        data = yaml.safe_load(f)["data"]
    with open(os.path.join(out, "manifest.json")) as f:
        longest = max(split["longest"] for split in json.load(f)["splits"].values())
    shape = dict(hidden_size=width, intermediate_size=2 * width)
    student = zoo.hf_llama(os.path.join(directory, "student"), vocab=data["vocab_size"], positions=longest, **shape)
    teacher = zoo.hf_llama(os.path.join(directory, "teacher"), vocab=data["vocab_size"], positions=longest, seed=1,
                           num_hidden_layers=4, initializer_range=0.2, **shape)
    return {"tokenizer": tokenizer, "student": student, "teacher": teacher, "seq_len": longest - 1, "prepared": out,
            "data": [f"data.{k}={v}" for k, v in data.items()],
            "train_rows": [r for i, r in enumerate(conversations) if not prepare_text.in_val(i, val_fraction)]}


def chat_settings(work, steps, beta, batch=CHAT["batch"]):
    """The kit's side of the chat comparison: GKD's objective (JSD with TRL's beta, T 1: GKDTrainer's
    compute_loss takes the divergence at T 1 whatever GKDConfig.temperature says), constant LR, no weight decay
    (HF Trainer picks the decayed weights by name, the kit by dimension: the same ones for Llama, not always)."""
    return TRL_SETTINGS + work["data"] + [
        f"data.seq_len={work['seq_len']}", "data.limit=null", "data.val_windows=8", f"train.batch_size={batch}",
        f"train.max_steps={steps}", "train.log_every=1", "kd.divergence=jsd", f"kd.jsd_beta={beta}",
        "optim.weight_decay=0", "schedule.type=constant", "schedule.warmup=0", "train.save_every_minutes=null",
        f"student.hf_dir={work['student']}", f"kd.hf_teacher_dir={work['teacher']}"]


def gkd_chat_side(td, run, work, tmp, beta):
    """TRL's GKDTrainer (lmbda 0, seq_kd False) on the raw chat rows, in the kit's order: its own collator
    tokenizes, masks and pads them (left), HF Trainer builds its own AdamW (the kit's lr, betas, weight decay;
    eps 1e-8, torch's default, which the kit uses) and constant schedule. go(steps) -> (stamps after each
    optimizer step, step-1 loss, the student's final state dict)."""
    import datasets
    import transformers
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    for name in ("transformers", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    cfg, plan = run["cfg"], run["plan"]
    order = td.epoch_order(plan["num_samples"], plan["batch_size"], 1, 1, cfg["seed"], 0)
    assert plan["grad_accum"] == 1 and len(order) >= plan["total_steps"], "the comparison runs within one epoch"
    rows = datasets.Dataset.from_list([work["train_rows"][i] for (indices,) in order[:plan["total_steps"]]
                                       for i in indices])
    tokenizer = transformers.AutoTokenizer.from_pretrained(work["tokenizer"], local_files_only=True)
    tokenizer.pad_token = tokenizer.eos_token  # the collator needs a pad id; its (left) padding is attention-masked
    teacher = transformers.AutoModelForCausalLM.from_pretrained(work["teacher"], local_files_only=True)

    class InOrder(GKDTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    stamps, losses, counter = [], [], {"n": 0}

    class Stamp(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    def go(steps=None):
        del stamps[:], losses[:]
        counter["n"] += 1
        steps = steps or plan["total_steps"]
        student = transformers.AutoModelForCausalLM.from_pretrained(work["student"], local_files_only=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            args = GKDConfig(
                output_dir=os.path.join(tmp, f"gkd_chat_{counter['n']}"), max_steps=steps,
                per_device_train_batch_size=plan["batch_size"], gradient_accumulation_steps=1,
                logging_steps=cfg["train.log_every"],
                save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=cfg["seed"],
                dataloader_num_workers=0, lmbda=0.0, beta=beta, seq_kd=False, temperature=cfg["kd.temperature"],
                max_length=cfg["data.seq_len"] + 1, bf16=False, fp16=False, gradient_checkpointing=False,
                optim="adamw_torch", learning_rate=cfg["optim.lr"], weight_decay=cfg["optim.weight_decay"],
                adam_beta1=cfg["optim.betas"][0], adam_beta2=cfg["optim.betas"][1], adam_epsilon=1e-8,
                lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=cfg["train.clip_grad_norm"])
        trainer = InOrder(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                          processing_class=tokenizer, callbacks=[Stamp()])  # no data_collator: TRL's own
        compute_loss = trainer.compute_loss

        def recorded(*args, **kwargs):
            loss = compute_loss(*args, **kwargs)
            losses.append(loss.detach())
            return loss

        trainer.compute_loss = recorded
        with quiet_process(), contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
        assert trainer.state.global_step == steps
        return list(stamps), float(losses[0]), student.state_dict()
    return go


def bench_trl_chat(repeats, tmp, steps=40, warmup=TRL_WARMUP, sizes=None):
    """Seconds per optimizer step of the kit's fit() on prepared chat data and GKDTrainer on the same raw rows
    (its collator tokenizing them each step, as a TRL user runs it), with the equal-work check first: the same
    step-1 loss, and the largest weight difference after the whole plan. Rounds interleave the sides."""
    try:
        import trl
        import datasets  # noqa: F401  GKDTrainer's dataset
        import transformers
    except ImportError:
        return {"skipped": TRL_MISSING}
    import train_distill as td
    transformers.utils.logging.disable_progress_bar()
    s = dict(CHAT, **(sizes or {}))
    rows = math.ceil(steps * s["batch"] / 0.9) + s["batch"]  # the train split (9 rows in 10) holds the plan
    work = chat_equal_work(os.path.join(tmp, "chat_work"), rows=rows, width=s["width"])
    run, task = capture_distill(td, chat_settings(work, steps, s["beta"], s["batch"]), os.path.join(tmp, "chat_kit"))
    sides = {"kit": kit_distill_side(td, run, task), "gkd": gkd_chat_side(td, run, work, tmp, s["beta"])}
    first = {name: go() for name, go in sides.items()}  # the check (and everyone's warm-up round)
    loss = {name: out[1] for name, out in first.items()}
    weight_diff = max(float((a - first["gkd"][2][k]).abs().max()) for k, a in first["kit"][2].items())
    times = {name: [] for name in sides}
    for round_ in range(repeats):
        for name in (list(sides) if round_ % 2 == 0 else list(sides)[::-1]):
            times[name].append(step_seconds(sides[name]()[0], warmup))
    close_run(run)
    ms = {name: 1e3 * best(t) for name, t in times.items()}
    return {"trl_version": trl.__version__, "steps": steps, "warmup": warmup, "rounds": repeats, **s, "rows": rows,
            "seq_len": work["seq_len"], "ms": ms, "noise": {name: noise(t) for name, t in times.items()},
            "first_loss": loss, "equal_first_loss": abs(loss["gkd"] - loss["kit"]) <= 1e-5,
            "max_weight_diff": weight_diff, "trl_chat_step_ratio": ms["kit"] / ms["gkd"],
            "trl_chat_step_ratio_noise": ratio_noise(times, "kit", "gkd")}


# -----------------------------------------------------------------------------
# The dry-run tool: optimizer steps of the real torch scheduler simulated per second.
# -----------------------------------------------------------------------------
# Padding and packing (data.packing, C10): chat examples of a long-tailed length distribution (turns of
# log-normal length, 1-4 exchanges, a system turn in a third: most examples short, a few long, as chat datasets
# are) prepared by prepare_text.py, trained one example a row (padded to data.seq_len + 1) and packed first-fit;
# the same examples, models (zoo's Llamas, sdpa attention), batch of rows and steps over one epoch.
PACKING = {"conversations": 330, "seq_len": 511, "batch": 8, "width": 64}


def packing_conversations(n, seed=0):
    """n conversations: each turn log-normal words (median 12, clipped to 1-150), 1-4 user/assistant exchanges."""
    rng = np.random.default_rng(seed)

    def say():
        return " ".join(rng.choice(CHAT_WORDS, size=int(np.clip(rng.lognormal(np.log(12), 0.9), 1, 150))))

    rows = []
    for i in range(n):
        turns = [{"role": "system", "content": say()}] if i % 3 == 0 else []
        for _ in range(min(4, int(rng.geometric(0.5)))):
            turns += [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}]
        rows.append({"messages": turns})
    return rows


def bench_packing(repeats, tmp, sizes=None):
    """Padding waste (the share of the rows' tokens no example fills) and seconds per trained token of the kit's
    optimizer_step over one epoch, one example a row vs data.packing; rounds interleave the sides, each counts
    its fastest. Equal work: both sides train the same examples' same tokens (counted on both)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return {"skipped": "transformers is not installed (the chat data's tokenizer and the Llama pair need it)"}
    import prepare_text
    import train_distill as td
    import yaml
    import zoo
    s = dict(PACKING, **(sizes or {}))
    directory = os.path.join(tmp, "packing")
    tokenizer = zoo.chat_tokenizer(os.path.join(directory, "tokenizer"), [" ".join(CHAT_WORDS)] * 20)
    source = os.path.join(directory, "chat.jsonl")
    with open(source, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in packing_conversations(s["conversations"]))
    out = os.path.join(directory, "prepared")
    with contextlib.redirect_stdout(io.StringIO()):
        assert prepare_text.main([source, "--tokenizer", tokenizer, "--out", out]) == 0
    with open(os.path.join(out, "data.yaml")) as f:
        data = [f"data.{k}={v}" for k, v in yaml.safe_load(f)["data"].items()]
    vocab = int(next(d for d in data if d.startswith("data.vocab_size=")).split("=")[1])
    shape = dict(hidden_size=s["width"], intermediate_size=2 * s["width"], positions=s["seq_len"] + 1)
    student = zoo.hf_llama(os.path.join(directory, "student"), vocab=vocab, **shape)
    teacher = zoo.hf_llama(os.path.join(directory, "teacher"), vocab=vocab, seed=1, num_hidden_layers=4, **shape)
    settings = TRL_SETTINGS + data + [
        f"data.seq_len={s['seq_len']}", "data.too_long=truncate", "data.limit=null", "data.val_windows=8",
        f"train.batch_size={s['batch']}", "train.max_steps=null", "train.epochs=1", "schedule.warmup=0",
        "train.save_every_minutes=null", f"student.hf_dir={student}", f"kd.hf_teacher_dir={teacher}"]
    sides, out = {}, {**s, "rows": {}, "waste": {}, "trained_tokens": {}, "steps": {}}
    for name in ("padded", "packed"):
        run, task = capture_distill(td, settings + [f"data.packing={name == 'packed'}"],
                                    os.path.join(directory, name))
        train, plan = run["train_set"], run["plan"]
        lengths = train.examples["ends"] - train.examples["starts"]
        out["rows"][name], out["steps"][name] = len(train), plan["steps_per_epoch"]
        out["waste"][name] = td.padding_share(lengths, len(train), s["seq_len"])
        out["trained_tokens"][name] = train.count(np.arange(len(train)))
        out.update(examples=len(lengths), length_median=float(np.median(lengths)), length_p90=float(
            np.percentile(lengths, 90)), length_max=int(lengths.max()), truncated=train.examples["long"])
        sides[name] = (run, *distill_steps(td, run, task, plan["steps_per_epoch"]))
    times = {name: [] for name in sides}
    for round_ in range(repeats + 1):  # the first round warms both up
        for name in (list(sides) if round_ % 2 == 0 else list(sides)[::-1]):
            sides[name][1]()
            seconds = sides[name][2]()
            if round_:
                times[name].append(seconds)
    for run, *_ in sides.values():
        close_run(run)
    out["equal_work"] = out["trained_tokens"]["padded"] == out["trained_tokens"]["packed"]
    out["ms_per_1k_tokens"] = {name: 1e6 * best(t) / out["trained_tokens"][name] for name, t in times.items()}
    out["noise"] = {name: noise(t) for name, t in times.items()}
    out["packed_time_per_token_ratio"] = best(times["packed"]) / best(times["padded"])
    out["packed_time_per_token_ratio_noise"] = ratio_noise(times, "packed", "padded")
    return out


def packing_rows(o):
    """Padding waste and step time per trained token, one example a row vs data.packing."""
    if not o:
        return []
    label = "padding vs packing (data.packing)"
    if "skipped" in o:
        return skipped_row(label, "same chat examples", o)
    work = (f"{o['examples']} chat examples (median {o['length_median']:.0f}, p90 {o['length_p90']:.0f}, longest "
            f"{o['length_max']} tokens, {o['truncated']} truncated), rows of {o['seq_len'] + 1} tokens, batch "
            f"{o['batch']} rows; Llama student 2 x {o['width']} from teacher 4 x {o['width']}, sdpa, forward KL, fp32, "
            f"1 thread; one epoch of optimizer_step ({o['steps']['padded']} vs {o['steps']['packed']} steps)")
    check = (f"trained tokens padded {o['trained_tokens']['padded']}, packed {o['trained_tokens']['packed']} "
             f"({'equal' if o['equal_work'] else 'NOT equal'})")
    ms, n = o["ms_per_1k_tokens"], o["noise"]
    return [
        (label, f"share of the rows' tokens that are padding: one example a row ({o['rows']['padded']} rows) vs "
         f"packed first-fit ({o['rows']['packed']} rows); {work}",
         f"{o['waste']['padded']:.1%} vs {o['waste']['packed']:.1%}", "report", "-"),
        (label, f"time per trained token, packed / padded ({ms['packed']:.2f} {pm(n['packed'])} vs "
         f"{ms['padded']:.2f} {pm(n['padded'])} ms per 1k trained tokens); {check}",
         f"{o['packed_time_per_token_ratio']:.3f} {pm(o['packed_time_per_token_ratio_noise'])}", "report",
         "-" if o["equal_work"] else "not comparable: " + check)]


def bench_dry_run(steps, repeats):
    cfg, _ = tp.resolve_config(PROBE_CONFIG, ["train.epochs=null", f"train.max_steps={steps}"])
    plan = tp.plan_schedule(cfg, tp.train_set_size(cfg))
    times = [timed(lambda: tp.lr_curve(cfg, plan)) for _ in range(repeats + 1)][1:]
    result = {"steps": steps, "curve_s": best(times), "steps_per_s": steps / best(times)}
    tool_path = os.path.join(REPO, "test_scheduler_dry_run.py")
    if not os.path.exists(tool_path):
        result["tool_skipped"] = "test_scheduler_dry_run.py not present"
        return result
    import importlib.util
    spec = importlib.util.spec_from_file_location("scheduler_tool", tool_path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with tempfile.TemporaryDirectory() as out:
        argv = [PROBE_CONFIG, "--set", "train.epochs=null", "--set", f"train.max_steps={steps}", "--out", out]
        with contextlib.redirect_stdout(io.StringIO()) as text:
            tool_times = []
            for _ in range(2):
                start = time.perf_counter()
                code = tool.main(argv)
                tool_times.append(time.perf_counter() - start)
    # The tool simulates the run twice (uninterrupted, and with a state_dict round trip at the middle).
    result.update(tool_exit=code, tool_s=best(tool_times), tool_steps_per_s=2 * steps / best(tool_times),
                  tool_passed="dry run passed" in text.getvalue())
    return result


# -----------------------------------------------------------------------------
# A peer: the same probe task trained with PyTorch Lightning (never a dependency of the kit).
def bench_peer(run, task, repeats, tmp):
    try:
        import lightning as L
    except ImportError:
        try:
            import pytorch_lightning as L
        except ImportError:
            return {"skipped": "lightning is not installed (pip install lightning; for this benchmark only)"}
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    cfg, plan = run["cfg"], run["plan"]
    feats, labels = next(task["batches"]([np.arange(plan["num_samples"])]))

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.head = copy.deepcopy(run["module"])
            self.head.load_state_dict(run["snapshot"]["module"])

        def training_step(self, batch, _index):
            loss = F.cross_entropy(self.head(batch[0]), batch[1])
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self):
            optimizer = tp.build_optimizer(cfg, self.head.parameters())
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": tp.build_schedule(optimizer, cfg, plan), "interval": "step"}}

    counter = {"n": 0}

    def lightning_fit():
        counter["n"] += 1
        root = os.path.join(tmp, f"lightning_{counter['n']}")
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(feats, labels), batch_size=cfg["train.batch_size"],
                                             shuffle=True, generator=torch.Generator().manual_seed(cfg["seed"]))
        with quiet_process(), contextlib.redirect_stdout(io.StringIO()):
            trainer = L.Trainer(max_epochs=plan["epochs"], accelerator="cpu", devices=1,
                                accumulate_grad_batches=cfg["train.grad_accum"], gradient_clip_val=cfg["train.clip_grad_norm"],
                                log_every_n_steps=cfg["train.log_every"], logger=L.pytorch.loggers.CSVLogger(root)
                                if hasattr(L, "pytorch") else True, default_root_dir=root, enable_progress_bar=False,
                                enable_model_summary=False, num_sanity_val_steps=0)
            start = time.perf_counter()
            trainer.fit(Probe(), loader)
            elapsed = time.perf_counter() - start
        assert trainer.global_step == plan["total_steps"], (trainer.global_step, plan["total_steps"])
        return elapsed

    sides = {"kit": kit_fit(run, task, [], []), "lightning": lightning_fit}
    times = paired_times(sides, repeats, setup=lambda side: reset_run(run) if side == "kit" else None)
    return {"version": L.__version__, "kit_s": best(times["kit"]),
            "lightning_s": best(times["lightning"]), "ratio": best_ratio(times, "kit", "lightning")}


# -----------------------------------------------------------------------------
# Report: the machine, the table, the JSON line.
def machine():
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "numpy": np.__version__, "os": platform.platform(),
            "load_before": os.getloadavg()[0]}


def fmt(value, spec=".3g"):
    return "n/a" if value is None else format(value, spec)


def skipped_row(label, work, result):
    """The one row a benchmark gives when a package it needs is missing: says which, instead of a number."""
    return [(label, work, "skipped", "-", result["skipped"])]


def noisy_verdict(ratio, target, noise_estimate):
    """"met" / "NOT met" when a ratio lies on its side of the target by more than its noise estimate; otherwise
    the machine, not the code, decides the side, and the verdict says so."""
    if noise_estimate is None or (ratio * (1 + noise_estimate) <= target if ratio <= target else
                                  ratio / (1 + noise_estimate) > target):
        return "met" if ratio <= target else "NOT met"
    return f"{'met' if ratio <= target else 'not met'} by the fastest rounds, but within the noise estimate"


def pm(noise_estimate):
    """A ratio's noise estimate as the table prints it beside the ratio."""
    return "(noise n/a)" if noise_estimate is None else f"\u00b1 {100 * noise_estimate:.1f}%"


def build_rows(r):
    """[(benchmark, measurement, result, target, verdict)] from the measured results."""
    rows = []

    def verdict(ok):
        return "met" if ok else "NOT met"

    for key in LOOP_PARTS:
        loop = r.get(key)
        if not loop:
            continue
        label = (f"loop overhead, {loop['name']} (features {'cached' if loop['cached'] else 'computed every step'}, "
                 f"dim {loop['dim']}, batch {loop['batch']} x accum {loop['accum']}, {loop['steps']} steps)")
        cadence = " and ".join([f"every {loop['save_steps']} steps"] * bool(loop["save_steps"]) +
                               [f"every {loop['save_minutes']:g} minutes"] * bool(loop["save_minutes"]) + ["at the end"])
        rows.append((label, f"fit() / bare loop, whole run (a record every {loop['log_every']} steps, last.pt {cadence}, "
                     f"best.pt at every better eval; evaluation time excluded); fastest of {loop['repeats']} alternating rounds",
                     f"{loop['ratio']:.3f} {pm(loop['ratio_noise'])} ({loop['kit_ms_per_step']:.3f} vs "
                     f"{loop['bare_ms_per_step']:.3f} ms/step)",
                     "<= 1.05", noisy_verdict(loop["ratio"], 1.05, loop["ratio_noise"]) if loop["same_weights"] else
                     "not comparable: the bare loop ended with other weights"))
        rows.append((label, f"the same with its {loop['saves']} checkpoint file writes made no-ops: the per-step part; "
                     f"a write (torch.save to a temp file, fsync, rename, directory fsync: R6) took "
                     f"{fmt(loop['save_ms'], '.1f')} ms (median); at one last.pt per {loop['steps_per_epoch']}-step epoch "
                     f"(the kit's default before train.save_every_minutes) the saves would add "
                     f"{fmt(loop['save_ms'] and loop['save_ms'] / loop['steps_per_epoch'] / loop['bare_ms_per_step'], '.2f')} "
                     "to the ratio", f"{loop['ratio_no_writes']:.3f} {pm(loop['ratio_no_writes_noise'])} "
                     f"({loop['no_writes_ms_per_step']:.3f} ms/step)", "-", "-"))
        s = loop["step"]
        if s:
            rows.append((label, "optimizer_step() / bare step, hot path only (no logging, no checkpoints): "
                         f"{round(s['kit_us'] - s['bare_us']):+d} us per step. Without clipping the bare step takes "
                         f"{s['bare_noclip_us']:.0f} us: torch's clip_grad_norm_ costs it {s['bare_us'] - s['bare_noclip_us']:.0f} us, "
                         "the kit's norm + guards + conditional clip (G3, G4, S9, G7) "
                         f"{s['kit_us'] - s['bare_noclip_us']:.0f} us",
                         f"{s['ratio']:.3f} {pm(s['ratio_noise'])} ({s['kit_us']:.0f} vs {s['bare_us']:.0f} us/step, "
                         f"fastest of {s['blocks']} blocks)", "-", "-"))
    if r.get("syncs"):
        s = r["syncs"]
        rows.append(("host syncs (G7)", f"loop reads per optimizer step over {s['steps']} steps, logging and checkpoint "
                     f"steps included ({', '.join(s['sites'])})", f"{s['per_step']:.3g} (max {s['max_in_a_step']} in a step)",
                     "<= 1", verdict(s["max_in_a_step"] <= 1)))
        rows.append(("host syncs (G7)", "torch-internal reads per step: " + ", ".join(s["torch_sites"]) +
                     " (AdamW's step counter lives on the host by design: no device sync on GPU)",
                     f"{s['torch_per_step']:.3g}", "-", "-"))
    if r.get("cache"):
        c = r["cache"]
        rows.append(("feature cache", f"train() wall time, cache off / on, {c['epochs']} epochs "
                     f"({c['off_s']:.1f} s vs {c['on_s']:.1f} s)", f"{c['speedup']:.2f}x",
                     f">= {0.8 * c['epochs']:.1f}x (0.8 x epochs)", verdict(c["speedup"] >= 0.8 * c["epochs"])))
    topk = r.get("topk", {})
    if "skipped" in topk:
        rows.append(("top-k KD", "train_distill.kd_kl", "skipped", "-", topk["skipped"]))
    else:
        for vocab in (32_000, 128_000):
            t = topk.get(vocab)
            if t:
                rows.append((f"top-k KD, vocab {vocab // 1000}k, {topk['rows']} positions",
                             f"kd_kl forward+backward, top-{topk['k']} / full: time ({t['topk_ms']:.0f} vs {t['full_ms']:.0f} ms; "
                             f"torch.topk over the vocabulary alone takes {t['select_ms']:.0f} ms, a log_softmax of the "
                             f"same logits {t['log_softmax_ms']:.0f} ms)",
                             f"{t['time_ratio']:.2f}", "report", "pays off" if t["time_ratio"] < 1 else "does not pay off"))
                rows.append((f"top-k KD, vocab {vocab // 1000}k, {topk['rows']} positions",
                             f"peak tensor memory ({t['topk_mb']:.0f} vs {t['full_mb']:.0f} MB; one logits tensor "
                             f"{t['logits_mb']:.0f} MB)", f"{t['mem_ratio']:.2f}", "report",
                             "pays off" if t["mem_ratio"] < 1 else "does not pay off"))
    if r.get("kd_chunk"):
        rows += kd_chunk_rows(r["kd_chunk"])
    for name, o in (r.get("offline") or {}).items():
        label = (f"offline KD, {'configs/distill_demo.yaml (kd.gamma 0)' if name == 'demo' else 'vocab 32k, batch 8'}: "
                 f"top-{o['k']} of vocab {o['vocab']:,}, batch {o['batch']} x accum {o['accum']} x {o['seq_len']} tokens")
        sides = ", ".join(f"{s.replace('_', ' ')} {o[s]['ms_per_step']:.1f} ms" for s in ("offline_topk", "online_topk", "online_full"))
        rows.append((label, f"optimizer_step() time incl. reading the batch, / online full KD ({sides}); online top-k / "
                     f"full {o['online_topk_step_ratio']:.2f}", f"{o['offline_topk_step_ratio']:.2f}",
                     "<= 0.5" if name == "demo" else "report",
                     verdict(o["offline_topk_step_ratio"] <= 0.5) if name == "demo" else "-"))
        mems = ", ".join(f"{s.replace('_', ' ')} {o[s]['peak_mb']:.1f} MB ({o[s]['held_mb']:.1f} held + {o[s]['step_peak_mb']:.1f} "
                         "in the step)" for s in ("offline_topk", "online_topk", "online_full"))
        rows.append((label, f"peak tensor memory (weights, optimizer state and the teacher held + the step's "
                     f"transient peak), / online full KD ({mems}); online top-k / full {o['online_topk_mem_ratio']:.2f}",
                     f"{o['offline_topk_mem_ratio']:.2f}", "report", "-"))
        rows.append((label, f"cache build (--cache_teacher): {o['positions']:,} positions in {o['build_s']:.1f} s "
                     f"(teacher load included), {o['cache_bytes'] / 2**20:.1f} MiB",
                     f"{o['build_tokens_per_s']:,.0f} tokens/s, {o['bytes_per_token']:.0f} bytes/token", "report", "-"))
        if "offline_sampled" in o:
            rows.append((label, f"sampled cache (kd.teacher_cache_mode sampled, {o['draws']} draws: "
                         f"{o['sampled_bytes_per_token']:.0f} bytes/token, built in {o['sampled_build_s']:.1f} s): "
                         f"optimizer_step() time / offline top-{o['k']}'s ({o['offline_sampled']['ms_per_step']:.1f} vs "
                         f"{o['offline_topk']['ms_per_step']:.1f} ms)", f"{o['sampled_vs_topk_step_ratio']:.2f}",
                         "report", "-"))
    if r.get("dry_run"):
        d = r["dry_run"]
        rows.append(("dry-run tool", f"lr_curve: {d['steps']} optimizer steps of the real scheduler",
                     f"{d['steps_per_s']:,.0f} steps/s", "-", "-"))
        if "tool_s" in d:
            rows.append(("dry-run tool", f"test_scheduler_dry_run.py, {d['steps']} steps simulated twice (exit {d['tool_exit']})",
                         f"{d['tool_steps_per_s']:,.0f} steps/s ({d['tool_s']:.1f} s)", "-", "-"))
        elif "tool_skipped" in d:
            rows.append(("dry-run tool", "test_scheduler_dry_run.py", "skipped", "-", d["tool_skipped"]))
    peer = r.get("peer", {})
    if "skipped" in peer:
        rows.append(("peer: PyTorch Lightning", "same probe task", "skipped", "-", peer["skipped"]))
    elif peer:
        rows.append((f"peer: PyTorch Lightning {peer['version']}", f"kit fit() / Lightning Trainer.fit, same probe task "
                     f"({peer['kit_s']:.2f} s vs {peer['lightning_s']:.2f} s)", f"{peer['ratio']:.2f}", "-", "-"))
    rows += trl_rows(r.get("trl"))
    rows += onpolicy_rows(r.get("onpolicy"))
    rows += trl_128k_rows(r.get("trl_128k"))
    rows += packing_rows(r.get("packing"))
    rows += trl_chat_rows(r.get("trl_chat"))
    for name, reason in r.get("errors", {}).items():
        rows.append((name, "failed", "n/a", "-", reason))
    return rows


def kd_chunk_rows(c):
    label = (f"chunked KD loss (D6), vocab {c['vocab'] // 1024}k, {c['batch']} x {c['seq']} positions, width {c['width']}, "
             f"kd.chunk_tokens {c['chunk']}")
    mb = lambda runs: "/".join(f"{v:.0f}" for v in runs)  # noqa: E731  every memory run, to show they agree
    return [(label, f"peak tensor memory of the loss step (CE + full KD, student and teacher heads, forward + backward), "
             f"chunked / unchunked ({mb(c['chunked_mb'])} vs {mb(c['unchunked_mb'])} MB over {len(c['chunked_mb'])} runs; "
             f"one [batch, seq, vocab] logits tensor {c['logits_mb']:.0f} MB)", f"{c['mem_ratio']:.3f}", "<= 0.25",
             "met" if c["mem_ratio"] <= 0.25 else "NOT met"),
            (label, f"time of the same step, chunked / unchunked ({c['chunked_ms']:.0f} vs {c['unchunked_ms']:.0f} ms; "
             "each chunk's gradient taken in its forward)", f"{c['time_ratio']:.2f}", "<= 1.3",
             "met" if c["time_ratio"] <= 1.3 else "NOT met")]


def trl_rows(t):
    """The distillation peer's rows: the kit against TRL's GKDTrainer and against a bare loop, same work."""
    if not t:
        return []
    label = "peer: TRL GKDTrainer (distillation)"
    if "skipped" in t:
        return skipped_row(label, "same distillation work", t)
    ms, n = t["ms_per_step"], t["noise"]
    work = (f"GPT-2 student 2 x 128 from teacher 4 x 128, 16 x 64 byte tokens per step, forward KL at T 1, AdamW, fp32, "
            f"1 thread; median of steps {t['warmup'] + 1}-{t['steps']}, fastest of {t['rounds']} interleaved rounds")
    check = (f"step-1 loss kit {t['first_loss']['kit']:.6f}, bare {t['first_loss']['bare']:.6f}, GKD {t['first_loss']['gkd']:.6f}"
             f" ({'equal' if t['equal_first_loss'] else 'NOT equal'}); kit and bare end "
             f"{'bit-identical' if t['kit_bare_bit_identical'] else 'with DIFFERENT weights'}")
    comparable = t["equal_first_loss"] and t["kit_bare_bit_identical"]

    def side(name):
        return f"{ms[name]:.1f} ms {pm(n[name])}"

    def judged(key, target):
        return noisy_verdict(t[key], target, t[key + "_noise"]) if comparable else "not comparable: " + check

    return [
        (label + f" {t['trl_version']}", f"kit online full KD (fit()) / GKDTrainer per optimizer step ({side('kit')} vs "
         f"{side('gkd')}); {work}; {check}", f"{t['trl_step_ratio']:.3f} {pm(t['trl_step_ratio_noise'])}", "<= 0.9",
         judged("trl_step_ratio", 0.9)),
        (label + f" {t['trl_version']}", f"kit offline top-{t['k']} (kd.teacher_cache, fit()) / GKDTrainer per optimizer step "
         f"({side('kit_offline')} vs {side('gkd')})", f"{t['trl_offline_step_ratio']:.3f} "
         f"{pm(t['trl_offline_step_ratio_noise'])}", "<= 0.5", judged("trl_offline_step_ratio", 0.5)),
        ("distill loop overhead", f"kit online full KD (fit()) / a bare KD loop of the same recipe ({side('kit')} vs "
         f"{side('bare')})", f"{t['distill_overhead_ratio']:.3f} {pm(t['distill_overhead_ratio_noise'])}", "<= 1.05",
         judged("distill_overhead_ratio", 1.05))]


def onpolicy_rows(o):
    """On-policy KD against GKDTrainer lmbda 1, what generation adds to the kit's step, generation alone."""
    if not o:
        return []
    label = "on-policy KD: TRL GKDTrainer lmbda 1"
    if "skipped" in o:
        return skipped_row(label, "same on-policy work", o)
    ms, n = o["ms"], o["noise"]
    work = (f"GPT-2 student 2 x 128 from teacher 4 x 128, {o['batch']} prompts of {o['prompt']} byte tokens + "
            f"{o['new']} sampled (temperature 1) per step, forward KL on the generated tokens, fp32, 1 thread; "
            f"median of steps {o['warmup'] + 1}-{o['steps']}, fastest of {o['rounds']} interleaved rounds")
    check = (f"generated and scored per step: kit {o['kit_generated_per_step']}, GKD {o['gkd_generated']} "
             f"({'equal' if o['equal_work'] else 'NOT equal'})")

    def side(name):
        return f"{ms[name]:.0f} ms {pm(n[name])}"

    def judged(key, target):
        return noisy_verdict(o[key], target, o[key + "_noise"]) if o["equal_work"] else "not comparable: " + check

    return [
        (label + f" ({o['trl_version']})", f"kit kd.on_policy_fraction 1 (fit()) / GKDTrainer per optimizer step "
         f"({side('kit')} vs {side('gkd')}); {work}; {check}",
         f"{o['trl_onpolicy_step_ratio']:.3f} {pm(o['trl_onpolicy_step_ratio_noise'])}", "<= 0.8",
         judged("trl_onpolicy_step_ratio", 0.8)),
        ("on-policy KD: what generation adds", f"kit step at kd.on_policy_fraction 1 minus the same run at 0 "
         f"({side('kit')} - {side('kit_off')} = {o['onpolicy_extra_ms']:.0f} ms) / model.generate of the same "
         f"{o['batch']} x {o['new']} tokens ({side('hf_generate')})",
         f"{o['onpolicy_extra_over_generate']:.3f} {pm(o['onpolicy_extra_over_generate_noise'])}", "<= 1.5",
         noisy_verdict(o["onpolicy_extra_over_generate"], 1.5, o["onpolicy_extra_over_generate_noise"])),
        ("generation alone", f"kit generate() tokens/s / model.generate tokens/s, same student and prompts, "
         f"{o['batch']} x {o['new']} tokens ({side('kit_generate')} vs {side('hf_generate')})",
         f"{o['generate_tokens_per_s_ratio']:.3f} {pm(o['generate_tokens_per_s_ratio_noise'])}", "report", "-")]


def trl_128k_rows(t):
    """The kit's chunked full-vocabulary KD against GKDTrainer at a 128,256-token vocabulary."""
    if not t:
        return []
    label = "vocab 128k: TRL GKDTrainer"
    if "skipped" in t:
        return skipped_row(label, "same distillation work", t)
    ms, n = t["ms"], t["noise"]
    work = (f"GPT-2 student 2 x {t['width']} from teacher 4 x {t['width']}, vocabulary {t['vocab']:,}, "
            f"{t['batch']} x 64 tokens per step, forward KL at T 1, kit kd.chunk_tokens {t['chunk']}, fp32, 1 thread")
    check = (f"step-1 loss kit {t['first_loss']['kit']:.6f}, GKD {t['first_loss']['gkd']:.6f} "
             f"({'equal' if t['equal_first_loss'] else 'NOT equal'})")

    def judged(ok_noise_key, ratio, target):
        if not t["equal_first_loss"]:
            return "not comparable: " + check
        return noisy_verdict(ratio, target, t.get(ok_noise_key))

    return [
        (label + f" ({t['trl_version']})", f"kit full-vocabulary KD, chunked (fit()) / GKDTrainer per optimizer step "
         f"({ms['kit']:.0f} ms {pm(n['kit'])} vs {ms['gkd']:.0f} ms {pm(n['gkd'])}); {work}; median of steps "
         f"{t['warmup'] + 1}-{t['steps']}, fastest of {t['rounds']} interleaved rounds; {check}",
         f"{t['trl_step_ratio_128k']:.3f} {pm(t['trl_step_ratio_128k_noise'])}", "<= 0.7",
         judged("trl_step_ratio_128k_noise", t["trl_step_ratio_128k"], 0.7)),
        (label + f" ({t['trl_version']})", f"peak tensor memory, held (weights, optimizer state, teacher) + the step's "
         f"transient peak ({t['kit_mb']:.0f} vs {t['gkd_mb']:.0f} MB; one [batch, 64, vocab] logits tensor "
         f"{t['logits_mb']:.0f} MB); the allocator's count, the same on every run", f"{t['trl_mem_ratio_128k']:.3f}",
         "<= 0.3", judged(None, t["trl_mem_ratio_128k"], 0.3))]


def trl_chat_rows(t):
    """The kit on prepared chat data against GKDTrainer on the same raw rows."""
    if not t:
        return []
    label = "chat data: TRL GKDTrainer"
    if "skipped" in t:
        return skipped_row(label, "same chat distillation work", t)
    ms, n = t["ms"], t["noise"]
    work = (f"Llama-style student 2 x {t['width']} from teacher 4 x {t['width']}, ChatML, {t['rows']} single-turn "
            f"conversations (prepare_text.py for the kit; GKD's own collator renders, masks and left-pads them each "
            f"step), {t['batch']} per step, JSD beta {t['beta']:g} at T 1, AdamW (weight decay 0), constant LR, "
            f"fp32, 1 thread; median of steps {t['warmup'] + 1}-{t['steps']}, fastest of {t['rounds']} interleaved "
            "rounds")
    check = (f"step-1 loss kit {t['first_loss']['kit']:.7f}, GKD {t['first_loss']['gkd']:.7f} "
             f"({'equal' if t['equal_first_loss'] else 'NOT equal'}); largest weight difference after "
             f"{t['steps']} steps {t['max_weight_diff']:.1e}")
    verdict = "-" if t["equal_first_loss"] else "not comparable: " + check
    return [(label + f" ({t['trl_version']})", f"kit fit() on prepared chat examples / GKDTrainer per optimizer step "
             f"({ms['kit']:.1f} ms {pm(n['kit'])} vs {ms['gkd']:.1f} ms {pm(n['gkd'])}); {work}; {check}",
             f"{t['trl_chat_step_ratio']:.3f} {pm(t['trl_chat_step_ratio_noise'])}", "report", verdict)]


def markdown_table(rows):
    lines = ["| benchmark | measurement | result | target | verdict |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


TRL_KEYS = ("trl_step_ratio", "trl_step_ratio_noise", "trl_offline_step_ratio", "trl_offline_step_ratio_noise",
            "distill_overhead_ratio", "distill_overhead_ratio_noise", "equal_first_loss")
ONPOLICY_KEYS = ("trl_onpolicy_step_ratio", "trl_onpolicy_step_ratio_noise", "onpolicy_extra_over_generate",
                 "onpolicy_extra_over_generate_noise", "generate_tokens_per_s_ratio",
                 "generate_tokens_per_s_ratio_noise")
V128K_KEYS = ("trl_step_ratio_128k", "trl_step_ratio_128k_noise", "trl_mem_ratio_128k")
CHAT_KEYS = ("trl_chat_step_ratio", "trl_chat_step_ratio_noise")
PACKING_KEYS = ("waste", "packed_time_per_token_ratio", "packed_time_per_token_ratio_noise")


def summary(r):
    """The JSON line: the headline numbers, null where a part could not run (reason in the table)."""
    topk = r.get("topk", {})
    t32, t128 = topk.get(32_000, {}), topk.get(128_000, {})
    loop, real, uncached = r.get("loop") or {}, r.get("loop_realistic") or {}, r.get("loop_uncached") or {}
    return {"overhead_ratio": loop.get("ratio"), "overhead_ratio_no_writes": loop.get("ratio_no_writes"),
            "checkpoint_save_ms": loop.get("save_ms"), "overhead_ratio_step": (loop.get("step") or {}).get("ratio"),
            "overhead_ratio_realistic": real.get("ratio"), "overhead_ratio_uncached": uncached.get("ratio"),
            "syncs_per_step": (r.get("syncs") or {}).get("per_step"),
            "epochs": (r.get("cache") or {}).get("epochs"), "cache_speedup": (r.get("cache") or {}).get("speedup"),
            "topk_time_ratio_32k": t32.get("time_ratio"), "topk_mem_ratio_32k": t32.get("mem_ratio"),
            "topk_time_ratio_128k": t128.get("time_ratio"), "topk_mem_ratio_128k": t128.get("mem_ratio"),
            "kd_chunk_mem_ratio_128k": (r.get("kd_chunk") or {}).get("mem_ratio"),
            "kd_chunk_time_ratio_128k": (r.get("kd_chunk") or {}).get("time_ratio"),
            "offline_step_ratio": ((r.get("offline") or {}).get("demo") or {}).get("offline_topk_step_ratio"),
            "offline_mem_ratio": ((r.get("offline") or {}).get("demo") or {}).get("offline_topk_mem_ratio"),
            "offline_step_ratio_32k": ((r.get("offline") or {}).get("32k") or {}).get("offline_topk_step_ratio"),
            "offline_mem_ratio_32k": ((r.get("offline") or {}).get("32k") or {}).get("offline_topk_mem_ratio"),
            "cache_bytes_per_token": ((r.get("offline") or {}).get("demo") or {}).get("bytes_per_token"),
            "offline_sampled_vs_topk_step_ratio": ((r.get("offline") or {}).get("demo") or {}).get("sampled_vs_topk_step_ratio"),
            "dryrun_steps_per_s": (r.get("dry_run") or {}).get("steps_per_s"),
            "dryrun_tool_steps_per_s": (r.get("dry_run") or {}).get("tool_steps_per_s"),
            "peer_time_ratio": (r.get("peer") or {}).get("ratio"),
            "overhead_ratio_noise": loop.get("ratio_noise"), "overhead_ratio_no_writes_noise": loop.get("ratio_no_writes_noise"),
            "overhead_ratio_step_noise": (loop.get("step") or {}).get("ratio_noise"),
            **{key: (r.get("trl") or {}).get(key) for key in TRL_KEYS},
            **{key: (r.get("onpolicy") or {}).get(key) for key in ONPOLICY_KEYS},
            **{key: (r.get("trl_128k") or {}).get(key) for key in V128K_KEYS},
            **{key: (r.get("trl_chat") or {}).get(key) for key in CHAT_KEYS},
            **{f"packing_{key}": (r.get("packing") or {}).get(key) for key in PACKING_KEYS}, "quick": r["quick"]}


def write_results(path, r, rows, elapsed):
    m = r["machine"]
    same = ", ".join(f"{r[k]['name']}: {'yes' if r[k]['same_weights'] else 'NO'}"
                     for k in LOOP_PARTS if r.get(k)) or "no loop part ran"
    text = f"""# Benchmark results

Measured by `python benchmarks/bench.py{' --quick' if r['quick'] else ''} --write_results` in {elapsed / 60:.1f} minutes.
How each number is measured and what it means: [README.md](README.md) beside this file, "Reading the
results". The bare loop trains the same recipe as the kit (the config's clipping included): the run checks
that both end with bit-identical weights ({same}).

Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} (intra-op threads: {m['torch_threads']}), python {m['python']},
numpy {m['numpy']}, {m['os']}. Load average (1 min) {m['load_before']:.2f} before and {m['load_after']:.2f} after
the run. Each side of a comparison counts its fastest repeat, which filters out most of what other
processes add; not a disk that other jobs keep busy, which makes the fsynced checkpoint saves slow (the
save times are in the table).

{markdown_table(rows)}

The JSON line the run printed last:

```json
{json.dumps(summary(r))}
```
"""
    with open(path, "w") as f:
        f.write(text)


def run_part(results, name, fn):
    """One benchmark; a failure is reported in the table (and null in the JSON), the others still run."""
    start = time.perf_counter()
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    try:
        results[name] = fn()
    except Exception as err:  # a benchmark that cannot run is a table row, not a crash
        results.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"
    print(f"[bench] {name} done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def run_parts(want, p, results, tmp):
    """The benchmarks in `want`, in an order that reuses the probe run the first ones capture."""
    probe = None
    if want & {"loop", "syncs", "peer"}:
        run_part(results, "setup probe_synthetic", lambda: capture_run(LOOP_SETTINGS, os.path.join(tmp, "probe")))
        probe = results.pop("setup probe_synthetic", None)
    if "loop" in want and probe:
        run_part(results, "loop", lambda: bench_loop("probe_synthetic", probe, p["loop_repeats"], p["step_blocks"]))
    if "syncs" in want and probe:
        run_part(results, "syncs", lambda: bench_syncs(*probe[:2]))
    if "peer" in want and probe:
        run_part(results, "peer", lambda: bench_peer(*probe[:2], p["peer_repeats"], tmp))
    if probe:
        close_run(probe[0])
    for name, label, config, settings, repeats, blocks in (
            ("loop_realistic", "tuab_4s", TUAB_CONFIG, REALISTIC_SETTINGS, p["real_repeats"], p["step_blocks"]),
            ("loop_uncached", "uncached", PROBE_CONFIG, UNCACHED_SETTINGS, p["uncached_repeats"], 0)):
        if name not in want:
            continue
        if name == "loop_realistic":
            settings = settings + tuab_shaped_data(os.path.join(tmp, "tuab_data"), REALISTIC_WINDOWS)
        run_part(results, f"setup {label}", lambda: capture_run(settings, os.path.join(tmp, name), config))
        captured = results.pop(f"setup {label}", None)
        if captured:
            run_part(results, name, lambda: bench_loop(label, captured, repeats, blocks))
            close_run(captured[0])
    if "cache" in want:
        run_part(results, "cache", lambda: bench_cache(p["cache_epochs"], p["cache_repeats"], tmp))
    if "topk" in want:
        run_part(results, "topk", lambda: bench_topk(p["kd_repeats"]))
    if "kd_chunk" in want:
        run_part(results, "kd_chunk", lambda: bench_kd_chunk(p["kd_chunk_repeats"]))
    if "offline" in want:
        run_part(results, "offline", lambda: bench_offline(p["offline_repeats"], tmp))
    if "dry_run" in want:
        run_part(results, "dry_run", lambda: bench_dry_run(p["curve_steps"], p["curve_repeats"]))
    if "trl" in want:
        run_part(results, "trl", lambda: bench_trl(p["trl_repeats"], tmp, p["trl_steps"]))
    if "onpolicy" in want:
        run_part(results, "onpolicy", lambda: bench_onpolicy(p["onpolicy_repeats"], tmp, p["onpolicy_steps"]))
    if "trl_128k" in want:
        run_part(results, "trl_128k", lambda: bench_trl_128k(p["v128k_repeats"], tmp, p["v128k_steps"]))
    if "packing" in want:
        run_part(results, "packing", lambda: bench_packing(p["packing_repeats"], tmp))
    if "trl_chat" in want:
        run_part(results, "trl_chat", lambda: bench_trl_chat(p["chat_repeats"], tmp, p["chat_steps"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a 3-epoch cache run (about 6 minutes)")
    parser.add_argument("--write_results", action="store_true", help="rewrite benchmarks/results.md")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1; 0 = torch's default). The compared ops are small: "
                             "on a shared 2-core machine OpenMP barrier waits add milliseconds of noise to them")
    parser.add_argument("--only", action="append", choices=PARTS, help="run only these parts")
    parser.add_argument("--calibration", nargs="+", metavar="CHECKPOINT",
                        help="instead: val/loss, val/ppl and next-token ECE of train_distill.py checkpoints, one JSON line each")
    args = parser.parse_args(argv)
    if args.calibration:
        import train_distill as td
        for path in args.calibration:
            print(json.dumps({"checkpoint": path, **next_token_calibration(td, path)}))
        return 0
    threads_before = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = {"quick": args.quick, "machine": machine()}
    try:
        with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
            run_parts(set(args.only or PARTS), PARAMS["quick" if args.quick else "full"], results, tmp)
    finally:
        torch.set_num_threads(threads_before)  # a caller (the smoke test) keeps its own setting
    results["machine"]["load_after"] = os.getloadavg()[0]
    elapsed = time.perf_counter() - start
    rows = build_rows(results)
    m = results["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, load {m['load_before']:.2f} -> {m['load_after']:.2f}; "
          f"{elapsed:.0f} s")
    print(markdown_table(rows))
    if args.write_results:
        write_results(os.path.join(HERE, "results.md"), results, rows, elapsed)
    print(json.dumps(summary(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

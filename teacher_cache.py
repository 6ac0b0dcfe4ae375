"""The offline teacher cache (kd.teacher_cache, R9) for train_distill.py.

Offline KD: the teacher runs once over every training window and every eval window, its numbers (teacher_topk's,
or with kd.teacher_cache_mode sampled teacher_sampled's draws) are stored on disk, and training reads them with
no teacher in memory. This file holds everything only the cache uses: its config checks, its size, its identity
(the content of the teacher's and the data's files, R9), the manifest and its checks, the one-builder lock, the
resumable build (--cache_teacher, or the run's start-up), the readers (TeacherCacheWindows), and the sampled
mode's draws.

A companion file: train_distill.py loads it (companion() in its shared config block, through caching()) when
kd.teacher_cache is set with KD on, and hands itself over as `kit`; this file refuses, loads the teacher and
writes through the script's own ConfigError, build_teacher(), atomic_write_text() and content_record(), and
the top-k numbers are the script's teacher_topk (online top-k KD computes the same ones).
"""
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
import types

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

kit: types.ModuleType  # the training script that loaded this file: companion() sets it before this code runs


def cache_problems(cfg):
    """model_source_problems() of an offline run (C3): the cache holds the teacher's top-k log-probabilities (or its
    sampled draws) and nothing else, in a directory."""
    cache, p = cfg["kd.teacher_cache"], []
    if cfg["kd.top_k"] is None and cfg["kd.teacher_cache_mode"] != "sampled":
        p.append(("C3", "kd.top_k", "null, but kd.teacher_cache stores the teacher's top-k: set kd.top_k (e.g. 32), "
                  "kd.teacher_cache_mode=sampled or kd.teacher_cache=null"))
    if cfg["kd.gamma"] != 0:
        p.append(("C3", "kd.gamma", f"{cfg['kd.gamma']!r}, but the hidden-state term needs the teacher's hidden "
                  "states, which kd.teacher_cache does not store: set kd.gamma=0 (or kd.teacher_cache=null for online "
                  "KD)"))
    if os.path.isfile(cache):
        p.append(("C3", "kd.teacher_cache", f"{cache} is a file; give a directory (made when absent)"))
    return p


def teacher_sampled(teacher_logits, temperature, samples, proposal_temperature, stream, first_row, seed=0):
    """What a sampled teacher cache stores (kd.teacher_cache_mode sampled; Anshumann et al. 2025, "Sparse Logit
    Sampling", random-sampling KD), in teacher_topk's layout so the loss is kl_topk unchanged: `samples` tokens
    drawn with replacement per position from r = softmax(logits / proposal_temperature), each distinct id with
    its importance weight w = (count / samples) p / r (p the teacher at T; w = count / samples when r = p), as
    log w [..., slots], ids [..., slots], and a rest of -inf (no bucket). slots = samples + 1: slot 0 always holds
    first_token (E3: val/agreement reads it; weight 0 when it was not drawn), then the other drawn ids by id;
    empty slots weigh 0 (log w -inf). E[w] = p, and kl_topk = sum w (log w - log q) has the gradient
    sum(w) q - w in the student's logits (times 1 / T), so its expectation is forward KL's, q - p.
    The draws depend only on (seed, stream, row, position, draw) (cache_uniforms): the same bytes whatever
    the chunking, the process count or an interrupted build. Rows are first_row, first_row + 1, ... ."""
    with torch.autocast(teacher_logits.device.type, enabled=False):
        logits = teacher_logits.float()
        vocab, seq = logits.shape[-1], logits.shape[-2]
        log_p = F.log_softmax(logits / temperature, -1)
        proposal = proposal_temperature or temperature
        log_r = log_p if proposal == temperature else F.log_softmax(logits / proposal, -1)
        cdf = log_r.double().exp().cumsum(-1)  # float64 on purpose: the bins of a 100k vocabulary stay exact enough
        rows = first_row + np.arange(logits.shape[0])
        u = torch.from_numpy(cache_uniforms(seed, stream, rows[:, None] * seq + np.arange(seq), samples))
        ids = torch.searchsorted(cdf, u.to(cdf.device) * cdf[..., -1:], right=True).clamp_(max=vocab - 1)
        counts = torch.zeros_like(log_p).scatter_add_(-1, ids, torch.ones_like(ids, dtype=log_p.dtype))
        tier = torch.where(counts > 0, 1, 0).scatter_(-1, kit.first_token(logits).unsqueeze(-1), 2)
        rank = tier * vocab + torch.arange(vocab - 1, -1, -1, device=logits.device)  # unique: a deterministic order
        index = rank.topk(min(samples + 1, vocab), -1).indices
        drawn, ratio = counts.gather(-1, index), 0 if log_r is log_p else (log_p - log_r).gather(-1, index)
        log_w = torch.where(drawn > 0, drawn.log() - math.log(samples) + ratio, float("-inf"))  # no inf - inf = nan
        return log_w, index, torch.full(log_p.shape[:-1], float("-inf"), device=log_p.device)


def cache_uniforms(seed, stream, positions, samples):
    """Uniforms in [0, 1) [*positions.shape, samples], each a hash (splitmix64) of (seed, stream, position,
    draw) alone: counter-based, so no generator state to carry between chunks, processes or restarts."""
    def mix(x):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))
    key = mix(np.array([seed * 4 + stream], np.uint64))
    counter = np.asarray(positions, np.uint64)[..., None] * np.uint64(samples) + np.arange(samples, dtype=np.uint64)
    return (mix(mix(counter ^ key)) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


# -----------------------------------------------------------------------------
# Offline KD (kd.teacher_cache): the teacher runs once over every training window and every eval window,
# teacher_topk's numbers are stored, and training reads them with no teacher in memory. The directory:
#   manifest.json        what the cache was built from (teacher, data, seq_len, k, T, dtypes, counts) and
#                        whether it is complete; a run whose config differs is refused (C3)
#   <split>.values       [windows, seq_len, k] log p of the teacher's top-k tokens (fp32, or fp16)
#   <split>.index        [windows, seq_len, k] their ids (uint16 when the vocabulary fits, else int32)
#   <split>.rest         [windows, seq_len] log p of all the other tokens together (the values' dtype)
#   <split>.done         [chunks] one byte per chunk of manifest["chunk"] windows: 1 = written and flushed
# for split "train" (row = window index) and "val" (row = position in the eval windows).
# kd.teacher_cache_mode sampled stores teacher_sampled's numbers in the same files: log weights of the drawn ids,
# the ids, and a rest of -inf, with k = kd.cache_samples + 1 slots (cache_slots).
CACHE_KILL_AT = os.environ.get("KIT_FAULT_CACHE_KILL_AT")  # tests only: "N" SIGKILLs the build inside its Nth chunk
CACHE_SPLITS = ("train", "val")


def cache_dtypes(cfg):
    """(value dtype, id dtype) of the cache files."""
    values = np.dtype(np.float32 if cfg["kd.teacher_cache_dtype"] == "fp32" else np.float16)
    return values, np.dtype(np.uint16 if kit.vocab_size(cfg) <= 2 ** 16 else np.int32)


def cache_slots(settings, vocab):
    """(slots per position, what they hold) of a cache with these settings (a config, or a manifest)."""
    if settings["kd.teacher_cache_mode"] == "sampled":
        n = settings["kd.cache_samples"]
        return min(n + 1, vocab), f"{n} sampled tokens"
    return min(settings["kd.top_k"], vocab), f"top-{min(settings['kd.top_k'], vocab)}"


def teacher_cache_size(cfg, train_windows=None, val_windows=None):
    """The cache's size on disk before it is built: positions x k x (value + id bytes) + positions x value
    bytes (the rest bucket). Returns (bytes, a line saying how)."""
    train_windows = kit.train_set_size(cfg) if train_windows is None else train_windows
    val_windows = len(kit.eval_windows(cfg, kit.window_count(cfg, "val"))) if val_windows is None else val_windows
    values, ids = cache_dtypes(cfg)
    (k, what), positions = cache_slots(cfg, kit.vocab_size(cfg)), (train_windows + val_windows) * cfg["data.seq_len"]
    size = positions * (k * (values.itemsize + ids.itemsize) + values.itemsize)
    return size, (f"{positions:,} positions ({train_windows:,} train + {val_windows:,} eval windows x "
                  f"{cfg['data.seq_len']}) x "
                  f"{k} slots ({what}) x ({values.itemsize} B value + {ids.itemsize} B id) + {values.itemsize} B rest "
                  f"each = {size / 2 ** 20:,.1f} MiB ({size / positions:.0f} bytes per token)")


def free_disk_bytes(path):
    """Free space on the filesystem that holds (or will hold) path."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return shutil.disk_usage(probe).free


def named_files(value, name):
    """(name, path) of every string in a kwargs mapping (nested too) that names an existing file. Not directories:
    a kwarg may name a whole download cache; what a user module reads from one shows in its tensor_digest."""
    if isinstance(value, dict):
        return [item for k in sorted(value) for item in named_files(value[k], f"{name}.{k}")]
    if isinstance(value, (list, tuple)):
        return [item for i, v in enumerate(value) for item in named_files(v, f"{name}.{i}")]
    return [(name, value)] if isinstance(value, str) and value and os.path.isfile(value) else []


def teacher_identity(cfg):
    """R9: the configured teacher as the content of what it is made from, without loading it; None when no
    teacher is named (a complete cache needs none). {"key", "source", "files": {name: content_record},
    "kwargs", "sha256": one digest over the files' sha256 and the kwargs, "user_code"}. The files: the
    checkpoint, every file of a Hugging Face directory, and for a user module (teacher.target, or the network a
    checkpoint holds) its module's source file and every file its kwargs name. Names, not paths,
    key the files: a teacher moved with its bytes unchanged is the same teacher.
    A user module may also read what no key names (a fixed path, the seed build_teacher sets), so for
    user_code the cache check loads it once and compares its tensor_digest as well (check_cache_teacher)."""
    key = next((k for k in ("kd.teacher_checkpoint", "kd.hf_teacher_dir", "teacher.target")
                if cfg[k] is not None), None)
    if key is None:
        return None
    files = {}

    def add(name, path):
        paths = [path] if os.path.isfile(path) else sorted(os.path.join(top, f)
                                                           for top, _, names in os.walk(path) for f in names)
        for p in paths:
            part = name if p == path else f"{name}/{os.path.relpath(p, path)}"
            files[part] = kit.content_record(p)

    arch = {"target": cfg["teacher.target"], "kwargs": cfg["teacher.kwargs"]} if key == "teacher.target" else None
    if key == "kd.teacher_checkpoint":
        add("checkpoint", cfg[key])
        saved = kit.trained_arch(kit.read_teacher_checkpoint(cfg)["config"])
        arch = saved if "target" in saved else None
    elif key == "kd.hf_teacher_dir":
        add("hf_dir", cfg[key])
    if arch is not None:  # the user's module: its code and whatever its kwargs point at
        factory = kit.import_target(arch["target"], key, cfg["launch_dir"])
        source = getattr(sys.modules.get(getattr(factory, "__module__", None)), "__file__", None)
        if source:  # a callable of a compiled module has no source file to hash
            add("module", os.path.abspath(source))
        for name, path in named_files(arch["kwargs"], "kwargs"):
            add(name, path)
    kwargs = json.dumps(arch["kwargs"] if arch else None, sort_keys=True, default=str)
    digest = hashlib.sha256(json.dumps([{n: r["sha256"] for n, r in sorted(files.items())}, kwargs]).encode())
    return {"key": key, "source": cfg[key], "files": files, "kwargs": kwargs, "sha256": digest.hexdigest(),
            "user_code": arch is not None}


def cache_identity(cfg, train_set, val_set, eval_ids):
    """What the cached numbers depend on, besides the teacher, compared field by field with the manifest
    (MANIFEST_KEYS: the config key a difference is reported under), and the data files' content records.
    R9: token files by their content (content_record), not by their path."""
    records = {}

    def data(windows, split):
        if windows.path:
            records[split] = kit.content_record(windows.path)
            ex = windows.examples  # C10: the rows are made of the examples, so their bounds count too, and packed
            rows = {} if ex is None else {  # (data.packing) the rows' layout: a cache of padded rows is not theirs
                "examples_sha256": hashlib.sha256(np.stack([ex["starts"], ex["ends"]]).astype(np.int64).tobytes())
                .hexdigest(), **({"rows_sha256": hashlib.sha256(np.concatenate([ex["order"], ex["row_bounds"]])
                                                                .astype(np.int64).tobytes()).hexdigest()}
                                 if windows.packed else {})}
            return {"sha256": records[split]["sha256"], "bytes": records[split]["bytes"], "dtype": windows.dtype.name,
                    **rows}
        return {"builtin_sha256": hashlib.sha256(windows.tokens.tobytes()).hexdigest()}

    values, ids = cache_dtypes(cfg)
    want = {"data": {"train": data(train_set, "train"), "val": data(val_set, "val")},
            "data.vocab_size": kit.vocab_size(cfg),
            "data.seq_len": cfg["data.seq_len"], "kd.teacher_cache_mode": cfg["kd.teacher_cache_mode"],
            **sampling_identity(cfg),
            "kd.temperature": cfg["kd.temperature"], "kd.teacher_cache_dtype": cfg["kd.teacher_cache_dtype"],
            "train.precision": cfg["train.precision"],  # the teacher's forward runs under the run's autocast, as online
            "data.limit": len(train_set),
            "data.val_windows": hashlib.sha256(np.asarray(eval_ids, np.int64).tobytes()).hexdigest(),
            "value_dtype": values.name, "index_dtype": ids.name}
    return want, records


def sampling_identity(cfg):
    """The manifest's kd.top_k, or a sampled cache's draws and proposal temperature (null resolved: the same draws)."""
    if cfg["kd.teacher_cache_mode"] != "sampled":
        return {"kd.top_k": min(cfg["kd.top_k"], kit.vocab_size(cfg)), "kd.cache_samples": None,
                "kd.cache_proposal_temperature": None}
    return {"kd.top_k": None, "kd.cache_samples": cfg["kd.cache_samples"],
            "kd.cache_proposal_temperature": cfg["kd.cache_proposal_temperature"] or cfg["kd.temperature"]}


MANIFEST_KEYS = {"data": "data.train_bin", **{k: k for k in (  # the mode first: its mismatch is the one to name
    "data.vocab_size", "data.seq_len", "kd.teacher_cache_mode", "kd.cache_samples", "kd.cache_proposal_temperature",
    "kd.top_k", "kd.temperature", "kd.teacher_cache_dtype", "train.precision", "data.limit", "data.val_windows")}}
MANIFEST_FORMAT = 2  # 2: files keyed on content (R9); 1 keyed token files on their path and size


def read_manifest(path):
    name = os.path.join(path, "manifest.json")
    if not os.path.exists(name):
        return None
    try:
        with open(name) as f:
            manifest = json.load(f)
        assert manifest.get("format") in (1, MANIFEST_FORMAT) and "teacher" in manifest
    except (ValueError, AssertionError, OSError):
        raise kit.ConfigError([("C3", "kd.teacher_cache", f"{name} is not a teacher-cache manifest; delete {path} "
                                "or point kd.teacher_cache elsewhere")]) from None
    if manifest["format"] != MANIFEST_FORMAT:
        raise kit.ConfigError([("R9", "kd.teacher_cache", f"{path} was built by an older train_distill.py, which "
                                "keyed its token files on their names, not their content; delete it to rebuild it")])
    manifest.setdefault("kd.teacher_cache_mode", "topk")  # a cache from before the sampled mode is a top-k cache
    return manifest


def check_manifest(manifest, want, path):
    """C3/R9: a cache built from other data (other token bytes) or other KD settings is refused with one line."""
    fix = f"or point kd.teacher_cache at another directory (delete {path} to rebuild it)"
    for split in CACHE_SPLITS:
        was, now = manifest["data"][split], want["data"][split]
        layout = [was.get("rows_sha256"), now.get("rows_sha256")]
        if was != now and dict(was, rows_sha256=0) == dict(now, rows_sha256=0):  # C10: same tokens, other rows
            what = {False: "one example a row (data.packing false)", True: "packed rows (data.packing true)"}
            raise kit.ConfigError([("C10", "data.packing", f"the teacher cache {path} holds the teacher on "
                                    f"{what[bool(layout[0])]}, this run trains on {what[bool(layout[1])]}"
                                    f"{' of another layout' if all(layout) else ''}; set data.packing back {fix}")])
        if was != now:
            key = f"data.{split}_bin" if "sha256" in now else "data.train_bin"
            what = (f"{was.get('dtype')} tokens with sha256 {str(was.get('sha256', was.get('builtin_sha256')))[:12]}, "
                    f"this run's have {str(now.get('sha256', now.get('builtin_sha256')))[:12]}")
            raise kit.ConfigError([("R9", key, f"the teacher cache {path} was built from other {split} tokens "
                                    f"({what}: the file was rewritten or replaced); restore that data {fix}")])
    for field, key in MANIFEST_KEYS.items():
        if manifest.get(field) != want[field]:
            was, now = (json.dumps(v)[:120] for v in (manifest.get(field), want[field]))
            raise kit.ConfigError([("C3", key,
                                    f"the teacher cache {path} was built with {field} {was}, this run has {now}; "
                                    f"use the cache's value {fix}")])


def check_cache_teacher(cfg, manifest, path, device):
    """R9: the teacher the config names is the one the cache was built from, checked on every use of the cache:
    the content of its files (teacher_identity: no teacher is loaded for a checkpoint of the built-in GPT or a
    Hugging Face directory, whose tensors are those files), and for a user module, which may read what no key
    names, the tensor_digest of the teacher actually loaded, once, here. Returns the identity (None: no teacher
    named, the complete cache is taken as it is)."""
    built = manifest["teacher"]
    ident = teacher_identity(cfg)
    if ident is None:
        return None
    fix = f"use that teacher, or point kd.teacher_cache at another directory (delete {path} to rebuild it)"
    if ident["sha256"] != built["sha256"]:
        changed = sorted(set(ident["files"]) ^ set(built["files"]))
        changed += [n for n in sorted(set(ident["files"]) & set(built["files"]))
                     if ident["files"][n]["sha256"] != built["files"][n]["sha256"]]
        what = ("its files differ: " + ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "")) if changed else \
            f"its kwargs differ: {built.get('kwargs')} then, {ident['kwargs']} now"
        raise kit.ConfigError([("R9", ident["key"],
                                f"the teacher cache {path} was built from another teacher ({built['source']}, "
                                f"sha256 {built['sha256'][:12]}; this one's is {ident['sha256'][:12]}: {what}); "
                                f"{fix}")])
    if ident["user_code"]:
        teacher = kit.build_teacher(cfg, device)
        digest = kit.tensor_digest(teacher)
        del teacher
        if digest != built["tensor_digest"]:
            raise kit.ConfigError([("R9", ident["key"], f"the teacher cache {path} was built from another teacher: "
                                    f"{ident['source']} now loads tensors with digest {digest[:12]}, the cache's "
                                    "teacher had "
                                    f"{built['tensor_digest'][:12]} (its code and files are the same, so something "
                                    f"else it reads changed: the seed, a file no kwarg names, ...); {fix}")])
    return ident


def cache_files(path, split, manifest):
    """{part: (file, dtype, shape)} of one split."""
    rows, seq = manifest["windows"][split], manifest["data.seq_len"]
    k = cache_slots(manifest, manifest["data.vocab_size"])[0]
    chunks = -(-rows // manifest["chunk"])
    values, ids = np.dtype(manifest["value_dtype"]), np.dtype(manifest["index_dtype"])
    return {"values": (os.path.join(path, f"{split}.values"), values, (rows, seq, k)),
            "index": (os.path.join(path, f"{split}.index"), ids, (rows, seq, k)),
            "rest": (os.path.join(path, f"{split}.rest"), values, (rows, seq)),
            "done": (os.path.join(path, f"{split}.done"), np.dtype(np.uint8), (chunks,))}


def open_cache_arrays(path, split, manifest, mode):
    arrays = {}
    for part, (name, dtype, shape) in cache_files(path, split, manifest).items():
        if mode == "r" and os.path.getsize(name) != dtype.itemsize * math.prod(shape):
            raise kit.ConfigError([("C3", "kd.teacher_cache",
                                    f"{name} has {os.path.getsize(name)} bytes, the manifest says "
                                    f"{dtype.itemsize * math.prod(shape)}; the cache is damaged: delete {path} to "
                                    "rebuild it")])
        arrays[part] = np.memmap(name, dtype=dtype, mode=mode, shape=shape)
    return arrays


def create_cache(path, manifest):
    """Process 0: the files at full size (sparse: disk fills as chunks are written), then the manifest."""
    os.makedirs(path, exist_ok=True)
    for split in CACHE_SPLITS:
        for name, dtype, shape in cache_files(path, split, manifest).values():
            with open(name, "wb") as f:
                f.truncate(dtype.itemsize * math.prod(shape))
    kit.atomic_write_text(os.path.join(path, "manifest.json"), json.dumps(manifest, indent=1) + "\n")


def lock_cache(path, print_progress):
    """R9: one builder per cache. An exclusive flock on DIR/.lock, held while a process builds; a second
    process says which pid holds it and waits (then finds the cache complete and builds nothing). The kernel
    drops the lock when its holder dies, so a killed build never blocks the next one. Returns the open file."""
    import fcntl
    os.makedirs(path, exist_ok=True)
    f = open(os.path.join(path, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        print_progress(f"teacher cache: {path} is being built by pid {f.read().strip() or 'unknown'} (it holds "
                       f"{f.name}); waiting for it to finish")
        fcntl.flock(f, fcntl.LOCK_EX)
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def unlock_cache(f):
    if f is not None:
        f.seek(0)
        f.truncate()  # the pid goes: a finished cache's files are the same whoever built it
        f.close()


def build_teacher_cache(cfg, d, path, manifest, identity, sets, ident, print_progress):
    """Run the teacher over every window not yet cached and store teacher_topk's numbers.

    Resumable: a chunk of windows is forwarded as one batch (the same batches whatever was done before or
    by how many processes), its three arrays are written and flushed, and only then its done byte is set;
    a killed build redoes its unfinished chunk and ends with the same bytes as an uninterrupted one. Under
    torchrun each process writes a disjoint range of chunks into the same files; process 0 creates them
    and, after a barrier, marks the manifest complete."""
    teacher = kit.build_teacher(cfg, d["device"])
    digest = kit.tensor_digest(teacher)
    if manifest is None:
        manifest = {"format": MANIFEST_FORMAT, "kind": "train_distill.py teacher top-k cache",
                    "teacher": {"key": ident["key"], "source": ident["source"], "sha256": ident["sha256"],
                                "files": ident["files"], "kwargs": ident["kwargs"], "tensor_digest": digest},
                    **identity[0], "data_files": identity[1], "windows": {"train": len(sets["train"][1]),
                                                                          "val": len(sets["val"][1])},
                    "chunk": cfg["train.eval_batch_size"], "complete": False}
        if d["main"]:
            create_cache(path, manifest)
    elif manifest["teacher"]["tensor_digest"] != digest:
        raise kit.ConfigError([("R9", ident["key"],
                                f"the teacher cache {path} was started with another teacher (tensor digest "
                                f"{manifest['teacher']['tensor_digest'][:12]}, this one {digest[:12]}); delete "
                                f"{path} to rebuild")])
    if d["world"] > 1:
        dist.barrier()
    chunk, todo = manifest["chunk"], []
    for split in CACHE_SPLITS:
        arrays = open_cache_arrays(path, split, manifest, "r+")
        mine = np.array_split(np.arange(len(arrays["done"])), d["world"])[d["rank"]]  # disjoint ranges of chunks
        todo += [(split, arrays, int(c)) for c in mine if not arrays["done"][c]]
    bar = None
    if d["main"] and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=len(todo), unit="chunk", desc="teacher cache", dynamic_ncols=True)
    start, shown, amp = time.perf_counter(), time.perf_counter(), kit.autocast(d["device"], cfg["train.precision"])
    T, k, sampled = cfg["kd.temperature"], manifest["kd.top_k"], manifest["kd.teacher_cache_mode"] == "sampled"
    for n, (split, arrays, c) in enumerate(todo, 1):
        windows, ids = sets[split]
        lo, hi = c * chunk, min((c + 1) * chunk, len(ids))
        x, y, pos, _ = kit.batch_parts(windows[ids[lo:hi]], windows.packed)
        kit.check_token_ids(x, y, windows.vocab, f"data.{split}_bin")
        with torch.no_grad(), amp:  # C10: packed rows' teacher numbers, keyed on their layout (cache_identity)
            pos = None if pos is None else kit.to_device(pos, d["device"])
            logits = teacher(kit.to_device(x, d["device"]), positions=pos)[0]
            log_p_top, index, log_rest = kit.teacher_topk(logits, T, k) if not sampled else teacher_sampled(
                logits, T, manifest["kd.cache_samples"], manifest["kd.cache_proposal_temperature"],
                CACHE_SPLITS.index(split), lo)
        arrays["values"][lo:hi] = log_p_top.cpu().numpy().astype(arrays["values"].dtype)
        if CACHE_KILL_AT is not None and CACHE_KILL_AT == str(n):
            arrays["values"].flush()
            os.kill(os.getpid(), signal.SIGKILL)  # mid-write: values on disk, ids, rest and done byte not
        arrays["index"][lo:hi] = index.cpu().numpy().astype(arrays["index"].dtype)
        arrays["rest"][lo:hi] = log_rest.cpu().numpy().astype(arrays["rest"].dtype)
        for part in ("values", "index", "rest"):
            arrays[part].flush()
        arrays["done"][c] = 1  # only after its data is on disk
        arrays["done"].flush()
        if bar is not None:
            bar.update(1)
        elif d["main"] and (time.perf_counter() - shown > 30 or n == len(todo)):
            shown = time.perf_counter()
            print_progress(f"teacher cache: {n}/{len(todo)} chunks of {chunk} windows written by process 0 "
                           f"({n * chunk / (shown - start):.0f} windows/s)")
    if bar is not None:
        bar.close()
    del teacher  # training from the cache holds no teacher
    if d["world"] > 1:
        dist.barrier()
    done = {split: int(open_cache_arrays(path, split, manifest, "r")["done"].sum()) for split in CACHE_SPLITS}
    manifest = dict(manifest, complete=all(done[s] == -(-manifest["windows"][s] // chunk) for s in CACHE_SPLITS),
                    done_chunks=done)
    assert manifest["complete"], done
    if d["main"]:
        kit.atomic_write_text(os.path.join(path, "manifest.json"), json.dumps(manifest, indent=1) + "\n")
    if d["world"] > 1:
        dist.barrier()
    print_progress(f"teacher cache: {path} complete in {time.perf_counter() - start:.1f} s")
    return manifest


def prepare_teacher_cache(cfg, d, train_set, val_set, eval_ids, print_progress, build=True):
    """kd.teacher_cache: check the manifest and the teacher against this run (C3, R9), build whatever is missing
    (the build alone is --cache_teacher), and return the readers of both splits. Training from it loads no
    teacher (a user module's is loaded once, to check it: check_cache_teacher). build=False (--dry_run,
    diagnose_and_fix.py): the same checks and refusals, nothing written, nothing built; returns None."""
    path = cfg["kd.teacher_cache"]

    def current():  # process 0's reading when building: the others never race its writes
        manifest = read_manifest(path) if d["main"] or not build else None
        return kit.all_gather_list([manifest], d["world"])[0] if build else manifest

    def check(manifest):  # -> the teacher's identity, or None
        if manifest is None:
            return None
        check_manifest(manifest, cache_identity(cfg, train_set, val_set, eval_ids)[0], path)
        return check_cache_teacher(cfg, manifest, path, torch.device("cpu"))

    manifest = current()
    ident = check(manifest)
    if manifest is not None and manifest["complete"]:
        print_progress(f"teacher cache: {path} is complete and matches this run ({manifest['windows']['train']:,} "
                       f"train + {manifest['windows']['val']:,} eval windows, "
                       f"{cache_slots(manifest, manifest['data.vocab_size'])[1]}); "
                       "nothing to build")
    elif not any(cfg[k] is not None for k in ("kd.teacher_checkpoint", "kd.hf_teacher_dir", "teacher.target")):
        raise kit.ConfigError([("C3", "kd.teacher_checkpoint", f"null, and the teacher cache {path} is "
                                f"{'incomplete' if manifest else 'absent'}: name the teacher that builds it")])
    elif not build:
        kit.build_teacher(cfg, torch.device("cpu"))  # R10: what the build would refuse of the teacher it loads
    else:
        # R9: one builder; a second one waits, then builds nothing
        lock = lock_cache(path, print_progress) if d["main"] else None
        try:
            again = current()
            if again != manifest:
                manifest, ident = again, check(again)
            if manifest is not None and manifest["complete"]:
                print_progress(f"teacher cache: {path} was completed by another process meanwhile; nothing to build")
            else:
                identity = cache_identity(cfg, train_set, val_set, eval_ids)
                size, how = teacher_cache_size(cfg, len(train_set), len(eval_ids))
                free = free_disk_bytes(path)
                print_progress(f"teacher cache: {'continuing' if manifest else 'building'} {path}: {how}; "
                               f"{free / 2 ** 30:,.1f} GiB free")
                if size > free:
                    print_progress(f"WARNING: the teacher cache needs {size / 2 ** 30:,.2f} GiB, more than the "
                                   f"{free / 2 ** 30:,.2f} GiB "
                                   f"free on the disk of {path}; free space or set kd.teacher_cache_dtype=fp16 / a "
                                   "smaller kd.top_k")
                sets = {"train": (train_set, np.arange(len(train_set))), "val": (val_set, np.asarray(eval_ids))}
                manifest = build_teacher_cache(cfg, d, path, manifest, identity, sets,
                                               ident or teacher_identity(cfg), print_progress)
        finally:
            unlock_cache(lock)
    if not build:
        return None
    return {"path": path, "manifest": manifest, "train": TeacherCacheWindows(train_set, path, manifest, "train"),
            "val": TeacherCacheWindows(val_set, path, manifest, "val")}


class TeacherCacheWindows(torch.utils.data.Dataset):
    """A split's windows with the teacher's cached top-k: indexed by window indices (train: row = window),
    one fetch returns a micro-batch (x, y, log_p_top fp32, index int64, log_rest fp32), read from the
    memory-mapped files (opened lazily: each DataLoader worker maps them itself)."""

    def __init__(self, windows, path, manifest, split):
        self.windows, self.path, self.manifest, self.split, self.arrays = windows, path, manifest, split, None
        open_cache_arrays(path, split, manifest, "r")  # sizes checked now, not in a worker

    def __reduce__(self):  # pickled (a spawned DataLoader worker): rebuilt there through the script, arrays unopened
        return kit.cache_reader, (self.windows, self.path, self.manifest, self.split)

    def __len__(self):
        return len(self.windows)

    def teacher(self, rows):
        """(log_p_top, index, log_rest) of these rows, as kd_kl_topk takes them."""
        if self.arrays is None:
            self.arrays = open_cache_arrays(self.path, self.split, self.manifest, "r")
        rows = np.asarray(rows, dtype=np.int64)
        return (torch.from_numpy(self.arrays["values"][rows]).float(),
                torch.from_numpy(self.arrays["index"][rows]).long(),
                torch.from_numpy(self.arrays["rest"][rows]).float())

    def __getitem__(self, indices):
        return (*self.windows[indices], *self.teacher(indices))



"""The TUAB v3.0.1 download (EDF files) -> the .npy windows train_probe.py reads, and their manifest (C6, C7).

    python prepare_tuab.py /path/to/tuh_eeg_abnormal/v3.0.1 --out data/tuab_4s --config configs/tuab_4s.yaml
    python prepare_tuab.py SRC --out DIR --config CONFIG --set data.montage=tcp --workers 8

It runs once, before any training (as nanoGPT's data/*/prepare.py files do), and writes
OUT/{train,val,test}_{x,y}.npy and OUT/manifest.json as the config's data.* keys say. train_probe.py checks the
manifest at every run, dry run and diagnose (prepared_data_problems) and never imports this file: copied alone,
it trains on windows prepared here or on your own. EDF files are read with MNE, an optional package imported only
here: it is the reader BIOT, LaBraM and CBraMod prepared TUAB with, reads only the channels asked for and converts
each one from its own physical dimension to volts. A recording's windows are a function of its bytes and
window_settings() alone, the split a function of the subject id and data.val_fraction alone, so the outputs are
the same bytes at any worker count and after any kill; the same command continues a killed preparation.
"""
import contextlib
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import time
import warnings
from fractions import Fraction

import numpy as np

try:
    from train_probe import (ELECTRODE_ALIASES, INCOMPLETE, ConfigError, atomic_write_text, one_line_parser,
                             read_content, read_manifest, remove_stale_temp_files, resolve_config, window_channels,
                             window_settings, write_stdout)
except ModuleNotFoundError as missing:  # C3: the tool runs the script's own config checks; copied alone: one line
    if missing.name != "train_probe":
        raise
    print("prepare_tuab.py: needs train_probe.py beside it (copy it from the kit): the windows are made and checked "
          "with the training script's own config", file=sys.stderr)
    raise SystemExit(2)

TUAB_LABELS = {"normal": 0, "abnormal": 1}  # the directory a recording sits in is its label
TUAB_SPLITS = {"train": "train", "eval": "test"}  # the official eval directory is the test split; val comes from train
TUAB_NAME = r"^(?P<subject>[A-Za-z0-9]+)_s(?P<session>\d+)_t(?P<token>\d+)\.edf$"  # aaaaamye_s001_t000.edf
LABEL_SUFFIXES = ("-REF", "-LE", "-AR", "-AVG")  # 'EEG FP1-REF' (01_tcp_ar), 'EEG FP1-LE' (linked ears, 02_tcp_le)
VOLT_UNITS = ("uV", "\u00b5V", "\u03bcV", "mV", "V")  # physical dimensions MNE converts to volts (it leaves others)
UNIT_SCALE = {"V": 1.0, "mV": 1e3, "uV": 1e6}  # MNE's volts -> data.units
EDGES = ("non-overlapping windows from the recording's first sample; the last partial window (under one window of "
         "samples) is dropped")
SPLIT_RULE = ("test = the official eval directory; val = the train directory's subjects whose "
              "sha256(subject id) read as a fraction of 2^64 is below data.val_fraction; train = the other subjects")
# how the windows were made, in manifest.json
METHOD = {"reader": "mne.io.read_raw_edf (each channel converted from its EDF physical dimension to volts)",
          "resampler": "scipy.signal.resample_poly (polyphase FIR, Kaiser window: anti-aliasing low-pass)",
          "filters": "mne.filter.filter_data / notch_filter (zero-phase FIR) after resampling, if set",
          "edges": EDGES, "labels": {str(v): k for k, v in TUAB_LABELS.items()}, "split": SPLIT_RULE}
PREP_OUTPUTS = [f"{split}_{kind}.npy" for split in ("train", "val", "test") for kind in ("x", "y")]
PREP_KILL_AT = os.environ.get("KIT_FAULT_PREP_KILL_AT")  # tests only: "file:NAME" or "assemble:NAME" SIGKILLs there


class SkipRecording(Exception):
    """A recording that cannot give windows: listed in manifest.json with this reason, never zero-filled."""


def electrode(label):
    """An EDF label as a 10-20 electrode name: 'EEG FP1-REF', 'EEG FP1-LE', 'Fp1' -> 'FP1'; 'EEG T7-REF' -> 'T3'."""
    name = label.strip().upper().removeprefix("EEG ").strip()
    for suffix in LABEL_SUFFIXES:
        name = name.removesuffix(suffix)
    return ELECTRODE_ALIASES.get(name, name)


def source_problems(src):
    """C3: what keeps SRC from being the TUAB download: not a directory, or not its layout."""
    if not src or not os.path.isdir(src):
        return [("C3", "SRC", f"{src} is not a directory; give the TUAB v3.0.1 download (the directory that holds "
                 "edf/)")]
    root = os.path.join(src, "edf") if os.path.isdir(os.path.join(src, "edf")) else src
    missing = [f"{s}/{label}" for s in TUAB_SPLITS for label in TUAB_LABELS
               if not os.path.isdir(os.path.join(root, s, label))]
    if not missing:
        return []
    return [("C3", "SRC", f"{src} does not have the TUAB layout edf/{{train,eval}}/{{normal,abnormal}}/01_tcp_ar/"
             f"*.edf (no {', '.join(missing)} under {root}); give the v3.0.1 directory of the download")]


def out_problems(out):
    """C3: what keeps --out from holding the windows: missing, a file (or under one), a directory the user may not
    write, or one holding windows this tool did not write (never overwritten)."""
    if not out:
        return [("C3", "--out", "missing: give the directory for the windows, e.g. data/tuab_4s")]
    there = os.path.abspath(out)
    while not os.path.exists(there):  # the deepest part that exists: os.makedirs makes the rest
        there = os.path.dirname(there)
    if not os.path.isdir(there):
        return [("C3", "--out", f"{there} is a file, not a directory; choose another --out")]
    if not os.access(there, os.W_OK | os.X_OK):
        return [("C3", "--out", f"{there} may not be written (permission denied); fix its permissions or choose "
                 "another --out")]
    foreign = [n for n in PREP_OUTPUTS if os.path.exists(os.path.join(out, n))]
    if foreign and read_manifest(out) is None and not os.path.exists(os.path.join(out, INCOMPLETE)):
        return [("C3", "--out", f"{out} already holds {', '.join(foreign)}, which prepare_tuab.py did not write "
                 "(there is no manifest.json of its own); choose another --out, or remove them")]
    return []


def tuab_recordings(src):
    """Every .edf under SRC's edf/{train,eval}/{normal,abnormal}/ (any montage directory below those), in sorted
    order: (root, recordings, skipped). A file named otherwise than SUBJECT_sNNN_tNNN.edf is skipped; SRC without
    the layout or without any .edf is a config error (C3)."""
    problems = source_problems(src)
    if problems:
        raise ConfigError(problems)
    root = os.path.join(src, "edf") if os.path.isdir(os.path.join(src, "edf")) else src
    recordings, skipped = [], []
    for split_dir in TUAB_SPLITS:
        for label_dir, label in TUAB_LABELS.items():
            for top, dirs, files in os.walk(os.path.join(root, split_dir, label_dir), followlinks=True):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(f for f in files if f.lower().endswith(".edf") and not f.startswith(".")):
                    path = os.path.join(top, name)
                    stat = os.stat(path)
                    rec = {"path": path, "rel": os.path.relpath(path, root).replace(os.sep, "/"), "size": stat.st_size,
                           "mtime_ns": stat.st_mtime_ns, "split_dir": split_dir, "label": label}
                    parts = re.match(TUAB_NAME, name)
                    if parts is None:
                        skipped.append({"file": rec["rel"], "reason": "the name is not SUBJECT_sNNN_tNNN.edf"})
                    else:
                        recordings.append({**rec, "subject": parts["subject"]})
    if not recordings and not skipped:
        raise ConfigError([("C3", "SRC", f"no .edf files under {root}/{{train,eval}}/{{normal,abnormal}}/; "
                            "is the download complete?")])
    recordings.sort(key=lambda r: (os.path.basename(r["rel"]), r["rel"]))
    return root, recordings, skipped


def in_val(subject, val_fraction):
    """C7: a train-directory subject goes to val by its id alone: sha256, never Python's per-process hash(),
    file-system order, the worker count or a random generator, so every machine draws the same split."""
    return int.from_bytes(hashlib.sha256(subject.encode()).digest()[:8], "big") / 2 ** 64 < val_fraction


def edf_header(path):
    """The EDF header fields checked before MNE reads the file: labels, physical dimensions, samples per record,
    record duration and record count. A file shorter than its header promises is truncated (MNE would read
    what is there without a word), so it is skipped."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
            count = int(head[252:256])
            fields = f.read(256 * count)
        if head[:8].strip() != b"0" or len(fields) < 256 * count or count < 1:
            raise ValueError
        header_bytes, records, duration = int(head[184:192]), int(head[236:244]), head[244:252].strip().decode()
        text = [fields[i * 16:(i + 1) * 16].strip().decode("latin-1") for i in range(count)]
        dims = [fields[96 * count + i * 8:96 * count + (i + 1) * 8].strip().decode("latin-1") for i in range(count)]
        samples = [int(fields[216 * count + i * 8:216 * count + (i + 1) * 8]) for i in range(count)]
        seconds = Fraction(duration)
    except (ValueError, ZeroDivisionError):
        raise SkipRecording("not a readable EDF file (its header does not parse)") from None
    if header_bytes != 256 * (count + 1) or seconds <= 0 or min(samples) < 1:
        raise SkipRecording("not a readable EDF file (inconsistent header)")
    if head[192:197] == b"EDF+D":
        raise SkipRecording("EDF+D (discontinuous) recording: windows would span its gaps")
    size, record_bytes = os.path.getsize(path), 2 * sum(samples)
    records = records if records >= 0 else (size - header_bytes) // record_bytes
    if size < header_bytes + records * record_bytes:
        raise SkipRecording(f"truncated: {size} bytes, its header promises {header_bytes + records * record_bytes}")
    return {"labels": text, "dims": dims, "samples": samples, "records": records, "seconds": seconds}


def recording_windows(path, settings):
    """One recording -> float32 windows [n, channels, window_samples]: the channels picked by name (a missing one
    skips the recording), converted to data.units, bipolar pairs subtracted, resampled to data.sample_rate with
    an anti-aliasing polyphase filter, optionally band-passed and notched, then cut by EDGES."""
    head = edf_header(path)
    found = {}
    for i, label in enumerate(head["labels"]):
        found.setdefault(electrode(label), []).append(i)
    needed = sorted({e for name in settings["channels"] for e in name.split("-")}, key=lambda e: (e not in found, e))
    absent = [e for e in needed if e not in found]
    if absent:
        raise SkipRecording(f"missing channel(s) {', '.join(absent)}")
    twice = [e for e in needed if len(found[e]) > 1]
    if twice:
        raise SkipRecording(f"channel(s) {', '.join(twice)} appear more than once: "
                            + ", ".join(head["labels"][i] for e in twice for i in found[e]))
    index = [found[e][0] for e in needed]
    rates = {Fraction(head["samples"][i]) / head["seconds"] for i in index}
    if len(rates) > 1:
        raise SkipRecording("the channels are sampled at different rates: " + ", ".join(
            f"{head['labels'][i]} {float(head['samples'][i] / head['seconds']):g} Hz" for i in index))
    odd = [f"{head['labels'][i]} '{head['dims'][i]}'" for i in index if head["dims"][i] not in VOLT_UNITS]
    if odd:
        raise SkipRecording(f"physical dimension not a voltage, so the unit is unknown: {', '.join(odd)}")
    source = rates.pop()
    ratio = Fraction(settings["sample_rate"]).limit_denominator(10 ** 6) / source
    length = math.ceil(head["records"] * head["samples"][index[0]] * ratio)
    if length < settings["window_samples"]:
        raise SkipRecording(f"shorter than one window: {float(length / settings['sample_rate']):.3g} s < "
                            f"{settings['window_seconds']:g} s")
    import mne
    import scipy.signal
    labels = [head["labels"][i] for i in index]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MNE's notes on the file's other channels; the checks above are ours
            raw = mne.io.read_raw_edf(path, include=labels, preload=False, verbose="error")
            volts = raw.get_data(picks=labels)
    except Exception as err:  # whatever MNE raises for a file it cannot read
        first_line = (str(err).splitlines() or [""])[0][:160]
        raise SkipRecording(f"MNE cannot read it: {type(err).__name__}: {first_line}") from None
    row = {e: volts[k] for k, e in enumerate(needed)}
    x = np.stack([row[n] if "-" not in n else row[n.split("-")[0]] - row[n.split("-")[1]]
                  for n in settings["channels"]])
    x *= UNIT_SCALE[settings["units"]]
    if ratio != 1:  # a Kaiser-windowed FIR low-pass at the lower Nyquist before decimation: no aliasing
        x = scipy.signal.resample_poly(x, ratio.numerator, ratio.denominator, axis=1)
    rate = settings["sample_rate"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "filter longer than the signal" on a short recording: MNE pads it
        if settings["bandpass"]:
            x = mne.filter.filter_data(x, rate, *settings["bandpass"], verbose="error")
        if settings["notch"]:
            x = mne.filter.notch_filter(x, rate, [settings["notch"]], verbose="error")
    n, size = x.shape[1] // settings["window_samples"], settings["window_samples"]
    return np.ascontiguousarray(x[:, :n * size].reshape(len(x), n, size).transpose(1, 0, 2), dtype=np.float32)


def prepare_recording(job):
    """One worker process, one recording: its windows as .parts/KEY.npy, or the reason it is skipped as
    .parts/KEY.skip.json. Both are written under a temporary name and renamed, so a kill leaves a finished
    part or none, and a later run redoes only the recordings without a part."""
    path, part, settings, parent = job
    orphaned = parent is not None and os.getppid() != parent  # the run that queued this file was killed
    if orphaned:  # stop, or this worker would go on through every file still buffered in the task queue
        os._exit(0)
    if parent is not None and PREP_KILL_AT == f"file:{os.path.basename(path)}":  # tests only: the run's process
        os.kill(parent, signal.SIGKILL)                                          # and this worker die at once
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        windows = recording_windows(path, settings)
    except SkipRecording as skip:
        atomic_write_text(part[:-len(".npy")] + ".skip.json", json.dumps({"reason": str(skip)}))
    else:
        atomic_write_text(part, npy_bytes(windows))
    if parent is not None and os.getppid() != parent:
        os._exit(0)  # the part is kept; there is nobody to tell (and no traceback about the broken pipe)
    return part


def prepare_code_digest():
    """The source of the functions a window is computed by: a change to any of them invalidates every part."""
    import inspect
    text = "".join(inspect.getsource(fn) for fn in (window_channels, window_settings, electrode, edf_header,
                                                     recording_windows))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare_inputs(recordings, skipped, cfg):
    """C7: everything the prepared directory depends on, computed here only: the source files (name, size,
    mtime), the settings, the code and the libraries' versions. Equal to manifest.json's "inputs" = up to date."""
    from importlib.metadata import version
    files = {r["rel"]: {"size": r["size"], "mtime_ns": r["mtime_ns"]} for r in recordings}
    files.update({s["file"]: None for s in skipped})  # misnamed files: only their presence counts
    return {"source_files": dict(sorted(files.items())),
            "settings": {**window_settings(cfg), "val_fraction": cfg["data.val_fraction"]},
            "code": prepare_code_digest(), "versions": {"mne": version("mne"), "scipy": version("scipy"),
                                                         "numpy": np.__version__}}


def part_path(parts_dir, rec, inputs):
    """.parts/KEY.npy: KEY from what this recording's windows depend on. Not data.val_fraction: a changed split
    (after "the val split has no usable recording") reuses every part."""
    settings = {k: v for k, v in inputs["settings"].items() if k != "val_fraction"}
    key = json.dumps([rec["rel"], rec["size"], rec["mtime_ns"], settings, inputs["code"], inputs["versions"]],
                     sort_keys=True)
    return os.path.join(parts_dir, hashlib.sha256(key.encode()).hexdigest()[:24] + ".npy")


def up_to_date(out, inputs):
    """A finished preparation of the same inputs whose outputs are all there at their recorded sizes."""
    manifest = read_manifest(out)
    if manifest is None or manifest.get("inputs") != inputs or os.path.exists(os.path.join(out, INCOMPLETE)):
        return False
    return all(os.path.isfile(os.path.join(out, name)) and os.path.getsize(os.path.join(out, name)) == meta["bytes"]
               for name, meta in manifest["outputs"].items())


def prep_fault(point):
    """Tests only (C7): die at one point of a preparation, as a kill or a power cut would."""
    if PREP_KILL_AT == point:
        os.kill(os.getpid(), signal.SIGKILL)


def run_parts(jobs, workers, say):
    """Every job through prepare_recording, one process per file, with a tqdm bar (ETA) on a terminal and a
    line a minute elsewhere."""
    bar, started, said, done = None, time.monotonic(), time.monotonic(), 0
    if sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), unit="file", desc="EDF -> windows", dynamic_ncols=True)
    if workers > 1:
        import multiprocessing
        pool = multiprocessing.get_context().Pool(workers, initializer=signal.signal,
                                                  initargs=(signal.SIGINT, signal.SIG_IGN))
        # (Ctrl-C reaches the whole process group: the parent alone stops, and terminates them)
        results = pool.imap_unordered(prepare_recording, jobs)
    else:
        pool, results = None, map(prepare_recording, jobs)
    try:
        for _ in results:
            done += 1
            if bar is not None:
                bar.update(1)
            elif time.monotonic() - said >= 60:
                said, spent = time.monotonic(), time.monotonic() - started
                say(f"prepare_tuab: {done}/{len(jobs)} recordings ({done / len(jobs):.0%}), "
                    f"ETA {spent / done * (len(jobs) - done) / 60:.1f} min")
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()


def assign_splits(recordings, parts, val_fraction):
    """C7: each usable recording's split and the skip list: eval -> test, train -> val or train by in_val().
    A subject with recordings in the official eval split keeps only those, so no subject is in two splits."""
    usable, skipped = [], []
    for rec in recordings:
        skip_file = parts[rec["rel"]][:-len(".npy")] + ".skip.json"
        if os.path.exists(skip_file):
            with open(skip_file) as f:
                skipped.append({"file": rec["rel"], "reason": json.load(f)["reason"]})
        else:
            usable.append(rec)
    test_subjects = {r["subject"] for r in usable if r["split_dir"] == "eval"}
    splits = {"train": [], "val": [], "test": []}
    for rec in usable:
        if rec["split_dir"] == "eval":
            splits["test"].append(rec)
        elif rec["subject"] in test_subjects:
            skipped.append({"file": rec["rel"], "reason": f"subject {rec['subject']} also has recordings in the "
                                                          "official eval split (the test split): left out of train "
                                                          "and val"})
        else:
            splits["val" if in_val(rec["subject"], val_fraction) else "train"].append(rec)
    return splits, sorted(skipped, key=lambda s: s["file"])


def write_split(out, split, recs, parts, settings):
    """DIR/<split>_x.npy [N, C, T] float32 written through np.lib.format.open_memmap one recording at a time (a
    split is never in memory) and DIR/<split>_y.npy [N] int64, each under a temporary name, then renamed.
    Returns the split's rows of the recording table: [file, first window, windows, label]."""
    x_path, y_path = os.path.join(out, f"{split}_x.npy"), os.path.join(out, f"{split}_y.npy")
    counts = [np.load(parts[r["rel"]], mmap_mode="r").shape[0] for r in recs]
    shape = (sum(counts), len(settings["channels"]), settings["window_samples"])
    tmp = f"{x_path}.tmp-{os.getpid()}"
    x, at, table = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape), 0, []
    for rec, n in zip(recs, counts):
        x[at:at + n] = np.load(parts[rec["rel"]], mmap_mode="r")
        table.append([rec["rel"], at, n, rec["label"]])
        at += n
        prep_fault(f"assemble:{split}_x")
    x.flush()
    del x
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, x_path)
    labels = np.concatenate([np.full(n, rec["label"], np.int64) for rec, n in zip(recs, counts)])
    atomic_write_text(y_path, npy_bytes(labels))
    return table


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def prepare_tuab(src, out, cfg, workers=None, say=write_stdout, problems=()):
    """SRC (TUAB v3.0.1) -> OUT/{train,val,test}_{x,y}.npy and OUT/manifest.json. Resumable: a kill at any point
    and the same command finishes with the bytes of an uninterrupted run; with the same inputs a second run
    only says "up to date". Returns the manifest. C3: every problem with SRC, --out, the EDF reader and the
    command line's other `problems` is said at once, one line each (as prepare_text.py does), before any work."""
    problems = source_problems(src) + out_problems(out) + list(problems)
    if importlib.util.find_spec("mne") is None:
        problems.append(("C3", "SRC", f"reading EDF files needs the mne package, which is not installed for "
                         f"{sys.executable}; install it: {sys.executable} -m pip install mne"))
    if problems:
        raise ConfigError(problems)
    root, recordings, misnamed = tuab_recordings(src)
    inputs = prepare_inputs(recordings, misnamed, cfg)
    parts_dir = os.path.join(out, ".parts")
    if up_to_date(out, inputs):
        shutil.rmtree(parts_dir, ignore_errors=True)  # a kill after the manifest, before the parts were removed
        say(f"prepare_tuab: {out} is up to date ({len(inputs['source_files'])} source files, same settings)")
        return read_manifest(out)
    start_output(out, parts_dir)
    parts = {r["rel"]: part_path(parts_dir, r, inputs) for r in recordings}
    read_recordings(recordings, parts, inputs["settings"], workers,
                    lambda text: say(f"prepare_tuab: {len(recordings) + len(misnamed)} EDF files under {root}; {text}"))
    splits, skipped = assign_splits(recordings, parts, cfg["data.val_fraction"])
    skipped = sorted(skipped + misnamed, key=lambda s: s["file"])
    for split, recs in splits.items():
        if not recs:
            raise ConfigError([("C3", "data.val_fraction" if split == "val" else "SRC",
                                f"the {split} split has no usable recording ({len(skipped)} skipped: "
                                + "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3])
                                + ("; raise data.val_fraction" if split == "val" else "") + ")")])
    tables = {split: write_split(out, split, recs, parts, inputs["settings"]) for split, recs in splits.items()}
    dir_fd = os.open(out, os.O_RDONLY)
    os.fsync(dir_fd)
    os.close(dir_fd)
    manifest = {"format": 1, "made_by": "prepare_tuab.py", "source_root": os.path.abspath(root), "inputs": inputs,
                "method": {**METHOD, "units": inputs["settings"]["units"]}, **split_summary(splits, tables),
                "skipped": skipped, "recordings": tables,
                "outputs": {name: output_record(os.path.join(out, name)) for name in PREP_OUTPUTS}}
    atomic_write_text(os.path.join(out, "manifest.json"), json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.unlink(os.path.join(out, INCOMPLETE))
    shutil.rmtree(parts_dir, ignore_errors=True)
    for split, s in manifest["splits"].items():
        say(f"  {split:5s} {s['windows']:>8} windows ({s['windows_by_label']['normal']} normal, "
            f"{s['windows_by_label']['abnormal']} abnormal) from {s['recordings']} recordings of "
            f"{len(s['subjects'])} subjects")
    mixed = sum(map(len, manifest["subjects_with_normal_and_abnormal"].values()))
    say(f"prepare_tuab: wrote {out}: no subject in two splits; {len(skipped)} files skipped, "
        f"{mixed} subject(s) with normal and abnormal recordings (each recording keeps its label); "
        f"manifest.json lists them")
    return manifest


def start_output(out, parts_dir):
    """OUT made ready to write (out_problems() has checked it): the manifest removed and an INCOMPLETE file written
    first, so from here until the end a kill leaves a directory no run accepts (C6)."""
    os.makedirs(parts_dir, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(out, "manifest.json"))  # C6: from here on the outputs are not the finished ones
    atomic_write_text(os.path.join(out, INCOMPLETE), "a prepare_tuab.py run is writing this directory or was "
                      "stopped; run the same command again to finish it\n")
    remove_stale_temp_files(out, parts_dir)


def read_recordings(recordings, parts, settings, workers, say):
    """Every recording without a part yet through prepare_recording, on `workers` processes (default: every core)."""
    todo = [r for r in recordings
            if not os.path.exists(parts[r["rel"]]) and not os.path.exists(parts[r["rel"]][:-4] + ".skip.json")]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(workers or cores, len(todo) or 1))
    jobs = [(r["path"], parts[r["rel"]], settings, os.getpid() if workers > 1 else None)
            for r in todo]
    say(f"{len(recordings) - len(todo)} done before, {len(todo)} to read with {workers} worker process(es); "
        f"{settings['sample_rate']:g} Hz, {settings['window_seconds']:g} s windows, {len(settings['channels'])} "
        f"channels, {settings['units']}")
    import mne  # noqa: F401  before the workers start: forked ones inherit it instead of each importing it
    import scipy.signal  # noqa: F401
    run_parts(jobs, workers, say)


def split_summary(splits, tables):
    """The manifest's account of the split (C7): per split the windows and recordings (by label) and the
    subjects; that no subject is in two splits; the subjects with both normal and abnormal recordings."""
    names = {v: k for k, v in TUAB_LABELS.items()}
    subjects = {split: sorted({r["subject"] for r in recs}) for split, recs in splits.items()}
    disjoint = all(not set(subjects[a]) & set(subjects[b]) for a, b in (("train", "val"), ("train", "test"),
                                                                         ("val", "test")))
    assert disjoint, "a subject in two splits"  # C7: by construction; checked, and stated in the manifest

    def by_label(table, count):
        return {names[k]: sum(count(t) for t in table if t[3] == k) for k in names}

    return {"splits": {split: {"windows": sum(t[2] for t in table), "recordings": len(table),
                               "windows_by_label": by_label(table, lambda t: t[2]),
                               "recordings_by_label": by_label(table, lambda t: 1),
                               "subjects": subjects[split]} for split, table in tables.items()},
            "subjects_disjoint": disjoint,
            "subjects_with_normal_and_abnormal": {
                split: sorted(s for s in subjects[split] if len({r["label"] for r in recs if r["subject"] == s}) == 2)
                for split, recs in splits.items()}}


def output_record(path):
    """The manifest's line for one written file: what training checks it against (C6)."""
    array = np.load(path, mmap_mode="r")
    shape, dtype = list(array.shape), str(array.dtype)
    del array  # the memory map closed before the file is hashed
    return {"shape": shape, "dtype": dtype, "bytes": os.path.getsize(path), "sha256": read_content(path)["sha256"]}


def launcher_command():
    """launch.sh beside this tool as typed from the current directory: ./launch.sh in the kit, from anywhere else
    its shorter path (relative or absolute): a user in their project directory has no ./launch.sh."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launch.sh")
    relative = os.path.relpath(path)
    return "./launch.sh" if relative == "launch.sh" else min(relative, path, key=len)


def next_step(cfg, out, config_path, overrides=()):
    """The command that trains on what prepare_tuab() wrote: the config's own, with these files when it names others,
    and the --set values the windows were made with (C6: without them the run refuses the windows)."""
    keys = [f"data.{split}_{kind}" for split in ("train", "val", "test") for kind in ("x", "y")]
    written = {key: os.path.join(out, key[len("data."):] + ".npy") for key in keys}
    named = config_path and all(cfg[k] and os.path.abspath(cfg[k]) == os.path.abspath(v) for k, v in written.items())
    sets = ([] if named else [f"{k}={v}" for k, v in written.items()]) + list(overrides)
    return (f"next: {launcher_command()} {config_path or 'CONFIG'}"
            + (" -- --set " + " ".join(map(shlex.quote, sets)) if sets else "")
            + (" (the config names other files)" if config_path and not named else ""))


def parse_args(argv=None):
    parser = one_line_parser(__doc__)
    parser.add_argument("src", metavar="SRC", help="the TUAB v3.0.1 download (the directory that holds edf/)")
    parser.add_argument("--out", metavar="DIR", help="required: the directory for the windows and manifest.json, "
                        "e.g. data/tuab_4s")
    parser.add_argument("--config", help="the YAML config whose data.* keys say what the windows are (omit for the "
                        "built-in defaults)")
    parser.add_argument("--set", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, as train_probe.py's --set: --set data.montage=tcp")
    parser.add_argument("--workers", type=int, metavar="N", help="worker processes, one file each "
                        "(default: every core)")
    args = parser.parse_args(argv)
    args.set = [item for group in args.set for item in group]
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        problems = [] if args.workers is None or args.workers >= 1 else [
            ("C3", "--workers", f"{args.workers} must be >= 1")]
        try:
            cfg, _ = resolve_config(args.config, args.set, check_files=False)  # the files are about to be made
        except ConfigError as err:  # C3: said with SRC's and --out's problems, all at once
            cfg, problems = None, err.problems + problems
        prepare_tuab(args.src, args.out, cfg, args.workers, problems=problems)
        write_stdout(next_step(cfg, args.out, args.config, args.set))  # `| head`: no BrokenPipe traceback (R8)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prepare_tuab: interrupted; every finished recording is kept, the same command continues",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

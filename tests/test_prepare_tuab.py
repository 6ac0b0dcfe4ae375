"""prepare_tuab.py on a synthetic TUAB v3.0.1 tree written here (rows C6, C7): EDF files of several
subjects and sessions, 250/256/400 Hz, both TUH channel spellings, a truncated file, one missing a channel, one too
short, one whose channels run at different rates, a subject with normal and abnormal recordings, a subject in both
official splits. A minimal EDF writer below makes them (plain EDF: a 256-byte header, 256 bytes per signal, int16
records), so the test needs MNE only where the kit does."""
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import prepare_tuab as pt  # noqa: E402
import train_probe as tp  # noqa: E402

pytest.importorskip("mne")  # CI installs it (.ci/run); the kit itself only needs it for prepare_tuab.py

ELECTRODES = tp.REFERENTIAL_19 + ["A1", "A2"]
PHYS, DIG = (-1000.0, 1000.0), (-32768, 32767)


def write_edf(path, labels, rates, seconds, signals=None, seed=0, dims="uV", truncate=0, reserved=""):
    """Plain EDF, 1-s records: labels, samples per second per channel, int16 digital values (random unless
    given), physical range PHYS. Returns the digital signals."""
    rng = np.random.default_rng(seed)
    if signals is None:
        signals = [rng.integers(-2000, 2000, size=r * seconds).astype("<i2") for r in rates]
    dims = [dims] * len(labels) if isinstance(dims, str) else dims
    n = len(labels)

    def field(value, width):
        return str(value).ljust(width)[:width].encode("latin-1")

    head = field(0, 8) + field("X X X X", 80) + field("Startdate 01-JAN-2000 X X X", 80) + field("01.01.00", 8)
    head += field("00.00.00", 8) + field(256 * (n + 1), 8) + field(reserved, 44) + field(seconds, 8) + field(1, 8) + field(n, 4)
    for values, width in ((labels, 16), ([""] * n, 80), (dims, 8), ([PHYS[0]] * n, 8), ([PHYS[1]] * n, 8),
                          ([DIG[0]] * n, 8), ([DIG[1]] * n, 8), ([""] * n, 80), (rates, 8), ([""] * n, 32)):
        head += b"".join(field(v, width) for v in values)
    body = b"".join(s[i * r:(i + 1) * r].astype("<i2").tobytes() for i in range(seconds) for s, r in zip(signals, rates))
    with open(path, "wb") as f:
        f.write(head + (body[:-truncate] if truncate else body))
    return signals


def physical(digital):
    """EDF's digital -> physical map (microvolts here)."""
    return (np.asarray(digital, np.float64) - DIG[0]) * (PHYS[1] - PHYS[0]) / (DIG[1] - DIG[0]) + PHYS[0]


def labels(spelling="REF", drop=()):
    return [f"EEG {e}-{spelling}" for e in ELECTRODES if e not in drop] + [f"EEG EKG1-{spelling}"]


def in_val(subject, fraction=0.2):
    """The documented split rule, written out independently of the kit."""
    return int(hashlib.sha256(subject.encode()).hexdigest()[:16], 16) / 2 ** 64 < fraction


def subjects(want_val, count):
    names = (f"aaaa{a}{b}{c}" for a in "abcdefgh" for b in "abcdefgh" for c in "abcdefgh")
    return [n for n in names if in_val(n) == want_val][:count]


TRAIN, VAL, TEST = subjects(False, 5), subjects(True, 2), subjects(False, 9)[5:8]
BOTH = TRAIN[4]  # recordings in train/ and in eval/: kept in test only
# (subject, session, token, split dir, label dir, rate, seconds, spelling, what is wrong with it)
FILES = [
    (TRAIN[0], 1, 0, "train", "normal", 250, 13, "REF", None),
    (TRAIN[0], 2, 0, "train", "abnormal", 256, 9, "LE", None),  # a subject with normal and abnormal recordings
    (TRAIN[1], 1, 0, "train", "abnormal", 400, 10, "REF", None),
    (TRAIN[1], 2, 0, "train", "normal", 250, 8, "REF", "rates"),
    (TRAIN[2], 1, 0, "train", "normal", 256, 8, "REF", "missing"),
    (TRAIN[2], 1, 1, "train", "normal", 256, 8, "LE", None),
    (TRAIN[3], 1, 0, "train", "abnormal", 250, 10, "REF", "truncated"),
    (TRAIN[3], 2, 0, "train", "normal", 250, 3, "REF", "short"),
    (TRAIN[3], 3, 0, "train", "normal", 256, 9, "REF", "garbage"),
    (TRAIN[3], 4, 0, "train", "abnormal", 256, 12, "REF", None),
    (BOTH, 1, 0, "train", "normal", 256, 8, "REF", None),
    (VAL[0], 1, 0, "train", "normal", 256, 8, "LE", None),
    (VAL[1], 1, 0, "train", "abnormal", 400, 12, "REF", None),
    (TEST[0], 1, 0, "eval", "normal", 250, 10, "REF", None),
    (TEST[1], 1, 0, "eval", "abnormal", 256, 9, "LE", None),
    (BOTH, 2, 0, "eval", "abnormal", 256, 8, "REF", None),
]
SKIPS = {"rates": "different rates", "missing": "missing channel(s) T5", "truncated": "truncated",
         "short": "shorter than one window", "garbage": "not a readable EDF file", "both": "also has recordings"}


def name(subject, session, token):
    return f"{subject}_s{session:03d}_t{token:03d}.edf"


def write_tree(src):
    for i, (subject, session, token, split, label, rate, seconds, spelling, wrong) in enumerate(FILES):
        directory = src / "edf" / split / label / "01_tcp_ar"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / name(subject, session, token)
        chans = labels(spelling, drop=("T5",) if wrong == "missing" else ())
        rates = [rate] * len(chans)
        if wrong == "rates":
            rates[0] = 2 * rate
        chans, rates = chans + ["PHOTIC-REF"], rates + [rate * 2 if rate != 400 else 100]  # other rates elsewhere: fine
        if wrong == "garbage":
            path.write_bytes(b"this is not an EDF file" * 40)
        else:
            write_edf(path, chans, rates, seconds, seed=i, truncate=1000 if wrong == "truncated" else 0)
    (src / "edf" / "train" / "normal" / "01_tcp_ar" / "notes.edf").write_bytes(b"")  # not SUBJECT_sNNN_tNNN.edf
    return src


def prepare(src, out, *overrides, workers=1):
    cfg, _ = tp.resolve_config(None, list(overrides), check_files=False)
    lines = []
    return pt.prepare_tuab(str(src), str(out), cfg, workers, say=lines.append), lines


def run_script(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "prepare_tuab.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


def contents(directory):
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


def data_keys(out):
    return [f"data.{s}_{k}={out}/{s}_{k}.npy" for s in ("train", "val", "test") for k in ("x", "y")]


@pytest.fixture(scope="module")
def tuab(tmp_path_factory):
    """The tree and one uninterrupted preparation with one worker: the reference every other run must equal."""
    base = tmp_path_factory.mktemp("tuab")
    src = write_tree(base / "v3.0.1")
    manifest, lines = prepare(src, base / "out")
    return {"src": src, "out": base / "out", "manifest": manifest, "lines": lines, "base": base}


def test_c7_prepare_tuab_writes_the_configs_files_with_shapes_labels_and_a_subject_disjoint_split(tuab):
    out, manifest = tuab["out"], tuab["manifest"]
    assert sorted(os.listdir(out)) == sorted(pt.PREP_OUTPUTS + ["manifest.json"])  # no INCOMPLETE, no .parts
    expected = {"train": {}, "val": {}, "test": {}}
    for subject, session, token, split, label, rate, seconds, _, wrong in FILES:
        if wrong is None and not (subject == BOTH and split == "train"):
            where = "test" if split == "eval" else "val" if subject in VAL else "train"
            expected[where][f"{split}/{label}/01_tcp_ar/{name(subject, session, token)}"] = \
                (seconds * 256 // 1024, pt.TUAB_LABELS[label])  # 256 Hz, 4 s windows, the partial last one dropped
    for split, recs in expected.items():
        x, y = np.load(out / f"{split}_x.npy", mmap_mode="r"), np.load(out / f"{split}_y.npy")
        windows = [n for n, _ in sorted(recs.values())]
        assert x.shape == (sum(n for n, _ in recs.values()), 19, 1024) and x.dtype == np.float32 and y.dtype == np.int64
        table = manifest["recordings"][split]
        assert {row[0]: (row[2], row[3]) for row in table} == recs, split
        for rel, first, n, label in table:
            assert (y[first:first + n] == label).all()
        assert sorted(windows) == sorted(row[2] for row in table)
        assert np.isfinite(x).all() and 5 < float(np.abs(x).mean()) < 1000  # microvolts, not volts
        assert manifest["splits"][split]["windows"] == len(y)
    subjects = {s: set(manifest["splits"][s]["subjects"]) for s in expected}
    assert subjects == {"train": set(TRAIN[:4]), "val": set(VAL), "test": set(TEST[:2]) | {BOTH}}
    assert manifest["subjects_disjoint"] is True
    assert manifest["subjects_with_normal_and_abnormal"] == {"train": [TRAIN[0]], "val": [], "test": []}
    settings = manifest["inputs"]["settings"]
    assert settings["channels"] == tp.REFERENTIAL_19 and settings["sample_rate"] == 256 and settings["units"] == "uV"
    assert manifest["outputs"]["train_x.npy"]["sha256"] == hashlib.sha256((out / "train_x.npy").read_bytes()).hexdigest()
    sources = manifest["inputs"]["source_files"]
    assert len(sources) == len(FILES) + 1 and all(v is None or v["size"] > 0 for v in sources.values())


def test_c7_bad_recordings_are_skipped_and_listed_with_their_reason(tuab):
    skipped = {s["file"].rsplit("/", 1)[-1]: s["reason"] for s in tuab["manifest"]["skipped"]}
    want = {name(s, se, t): SKIPS[w] for s, se, t, *_, w in FILES if w}
    want[name(BOTH, 1, 0)] = SKIPS["both"]
    want["notes.edf"] = "SUBJECT_sNNN_tNNN"
    assert set(skipped) == set(want)
    for file, reason in want.items():
        assert reason in skipped[file], (file, skipped[file])
    assert "7 files skipped" in tuab["lines"][-1] and "1 subject(s) with normal and abnormal" in tuab["lines"][-1]


def test_c7_windows_hold_the_named_channels_in_config_order_in_microvolts_and_tcp_pairs(tmp_path):
    """Channel order by name whatever the file's order and spelling; units from the EDF's physical dimension."""
    order = ELECTRODES[::-1]
    digital = write_edf(tmp_path / "a.edf", [f"EEG {e}-LE" for e in order], [256] * len(order), 8, seed=3,
                        dims=["mV" if e == "O2" else "uV" for e in order])
    row = {e: physical(d) * (1000 if e == "O2" else 1) for e, d in zip(order, digital)}  # in microvolts
    cfg, _ = tp.resolve_config(None, [], check_files=False)
    x = pt.recording_windows(str(tmp_path / "a.edf"), tp.window_settings(cfg))
    want = np.stack([row[e] for e in tp.REFERENTIAL_19])
    assert x.shape == (2, 19, 1024)
    np.testing.assert_allclose(x.transpose(1, 0, 2).reshape(19, -1), want, rtol=1e-6, atol=1e-4)
    cfg, _ = tp.resolve_config(None, ["data.montage=tcp", "data.units=mV"], check_files=False)
    x = pt.recording_windows(str(tmp_path / "a.edf"), tp.window_settings(cfg))
    want = np.stack([row[a] - row[b] for a, b in (pair.split("-") for pair in tp.TCP_22)]) / 1000
    assert x.shape == (2, 22, 1024)
    np.testing.assert_allclose(x.transpose(1, 0, 2).reshape(22, -1), want, rtol=1e-5, atol=1e-6)
    cfg, _ = tp.resolve_config(None, ["data.channels=[fp1, t7, P8-O2]"], check_files=False)  # 10-10 names: T7 = T3
    x = pt.recording_windows(str(tmp_path / "a.edf"), tp.window_settings(cfg))
    want = np.stack([row["FP1"], row["T3"], row["T6"] - row["O2"]])
    np.testing.assert_allclose(x.transpose(1, 0, 2).reshape(3, -1), want, rtol=1e-5, atol=1e-3)


def test_c7_resampling_to_256_hz_filters_out_what_would_alias(tmp_path):
    """400 Hz -> 256 Hz: a 150 Hz component is above the new Nyquist (128 Hz). Without an anti-aliasing filter it
    lands at 256 - 150 = 106 Hz; the 10 Hz rhythm must come through at its amplitude."""
    t = np.arange(400 * 8) / 400
    wave = 500 * np.sin(2 * np.pi * 10 * t) + 500 * np.sin(2 * np.pi * 150 * t)
    digital = np.round((wave - PHYS[0]) * (DIG[1] - DIG[0]) / (PHYS[1] - PHYS[0]) + DIG[0]).astype("<i2")
    write_edf(tmp_path / "r.edf", labels(), [400] * 22, 8, signals=[digital] * 22)
    cfg, _ = tp.resolve_config(None, [], check_files=False)
    x = pt.recording_windows(str(tmp_path / "r.edf"), tp.window_settings(cfg))
    spectrum = np.abs(np.fft.rfft(x[1, 0])) / 512  # the second window: away from the edge of the recording
    freqs = np.fft.rfftfreq(1024, 1 / 256)
    assert abs(spectrum[freqs == 10][0] - 500) < 10
    assert spectrum[np.abs(freqs - 106) < 2].max() < 5


def test_c7_filters_when_asked_remove_the_power_line_and_what_is_outside_the_band(tmp_path):
    t = np.arange(256 * 8) / 256
    wave = sum(300 * np.sin(2 * np.pi * f * t) for f in (10, 45, 60))
    digital = np.round((wave - PHYS[0]) * (DIG[1] - DIG[0]) / (PHYS[1] - PHYS[0]) + DIG[0]).astype("<i2")
    write_edf(tmp_path / "f.edf", labels(), [256] * 22, 8, signals=[digital] * 22)
    freqs = np.fft.rfftfreq(1024, 1 / 256)

    def amplitude(setting):
        cfg, _ = tp.resolve_config(None, [setting], check_files=False)
        x = pt.recording_windows(str(tmp_path / "f.edf"), tp.window_settings(cfg))
        spectrum = np.abs(np.fft.rfft(x[1, 0])) / 512
        return {f: spectrum[freqs == f][0] for f in (10, 45, 60)}

    assert all(abs(a - 300) < 10 for a in amplitude("data.notch=null").values())
    notched = amplitude("data.notch=60")
    assert notched[60] < 30 and abs(notched[10] - 300) < 10 and abs(notched[45] - 300) < 10
    banded = amplitude("data.bandpass=[1, 30]")
    assert banded[45] < 15 and banded[60] < 15 and abs(banded[10] - 300) < 10


def test_c7_a_duplicate_channel_a_unit_that_is_not_a_voltage_and_a_discontinuous_file_are_skipped(tmp_path):
    cfg, _ = tp.resolve_config(None, [], check_files=False)
    settings = tp.window_settings(cfg)
    cases = {"twice": (labels() + ["EEG FP1-LE"], {}, "FP1 appear more than once"),
             "unit": (labels(), {"dims": ["uV"] * 5 + [""] + ["uV"] * 16}, "not a voltage"),
             "gaps": (labels(), {"reserved": "EDF+D"}, "discontinuous")}
    for case, (chans, extra, reason) in cases.items():
        write_edf(tmp_path / f"{case}.edf", chans, [256] * len(chans), 8, **extra)
        with pytest.raises(pt.SkipRecording, match=reason):
            pt.recording_windows(str(tmp_path / f"{case}.edf"), settings)


def test_c7_ctrl_c_keeps_what_is_done_and_says_the_same_command_continues(tuab, tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(pt, "run_parts", interrupted)
    assert pt.main([str(tuab["src"]), "--out", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the same command continues" in err[0]
    assert (tmp_path / "out" / tp.INCOMPLETE).exists() and not (tmp_path / "out" / "manifest.json").exists()


def test_c7_a_second_run_with_the_same_inputs_is_up_to_date_and_any_changed_input_is_not(tuab, monkeypatch):
    out = tuab["out"]
    stamps = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)}
    (out / ".parts").mkdir()  # what a kill after the manifest, before the parts were removed, leaves
    manifest, lines = prepare(tuab["src"], out)
    assert not (out / ".parts").exists()
    assert lines == [f"prepare_tuab: {out} is up to date ({len(FILES) + 1} source files, same settings)"]
    assert {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)} == stamps and manifest == tuab["manifest"]
    config = out.parent / "tuab.yaml"  # the command line says what to run next: the config's own launch line
    monkeypatch.chdir(ROOT)  # from the kit: ./launch.sh
    config.write_text("data: {" + ", ".join(f"{s}_{k}: {out}/{s}_{k}.npy" for s in ("train", "val", "test")
                                            for k in "xy") + "}\n")
    for args, said in ((["--config", str(config)], f"next: ./launch.sh {config}\n"),
                       ([], f"next: ./launch.sh CONFIG -- --set data.train_x={out}/train_x.npy"),
                       # C6: the values the windows were made with (here the default's, so up to date); the printed
                       # command without them was refused by the run (a new user's trial: --set data.notch=60)
                       (["--config", str(config), "--set", "data.val_fraction=0.2", "data.units=uV"],
                        f"next: ./launch.sh {config} -- --set data.val_fraction=0.2 data.units=uV\n")):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            assert pt.main([str(tuab["src"]), "--out", str(out), *args]) == 0
        assert "is up to date" in stdout.getvalue() and said in stdout.getvalue()
    cfg, _ = tp.resolve_config(None, [], check_files=False)
    monkeypatch.chdir(out)  # from a user's own directory, which has no ./launch.sh: the kit's, by a path that works
    printed = pt.next_step(cfg, str(out), None).split()[1]  # compared, not launched (C5: launches go via run_records)
    assert os.path.basename(printed) == "launch.sh" and os.path.samefile(os.path.dirname(printed), ROOT)
    root, recordings, misnamed = pt.tuab_recordings(str(tuab["src"]))
    assert pt.up_to_date(str(out), pt.prepare_inputs(recordings, misnamed, cfg))
    for change in ("data.notch=60", "data.val_fraction=0.3", "data.montage=tcp", "data.sample_rate=200"):
        changed, _ = tp.resolve_config(None, [change], check_files=False)
        assert not pt.up_to_date(str(out), pt.prepare_inputs(recordings, misnamed, changed)), change
    touched = [{**recordings[0], "mtime_ns": recordings[0]["mtime_ns"] + 1}] + recordings[1:]
    assert not pt.up_to_date(str(out), pt.prepare_inputs(touched, misnamed, cfg))
    assert not pt.up_to_date(str(out), pt.prepare_inputs(recordings[1:], misnamed, cfg))


def test_c7_killed_preparations_at_two_workers_finish_with_the_bytes_of_an_uninterrupted_one_worker_run(tuab, tmp_path):
    """Killed while reading EDF (the run's process and the worker on the 5th file, as a kill of the process group
    would), then while writing train_x.npy, both runs with 2 worker processes; the same command then finishes in
    this process (one worker) with the reference's bytes, manifest included. Every part the first run's workers
    finished is used, whichever worker made it."""
    out = tmp_path / "killed"
    args = [str(tuab["src"]), "--out", str(out), "--workers", "2"]
    fifth = sorted(name(*f[:3]) for f in FILES)[4]
    first = run_script(*args, env={"KIT_FAULT_PREP_KILL_AT": f"file:{fifth}"})
    assert first.returncode == -9, first.stderr
    assert (out / tp.INCOMPLETE).exists() and not (out / "manifest.json").exists()
    parts = [n for n in os.listdir(out / ".parts") if ".tmp-" not in n]  # (the orphaned worker stops within a
    assert 4 <= len(parts)                                                  # file or so, as its parent goes)
    second = run_script(*args, env={"KIT_FAULT_PREP_KILL_AT": "assemble:train_x"})
    assert second.returncode == -9, second.stderr
    done, todo = map(int, re.search(r"(\d+) done before, (\d+) to read", second.stdout).groups())
    assert done == len(parts) and done + todo == len(FILES)
    assert not (out / "train_x.npy").exists() and not (out / "manifest.json").exists()
    _, lines = prepare(tuab["src"], out)  # the same command, finished with one worker
    assert f"{len(FILES)} done before, 0 to read" in lines[0]
    assert contents(out) == contents(tuab["out"])


def test_c7_an_empty_val_split_is_one_line_and_a_rerun_with_another_val_fraction_reuses_every_recording(tuab, tmp_path):
    assert not any(in_val(s, 0.001) for s in TRAIN + VAL)
    with pytest.raises(tp.ConfigError, match="the val split has no usable recording") as err:
        prepare(tuab["src"], tmp_path / "out", "data.val_fraction=0.001")
    assert err.value.problems[0][1] == "data.val_fraction"
    assert (tmp_path / "out" / tp.INCOMPLETE).exists() and not (tmp_path / "out" / "manifest.json").exists()
    _, lines = prepare(tuab["src"], tmp_path / "out")
    assert f"{len(FILES)} done before, 0 to read" in lines[0]
    assert contents(tmp_path / "out") == contents(tuab["out"])


def test_c6_training_refuses_windows_prepared_with_other_settings(tuab, tmp_path, capsys):
    keys = data_keys(tuab["out"])
    tp.resolve_config(None, keys)  # the settings it was prepared with: accepted
    for change, key in (("data.sample_rate=200", "data.sample_rate"), ("data.window_seconds=2", "data.window_seconds"),
                        ("data.montage=tcp", "data.channels"), ("data.units=V", "data.units"),
                        ("data.bandpass=[0.5, 70]", "data.bandpass")):
        with pytest.raises(tp.ConfigError) as err:
            tp.resolve_config(None, keys + [change])
        assert [(rid, k) for rid, k, _ in err.value.problems] == [("C6", key)], change
    # the dry run and diagnose_and_fix.py make the same check (they call resolve_config)
    assert tp.main(["--dry_run", "--set", *keys, "data.sample_rate=200"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.sample_rate" in err[0] and "manifest.json" in err[0]
    import diagnose_and_fix as dx
    config = tmp_path / "tuab.yaml"
    config.write_text(f"data: {{train_x: {tuab['out']}/train_x.npy, train_y: {tuab['out']}/train_y.npy, "
                      f"val_x: {tuab['out']}/val_x.npy, val_y: {tuab['out']}/val_y.npy, sample_rate: 200}}\n")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = dx.main(["--config", str(config), "--json"])
    report = json.loads(stdout.getvalue())
    assert code == 1 and any(f["id"] == "C6" and f["severity"] == "critical" for f in report["findings"])
    # an unfinished preparation (what a kill during a re-preparation leaves) and a file changed since
    copy = tmp_path / "copy"
    shutil.copytree(tuab["out"], copy)
    (copy / tp.INCOMPLETE).write_text("")
    with pytest.raises(tp.ConfigError, match="unfinished preparation"):
        tp.resolve_config(None, data_keys(copy))
    (copy / tp.INCOMPLETE).unlink()
    np.save(copy / "val_y.npy", np.zeros(3, np.int64))
    with pytest.raises(tp.ConfigError, match="changed after it was prepared") as err:
        tp.resolve_config(None, data_keys(copy))
    assert err.value.problems[0][:2] == ("C6", "data.val_y")


def test_c7_train_probe_trains_on_the_prepared_directory(tuab, tmp_path):
    tiny = ["backbone.kwargs={width: 8, heads: 2}", "train.batch_size=4", "train.epochs=2", "schedule.warmup=2",
            "train.eval_batch_size=16"]
    assert tp.main(["--set", *data_keys(tuab["out"]), *tiny, "--run_dir", str(tmp_path / "run")]) == 0
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert any("test/auroc" in r for r in records) and any("val/auroc" in r for r in records)


def test_c3_prepare_tuab_bad_input_is_one_line_exit_2_and_writes_nothing(tuab, tmp_path, capsys, monkeypatch):
    def fails(src, out, *more):
        code = pt.main([str(src), "--out", str(out), *more])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        return err[0]

    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    assert "does not have the TUAB layout" in fails(tmp_path / "empty", out)
    for split in ("train", "eval"):
        for label in ("normal", "abnormal"):
            (tmp_path / "bare" / "edf" / split / label).mkdir(parents=True)
    assert "no .edf files" in fails(tmp_path / "bare", out)
    assert "not a directory" in fails(tmp_path / "nowhere", out)
    assert not out.exists()
    out.mkdir()
    np.save(out / "train_x.npy", np.zeros((2, 19, 1024), np.float32))  # the user's own windows: never overwritten
    assert "did not write" in fails(tuab["src"], out)
    assert os.listdir(out) == ["train_x.npy"]
    assert "data.val_fraction" in fails(tuab["src"], tmp_path / "o2", "--set", "data.val_fraction=1.5")
    monkeypatch.setitem(sys.modules, "mne", None)  # a machine without mne (CI installs it)
    line = fails(tuab["src"], tmp_path / "o3")
    assert "mne" in line and sys.executable in line and "pip install mne" in line and not (tmp_path / "o3").exists()

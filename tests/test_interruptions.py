"""Issue 21: interruptions leave nothing stale or missing. A closed stdout with a terminal stderr (`| head`
in an interactive shell) never stops a run; every stdout line is flushed as it is written; a kill during an
export or a feature save leaves a complete export and no leftovers once the run starts again (R12).

The terminal is a real pseudo-terminal (os.openpty): tqdm draws its bar only when stderr is one.
"""
import contextlib
import fcntl
import io
import json
import os
import signal
import struct
import subprocess
import sys
import termios
import threading

import pytest

from test_probe import ROOT, TINY, ckpt, sets
from run_records import launch, teacher_run

PROBE = os.path.join(ROOT, "train_probe.py")
DISTILL = os.path.join(ROOT, "train_distill.py")


def with_terminal_stderr(argv, stdout, env=None, on_stdout=None):
    """Run argv with stderr on a pseudo-terminal (read and kept while it runs, so the bar never blocks on a
    full terminal) and stdout as given. on_stdout(proc) runs while it runs. Returns (exit code, terminal text)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 0 columns: tqdm would draw nothing
    user_env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a user's shell: stdout buffered
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=stdout, stderr=slave, stdin=subprocess.DEVNULL,
                            env={**user_env, **(env or {})})
    os.close(slave)
    seen = []

    def drain():
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                return
            if not chunk:
                return
            seen.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        if on_stdout:
            on_stdout(proc)
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=60)
        os.close(master)
    return code, b"".join(seen).decode(errors="replace")


def closed_pipe():
    """A pipe whose reader has exited (`| head` after its lines): every write to it fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


def test_r8_stdout_lines_written_above_the_bar_are_flushed_before_a_sigkill(tmp_path):
    # With a bar on the terminal, log lines go through tqdm.write; a SIGKILL must not eat those still in
    # stdout's buffer: stdout holds every line of train.log (the eval lines of steps 4 and 8 among them).
    run_dir = tmp_path / "run"
    out = tmp_path / "stdout.txt"
    with open(out, "wb") as f:  # a file is block-buffered like a pipe
        code, terminal = with_terminal_stderr([sys.executable, PROBE, *sets(*TINY, "train.save_every_steps=2"),
                                               "--run_dir", str(run_dir)], f, env={"KIT_FAULT_KILL_AT": "10:0"})
    assert code == -signal.SIGKILL, terminal
    log = (run_dir / "train.log").read_text().splitlines()
    assert any("eval step 8" in line for line in log) and "step" in terminal  # the bar was drawn
    assert out.read_text().splitlines() == log


def test_r8_stdout_closed_mid_run_with_a_terminal_stderr_does_not_stop_training(tmp_path):
    # `python train_probe.py ... | head -n 9` in a terminal: head exits after the plan lines, the bar is on the
    # terminal, and the next log line (an eval, through tqdm.write) meets a closed pipe.
    run_dir = tmp_path / "run"

    def read_until_the_plan_then_close(proc):
        for line in proc.stdout:
            if b"devices:" in line:  # the plan's last line: training starts next
                break
        proc.stdout.close()

    code, terminal = with_terminal_stderr([sys.executable, PROBE, *sets(*TINY, "train.epochs=4", "train.eval_every=1"),
                                           "--run_dir", str(run_dir)], subprocess.PIPE,
                                          on_stdout=read_until_the_plan_then_close)
    assert code == 0, terminal
    assert "Traceback" not in terminal and "BrokenPipe" not in terminal
    assert ckpt(str(run_dir))["finished"] and "done: 16 optimizer steps" in (run_dir / "train.log").read_text()


@pytest.mark.parametrize("script", [PROBE, DISTILL], ids=["probe", "distill"])
def test_r8_help_config_into_a_closed_pipe_ends_without_a_traceback(script):
    write_end = closed_pipe()
    try:
        out = subprocess.run([sys.executable, script, "--help_config"], cwd=ROOT, stdout=write_end,
                             stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert out.returncode == 0 and out.stderr == ""



def test_r8_a_dry_run_into_a_closed_pipe_runs_every_check_and_ends_without_a_traceback():
    write_end = closed_pipe()  # `train_probe.py --dry_run | head -n 1`: every line after the first fails with EPIPE
    try:
        out = subprocess.run([sys.executable, PROBE, "--dry_run"], cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE,
                             text=True, timeout=600)
    finally:
        os.close(write_end)
    assert out.returncode == 0 and "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr


def into_a_closed_pipe(*argv):
    write_end = closed_pipe()
    try:
        return subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE, text=True,
                              timeout=300)
    finally:
        os.close(write_end)


def test_r8_diagnose_into_a_closed_pipe_runs_every_check_and_exits_with_the_findings_code(tmp_path):
    """`diagnose_and_fix.py ... | head -1` ended in a BrokenPipeError traceback, exit 1 whatever it found, and --plot
    never drew: the report now goes through the training script's own write_stdout()."""
    import diagnose_and_fix as dx
    log = tmp_path / "metrics.jsonl"  # an LR that never moves where probe_synthetic's onecycle curve does: S1
    log.write_text("".join(json.dumps({"step": s, "lr": 1e-3, "loss": 2 - s / 40}) + "\n" for s in range(1, 41)))
    argv = ["--config", os.path.join(ROOT, "configs", "probe_synthetic.yaml"), "--set", "train.grad_accum=0",
            "--log", str(log)]
    with contextlib.redirect_stdout(io.StringIO()) as report:
        code = dx.main([*argv, "--json"])
    report = json.loads(report.getvalue())
    assert code == report["exit_code"] == 1 and report["counts"]["critical"] >= 2  # C3: 1 = critical findings
    out = into_a_closed_pipe(os.path.join(ROOT, "diagnose_and_fix.py"), *argv, "--plot", str(tmp_path / "runs.png"))
    # 1 is a traceback's code too: the findings' code is 1 with no traceback (and the plot drawn after every check)
    assert out.returncode == code and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "BrokenPipe" not in out.stderr, out.stderr[-2000:]
    assert os.path.isfile(tmp_path / "runs.png") or "matplotlib is not installed" in out.stderr  # drawn after it


def test_r8_the_schedule_tool_into_a_closed_pipe_writes_its_files_and_exits_with_its_checks_code(tmp_path):
    """test_scheduler_dry_run.py set SIGPIPE to its default: `| head -1` killed it (exit 141 in a shell)."""
    out = into_a_closed_pipe(os.path.join(ROOT, "test_scheduler_dry_run.py"), os.path.join(ROOT, "configs",
                             "probe_synthetic.yaml"), "--out", str(tmp_path))
    assert out.returncode == 0 and "Traceback" not in out.stderr, (out.returncode, out.stderr[-2000:])
    assert os.path.getsize(tmp_path / "lr.csv") > 0


@pytest.mark.parametrize("tool", ["prepare_text.py", "prepare_tuab.py"])
def test_r8_a_preparation_tool_into_a_closed_pipe_writes_everything_and_ends_without_a_traceback(tool, tmp_path):
    if tool == "prepare_text.py":
        args = ["--demo_chat", "40", "--out", str(tmp_path / "out")]
    else:
        from test_prepare_tuab import write_tree
        args = [str(write_tree(tmp_path / "v3.0.1")), "--out", str(tmp_path / "out")]
    write_end = closed_pipe()
    try:
        out = subprocess.run([sys.executable, os.path.join(ROOT, tool), *args], cwd=ROOT, stdout=write_end,
                             stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "manifest.json" in os.listdir(tmp_path / "out")

# ---------------------------------------------------------------------------------------------------------
# R12: a kill during an export, or inside a feature save, leaves a complete export and no leftovers after
# the next start.
@pytest.fixture(scope="module")
def lm_settings(tmp_path_factory):
    """train_distill.py's tiny plain LM run (kd.enabled false: no teacher) on test_distill's token files."""
    from test_distill import LOOP, MODELS, data
    return teacher_run(data.__wrapped__(tmp_path_factory) + MODELS + LOOP)


def leftovers(run_dir):
    return sorted(name for name in os.listdir(run_dir) if name.startswith(".") or name.endswith(".prev"))


def tree_bytes(directory):
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


def test_r12_a_kill_at_any_point_of_an_export_leaves_one_and_the_next_start_finishes_it(tmp_path, lm_settings):
    import train_distill as T
    run_dir = tmp_path / "run"
    command = [sys.executable, DISTILL, *sets(*lm_settings), "--run_dir", str(run_dir)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KIT_")}
    # 1. Killed with the new export complete in its temp directory, before the rename that publishes it.
    died = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**clean, "KIT_FAULT_SAVE_KILL_AT": "export_written"})
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert T.torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["finished"]
    assert not (run_dir / "export").exists() and leftovers(run_dir)[0].startswith(".export-")
    # launch.sh does not call that complete: the script writes the export, and the temp directory goes.
    (tmp_path / "lm.yaml").write_text("task: distill\n")
    launched = launch(str(tmp_path / "lm.yaml"), "--gpus", "cpu", "--", *command[2:], cwd=ROOT)
    assert launched.returncode == 0, launched.stderr
    assert "nothing to do" not in launched.stdout.split("running the script")[0] and "export" in launched.stdout
    cfg = T.resolve_config(None, lm_settings)[0]
    assert T.export_matches_best(str(run_dir), cfg, None) and leftovers(run_dir) == []
    # 2. A new export replacing an old one, killed between moving the old one aside and renaming the new one in.
    published = tree_bytes(run_dir / "export")
    replace = ("import sys; sys.path.insert(0, {root!r}); import train_distill as T\n"
               "cfg = T.resolve_config(None, {settings!r})[0]\n"
               "outcome, run = T.train(cfg, {run_dir!r}, 'auto', quiet=True)\n"
               "assert outcome == 'complete'\n"
               "T.export_best(run)\n").format(root=ROOT, settings=lm_settings, run_dir=str(run_dir))
    died = subprocess.run([sys.executable, "-c", replace], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**clean, "KIT_FAULT_SAVE_KILL_AT": "export_aside"})
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert tree_bytes(run_dir / "export.prev") == published  # one complete export, the old one, on disk
    outcome, _ = T.train(cfg, str(run_dir), "auto", quiet=True)  # the next start
    assert outcome == "complete" and T.export_matches_best(str(run_dir), cfg, None) and leftovers(run_dir) == []


def test_r12_a_kill_inside_a_feature_save_leaves_no_temp_file_after_the_next_start(tmp_path):
    import train_probe as tp
    run_dir = tmp_path / "run"
    died = subprocess.run([sys.executable, PROBE, *sets(*TINY), "--run_dir", str(run_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "KIT_FAULT_SAVE_KILL_AT": "after_write:1"})  # the train features' save
    assert died.returncode == -signal.SIGKILL, died.stderr
    assert [n.startswith(".tmp-") for n in os.listdir(run_dir / "features")] == [True]
    outcome, _ = tp.train(tp.resolve_config(None, TINY)[0], str(run_dir), "auto", quiet=True)
    assert outcome == "finished" and not [n for n in os.listdir(run_dir / "features") if n.startswith(".")]


def test_r8_the_teacher_cache_build_into_a_closed_stdout_completes(tmp_path, lm_settings):
    # --cache_teacher's progress lines (`... | head`) must not end the build in a BrokenPipeError.
    cache = tmp_path / "cache"
    settings = lm_settings[:-1] + ["kd.enabled=true", "teacher.target=zoo:tiny_causal_lm", "teacher.kwargs={vocab: 40}",
                                   "kd.gamma=0", "kd.top_k=4", f"kd.teacher_cache={cache}"]
    write_end = closed_pipe()
    try:
        out = subprocess.run([sys.executable, DISTILL, "--cache_teacher", *sets(*settings)], cwd=os.path.join(ROOT, "tests"),
                             stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=240)
    finally:
        os.close(write_end)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert '"complete": true' in (cache / "manifest.json").read_text()


def test_r8_a_stop_while_the_probe_caches_features_says_so_and_the_same_command_computes_them_again(tmp_path):
    """SIGTERM while the feature cache is computed (hours on a large backbone) stops at the next window batch with
    one line and the kit's stop code (128 + signal), not a silent death; no feature file, whole or partial, is
    left to be read back, and the same command computes the features again and trains."""
    import train_probe as tp
    run_dir = tmp_path / "run"
    # the signal arrives inside the first of the train split's 3 window batches (38 windows, 16 a batch)
    signal_first_batch = ("import os, signal, sys; sys.path.insert(0, sys.argv[1]); import train_probe as tp; "
                          "extract = tp.extract_features; tp.extract_features = lambda *a: "
                          "(os.kill(os.getpid(), signal.SIGTERM), extract(*a))[1]; "
                          "tp.exit_process(tp.main(sys.argv[2:]))")
    stopped = subprocess.run([sys.executable, "-c", signal_first_batch, ROOT, *sets(*TINY), "--run_dir",
                              str(run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    last = (run_dir / "train.log").read_text().splitlines()[-1]
    assert "stopped by signal 15 while caching the train features (16/38 windows, none saved); the same command " \
           "computes them again" in last
    assert [path.name for path in run_dir.glob("features/*")] == []  # not even a temp file
    outcome, _ = tp.train(tp.resolve_config(None, TINY)[0], str(run_dir), "auto", quiet=True)
    assert outcome == "finished" and "features: computing 38 train windows" in (run_dir / "train.log").read_text()

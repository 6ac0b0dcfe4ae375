"""Reading a run's metrics.jsonl the way every reader must, and launching launch.sh (tests share these)."""
import json
import os
import subprocess
import sys

KIT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Variables a developer's shell may hold that would change what a launch does.
SCRUB = ("KIT_FAULT_KILL_AT", "KIT_FAULT_HOLD_AT", "KIT_FAULT_CACHE_KILL_AT", "KIT_FAULT_SAVE_KILL_AT",
         "KIT_NEW_RUN_DIR", "KIT_NEW_RUN_TOP", "KIT_PYTHON", "KIT_VENV", "KIT_TORCH",
         "KIT_TORCH_INDEX", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK",
         "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "KIT_GPU_IDLE_MB")


def launch_env(env=None):
    """The environment of a launch made by a test: the tests' own interpreter (one Python for both halves of
    every comparison, C5), unless the test passes KIT_PYTHON="" to exercise launch.sh's own choice (then with
    stand-in pythons: a test never installs anything). One intra-op thread, as every process of the suite
    (conftest.py, R4), unless the test passes OMP_NUM_THREADS=None to exercise launch.sh's own choice. A variable
    given as None is left out."""
    merged = {**{k: v for k, v in os.environ.items() if k not in SCRUB}, "KIT_PYTHON": sys.executable,
              "OMP_NUM_THREADS": "1", **(env or {})}
    return {k: v for k, v in merged.items() if v is not None}


def launch_call(*args, cwd, env=None, kit=KIT):
    """C5: every launch.sh a test runs is made here (launch, start_launch, or run_together of this; tests/
    test_interpreter.py checks it), so none falls back to the python3 on PATH, which may lack torch (a venv not
    activated) and make launch.sh install it. kit: the checkout whose launch.sh runs (a fresh clone).
    (argv, subprocess keyword arguments)."""
    return [os.path.join(kit, "launch.sh"), *args], {"cwd": cwd, "env": launch_env(env)}


def launch(*args, cwd, env=None, timeout=240, kit=KIT):
    argv, where = launch_call(*args, cwd=cwd, env=env, kit=kit)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **where)


def start_launch(*args, cwd, env=None, kit=KIT, **popen):
    """launch() without waiting: the Popen, with popen's stdout/stderr/text settings."""
    argv, where = launch_call(*args, cwd=cwd, env=env, kit=kit)
    return subprocess.Popen(argv, **where, **popen)

def run_together(*calls, timeout=600):
    """subprocess.run(argv, capture_output=True, text=True, **kwargs) for each (argv, kwargs) in calls, all started
    before any is waited for: independent runs (an uninterrupted reference and the run a test kills) use both cores
    of the 2-core test machine instead of one after the other. Each is still a process of one intra-op thread
    (R4): its bits depend on its thread count and inputs, not on what else runs. A CompletedProcess each, in order."""
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
             for argv, kwargs in calls]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

# A probe run small enough for seconds, large enough for several epochs, a short last micro-batch
# (38 = 9 x 4 + 2) and a short last accumulation group (10 micro-batches, grad_accum 3 -> 3+3+3+1):
# 4 optimizer steps per epoch, 12 in all.
PROBE_TINY = ["data.synthetic.num_train=38", "data.synthetic.num_val=24", "data.synthetic.channels=4",
              "data.synthetic.length=128", "backbone.kwargs={width: 8, heads: 2}", "train.batch_size=4",
              "train.grad_accum=3", "train.epochs=3", "train.log_every=1", "train.eval_batch_size=16",
              "schedule.warmup=2", "optim.lr=0.01"]


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def last_per_step(recs, key):
    """A resumed run logs some steps again; the last record of a step is the one that counts."""
    out = {}
    for r in recs:
        if key in r:
            out[r["step"]] = r[key]
    return [out[s] for s in sorted(out)]



def teacher_run(settings):
    """--set values for the plain-LM run (kd.enabled false) that makes the teacher a KD run's settings name:
    such a run trains student.*, so teacher.n_* become student.n_* (set last: they win), and the other
    teacher.*/kd.* keys, which it refuses, are left out."""
    plain = [s for s in settings if not s.startswith(("teacher.", "kd."))]
    dims = [f"student.{s[len('teacher.'):]}" for s in settings if s.startswith("teacher.n_")]
    return plain + dims + ["kd.enabled=false"]


def loud_findings(run_dir, checkpoint="last.pt"):
    """The false-positive corpus check (issue 22): every warning and critical that diagnose_and_fix.py
    --config/--log/--checkpoint reports on a finished run, and every WARNING line of its own train.log.
    A healthy run gives []. E7 is left out: a shared test machine's throughput really does drop while
    other jobs run (tests/test_healthy_runs.py pins E7 on fixed throughput numbers instead)."""
    import contextlib
    import io
    import diagnose_and_fix as dx
    out = io.StringIO()
    argv = ["--config", os.path.join(run_dir, "config.yaml"), "--log", os.path.join(run_dir, "metrics.jsonl"),
            "--checkpoint", os.path.join(run_dir, "checkpoints", checkpoint), "--json"]
    with contextlib.redirect_stdout(out):
        dx.main(argv)
    found = [(f["id"], f["severity"], f["evidence"]) for f in json.loads(out.getvalue())["findings"]
             if f["severity"] != "info" and f["id"] != "E7"]
    with open(os.path.join(run_dir, "train.log")) as f:
        return found + [line.strip() for line in f if "WARNING" in line]


def distill_killed_and_resumed(settings, tmp_path, processes=1):
    """R4 as a user meets it: train_distill.py with these --set settings as processes, once uninterrupted and
    once SIGKILLed inside step 5 (after the step-4 save) then run again with the same command. All runs share
    one environment: bit-exactness holds for a fixed thread count, which a test process that other tests have
    touched need not keep. processes 2: each run under torchrun (gloo), one intra-op thread a process. Checks the
    kill and that both end with bit-identical last.pt; returns (metrics by step of the uninterrupted run, of the
    interrupted one, the interrupted run dir)."""
    import subprocess
    import sys

    import torch
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    import train_distill as td

    def command(run_dir):
        torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] * (processes > 1)
        argv = [sys.executable, *torchrun, os.path.join(root, "train_distill.py"), "--run_dir", str(run_dir)]
        return argv + [a for item in settings for a in ("--set", item)]

    env = {k: v for k, v in os.environ.items() if k != "KIT_FAULT_KILL_AT"}
    env.update({"OMP_NUM_THREADS": "1"} if processes > 1 else {})
    uninterrupted, interrupted = os.path.join(tmp_path, "uninterrupted"), os.path.join(tmp_path, "interrupted")
    clean_run = (command(uninterrupted), {"env": env})
    killed_run = (command(interrupted), {"env": {**env, "KIT_FAULT_KILL_AT": "5:1"}})
    # one process each: both at once (run_together); two torchrun launches at once would be 4 workers on 2 cores
    if processes == 1:
        clean, killed = run_together(clean_run, killed_run)
    else:
        [clean], [killed] = run_together(clean_run), run_together(killed_run)
    assert clean.returncode == 0, clean.stderr
    assert killed.returncode == (-9 if processes == 1 else 1), killed.stderr  # torchrun: its workers failed
    saved = torch.load(os.path.join(interrupted, "checkpoints", "last.pt"), map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4  # killed inside step 5, after the step-4 save
    resumed = subprocess.run(command(interrupted), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert td.checkpoint_tensors_equal(os.path.join(uninterrupted, "checkpoints", "last.pt"),
                                       os.path.join(interrupted, "checkpoints", "last.pt"))
    return td.read_metrics(uninterrupted)[0], td.read_metrics(interrupted)[0], interrupted

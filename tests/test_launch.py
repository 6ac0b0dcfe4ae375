"""launch.sh: devices, the per-run-dir lock, cron/nohup behaviour, exit statuses (issue 6).

Every launch here runs on the CPU (gloo for several processes) in a tmp_path run dir. GPU selection is
exercised with a fake nvidia-smi on PATH and --show (print the choice and the command, run nothing).
"""
import fcntl
import os
import re
import signal
import stat
import subprocess
import sys
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch.sh")
sys.path.insert(0, ROOT)
import train_probe as tp  # noqa: E402
from run_records import records  # noqa: E402

# 27 windows in global micro-batches of 6 (3 per process x 2, or 6 x 1): 6, 6, 6, 6, 3 -> a short last
# global micro-batch that splits 2 + 1 over two processes; grad_accum 2 -> steps of 2, 2, 1 micro-batches
# (a short last accumulation group): 3 optimizer steps per epoch, 9 in all. One process with batch 3:
# 9 micro-batches, 5 optimizer steps per epoch, 15 in all.
TINY_YAML = """\
task: probe
run_name: tiny
seed: 3
optim: {lr: 0.01}
schedule: {warmup: 2}
data:
  synthetic: {num_train: 27, num_val: 20, channels: 4, length: 128}
backbone: {kwargs: {width: 8, heads: 2}}
train: {epochs: 3, batch_size: 3, grad_accum: 2, log_every: 1, eval_batch_size: 8,
        save_every_minutes: 1.0e-9}  # R8: the time trigger, due after every step (agreed over processes under DDP)
"""
# Variables a developer's shell may hold that would change what a launch does.
SCRUB = ("KIT_FAULT_KILL_AT", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK",
         "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "KIT_GPU_IDLE_MB")


def write_config(tmp_path, text=TINY_YAML, name="tiny.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def launch_env(env=None):
    return {**{k: v for k, v in os.environ.items() if k not in SCRUB}, **(env or {})}


def launch(*args, cwd, env=None, timeout=240):
    return subprocess.run([LAUNCH, *args], cwd=cwd, capture_output=True, text=True, env=launch_env(env),
                          timeout=timeout)


def lock_is_free(path):
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def wait_for(condition, what, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def path_without_nvidia_smi():
    return os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                           if not os.path.exists(os.path.join(d, "nvidia-smi")))


def fake_nvidia_smi(tmp_path, table):
    """A stand-in that answers launch.sh's query (index, memory.used in MiB) with `table`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / "nvidia-smi"
    tool.write_text("#!/bin/sh\ncat <<'EOF'\n" + table + "EOF\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    return f"{bin_dir}{os.pathsep}{path_without_nvidia_smi()}"


# ---------------------------------------------------------------------------------------------------
def test_concurrent_launch_says_already_running_and_foreground_exit_status_is_the_trainings(tmp_path):
    # Two processes (torchrun), so the SIGTERM path through torchrun is the one checked as well.
    cfg = write_config(tmp_path)
    run_dir = str(tmp_path / "run")
    args = [cfg, "--gpus", "cpu:2", "--", "--run_dir", run_dir, "--set", "train.epochs=100000",
            "--set", "train.save_every_steps=1000000", "--set", "train.log_every=1000000"]
    output = open(tmp_path / "first.out", "w")  # a file, not a pipe nobody reads while it trains
    first = subprocess.Popen([LAUNCH, *args], cwd=tmp_path, env=launch_env(), stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: os.path.exists(os.path.join(run_dir, "metrics.jsonl"))
                 and any("step" in r for r in records(run_dir)), "the first launch to train")
        second = launch(*args, cwd=tmp_path)
        assert second.returncode == 0, second.stderr
        assert f"already running (pid {first.pid})" in second.stdout
        assert first.poll() is None  # the second launch left the first one alone
        first.send_signal(signal.SIGTERM)  # R8: finish the step, save, exit 128 + 15, through torchrun
        assert first.wait(timeout=120) == 128 + signal.SIGTERM, (tmp_path / "first.out").read_text()
    finally:
        if first.poll() is None:
            first.kill()
    last = tp.torch.load(os.path.join(run_dir, "checkpoints", "last.pt"), weights_only=True)
    assert last["world_size"] == 2 and not last["finished"] and last["global_step"] >= 1
    assert records(run_dir)[-1]["event"] == "stopped"


def test_finished_run_relaunched_says_complete_and_writes_nothing(tmp_path):
    cfg = write_config(tmp_path)
    run_dir = str(tmp_path / "run")
    config, _ = tp.resolve_config(cfg)
    assert tp.train(config, run_dir, "none", quiet=True)[0] == "finished"
    before = open(os.path.join(run_dir, "metrics.jsonl")).read()
    out = launch(cfg, "--gpus", "cpu", "--", "--run_dir", run_dir, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "is complete (step 15" in out.stdout
    assert open(os.path.join(run_dir, "metrics.jsonl")).read() == before


def test_detach_returns_at_once_prints_pid_and_log_and_appends_in_the_run_name_dir(tmp_path):
    # run_name comes from --set, not from the YAML: only the script's own resolve_config knows the run dir.
    cfg = write_config(tmp_path)
    run_dir = tmp_path / "runs" / "from_set"
    run_dir.mkdir(parents=True)
    (run_dir / "launch.log").write_text("an earlier launch's line\n")
    out = launch(cfg, "--gpus", "cpu", "--detach", "--", "--set", "run_name=from_set", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    pid = int(re.search(r"started pid (\d+)", out.stdout).group(1))
    assert "log runs/from_set/launch.log" in out.stdout
    lock = str(run_dir / "launch.lock")
    assert open(lock).read().strip() == str(pid)
    wait_for(lambda: lock_is_free(lock), "the detached run to finish and release its lock")
    log = (run_dir / "launch.log").read_text()
    assert log.startswith("an earlier launch's line\n")  # appended, nothing truncated
    assert "done: 15 optimizer steps" in log
    assert records(str(run_dir))[-1] == {"event": "finished", "step": 15}
    assert not os.path.exists(tmp_path / "runs" / "tiny")
    again = launch(cfg, "--gpus", "cpu", "--detach", "--", "--set", "run_name=from_set", cwd=tmp_path)
    assert again.returncode == 0 and "is complete" in again.stdout and "started pid" not in again.stdout


def test_dry_run_through_launch_sh_runs_on_the_launchs_processes_and_writes_no_run_dir(tmp_path):
    cfg = write_config(tmp_path)
    out = launch(cfg, "--gpus", "cpu:2", "--dry_run", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "dry run of" in out.stdout and "on 2 processes" in out.stdout
    assert "dry run passed" in out.stdout and "FAIL" not in out.stdout
    assert out.stdout.count("dry run passed") == 1  # printed by process 0 only
    assert not os.path.exists(tmp_path / "runs")


def test_c2_config_error_through_launch_sh_is_one_line_exit_2_and_creates_nothing(tmp_path):
    cfg = write_config(tmp_path, TINY_YAML.replace("optim: {lr: 0.01}", "optim: {lr: 0.01, maxlr: 1}"))
    out = launch(cfg, "--gpus", "cpu", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["config error: optim.maxlr: unknown key; did you mean optim.lr?"]
    assert not os.path.exists(tmp_path / "runs")


def test_unknown_task_and_bad_gpus_value_exit_2(tmp_path):
    cfg = write_config(tmp_path, TINY_YAML.replace("task: probe", "task: segment"))
    out = launch(cfg, "--gpus", "cpu", cwd=tmp_path)
    assert out.returncode == 2 and "task 'segment'" in out.stderr and "train_segment.py" in out.stderr
    out = launch(write_config(tmp_path, name="ok.yaml"), "--gpus", "two", "--show", cwd=tmp_path)
    assert out.returncode == 2 and "--gpus two" in out.stderr


def test_gpus_auto_without_nvidia_smi_fails_clearly(tmp_path):
    cfg = write_config(tmp_path)
    out = launch(cfg, "--gpus", "auto", cwd=tmp_path, env={"PATH": path_without_nvidia_smi()})
    assert out.returncode == 3
    assert "nvidia-smi is not on PATH" in out.stderr and "--gpus cpu" in out.stderr
    assert "Traceback" not in out.stderr and not os.path.exists(tmp_path / "runs" / "tiny" / "checkpoints")


def test_gpus_auto_picks_the_idle_gpus_and_several_nodes_use_torchrun_rendezvous(tmp_path):
    cfg = write_config(tmp_path)
    path = fake_nvidia_smi(tmp_path, "0, 30000\n1, 3\n2, 620\n3, 15000\n")
    nodes = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29911"}
    out = launch(cfg, "--gpus", "auto", "--show", cwd=tmp_path, env={"PATH": path, **nodes})
    assert out.returncode == 0, out.stderr
    assert "idle GPU(s) 1,2" in out.stdout and "CUDA_VISIBLE_DEVICES='1,2'" in out.stdout
    assert "= 4 process(es)" in out.stdout and "OMP_NUM_THREADS=" in out.stdout
    assert ("torchrun --nnodes=2 --node_rank=1 --master_addr=10.1.2.3 --master_port=29911 --nproc_per_node=2 "
            f"{ROOT}/train_probe.py --config {cfg}") in out.stdout
    one = launch(cfg, "--gpus", "auto:1", "--show", cwd=tmp_path, env={"PATH": path})
    assert one.returncode == 0 and "CUDA_VISIBLE_DEVICES='1'" in one.stdout
    assert f"train_probe.py --config {cfg}" in one.stdout
    assert "torchrun" not in one.stdout  # one device: plain python


def test_gpus_auto_with_every_gpu_busy_fails_clearly(tmp_path):
    cfg = write_config(tmp_path)
    path = fake_nvidia_smi(tmp_path, "0, 30000\n1, 5000\n")
    out = launch(cfg, "--gpus", "auto", cwd=tmp_path, env={"PATH": path})
    assert out.returncode == 3
    assert "no idle GPU" in out.stderr and "0: 30000 MiB" in out.stderr
    assert not os.path.exists(tmp_path / "runs" / "tiny" / "checkpoints")

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

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_probe as tp  # noqa: E402
from run_records import launch, launch_env, records, start_launch  # noqa: E402,F401 (others import launch_env here)

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
def write_config(tmp_path, text=TINY_YAML, name="tiny.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(*args, cwd, env=None, node_env=None, timeout=600):
    """The same launch.sh command as node 0 and node 1 of a two-node job on this machine (NNODES=2,
    MASTER_ADDR=127.0.0.1, one torchrun per node, static rendezvous): what two hosts sharing the run dir
    run. node_env: extra variables for one node ({1: {...}}). Returns both CompletedProcess-like results."""
    port, procs = str(free_port()), []
    for rank in (0, 1):
        nodes = {"NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(start_launch(*args, cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env={**(env or {}), **nodes, **(node_env or {}).get(rank, {})}))
    out = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=timeout)  # the bound: a node left waiting on a dead peer would hang here
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, ""))
    return out


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
    first = start_launch(*args, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT)
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


def test_c3_a_directory_given_as_the_config_is_one_line_exit_2(tmp_path):
    out = launch(str(tmp_path), cwd=tmp_path)  # a new user's ./launch.sh configs/: it said 'config configs not found'
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"launch.sh: config {tmp_path} is a directory; give the path of a YAML config file"], out.stderr
    assert os.listdir(tmp_path) == []


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



# ---------------------------------------------------------------------------------------------------
# Issue 14: robustness of the launcher.
def test_c3_gpus_list_without_cuda_exits_3_with_one_line(tmp_path):
    if tp.torch.cuda.is_available():
        return  # the machine has the GPU it names
    out = launch(write_config(tmp_path), "--gpus", "0", cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 3 and len(lines) == 1, out.stdout + out.stderr
    assert "--gpus 0" in lines[0] and "--gpus cpu" in lines[0] and "GPU(s) 0" not in out.stdout
    assert not os.path.exists(tmp_path / "runs" / "tiny" / "checkpoints")


def test_c3_task_prob_through_launch_sh_suggests_probe(tmp_path):
    out = launch(write_config(tmp_path, TINY_YAML.replace("task: probe", "task: prob")), "--gpus", "cpu", cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1
    assert "did you mean task: probe (train_probe.py)?" in lines[0]
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("where", [(), ("--run_dir", "out/a/b")])
def test_c3_a_launch_the_script_refuses_leaves_no_runs_dir_behind(tmp_path, where):
    """A refusal the preflight cannot see (the backbone's import is the script's) removes the run dir launch.sh
    made for its lock and every empty parent it made with it (runs/), not one that was there before."""
    cfg = write_config(tmp_path)
    out = launch(cfg, "--gpus", "cpu", "--", *where, "--set", "backbone.target=no_such_module:f", cwd=tmp_path)
    assert out.returncode == 2 and "backbone.target: cannot import" in out.stderr, out.stdout + out.stderr
    assert sorted(os.listdir(tmp_path)) == ["tiny.yaml"]
    (tmp_path / "runs" / "other").mkdir(parents=True)  # made by someone else: stays
    assert launch(cfg, "--gpus", "cpu", "--", "--set", "backbone.target=no_such_module:f", cwd=tmp_path).returncode == 2
    assert os.listdir(tmp_path / "runs") == ["other"]


def test_s7_finished_run_relaunched_with_other_values_says_how_to_start_a_new_run(tmp_path):
    cfg = write_config(tmp_path)
    run_dir = str(tmp_path / "run")
    config, _ = tp.resolve_config(cfg)
    assert tp.train(config, run_dir, "none", quiet=True)[0] == "finished"
    out = launch(cfg, "--gpus", "cpu", "--", "--run_dir", run_dir, "--set", "optim.lr=0.02", cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stdout + out.stderr
    assert "holds a finished run" in lines[0] and "optim.lr 0.01 -> 0.02" in lines[0]
    assert "--set run_name=NEW" in lines[0] and "--run_dir NEW" in lines[0] and "allow_schedule_change" not in lines[0]
    assert "complete" not in out.stdout


def doc_crontab_line():
    """The crontab line docs/robustness.md gives, without its five schedule fields."""
    with open(os.path.join(ROOT, "docs", "robustness.md")) as f:
        line = next(l for l in f if l.startswith("*/"))
    return line.split(None, 5)[5].strip()


def test_the_documented_crontab_line_works_with_crons_environment_from_another_directory(tmp_path):
    # cron runs the line with /bin/sh, PATH=/usr/bin:/bin, no profile, in HOME; the line cds to the project,
    # whose relative config path, data paths and runs/ resolve from there (docs/robustness.md).
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "my_run.yaml").write_text(TINY_YAML)  # the config the documented line names
    line = (doc_crontab_line().replace("/path/to/project", str(project)).replace("/path/to/kit", ROOT)
            .replace("/path/to/python", sys.executable))
    home = tmp_path / "home"
    home.mkdir()
    cron_env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "SHELL": "/bin/sh", "LOGNAME": "user"}
    out = subprocess.run(["/bin/sh", "-c", line], cwd=str(home), env=cron_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = project / "runs" / "tiny"
    wait_for(lambda: (run_dir / "launch.lock").exists() and lock_is_free(str(run_dir / "launch.lock")),
             "the cron-started run to finish")
    assert "done: 15 optimizer steps" in (run_dir / "launch.log").read_text()
    assert records(str(run_dir))[-1] == {"event": "finished", "step": 15}
    assert not os.path.exists(home / "runs")
    again = subprocess.run(["/bin/sh", "-c", line], cwd=str(home), env=cron_env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0
    assert "is complete" in (project / "cron.log").read_text()


FAKE_PYTHON3 = """#!/bin/sh
# A python3 without the kit's packages: the check fails; -m venv makes a venv whose python is the fake below.
case "$1" in
  -c) exit 1 ;;
  -m) if [ "$2" = venv ]; then
        for dir in "$@"; do :; done
        echo "venv $*" >> "$FAKE_LOG"; sleep 1
        mkdir -p "$dir/bin" && cp "$FAKE_VENV_PYTHON" "$dir/bin/python" && exit 0
      fi ;;
esac
exit 1
"""
FAKE_VENV_PYTHON = """#!/bin/sh
# The venv's python: pip 'installs' by touching marker files, slowly, and logs every call.
dir=$(dirname "$(dirname "$0")")
case "$1" in
  -c) case "$2" in *"find_spec('torch')"*) test -f "$dir/torch"; exit $? ;; *) test -f "$dir/all"; exit $? ;; esac ;;
  -m) case "$2" in
        pip) [ "$3" = --version ] && exit 0
             echo "pip start $*" >> "$FAKE_LOG"; sleep 1
             case "$*" in *requirements.txt*) touch "$dir/all" ;; *torch*) touch "$dir/torch" ;; esac
             echo "pip end" >> "$FAKE_LOG"; exit 0 ;;
        pytest) echo "pytest" >> "$FAKE_LOG"; exit 0 ;;
      esac ;;
esac
exit 1
"""


def test_venv_bootstrap_is_locked_and_says_which_torch_it_installs(tmp_path):
    # Two launches at once on a machine whose python3 lacks torch (two cron ticks during the first setup):
    # one venv, one torch install, the build KIT_TORCH names from the CPU index (no nvidia-smi), said first.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python3", FAKE_PYTHON3), ("venv_python", FAKE_VENV_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "KIT_PYTHON": "", "KIT_VENV": str(tmp_path / "venv"),
           "FAKE_LOG": str(log), "FAKE_VENV_PYTHON": str(bin_dir / "venv_python"), "KIT_TORCH": "torch==2.13.0"}
    procs = [start_launch("--tests", cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    calls = log.read_text().splitlines()
    assert sum(c.startswith("venv ") for c in calls) == 1, calls
    assert "--system-site-packages" in calls[0]
    pips = [c for c in calls if c.startswith("pip start")]
    assert len(pips) == 2 and "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in pips[0]
    assert "requirements.txt pytest" in pips[1]
    assert [c.split()[1] for c in calls if c.startswith("pip")] == ["start", "end", "start", "end"]  # one at a time
    assert calls.count("pytest") == 2
    said = "".join(err for _, err in outs)
    assert "installing 'torch==2.13.0' from https://download.pytorch.org/whl/cpu (no nvidia-smi" in said
    assert "KIT_TORCH" in said and "KIT_TORCH_INDEX" in said


def test_c5_an_unreachable_torch_index_fails_at_once_with_one_line_naming_kit_torch_index(tmp_path):
    # A real venv without torch and real pip, pointed at a closed local port (no network needed): pip gives
    # up after one retry, its own output goes to a log, and the user reads one line that says what to set.
    # pip's configuration is left out (PIP_*, config files): a machine's local wheel directory would answer.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=240)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")  # a python3 without torch
    (bin_dir / "python3").chmod(0o755)
    index = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
    env = {**{k: None for k in os.environ if k.startswith("PIP_")}, "PIP_CONFIG_FILE": os.devnull,
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "KIT_PYTHON": "", "KIT_VENV": str(venv),
           "KIT_TORCH": "torch==2.13.0", "KIT_TORCH_INDEX": index}
    out = launch("configs/probe_synthetic.yaml", "--show", cwd=ROOT, env=env, timeout=600)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 3 and len(lines) == 2 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith(f"launch.sh: installing 'torch==2.13.0' from {index} (KIT_TORCH_INDEX)")
    assert lines[1].startswith(f"launch.sh: installing 'torch==2.13.0' from {index} into {venv} failed (the index "
                               "did not answer; pip: No matching distribution found for torch==2.13.0); set "
                               "KIT_TORCH_INDEX= to install from PyPI"), lines[1]
    log = venv / "pip-install.log"
    assert f"(pip's output: {log})" in lines[1] and log.read_text().count("Retrying") <= 1  # pip's default: 5
    assert out.stdout == ""


def test_c3_a_config_error_under_several_processes_is_its_one_line_and_no_launcher_noise(tmp_path):
    """Each process resolves the config (the schedule needs the world size) and refuses it with the same line;
    torchrun's 'failed (exitcode: 2) ... of binary' and 'Sending process N closing signal' log lines and launch.sh's
    first-failure line no longer surround it."""
    out = launch(write_config(tmp_path), "--gpus", "cpu:2", "--", "--set", "schedule.warmup=0.05", cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    line = "config error: schedule.warmup: onecycle needs at least 2 warmup steps, got 0"
    assert out.returncode == 2 and set(lines) == {line} and len(lines) <= 2, out.stderr  # one line per process
    assert not os.path.exists(tmp_path / "runs" / "tiny")

"""Which Python launch.sh runs, and saying so (issues 21 and 22, C5).

The user's python3 on PATH wins when it has torch, numpy, pyyaml and tqdm; the kit's .venv is the fallback
(it used to win as soon as it existed, so the README's cron advice and a python3 with transformers stopped
counting, and the tests and the launches they make ran on two different Pythons). --show and the first
line of a launch name the interpreter; "not installed" messages name it; pytest says why it skips.
The README's two commands are run here from a fresh clone with a torch-less python3 first on PATH; a fake
venv/pip stands in for the download (no network), everything else is the real launch.sh and scripts.
The suite passes from a venv, activated or not (issue 31): the stand-in pythons below run the tests' own
interpreter by the path it was started with, and every launch a test makes goes through run_records.launch,
which names that interpreter, so none falls back to a python3 on PATH that lacks torch and installs it.
"""
import ast
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_distill as td  # noqa: E402
from run_records import launch  # noqa: E402

# The tests' interpreter as started, never its realpath: in a venv, sys.executable is the venv's bin/python
# (a link to the base interpreter), and only started by that path does it see the venv's packages.
SELF = sys.executable
PROBE = os.path.join(ROOT, "configs", "probe_synthetic.yaml")
PYTHON_LINE = re.compile(r"^launch\.sh: (?:python|tests with) (\S+) \(Python [0-9.]+, torch \S+\) \[(.*)\]$", re.M)

# python3 without the kit's packages (-S: no site-packages). `-m venv DIR` makes DIR/bin/python, a
# stand-in for a venv made with --system-site-packages: the tests' interpreter, and a pip that only logs.
TORCHLESS_PYTHON3 = f"""#!/bin/sh
if [ "$1" = -m ] && [ "$2" = venv ]; then
  for dir in "$@"; do :; done
  echo "venv $*" >> "$SHIM_LOG"
  mkdir -p "$dir/bin" && cp "$VENV_PYTHON" "$dir/bin/python" && exit 0
fi
exec {SELF} -S "$@"
"""
VENV_PYTHON = f"""#!/bin/sh
if [ "$1" = -m ] && [ "$2" = pip ]; then echo "pip $*" >> "$SHIM_LOG"; exit 0; fi
exec {SELF} "$@"
"""
GOOD_PYTHON3 = f"""#!/bin/sh
exec {SELF} "$@"
"""
# A user's own test that launches a run in the environment it inherits: under ./launch.sh --tests (which runs
# pytest in the kit's directory) the launch runs on the tests' interpreter, whatever python3 the PATH holds.
LAUNCHING_TEST = """import subprocess, sys


def test_a_launch_runs_on_the_tests_interpreter():
    out = subprocess.run(["./launch.sh", "configs/probe_synthetic.yaml", "--show"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"launch.sh: python {sys.executable} (Python "), out.stdout
"""


def shims(tmp_path):
    bins = {}
    for name, text in (("torchless", TORCHLESS_PYTHON3), ("good", GOOD_PYTHON3)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "python3").write_text(text)
        (tmp_path / name / "python3").chmod(0o755)
        bins[name] = str(tmp_path / name)
    (tmp_path / "venv_python").write_text(VENV_PYTHON)
    (tmp_path / "venv_python").chmod(0o755)
    return bins


def interpreter(output):
    """(path, why) of the interpreter a launch says it uses."""
    found = PYTHON_LINE.findall(output)
    assert len(found) == 1, output
    return found[0]


def test_c5_launches_made_by_the_tests_run_on_the_tests_interpreter(tmp_path):
    # ./launch.sh --tests on a user's test that launches a run, with a python3 first on PATH that lacks torch
    # (a venv not activated): the launch runs on the tests' interpreter, not on that python3, and installs
    # nothing (no venv appears where launch.sh would make one).
    bins = shims(tmp_path)
    (tmp_path / "test_user.py").write_text(LAUNCHING_TEST)
    env = {"PATH": f"{bins['torchless']}:{os.environ['PATH']}", "KIT_VENV": str(tmp_path / "venv")}
    out = launch("--tests", str(tmp_path / "test_user.py"), cwd=tmp_path, env=env)
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]
    assert interpreter(out.stdout) == (SELF, "KIT_PYTHON") and not (tmp_path / "venv").exists()


def test_c5_a_python3_on_path_with_the_packages_wins_over_an_existing_venv(tmp_path):
    bins = shims(tmp_path)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(VENV_PYTHON)  # a complete venv: it has every package too
    (venv / "bin" / "python").chmod(0o755)
    env = {"PATH": f"{bins['good']}:{os.environ['PATH']}", "KIT_PYTHON": "", "KIT_VENV": str(venv),
           "SHIM_LOG": str(tmp_path / "log")}
    out = launch(PROBE, "--show", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert interpreter(out.stdout) == (SELF, "the python3 on PATH")
    assert f"{bins['good']}/python3 {ROOT}/train_probe.py" in out.stdout and str(venv) not in out.stdout


def test_c5_not_installed_messages_name_the_interpreter(monkeypatch, tmp_path):
    monkeypatch.setattr(td, "transformers_installed", lambda: False)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(td.ConfigError) as err:
        td.resolve_config(None, [f"student.hf_dir={tmp_path}"])
    assert len(err.value.problems) == 1 and f"not installed for {sys.executable}" in err.value.problems[0][2]
    import prepare_text
    monkeypatch.setattr(prepare_text, "transformers_installed", lambda: False)
    assert prepare_text.main([str(tmp_path), "--tokenizer", str(tmp_path), "--out", str(tmp_path / "o")]) == 2


def test_c5_pytest_says_why_a_test_was_skipped(tmp_path):
    (tmp_path / "test_skips.py").write_text("import pytest\n\n\n@pytest.mark.skip(reason='needs the moon')\n"
                                            "def test_moon():\n    pass\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", os.path.join(ROOT, "pytest.ini"),
                          "--rootdir", str(tmp_path), str(tmp_path / "test_skips.py")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert "1 skipped" in out.stdout and "SKIPPED [1] test_skips.py:4: needs the moon" in out.stdout, out.stdout


def test_c5_the_readme_two_commands_from_a_fresh_clone_with_a_torchless_python3_first_on_path(tmp_path):
    kit = tmp_path / "kit"
    subprocess.run(["git", "clone", "--quiet", ROOT, str(kit)], check=True, timeout=120)
    assert not (kit / ".venv").exists() and not (kit / "runs").exists()
    bins = shims(tmp_path)
    log = tmp_path / "log"
    env = {"PATH": f"{bins['torchless']}:{os.environ['PATH']}", "KIT_PYTHON": "", "SHIM_LOG": str(log),
           "VENV_PYTHON": str(tmp_path / "venv_python")}
    # 1. the main job: python3 lacks torch, so launch.sh makes .venv (no torch download: the venv sees the
    #    system's packages) and trains there, saying so on its first line
    main = launch("configs/probe_synthetic.yaml", cwd=kit, env=env, timeout=900, kit=kit)
    assert main.returncode == 0, main.stdout[-2000:] + main.stderr[-2000:]
    assert main.stdout.startswith("launch.sh: python ") and "done: " in main.stdout
    main_python = interpreter(main.stdout)
    assert main_python[1].endswith("the kit's venv") and main_python[0] == SELF
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and calls[0].startswith("venv ") and "requirements.txt" in calls[1], calls
    # 2. the tests, on the same interpreter, and the launches they make on it too (a user's test, not the suite)
    (tmp_path / "test_user.py").write_text(LAUNCHING_TEST)
    tests = launch("--tests", str(tmp_path / "test_user.py"), cwd=kit, env=env, timeout=900, kit=kit)
    assert tests.returncode == 0 and "1 passed" in tests.stdout, tests.stdout[-3000:] + tests.stderr[-2000:]
    tests_python = interpreter(tests.stdout)
    assert tests_python[0] == main_python[0] and tests_python[1].endswith("the kit's venv")
    assert len(log.read_text().splitlines()) == 2  # nothing made or installed again
    # 3. once the user's python3 has the packages (the README's cron advice), it wins over the .venv
    env["PATH"] = f"{bins['good']}:{os.environ['PATH']}"
    show = launch("configs/probe_synthetic.yaml", "--show", cwd=kit, env=env, kit=kit)
    assert show.returncode == 0 and interpreter(show.stdout) == (SELF, "the python3 on PATH"), show.stdout + show.stderr


def launch_sh_paths_outside_the_helper(path):
    """(line, code) of every place in a test file that makes a launch.sh path itself (os.path.join(ROOT,
    "launch.sh"), ROOT / "launch.sh", f"{ROOT}/launch.sh", ["launch.sh", ...]) or uses a LAUNCH constant."""
    script = "launch.sh"
    with open(path) as f:
        tree = ast.parse(f.read())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        named = isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.split("/")[-1] == script
        builds = named and isinstance(parents.get(node), (ast.Call, ast.BinOp, ast.JoinedStr, ast.List, ast.Tuple))
        if builds or (isinstance(node, ast.Name) and node.id == "LAUNCH") or (
                isinstance(node, ast.alias) and node.name == "LAUNCH"):
            found.append((getattr(node, "lineno", 0), ast.unparse(parents.get(node, node))))
    return found


def test_c5_every_launch_in_the_tests_goes_through_the_one_helper_that_names_the_interpreter():
    # A launch.sh run by a test without KIT_PYTHON took the python3 on PATH; where that python3 lacks torch (a
    # venv not activated) launch.sh made .venv in the checkout and downloaded torch: a test installed things.
    helper = os.path.join(ROOT, "tests", "run_records.py")
    offenders = {os.path.basename(p): found for p in sorted(glob.glob(os.path.join(ROOT, "tests", "*.py")))
                 if p != helper and (found := launch_sh_paths_outside_the_helper(p))}
    assert offenders == {}, offenders
    assert launch_sh_paths_outside_the_helper(helper)  # the check finds what it looks for

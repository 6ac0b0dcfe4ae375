"""Each training script works when copied ALONE into an empty directory (the kit's promise, issue 32): there,
with no other file of the kit importable (no PYTHONPATH; the directory holds the script and nothing else), the
shipped configs made tiny run --dry_run, a short training that is SIGKILLed mid-run, and the same command
resuming it to the end. A feature that needs another file of the kit (the preparation tools) names it in one
line, exit 2 (C3); so does a feature whose code is a companion file (metric_sinks.py, fsdp_sharding.py,
chunked_loss.py, teacher_cache.py, probe_evaluate.py, probe_backbones.py, packing.py, hf_models.py,
distill_evaluate.py, user_models.py, on_policy.py, divergences.py), which works when copied together with the
script."""
import importlib.util
import os
import shutil
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_distill as td  # noqa: E402
import train_probe as tp  # noqa: E402
import zoo  # noqa: E402
from run_records import launch  # noqa: E402
from test_prepare_text import chat_data  # noqa: E402, F401

CONFIGS = os.path.join(ROOT, "configs")
PROBE_TINY = ["data.synthetic.num_train=96", "data.synthetic.num_val=32", "data.synthetic.length=256",
              "train.batch_size=8", "train.grad_accum=2", "train.epochs=2", "schedule.warmup=2", "train.log_every=1",
              "train.save_every_steps=1", "train.eval_batch_size=32"]  # 12 optimizer steps
# the demo's teacher and student both made 1 layer x 16 wide, 8 optimizer steps on 16-token windows
DISTILL_TINY = ["train.max_steps=8", "data.seq_len=16", "data.val_windows=16", "data.builtin.train_bytes=20000",
                "data.builtin.val_bytes=4000", "train.batch_size=4", "train.log_every=1", "train.eval_every=4",
                "train.save_every_steps=1", "train.eval_batch_size=16", "student.n_layer=1", "student.n_embd=16",
                "student.n_head=2"]
TEACHER_TINY = ["teacher.n_layer=1", "teacher.n_embd=16", "teacher.n_head=2"]


def copied_alone(tmp_path, script):
    """An empty directory holding only a copy of the script."""
    where = tmp_path / "elsewhere"
    where.mkdir()
    shutil.copy(os.path.join(ROOT, script), where / script)
    return where


def run(where, script, *args, kill_at=None):
    """The copy run from its directory as a user would; kill_at "STEP:MICRO" SIGKILLs it there (tests' hook)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("KIT_FAULT_")}
    env.update({"KIT_FAULT_KILL_AT": kill_at} if kill_at else {})
    return subprocess.run([sys.executable, script, *args], cwd=where, env=env, capture_output=True, text=True,
                          timeout=600)


def killed_then_resumed(where, script, args, steps):
    """The run SIGKILLed before step 5's first micro-batch (last.pt saved every step), then the same command:
    it resumes from step 4 and ends at `steps` with its export written."""
    killed = run(where, script, *args, kill_at="5:0")
    assert killed.returncode == -9, killed.stderr[-2000:]
    done = run(where, script, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout and "at optimizer step 4" in done.stdout, done.stdout[-2000:]
    assert f"done: {steps} optimizer steps" in done.stdout


def test_train_probe_copied_alone_dry_runs_trains_resumes_after_a_kill_and_evaluates_beside_its_companion(tmp_path):
    where = copied_alone(tmp_path, "train_probe.py")
    config = ["--config", os.path.join(CONFIGS, "probe_synthetic.yaml")]
    dry = run(where, "train_probe.py", "--dry_run", *config)
    assert dry.returncode == 0 and "dry run passed" in dry.stdout, dry.stdout[-2000:] + dry.stderr[-2000:]
    killed_then_resumed(where, "train_probe.py", [*config, "--set", *PROBE_TINY], 12)
    assert (where / "runs" / "probe_synthetic" / "export").is_dir()
    assert sorted(os.listdir(where)) == ["runs", "train_probe.py"]  # the copy needed nothing else
    # --evaluate and load_export are the companion probe_evaluate.py: alone, one line, exit 2; beside it, they score
    export = ["--evaluate", "runs/probe_synthetic/export", *config, "--set", *PROBE_TINY]
    out = run(where, "train_probe.py", *export)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "config error: --evaluate: needs probe_evaluate.py beside train_probe.py (copy it from the kit), or run "
        "without --evaluate"], out.stderr[-2000:]
    assert not (where / "runs" / "probe_synthetic" / "evaluation").exists()
    shutil.copy(os.path.join(ROOT, "probe_evaluate.py"), where)
    out = run(where, "train_probe.py", *export)  # the export: load_export() rebuilds the network
    assert out.returncode == 0 and '"val/auroc"' in out.stdout.splitlines()[-1], out.stdout[-2000:] + out.stderr
    assert (where / "runs" / "probe_synthetic" / "evaluation" / "val_predictions.csv").is_file()


def test_train_distill_copied_alone_makes_the_demo_teacher_dry_runs_and_distils_resuming_after_a_kill(tmp_path):
    where = copied_alone(tmp_path, "train_distill.py")
    teacher = run(where, "train_distill.py", "--config", os.path.join(CONFIGS, "distill_demo_teacher.yaml"),
                  "--set", *DISTILL_TINY)  # the short training: writes runs/distill_demo_teacher/, as the demo does
    assert teacher.returncode == 0, teacher.stderr[-2000:]
    student = ["--config", os.path.join(CONFIGS, "distill_demo.yaml"), "--set", *DISTILL_TINY, *TEACHER_TINY]
    dry = run(where, "train_distill.py", "--dry_run", *student)  # KD from the teacher just made
    assert dry.returncode == 0 and "dry run passed" in dry.stdout, dry.stdout[-2000:] + dry.stderr[-2000:]
    killed_then_resumed(where, "train_distill.py", student, 8)
    assert (where / "runs" / "distill_demo" / "export").is_dir()
    assert sorted(os.listdir(where)) == ["runs", "train_distill.py"]
    # --evaluate is the companion distill_evaluate.py: alone, one line, exit 2; beside it, the export is scored
    export = ["--evaluate", "runs/distill_demo/export", *student]
    out = run(where, "train_distill.py", *export)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "config error: --evaluate: needs distill_evaluate.py beside train_distill.py (copy it from the kit), or run "
        "without --evaluate"], out.stderr[-2000:]
    shutil.copy(os.path.join(ROOT, "distill_evaluate.py"), where)
    out = run(where, "train_distill.py", *export)
    assert out.returncode == 0 and '"val/agreement"' in out.stdout.splitlines()[-1], out.stdout[-2000:] + out.stderr


@pytest.mark.parametrize("module, flag, tool, config", [(tp, "--prepare_tuab", "prepare_tuab.py", "probe_synthetic"),
                                                        (td, "--tokenize", "prepare_text.py", "distill_demo")])
def test_c3_a_training_script_asked_for_a_preparation_names_the_tool_it_moved_to_in_one_line(
        module, flag, tool, config, tmp_path, capsys):
    """From the script and through launch.sh (whose preflight parses the script's options): one line, exit 2,
    nothing written, no run dir."""
    with pytest.raises(SystemExit) as exit_:  # an option the script no longer has, as argparse would exit
        module.main([flag, str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"config error: {flag}:") and f"python {tool}" in err[0], err
    assert f"the kit's {tool} (copy it beside this script)" in err[0]  # a copied script has no tool beside it
    out = launch(os.path.join(CONFIGS, f"{config}.yaml"), "--gpus", "cpu", "--", flag, "src", "--out", "out",
                 cwd=tmp_path, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == err, out.stderr
    assert os.listdir(tmp_path) == []  # nothing written, no run dir


@pytest.mark.parametrize("tool, script, args", [
    ("prepare_tuab.py", "train_probe.py", ["src", "--out", "out"]),
    ("prepare_text.py", "train_distill.py", ["a.txt", "--tokenizer", "tok", "--out", "out"])])
def test_c3_a_tool_copied_without_the_training_script_it_runs_names_the_script_in_one_line(tool, script, args,
                                                                                          tmp_path):
    """A preparation tool imports its training script (its config and checks): copied alone, it says which file to
    copy in one line, exit 2 (its --help too), nothing written; diagnose copied alone names the script in its fix."""
    where = copied_alone(tmp_path, tool)
    line = f"{tool}: needs {script} beside it (copy it from the kit)"
    for argv in (args, ["--help"]):
        out = run(where, tool, *argv)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, (argv, out.stderr[-2000:])
        assert out.stderr.startswith(line) and not out.stdout, out.stderr
    assert sorted(os.listdir(where)) == [tool]
    shutil.copy(os.path.join(ROOT, script), where)
    assert run(where, tool, "--help").returncode == 0
    shutil.copy(os.path.join(ROOT, "diagnose_and_fix.py"), tmp_path)  # a directory without the training scripts
    config = "probe_synthetic" if script == "train_probe.py" else "distill_demo"
    out = run(tmp_path, "diagnose_and_fix.py", "--config", os.path.join(CONFIGS, f"{config}.yaml"))
    assert out.returncode == 1 and f"fix: copy {script} beside diagnose_and_fix.py" in out.stdout, out.stdout
    assert out.stdout.splitlines()[-1].startswith("1 critical, "), out.stdout  # C3: exit 1, the count in the report


def companion_line(key, name, script):
    return f"config error: {key}: needs {name}.py beside {script} (copy it from the kit), or leave {key} unset"


COMPANION_KEYS = [
    ("train_probe.py", "probe_synthetic", "log.tensorboard=true", "metric_sinks"),
    ("train_probe.py", "probe_synthetic", "backbone.pool=flatten", "probe_backbones"),
    ("train_distill.py", "distill_demo", "log.wandb=proj", "metric_sinks"),
    ("train_distill.py", "distill_demo", "train.strategy=fsdp", "fsdp_sharding"),
    ("train_distill.py", "distill_demo", "train.activation_checkpointing=true", "fsdp_sharding"),
    ("train_distill.py", "distill_demo", "kd.chunk_tokens=8", "chunked_loss"),
    ("train_distill.py", "distill_demo", "kd.teacher_cache=cache", "teacher_cache"),
    ("train_distill.py", "distill_demo", "data.packing=true", "packing"),
    ("train_distill.py", "distill_demo", "student.target=zoo:tiny_causal_lm", "user_models"),
    ("train_distill.py", "distill_demo", "kd.divergence=jsd", "divergences"),
    ("train_distill.py", "distill_demo_teacher", "student.hf_dir=hf", "hf_models"),
    ("train_distill.py", "distill_demo", "kd.hf_teacher_dir=hf", "hf_models"),
    ("train_distill.py", "distill_demo", "kd.on_policy_fraction=0.5", "on_policy"),
    ("train_distill.py", "distill_demo", "kd.seq_kd=true", "on_policy")]


def loaded_copy(where, script):
    """The copy imported from its own directory, as its process would run it (companion() looks beside __file__)."""
    spec = importlib.util.spec_from_file_location(f"copy_of_{script[:-3]}_{abs(hash(str(where)))}", where / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, config, setting, name", COMPANION_KEYS)
def test_c3_a_script_copied_alone_refuses_each_companion_key_naming_the_file_in_one_line(
        script, config, setting, name, tmp_path, monkeypatch):
    """Every key whose code is a companion file (issue 32): the copy's own config resolution, which the run, its
    --dry_run and diagnose all go through first, refuses it with the file's one line. In one process per script
    copy; the processes' exit codes, stderr and diagnose's line are the next test's, for one key of each kind."""
    where = copied_alone(tmp_path, script)
    copy = loaded_copy(where, script)
    monkeypatch.chdir(where)
    with pytest.raises(copy.ConfigError) as refused:
        copy.resolve_config(os.path.join(CONFIGS, f"{config}.yaml"), [setting])
    assert str(refused.value) == companion_line(setting.split("=")[0], name, script)
    assert sorted(os.listdir(where)) == [script]


@pytest.mark.parametrize("script, config, setting, name", [COMPANION_KEYS[0], COMPANION_KEYS[10], COMPANION_KEYS[12]])
def test_c3_a_script_copied_alone_asked_for_a_companion_feature_names_the_file_in_one_line(
        script, config, setting, name, tmp_path):
    """A feature whose code is a companion file of the kit (issue 32): the run, its --dry_run and diagnose (copied
    beside it) each name the file in the same one line; the run and the dry run exit 2 and write nothing."""
    where = copied_alone(tmp_path, script)
    line = companion_line(setting.split("=")[0], name, script)
    args = ["--config", os.path.join(CONFIGS, f"{config}.yaml"), "--set", setting]
    for extra in ([], ["--dry_run"]):
        out = run(where, script, *extra, *args)
        assert out.returncode == 2 and out.stderr.strip().splitlines() == [line], (extra, out.stderr[-2000:])
    assert sorted(os.listdir(where)) == [script]  # nothing written, no run dir
    shutil.copy(os.path.join(ROOT, "diagnose_and_fix.py"), where)
    out = run(where, "diagnose_and_fix.py", *args)
    assert out.returncode == 1 and f"CRITICAL C3   [config] {line[len('config error: '):]}" in out.stdout, out.stdout


def test_e10_train_probe_copied_with_metric_sinks_py_writes_tensorboard_events(tmp_path):
    """The script and its companion copied together: the feature works there."""
    where = copied_alone(tmp_path, "train_probe.py")
    shutil.copy(os.path.join(ROOT, "metric_sinks.py"), where)
    config = ["--config", os.path.join(CONFIGS, "probe_synthetic.yaml"), "--set", *PROBE_TINY, "train.epochs=1",
              "log.tensorboard=true"]
    out = run(where, "train_probe.py", *config)
    assert out.returncode == 0 and "WARNING" not in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    events = os.listdir(where / "runs" / "probe_synthetic" / "tb")
    assert len(events) == 1 and events[0].startswith("events.out.tfevents"), events


def test_c3_train_probe_copied_with_probe_backbones_py_trains_a_users_backbone_from_its_checkpoint(tmp_path):
    """The script and its companion copied together: a user's module (backbone.target) returning a dict of
    [B, N, D] tokens (backbone.output, backbone.pool) with its weights in a Lightning-style checkpoint
    (backbone.checkpoint) trains there."""
    where = copied_alone(tmp_path, "train_probe.py")
    shutil.copy(os.path.join(ROOT, "probe_backbones.py"), where)
    (where / "mine.py").write_text(
        "import torch\n\n\nclass Tokens(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.proj = torch.nn.Conv1d(19, 8, 32, stride=32)\n\n    def forward(self, x):\n"
        "        return {'tokens': self.proj(x).transpose(1, 2), 'note': 'x'}\n\n\n"
        "if __name__ == '__main__':\n    torch.save({'state_dict': {'model.' + k: v for k, v in "
        "Tokens().state_dict().items()}}, 'mine.ckpt')\n")
    assert run(where, "mine.py").returncode == 0
    out = run(where, "train_probe.py", "--config", os.path.join(CONFIGS, "probe_synthetic.yaml"), "--set",
              *PROBE_TINY, "train.epochs=1", "backbone.target=mine:Tokens", "backbone.checkpoint=mine.ckpt",
              "backbone.output=tokens", "backbone.pool=mean_tokens")
    assert out.returncode == 0 and "WARNING" not in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert "tensors loaded from" in out.stdout and "done: 6 optimizer steps" in out.stdout, out.stdout[-2000:]


def test_d1_train_distill_copied_with_fsdp_sharding_py_trains_sharded_and_checkpoints_with_dcp(tmp_path):
    """The script and its companion copied together: train.strategy fsdp (one process) runs there, and its
    checkpoint names the DCP directory the companion wrote (D2)."""
    where = copied_alone(tmp_path, "train_distill.py")
    shutil.copy(os.path.join(ROOT, "fsdp_sharding.py"), where)
    out = run(where, "train_distill.py", "--config", os.path.join(CONFIGS, "distill_demo_teacher.yaml"), "--set",
              *DISTILL_TINY, "train.max_steps=2", "train.eval_every=2", "train.strategy=fsdp")
    assert out.returncode == 0 and "WARNING" not in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    ckpt_dir = where / "runs" / "distill_demo_teacher" / "checkpoints"
    assert td.torch.load(ckpt_dir / "last.pt", weights_only=True)["shards"] in os.listdir(ckpt_dir)


def test_d6_train_distill_copied_with_chunked_loss_py_trains_chunked(tmp_path):
    """The script and its companion copied together: kd.chunk_tokens runs there."""
    where = copied_alone(tmp_path, "train_distill.py")
    shutil.copy(os.path.join(ROOT, "chunked_loss.py"), where)
    out = run(where, "train_distill.py", "--config", os.path.join(CONFIGS, "distill_demo_teacher.yaml"), "--set",
              *DISTILL_TINY, "train.max_steps=2", "train.eval_every=2", "kd.chunk_tokens=8")
    assert out.returncode == 0 and "WARNING" not in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert "done: 2 optimizer steps" in out.stdout


def test_c10_train_distill_copied_with_packing_py_trains_packed_rows(chat_data, tmp_path):
    """The script and its companion copied together: data.packing runs there on prepared chat examples (the
    built-in GPT trained on them, several examples a row)."""
    where = copied_alone(tmp_path, "train_distill.py")
    shutil.copy(os.path.join(ROOT, "packing.py"), where)
    data = [f"data.{key}={value}" for key, value in chat_data["data"].items()]
    out = run(where, "train_distill.py", "--config", os.path.join(CONFIGS, "distill_demo_teacher.yaml"), "--set",
              *DISTILL_TINY, *data, "data.seq_len=255", "train.max_steps=2", "train.eval_every=2", "data.packing=true")
    assert out.returncode == 0 and "WARNING" not in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert "rows of packed examples" in out.stdout and "done: 2 optimizer steps" in out.stdout, out.stdout[-2000:]


def test_c3_train_distill_copied_with_user_models_py_trains_and_exports_a_users_module(tmp_path):
    """The script and its companion copied together: student.target (zoo's GRU language model, its module copied
    beside the script as a user's own file) trains there and is exported as a state dict."""
    where = copied_alone(tmp_path, "train_distill.py")
    for name in ("user_models.py", os.path.join("tests", "zoo.py")):
        shutil.copy(os.path.join(ROOT, name), where)
    out = run(where, "train_distill.py", "--config", os.path.join(CONFIGS, "distill_demo_teacher.yaml"), "--set",
              *DISTILL_TINY, "train.max_steps=2", "train.eval_every=2", "student.target=zoo:tiny_causal_lm")
    assert out.returncode == 0 and "WARNING" not in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert "zoo:tiny_causal_lm" in out.stdout and "done: 2 optimizer steps" in out.stdout, out.stdout[-2000:]
    assert (where / "runs" / "distill_demo_teacher" / "export" / "model.pt").is_file()


def test_e14_train_distill_copied_with_on_policy_py_distils_on_policy_and_with_seq_kd(tmp_path):
    """The script and its companion copied together: a tiny teacher, then a student half on-policy with the
    other micro-batches the teacher's (kd.seq_kd), its generation on record in the step records."""
    where = copied_alone(tmp_path, "train_distill.py")
    shutil.copy(os.path.join(ROOT, "on_policy.py"), where)
    short = [*DISTILL_TINY, "train.max_steps=2", "train.eval_every=2"]
    teacher = run(where, "train_distill.py", "--config", os.path.join(CONFIGS, "distill_demo_teacher.yaml"), "--set",
                  *short)
    assert teacher.returncode == 0, teacher.stderr[-2000:]
    out = run(where, "train_distill.py", "--config", os.path.join(CONFIGS, "distill_demo.yaml"), "--set", *short,
              *TEACHER_TINY, "kd.on_policy_fraction=0.5", "kd.seq_kd=true", "kd.prompt_tokens=8",
              "kd.max_new_tokens=8")
    assert out.returncode == 0 and "WARNING" not in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert "on-policy: 0.5 of the micro-batches continue a 8-token prompt" in out.stdout
    assert "done: 2 optimizer steps" in out.stdout
    trains = td.read_metrics(str(where / "runs" / "distill_demo"))[0]
    assert sum(r["on_policy/micro_batches"] + r["seq_kd/micro_batches"] for r in trains.values()) == 4  # 2 steps x 2


def test_e13_train_distill_copied_with_divergences_py_distils_with_jsd(tmp_path):
    """The script and its companion copied together: a tiny teacher, then the student distilled from it with
    kd.divergence jsd (GKD's generalised JSD), the term logged."""
    where = copied_alone(tmp_path, "train_distill.py")
    shutil.copy(os.path.join(ROOT, "divergences.py"), where)
    short = [*DISTILL_TINY, "train.max_steps=2", "train.eval_every=2"]
    teacher = run(where, "train_distill.py", "--config", os.path.join(CONFIGS, "distill_demo_teacher.yaml"), "--set",
                  *short)
    assert teacher.returncode == 0, teacher.stderr[-2000:]
    out = run(where, "train_distill.py", "--config", os.path.join(CONFIGS, "distill_demo.yaml"), "--set", *short,
              *TEACHER_TINY, "kd.divergence=jsd", "kd.top_k=null")
    assert out.returncode == 0 and "WARNING" not in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert "JSD(beta 0.5)" in out.stdout and "done: 2 optimizer steps" in out.stdout, out.stdout[-2000:]


def test_r9_train_distill_copied_with_teacher_cache_py_builds_the_cache_and_distils_offline(tmp_path):
    """The script and its companion copied together: a tiny teacher, --cache_teacher builds its cache there, and
    the offline student trains from it with no teacher in memory."""
    where = copied_alone(tmp_path, "train_distill.py")
    shutil.copy(os.path.join(ROOT, "teacher_cache.py"), where)
    short = [*DISTILL_TINY, "train.max_steps=2", "train.eval_every=2"]
    teacher = run(where, "train_distill.py", "--config", os.path.join(CONFIGS, "distill_demo_teacher.yaml"), "--set",
                  *short)
    assert teacher.returncode == 0, teacher.stderr[-2000:]
    student = ["--config", os.path.join(CONFIGS, "distill_demo.yaml"), "--set", *short, *TEACHER_TINY,
               "kd.gamma=0", "kd.top_k=4", "kd.teacher_cache=cache"]
    built, cache = run(where, "train_distill.py", "--cache_teacher", *student), where / "cache"
    assert built.returncode == 0 and f"teacher cache: {cache} complete in" in built.stdout, built.stdout[-2000:]
    out = run(where, "train_distill.py", *student)
    assert out.returncode == 0 and "WARNING" not in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"teacher: offline, its top-4 from the cache {cache}" in out.stdout and "nothing to build" in out.stdout
    assert "done: 2 optimizer steps" in out.stdout


def test_c3_train_distill_copied_with_hf_models_py_trains_and_exports_a_hugging_face_student(tmp_path):
    """The script and its companion copied together: the zoo's tiny Hugging Face Llama (the models tests' smallest)
    as student.hf_dir trains there, and its export is a save_pretrained directory. Its best.pt as the next teacher
    without the file: the config names no Hugging Face directory, the checkpoint holds one: the same one line."""
    pytest.importorskip("transformers", reason=f"transformers is not installed for {sys.executable}")
    where = copied_alone(tmp_path, "train_distill.py")
    shutil.copy(os.path.join(ROOT, "hf_models.py"), where)
    student = zoo.hf_llama(tmp_path / "llama")
    out = run(where, "train_distill.py", "--config", os.path.join(CONFIGS, "distill_demo_teacher.yaml"), "--set",
              *DISTILL_TINY, "train.max_steps=2", "train.eval_every=2", f"student.hf_dir={student}")
    assert out.returncode == 0 and "WARNING" not in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"model: Hugging Face model {student} (its weights)" in out.stdout and "done: 2 optimizer steps" in out.stdout
    assert "model.safetensors" in os.listdir(where / "runs" / "distill_demo_teacher" / "export")
    os.remove(where / "hf_models.py")  # distill_demo's kd.teacher_checkpoint is that run's best.pt
    line = ("config error: kd.teacher_checkpoint: needs hf_models.py beside train_distill.py (copy it from the kit), or "
            "give a checkpoint whose network is not a Hugging Face model")
    for extra in ([], ["--dry_run"]):
        out = run(where, "train_distill.py", *extra, "--config", os.path.join(CONFIGS, "distill_demo.yaml"), "--set",
                  *DISTILL_TINY, *TEACHER_TINY)
        assert out.returncode == 2 and out.stderr.strip().splitlines() == [line], (extra, out.stderr[-2000:])
    assert sorted(os.listdir(where / "runs")) == ["distill_demo_teacher"]  # nothing written


def test_c3_each_script_loads_a_companion_from_its_own_directory_once_with_itself_as_kit(monkeypatch):
    """Never from sys.path: a user's module of the same name (here already imported) is not the kit's file;
    each script keeps its own copy (both scripts share this process), whose `kit` is that script."""
    monkeypatch.setitem(sys.modules, "metric_sinks", types.ModuleType("metric_sinks"))
    monkeypatch.setattr(tp, "COMPANIONS", {})
    probe_sinks, distill_sinks = tp.companion("metric_sinks", "log.tensorboard"), td.companion("metric_sinks", "x")
    assert probe_sinks.kit is tp and distill_sinks.kit is td and probe_sinks is not distill_sinks
    assert probe_sinks.__file__ == os.path.join(ROOT, "metric_sinks.py") and hasattr(probe_sinks, "open_sinks")
    assert tp.companion("metric_sinks", "log.wandb") is probe_sinks  # loaded once

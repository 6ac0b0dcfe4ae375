"""train_distill.py with the models users bring (issue 12): Hugging Face causal LMs and plain nn.Modules as
teacher and as student, the export of the best student, the position and vocabulary checks, the RNG
discipline with dropout (R4). (prepare_text.py, which makes token files from text: tests/test_prepare_text.py.)

The models come from tests/zoo.py: a tiny HF GPT-2 (dropout 0.1, GPT-2's default) and a tiny HF Llama
(RoPE), random weights saved locally (nothing is downloaded), vocabulary 256 so the built-in byte corpus
is their data; and TinyCausalLM, a user module for student.target / teacher.target.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import zoo
from run_records import run_together

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import train_distill as T  # noqa: E402

needs_hf = pytest.mark.skipif(not T.transformers_installed(), reason=f"transformers is not installed for {sys.executable}")
CPU = torch.device("cpu")
# 20 windows of the built-in corpus, batch 3, accumulation 2: 7 micro-batches, 4 optimizer steps per epoch,
# 8 in all; last.pt every 2 steps, so a kill inside step 3 resumes from step 2, in the middle of epoch 1.
TINY = ["data.seq_len=16", "data.limit=20", "data.val_windows=8", "data.builtin.train_bytes=40000",
        "data.builtin.val_bytes=8000", "train.epochs=2", "train.max_steps=null", "train.batch_size=3",
        "train.grad_accum=2", "train.log_every=1", "train.eval_every=4", "train.save_every_steps=2",
        "train.save_every_minutes=null", "train.eval_batch_size=8", "schedule.warmup=2", "optim.lr=0.003",
        "train.max_loss_share=1"]
KD = ["kd.enabled=true", "kd.alpha=0.5", "kd.beta=0.5", "kd.gamma=0.2", "kd.temperature=2"]
USER = "zoo:tiny_causal_lm"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The zoo's HF directories; the GPT-2 one also holds a tokenizer's files (the export copies them)."""
    pytest.importorskip("transformers", reason=f"transformers is not installed for {sys.executable}")
    d = tmp_path_factory.mktemp("zoo")
    dirs = {"gpt2": zoo.hf_gpt2(d / "gpt2"), "llama": zoo.hf_llama(d / "llama"),
            "gpt2_vocab300": zoo.hf_gpt2(d / "gpt2_vocab300", vocab=300),
            "config_only": zoo.hf_config_only(d / "config_only", "llama")}
    zoo.tiny_tokenizer(dirs["gpt2"], ["def f(x): return x + 1\n" * 50], vocab_size=100)
    return dirs


def ckpt(run_dir, name="last.pt"):
    return torch.load(os.path.join(run_dir, "checkpoints", name), map_location="cpu", weights_only=True)


def train(settings, run_dir, **kwargs):
    cfg, _ = T.resolve_config(None, settings)
    outcome, run = T.train(cfg, str(run_dir), kwargs.pop("resume", "none"), quiet=True, **kwargs)
    return cfg, outcome, run


def val_batch(cfg, n=4):
    return T.TokenWindows(cfg, "val")[np.arange(n)][0]


def kit_logits(cfg, run_dir, x, name="best.pt"):
    """best.pt's network loaded into train_distill.py's own model (eval mode): the reference for exports."""
    teacher = T.build_teacher(cfg, CPU) if cfg["kd.enabled"] else None
    module = T.build_trainable(cfg, teacher)
    module.load_state_dict(ckpt(run_dir, name)["model"])
    with torch.no_grad():
        return module.eval()(x)[0]


def same(a, b):
    """Nested checkpoint values equal: tensors bit for bit, everything else by ==."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def command(settings, run_dir):
    argv = [sys.executable, os.path.join(ROOT, "train_distill.py"), "--run_dir", str(run_dir)]
    return argv + [a for item in settings for a in ("--set", item)]


def environment(**extra):
    env = {k: v for k, v in os.environ.items() if k != "KIT_FAULT_KILL_AT"}  # one intra-op thread (conftest.py, R4)
    env["PYTHONPATH"] = os.pathsep.join([HERE] + [p for p in [env.get("PYTHONPATH")] if p])  # 'zoo:...' targets
    return {**env, **extra}


def uninterrupted_and_killed(settings, tmp):
    """The same command line, uninterrupted vs SIGKILLed before micro-batch 1 of step 3 and run again. All
    runs are processes with one environment (bit-exactness holds for a fixed thread count); the first two at once."""
    a, b = tmp / "uninterrupted", tmp / "interrupted"
    clean, killed = run_together((command(settings, a), {"env": environment()}),
                                 (command(settings, b), {"env": environment(KIT_FAULT_KILL_AT="3:1")}))
    assert clean.returncode == 0, clean.stderr
    assert killed.returncode == -9, killed.stderr
    assert ckpt(b)["global_step"] == 2  # mid-epoch: the resumed process makes a DataLoader iterator the clean one did not
    resumed = subprocess.run(command(settings, b), env=environment(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    return str(a), str(b)


# ----------------------------------------------------------------------------- R4 with dropout
@pytest.fixture(scope="module")
def gpt2_student(models, tmp_path_factory):
    """HF GPT-2 student (dropout 0.1) distilled from the HF Llama teacher, hidden-state loss on."""
    settings = TINY + KD + [f"kd.hf_teacher_dir={models['llama']}", f"student.hf_dir={models['gpt2']}"]
    a, b = uninterrupted_and_killed(settings, tmp_path_factory.mktemp("gpt2_student"))
    return settings, a, b


@needs_hf
def test_r4_hf_student_with_dropout_resumes_bit_exact_after_sigkill_mid_epoch(gpt2_student, models):
    settings, a, b = gpt2_student
    with open(os.path.join(models["gpt2"], "config.json")) as f:
        assert json.load(f)["resid_pdrop"] == 0.1  # the student draws dropout masks from the torch RNG every step
    assert T.checkpoint_tensors_equal(os.path.join(a, "checkpoints", "last.pt"), os.path.join(b, "checkpoints", "last.pt"))
    ra, rb = T.read_metrics(a)[0], T.read_metrics(b)[0]
    assert sorted(ra) == sorted(rb) == list(range(1, 9))
    assert all(ra[s]["loss"] == rb[s]["loss"] and ra[s]["grad_norm"] == rb[s]["grad_norm"] for s in ra)


@needs_hf
def test_r4_rng_state_in_last_pt_after_resume_equals_the_uninterrupted_runs(gpt2_student):
    _, a, b = gpt2_student
    for name in ("last.prev.pt", "last.pt"):  # steps 6 and 8, both written by the resumed process
        clean, resumed = ckpt(a, name), ckpt(b, name)
        assert clean["global_step"] == resumed["global_step"] == {"last.prev.pt": 6, "last.pt": 8}[name]
        assert same(clean["rng"], resumed["rng"]), name
    # the state really moves between saves (dropout draws), so equal states are not equal by default
    assert not torch.equal(ckpt(a)["rng"][0]["torch"], ckpt(a, "last.prev.pt")["rng"][0]["torch"])


@needs_hf
def test_r4_hf_llama_student_resumes_bit_exact_after_sigkill(models, tmp_path):
    """HF Llama (RoPE) student distilled from the HF GPT-2 teacher, kd.gamma 0: no hidden states asked for."""
    settings = TINY + KD + [f"kd.hf_teacher_dir={models['gpt2']}", f"student.hf_dir={models['llama']}", "kd.gamma=0"]
    a, b = uninterrupted_and_killed(settings, tmp_path)
    assert T.checkpoint_tensors_equal(os.path.join(a, "checkpoints", "last.pt"), os.path.join(b, "checkpoints", "last.pt"))
    assert same(ckpt(a)["rng"], ckpt(b)["rng"])
    ra, rb = T.read_metrics(a)[0], T.read_metrics(b)[0]
    assert all(ra[s]["loss"] == rb[s]["loss"] for s in ra) and "loss/hidden" not in ra[1]


@needs_hf
def test_r4_two_process_hf_student_with_dropout_resumes_bit_exact_after_sigkill_mid_epoch(models, tmp_path):
    """torchrun, 2 processes (gloo): each process draws its own dropout masks from its own RNG stream; both
    are SIGKILLed inside step 3 and the relaunch restores each process's state from last.pt."""
    settings = TINY + KD + ["data.limit=40", f"kd.hf_teacher_dir={models['llama']}", f"student.hf_dir={models['gpt2']}"]

    def launch(run_dir, **env):
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        return subprocess.run(argv + command(settings, run_dir)[1:], env=environment(**env), capture_output=True, text=True)

    a, b = tmp_path / "uninterrupted", tmp_path / "interrupted"
    clean = launch(a)
    assert clean.returncode == 0, clean.stderr[-3000:]
    killed = launch(b, KIT_FAULT_KILL_AT="3:1")
    assert killed.returncode != 0 and ckpt(b)["global_step"] == 2 and ckpt(b)["world_size"] == 2
    resumed = launch(b)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert T.checkpoint_tensors_equal(os.path.join(a, "checkpoints", "last.pt"), os.path.join(b, "checkpoints", "last.pt"))
    clean_rng, resumed_rng = ckpt(a)["rng"], ckpt(b)["rng"]
    assert len(clean_rng) == 2 and same(clean_rng, resumed_rng)
    assert not torch.equal(clean_rng[0]["torch"], clean_rng[1]["torch"])  # one stream per process


# ----------------------------------------------------------------------------- export and the next teacher
@needs_hf
def test_export_of_hf_student_loads_with_from_pretrained_and_gives_best_pt_logits(gpt2_student, models):
    import transformers
    settings, a, _ = gpt2_student
    export = os.path.join(a, "export")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(export))
    cfg, _ = T.resolve_config(None, settings)
    x = val_batch(cfg)
    model = transformers.AutoModelForCausalLM.from_pretrained(export, local_files_only=True).eval()
    with torch.no_grad():
        logits = model(input_ids=x).logits
    assert torch.equal(logits, kit_logits(cfg, a, x))
    assert len(transformers.AutoTokenizer.from_pretrained(export, local_files_only=True)) > 0


@needs_hf
def test_hf_student_checkpoint_is_the_next_teacher(gpt2_student):
    """kd.teacher_checkpoint = an HF student's best.pt: rebuilt from its saved config (student.hf_dir)."""
    settings, a, _ = gpt2_student
    cfg, _ = T.resolve_config(None, TINY + KD + [f"kd.teacher_checkpoint={os.path.join(a, 'checkpoints', 'best.pt')}"])
    teacher = T.build_teacher(cfg, CPU)
    x = val_batch(cfg)
    with torch.no_grad():
        t_logits, t_hidden = teacher(x)
    assert isinstance(teacher, T.hf_models("kd.teacher_checkpoint").HFCausalLM) and t_hidden.shape == (4, 16, 32)  # kd.gamma 0.2: hidden states on
    assert torch.equal(t_logits, kit_logits(T.resolve_config(None, settings)[0], a, x))


@needs_hf
def test_c3_kd_disabled_trains_your_own_hf_model_as_the_teacher_and_exports_it_with_its_tokenizer(models, tmp_path):
    """Training your own teacher: kd.enabled false trains the model student.hf_dir names (the same key as a
    student's), says so in the log, and exports it for from_pretrained with the tokenizer's files; the
    export is then a teacher (kd.hf_teacher_dir) as it is."""
    cfg, outcome, run = train(TINY + [f"student.hf_dir={models['gpt2']}", "train.epochs=1"], tmp_path / "t")
    assert outcome == "finished" and T.companion("user_models", "student.target").is_hf_model(run["module"].lm.model)
    log = (tmp_path / "t" / "train.log").read_text()
    assert f"model: Hugging Face model {models['gpt2']} (its weights) from student.hf_dir" in log
    assert "kd.enabled false: plain LM training of it, no teacher" in log
    export = tmp_path / "t" / "export"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(export))
    x = val_batch(cfg)
    with torch.no_grad():
        assert torch.equal(T.load_export(str(export))(input_ids=x).logits, kit_logits(cfg, tmp_path / "t", x))
    student, _ = T.resolve_config(None, TINY + KD + ["kd.gamma=0", f"kd.hf_teacher_dir={export}"])
    with torch.no_grad():
        assert torch.equal(T.build_teacher(student, CPU)(x)[0], kit_logits(cfg, tmp_path / "t", x))


def test_export_of_user_module_student_is_a_state_dict_with_best_pt_logits(tmp_path):
    """student.target distilled from a teacher.target, both plain nn.Modules (TinyCausalLM)."""
    settings = TINY + KD + [f"teacher.target={USER}", "teacher.kwargs={dropout: 0.0}",
                            f"student.target={USER}", "student.kwargs={width: 24}"]
    cfg, outcome, run = train(settings, tmp_path)
    assert outcome == "finished" and run["module"].proj.in_features == 24 and run["module"].proj.out_features == 32
    export = tmp_path / "export"
    assert sorted(os.listdir(export)) == ["config.yaml", "model.json", "model.pt"]  # C8: the run's config travels
    module = zoo.tiny_causal_lm(width=24)  # what a user of the export does, from model.json's "load" line
    module.load_state_dict(torch.load(export / "model.pt", weights_only=True))
    x = val_batch(cfg)
    with torch.no_grad():
        logits = module.eval()(x)[0]
    assert torch.equal(logits, kit_logits(cfg, str(tmp_path), x))
    assert json.loads((export / "model.json").read_text())["arch"] == {"target": USER, "kwargs": {"width": 24}}


# ----------------------------------------------------------------------------- dry runs
DRY = {"llama_teacher_gpt2_student": ("kd.hf_teacher_dir", "llama", "student.hf_dir", "gpt2"),
       "gpt2_teacher_llama_student": ("kd.hf_teacher_dir", "gpt2", "student.hf_dir", "llama")}


@needs_hf
@pytest.mark.parametrize("pair", sorted(DRY))
def test_e5_dry_run_passes_with_hf_teacher_and_student(pair, models, capsys):
    t_key, teacher, s_key, student = DRY[pair]
    argv = ["--dry_run"]
    for item in ["data.seq_len=64", "kd.enabled=true", f"{t_key}={models[teacher]}", f"{s_key}={models[student]}"]:
        argv += ["--set", item]
    assert T.main(argv) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "bit-identical" in out and "from_pretrained" in out and "bf16" in out


def test_e5_dry_run_of_a_kd_disabled_config_runs_the_plain_lm_steps_of_student_target(capsys):
    """kd.enabled false: the dry run trains the config's own network (student.target) as a plain LM, as
    the real run does, says so, and runs no KD student steps."""
    argv = ["--dry_run", "--set", f"student.target={USER}", "--set", "student.kwargs={width: 24}",
            "--set", "data.seq_len=32"]
    assert T.main(argv) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "bit-identical" in out and "a state dict" in out
    assert "no teacher and no KD steps" in out and f"{USER}(**{{'width': 24}})" in out
    assert "student:" not in out and "teacher frozen" not in out and "components" not in out


# ----------------------------------------------------------------------------- checks
BAD = [  # (settings added to TINY, @name = the zoo's directory, the key the one line names, a word it must hold)
    (["kd.enabled=true", "kd.hf_teacher_dir=@gpt2", "data.seq_len=65"], "data.seq_len", "position limit 64"),
    (["kd.enabled=true", f"teacher.target={USER}", "student.hf_dir=@llama", "data.seq_len=65"], "data.seq_len",
     "position limit 64"),
    (["kd.enabled=true", "kd.hf_teacher_dir=@gpt2_vocab300"], "data.vocab_size", "300"),
    (["kd.enabled=true", f"teacher.target={USER}", "student.hf_dir=@gpt2_vocab300"], "data.vocab_size", "300"),
    # one tokenizer, embeddings padded to two sizes (Qwen2.5 7B and 0.5B): 'tokenize with its tokenizer' looped
    (["kd.enabled=true", "kd.hf_teacher_dir=@gpt2_vocab300", "student.hf_dir=@gpt2"], "data.vocab_size",
     "the student and the teacher predict 256 and 300 tokens, and distillation compares one vocabulary"),
    (["kd.enabled=true", "kd.hf_teacher_dir=@config_only"], "kd.hf_teacher_dir", "no weights"),
    (["kd.enabled=true", f"teacher.target={USER}", "kd.hf_teacher_dir=@gpt2"], "kd.teacher_checkpoint", "exactly one"),
    (["kd.enabled=true", f"teacher.target={USER}", f"student.target={USER}", "student.hf_dir=@gpt2"],
     "student.target", "at most one"),
    (["kd.enabled=true", "kd.gamma=0.2", f"teacher.target={USER}", "teacher.kwargs={hidden: false}"], "kd.gamma",
     "hidden states"),
    (["kd.enabled=true", "kd.gamma=0.2", f"teacher.target={USER}", f"student.target={USER}",
      "student.kwargs={hidden: false}"], "kd.gamma", "hidden states"),
    (["kd.enabled=true", f"teacher.target={USER}", "teacher.kwargs={vocab: 300}"], "teacher.target", "300"),
    (["kd.enabled=true", "teacher.target=zoo:no_such_model"], "teacher.target", "cannot import"),
    (["kd.enabled=true", "teacher.target=zoo.tiny_causal_lm"], "teacher.target", "package.module:callable"),
    # kd.enabled false trains student.*: a teacher or KD key would be ignored, so it is refused (C3)
    (["kd.hf_teacher_dir=@gpt2"], "kd.hf_teacher_dir", "kd.enabled is false"),
    ([f"teacher.target={USER}", "student.hf_dir=@gpt2"], "teacher.target", "kd.enabled is false"),
    (["teacher.n_layer=3"], "teacher.n_layer", "kd.enabled is false"),
    (["student.kwargs={width: 24}"], "student.kwargs", "student.target is null"),
    (["student.hf_dir=@gpt2x"], "student.hf_dir", "gpt2x does not exist (did you mean"),  # a mistyped path
    # a relative path, run from another directory than the config's (a new user's 'configs/chat_models/teacher')
    (["student.hf_dir=no_such_dir/teacher"], "student.hf_dir", f"read from the current directory, {os.getcwd()}"),
]


def fill(item, models):
    for name in sorted(models, key=len, reverse=True):  # @gpt2_vocab300 before @gpt2
        item = item.replace(f"@{name}", models[name])
    return item


@needs_hf
@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry_run"])
@pytest.mark.parametrize("bad,key,word", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_c3_model_config_errors_exit_2_with_one_line_before_anything_is_written(bad, key, word, dry, models,
                                                                                tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["--dry_run"] if dry else ["--run_dir", str(run_dir)]
    for item in TINY + [fill(b, models) for b in bad]:
        argv += ["--set", item]
    assert T.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: {key}:") and word in lines[0], lines
    assert not run_dir.exists()


@needs_hf
def test_c3_a_run_directory_given_as_a_hugging_face_directory_names_its_export(models, tmp_path):
    # a new user's 'kd.hf_teacher_dir: runs/teacher' (the teacher's run, not its export) said only 'no config.json'
    import shutil
    shutil.copytree(models["gpt2"], tmp_path / "teacher_run" / "export")
    with pytest.raises(T.ConfigError) as err:
        T.resolve_config(None, TINY + ["kd.enabled=true", f"kd.hf_teacher_dir={tmp_path / 'teacher_run'}"])
    assert str(err.value).endswith("(no config.json in it); it is a run directory: give its export, "
                                   f"{tmp_path / 'teacher_run' / 'export'}"), str(err.value)


def test_c3_builtin_teacher_checkpoint_window_length_checked_in_dry_run(tmp_path, capsys):
    """A built-in GPT teacher's position limit is its saved data.seq_len: --dry_run says so in one line."""
    _, outcome, _ = train(TINY + ["student.n_layer=1", "student.n_embd=32", "student.n_head=4"], tmp_path / "t")
    assert outcome == "finished"
    argv = ["--dry_run", "--set", "kd.enabled=true", "--set", "data.seq_len=17", "--set", "teacher.n_layer=1",
            "--set", "teacher.n_embd=32", "--set", f"kd.teacher_checkpoint={tmp_path / 't' / 'checkpoints' / 'best.pt'}"]
    assert T.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: data.seq_len: 17") and "at most 16" in lines[0], lines


@needs_hf
@pytest.mark.parametrize("gamma", [0.0, 0.2])
def test_hf_forward_without_kv_cache_and_hidden_states_only_when_kd_gamma_is_positive(gamma, models, monkeypatch):
    cfg, _ = T.resolve_config(None, TINY + KD + [f"kd.hf_teacher_dir={models['gpt2']}", f"student.hf_dir={models['llama']}",
                                                 f"kd.gamma={gamma}"])
    teacher = T.build_teacher(cfg, CPU)
    module = T.build_trainable(cfg, teacher)
    calls = []
    for who, model in (("teacher", teacher.model), ("student", module.lm.model)):
        def spy(*args, _who=who, _forward=model.forward, **kwargs):
            calls.append((_who, kwargs.get("use_cache"), kwargs.get("output_hidden_states")))
            return _forward(*args, **kwargs)
        monkeypatch.setattr(model, "forward", spy)
    windows = T.TokenWindows(cfg, "train")
    task = T.make_task({"cfg": cfg, "dist": {"device": CPU}, "train_set": windows, "teacher": teacher})
    total, parts = task["loss"](module, windows[np.arange(3)])
    assert sorted(calls) == [("student", False, gamma > 0), ("teacher", False, gamma > 0)]
    assert ("hidden" in parts) == (gamma > 0) and math.isfinite(float(total.detach()))


@needs_hf
def test_hf_student_trains_in_train_mode_and_config_json_alone_is_a_seeded_random_init(models):
    def build(name, seed):
        cfg, _ = T.resolve_config(None, TINY + KD + [f"teacher.target={USER}", f"student.hf_dir={models[name]}", f"seed={seed}"])
        return T.build_trainable(cfg, T.build_teacher(cfg, CPU))

    pretrained = build("gpt2", 0)  # from_pretrained returns eval mode; the student must train with its dropout on
    assert all(m.training for m in pretrained.modules())
    a, b, c = build("config_only", 0), build("config_only", 0), build("config_only", 1)
    assert all(m.training for m in a.modules())
    assert same(a.state_dict(), b.state_dict()) and not same(a.state_dict(), c.state_dict())

"""The chat demo (docs/train_distill.md#the-chat-demo): generated conversations and a ChatML tokenizer made by
prepare_text.py --demo_chat, a Hugging Face Llama-style teacher (configs/distill_chat_teacher.yaml) and a student
distilled from it (configs/distill_chat.yaml), the loss on the assistant's turns (C10); the student's export is a
directory transformers loads and chats with: the data's tokenizer and chat template, stopping at the turn's end.
One short run of the two configs is shared by the tests."""
import hashlib
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import prepare_text as P  # noqa: E402
import train_distill as T  # noqa: E402

TEACHER = os.path.join(ROOT, "configs", "distill_chat_teacher.yaml")
STUDENT = os.path.join(ROOT, "configs", "distill_chat.yaml")
# The demo's two configs, shortened: the full demo's data and models, fewer steps (the format, not all the tasks)
SHORT = ["train.max_steps=240", "train.eval_every=80", "train.save_every_steps=80", "train.log_every=20"]
TEACHER_SHORT = ["train.max_steps=40", "train.eval_every=20", "train.save_every_steps=20"]
# sha256 of the generated chat.jsonl: the same bytes on every machine (random.Random(n).random() alone, C4's rule)
DEMO_JSONL_SHA256 = "3d0c32ed1bd777d440d3991be1c92d7bb613e65797948bbe47be377f88cb10f5"
QUESTIONS = [P.demo_turn(random.Random(10 ** 6 + i).random) for i in range(24)]  # not among the corpus' seeds


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The README's flow from a fresh directory: prepare, the teacher, the student (shortened), in-process."""
    if not T.transformers_installed():
        pytest.skip(f"transformers is not installed for {sys.executable}")
    root = tmp_path_factory.mktemp("chat_demo")
    os.symlink(os.path.join(ROOT, "configs"), root / "configs")  # the configs' paths are relative to the kit's root
    old = os.getcwd()
    os.chdir(root)  # one intra-op thread (conftest.py, R4): the greedy replies come from the same weights every run
    try:
        assert P.main(["--demo_chat", "--out", "data/chat_demo"]) == 0
        for config, run, extra in ((TEACHER, "distill_chat_teacher", TEACHER_SHORT), (STUDENT, "distill_chat", [])):
            cfg, _ = T.resolve_config(config, SHORT + extra)
            assert T.train(cfg, os.path.join("runs", run), "none", quiet=True)[0] == "finished"
    finally:
        os.chdir(old)
    return {"root": root, "data": root / "data" / "chat_demo", "export": root / "runs" / "distill_chat" / "export",
            "manifest": json.loads((root / "data" / "chat_demo" / "manifest.json").read_text())}


def test_c10_the_chat_demo_data_is_generated_the_same_everywhere_and_fits_its_configs(demo):
    import transformers
    data, manifest = demo["data"], demo["manifest"]
    source = (data / "source" / "chat.jsonl").read_bytes()
    rows = [json.loads(line) for line in source.decode().splitlines()]
    assert len(rows) == P.DEMO_CHAT_ROWS and rows[:50] == [P.demo_conversation(n) for n in range(50)]
    assert hashlib.sha256(source).hexdigest() == DEMO_JSONL_SHA256
    tok = transformers.AutoTokenizer.from_pretrained(data / "tokenizer")
    assert len(tok) == len(P.DEMO_VOCAB) == manifest["vocab_size"]
    ids = np.fromfile(data / "train.bin", np.uint16)[:manifest["splits"]["train"]["tokens"]]  # then EXAMPLES_MARK
    assert not (ids == tok.unk_token_id).any()  # every generated word is a token of its own
    # the configs name what the preparation wrote: the data keys, and models of that vocabulary
    written = yaml.safe_load((data / "data.yaml").read_text())["data"]
    longest = max(split["longest"] for split in manifest["splits"].values())
    for config in (TEACHER, STUDENT):
        cfg, _ = T.resolve_config(config, check_files=False)
        assert all(cfg[f"data.{k}"] == written[k] for k in ("dtype", "vocab_size"))
        assert cfg["data.seq_len"] + 1 >= longest and cfg["data.too_long"] == "refuse"
        model = json.loads(open(os.path.join(cfg["student.hf_dir"], "config.json")).read())
        assert model["vocab_size"] == len(tok) and model["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    # C10: the loss is on the assistant's turns: what the mask holds decodes to the answers and their end tokens
    starts, mask = np.load(data / "train.starts.npy"), np.fromfile(data / "train.mask.bin", np.uint8)
    train_rows = [r for i, r in enumerate(rows) if not P.in_val(i, 0.1)]
    for (a, b), row in zip(zip(starts[:3], starts[1:4]), train_rows):
        want = " ".join(f"{m['content']} <|im_end|>" for m in row["messages"] if m["role"] == "assistant")
        assert tok.decode(ids[a:b][mask[a:b] == 1]) == want


def test_c10_the_chat_demo_students_export_loads_with_transformers_and_answers_as_an_assistant(demo):
    import transformers
    export, manifest = demo["export"], demo["manifest"]
    model = transformers.AutoModelForCausalLM.from_pretrained(export, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(export, local_files_only=True)
    # the tokenizer and chat template the data was prepared with, proved by content
    assert T.tokenizer_digest(tok) == manifest["tokenizer"]["sha256"]
    assert hashlib.sha256(tok.chat_template.encode()).hexdigest() == manifest["chat_template"]["sha256"]
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    right = {}
    for question, answer in QUESTIONS:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)
        out = model.generate(**prompt, max_new_tokens=16, do_sample=False)  # its generation_config ends the turn
        new = out[0, prompt["input_ids"].shape[1]:].tolist()
        assert new[-1] == end and start not in new, (question, tok.decode(new))  # one assistant turn, then stop
        task = question.split()[0]
        right[task] = right.get(task, 0) + (tok.decode(new, skip_special_tokens=True).strip() == answer)
    # the short run learns the format, and counting first: every count is right (the full demo learns more)
    assert right["How"] == sum(q.startswith("How") for q, _ in QUESTIONS) > 0, right


def test_c10_the_readmes_chat_line_answers_from_the_demo_export(demo):
    """The README's last chat-demo command, as a user pastes it, from where the runs are."""
    import ast
    import shlex
    readme = open(os.path.join(ROOT, "README.md")).read()
    line = next(l for l in readme.splitlines() if l.startswith("python -c \"from transformers import pipeline"))
    assert line in open(os.path.join(ROOT, "docs", "train_distill.md")).read()  # the docs show the same line
    out = subprocess.run(shlex.split(line), cwd=demo["root"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    reply = ast.literal_eval(out.stdout.strip().splitlines()[-1])  # the pipeline's last message: {'role', 'content'}
    assert reply["role"] == "assistant" and reply["content"] and "<|im" not in reply["content"], reply

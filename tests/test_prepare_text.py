"""prepare_text.py: text files -> the .bin token files train_distill.py reads, with a local Hugging Face
tokenizer (docs/distill_models.md), then a distillation on them; its bad input (C3)."""
import json
import math
import os
import sys

import numpy as np
import pytest
import yaml

import zoo

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import prepare_text as P  # noqa: E402
import train_distill as T  # noqa: E402

needs_hf = pytest.mark.skipif(not T.transformers_installed(),
                              reason=f"transformers is not installed for {sys.executable}")
# a tiny distillation on the prepared files: the built-in student, 8-token windows, a few steps
TINY = ["data.seq_len=8", "data.limit=20", "data.val_windows=8", "train.epochs=2", "train.max_steps=null",
        "train.batch_size=3", "train.grad_accum=2", "train.log_every=1", "train.eval_every=4",
        "train.save_every_steps=2", "train.save_every_minutes=null", "train.eval_batch_size=8", "schedule.warmup=2",
        "optim.lr=0.003", "train.max_loss_share=1", "kd.enabled=true", "kd.alpha=0.5", "kd.beta=0.5",
        "kd.gamma=0.2", "kd.temperature=2", "student.n_layer=1", "student.n_embd=16"]


def write_texts(root, rng):
    words = ["alpha", "beta", "gamma", "delta", "the", "fox", "jumps", "over", "lazy", "dog", "and", "runs"]
    texts = {}
    for name in ("a.txt", "b.txt", "sub/c.txt"):
        text = " ".join(rng.choice(words, size=int(rng.integers(300, 500)))) + "\n"
        os.makedirs(os.path.dirname(root / name), exist_ok=True)
        (root / name).write_text(text)
        texts[name] = text
    (root / "notes.md").write_text("not read: --glob is *.txt")
    return texts


@needs_hf
def test_tokenize_text_files_into_bins_then_distil_from_an_hf_teacher_end_to_end(tmp_path, capsys):
    import transformers
    texts = write_texts(tmp_path / "text", np.random.default_rng(0))
    tok_dir = zoo.tiny_tokenizer(tmp_path / "tok", list(texts.values()), vocab_size=60)
    out = tmp_path / "data"
    assert P.main([str(tmp_path / "text"), "--tokenizer", tok_dir, "--out", str(out)]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
    vocab = len(tokenizer)
    data = yaml.safe_load((out / "data.yaml").read_text())["data"]
    assert data == {"train_bin": str(out / "train.bin"), "val_bin": str(out / "val.bin"), "dtype": "uint16",
                    "vocab_size": vocab}
    assert f"vocab_size: {vocab}" in capsys.readouterr().out
    train_ids, val_ids = [], []
    for name in sorted(texts):  # a.txt, b.txt, sub/c.txt: sorted paths, each followed by <eos>
        ids = tokenizer(texts[name], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        cut = len(ids) - round(len(ids) * 0.1)  # the last tenth of every file is validation
        train_ids += ids[:cut]
        val_ids += ids[cut:]
    assert np.array_equal(np.fromfile(out / "train.bin", np.uint16), train_ids)
    assert np.array_equal(np.fromfile(out / "val.bin", np.uint16), val_ids)
    # end to end: the printed keys, an HF teacher with that tokenizer's vocabulary, the built-in student
    teacher = zoo.hf_gpt2(tmp_path / "teacher", vocab=vocab)
    settings = TINY + [f"data.{k}={v}" for k, v in data.items()] + [f"kd.hf_teacher_dir={teacher}"]
    cfg, _ = T.resolve_config(None, settings)
    outcome, run = T.train(cfg, str(tmp_path / "run"), "none", quiet=True)
    assert outcome == "finished" and run["train_set"].vocab == vocab
    assert all(math.isfinite(e["val/loss"]) for e in T.read_metrics(str(tmp_path / "run"))[1].values())


@needs_hf
def test_tokenize_writes_uint32_when_the_model_vocabulary_passes_65536(tmp_path):
    texts = write_texts(tmp_path / "text", np.random.default_rng(1))
    tok_dir = zoo.tiny_tokenizer(tmp_path / "tok", list(texts.values()), vocab_size=60)
    (tmp_path / "tok" / "config.json").write_text(json.dumps({"vocab_size": 70000}))  # a model dir: padded embeddings
    assert P.main([str(tmp_path / "text" / "a.txt"), "--tokenizer", tok_dir, "--out", str(tmp_path / "d")]) == 0
    data = yaml.safe_load((tmp_path / "d" / "data.yaml").read_text())["data"]
    assert data["dtype"] == "uint32" and data["vocab_size"] == 70000
    ids = np.concatenate([np.fromfile(tmp_path / "d" / f"{s}.bin", np.uint32) for s in ("train", "val")])
    assert 0 < ids.max() < 60 and ids.size == (os.path.getsize(tmp_path / "d" / "train.bin")
                                                + os.path.getsize(tmp_path / "d" / "val.bin")) // 4
    assert P.token_dtype(65536) == "uint16" and P.token_dtype(65537) == "uint32"


@needs_hf
def test_c3_tokenize_with_a_tokenizer_without_an_end_of_text_token_warns_that_nothing_separates_documents(
        tmp_path, capsys):
    import transformers
    texts = write_texts(tmp_path / "text", np.random.default_rng(2))
    tok_dir = zoo.tiny_tokenizer(tmp_path / "tok", list(texts.values()), vocab_size=60)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path / "no_eos")
    assert P.main([str(tmp_path / "text"), "--tokenizer", str(tmp_path / "no_eos"),
                   "--out", str(tmp_path / "d")]) == 0
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING")]
    assert len(warning) == 1 and "no end-of-text token" in warning[0] and "nothing separates the" in warning[0]
    assert P.main([str(tmp_path / "text"), "--tokenizer", tok_dir, "--out", str(tmp_path / "e")]) == 0
    assert "WARNING" not in capsys.readouterr().out  # <eos> between the documents: nothing to say


@needs_hf
def test_c3_tokenize_bad_input_exits_2_with_one_line_and_overwrites_nothing(tmp_path, capsys):
    texts = write_texts(tmp_path / "text", np.random.default_rng(2))
    tok_dir = zoo.tiny_tokenizer(tmp_path / "tok", list(texts.values()), vocab_size=60)
    out = tmp_path / "d"
    out.mkdir()
    (out / "train.bin").write_bytes(b"keep")
    cases = [([str(tmp_path / "text"), "--tokenizer", tok_dir, "--out", str(out)], "--out"),
             ([str(tmp_path / "nothing"), "--tokenizer", tok_dir, "--out", str(tmp_path / "e")], "SOURCES"),
             ([str(tmp_path / "text"), "--tokenizer", str(tmp_path / "no_tok"), "--out", str(tmp_path / "e")],
              "--tokenizer")]
    for argv, key in cases:
        assert P.main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"config error: {key}:"), lines
    assert (out / "train.bin").read_bytes() == b"keep" and not (tmp_path / "e").exists()

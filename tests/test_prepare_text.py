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


def on_policy():
    """on_policy.py as train_distill.py loads it beside itself (the code of generation is that companion's)."""
    return T.companion("on_policy", "kd.on_policy_fraction")


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
              "--tokenizer"),
             ([str(tmp_path / "text"), "--out", str(tmp_path / "e")], "--tokenizer: missing")]  # not "None is not.."
    for argv, key in cases:
        assert P.main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"config error: {key}"), lines
    assert (out / "train.bin").read_bytes() == b"keep" and not (tmp_path / "e").exists()


@needs_hf
def test_c3_prepare_text_names_a_missing_source_and_the_glob_a_directory_of_jsonl_needs(tmp_path, capsys):
    # a new user's typo was 'no text files in chat.jsnl (directories: ...)', and a directory of chat .jsonl read
    # with the default --glob '*.txt' said only 'see --glob'
    chats = tmp_path / "chats"
    chats.mkdir()
    (chats / "a.jsonl").write_text('{"text": "hi"}\n')
    cases = [([str(chats / "a.jsnl")], f"SOURCES: {chats / 'a.jsnl'}: no such file or directory; fix the path"),
             ([str(chats)], f"SOURCES: no files matching *.txt in {chats}; to read its .jsonl files: --glob '*.jsonl'"),
             # an empty text file among the sources said 'the train split holds 1 tokens', naming none
             ([str(tmp_path / "empty.txt")],
              f"SOURCES: {tmp_path / 'empty.txt'}: empty (0 bytes); leave it out or fill it")]
    (tmp_path / "empty.txt").write_text("")
    for sources, line in cases:
        assert P.main(sources + ["--tokenizer", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"config error: {line}"]
    assert not (tmp_path / "out").exists()


@needs_hf
def test_c3_prepare_text_names_an_unreadable_source_in_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    # a chmod 000 chat file was open()'s PermissionError traceback after the tokenizer loaded (as root every file is
    # readable, so the tests' process is told which one is not, as os.access would tell a user)
    for name in ("ok.jsonl", "locked.jsonl"):
        (tmp_path / name).write_text('{"text": "hi"}\n')
    monkeypatch.setattr(P.os, "access", lambda path, mode: not str(path).endswith("locked.jsonl"))
    argv = [str(tmp_path / "ok.jsonl"), str(tmp_path / "locked.jsonl"), "--tokenizer", str(tmp_path)]
    assert P.main(argv + ["--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"config error: SOURCES: {tmp_path / 'locked.jsonl'}: permission denied; make it readable (chmod +r)"]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- examples in TRL's formats (C10)
WORDS = "alpha beta gamma delta the fox jumps over lazy dog and runs sort list please explain".split()


def words(rng, n):
    return " ".join(rng.choice(WORDS, size=n))


def chat_rows(rng, n):
    return [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": words(rng, 5)},
                          {"role": "assistant", "content": words(rng, 6)},
                          {"role": "user", "content": words(rng, int(rng.integers(1, 12)))},
                          {"role": "assistant", "content": words(rng, int(rng.integers(2, 12)))}]} for _ in range(n)]


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


def prepared_examples(out, split):
    """[(ids, mask)] of one prepared split, cut at its bounds."""
    manifest = json.loads((out / "manifest.json").read_text())["splits"][split]
    ids = np.fromfile(out / manifest["file"], np.uint16)
    mask = np.fromfile(out / manifest["mask"], np.uint8)
    starts = np.load(out / manifest["starts"])
    return [(ids[a:b].astype(np.int64), mask[a:b]) for a, b in zip(starts[:-1], starts[1:])]


@needs_hf
def test_c10_each_trl_format_gives_ids_a_loss_mask_on_the_completion_or_assistant_turns_and_a_manifest(tmp_path):
    import transformers
    rng = np.random.default_rng(0)
    tok_dir = zoo.chat_tokenizer(tmp_path / "tok", [words(rng, 50) for _ in range(20)])
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    chats = chat_rows(rng, 20)
    pcs = [{"prompt": words(rng, 4) + " ", "completion": words(rng, 5)} for _ in range(20)]
    conv_pcs = [{"prompt": [{"role": "user", "content": words(rng, 4)}],
                 "completion": [{"role": "assistant", "content": words(rng, 3)}]} for _ in range(20)]
    texts, prompts = [{"text": words(rng, 7)} for _ in range(20)], [{"prompt": words(rng, 4)} for _ in range(20)]
    sources = {name: write_jsonl(tmp_path / "src" / f"{name}.jsonl", rows) for name, rows in
               [("chat", chats), ("pc", pcs), ("conv_pc", conv_pcs), ("text", texts), ("prompt", prompts)]}
    for name, rows in [("chat", chats), ("pc", pcs), ("conv_pc", conv_pcs), ("text", texts), ("prompt", prompts)]:
        out = tmp_path / name
        assert P.main([sources[name], "--tokenizer", tok_dir, "--out", str(out), "--val_fraction", "0.25"]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["tokenizer"]["sha256"] == T.tokenizer_digest(tok) and manifest["truncated"] == 0
        saved = transformers.AutoTokenizer.from_pretrained(out / "tokenizer")  # the copy a run's export carries
        assert T.tokenizer_digest(saved) == manifest["tokenizer"]["sha256"] and saved.chat_template == zoo.CHATML
        assert manifest["tokenizer"]["saved"] == {"dir": "tokenizer", "files": T.file_digests(out / "tokenizer")}
        assert manifest["splits"]["train"]["examples"] == 15 and manifest["splits"]["val"]["examples"] == 5
        val_rows = [r for i, r in enumerate(rows) if P.in_val(i, 0.25)]
        assert [i for i in range(20) if P.in_val(i, 0.25)] == [3, 7, 11, 15, 19]  # spread evenly, not the tail
        for (ids, mask), row in zip(prepared_examples(out, "val"), val_rows):
            trained = tok.decode(ids[mask == 1])
            if name == "chat":  # every assistant turn with its end token, nothing of the system or user turns
                want = " ".join(f"{m['content']} <|im_end|>" for m in row["messages"] if m["role"] == "assistant")
                assert tok.decode(ids) == tok.decode(tok(tok.apply_chat_template(row["messages"], tokenize=False),
                                                         add_special_tokens=False)["input_ids"])
            elif name == "conv_pc":
                want = f"{row['completion'][0]['content']} <|im_end|>"
            elif name == "pc":
                want = f"{row['completion']} <eos>"
            elif name == "text":
                want = f"{row['text']} <eos>"
            else:  # prompt-only: nothing trained, the prompt whole
                want = ""
                assert tok.decode(ids) == row["prompt"]
            assert trained == want, (name, trained, want)
    assert json.loads((tmp_path / "chat" / "manifest.json").read_text())["chat_template"]["sha256"] == \
        __import__("hashlib").sha256(zoo.CHATML.encode()).hexdigest()
    pytest.importorskip("pyarrow")  # Parquet: the same rows give the same bytes
    import pyarrow
    import pyarrow.parquet
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(chats), tmp_path / "chat.parquet")
    assert P.main([str(tmp_path / "chat.parquet"), "--tokenizer", tok_dir, "--out", str(tmp_path / "pq"),
                   "--val_fraction", "0.25"]) == 0
    for name in ("train.bin", "train.mask.bin", "val.starts.npy"):
        assert (tmp_path / "pq" / name).read_bytes() == (tmp_path / "chat" / name).read_bytes()


BAD_TEMPLATE = ("{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['role'] }}: {{ m['content'] }}\n"
                "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


@needs_hf
def test_c10_bad_examples_are_one_line_naming_the_file_line_and_key_exit_2_and_write_nothing(tmp_path, capsys,
                                                                                            monkeypatch):
    rng = np.random.default_rng(1)
    texts = [words(rng, 50) for _ in range(20)]
    tok_dir = zoo.chat_tokenizer(tmp_path / "tok", texts)
    bare = zoo.chat_tokenizer(tmp_path / "bare", texts, template=None)
    (tmp_path / "bad.jinja").write_text(BAD_TEMPLATE)
    good = chat_rows(rng, 3)
    msg = lambda role, content: {"role": role, "content": content}  # noqa: E731
    cases = [  # (rows, extra argv, the line's start, a word the reason holds)
        (good[:1] + ['{"messages": [}'], [], "bad.jsonl:2: JSON", "not valid JSON"),
        (good[:2] + [{"question": "x", "answer": "y"}], [], "bad.jsonl:3: keys", "none of TRL's dataset formats"),
        (good[:1] + [{"prompt": "a ", "completion": "b"}], [], "bad.jsonl:2: format", "mixed formats"),
        ([{"messages": [msg("user", "hi"), msg("bot", "x")]}], [], "bad.jsonl:1: messages[1].role", "'bot'"),
        ([{"messages": [msg("user", "hi"), {"content": "x"}]}], [], "bad.jsonl:1: messages[1]", "has no 'role'; "),
        ([{"messages": [msg("user", "hi"), msg("assistant", " ")]}], [], "bad.jsonl:1: messages[1].content",
         "empty assistant turn"),
        ([{"messages": [msg("user", "hi")]}], [], "bad.jsonl:1: messages", "no assistant turn"),
        ([{"prompt": "hi", "completion": ""}], [], "bad.jsonl:1: completion", "non-empty string"),
        ([{"prompt": "a ", "complection": "b"}], [], "bad.jsonl:1: complection", "did you mean 'completion'"),
        ([{"messages": [{"role": "user", "contnet": "hi"}, msg("assistant", "x")]}], [],
         "bad.jsonl:1: messages[0].contnet", "did you mean 'content'"),
        (good, ["--tokenizer", bare], "--chat_template", "no chat template"),
        (good, ["--chat_template", str(tmp_path / "bad.jinja")], "bad.jsonl:1: chat_template", "not a prefix"),
    ]
    for i, (rows, extra, start, reason) in enumerate(cases):
        src = write_jsonl(tmp_path / f"c{i}" / "bad.jsonl", rows)
        argv = [src, "--tokenizer", tok_dir, "--out", str(tmp_path / f"o{i}")] + extra
        argv = argv[:1] + argv[3:] if "--tokenizer" in extra else argv  # the case's own tokenizer
        assert P.main(argv) == 2, start
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"config error: {os.path.dirname(src)}/{start}"
                                                       if ":" in start else f"config error: {start}:"), lines
        assert reason in lines[0], lines
        assert not (tmp_path / f"o{i}").exists() or not os.listdir(tmp_path / f"o{i}")
    # prompt-only rows beside rows with completions (a --glob took both files): one line, nothing written
    both = [write_jsonl(tmp_path / "m" / "chat.jsonl", good), write_jsonl(tmp_path / "m" / "prompts.jsonl",
                                                                       [{"prompt": "hi"}] * 3)]
    assert P.main(both + ["--tokenizer", tok_dir, "--out", str(tmp_path / "om")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: SOURCES: mixes prompt-only rows ({both[1]})")
    assert not (tmp_path / "om").exists()
    # token ids past the vocabulary: a tokenizer whose model says fewer tokens than its ids reach
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    monkeypatch.setattr(P, "load_tokenizer", lambda d: (tok, 3, "a test's"))
    src = write_jsonl(tmp_path / "v" / "ok.jsonl", good)
    assert P.main([src, "--tokenizer", tok_dir, "--out", str(tmp_path / "ov")]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"config error: {src}:1: --tokenizer: gives token id") and ">= vocabulary size 3" in line
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # Parquet without pyarrow: one line, not a traceback
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    assert P.main([str(tmp_path / "x.parquet"), "--tokenizer", tok_dir, "--out", str(tmp_path / "op")]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("config error: SOURCES:") and "needs the pyarrow package" in line and "\n" not in line


# ----------------------------------------------------------------------------- training on examples (C10)
@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    """A tiny chat dataset prepared with a ChatML tokenizer, and an HF teacher of that vocabulary."""
    if not T.transformers_installed():
        pytest.skip(f"transformers is not installed for {sys.executable}")
    root = tmp_path_factory.mktemp("chat")
    rng = np.random.default_rng(3)
    tok_dir = zoo.chat_tokenizer(root / "tok", [words(rng, 50) for _ in range(20)])
    src = write_jsonl(root / "src" / "chat.jsonl", chat_rows(rng, 40))
    assert P.main([src, "--tokenizer", tok_dir, "--out", str(root / "data")]) == 0
    data = yaml.safe_load((root / "data" / "data.yaml").read_text())["data"]
    teacher = zoo.hf_gpt2(root / "teacher", vocab=data["vocab_size"], positions=128)
    return {"root": root, "tok": tok_dir, "data": data, "teacher": teacher, "src": src,
            "manifest": json.loads((root / "data" / "manifest.json").read_text())}


def chat_settings(chat, *extra, seq_len=None):
    longest = max(split["longest"] for split in chat["manifest"]["splits"].values())
    return (TINY + [f"data.{k}={v}" for k, v in chat["data"].items()]
            + [f"data.seq_len={seq_len or longest - 1}", f"kd.hf_teacher_dir={chat['teacher']}", "data.limit=null"]
            + list(extra))


def test_c10_examples_are_rows_of_their_own_whose_targets_are_the_loss_mask_and_a_run_trains_on_them(chat_data,
                                                                                                     tmp_path):
    cfg, _ = T.resolve_config(None, chat_settings(chat_data))
    train = T.TokenWindows(cfg, "train")
    out, split = chat_data["root"] / "data", chat_data["manifest"]["splits"]["train"]
    assert len(train) == split["examples"] == T.window_count(cfg, "train") and train.pad is None
    examples = prepared_examples(out, "train")
    x, y = train[np.arange(len(train))]
    for row, (ids, mask) in enumerate(examples):  # G2's mechanism: a target outside the mask is IGNORE
        n = len(ids)
        assert x[row, :n].tolist() == ids[:x.shape[1]].tolist() and (x[row, n:] == 0).all()
        assert y[row, :n - 1].tolist() == np.where(mask[1:] == 1, ids[1:], T.IGNORE).tolist()
        assert (y[row, n - 1:] == T.IGNORE).all()
    assert train.count(np.arange(len(train))) == split["loss_tokens"] == int((y != T.IGNORE).sum())
    outcome, run = T.train(cfg, str(tmp_path / "run"), "none", quiet=True)
    assert outcome == "finished" and all(math.isfinite(e["val/loss"])
                                         for e in T.read_metrics(str(tmp_path / "run"))[1].values())
    log = (tmp_path / "run" / "train.log").read_text()
    waste = 1 - split["tokens"] / (split["examples"] * (cfg["data.seq_len"] + 1))
    assert f"{split['examples']} examples in {split['examples']} rows, {waste:.0%} of the rows padding; " \
        f"{split['examples']} train examples, each a window" in log
    settings = [a for s in chat_settings(chat_data) for a in ("--set", s)]
    assert T.main(settings + ["--run_dir", str(tmp_path / "dry"), "--dry_run"]) == 0  # its tiny runs on whole examples
    # C10: the built-in GPT's export carries the tokenizer and chat template the data was prepared with
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "run" / "export", local_files_only=True)
    assert T.tokenizer_digest(tok) == chat_data["manifest"]["tokenizer"]["sha256"] and tok.chat_template == zoo.CHATML
    assert isinstance(T.load_export(str(tmp_path / "run" / "export")), T.GPT)


def dry_run_and_diagnose_lines(settings, tmp_path, capsys):
    """The one line (or None) of the run, the dry run and diagnose_and_fix.py on these settings."""
    import diagnose_and_fix as dx
    lines = []
    for extra in ([], ["--dry_run"]):
        code = T.main([a for s in settings for a in ("--set", s)] + ["--run_dir", str(tmp_path / "r"), *extra])
        cap = capsys.readouterr()
        err = cap.err.strip().splitlines()
        lines.append(err[0] if code == 2 and len(err) == 1 else (code, extra, err))
    (tmp_path / "c.yaml").write_text("task: distill\n")
    dx.main(["--config", str(tmp_path / "c.yaml"), "--json"] + [a for s in settings for a in ("--set", s)])
    found = [f for f in json.loads(capsys.readouterr().out)["findings"] if f["severity"] == "critical"]
    return lines + [f"config error: {f['evidence']}" for f in found], not (tmp_path / "r").exists()


def test_c10_a_seq_len_below_the_longest_example_is_refused_unless_data_too_long_truncates_or_drops(
        chat_data, tmp_path, capsys):
    split = chat_data["manifest"]["splits"]["train"]
    longest = max(s["longest"] for s in chat_data["manifest"]["splits"].values())
    lengths = np.diff(np.load(chat_data["root"] / "data" / "train.starts.npy"))
    seq_len = int(np.median(lengths))  # about half the examples are longer than seq_len + 1 tokens
    long = int((lengths > seq_len + 1).sum())
    lines, nothing = dry_run_and_diagnose_lines(chat_settings(chat_data, seq_len=seq_len), tmp_path, capsys)
    assert len(lines) == 3 and len(set(lines)) == 1 and nothing, lines
    assert lines[0].startswith("config error: data.seq_len:") and f"holds is {longest} tokens" in lines[0]
    assert "data.too_long" in lines[0]
    import diagnose_and_fix as dx  # its fix is the line's own, not data.seq_len's default (128 said a new user's)
    dx.main(["--config", str(tmp_path / "c.yaml"), "--json"]
            + [a for s in chat_settings(chat_data, seq_len=seq_len) for a in ("--set", s)])
    fixes = [f["fix"] for f in json.loads(capsys.readouterr().out)["findings"] if f["id"] == "C10"]
    assert fixes == [f"set data.seq_len to at least {longest - 1}, or data.too_long to truncate or drop the longer "
                     "examples"], fixes
    for how, kept in (("truncate", len(lengths)), ("drop", len(lengths) - long)):
        cfg, _ = T.resolve_config(None, chat_settings(chat_data, f"data.too_long={how}", seq_len=seq_len))
        train = T.TokenWindows(cfg, "train")
        assert len(train) == kept == T.window_count(cfg, "train") and 0 < long < len(lengths)
        assert f"{long} longer than data.seq_len + 1 tokens" in train.source
        x, y = train[np.arange(len(train))]
        assert x.shape == (kept, seq_len)
        if how == "drop":  # the examples left are whole
            assert int((y != T.IGNORE).sum()) == sum(
                int(m[1:].sum()) for ids, m in prepared_examples(chat_data["root"] / "data", "train")
                if len(ids) <= seq_len + 1)


def test_c10_the_dry_run_keeps_data_seq_len_when_only_the_val_split_holds_examples(chat_data, tmp_path, capsys):
    # a new user's own token stream for training and prepared chat rows for val: the run accepted data.seq_len, the
    # dry run refused it ('data.seq_len: 16, but the longest example ... holds is N tokens'): it kept the run's
    # data.seq_len only when the train split held examples
    plain = tmp_path / "train.bin"
    np.random.default_rng(0).integers(0, chat_data["data"]["vocab_size"], 4000).astype(np.uint16).tofile(plain)
    settings = [s for s in chat_settings(chat_data) if not s.startswith("kd.")] + [f"data.train_bin={plain}",
                                                                                "kd.enabled=false"]
    T.resolve_config(None, settings)  # the run's own checks accept it
    code = T.main([a for s in settings for a in ("--set", s)] + ["--run_dir", str(tmp_path / "r"), "--dry_run"])
    said = capsys.readouterr()
    assert code == 0 and "WARNING" not in said.out + said.err, said  # C10: a plain stream is no examples copied alone


def last_example_trained_early(chat, tmp_path):
    """The chat data copied, the last train example's loss mask also training its 3rd token (the others' first
    trained token is their 32nd: the system prompt's length): settings of data.train_bin and data.val_bin."""
    import shutil
    out = shutil.copytree(chat["root"] / "data", tmp_path / "data")
    split = chat["manifest"]["splits"]["train"]
    mask = np.fromfile(out / split["mask"], np.uint8)
    mask[np.load(out / split["starts"])[-2] + 2] = 1
    mask.tofile(out / split["mask"])
    return [f"data.train_bin={out / 'train.bin'}", f"data.val_bin={out / 'val.bin'}"]


def test_g2_c10_truncation_that_keeps_no_trained_token_of_any_example_is_refused_by_the_run_dry_run_and_diagnose(
        chat_data, tmp_path, capsys):
    # a new user's data.too_long truncate at a data.seq_len below the prompts: every example kept its prompt alone,
    # every step was skipped by G2 (a WARNING a step) and the run ended 'done: 5 optimizer steps, 5 skipped', exit 0
    longest = max(s["longest"] for s in chat_data["manifest"]["splits"].values())
    val = tmp_path / "val.bin"  # a plain stream: eval has targets (eval windows without any are refused at start)
    np.random.default_rng(0).integers(0, chat_data["data"]["vocab_size"], 400).astype(np.uint16).tofile(val)
    lines, nothing = dry_run_and_diagnose_lines(chat_settings(chat_data, "data.too_long=truncate",
                                                              f"data.val_bin={val}", seq_len=8), tmp_path, capsys)
    assert len(lines) == 3 and len(set(lines)) == 1 and nothing, lines
    assert lines[0] == (f"config error: data.seq_len: 8 with data.too_long truncate keeps no trained token in any "
                        f"example of {chat_data['root'] / 'data' / 'train.bin'} (each cut at data.seq_len + 1 tokens, "
                        "before its loss mask's), so the run would train nothing; set data.seq_len to at "
                        f"least {longest - 1} (the longest example whole: data.too_long drop would leave no example)"
                        ), lines
    for seq_len in (30, 31):  # each example's first trained target is its 32nd token: kept from data.seq_len 31
        cfg, _ = T.resolve_config(None, chat_settings(chat_data, "data.too_long=truncate", "data.seq_len=80"))
        assert T.truncated_away({**cfg, "data.seq_len": seq_len}, "train") == (seq_len == 30)
    # ANY example: one that keeps a trained token (the last) is enough
    settings = chat_settings(chat_data, "data.too_long=truncate", seq_len=8) + last_example_trained_early(
        chat_data, tmp_path)
    cfg, _ = T.resolve_config(None, settings)  # accepted
    assert not T.truncated_away(cfg, "train") and T.TokenWindows(cfg, "train").count(np.arange(36)) == 1


def test_c10_g2_a_dry_run_whose_tiny_examples_keep_no_trained_token_says_so(chat_data, tmp_path, capsys):
    # a new user's data.too_long truncate at a data.seq_len that cut every assistant turn of the first examples: the
    # run trained on the later ones, its dry run said 'FAIL finite losses (one term: the LM's CE)' of a KD config
    # (step 1, skipped by G2, logged no loss terms), and its fp16 line '8 skipped by the GradScaler'
    val = tmp_path / "val.bin"  # a plain stream: eval has targets (a val split without any is a config error)
    np.random.default_rng(0).integers(0, chat_data["data"]["vocab_size"], 400).astype(np.uint16).tofile(val)
    settings = chat_settings(chat_data, "data.too_long=truncate", "kd.gamma=0", seq_len=6) + [
        last_example_trained_early(chat_data, tmp_path)[0], f"data.val_bin={val}"]
    code = T.main([a for s in settings for a in ("--set", s)] + ["--run_dir", str(tmp_path / "r"), "--dry_run"])
    out = capsys.readouterr().out
    assert code == 1 and "  FAIL a token to train on: all 8 steps skipped (G2), the tiny run's windows" in out, out
    assert "finite losses" not in out and out.count("  FAIL ") == 1
    # a run on those first examples alone trains nothing ('done', exit 0, a WARNING G2 a step; the config check
    # passes: a later example keeps a trained token): diagnose --log says so, critical, and why
    import diagnose_and_fix as dx
    argv = [a for s in settings + ["data.limit=26"] for a in ("--set", s)]
    assert T.main(argv + ["--run_dir", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    dx.main(["--log", str(tmp_path / "r" / "metrics.jsonl"), "--json"])
    g2 = [f for f in json.loads(capsys.readouterr().out)["findings"] if f["id"] == "G2"]
    assert [f["severity"] for f in g2] == ["critical"] and "data.too_long truncate" in g2[0]["fix"], g2


def test_c10_examples_copied_without_their_manifest_mask_or_bounds_are_one_line_from_the_run_dry_run_and_diagnose(
        chat_data, tmp_path, capsys):
    # a new user's trial: train.bin copied alone from a chat preparation trained every token (the prompts', the
    # template's) as one stream, exit 0; without the mask or bounds it was a FileNotFoundError traceback
    import shutil
    prepared = chat_data["root"] / "data"
    (tmp_path / "alone").mkdir()
    shutil.copy(prepared / "train.bin", tmp_path / "alone" / "train.bin")
    lines, nothing = dry_run_and_diagnose_lines(
        chat_settings(chat_data, f"data.train_bin={tmp_path / 'alone' / 'train.bin'}"), tmp_path, capsys)
    assert len(lines) == 3 and len(set(lines)) == 1 and nothing, lines
    assert lines[0].startswith("config error: data.train_bin:") and f"no {tmp_path / 'alone'}/manifest.json" in lines[0]
    assert lines[0].endswith("copy the manifest.json, train.mask.bin and train.starts.npy prepare_text.py wrote "
                             "beside it"), lines[0]
    # and a copy cut short (an interrupted transfer) was a ValueError traceback at the first step, its run dir made
    for gone, how in (("train.mask.bin", "missing"), ("train.starts.npy", "missing"), ("train.mask.bin", "cut short")):
        copy = shutil.copytree(prepared, tmp_path / f"{how}-{gone}")
        os.remove(copy / gone) if how == "missing" else os.truncate(copy / gone, os.path.getsize(copy / gone) // 2)
        lines, nothing = dry_run_and_diagnose_lines(chat_settings(
            chat_data, f"data.train_bin={copy / 'train.bin'}"), tmp_path, capsys)
        assert len(lines) == 3 and len(set(lines)) == 1 and nothing, lines
        assert lines[0].startswith(f"config error: data.train_bin: {copy / gone} is {how}, "), lines[0]
    for dtype in ("uint16", "uint32"):  # known by its content whatever data.dtype says: the mark in either id type
        marked = tmp_path / f"{dtype}.bin"
        np.concatenate([np.arange(300) % 50, T.EXAMPLES_MARK]).astype(dtype).tofile(marked)
        assert [p[1] for p in T.incomplete_examples("data.val_bin", str(marked), None)] == ["data.val_bin"]
        np.arange(300).astype(dtype).tofile(marked)
        assert T.incomplete_examples("data.val_bin", str(marked), None) == []


def test_c10_prepared_data_must_match_the_config_and_the_models_tokenizer(chat_data, tmp_path, capsys):
    import transformers
    rng = np.random.default_rng(9)
    teacher = zoo.hf_gpt2(tmp_path / "teacher", vocab=chat_data["data"]["vocab_size"], positions=128)
    transformers.AutoTokenizer.from_pretrained(chat_data["tok"]).save_pretrained(teacher)
    settings = chat_settings(chat_data) + [f"kd.hf_teacher_dir={teacher}"]
    T.resolve_config(None, settings)  # the teacher's own tokenizer: accepted
    other = zoo.chat_tokenizer(tmp_path / "other", [words(rng, 50)[::-1] + " zebra" for _ in range(20)])
    transformers.AutoTokenizer.from_pretrained(other).save_pretrained(teacher)
    lines, nothing = dry_run_and_diagnose_lines(settings, tmp_path, capsys)
    assert len(set(lines)) == 1 and len(lines) == 3 and nothing, lines
    assert lines[0].startswith("config error: kd.hf_teacher_dir:") and "tokenizer is not the one" in lines[0]
    with pytest.raises(T.ConfigError) as err:  # the id type and a file changed after its preparation
        T.resolve_config(None, chat_settings(chat_data, "data.dtype=uint32"))
    assert [p[1] for p in err.value.problems] == ["data.dtype"]  # C10: train and val share one manifest: one line
    # prepared with a tokenizer directory (vocab_size: the tokenizer's), a teacher whose embeddings are padded past
    # it: data.vocab_size is the models' size; a new user was sent between 'set 200' and 'set 208' (C10)
    vocab = chat_data["data"]["vocab_size"]
    padded = zoo.hf_gpt2(tmp_path / "padded", vocab=vocab + 8, positions=128)
    T.resolve_config(None, chat_settings(chat_data, f"data.vocab_size={vocab + 8}", f"kd.hf_teacher_dir={padded}"))
    with pytest.raises(T.ConfigError) as err:  # below the prepared ids' range
        T.resolve_config(None, chat_settings(chat_data, f"data.vocab_size={vocab - 1}"))
    said = [p[2] for p in err.value.problems if p[1] == "data.vocab_size"]  # the manifest's line was there twice
    assert len(said) == len(set(said)) == 2 and "manifest.json says" in said[0] and "predicts" in said[1], said
    with pytest.raises(T.ConfigError) as err:  # on-policy continues each example's own prompt: the key is ignored
        T.resolve_config(None, chat_settings(chat_data, "kd.on_policy_fraction=0.5", "kd.prompt_tokens=4"))
    assert [p[1] for p in err.value.problems] == ["kd.prompt_tokens"]
    copy = tmp_path / "copy"
    import shutil
    shutil.copytree(chat_data["root"] / "data", copy)
    with open(copy / "val.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(T.ConfigError) as err:
        T.resolve_config(None, chat_settings(chat_data, f"data.val_bin={copy / 'val.bin'}"))
    assert [p[1] for p in err.value.problems] == ["data.val_bin"] and "changed after" in err.value.problems[0][2]


def test_c3_c10_a_model_padded_past_the_data_tokenizer_is_told_to_set_data_vocab_size_not_to_tokenize_again(
        chat_data, tmp_path):
    # a new user's data prepared with a tokenizer directory (its size, 74) for models of 128: 'tokenize the text with
    # its tokenizer and set data.vocab_size to that size'; the data fits, data.vocab_size is the whole fix
    vocab = chat_data["data"]["vocab_size"]
    student = zoo.hf_config_only(tmp_path / "student", "llama", vocab=vocab + 8, positions=128)
    settings = [s for s in chat_settings(chat_data) if not s.startswith("kd.")] + ["kd.enabled=false",
                                                                                f"student.hf_dir={student}"]
    with pytest.raises(T.ConfigError) as err:
        T.resolve_config(None, settings)
    assert str(err.value).endswith(f"predicts {vocab + 8} tokens; set data.vocab_size to {vocab + 8}, the model's "
                                   f"size: the data's ids (prepared for a vocabulary of {vocab}) fit in it"), err.value
    T.resolve_config(None, settings + [f"data.vocab_size={vocab + 8}"])  # the fix works


def test_c3_c10_sources_and_a_template_saved_with_a_utf8_bom_prepare_as_without_it(chat_data, tmp_path):
    # a new user's JSONL saved by a Windows editor: 'bom.jsonl:1: JSON: not valid JSON (Unexpected UTF-8 BOM ...)';
    # a text file's BOM was tokenized as text, and a template's rendered before every conversation
    import shutil
    src = tmp_path / "bom" / "chat.jsonl"
    src.parent.mkdir()
    src.write_bytes(b"\xef\xbb\xbf" + open(chat_data["src"], "rb").read())
    (tmp_path / "t.jinja").write_bytes(b"\xef\xbb\xbf" + zoo.CHATML.encode())
    tok = shutil.copytree(chat_data["tok"], tmp_path / "tok")
    assert P.main([str(src), "--tokenizer", str(tok), "--out", str(tmp_path / "chat"), "--chat_template",
                   str(tmp_path / "t.jinja")]) == 0
    for name in ("train.bin", "train.mask.bin", "val.bin"):
        assert (tmp_path / "chat" / name).read_bytes() == (chat_data["root"] / "data" / name).read_bytes(), name
    for name, head in (("plain.txt", b""), ("bom.txt", b"\xef\xbb\xbf")):
        (tmp_path / "t" / name.split(".")[0]).mkdir(parents=True)
        (tmp_path / "t" / name.split(".")[0] / name).write_bytes(head + b"one two three four five six seven eight")
        assert P.main([str(tmp_path / "t" / name.split(".")[0]), "--tokenizer", str(tok), "--out",
                       str(tmp_path / name)]) == 0
    assert (tmp_path / "plain.txt" / "train.bin").read_bytes() == (tmp_path / "bom.txt" / "train.bin").read_bytes()


def test_c10_val_data_prepared_with_another_tokenizer_than_the_train_data_is_one_line_from_the_run_dry_run_and_diagnose(
        chat_data, tmp_path, capsys):
    # val rows prepared apart (the docs' way to a val set with completions) with another tokenizer: its ids are other
    # tokens, and the run reported a val/loss of noise, exit 0
    rng = np.random.default_rng(9)
    other = zoo.chat_tokenizer(tmp_path / "other", [words(rng, 50)[::-1] + " zebra" for _ in range(20)])
    assert P.main([chat_data["src"], "--tokenizer", other, "--out", str(tmp_path / "val")]) == 0
    capsys.readouterr()
    vocab = max(chat_data["data"]["vocab_size"], yaml.safe_load((tmp_path / "val" / "data.yaml").read_text())[
        "data"]["vocab_size"])
    settings = [s for s in chat_settings(chat_data) if not s.startswith("kd.")] + [
        f"data.val_bin={tmp_path / 'val' / 'val.bin'}", f"data.vocab_size={vocab}", "data.too_long=truncate",
        "kd.enabled=false"]
    lines, nothing = dry_run_and_diagnose_lines(settings, tmp_path, capsys)
    assert len(lines) == 3 and len(set(lines)) == 1 and nothing, lines
    assert lines[0].startswith(f"config error: data.val_bin: {tmp_path / 'val' / 'val.bin'} was prepared with another "
                               "tokenizer than data.train_bin"), lines[0]


def test_c10_a_saved_tokenizer_changed_after_preparation_is_refused_in_one_line_and_never_exported(chat_data, tmp_path,
                                                                                                   capsys):
    import shutil
    copy = tmp_path / "data"
    shutil.copytree(chat_data["root"] / "data", copy)
    settings = chat_settings(chat_data, f"data.train_bin={copy / 'train.bin'}", f"data.val_bin={copy / 'val.bin'}")
    cfg, _ = T.resolve_config(None, settings)  # as prepared: accepted
    template = copy / "tokenizer" / "chat_template.jinja"
    # the same id -> token map, another chat template: what a check of the name or of the ids alone would let through
    template.write_text(template.read_text().replace("<|im_start|>assistant", "<|im_start|>bot"))
    lines, nothing = dry_run_and_diagnose_lines(settings, tmp_path, capsys)
    assert len(lines) == 3 and len(set(lines)) == 1 and nothing, lines
    assert lines[0].startswith(f"config error: data.train_bin: {copy / 'tokenizer'} is not the tokenizer ")
    assert "prepare again" in lines[0]
    # changed during a run (after the start's check): the export carries no tokenizer, and says so
    out = tmp_path / "export"
    out.mkdir()
    run = {"cfg": cfg, "dist": {"main": True}, "quiet": True, "log_file": open(tmp_path / "log", "w"), "bar": None}
    T.export_tokenizer(run, {"n_layer": 1}, str(out))
    run["log_file"].close()
    assert os.listdir(out) == [] and "WARNING C10" in (tmp_path / "log").read_text()


def test_c10_e14_on_policy_examples_continue_their_own_prompt_up_to_the_assistants_last_reply_and_resume_bit_exactly(
        chat_data, tmp_path):
    import torch
    import transformers
    from run_records import distill_killed_and_resumed
    tok = transformers.AutoTokenizer.from_pretrained(chat_data["tok"])
    settings = chat_settings(chat_data, "kd.on_policy_fraction=0.5", "kd.max_new_tokens=6")
    cfg, _ = T.resolve_config(None, settings)
    said = T.objective_text(cfg, "full vocabulary")  # the run's teacher line (it said 'continue a the example's ...')
    assert ("on-policy: 0.5 of the micro-batches continue the example's own prompt (up to the assistant's last reply) "
            "with 6 tokens the student samples at T 1") in said, said
    longest = f"tokens (up to {cfg['data.seq_len'] + 1} in all) the student"
    assert longest in T.objective_text(T.resolve_config(None, settings + ["kd.max_new_tokens=null"])[0], "")
    said = T.objective_text(T.resolve_config(None, chat_settings(chat_data, "kd.seq_kd=true"))[0], "")
    assert "seq_kd: the labels of all the micro-batches are tokens (up to" in said, said
    train = T.TokenWindows(cfg, "train")
    x, y = train[np.arange(len(train))]
    prompt, new, live = on_policy().example_prompts(y, cfg)
    rows = [json.loads(line) for line in open(chat_data["src"])]
    rows = [r for i, r in enumerate(rows) if not P.in_val(i, 0.1)]
    assert live.all() and len(rows) == len(train) and (new == 6).all()
    for row, messages in enumerate(r["messages"] for r in rows):  # the history, then the generation prompt
        text = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        assert x[row, :prompt[row]].tolist() == tok(text, add_special_tokens=False)["input_ids"]
    module = T.build_trainable(cfg, None)
    inputs, targets = on_policy().example_on_policy_batch(module, x, y, cfg, torch.Generator().manual_seed(0), None)
    mask = targets != T.IGNORE
    positions = torch.arange(x.shape[1])
    for row in range(len(x)):  # E14: the KD term only on the generated tokens, after each row's own prompt
        p = int(prompt[row])
        assert torch.equal(inputs[row, :p], x[row, :p])
        assert torch.equal(mask[row], (positions >= p - 1) & (positions < p + 5))
    # a run half on-policy, SIGKILLed and resumed, ends bit-identical to an uninterrupted one (R4)
    clean, resumed, _ = distill_killed_and_resumed(settings, tmp_path)
    assert any(r.get("on_policy/micro_batches") for r in clean.values())
    assert all(clean[s]["loss"] == resumed[s]["loss"] for s in clean if s in resumed)


def test_c10_e14_kd_max_new_tokens_on_examples_is_checked_against_their_own_prompts_not_kd_prompt_tokens(
        chat_data, tmp_path, capsys):
    # a new user's on-policy run on chat rows: 'kd.max_new_tokens: 24: prompt 8 + 24 new tokens exceed data.seq_len
    # 16', a prompt of seq_len // 2 that examples never use (each continues its own); the same run at 12 trained
    seq_len = max(s["longest"] for s in chat_data["manifest"]["splits"].values()) - 1
    fits = seq_len - seq_len // 2 + 1  # refused by the window check, which examples do not take
    cfg, _ = T.resolve_config(None, chat_settings(chat_data, "kd.on_policy_fraction=0.5", f"kd.max_new_tokens={fits}"))
    assert on_policy().own_prompts(cfg)
    lines, nothing = dry_run_and_diagnose_lines(
        chat_settings(chat_data, "kd.seq_kd=true", f"kd.max_new_tokens={seq_len + 1}"), tmp_path, capsys)
    assert len(lines) == 3 and len(set(lines)) == 1 and nothing, lines
    assert lines[0].startswith(f"config error: kd.max_new_tokens: {seq_len + 1}: an example's prompt") \
        and f"at most {seq_len}" in lines[0], lines[0]


def test_c10_e14_a_note_says_when_generation_does_not_stop_where_the_datas_completions_end(chat_data, tmp_path):
    # a new user's on-policy run: his student's eos_token_id was <eos>, his chats' turns end with <|im_end|>; the run
    # said nothing, and every sample ran on past its turn's end (docs: 'a seq_kd student learned ... <eos> ...')
    vocab = chat_data["data"]["vocab_size"]
    student = zoo.hf_config_only(tmp_path / "student", "llama", vocab=vocab, positions=128, eos_token_id=1)
    _, notes = T.resolve_config(None, chat_settings(chat_data, "kd.on_policy_fraction=0.5",
                                                    f"student.hf_dir={student}"))
    said = [m for rid, key, m in notes if rid == "E14" and key == "kd.eos_token"]
    assert said == [f"generation stops at eos_token_id [1] of {student}, but the data's completions end with 3 "
                    "('<|im_end|>'): a sample runs on past such an end; set kd.eos_token to the one end id, or list "
                    "every one in the student's generation_config.json eos_token_id (and leave kd.eos_token null)"], \
        notes
    for fix in ("kd.eos_token=3", "kd.on_policy_fraction=0"):  # the end it names, or no generation: nothing to say
        _, notes = T.resolve_config(None, chat_settings(chat_data, "kd.on_policy_fraction=0.5",
                                                        f"student.hf_dir={student}", fix))
        assert not [n for n in notes if n[0] == "E14"], notes


def test_c10_g2_examples_are_token_weighted_over_the_global_batch_and_ce_is_taken_on_the_mask_alone(chat_data,
                                                                                                   tmp_path):
    """3 + 2 micro-batches of 2 examples against 2 batches of 6 and 4 (test_distill.py's G2 test on chat data):
    the same update; and step 1's CE term is alpha x the CE summed over the assistant tokens (the mask read from
    the prepared files) / their count."""
    import torch
    import torch.nn.functional as F
    common = chat_settings(chat_data, "data.limit=10", "train.epochs=1", "optim.name=sgd", "optim.momentum=0",
                           "optim.weight_decay=0", "optim.lr=0.5", "schedule.type=constant", "schedule.warmup=0",
                           "train.clip_grad_norm=null", "train.eval_every=null", "train.max_steps=null")
    runs = {}
    for name, extra in (("small", ["train.batch_size=2", "train.grad_accum=3"]),
                        ("big", ["train.batch_size=6", "train.grad_accum=1"])):
        cfg, _ = T.resolve_config(None, common + extra)
        outcome, runs[name] = T.train(cfg, str(tmp_path / name), "none", quiet=True)
        assert outcome == "finished"
    for (name, p), q in zip(runs["small"]["module"].state_dict().items(), runs["big"]["module"].state_dict().values()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name
    cfg = runs["small"]["cfg"]
    steps = T.epoch_order(10, 2, 3, 1, cfg["seed"], 0)
    examples = prepared_examples(chat_data["root"] / "data", "train")
    chosen = [examples[i] for i in np.concatenate(steps[0])]
    x = torch.zeros(len(chosen), cfg["data.seq_len"], dtype=torch.long)
    y = torch.full_like(x, T.IGNORE)
    for row, (ids, mask) in enumerate(chosen):
        x[row, :len(ids) - 1] = torch.from_numpy(ids[:-1])
        y[row, :len(ids) - 1] = torch.from_numpy(np.where(mask[1:] == 1, ids[1:], T.IGNORE))
    with torch.no_grad():
        logits, _ = T.build_trainable(cfg, runs["small"]["teacher"])(x)
    ce = F.cross_entropy(logits.double().flatten(0, 1), y.flatten(), ignore_index=T.IGNORE, reduction="sum")
    trained = sum(int(mask[1:].sum()) for _, mask in chosen)
    assert trained < sum(len(ids) - 1 for ids, _ in chosen) / 2  # most targets are system, user and template
    first = T.read_metrics(str(tmp_path / "small"))[0][1]
    assert math.isclose(first["loss/ce"], 0.5 * float(ce) / trained, rel_tol=1e-5)


def test_c10_r9_the_teacher_cache_is_keyed_on_the_example_bounds_not_only_the_token_file(chat_data):
    """An offline cache stores one row per example: the same token file cut into other examples (another
    preparation, or a starts file edited alone) gives other rows, so the cache's identity must differ."""
    cfg, _ = T.resolve_config(None, chat_settings(chat_data, "kd.top_k=8"))
    train, val = T.TokenWindows(cfg, "train"), T.TokenWindows(cfg, "val")
    want, _ = T.companion("teacher_cache", "kd.teacher_cache").cache_identity(cfg, train, val, np.arange(len(val)))
    train.examples = {**train.examples, "ends": train.examples["ends"] - 1}  # the same bytes, other example bounds
    other, _ = T.companion("teacher_cache", "kd.teacher_cache").cache_identity(cfg, train, val, np.arange(len(val)))
    assert other["data"]["train"]["sha256"] == want["data"]["train"]["sha256"]
    assert other["data"]["train"] != want["data"]["train"] and other["data"]["val"] == want["data"]["val"]


@pytest.fixture(scope="module")
def prompt_data(chat_data):
    """The chat rows' conversations up to the assistant's last reply, as prompt-only {"prompt"} rows, prepared
    with the same tokenizer (train and val prompt-only)."""
    rows = [json.loads(line) for line in open(chat_data["src"])]
    src = write_jsonl(chat_data["root"] / "src_prompts" / "prompts.jsonl",
                      [{"prompt": r["messages"][:-1]} for r in rows])
    out = chat_data["root"] / "prompts"
    assert P.main([src, "--tokenizer", chat_data["tok"], "--out", str(out)]) == 0
    return out


def test_c10_e14_prompt_only_data_trains_only_when_every_micro_batch_generates_and_val_needs_completions(
        chat_data, prompt_data, tmp_path, capsys):
    """Prompt-only rows: refused for training unless every micro-batch generates its completion (one line naming
    kd.on_policy_fraction and kd.seq_kd), refused as val data (eval scores the val data's completions), and
    kd.seq_kd with an offline teacher cache (no teacher to write) refused; the run, --dry_run and diagnose with the
    same line, nothing written. Accepted, each row's prompt is the whole example (example_prompts)."""
    prompts = chat_settings(chat_data, f"data.train_bin={prompt_data / 'train.bin'}", "kd.max_new_tokens=6")
    cases = [(prompts + ["kd.on_policy_fraction=0.5"], "data.train_bin", ("kd.on_policy_fraction=1", "kd.seq_kd=true")),
             (prompts + ["kd.seq_kd=true", f"data.val_bin={prompt_data / 'val.bin'}"], "data.val_bin",
              ("with completions",)),
             (chat_settings(chat_data, "kd.seq_kd=true", "kd.top_k=8", "kd.gamma=0",
                            f"kd.teacher_cache={tmp_path / 'cache'}"), "kd.seq_kd", ("kd.teacher_cache=null",))]
    for settings, key, words in cases:
        lines, nothing = dry_run_and_diagnose_lines(settings, tmp_path, capsys)
        assert len(lines) == 3 and len(set(lines)) == 1 and nothing, lines
        assert lines[0].startswith(f"config error: {key}:") and all(w in lines[0] for w in words), lines[0]
        assert not (tmp_path / "cache").exists()
    for writes in ("kd.seq_kd=true", "kd.on_policy_fraction=1"):
        cfg, _ = T.resolve_config(None, prompts + [writes])
    train = T.TokenWindows(cfg, "train")
    x, y = train[np.arange(len(train))]
    prompt, new, live = on_policy().example_prompts(y, cfg)
    lengths = np.diff(np.load(prompt_data / "train.starts.npy"))
    assert live.all() and (prompt == lengths).all() and (new == 6).all()
    assert ((y == T.IGNORE) | (y == T.GENERATE)).all() and int((y == T.GENERATE).sum()) == len(train)


def test_c10_e14_r4_seq_kd_on_prompt_only_chat_data_with_on_policy_resumes_bit_exactly(chat_data, prompt_data,
                                                                                         tmp_path):
    """kd.seq_kd with kd.on_policy_fraction 0.5 on prompt-only chat data (val with completions): every micro-batch
    is written by the student or by the teacher, none by the data (GKD's order), CE (kd.alpha) on the teacher's
    tokens; SIGKILLed and resumed, it ends bit-identical to an uninterrupted run (R4: which writer and every
    sample are drawn from the data position, no generator state to save)."""
    from run_records import distill_killed_and_resumed
    settings = chat_settings(chat_data, f"data.train_bin={prompt_data / 'train.bin'}", "kd.max_new_tokens=6",
                             "kd.seq_kd=true", "kd.on_policy_fraction=0.5", "data.limit=16")  # 6 steps
    clean, resumed, _ = distill_killed_and_resumed(settings, tmp_path)
    assert all(clean[s]["loss"] == resumed[s]["loss"] for s in clean if s in resumed)
    cfg, _ = T.resolve_config(None, settings)
    plan = T.plan_schedule(cfg, T.window_count(cfg, "train"))
    student, teacher = (sum(r[f"{k}/micro_batches"] for r in clean.values()) for k in ("on_policy", "seq_kd"))
    assert student > 0 and teacher > 0 and student + teacher == plan["micro_batches_per_epoch"] * plan["epochs"]
    assert any("loss/ce" in r for r in clean.values())  # seq_kd micro-batches: CE on the teacher's tokens


def test_e6_diagnose_counts_generation_from_the_longest_example_prompt_and_the_teachers_with_seq_kd(chat_data,
                                                                                                     tmp_path, capsys):
    """E6 on chat data: the generation peak is sized by the data's own prompts (the longest example prompt, up to
    the assistant's last reply) and kd.max_new_tokens, not kd.prompt_tokens' windows; with kd.seq_kd the
    teacher's generation (its KV cache, its width) is a peak of its own too."""
    import diagnose_and_fix as dx
    longest = max(len(m) - 1 - int(np.argmax(np.diff(np.r_[0, m])[::-1] == 1))
                  for _, m in prepared_examples(chat_data["root"] / "data", "train"))
    (tmp_path / "c.yaml").write_text("task: distill\n")
    settings = chat_settings(chat_data, "kd.seq_kd=true", "kd.on_policy_fraction=0.5", "kd.max_new_tokens=6")
    dx.main(["--config", str(tmp_path / "c.yaml"), "--json"] + [a for s in settings for a in ("--set", s)])
    e6 = next(f["evidence"] for f in json.loads(capsys.readouterr().out)["findings"] if f["id"] == "E6")
    assert f"on-policy generation ({longest} + 6 tokens, KV cache)" in e6, e6
    assert f"seq_kd teacher generation ({longest} + 6 tokens, KV cache)" in e6, e6

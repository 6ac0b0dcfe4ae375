"""Text files or chat/instruction JSONL -> the .bin token files train_distill.py reads, with a local HF tokenizer.

    python prepare_text.py my_texts/ more.txt --tokenizer /models/teacher --out data/mine
    python prepare_text.py chat.jsonl --tokenizer /models/teacher --out data/chat   # [--chat_template FILE]
    python prepare_text.py --demo_chat --out data/chat_demo   # the chat demo's generated conversations + tokenizer
    ./launch.sh configs/mine.yaml          # its data: keys are the ones OUT/data.yaml holds

It runs once, before any training (as nanoGPT's data/*/prepare.py files do), and writes OUT/train.bin and
OUT/val.bin (token ids), OUT/manifest.json (what they are: tokenizer, template, format, counts; every run checks
it, C10), OUT/tokenizer (the tokenizer and chat template used, which a run's export carries) and OUT/data.yaml,
the data: keys a config needs (docs/distill_models.md). train_distill.py never imports this file: copied alone,
it trains on token files made here or by your own tokenizer script.
Text files: every file is one document, followed by the tokenizer's end-of-text token (a tokenizer without one
is warned about: then nothing separates the documents). JSONL (or Parquet, with pyarrow) in TRL's dataset
formats: {"text"}, {"messages": [{"role", "content"}, ...]}, {"prompt", "completion"} (strings or message lists)
and prompt-only {"prompt"}; each row is an example of its own, with a loss mask (OUT/*.mask.bin: the completion,
or every assistant turn) and its bounds (OUT/*.starts.npy). Nothing is written on bad input.
"""
import difflib
import fnmatch
import hashlib
import json
import os
import random
import shutil
import sys

import numpy as np

try:
    from train_distill import (EXAMPLES_MARK, ConfigError, atomic_write_text, file_digests, hf_config_value,
                               one_line_parser, tokenizer_digest, transformers_installed, transformers_module,
                               write_stdout)
except ModuleNotFoundError as missing:  # C3: the tool runs the script's own checks; copied alone: one line
    if missing.name != "train_distill":
        raise
    print("prepare_text.py: needs train_distill.py beside it (copy it from the kit): the token files are written "
          "and checked with the training script's own functions", file=sys.stderr)
    raise SystemExit(2)


def token_dtype(vocab):
    """The smallest id type data.dtype offers for ids 0..vocab-1: uint16 up to 65536 ids, else uint32."""
    return "uint16" if vocab <= 2 ** 16 else "uint32"


def text_files(sources, pattern):
    """Files named on the command line, and every file under a named directory whose name matches
    `pattern` (hidden files and directories left out), in sorted order: the same .bin on every OS."""
    found = []
    for source in sources:
        if os.path.isfile(source):
            found.append(source)
        for dirpath, dirnames, filenames in os.walk(source) if os.path.isdir(source) else ():
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if fnmatch.fnmatch(f, pattern) and not f.startswith(".")]
    return found


def out_problems(out_dir, outputs=("train.bin", "val.bin", "tokenizer")):
    """C3: what keeps --out from taking the outputs: missing, a file (or under one), a directory the user may not
    write, or one that holds outputs already (nothing is overwritten)."""
    if not out_dir:
        return [("C3", "--out", "missing: give the directory for train.bin, val.bin and data.yaml")]
    there = os.path.abspath(out_dir)
    while not os.path.exists(there):  # the deepest part that exists: os.makedirs makes the rest
        there = os.path.dirname(there)
    if not os.path.isdir(there):
        return [("C3", "--out", f"{there} is a file, not a directory; choose another --out")]
    if not os.access(there, os.W_OK | os.X_OK):
        return [("C3", "--out", f"{there} may not be written (permission denied); fix its permissions or choose "
                 "another --out")]
    held = [name for name in outputs if os.path.exists(os.path.join(out_dir, name))]
    return [("C3", "--out", f"{out_dir} already holds {' and '.join(held)}; choose another --out (nothing was "
             "overwritten)")] if held else []


def input_problems(sources, tokenizer_dir, out_dir, val_fraction, pattern, chat_template=None):
    """C3: every problem with the command line at once, one line each, before anything is read or written (as
    prepare_tuab.py does); and the files."""
    problems = []
    if not 0 < val_fraction < 1:
        problems.append(("C3", "--val_fraction", f"{val_fraction!r} must be between 0 and 1"))
    if not tokenizer_dir or not os.path.isdir(tokenizer_dir):
        what = f"{tokenizer_dir} is not a directory" if tokenizer_dir else "missing"
        problems.append(("C3", "--tokenizer", f"{what}; give a local Hugging Face tokenizer (or model) directory"))
    elif not transformers_installed():
        problems.append(("C3", "--tokenizer", f"needs the transformers package, which is not installed for "
                                              f"{sys.executable}; {sys.executable} -m pip install transformers"))
    problems += out_problems(out_dir)
    if chat_template is not None and not os.path.isfile(chat_template):
        problems.append(("C10", "--chat_template", f"{chat_template} is not a file; give a Jinja chat template"))
    files = text_files(sources, pattern)
    absent = [source for source in sources if not os.path.exists(source)]  # C3: a typo says so, not "no files"
    if not sources:
        problems.append(("C3", "SOURCES", "missing: give text or JSONL files or directories (or --demo_chat)"))
    elif absent:
        problems.append(("C3", "SOURCES", f"{', '.join(absent)}: no such file or directory; fix the path"))
    elif any(not os.access(f, os.R_OK) for f in files):  # C3: one line, not open()'s PermissionError mid-way
        locked = [f for f in files if not os.access(f, os.R_OK)]
        problems.append(("C3", "SOURCES", f"{', '.join(locked)}: permission denied; make it readable (chmod +r)"))
    elif any(os.path.getsize(f) == 0 for f in files):  # C3: an empty text file was 'the train split holds 1 tokens'
        empty = [f for f in files if os.path.getsize(f) == 0]
        problems.append(("C3", "SOURCES", f"{', '.join(empty)}: empty (0 bytes); leave it out or fill it"))
    elif not files:  # C3: a directory of chat .jsonl read with the default --glob '*.txt': name the flag that reads it
        data = sorted({os.path.splitext(f)[1] for f in text_files(sources, "*") if f.endswith((".jsonl", ".parquet"))})
        hint = f"; to read its {' and '.join(data)} files: --glob '*{data[0]}'" if data else ", see --glob"
        problems.append(("C3", "SOURCES", f"no files matching {pattern} in {' '.join(sources)}{hint}"))
    if problems:
        raise ConfigError(problems)
    return files


def load_tokenizer(tokenizer_dir):
    """The tokenizer and the vocabulary size the token files are for: the model's vocab_size when tokenizer_dir
    is a model directory (config.json; embeddings are often padded past the tokenizer's own size), else the
    tokenizer's size. Returns (tokenizer, vocab, where that size comes from)."""
    try:
        tokenizer = transformers_module().AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except Exception as err:  # whatever transformers raises for a directory without a usable tokenizer
        raise ConfigError([("C3", "--tokenizer", f"{tokenizer_dir} holds no tokenizer transformers can load "
                            f"({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]})")]) from None
    vocab, origin = len(tokenizer), "the tokenizer's size"
    config_file = os.path.join(tokenizer_dir, "config.json")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            _, model_vocab = hf_config_value(json.load(f), ("vocab_size",))
        if model_vocab is not None and model_vocab < vocab:
            raise ConfigError([("C3", "--tokenizer", f"the tokenizer has {vocab} tokens but the model's vocab_size in "
                                f"{config_file} is {model_vocab}; they must belong together")])
        if model_vocab is not None:
            vocab, origin = model_vocab, f"the model's vocab_size ({config_file})"
    return tokenizer, vocab, origin


def write_bins(files, tokenizer, vocab, paths, val_fraction):
    """Each file's ids (then <eos>) to train.bin, the last val_fraction of them to val.bin, under temporary
    names renamed only when both are whole: bad input leaves nothing. Returns the token count of each split."""
    dtype, eos = token_dtype(vocab), tokenizer.eos_token_id
    tmp = {split: f"{path}.tmp-{os.getpid()}" for split, path in paths.items()}
    counts = {"train": 0, "val": 0}
    try:
        with open(tmp["train"], "wb") as train_file, open(tmp["val"], "wb") as val_file:
            for path in files:
                try:
                    with open(path, encoding="utf-8-sig") as f:  # C3: a BOM (Windows editors) is no text
                        text = f.read()
                except UnicodeDecodeError:
                    raise ConfigError([("C3", "SOURCES", f"{path} is not UTF-8 text; convert it or leave it out")]) \
                        from None
                ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
                ids = np.asarray(ids + ([eos] if eos is not None else []), dtype=np.int64)
                if ids.size and int(ids.max()) >= vocab:
                    raise ConfigError([("C3", "--tokenizer", f"{path} gives token id {int(ids.max())} >= vocabulary "
                                        f"size {vocab}")])
                cut = len(ids) - int(round(len(ids) * val_fraction))
                ids[:cut].astype(dtype).tofile(train_file)
                ids[cut:].astype(dtype).tofile(val_file)
                counts["train"], counts["val"] = counts["train"] + cut, counts["val"] + len(ids) - cut
        for split, n in counts.items():
            if n < 2:
                raise ConfigError([("C3", "SOURCES", f"the {split} split holds {n} tokens; give more text or change "
                                    "--val_fraction")])
        for split in paths:
            os.replace(tmp[split], paths[split])
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    return counts


# -----------------------------------------------------------------------------
# Examples: JSONL (or Parquet) rows in TRL's dataset formats, each an example with its own loss mask (C10)
ROLES = ("system", "user", "assistant", "tool")
EXAMPLE_SUFFIXES = (".jsonl", ".parquet")


def row_error(path, number, key, msg):
    """C10: one line naming the file, the line (a Parquet file: the row) and the key."""
    return ConfigError([("C10", f"{path}:{number}: {key}", msg)])


def read_rows(path):
    """(line number, row) of a JSONL file (blank lines skipped), or (row number, row) of a Parquet file."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise ConfigError([("C10", "SOURCES", f"{path} is Parquet, which needs the pyarrow package, not "
                                f"installed for {sys.executable}; {sys.executable} -m pip install pyarrow, or give "
                                "JSONL")]) from None
        yield from enumerate(parquet.read_table(path).to_pylist(), 1)
        return
    try:
        with open(path, encoding="utf-8-sig") as f:  # C10: a BOM before row 1 was 'not valid JSON'
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError as err:
                        raise row_error(path, number, "JSON", f"not valid JSON ({err}); JSONL is one JSON object "
                                        "per line") from None
                    yield number, row
    except UnicodeDecodeError:
        raise ConfigError([("C10", "SOURCES", f"{path} is not UTF-8 text; convert it or leave it out")]) from None


def row_format(path, number, row):
    """(kind, conversational) of a row in TRL's formats: kind text, messages, prompt_completion or prompt."""
    if not isinstance(row, dict):
        raise row_error(path, number, "row", f"is a JSON {type(row).__name__}, not an object")
    misspelt_key((path, number), "", row, ("text", "messages", "prompt", "completion"))
    if "messages" in row:
        return "messages", True
    if "prompt" in row:
        return ("prompt_completion" if "completion" in row else "prompt"), isinstance(row["prompt"], list)
    if "text" in row:
        return "text", False
    raise row_error(path, number, "keys", f"{sorted(row)} hold none of TRL's dataset formats: give \"text\", "
                    "\"messages\", \"prompt\" and \"completion\", or \"prompt\" alone")


def misspelt_key(where, prefix, row, known):
    """C10: a key one typo from a known key the row lacks ("complection") is refused: ignored as an extra column,
    it would turn prompt/completion rows into prompt-only ones. Other extra columns (an id, a source) stay ignored."""
    for key in row:
        close = [] if key in known else difflib.get_close_matches(key, [k for k in known if k not in row], 1, 0.85)
        if close:
            raise row_error(*where, prefix + key, f"unknown key; did you mean {close[0]!r}?")


def format_name(fmt):
    return f"{fmt[0]} ({'conversational' if fmt[1] else 'standard'})"


def check_messages(where, key, messages, need_assistant):
    """C10: a list of {"role", "content"} messages with known roles and no empty assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise row_error(*where, key, "must be a non-empty list of {\"role\", \"content\"} messages")
    for i, message in enumerate(messages):
        if isinstance(message, dict):
            misspelt_key(where, f"{key}[{i}].", message, ("role", "content"))
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):  # C10: say which key it lacks
            lacks = [repr(k) for k in ("role", "content") if isinstance(message, dict) and k not in message]
            said = f"has no {' and '.join(lacks)}; " if lacks else ""
            raise row_error(*where, f"{key}[{i}]", said + "each message must be a {\"role\", \"content\"} object")
        if message["role"] not in ROLES:
            raise row_error(*where, f"{key}[{i}].role", f"{message['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise row_error(*where, f"{key}[{i}].content", "must be a string")
        if message["role"] == "assistant" and not message["content"].strip():
            raise row_error(*where, f"{key}[{i}].content", "an empty assistant turn: there is nothing to train on; "
                            "fill it or leave the row out")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise row_error(*where, key, "holds no assistant turn: there is nothing to train on")


def check_row(where, fmt, row):
    """C10: the row's values have the types its format needs."""
    kind, conversational = fmt
    if conversational:
        if kind == "messages":
            return check_messages(where, "messages", row["messages"], True)
        check_messages(where, "prompt", row["prompt"], False)
        if kind == "prompt_completion":
            check_messages(where, "completion", row["completion"], True)
        return None
    for key in ("text", "prompt", "completion"):
        if key in row and kind != "text" or key == kind:
            if not isinstance(row[key], str) or not row[key].strip():
                raise row_error(*where, key, f"must be a non-empty string, not {row[key]!r:.40}")
    return None


def render(tokenizer, messages, where, generation_prompt):
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # a Jinja template's raise_exception, or a template error
        raise row_error(*where, "chat_template", f"the chat template fails on this row ({type(err).__name__}: "
                        f"{(str(err).splitlines() or [''])[0][:160]})") from None


def token_ids(tokenizer, text, special):
    return list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])


def prefix_length(tokenizer, text, full_text, full, where, what):
    """C10: the tokens of `text`, which must begin the whole example, as text and as tokens (a template, or a
    tokenizer merging across the boundary, may render otherwise): else the loss mask would be off."""
    ids = token_ids(tokenizer, text, False) if full_text is not None else text
    if (full_text is not None and not full_text.startswith(text)) or full[:len(ids)] != ids:
        raise row_error(*where, "chat_template" if full_text is not None else "prompt",
                        f"{what} is not a prefix of the whole example's {'rendering' if full_text else 'tokens'} "
                        "(as text or as tokens), so the loss mask would be wrong; give a template whose rendering of "
                        "a conversation's beginning begins the whole one (--chat_template FILE)"
                        if full_text is not None else "the prompt's tokens are not a prefix of the prompt + "
                        "completion's tokens (the tokenizer merges across the boundary); end the prompt with a space "
                        "or newline")
    return len(ids)


def encode_row(tokenizer, fmt, row, where):
    """(ids, mask) of one row: mask 1 on the tokens trained (the completion, every assistant turn, all of a
    text; none of a prompt-only row). Standard rows tokenize with the tokenizer's special tokens, then <eos>,
    as TRL does; conversational rows are the chat template's text, tokenized without adding any."""
    kind, conversational = fmt
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not conversational:
        if kind == "text":
            ids = token_ids(tokenizer, row["text"], True)
            ids += eos if ids[-1:] != eos else []
            return ids, [1] * len(ids)
        prompt = token_ids(tokenizer, row["prompt"], True)
        if kind == "prompt":
            return prompt, [0] * len(prompt)
        full = token_ids(tokenizer, row["prompt"] + row["completion"], True)
        full += eos if full[-1:] != eos else []
        cut = prefix_length(tokenizer, prompt, None, full, where, "prompt")
        return full, [0] * cut + [1] * (len(full) - cut)
    messages = row["messages"] if kind == "messages" else row["prompt"] + row.get("completion", [])
    full_text = render(tokenizer, messages, where, kind == "prompt")
    full, spans = token_ids(tokenizer, full_text, False), []
    if kind == "prompt_completion":
        spans = [(row["prompt"], messages, "the prompt's rendering")]
    elif kind == "messages":
        spans = [(messages[:k], messages[:k + 1], f"the rendering of messages[:{k}] (up to assistant turn {k})")
                 for k, m in enumerate(messages) if m["role"] == "assistant"]
    mask = [0] * len(full)
    for before, through, what in spans:
        start = prefix_length(tokenizer, render(tokenizer, before, where, True), full_text, full, where, what)
        end = prefix_length(tokenizer, render(tokenizer, through, where, False), full_text, full, where, what)
        mask[start:end] = [1] * (end - start)
    return full, mask


def file_examples(path, tokenizer, vocab, tokenizer_dir):
    """(format, [(ids, mask)]) of one JSONL or Parquet file: one format per file, every row checked (C10)."""
    fmt, examples = None, []
    for number, row in read_rows(path):
        where, this = (path, number), row_format(path, number, row)
        if fmt is not None and this != fmt:
            raise row_error(path, number, "format", f"{format_name(this)}, but the rows above are {format_name(fmt)};"
                            " mixed formats in one file: give each format its own file")
        fmt = this
        if fmt[1] and not tokenizer.chat_template:
            raise ConfigError([("C10", "--chat_template", f"{path} is conversational, but the tokenizer in "
                                f"{tokenizer_dir} has no chat template; give one: --chat_template FILE (Jinja)")])
        check_row(where, fmt, row)
        ids, mask = encode_row(tokenizer, fmt, row, where)
        if not ids:
            raise row_error(path, number, fmt[0], "gives no tokens")
        if max(ids) >= vocab:
            raise row_error(path, number, "--tokenizer", f"gives token id {max(ids)} >= vocabulary size {vocab}")
        examples.append((np.asarray(ids, np.int64), np.asarray(mask, np.uint8)))
    if fmt is None:
        raise ConfigError([("C10", "SOURCES", f"{path} holds no rows")])
    return fmt, examples


def in_val(i, val_fraction):
    """Example i goes to val.bin when it crosses a multiple of 1 / val_fraction: val_fraction of the examples,
    spread evenly over the files, the same on every machine."""
    return int((i + 1) * val_fraction) > int(i * val_fraction)


def write_examples(examples, vocab, out_dir, val_fraction, prompts_only=False):
    """OUT/{split}.bin (ids, then EXAMPLES_MARK: a copy without its manifest is known, C10), {split}.mask.bin (uint8
    loss mask per token) and {split}.starts.npy (int64, each example's first token and the end), under temporary
    names renamed only when all are whole. Returns the manifest's account of each split."""
    parts = {"train": [], "val": []}
    for i, example in enumerate(examples):
        parts["val" if in_val(i, val_fraction) else "train"].append(example)
    splits, final = {}, {}
    for split, chosen in parts.items():
        if not chosen or not (prompts_only or any(int(mask[1:].sum()) for _, mask in chosen)):
            raise ConfigError([("C10", "SOURCES", f"the {split} split holds {len(chosen)} examples and no token to "
                                "train on; give more rows or change --val_fraction")])
        lengths = np.array([len(ids) for ids, _ in chosen])
        names = {"file": f"{split}.bin", "mask": f"{split}.mask.bin", "starts": f"{split}.starts.npy"}
        arrays = {"file": np.concatenate([ids for ids, _ in chosen] + [EXAMPLES_MARK]).astype(token_dtype(vocab)),
                  "mask": np.concatenate([mask for _, mask in chosen]),
                  "starts": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}
        for key, name in names.items():
            final[os.path.join(out_dir, name)] = arrays[key]
        splits[split] = {**names, "examples": len(chosen), "tokens": int(lengths.sum()),
                         "loss_tokens": int(sum(int(mask[1:].sum()) for _, mask in chosen)),
                         "longest": int(lengths.max()), "bytes": arrays["file"].nbytes}
    tmp = {path: f"{path}.tmp-{os.getpid()}" for path in final}
    try:
        for path, array in final.items():
            with open(tmp[path], "wb") as f:
                np.save(f, array) if path.endswith(".npy") else array.tofile(f)
        for path in final:
            os.replace(tmp[path], path)
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    return splits


def chat_template_source(tokenizer, template_file):
    """--chat_template FILE into the tokenizer; returns the manifest's record of the template (None: none)."""
    if template_file is not None:  # input_problems() has checked it is a file
        with open(template_file, encoding="utf-8-sig") as f:
            tokenizer.chat_template = f.read()
    if not tokenizer.chat_template:
        return None
    return {"sha256": hashlib.sha256(tokenizer.chat_template.encode()).hexdigest(),
            "source": os.path.abspath(template_file) if template_file else "the tokenizer's own"}


def save_tokenizer(tokenizer, out_dir):
    """C10: the tokenizer, with the chat template the data was rendered with, into OUT/tokenizer (renamed in whole);
    returns the manifest's record of it, each file's sha256: every run checks them, and its export carries them."""
    tmp, final = os.path.join(out_dir, f".tokenizer.tmp-{os.getpid()}"), os.path.join(out_dir, "tokenizer")
    try:
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"dir": "tokenizer", "files": file_digests(final)}


def tokenize_to_bins(sources, tokenizer_dir, out_dir, val_fraction=0.1, pattern="*.txt", say=write_stdout,
                     chat_template=None):
    """Tokenize text files into out_dir/train.bin and out_dir/val.bin (flat token ids, uint16 when the
    vocabulary fits, else uint32), or JSONL/Parquet examples into those, their masks and bounds (C10); write
    out_dir/manifest.json and out_dir/data.yaml, the data: keys a config needs. Text: the val split is the last
    val_fraction of every file's tokens, so both splits see every source; examples: every 1/val_fraction-th."""
    files = input_problems(sources, tokenizer_dir, out_dir, val_fraction, pattern, chat_template)
    structured = [f for f in files if f.endswith(EXAMPLE_SUFFIXES)]
    if structured and len(structured) != len(files):
        text = next(f for f in files if f not in structured)
        raise ConfigError([("C10", "SOURCES", f"mixes text files ({text}) and examples ({structured[0]}); prepare "
                            "them into two --out directories")])
    tokenizer, vocab, origin = load_tokenizer(tokenizer_dir)
    template = chat_template_source(tokenizer, chat_template)
    dtype = token_dtype(vocab)
    manifest = {"made_by": "prepare_text.py", "version": 1, "vocab_size": vocab, "dtype": dtype,
                "tokenizer": {"dir": os.path.abspath(tokenizer_dir), "sha256": tokenizer_digest(tokenizer)},
                "chat_template": template}
    if structured:
        formats, examples = {}, []
        for path in files:
            fmt, mine = file_examples(path, tokenizer, vocab, tokenizer_dir)
            formats[path], examples = format_name(fmt), examples + mine
        prompts = [path for path, name in formats.items() if name.startswith("prompt (")]
        if prompts and len(prompts) != len(formats):  # C10: a run reads one or the other (a glob took both)
            other = next(path for path in formats if path not in prompts)
            raise ConfigError([("C10", "SOURCES", f"mixes prompt-only rows ({prompts[0]}) and rows with completions "
                                f"({other}): a run either trains the prompt-only rows on nothing (data micro-batches) "
                                "or never reads the completions (kd.on_policy_fraction 1, kd.seq_kd); prepare them "
                                "into two --out directories")])
        os.makedirs(out_dir, exist_ok=True)
        splits = write_examples(examples, vocab, out_dir, val_fraction, bool(prompts))
        manifest.update(formats=formats, splits=splits, truncated=0)
        counts = {split: s["tokens"] for split, s in splits.items()}
        what = (f"{splits['train']['examples']} train and {splits['val']['examples']} val examples "
                f"({', '.join(sorted(set(formats.values())))}); the longest is "
                f"{max(s['longest'] for s in splits.values())} tokens (data.seq_len must be at least that - 1, or "
                "set data.too_long)")
    else:
        if tokenizer.eos_token_id is None and len(files) > 1:  # the files are still one stream: say what separates
            say(f"WARNING C3: the tokenizer in {tokenizer_dir} has no end-of-text token (eos_token), so nothing "
                f"separates the {len(files)} documents: each file's tokens follow the previous file's directly and a "
                "window can span two documents; give the tokenizer an eos_token (tokenizer_config.json) to mark them")
        os.makedirs(out_dir, exist_ok=True)
        counts = write_bins(files, tokenizer, vocab, {s: os.path.join(out_dir, f"{s}.bin") for s in ("train", "val")},
                            val_fraction)
        manifest.update(formats={f: "plain text" for f in files}, splits={
            s: {"file": f"{s}.bin", "tokens": n, "bytes": n * np.dtype(dtype).itemsize} for s, n in counts.items()})
        what = f"{len(files)} files"
    manifest["tokenizer"]["saved"] = save_tokenizer(tokenizer, out_dir)
    atomic_write_text(os.path.join(out_dir, "manifest.json"), json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    paths = {split: os.path.join(out_dir, f"{split}.bin") for split in ("train", "val")}
    snippet = (f"# python prepare_text.py {' '.join(sources)} --tokenizer {tokenizer_dir} --out {out_dir}\n"
               f"# {what}; {counts['train']} train and {counts['val']} val tokens; vocab_size is {origin}\n"
               f"data:\n  train_bin: {paths['train']}\n  val_bin: {paths['val']}\n  dtype: {dtype}\n"
               f"  vocab_size: {vocab}\n")
    atomic_write_text(os.path.join(out_dir, "data.yaml"), snippet)
    say(f"wrote {paths['train']} ({counts['train']} tokens) and {paths['val']} ({counts['val']} tokens), {dtype}, "
        f"from {what}; the config needs (also in {os.path.join(out_dir, 'data.yaml')}):\n")
    say("\n".join(snippet.splitlines()[2:]))
    say(f"\nor on the command line: --set data.train_bin={paths['train']} --set data.val_bin={paths['val']} "
        f"--set data.dtype={dtype} --set data.vocab_size={vocab}")
    return {"paths": paths, "dtype": dtype, "vocab_size": vocab, "tokens": counts, "files": files, "manifest": manifest}


# -----------------------------------------------------------------------------
# The chat demo's data (--demo_chat): generated conversations and a word-level ChatML tokenizer, built here with
# transformers' tokenizers (nothing downloaded), the same on every machine. configs/distill_chat_teacher.yaml and
# configs/distill_chat.yaml (its models: configs/chat_models/*/config.json, whose vocab_size is DEMO_VOCAB's
# size) train on what it prepares, the loss on the assistant's turns (C10).
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DEMO_SYSTEM = "You are a helpful assistant."
DEMO_OBJECTS = ("apple", "bird", "cat", "dog", "egg", "fish", "hat", "ink", "jam", "kite", "lamp", "moon", "owl",
                "pen", "rose", "sun")
DEMO_VOCAB = tuple(dict.fromkeys(
    ("<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant")
    + ("You", "are", "a", "helpful", ".", "What", "is", "plus", "?", "Uppercase", "Reverse", "How", "many", "words",
       ":")
    + tuple(str(n) for n in range(19)) + DEMO_OBJECTS + tuple(w.upper() for w in DEMO_OBJECTS)))
DEMO_CHAT_ROWS = 4000


def demo_turn(r):
    """(question, answer) of one task a tiny model learns in minutes: a sum, upper-casing, reversing or counting
    one to four words. r: random.Random(n).random, the one stream Python keeps across versions."""
    def pick(seq):
        return seq[int(r() * len(seq))]

    task, words = int(r() * 4), [pick(DEMO_OBJECTS) for _ in range(1 + int(r() * 4))]
    if task == 0:
        a, b = int(r() * 10), int(r() * 10)
        return f"What is {a} plus {b}?", str(a + b)
    if task == 1:
        return f"Uppercase: {' '.join(words)}", " ".join(w.upper() for w in words)
    if task == 2:
        return f"Reverse: {' '.join(words)}", " ".join(reversed(words))
    return f"How many words: {' '.join(words)}?", str(len(words))


def demo_conversation(number):
    """Conversation `number`: a system turn half the time, then one to three question/answer turns."""
    r = random.Random(number).random
    messages = [{"role": "system", "content": DEMO_SYSTEM}] if r() < 0.5 else []
    for _ in range(1 + int(r() * 3)):
        question, answer = demo_turn(r)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def write_demo_chat(out_dir, rows):
    """OUT/source/chat.jsonl (`rows` generated conversations) and OUT/source/tokenizer (word-level, every word of
    DEMO_VOCAB one token, ChatML template, <|im_end|> its eos: what chat models use); returns their paths."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    source = os.path.join(out_dir, "source")
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(DEMO_VOCAB)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers_module().PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    fast.save_pretrained(os.path.join(source, "tokenizer"))
    atomic_write_text(os.path.join(source, "chat.jsonl"),
                      "".join(json.dumps(demo_conversation(n)) + "\n" for n in range(rows)))
    return os.path.join(source, "chat.jsonl"), os.path.join(source, "tokenizer")


def prepare_demo_chat(out_dir, rows, val_fraction, given):
    """--demo_chat N: the demo's sources written into OUT/source, then prepared into OUT as any chat JSONL is.
    C3: its command line is checked before anything is written, every problem at once (as input_problems())."""
    problems = [("C3", "--demo_chat", f"writes its own SOURCES and tokenizer; leave out {given}")] if given else []
    if rows < 20:
        problems.append(("C3", "--demo_chat", f"{rows} conversations; give at least 20 (default {DEMO_CHAT_ROWS})"))
    if not transformers_installed():
        problems.append(("C3", "--demo_chat", f"needs the transformers package, which is not installed for "
                                              f"{sys.executable}; {sys.executable} -m pip install transformers"))
    if not 0 < val_fraction < 1:
        problems.append(("C3", "--val_fraction", f"{val_fraction!r} must be between 0 and 1"))
    problems += out_problems(out_dir, ("source", "train.bin", "val.bin", "tokenizer"))
    if problems:
        raise ConfigError(problems)
    source, tokenizer = write_demo_chat(out_dir, rows)
    return tokenize_to_bins([source], tokenizer, out_dir, val_fraction)


def parse_args(argv=None):
    parser = one_line_parser(__doc__)
    parser.add_argument("sources", nargs="*", metavar="SOURCES", help="text files and directories to tokenize")
    parser.add_argument("--tokenizer", metavar="DIR", help="a local Hugging Face tokenizer or model directory")
    parser.add_argument("--out", metavar="DIR", help="the directory for train.bin, val.bin and data.yaml")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="the last share of every file's tokens "
                        "that goes to val.bin (default 0.1)")
    parser.add_argument("--glob", default="*.txt", help="which files of a directory to read (default *.txt; "
                        "*.jsonl for examples)")
    parser.add_argument("--chat_template", metavar="FILE", help="a Jinja chat template for conversational rows, "
                        "when the tokenizer has none (or to replace its own)")
    parser.add_argument("--demo_chat", type=int, nargs="?", const=DEMO_CHAT_ROWS, metavar="N", help="write N "
                        f"(default {DEMO_CHAT_ROWS}) generated conversations and a ChatML tokenizer into OUT/source, "
                        "then prepare them: the chat demo's data (configs/distill_chat*.yaml)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.demo_chat is not None:
            given = [n for n, v in (("SOURCES", args.sources), ("--tokenizer", args.tokenizer),
                                    ("--chat_template", args.chat_template)) if v]
            prepare_demo_chat(args.out, args.demo_chat, args.val_fraction, " and ".join(given))
        else:
            tokenize_to_bins(args.sources, args.tokenizer, args.out, args.val_fraction, args.glob,
                             chat_template=args.chat_template)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

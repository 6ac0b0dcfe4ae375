"""Text files -> the .bin token files train_distill.py reads, with a local Hugging Face tokenizer.

    python prepare_text.py my_texts/ more.txt --tokenizer /models/teacher --out data/mine
    ./launch.sh configs/mine.yaml          # its data: keys are the ones OUT/data.yaml holds

It runs once, before any training (as nanoGPT's data/*/prepare.py files do), and writes OUT/train.bin and
OUT/val.bin (flat token ids) and OUT/data.yaml, the data: keys a config needs (docs/distill_models.md).
train_distill.py never imports this file: copied alone, it trains on token files made here or by your own
tokenizer script. Every file is one document, followed by the tokenizer's end-of-text token (a tokenizer
without one is warned about: then nothing separates the documents). Nothing is written on bad input.
"""
import argparse
import fnmatch
import json
import os
import sys

import numpy as np

from train_distill import ConfigError, atomic_write_text, hf_config_value, transformers_installed, transformers_module


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


def input_problems(sources, tokenizer_dir, out_dir, val_fraction, pattern):
    """C3: every problem with the command line at once, before anything is read or written; and the files."""
    problems = []
    if not 0 < val_fraction < 1:
        problems.append(("C3", "--val_fraction", f"{val_fraction!r} must be between 0 and 1"))
    if not tokenizer_dir or not os.path.isdir(tokenizer_dir):
        problems.append(("C3", "--tokenizer", f"{tokenizer_dir} is not a directory; give a local Hugging Face "
                                              "tokenizer (or model) directory"))
    elif not transformers_installed():
        problems.append(("C3", "--tokenizer", f"needs the transformers package, which is not installed for "
                                              f"{sys.executable}; {sys.executable} -m pip install transformers"))
    if not out_dir:
        problems.append(("C3", "--out", "missing: give the directory for train.bin, val.bin and data.yaml"))
    else:
        there = [name for name in ("train.bin", "val.bin") if os.path.exists(os.path.join(out_dir, name))]
        if there:
            problems.append(("C3", "--out", f"{out_dir} already holds {' and '.join(there)}; choose another --out "
                                            "(nothing was overwritten)"))
    files = text_files(sources, pattern)
    if not files:
        problems.append(("C3", "SOURCES", f"no text files in {' '.join(sources)} (directories: files matching "
                                          f"{pattern}, see --glob)"))
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
                    with open(path, encoding="utf-8") as f:
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


def tokenize_to_bins(sources, tokenizer_dir, out_dir, val_fraction=0.1, pattern="*.txt", say=print):
    """Tokenize text files into out_dir/train.bin and out_dir/val.bin (flat token ids, uint16 when the
    vocabulary fits, else uint32) and write out_dir/data.yaml, the data: keys a config needs. The val split
    is the last val_fraction of every file's tokens, so both splits see every source."""
    files = input_problems(sources, tokenizer_dir, out_dir, val_fraction, pattern)
    tokenizer, vocab, origin = load_tokenizer(tokenizer_dir)
    dtype = token_dtype(vocab)
    if tokenizer.eos_token_id is None and len(files) > 1:  # the files are still one stream: say what separates them
        say(f"WARNING C3: the tokenizer in {tokenizer_dir} has no end-of-text token (eos_token), so nothing "
            f"separates the {len(files)} documents: each file's tokens follow the previous file's directly and a "
            "window can span two documents; give the tokenizer an eos_token (tokenizer_config.json) to mark them")
    os.makedirs(out_dir, exist_ok=True)
    paths = {split: os.path.join(out_dir, f"{split}.bin") for split in ("train", "val")}
    counts = write_bins(files, tokenizer, vocab, paths, val_fraction)
    snippet = (f"# python prepare_text.py {' '.join(sources)} --tokenizer {tokenizer_dir} --out {out_dir}\n"
               f"# {len(files)} files; {counts['train']} train and {counts['val']} val tokens; vocab_size is {origin}\n"
               f"data:\n  train_bin: {paths['train']}\n  val_bin: {paths['val']}\n  dtype: {dtype}\n"
               f"  vocab_size: {vocab}\n")
    atomic_write_text(os.path.join(out_dir, "data.yaml"), snippet)
    say(f"wrote {paths['train']} ({counts['train']} tokens) and {paths['val']} ({counts['val']} tokens), {dtype}, "
        f"from {len(files)} files; the config needs (also in {os.path.join(out_dir, 'data.yaml')}):\n")
    say("\n".join(snippet.splitlines()[2:]))
    say(f"\nor on the command line: --set data.train_bin={paths['train']} --set data.val_bin={paths['val']} "
        f"--set data.dtype={dtype} --set data.vocab_size={vocab}")
    return {"paths": paths, "dtype": dtype, "vocab_size": vocab, "tokens": counts, "files": files}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sources", nargs="+", metavar="SOURCES", help="text files and directories to tokenize")
    parser.add_argument("--tokenizer", metavar="DIR", help="a local Hugging Face tokenizer or model directory")
    parser.add_argument("--out", metavar="DIR", help="the directory for train.bin, val.bin and data.yaml")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="the last share of every file's tokens "
                        "that goes to val.bin (default 0.1)")
    parser.add_argument("--glob", default="*.txt", help="which files of a directory to read (default *.txt)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        tokenize_to_bins(args.sources, args.tokenizer, args.out, args.val_fraction, args.glob)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

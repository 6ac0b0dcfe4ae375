"""Hugging Face models (student.hf_dir, kd.hf_teacher_dir, a checkpoint or a *.target callable holding one) for
train_distill.py.

Everything only a Hugging Face model uses: a directory checked from its config.json alone (C3), its tokenizer
checked against the data's (C10), the loading (local files only, never a download; fp32; config.json alone is a
random init seeded by `seed`), HFCausalLM (the model behind the built-in GPT's interface, its own KV cache for
generation, a packed row's block-diagonal 4D mask: C10), the probe that a packed row's examples stay apart in it,
and the save_pretrained export with the model directory's tokenizer files.

A companion file: train_distill.py loads it (companion() in its shared config block, through hf_models()) at
config resolution when a config names a Hugging Face directory, and where a checkpoint or a *.target callable turns
out to hold a Hugging Face model; it hands itself over as `kit`, so this file refuses, seeds and checks through the
script's own ConfigError, vocab_size() and hf_config_value() (and packing.py's block_causal_mask()).
"""
import contextlib
import difflib
import functools
import inspect
import json
import os
import sys
import types

import torch
import torch.nn as nn

kit: types.ModuleType  # the training script that loaded this file: companion() sets it before this code runs

HF_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")  # the names HF configs give the position limit
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")


# -----------------------------------------------------------------------------
# Checks from the files alone, before anything is built (resolve_config: the run, --dry_run and diagnose alike).
def hf_weights_present(path):
    return any(f.endswith(".safetensors") or (f.startswith("pytorch_model") and f.endswith(".bin"))
               for f in os.listdir(path))


def describe(path):
    """The network a Hugging Face directory holds, for the plan."""
    weights = "its weights" if hf_weights_present(path) else "config.json only: random init"
    return f"Hugging Face model {path} ({weights})"


def source_problems(cfg, key, check_files):
    """C3: student.hf_dir or kd.hf_teacher_dir (a teacher needs trained weights): transformers installed, then the
    directory (hf_dir_problems)."""
    if not kit.transformers_installed():
        return [("C3", key, f"needs the transformers package, which is not installed for {sys.executable}; "
                            f"{sys.executable} -m pip install transformers, or use a built-in model or a "
                            "*.target module")]
    who, weights = ("the student", False) if key == "student.hf_dir" else ("the teacher", True)
    return hf_dir_problems(cfg, cfg[key], key, who, weights) if check_files else []


def saved_dir_problems(cfg, path):
    """C3: the directory whose config.json rebuilds the Hugging Face network of kd.teacher_checkpoint."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        return [("C3", "kd.teacher_checkpoint", f"{cfg['kd.teacher_checkpoint']} holds a Hugging Face network whose "
                 f"directory {path} (its config.json) is gone; give that run's export/ as kd.hf_teacher_dir instead")]
    return hf_dir_problems(cfg, path, "kd.teacher_checkpoint", "the teacher", False)


def hf_dir_problems(cfg, path, key, who, need_weights):
    """A local Hugging Face directory checked from its config.json alone (no transformers import, no
    weights read): it exists, has weights where they are needed, predicts data.vocab_size tokens and
    takes windows of data.seq_len tokens (an HF model indexes past its position table with an IndexError
    at step 1, or silently degrades past its RoPE length)."""
    config_file = os.path.join(path, "config.json")
    if not os.path.exists(path):  # a mistyped path is that, not a directory without config.json
        near = difflib.get_close_matches(os.path.basename(os.path.normpath(path)),
                                         os.listdir(os.path.dirname(os.path.abspath(path)) or ".")
                                         if os.path.isdir(os.path.dirname(os.path.abspath(path))) else [], n=1)
        # C3: as check_file() says of data paths: run from elsewhere (the demo's configs), the directory is there
        where = "" if os.path.isabs(path) else f" (a relative path is read from the current directory, {os.getcwd()})"
        return [("C3", key, f"{path} does not exist"
                 + (f" (did you mean {os.path.join(os.path.dirname(path), near[0])}?)" if near else "")
                 + f"{where}; give a local Hugging Face model directory")]
    if not os.path.isdir(path):
        return [("C3", key,
                 f"{path} is a file; give a local Hugging Face model directory (what save_pretrained writes)")]
    if not os.path.isfile(config_file):
        export = os.path.join(path, "export")  # C3: a run directory of this script: its export is the network
        hint = f"; it is a run directory: give its export, {export}" if os.path.isfile(
            os.path.join(export, "config.json")) else ""
        return [("C3", key, f"{path} is not a local Hugging Face model directory (no config.json in it){hint}")]
    if need_weights and not hf_weights_present(path):
        return [("C3", key, f"{path} has a config.json but no weights (*.safetensors or pytorch_model*.bin); "
                            f"{who} needs trained weights")]
    try:
        with open(config_file) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        return [("C3", key, f"{config_file} does not read as JSON ({type(err).__name__}); fix or replace it")]
    problems, vocab, seq_len = [], kit.vocab_size(cfg), cfg["data.seq_len"]
    _, model_vocab = kit.hf_config_value(config, ("vocab_size",))
    if vocab is not None and model_vocab is not None and model_vocab != vocab:
        problems.append(("C3", "data.vocab_size",
                         f"{vocab}{' (the built-in corpus is bytes)' if not cfg['data.train_bin'] else ''}, "
                         f"but {who} in {path} predicts {model_vocab} tokens; {vocab_fix(cfg, model_vocab)}"))
    name, limit = kit.hf_config_value(config, HF_POSITION_KEYS)
    if limit is not None and seq_len > limit:
        problems.append(("C3", "data.seq_len", f"{seq_len} is longer than {who}'s position limit {limit} ({name} in "
                                               f"{config_file}); set data.seq_len to at most {limit}"))
    return problems


def vocab_fix(cfg, model_vocab):
    """C3: the fix of a data.vocab_size a model does not predict. Tokenizing again with the model's tokenizer, said
    to every case, looped where the ids already were the models' (a tokenizer's size below theirs: the data fits) or
    where the student and the teacher share a tokenizer but pad their embeddings to two sizes (the same fix, then
    refused for the other model)."""
    sizes = set()
    for key in ("student.hf_dir", "kd.hf_teacher_dir"):
        with contextlib.suppress(OSError, ValueError, TypeError):
            with open(os.path.join(cfg[key], "config.json")) as f:
                sizes.add(kit.hf_config_value(json.load(f), ("vocab_size",))[1])
    sizes.discard(None)
    if len(sizes) > 1:
        return (f"the student and the teacher predict {' and '.join(map(str, sorted(sizes)))} tokens, and "
                "distillation compares one vocabulary: give them one vocab_size (resize the smaller one's embeddings "
                "and head to the larger size)")
    prepared = (kit.prepared_text(cfg["data.train_bin"])[0] or {}).get("vocab_size") if cfg["data.train_bin"] else None
    if prepared and prepared <= model_vocab:
        return (f"set data.vocab_size to {model_vocab}, the model's size: the data's ids (prepared for a vocabulary of "
                f"{prepared}) fit in it")
    return "tokenize the text with its tokenizer (python prepare_text.py) and set data.vocab_size to that size"


def tokenizer_problems(cfg, model, manifest, made):
    """C10: the tokenizer saved in the model directory `model` names is the one the data was prepared with (its
    tokenizer_digest in manifest.json): otherwise its ids mean other tokens."""
    stat = tuple(kit.file_stat(os.path.join(cfg[model], n)) for n in TOKENIZER_FILES
                 if os.path.isfile(os.path.join(cfg[model], n)))
    digest = directory_tokenizer_digest(cfg[model], stat)
    if digest is None or digest == manifest.get("tokenizer", {}).get("sha256"):
        return []
    return [("C10", model, f"{cfg[model]}'s tokenizer is not the one {made} was prepared with "
             f"({manifest.get('tokenizer', {}).get('dir')}): its ids mean other tokens; prepare the data with this "
             f"model's tokenizer: python prepare_text.py SOURCES --tokenizer {cfg[model]} --out DIR")]


@functools.lru_cache(maxsize=8)
def directory_tokenizer_digest(path, stat):
    """tokenizer_digest() of the tokenizer saved in a model directory, None when it holds none (or it does not
    load). `stat` (its tokenizer files' file_stat) keys the memo."""
    if not stat:
        return None
    try:
        return kit.tokenizer_digest(kit.transformers_module().AutoTokenizer.from_pretrained(path,
                                                                                          local_files_only=True))
    except Exception:  # a directory whose tokenizer files do not load: nothing to compare (its model errors are C3's)
        return None


# -----------------------------------------------------------------------------
# The model behind the kit's interface, and its loading.
class HFCausalLM(nn.Module):
    """A Hugging Face causal LM behind the built-in model's interface: idx -> (logits, last hidden state or
    None), attribute width. A training forward runs without a KV cache (use_cache=False: training never reuses
    one) and asks for the hidden states only when the hidden-state loss needs them (kd.gamma > 0); generation
    (`past`, see GPT) uses the model's own cache (past_key_values) and computes the last position's logits only."""
    kv_cache = True

    def __init__(self, model, hidden):
        super().__init__()
        self.model, self.hidden, self.width, self.layers = model, bool(hidden), model.config.hidden_size, None
        self.depth = kit.hf_config_value(model.config, ("num_hidden_layers", "n_layer"))[1]  # hidden_states: depth + 1
        # the KV cache's argument and output: `cache` in current transformers, `past_key_values` before (now deprecated)
        self.cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(self, idx, logits=True, past=None, positions=None):
        packed = {} if positions is None else {"position_ids": positions, "attention_mask": self.packed_mask(positions)}
        if past is not None:
            name = self.cache_name
            out = self.model(input_ids=idx, **{name: past or None}, use_cache=True, logits_to_keep=1, return_dict=True)
            return out.logits[:, -1], out[name]
        if not logits:  # kd.chunk_tokens: the last hidden state only (the head runs in the loss, chunk by chunk)
            out = self.model(input_ids=idx, use_cache=False, output_hidden_states=True, logits_to_keep=1,
                             return_dict=True, **packed)
            return None, out.hidden_states[-1]
        out = self.model(input_ids=idx, use_cache=False, output_hidden_states=self.hidden, return_dict=True, **packed)
        if self.layers is not None:
            return out.logits, [out.hidden_states[i] for i in self.layers]
        return out.logits, (out.hidden_states[-1] if self.hidden else None)

    def packed_mask(self, positions):
        """C10: block_causal_mask (packing.py's) as the model's attention takes a 4D mask as it is: sdpa a boolean
        one, eager adds it to the scores (packing_probe refuses any other implementation)."""
        mask = kit.companion("packing", "data.packing").block_causal_mask(positions)
        if self.model.config._attn_implementation == "sdpa":
            return mask
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)


def load_hf_model(path, key, seed, weights=True):
    """A local Hugging Face causal LM in fp32 (autocast lowers the compute), never downloaded
    (local_files_only). A directory without weights (config.json alone), or weights=False (the weights
    come from a checkpoint), gives a random init seeded by `seed`. Under torch.device("meta") (E6: the memory
    estimate), the config's network alone: a meta tensor holds no value to read, and transformers 5 refuses
    from_pretrained there."""
    transformers = kit.transformers_module()
    try:
        if weights and hf_weights_present(path) and torch.get_default_device().type != "meta":
            model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        else:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            torch.manual_seed(seed)
            model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception as err:  # whatever transformers raises for a directory it cannot build
        raise kit.ConfigError([("C3", key, f"{path} does not load as a causal LM ({type(err).__name__}: "
                                f"{(str(err).splitlines() or [''])[0][:200]})")]) from None
    return model.float()


def hf_lm(model, cfg, key, who, hidden):
    """Wrap a Hugging Face model after checking it against the data: vocabulary and position limit."""
    head = model.get_output_embeddings()
    vocab = head.out_features if isinstance(head, nn.Linear) else model.config.vocab_size
    if vocab != kit.vocab_size(cfg):
        raise kit.ConfigError([("C3", "data.vocab_size", f"{kit.vocab_size(cfg)}, but {who} ({key}) predicts {vocab} "
                                f"tokens; {vocab_fix(cfg, vocab)}")])
    name, limit = kit.hf_config_value(model.config, HF_POSITION_KEYS)
    if limit is not None and cfg["data.seq_len"] > limit:
        raise kit.ConfigError([("C3", "data.seq_len", f"{cfg['data.seq_len']} is longer than {who}'s position limit "
                                f"{limit} (config.{name} of {key}); set data.seq_len to at most {limit}")])
    return HFCausalLM(model, hidden)


def dir_lm(cfg, path, key, who, hidden, weights=True):
    """build_lm() of a Hugging Face directory; weights=False: the weights are in the checkpoint `key` names (a
    kd.teacher_checkpoint of this script), the directory gives the network."""
    if not weights and not kit.transformers_installed():
        raise kit.ConfigError([("C3", key, f"{cfg[key]} holds a Hugging Face network; it needs the transformers "
                                f"package, which is not installed for {sys.executable} ({sys.executable} -m pip "
                                "install transformers)")])
    return hf_lm(load_hf_model(path, key, cfg["seed"], weights), cfg, key, who, hidden)


def load_hf_teacher(cfg, hidden=True):
    return dir_lm(cfg, cfg["kd.hf_teacher_dir"], "kd.hf_teacher_dir", "the teacher", hidden)


def packing_probe(lm, cfg, key, who, fix):
    """C10, data.packing (packing.py's packing_check hands a Hugging Face model here): its attention must take the
    4D mask (eager, sdpa) and, on a probe row of two examples, the second's logits must be those it has alone (a
    model that adds its own mask or ignores ours fails it)."""
    how = lm.model.config._attn_implementation
    if how not in ("eager", "sdpa"):
        raise kit.ConfigError([("C10", "data.packing", f"true, but {who} ({key}) uses attention {how!r}, which takes "
                                f"no block-diagonal mask (eager and sdpa do); {fix}")])
    n = min(8, cfg["data.seq_len"])
    row, training = torch.arange(1, n + 1) % kit.vocab_size(cfg), lm.training
    positions = torch.cat([torch.arange(n // 2), torch.arange(n - n // 2)])
    with torch.no_grad():
        packed, alone = lm.eval()(row[None], positions=positions[None])[0][0, n // 2:], lm(row[None, n // 2:])[0][0]
    lm.train(training)
    if not torch.allclose(packed, alone, rtol=1e-3, atol=1e-4 * float(alone.abs().max())):
        raise kit.ConfigError([("C10", "data.packing", f"true, but {who} ({key}) lets a packed row's examples attend "
                                "to each other (given the 4D mask and position_ids, the logits of a row's second "
                                f"example are not those it has alone); {fix}")])
    return lm


# -----------------------------------------------------------------------------
# The export (export_best): what AutoModelForCausalLM.from_pretrained loads, without the kit.
def save_export(lm, state, tmp):
    """best.pt's weights (`state`, the language model's keys) as a save_pretrained directory in tmp."""
    kit.transformers_module()  # its progress bars off, for a model a *.target callable built too
    lm.model.save_pretrained(tmp, state_dict={k[len("model."):]: v for k, v in state.items()})

"""A zoo of tiny models of the kinds users bring, for the tests: every guarantee must hold on these, not only
on the kit's built-in encoder and GPT. Everything is built locally with random weights (nothing is downloaded).

Importable by tests in-process (tests/ is on sys.path, see conftest.py) and as a 'zoo:callable' target
(`backbone.target: zoo:eegnet`, `student.target: zoo:...`) by a training script run as a subprocess from
tests/ or with PYTHONPATH=tests.
"""
import torch
import torch.nn as nn


# ---------------------------------------------------------------------------------------------------------
# probe backbones: [B, C, T] EEG windows in; a tensor, tokens, a time series or a dict/ModelOutput out.
class EEGNet(nn.Module):
    """EEGNet-style (Lawhern et al. 2018): temporal conv, depthwise spatial conv, separable conv, each with
    BatchNorm, ELU, average pooling and dropout. Returns [B, f2 * 4] (2-D: backbone.pool null works)."""

    def __init__(self, channels, f1=4, depth=2, f2=8, kernel=16, dropout=0.25):
        super().__init__()
        f = f1 * depth
        self.temporal = nn.Sequential(nn.Conv2d(1, f1, (1, kernel), padding=(0, kernel // 2), bias=False),
                                      nn.BatchNorm2d(f1))
        self.spatial = nn.Sequential(nn.Conv2d(f1, f, (channels, 1), groups=f1, bias=False), nn.BatchNorm2d(f),
                                     nn.ELU(), nn.AvgPool2d((1, 4)), nn.Dropout(dropout))
        self.separable = nn.Sequential(nn.Conv2d(f, f, (1, 8), padding=(0, 4), groups=f, bias=False),
                                       nn.Conv2d(f, f2, 1, bias=False), nn.BatchNorm2d(f2), nn.ELU(),
                                       nn.AdaptiveAvgPool2d((1, 4)), nn.Dropout(dropout))

    def forward(self, x):
        return self.separable(self.spatial(self.temporal(x.unsqueeze(1)))).flatten(1)


def eegnet(channels, **kwargs):
    return EEGNet(channels, **kwargs)


class TokenTransformer(nn.Module):
    """Patch embedding + a learned CLS token + a transformer encoder with dropout: [B, 1 + T / patch, dim]
    tokens (backbone.pool mean_tokens or cls)."""

    def __init__(self, channels, dim=16, heads=2, depth=1, patch=16, dropout=0.1):
        super().__init__()
        self.patch = nn.Conv1d(channels, dim, patch, stride=patch)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        tokens = self.patch(x).transpose(1, 2)
        return self.norm(self.encoder(torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1)))


def token_transformer(channels, **kwargs):
    return TokenTransformer(channels, **kwargs)


class ConvTime(nn.Module):
    """A conv stack without its pooling: [B, width, T / 4] (backbone.pool mean_time; mean_tokens would
    average the feature axis)."""

    def __init__(self, channels, width=16, dropout=0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(channels, width, 7, stride=2, padding=3), nn.BatchNorm1d(width), nn.GELU(),
                                 nn.Dropout(dropout), nn.Conv1d(width, width, 5, stride=2, padding=2),
                                 nn.BatchNorm1d(width), nn.GELU(), nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


def conv_time(channels, **kwargs):
    return ConvTime(channels, **kwargs)


class ItemInInit(ConvTime):
    """ConvTime whose __init__ reads a tensor's value (as braindecode's EEGConformer/Labram and HF models
    do): it cannot be built on the meta device, whose tensors hold no values."""

    def __init__(self, channels, width=16, dropout=0.1):
        super().__init__(channels, int(torch.tensor(width).item()), dropout)


def item_in_init(channels, **kwargs):
    return ItemInInit(channels, **kwargs)


class ConvMap(ConvTime):
    """braindecode's 4-D feature maps: ShallowFBCSPNet/Deep4Net give [B, F, T, 1], EEGNet [B, F, 1, T]."""

    def __init__(self, channels, layout="ft1", width=16, dropout=0.1):
        super().__init__(channels, width, dropout)
        self.layout = layout

    def forward(self, x):
        out = self.net(x)
        return out.unsqueeze(-1) if self.layout == "ft1" else out.unsqueeze(2)


def conv_map(channels, **kwargs):
    return ConvMap(channels, **kwargs)


class ReplacedHead(ConvTime):
    """A model whose final layer was replaced by one that does not fit what feeds it (ATCNet after a user
    swapped its classifier): it raises inside its own forward."""

    def __init__(self, channels, width=16, dropout=0.1):
        super().__init__(channels, width, dropout)
        self.final = nn.Linear(width + 1, 4)

    def forward(self, x):
        return self.final(self.net(x).mean(2))


def replaced_head(channels, **kwargs):
    return ReplacedHead(channels, **kwargs)


def fetching_weights(channels, **kwargs):
    """A build function that raises before it returns a model (its weights server is down, say)."""
    raise RuntimeError("the weights server is unreachable")


class DictEncoder(nn.Module):
    """Hugging Face style: {"last_hidden_state": [B, N, dim], "pooler_output": [B, dim]} as a plain dict, or
    as transformers' BaseModelOutputWithPooling (model_output=True)."""

    def __init__(self, channels, dim=16, patch=16, model_output=False):
        super().__init__()
        self.patch = nn.Conv1d(channels, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)
        self.pooler = nn.Linear(dim, dim)
        self.model_output = model_output

    def forward(self, x):
        tokens = self.norm(self.patch(x).transpose(1, 2))
        out = {"last_hidden_state": tokens, "pooler_output": torch.tanh(self.pooler(tokens.mean(1)))}
        if self.model_output:
            from transformers.modeling_outputs import BaseModelOutputWithPooling
            return BaseModelOutputWithPooling(**out)
        return out


def dict_encoder(channels, **kwargs):
    return DictEncoder(channels, **kwargs)


# ============================================================================ distillation models
# Tiny causal LMs for train_distill.py: vocabulary 256 (the built-in byte corpus, so no .bin files are
# needed), width 32, one or two layers, position limits of 64 tokens (data.seq_len must stay <= that).
BYTES = 256


def hf_gpt2(path, vocab=BYTES, positions=64, seed=0, dropout=0.1):
    """A tiny Hugging Face GPT-2 (learned positions, tied embeddings, dropout 0.1 as GPT-2's default)
    saved with save_pretrained into `path`; returns the path."""
    import transformers
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                     bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    torch.manual_seed(seed)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return str(path)


def hf_llama(path, vocab=BYTES, positions=64, seed=0, **overrides):
    """A tiny Hugging Face Llama (RoPE, RMSNorm, grouped-query attention, untied head) saved into `path`;
    `overrides` replace LlamaConfig values (num_hidden_layers, initializer_range, ...)."""
    import transformers
    config = transformers.LlamaConfig(**{**dict(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                max_position_embeddings=positions, bos_token_id=1, eos_token_id=2),
                                         **overrides})
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def hf_config_only(path, kind="gpt2", **kwargs):
    """A Hugging Face directory holding config.json alone: train_distill.py initialises it randomly."""
    import os
    builder = hf_gpt2 if kind == "gpt2" else hf_llama
    builder(path, **kwargs)
    for name in os.listdir(path):
        if name != "config.json":
            os.remove(os.path.join(path, name))
    return str(path)


class TinyCausalLM(nn.Module):
    """A plain user nn.Module for student.target / teacher.target: token ids [B, T] -> (logits [B, T, vocab],
    hidden [B, T, width]), or logits alone with hidden=False. A GRU (causal by construction) with dropout,
    so the training forward draws random numbers."""

    def __init__(self, vocab=BYTES, width=32, dropout=0.1, hidden=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = nn.GRU(width, width, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.return_hidden = hidden

    def forward(self, idx):
        h, _ = self.rnn(self.drop(self.embed(idx)))
        h = self.norm(h)
        logits = self.head(self.drop(h))
        return (logits, h) if self.return_hidden else logits


def tiny_causal_lm(**kwargs):
    """The callable a config names: student.target: zoo:tiny_causal_lm (kwargs from student.kwargs)."""
    return TinyCausalLM(**kwargs)


class CountingLM(nn.Module):
    """A user teacher whose greedy continuation is known: after token t it ranks (t + 1) % vocab first, by a
    margin `scale`, whatever came before; (logits, hidden) with the one-hot input as its hidden state."""

    def __init__(self, vocab=BYTES, scale=4.0):
        super().__init__()
        self.vocab, self.scale = vocab, nn.Parameter(torch.tensor(float(scale)))

    def forward(self, idx):
        return self.scale * nn.functional.one_hot((idx + 1) % self.vocab, self.vocab).float(), \
            nn.functional.one_hot(idx, self.vocab).float()


def counting_lm(**kwargs):
    return CountingLM(**kwargs)


def tiny_tokenizer(path, texts, vocab_size=300):
    """A word-level BPE tokenizer trained on `texts` with the tokenizers package, wrapped as a transformers
    PreTrainedTokenizerFast and saved into `path` (an <eos> token separates documents)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(path)
    return str(path)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer(path, texts, vocab_size=120, template=CHATML):
    """tiny_tokenizer with ChatML's <|im_start|> and <|im_end|> as special tokens and `template` as its chat
    template (None: a tokenizer without one), saved into `path`."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<unk>", "<eos>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                                additional_special_tokens=special[2:])
    fast.chat_template = template
    fast.save_pretrained(path)
    return str(path)
# ============================================================================ end distillation models


class LayeredCausalLM(nn.Module):
    """A user module that returns every layer's hidden state, as Hugging Face models do with hidden_states:
    token ids -> (logits, [embeddings (width 24), after the widening layer (32), after the GRU (32)]), so
    kd.hidden_layers can map its layers 0..2, whose widths differ."""

    def __init__(self, vocab=BYTES):
        super().__init__()
        self.embed = nn.Embedding(vocab, 24)
        self.widen = nn.Linear(24, 32)
        self.rnn = nn.GRU(32, 32, batch_first=True)
        self.head = nn.Linear(32, vocab)

    def forward(self, idx):
        e = self.embed(idx)
        w = torch.tanh(self.widen(e))
        h, _ = self.rnn(w)
        return self.head(h), [e, w, h]


def layered_causal_lm(**kwargs):
    return LayeredCausalLM(**kwargs)

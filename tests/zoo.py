"""A zoo of the models users bring, built locally with random weights (nothing is downloaded).

Importable by tests in-process (tests/ is on sys.path, see conftest.py) and as a 'zoo:callable' target by
a training script run as a subprocess with PYTHONPATH=tests.
"""
import torch
import torch.nn as nn


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


def hf_llama(path, vocab=BYTES, positions=64, seed=0):
    """A tiny Hugging Face Llama (RoPE, RMSNorm, grouped-query attention, untied head) saved into `path`."""
    import transformers
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=positions,
                                      bos_token_id=1, eos_token_id=2)
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
# ============================================================================ end distillation models

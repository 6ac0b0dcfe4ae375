"""A zoo of tiny models of the kinds users bring, for the tests: every guarantee must hold on these, not only
on the kit's built-in encoder and GPT. Each factory is importable as a `backbone.target` (`zoo:eegnet`) from
tests/ and builds in milliseconds with random weights (no download).
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

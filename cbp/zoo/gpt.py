"""A small character-level GPT in the spirit of nanoGPT, and sampling from it.

Token and position embeddings, pre-norm blocks of causal self-attention
(``F.scaled_dot_product_attention``) and an MLP, a final LayerNorm, and an output head that shares
the token embedding's weight. Every Linear layer lives inside ``blocks``; that is what the
transformer layer selection :data:`CBP_SELECTION` quantizes, leaving the embeddings and the tied
head at full precision (the CNN rule "first and last Conv/Linear float" would leave the first
attention projection float for no reason, and keeps the head float only because it is registered
last).

Generation keeps a :class:`KVCache`: each new token runs through the model alone, attending to the
keys and values of the tokens before it, instead of re-running the whole window every step (past
the context, see :func:`generate`'s ``context_shift``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.layers import convert, quantized_layers

# The layer selection for this model (and the recipe for any transformer): every Linear inside a
# block, nothing outside. Embeddings are not Conv/Linear, so they are never candidates; the tied
# head is a Linear outside the blocks, so `include` leaves it out. Pass as CBPConfig(**CBP_SELECTION).
CBP_SELECTION = {"include": (r"^blocks\.",), "skip_first_last": False}


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 84
    context: int = 128       # longest sequence (position embeddings)
    layers: int = 4
    heads: int = 4
    width: int = 128
    dropout: float = 0.0


class KVCache:
    """Every block's attention keys and values of the tokens seen so far, for :func:`generate`.

    ``GPT.forward(idx, cache)`` continues the sequence the cache holds: ``idx`` takes the positions
    after it, attends to it, and its own keys and values are appended.
    """

    def __init__(self, layers: int) -> None:
        self.layers: list[list[torch.Tensor]] = [[] for _ in range(layers)]

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2] if self.layers[0] else 0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=False)

    def forward(self, x: torch.Tensor, cache: list[torch.Tensor] | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.qkv(x).split(c, dim=2))
        if cache is not None:   # this layer's (keys, values) of the earlier tokens, then ours
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        # the causal mask of t queries over t keys; one new query after a cache sees every key
        y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.width, 4 * cfg.width, bias=False)
        self.proj = nn.Linear(4 * cfg.width, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.width), CausalSelfAttention(cfg)
        self.ln2, self.mlp = nn.LayerNorm(cfg.width), MLP(cfg)

    def forward(self, x: torch.Tensor, cache: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Logits ``(batch, time, vocab)`` for token indices ``(batch, time)``.

    With a :class:`KVCache`, ``idx`` continues the tokens it holds (the whole window at once into
    an empty cache, then one token per call) and the cache grows by ``idx``.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.width)
        self.wpe = nn.Embedding(cfg.context, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / (2 * cfg.layers) ** 0.5)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        start, t = (cache.length if cache is not None else 0), idx.shape[1]
        if start + t > self.cfg.context:
            raise ValueError(f"sequence of {start + t} tokens is longer than the context "
                             f"{self.cfg.context}")
        if start and t > 1:
            raise ValueError("after the first call, a KVCache takes one token at a time")
        pos = torch.arange(start, start + t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layers[i] if cache is not None else None)
        return self.lm_head(self.ln_f(x))


def gpt(vocab_size: int, **sizes) -> GPT:
    return GPT(GPTConfig(vocab_size=vocab_size, **sizes))


@torch.no_grad()
def generate(model: nn.Module, idx: torch.Tensor, tokens: int, seed: int = 0,
             temperature: float = 1.0, top_k: int | None = None,
             context_shift: int = 1) -> torch.Tensor:
    """``idx`` (1, t) followed by ``tokens`` sampled tokens; the same for the same seed.

    Each token is drawn from the model's prediction after the tokens of a window: all of them
    while they fit the context. When the next token would not fit, the oldest ``context_shift``
    tokens leave the window. Sampling draws from its own ``torch.Generator`` seeded with ``seed``,
    so the text does not depend on (or disturb) the global random state.

    A :class:`KVCache` runs each new token alone. When the window moves, every token in it gets a
    new position (learned absolute position embeddings), so the window is read again into a fresh
    cache. ``context_shift=1`` (the default) keeps the whole context for every token, as nanoGPT's
    loop does, and so re-reads the whole window for every token past the context: the cache saves
    nothing there. A larger shift re-reads once every ``context_shift`` tokens, each token seeing
    between ``context - context_shift + 1`` and ``context`` tokens (llama.cpp's "context shift"
    drops half): other text, much faster past the context (``benchmarks/generate_time.py``).
    A prepared model samples from a converted copy: the same weights, snapped once, not per token.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    context = model.cfg.context
    if not 1 <= context_shift <= context:
        raise ValueError(f"context shift must be between 1 and the model's context, {context}; "
                         f"got {context_shift}")
    model = convert(model) if quantized_layers(model) else model
    model.eval()
    start, cache = 0, KVCache(len(model.blocks))   # the window is idx[:, start:]
    generator = torch.Generator(device=idx.device).manual_seed(seed)
    for _ in range(tokens):
        if idx.shape[1] - start > context:   # a long prompt starts at a full window
            start = max(start + context_shift, idx.shape[1] - context)
            cache = KVCache(len(model.blocks))
        logits = model(idx[:, start + cache.length:], cache)   # the window, then one at a time
        logits = logits[:, -1, :].float() / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    return idx

"""common.py — the shared core of the length-generalization reproductions.

One file, read top to bottom:

  1. the model    GPTConfig, CausalSelfAttention, MLP, Block, GPT (NoPE / learned / RoPE positions,
                  explicit position_ids, an optional norm on the attention output; one named path per
                  way attention runs: fused SDPA, probed, answer queries only, explicit maps, decoding
                  with a preallocated KVCache)
  2. training     train(): AdamW (fused on CUDA), warmup + cosine, grad clipping, fp32 unless
                  --dtype bf16 (CUDA), opt-in torch.compile, divergence detection
  3. evaluation   eval_batches() (test sets drawn once per process), evaluate_by_length(),
                  evaluate_with_probes() (always fp32): tidy rows, fixed eval seed
  4. sweeps       run_sweep(): cells in parallel processes (spread over GPUs), shards, atomic per-cell
                  results, resume, a progress bar over the steps of every worker
  5. results      write_results(), load_results(), saved_run() (tied to the script), summarize()
  6. plots        training_report(), plot_vs_length(), Palette, plot_attention_maps()
  7. the CLI      make_parser(), parse_config(), pick_device(), setup_run(), cli_main() (exit 2 / 3 / 130)

A task is a pure function `sample_batch(rng, batch_size, length) -> dict` of CPU tensors, driven by an
explicit `np.random.Generator` (never global RNG). The dict holds
  idx          (B, T) int64 token ids
  targets      (B, P) int64 labels at the positions in `at` (-1 = ignored), or (B, T) if `at` is absent
  at           (B, P) int64 positions whose prediction is scored (optional; the last column is probed)
  position_ids (B, T) int64 (optional; default 0..T-1)
  pos_targets  (B, T) int64 (optional) the next token's position id, for a model with a position head
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict, defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

POS_ENCODINGS = ("none", "learned", "rope")
ATTN_OUT_NORMS = ("none", "layernorm", "standardize", "headnorm", "gate")
ATTN_LOGITS = ("softmax", "ssmax", "logn")
EVAL_SEED = 12345  # every variant and every training seed is tested on the same examples
JOBS_PER_GPU = 8   # default --jobs per GPU


EXIT_USAGE, EXIT_IO, EXIT_INTERRUPTED = 2, 3, 130  # bad input; a file-system fault; Ctrl-C


class UsageError(ValueError):
    """Bad input from the user: the CLI prints it as one line and exits with status 2."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise UsageError(msg)


# =============================================================================================
# 1. The model
# =============================================================================================

@dataclass
class GPTConfig:
    vocab_size: int = 64
    block_size: int = 1024        # size of the learned position table: position ids must be < this
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    mlp: bool = True              # False: attention-only blocks
    bias: bool = True
    pos: str = "none"             # none (NoPE) | learned (absolute table) | rope
    rope_base: float = 10000.0
    attn_out_norm: str = "none"   # output side: none | layernorm (affine) | standardize (no affine), after W_O;
                                  # headnorm | gate, per head before W_O (see CausalSelfAttention.out)
    attn_logits: str = "softmax"  # logit side: softmax | ssmax | logn (see CausalSelfAttention.query_scale)
    n_train: int = 0              # tokens of the longest training sequence: logn's reference length, and
                                  # SSMax's start (s = 1 / log n_train: plain softmax at that length)
    pos_vocab: int = 0            # > 0: a second head predicts the next token's position id in
                                  # 0..pos_vocab-1 (Predictive Position Coupling, Golowich et al. 2025)


def rope_angles(pos, hs, base):
    """cos and sin of the RoPE angles pos * base^(-2i/hs), each (B, 1, T, hs/2) in float32; pos (B, T).
    Computed once per forward and shared by every layer's q and k."""
    inv_freq = base ** (-torch.arange(0, hs, 2, device=pos.device, dtype=torch.float32) / hs)  # (hs/2,)
    ang = pos[:, None, :, None].float() * inv_freq  # (B, 1, T, hs/2)
    return ang.cos(), ang.sin()


def apply_rope(x, rope):
    """Rotate pairs of channels of x (B, nh, T, hs) by the angles of rope_angles()."""
    cos, sin = (t.to(x.dtype) for t in rope)
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def gather_at(x, at):
    """x (B, T, C) at the positions at (B, P): (B, P, C)."""
    return x.gather(1, at[:, :, None].expand(-1, -1, x.size(-1)))


def attention_rows(q, k, at):
    """softmax(q k^T / sqrt(hs)) for the queries at positions `at` (B, P) only, causal, in float32:
    (B, nh, P, T). O(P T) memory."""
    B, nh, T, hs = q.shape
    qa = q.gather(2, at[:, None, :, None].expand(B, nh, at.size(1), hs))  # (B, nh, P, hs)
    scores = (qa @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, P, T)
    future = torch.arange(T, device=q.device) > at[:, None, :, None]  # (B, 1, P, T)
    return F.softmax(scores.masked_fill(future, float("-inf")).float(), dim=-1)


class KVCache:
    """Keys and values of one layer for incremental decoding, preallocated for max_len positions and
    filled left to right: no torch.cat (and no new allocation) per decoded token."""

    def __init__(self, max_len):
        self.max_len, self.n, self.k, self.v = max_len, 0, None, None

    def append(self, k, v):
        """k, v (B, nh, T, hs) of the new positions; returns every cached key and value so far."""
        B, nh, T, hs = k.shape
        check(self.n == 0 or T == 1, "after the prompt, decode one token at a time")
        check(self.n + T <= self.max_len, f"the key/value cache holds {self.max_len} positions")
        if self.k is None:
            self.k, self.v = k.new_empty(B, nh, self.max_len, hs), v.new_empty(B, nh, self.max_len, hs)
        self.k[:, :, self.n:self.n + T], self.v[:, :, self.n:self.n + T] = k, v
        self.n += T
        return self.k[:, :, :self.n], self.v[:, :, :self.n]  # (B, nh, n, hs) each


def check_model_shape(n_embd, n_head, rope=False):
    """The width splits into equal heads (and, with RoPE, heads of even size). Scripts call it up
    front, so a bad --n-embd / --n-head is one error line before any training."""
    check(n_embd % n_head == 0, f"--n-embd {n_embd} must be divisible by --n-head {n_head}")
    check(not rope or (n_embd // n_head) % 2 == 0, f"rope needs an even head size; --n-embd / --n-head = "
          f"{n_embd // n_head}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention. One short method per way it is run:
      forward            y (B, T, C) from the fused kernel (flash / memory-efficient): training, eval
      forward_probed     the same, plus the rows of the queries at `at` (B, nh, P, T): probes
      forward_at         y (B, P, C) for the queries at `at` alone, and their rows: the last block
                         when only the answers are read (its keys and values still span all T)
      forward_with_maps  y (B, T, C) and the full maps (B, nh, T, T) from an explicit softmax
      decode             y for the new positions, attending to everything in the KVCache
    x is (B, T, C); rope is rope_angles() of the position ids, or None without RoPE."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)      # W_O
        if cfg.attn_logits == "ssmax":  # s_h, one per head, starting where s log n_train = 1
            self.ssmax_s = nn.Parameter(torch.full((cfg.n_head,), 1 / math.log(cfg.n_train)))
        if cfg.attn_out_norm == "gate":  # from the attention input (after ln_1), one gate per head
            self.gate = nn.Linear(cfg.n_embd, cfg.n_head)

    def qkv(self, x, rope, start=0):
        """q, k, v (B, nh, T, hs) of x (B, T, C), whose first token is the sequence's token `start`."""
        B, T, C = x.shape
        nh = self.cfg.n_head
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))  # (B, nh, T, hs)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        scale = self.query_scale(T, start, x.device)
        if scale is not None:
            q = q * scale.to(q.dtype)
        return q, k, v

    def query_scale(self, T, start, device):
        """The logit-side variants, as a factor on q per head and query: softmax(f * q k^T / sqrt(hs)).
        n = the number of keys the query sees under the causal mask (its index + 1), not the
        sequence length:
          ssmax  f = s_h log n, s_h learned per head (Scalable-Softmax, Nakanishi 2025, arXiv 2501.19399)
          logn   f = max(1, log n / log n_train) at inference only (eval mode); training unchanged
                 (the log-n scaling of several long-context LLMs)
        Returns (nh or 1, T, 1), or None for plain softmax."""
        kind = self.cfg.attn_logits
        if kind == "softmax" or (kind == "logn" and self.training):
            return None
        log_n = torch.arange(start + 1, start + T + 1, device=device, dtype=torch.float32).log()  # (T,)
        if kind == "ssmax":
            return (self.ssmax_s[:, None] * log_n)[:, :, None]  # (nh, T, 1)
        return (log_n / math.log(self.cfg.n_train)).clamp_min(1.0)[None, :, None]  # (1, T, 1)

    def out(self, y, x):
        """Heads y (B, nh, T, hs) -> (B, T, C) through W_O. The output-side variants that act per head,
        before W_O; x (B, T, C) is the attention input at the same T queries (read by the gate only):
          headnorm  each head's output standardized (zero mean, unit variance over its hs channels, no
                    affine): per-head output normalization, 'AVNorm' (2025)
          gate      each head's output times sigmoid(W_g x + b_g)_h (gated attention, Qiu et al. 2025)"""
        if self.cfg.attn_out_norm == "headnorm":
            y = F.layer_norm(y, (y.size(-1),))
        elif self.cfg.attn_out_norm == "gate":
            y = y * torch.sigmoid(self.gate(x)).transpose(1, 2)[..., None]  # (B, nh, T, 1) gates
        B, nh, T, hs = y.shape
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, nh * hs))  # (B, T, C): heads side by side

    def forward(self, x, rope):
        q, k, v = self.qkv(x, rope)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True), x)

    def forward_probed(self, x, rope, at):
        q, k, v = self.qkv(x, rope)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True), x), attention_rows(q, k, at)

    def forward_at(self, x, rope, at):
        q, k, v = self.qkv(x, rope)
        rows = attention_rows(q, k, at)  # (B, nh, P, T)
        x_at = gather_at(x, at) if self.cfg.attn_out_norm == "gate" else None  # the gate's input, if any
        return self.out(rows.to(v.dtype) @ v, x_at), rows  # (B, P, C)

    def forward_with_maps(self, x, rope):
        q, k, v = self.qkv(x, rope)
        T = x.size(1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        maps = F.softmax(scores.masked_fill(future, float("-inf")).float(), dim=-1)
        return self.out(maps.to(v.dtype) @ v, x), maps

    def decode(self, x, rope, cache: KVCache):
        q, k, v = self.qkv(x, rope, start=cache.n)
        k, v = cache.append(k, v)  # (B, nh, T_past + T, hs)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=x.size(1) > 1), x)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LN block: x + norm_out(attn(ln_1(x))), then x + mlp(ln_2(x)). Its methods mirror
    CausalSelfAttention's; the probed ones return a record of the attention output at `at` before
    ('pre') and after ('post') the extra norm, (B, P, C), and the query rows ('attn', (B, nh, P, T))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.attn_out_norm = {"layernorm": nn.LayerNorm(cfg.n_embd, bias=cfg.bias),  # headnorm and gate act
                              "standardize": nn.LayerNorm(cfg.n_embd, elementwise_affine=False),  # inside
                              }.get(cfg.attn_out_norm, nn.Identity())                     # the attention
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias) if cfg.mlp else None
        self.mlp = MLP(cfg) if cfg.mlp else None

    def residual(self, x, a):
        """x + norm_out(a), then the MLP; returns the block output and norm_out(a)."""
        n = self.attn_out_norm(a)
        x = x + n
        if self.mlp is not None:
            x = x + self.mlp(self.ln_2(x))
        return x, n

    def forward(self, x, rope):
        return self.residual(x, self.attn(self.ln_1(x), rope))[0]

    def forward_probed(self, x, rope, at):
        a, rows = self.attn.forward_probed(self.ln_1(x), rope, at)
        x, n = self.residual(x, a)
        return x, {"attn": rows, "pre": gather_at(a, at), "post": gather_at(n, at)}

    def forward_at(self, x, rope, at):
        a, rows = self.attn.forward_at(self.ln_1(x), rope, at)  # (B, P, C)
        x, n = self.residual(gather_at(x, at), a)  # (B, P, C)
        return x, {"attn": rows, "pre": a, "post": n}

    def forward_with_maps(self, x, rope):
        a, maps = self.attn.forward_with_maps(self.ln_1(x), rope)
        return self.residual(x, a)[0], maps

    def decode(self, x, rope, cache):
        return self.residual(x, self.attn.decode(self.ln_1(x), rope, cache))[0]


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        check(cfg.pos in POS_ENCODINGS, f"unknown positional encoding {cfg.pos!r}; choose from {POS_ENCODINGS}")
        check(cfg.attn_out_norm in ATTN_OUT_NORMS,
              f"unknown attn_out_norm {cfg.attn_out_norm!r}; choose from {ATTN_OUT_NORMS}")
        check(cfg.attn_logits in ATTN_LOGITS, f"unknown attn_logits {cfg.attn_logits!r}; choose from {ATTN_LOGITS}")
        check(cfg.attn_logits == "softmax" or cfg.n_train >= 2,
              f"attn_logits={cfg.attn_logits} needs n_train >= 2 (the training sequence length in tokens)")
        check_model_shape(cfg.n_embd, cfg.n_head, cfg.pos == "rope")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.pos_head = nn.Linear(cfg.n_embd, cfg.pos_vocab, bias=False) if cfg.pos_vocab else None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def embed(self, idx, position_ids=None):
        """Token (+ learned position) embeddings (B, T, C) and the RoPE angles (or None), once per forward."""
        B, T = idx.shape
        if self.wpe is not None:  # an id past the table would index out of range: say so plainly. Only
            # where it is free: on a GPU, max() would wait for the device on every forward (scripts size
            # the table from their test lengths up front, and CUDA's own index check still fires)
            on_cpu = position_ids is None or (position_ids.device.type == "cpu" and not torch.compiler.is_compiling())
            top = (T - 1 if position_ids is None else int(position_ids.max())) if on_cpu else -1
            check(top < self.cfg.block_size, f"position id {top} is beyond the learned position table "
                  f"(block_size={self.cfg.block_size}); raise block_size or test shorter lengths")
        if position_ids is None:
            position_ids = torch.arange(T, device=idx.device).expand(B, T)  # (B, T)
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        rope = rope_angles(position_ids, self.cfg.n_embd // self.cfg.n_head, self.cfg.rope_base) \
            if self.cfg.pos == "rope" else None
        return x, rope

    def trunk(self, idx, position_ids=None, at=None, manual=False):
        """Final hidden states (B, T, C), or (B, P, C) at `at` if given. When only the positions `at`
        are read, the last block runs for those queries alone (its keys and values still come from
        every position): O(P T) attention there, and its MLP on P positions. manual=True runs every
        block through the explicit softmax (the reference path)."""
        x, rope = self.embed(idx, position_ids)
        for i, block in enumerate(self.blocks):
            if manual:
                x = block.forward_with_maps(x, rope)[0]
            elif at is not None and i == len(self.blocks) - 1:
                x = block.forward_at(x, rope, at)[0]
            else:
                x = block(x, rope)
        if at is not None and manual:
            x = gather_at(x, at)  # (B, P, C)
        return self.ln_f(x)

    def forward(self, idx, targets=None, position_ids=None, at=None, manual=False, pos_targets=None):
        """idx (B, T) -> (logits, loss). With at (B, P), logits only at those positions: (B, P, V)
        and targets (B, P); otherwise logits (B, T, V) and targets (B, T). Targets < 0 are ignored.
        With a position head (pos_vocab > 0) the loss adds the cross-entropy of pos_targets (the
        next token's position id); logits_and_ids() returns that head's logits."""
        x = self.trunk(idx, position_ids, at, manual)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        if self.pos_head is not None and pos_targets is not None:
            pos_logits = self.pos_head(x)
            pos_loss = F.cross_entropy(pos_logits.float().reshape(-1, pos_logits.size(-1)),
                                       pos_targets.reshape(-1), ignore_index=-1)
            loss = pos_loss if loss is None else loss + pos_loss
        return logits, loss

    @torch.no_grad()
    def logits_and_ids(self, idx, position_ids=None, at=None):
        """(token logits, position-id logits (.., pos_vocab)) of a model with a position head."""
        x = self.trunk(idx, position_ids, at)
        return self.lm_head(x), self.pos_head(x)

    @torch.no_grad()
    def probe(self, idx, at, position_ids=None):
        """Logits at `at` (B, P, V) and, per layer, a dict with the attention output at `at` before
        ('pre') and after ('post') the extra norm, (B, P, C), and the attention rows of those
        queries ('attn', (B, nh, P, T)). Runs the fast path: memory stays linear in T."""
        x, rope = self.embed(idx, position_ids)
        recs = []
        for i, block in enumerate(self.blocks):
            x, rec = (block.forward_at if i == len(self.blocks) - 1 else block.forward_probed)(x, rope, at)
            recs.append(rec)
        return self.lm_head(self.ln_f(x)), recs

    def new_caches(self, max_len):
        """One empty KVCache per block, for decode() of sequences up to max_len tokens."""
        return [KVCache(max_len) for _ in self.blocks]

    @torch.no_grad()
    def decode(self, idx, position_ids, caches):
        """Incremental (greedy or sampled) decoding with a key/value cache. caches: new_caches(T).
        idx (B, T) is the prompt while the caches are empty, then one new token (B, 1); position_ids
        (B, T) are its positions. Returns the logits for the token after the last one, (B, V), and
        with a position head the pair (token logits, position-id logits (B, pos_vocab)). O(T) per token."""
        x, rope = self.embed(idx, position_ids)
        for block, cache in zip(self.blocks, caches):
            x = block.decode(x, rope, cache)
        x = self.ln_f(x[:, -1])
        return self.lm_head(x) if self.pos_head is None else (self.lm_head(x), self.pos_head(x))

    @torch.no_grad()
    def attention_maps(self, idx, position_ids=None):
        """Full attention maps per layer, (B, nh, T, T) each, from the manual path (short inputs)."""
        x, rope = self.embed(idx, position_ids)
        maps = []
        for block in self.blocks:
            x, m = block.forward_with_maps(x, rope)
            maps.append(m)
        return maps


# =============================================================================================
# 2. Training
# =============================================================================================

def arg(default, help, **meta):
    """A dataclass field whose help text (and optional min / choices) becomes a CLI flag."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Training hyper-parameters. Experiment configs subclass this and add their own fields."""
    seeds: int = arg(3, "number of training seeds (0..seeds-1); each seed sets init and data", min=1)
    steps: int = arg(2000, "optimizer steps per run", min=1)
    batch_size: int = arg(64, "training batch size", min=1)
    lr: float = arg(1e-3, "peak learning rate (AdamW)", min=0)
    warmup: int = arg(100, "linear warmup steps", min=0)
    min_lr_frac: float = arg(0.1, "cosine decays to lr * min_lr_frac", min=0, max=1)
    weight_decay: float = arg(0.1, "AdamW weight decay on matrices", min=0)
    grad_clip: float = arg(1.0, "clip the global grad norm (0 = off)", min=0)
    eval_every: int = arg(0, "print a one-line eval every N steps (0 = off; shown with --jobs 1)", min=0)
    eval_examples: int = arg(1000, "test examples per length", min=1)


def lr_at(step, cfg: TrainConfig):
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


DTYPES = ("fp32", "bf16")
DEFAULT_PRECISION = {"dtype": "fp32", "tf32": False}  # what a cell that says nothing about precision runs
PRECISION = {"dtype": "fp32"}  # this process's setting, from its cell (set_precision); fp32 unless asked


def set_precision(dtype="fp32", tf32=False):
    """fp32 everywhere by default. dtype='bf16': bf16 autocast for training and the accuracy
    evaluation (CUDA only); probes and attention statistics stay fp32 whatever is asked. tf32:
    TensorFloat-32 matmuls on CUDA (10-bit mantissa), off unless asked."""
    PRECISION["dtype"] = dtype
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32


def autocast(device):
    """bf16 autocast when --dtype bf16 asked for it (CUDA only); otherwise float32."""
    if device.type == "cuda" and PRECISION["dtype"] == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def sample_length_range(rng, batch_size, sample, lo, hi):
    """A training batch of one length l ~ U[lo, hi], drawn per batch: sample(rng, batch_size, l).
    Bind sample, lo and hi with functools.partial to get a sampler for train()."""
    return sample(rng, batch_size, int(rng.integers(lo, hi + 1)))


def train(model, sample_batch, cfg: TrainConfig, device, data_seed, eval_fn=None,
          compile=False, progress=True, desc="train"):
    """Train `model` on batches from `sample_batch(rng, batch_size)`.

    Returns {'diverged', 'steps', 'final_loss', 'seconds', 'loss_curve'}. A non-finite loss or gradient
    stops the run and marks it diverged; the caller records it and goes on with the other runs."""
    model.to(device).train()
    rng = np.random.default_rng(data_seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    step_model = torch.compile(model) if compile else model  # eval always uses the eager model
    t0, curve, loss_val, diverged = time.time(), [], float("nan"), False
    pbar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False, mininterval=0.5)
    for step in pbar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        b = to_device(sample_batch(rng, cfg.batch_size), device)
        with autocast(device):
            _, loss = step_model(b["idx"], b["targets"], b.get("position_ids"), b.get("at"),
                                 pos_targets=b.get("pos_targets"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else 1e30)
        last = step == cfg.steps - 1
        if step % 10 == 0 or last:  # sync with the device only every 10 steps
            loss_val = loss.item()
            if not (math.isfinite(loss_val) and math.isfinite(gnorm.item())):
                diverged = True
                tqdm.write(f"{desc}: diverged at step {step} (loss {loss_val}); run stopped")
                break
            if step % max(1, cfg.steps // 50) == 0 or last:
                curve.append((step, round(loss_val, 5)))
            pbar.set_postfix(loss=f"{loss_val:.4f}")
            report_progress((step + 1) / cfg.steps)
        opt.step()
        if eval_fn is not None and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last) and progress:
            msg = ", ".join(f"{k} {v:.3f}" for k, v in eval_fn(model).items())
            tqdm.write(f"{desc} step {step + 1}: loss {loss_val:.4f}, {msg}")
            model.train()
    return {"diverged": diverged, "steps": step + 1, "final_loss": loss_val,
            "seconds": round(time.time() - t0, 2), "loss_curve": curve}


# =============================================================================================
# 3. Evaluation by length
# =============================================================================================

def eval_batches(sample_batch, length, n, seed=EVAL_SEED, tokens_per_batch=2**16):
    """Yield batches totalling n examples of one length, from a generator seeded by (seed, length)
    only: every variant and training seed sees the same test set. Batches shrink as length grows.
    A sampler that sampler_key() can name is drawn once per process and its batches are reused by
    every later cell (they are shared: do not modify them in place)."""
    key = sampler_key(sample_batch)
    if key is None:
        yield from draw_test_set(sample_batch, length, n, seed, tokens_per_batch)
        return
    key = (key, length, n, seed, tokens_per_batch)
    if key not in TEST_SETS:
        TEST_SETS[key] = list(draw_test_set(sample_batch, length, n, seed, tokens_per_batch))
        while len(TEST_SETS) > 1 and sum(map(test_set_bytes, TEST_SETS.values())) > TEST_SET_CACHE_BYTES:
            TEST_SETS.popitem(last=False)  # the oldest first
    yield from TEST_SETS[key]


def draw_test_set(sample_batch, length, n, seed, tokens_per_batch):
    rng = np.random.default_rng([seed, length])
    bs = max(1, min(512, tokens_per_batch // length))
    for start in range(0, n, bs):
        yield sample_batch(rng, min(bs, n - start), length)


TEST_SETS = OrderedDict()  # (sampler key, length, n, seed, tokens per batch) -> [batch, ...] on the CPU
TEST_SET_CACHE_BYTES = 2**30


def test_set_bytes(batches):
    return sum(v.numel() * v.element_size() for b in batches for v in b.values() if torch.is_tensor(v))


def sampler_key(fn):
    """A hashable name of what a sampler draws, or None where it has none. Module-level functions are
    named by module and qualified name; a functools.partial by its function and arguments (partials
    nest). Lambdas and closures have no name: their test sets are drawn again for every use."""
    if isinstance(fn, functools.partial):
        args = (fn.func,) + fn.args + tuple(v for _, v in sorted(fn.keywords.items()))
        parts = tuple(sampler_key(a) if callable(a) else a for a in args)
        if any(callable(a) and p is None for a, p in zip(args, parts)):
            return None  # a lambda inside
        key = ("partial", tuple(sorted(fn.keywords))) + parts
        try:
            hash(key)
        except TypeError:  # an array or a list among the arguments
            return None
        return key
    qualname = getattr(fn, "__qualname__", "<")
    return None if "<" in qualname else (fn.__module__, qualname)  # '<lambda>', '<locals>'


def accuracy_at(model, batch):
    """Per-example score for tasks that read answers at batch['at']: all answers right -> 1."""
    logits, _ = model(batch["idx"], position_ids=batch.get("position_ids"), at=batch["at"])
    hit = (logits.argmax(-1) == batch["targets"]) | (batch["targets"] < 0)  # (B, P)
    return {"accuracy": hit.all(-1).float()}


@torch.no_grad()
def evaluate_by_length(model, sample_batch, lengths, n, device, score=accuracy_at, seed=EVAL_SEED,
                       tokens_per_batch=2**16):
    """Tidy rows [{length, <metric>: mean over n examples, ..., n}] with score(model, batch) giving
    per-example values (B,). Runs the eager fast path (never compiled: lengths vary)."""
    model.eval()
    rows = []
    for length in lengths:
        sums = defaultdict(list)  # per-batch sums stay on the device: one sync per length, not per batch
        for b in eval_batches(sample_batch, length, n, seed, tokens_per_batch):
            with autocast(device):
                out = score(model, to_device(b, device))
            for k, v in out.items():
                sums[k].append(v.float().sum())
        rows.append({"length": length, **mean_of_sums(sums, n), "n": n})
    model.train()
    return rows


def mean_of_sums(sums, n):
    """{metric: mean over n examples} from per-batch sums (device tensors), added in float64 in batch
    order, as Python floats."""
    return {k: sum(torch.stack(v).tolist()) / n for k, v in sums.items()}


def probe_stats(v):
    """v: (n, C) attention outputs of n samples at one position. The paper's quantities:
    per-component std across samples (mean over components, and component 0 alone), and the
    per-vector ('global') mean and variance over components, averaged over samples."""
    v = v.double()
    return {"comp_std": float(v.std(0).mean()), "comp_std0": float(v[:, 0].std()),
            "vec_mean": float(v.mean(1).mean()), "vec_var": float(v.var(1, unbiased=False).mean())}


@torch.no_grad()
def evaluate_with_probes(model, sample_batch, lengths, n, device, extra=None, keep=(), seed=EVAL_SEED,
                         tokens_per_batch=2**16):
    """One fast-path pass per length that scores the answer at the last `at` position and probes the
    attention output there (the query), per layer, before ('pre') and after ('post') the extra norm.
    Always in float32, whatever --dtype says: these are the paper's own quantities.

    Returns (rows, probe_rows, kept):
      rows        [{length, accuracy, <extra metrics>, n}]; extra(batch, logits, recs) gives more
                  per-example metrics, e.g. the attention mass on the right item;
      probe_rows  [{length, layer, where, comp_std, comp_std0, vec_mean, vec_var, entropy, eff_n, n}],
                  entropy H of the query's attention (mean over heads and samples), eff_n = exp(H);
      kept        {(length, layer, where): (n, C) array} of the raw vectors for lengths in `keep`.
    Memory is linear in the length: nothing T x T is built."""
    model.eval()
    rows, probe_rows, kept = [], [], {}
    for length in lengths:
        sums, vecs, ent = defaultdict(list), defaultdict(list), defaultdict(list)
        for b in eval_batches(sample_batch, length, n, seed, tokens_per_batch):
            b = to_device(b, device)
            logits, recs = model.probe(b["idx"], b["at"][:, -1:], b.get("position_ids"))  # always fp32
            metrics = {"accuracy": (logits[:, 0].argmax(-1) == b["targets"][:, -1]).float()}
            metrics.update(extra(b, logits, recs) if extra else {})
            for k, v in metrics.items():
                sums[k].append(v.float().sum())
            for layer, r in enumerate(recs):
                for where in ("pre", "post"):
                    vecs[layer, where].append(r[where][:, 0])  # kept on the device until the length is done
                p = r["attn"][:, :, 0]  # (B, nh, T): the query's attention weights
                ent[layer].append(-(p * p.clamp_min(1e-30).log()).sum(-1))  # (B, nh)
        rows.append({"length": length, **mean_of_sums(sums, n), "n": n})
        for (layer, where), vs in vecs.items():
            v, h = torch.cat(vs).cpu(), torch.cat(ent[layer]).cpu()
            probe_rows.append({"length": length, "layer": layer, "where": where, **probe_stats(v),
                               "entropy": float(h.mean()), "eff_n": float(h.exp().mean()), "n": n})
            if length in keep:
                kept[length, layer, where] = v.numpy()
    model.train()
    return rows, probe_rows, kept


# =============================================================================================
# 4. Sweeps: cells in parallel processes, shards, atomic results, resume
# =============================================================================================

def make_cells(cfg, device, precision=None, sweep_fields=("seeds", "variants"), **axes):
    """One cell per combination of the axes, e.g. make_cells(cfg, dev, variant=cfg.variants,
    seed=range(cfg.seeds)). A cell's config leaves out the fields that only list the axes, so adding a
    seed or a variant later reuses every cell already done. precision: {'dtype', 'tf32'} from
    setup_run; a cell records them only where they differ from fp32 / TF32 off."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in sweep_fields}
    prec = {k: v for k, v in (precision or {}).items() if v != DEFAULT_PRECISION[k]}
    return [{**dict(zip(axes, combo)), "device": device.type, **prec, "config": config}
            for combo in itertools.product(*axes.values())]


def cell_key(cell):
    return hashlib.sha1(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:16]


def atomic_write(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new, never half
    except OSError as e:  # a full disk: no half-written temp file left behind, and say where
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e
    except BaseException:  # Ctrl-C, an error in a worker
        tmp.unlink(missing_ok=True)
        raise


def _run_and_save(run_cell, cell_dir, cell):
    t0 = time.time()
    report_progress(0.0)
    out = run_cell(cell)
    ids = {k: v for k, v in cell.items() if k != "config"}
    rows = [{**ids, **r} for r in out.pop("rows", [])]
    record = {"cell": cell, "status": out.pop("status", "ok"), "rows": rows,
              "seconds": round(time.time() - t0, 2), **out}
    atomic_write(Path(cell_dir) / f"{cell_key(cell)}.json", json.dumps(record))
    report_progress(0.0)  # before the parent hears of it: the bar never counts a cell twice
    return record


def cell_device(cell):
    """The torch device a cell runs on, with its precision set (set_precision). On CUDA, each --jobs
    worker process was given one GPU (round robin over cuda:0..n-1); the cell just says 'cuda'."""
    set_precision(**{k: cell.get(k, v) for k, v in DEFAULT_PRECISION.items()})
    return torch.device(cell["device"])


def is_main_process():
    """True in the process the user started (show progress bars), False in --jobs worker processes."""
    return mp.current_process().name == "MainProcess"


PROGRESS = {"shared": None, "slot": 0, "parent": None}  # in a --jobs worker: its slot in the parent's array


def report_progress(fraction):
    """Tell the parent's progress bar how far this worker's current cell has trained (0..1). A worker
    whose parent was killed (kill -9) stops here instead of training on for nobody."""
    if PROGRESS["shared"] is not None:
        if os.getppid() != PROGRESS["parent"]:
            os._exit(1)
        PROGRESS["shared"][PROGRESS["slot"]] = fraction


def _worker_init(threads, shared, on_cuda):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    tqdm.set_lock(threading.RLock())  # workers draw no bars: no multiprocessing lock a kill would leak
    torch.set_num_threads(threads)
    worker = mp.current_process()._identity[0] - 1  # 0, 1, 2, ... within this pool
    PROGRESS.update(shared=shared, slot=worker % len(shared), parent=os.getppid())
    if on_cuda:  # several workers per GPU, spread round robin over the GPUs
        torch.cuda.set_device(worker % torch.cuda.device_count())


def run_sweep(cells, run_cell, out_dir, jobs=1, shard=(0, 1), fresh=False):
    """Run `run_cell(cell) -> {'rows': [...], 'status': 'ok'|'diverged', ...}` for every cell of
    this shard (cells i with i % N == I), `jobs` at a time in separate processes. Each finished cell
    is written at once to out_dir/cells/<key>.json; cells already there are skipped unless fresh.
    A cell is a JSON-able dict: ids (variant, seed, ...) are copied into its rows; 'config' is not."""
    cell_dir = Path(out_dir) / "cells"
    cell_dir.mkdir(parents=True, exist_ok=True)
    i, n = shard
    mine = [c for j, c in enumerate(cells) if j % n == i]
    todo = [c for c in mine if fresh or not (cell_dir / f"{cell_key(c)}.json").exists()]
    print(f"sweep: {len(cells)} cells, {len(mine)} in shard {i}/{n}, {len(mine) - len(todo)} already "
          f"done, running {len(todo)} with {jobs} job(s)")
    bar = tqdm(total=len(todo), desc="cells", disable=len(todo) < 2,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} [{elapsed}<{remaining}]")
    try:
        if jobs == 1 or len(todo) < 2:
            for c in todo:  # the cell's own training bar shows its steps
                _run_and_save(run_cell, cell_dir, c)
                bar.update()
        else:
            _run_in_pool(run_cell, cell_dir, todo, jobs, bar)
    finally:  # closed now, so that an error or 'interrupted' line is the last thing printed
        bar.close()
    return load_cells(out_dir, keys=[cell_key(c) for c in cells])


def _run_in_pool(run_cell, cell_dir, todo, jobs, bar):
    """Cells in `jobs` spawned processes (safe with CUDA and threads; each worker single-threaded).
    The bar moves from the first seconds: finished cells plus the trained fraction of those in flight,
    which the workers write to a shared array (report_progress)."""
    ctx = mp.get_context("spawn")
    shared = ctx.RawArray("d", jobs)  # no lock, no semaphore: each worker writes its own slot
    on_cuda = any(c.get("device") == "cuda" for c in todo)  # a CPU run never touches a GPU it may have
    pool = ctx.Pool(jobs, initializer=_worker_init, initargs=(1, shared, on_cuda))
    try:
        results, done = pool.imap_unordered(_Runner(run_cell, cell_dir), todo), 0
        while done < len(todo):
            try:
                results.next(timeout=0.5)
                done += 1
            except mp.TimeoutError:
                pass
            bar.n = done + sum(shared[:])
            bar.refresh()
    except BaseException:  # Ctrl-C or an error in a cell: stop the other workers now
        pool.terminate()
        pool.join()
        raise
    pool.close()
    pool.join()


class _Runner:  # a picklable partial(_run_and_save, run_cell, cell_dir)
    def __init__(self, run_cell, cell_dir):
        self.run_cell, self.cell_dir = run_cell, cell_dir

    def __call__(self, cell):
        return _run_and_save(self.run_cell, self.cell_dir, cell)


# =============================================================================================
# 5. Results
# =============================================================================================

def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read results file {path}: {e}; delete it and re-run") from None


def load_cells(out_dir, keys=None):
    """Finished cell records under out_dir/cells (only `keys` if given), in a stable order."""
    cell_dir = Path(out_dir) / "cells"
    paths = sorted(cell_dir.glob("*.json")) if keys is None else \
        [cell_dir / f"{k}.json" for k in keys if (cell_dir / f"{k}.json").exists()]
    recs = [_read_json(p) for p in paths]
    for r in recs:
        check(isinstance(r, dict) and {"cell", "rows", "status"} <= r.keys(),
              f"corrupt results file under {cell_dir}: missing fields; delete it and re-run")
    return recs


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device, precision):
    """What results.json records of the machine: versions, device (GPU names), dtype and TF32."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "device": str(device), "dtype": precision["dtype"], "tf32": precision["tf32"],
           "cuda": torch.version.cuda, "git_commit": git_commit(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


def script_of(config_cls):
    """The script that defines an experiment config class: a results folder is tied to it."""
    return Path(sys.modules[config_cls.__module__].__file__).stem


def write_results(out_dir, records, cfg, env):
    """results.json (the script, config, environment, per-cell status, tidy rows) and results.csv
    (the rows). cfg: the experiment's config dataclass."""
    out_dir = Path(out_dir)
    rows = [r for rec in records for r in rec["rows"]]
    cells = [{**{k: v for k, v in rec["cell"].items() if k != "config"}, "status": rec["status"],
              "seconds": rec.get("seconds"), **({"train": rec["train"]} if "train" in rec else {})}
             for rec in records]
    atomic_write(out_dir / "results.json", json.dumps(
        {"script": script_of(type(cfg)), "config": dataclasses.asdict(cfg), "environment": env, "cells": cells,
         "rows": rows}, indent=1))
    cols = list(dict.fromkeys(k for r in rows for k in r))
    tmp = out_dir / ".results.csv.tmp"
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, out_dir / "results.csv")
    finally:
        tmp.unlink(missing_ok=True)
    return rows


def load_results(out_dir):
    """Cell records for --plot-only: merged from cells/ (all shards), else rebuilt from results.json
    (its cells, each with its rows; without the extras that only cell files keep, such as maps)."""
    out_dir = Path(out_dir)
    check(out_dir.exists(), f"--plot-only: no such directory {out_dir}")
    check(out_dir.is_dir(), f"--plot-only: {out_dir} is a file, not a results directory")
    if (out_dir / "cells").is_dir():
        recs = load_cells(out_dir)
        if recs:
            return recs
    check((out_dir / "results.json").exists(), f"--plot-only: no results in {out_dir} (no cells/, no results.json)")
    res = _read_json(out_dir / "results.json")
    check(isinstance(res, dict) and {"rows", "cells", "config"} <= res.keys(),
          f"corrupt results file {out_dir / 'results.json'}: missing fields")
    recs = []
    for c in res["cells"]:
        ids = {k: v for k, v in c.items() if k not in ("status", "seconds", "train")}
        recs.append({"cell": {**ids, "config": res["config"]}, "status": c["status"], "script": res.get("script"),
                     "rows": [r for r in res["rows"] if all(r.get(k) == v for k, v in ids.items())]})
    return recs


def saved_run(out_dir, config_cls, fallback, mixed=False):
    """(records, config) of a saved run, for --plot-only: plots use the config the results came from.
    Refuses results that another script wrote (their config has fields this script does not know).
    Where cells of several configs of this script share the folder, the newest config's are shown,
    unless mixed (a run whose cells each have a config of their own): then all, with the first's config."""
    recs, script = load_results(out_dir), script_of(config_cls)
    names = {f.name for f in fields(config_cls)}
    mine = [r for r in recs if set(r["cell"].get("config", {})) <= names and r.get("script") in (None, script)]
    check(mine, f"--plot-only: {out_dir} holds no results of {script}.py" +
          (" (they were written by another script)" if recs else ""))
    if len(mine) < len(recs):
        print(f"note: {len(recs) - len(mine)} result(s) in {out_dir} come from another script; ignored")
    config = lambda r: json.dumps(r["cell"]["config"], sort_keys=True)
    if len({config(r) for r in mine}) > 1 and not mixed:  # cells keep their files: the newest file's config wins
        mtime = lambda r: (Path(out_dir) / "cells" / f"{cell_key(r['cell'])}.json").stat().st_mtime
        newest = config(max(mine, key=mtime))
        kept = [r for r in mine if config(r) == newest]
        print(f"note: {len(mine) - len(kept)} cell(s) in {out_dir} come from another config; ignored")
        mine = kept
    return mine, config_cls(**mine[0]["cell"]["config"])


def select(rows, **eq):
    return [r for r in rows if all(r.get(k) == v for k, v in eq.items())]


def mean_std_by(rows, x, y, group):
    """{group value: (xs, mean, std, n_seeds)} of y over seeds at each x; `group` is a key or a tuple."""
    gkey = (lambda r: tuple(r.get(g) for g in group)) if isinstance(group, tuple) else (lambda r: r.get(group))
    acc = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get(y) is not None and not (isinstance(r[y], float) and math.isnan(r[y])):
            acc[gkey(r)][r[x]].append(float(r[y]))
    out = {}
    for g, byx in acc.items():
        xs = sorted(byx)
        out[g] = (np.array(xs), np.array([np.mean(byx[v]) for v in xs]),
                  np.array([np.std(byx[v]) for v in xs]), np.array([len(byx[v]) for v in xs]))
    return out


def summarize(records, metric, train_len, group="variant", say=print):
    """Print (with `say`) per group: in-distribution (length <= train_len) and out-of-distribution
    mean ± std over seeds (each seed first averaged over its lengths), and how many seeds diverged.
    Returns the table."""
    table = {}
    runs = defaultdict(lambda: {"id": [], "ood": [], "diverged": 0})
    for rec in records:
        if not rec["rows"] and rec["status"] != "diverged":
            continue
        g = rec["cell"].get(group, rec["rows"][0].get(group) if rec["rows"] else None)
        if rec["status"] == "diverged":
            runs[g]["diverged"] += 1
            continue
        vals = [(r["length"], r[metric]) for r in rec["rows"] if metric in r]
        for part, keep in (("id", lambda L: L <= train_len), ("ood", lambda L: L > train_len)):
            sel = [v for L, v in vals if keep(L)]
            if sel:
                runs[g][part].append(float(np.mean(sel)))
    say(f"\n{metric}: in-distribution (length <= {train_len}) vs out-of-distribution, mean ± std over seeds")
    w = max([16] + [len(str(g)) for g in runs])
    say(f"  {group:<{w}} {'ID':>15} {'OOD':>15}  seeds")
    for g, r in runs.items():
        fmt = lambda v: f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "n/a"
        table[g] = {"id_mean": float(np.mean(r["id"])) if r["id"] else None,
                    "id_std": float(np.std(r["id"])) if r["id"] else None,
                    "ood_mean": float(np.mean(r["ood"])) if r["ood"] else None,
                    "ood_std": float(np.std(r["ood"])) if r["ood"] else None,
                    "seeds": len(r["id"] or r["ood"]), "diverged": r["diverged"]}
        div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
        say(f"  {str(g):<{w}} {fmt(r['id']):>15} {fmt(r['ood']):>15}  {len(r['id'] or r['ood'])}{div}")
    return table


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}  # Student t, two-sided 95%


def t_half_width(values):
    """Half-width of the 95% t-interval of the mean of `values` (nan with fewer than two)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float("nan")
    return T975[max(k for k in T975 if k <= len(v) - 1)] * v.std(ddof=1) / math.sqrt(len(v))


def paired_diff_ci(rows, metric, a, b, by="variant", x="length"):
    """Per x: mean over seeds of metric(a) - metric(b), paired by seed on identical test sets, with a
    95% t-interval over seeds. Returns [{x, diff, lo, hi, n}] (lo = hi = nan with one seed)."""
    val = {(r[by], r["seed"], r[x]): r[metric] for r in rows if metric in r}
    out = []
    for xv in sorted({k[2] for k in val}):
        d = np.array([val[a, s, xv] - val[b, s, xv] for (v, s, xx) in val if v == a and xx == xv and (b, s, xv) in val])
        if len(d) == 0:
            continue
        half = t_half_width(d)
        out.append({x: xv, "diff": float(d.mean()), "lo": float(d.mean() - half), "hi": float(d.mean() + half),
                    "n": len(d)})
    return out


def diff_text(d):
    """A paired_diff_ci() row as printed: '+0.65 [+0.35, +0.94]'."""
    return f"{d['diff']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"


def wilson_ci(k, n, z=1.96):
    """95% Wilson score interval (lo, hi) of a fraction k / n (sound at k = 0 or k = n, unlike k/n ± 2 se)."""
    if n == 0:
        return float("nan"), float("nan")
    p, z2 = k / n, z * z
    mid, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, mid - half), min(1.0, mid + half)


def seed_stats(values):
    """{mean, std, median, n} of one number per seed."""
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)), "n": len(v)} if len(v) \
        else {"mean": float("nan"), "std": float("nan"), "median": float("nan"), "n": 0}


def per_seed(rows, metric, **eq):
    """{seed: metric} of the rows matching eq (one row per seed expected)."""
    return {r["seed"]: r[metric] for r in select(rows, **eq) if metric in r}


# =============================================================================================
# 6. Plots
# =============================================================================================

class Summary:
    """The printed summary of a report: say(line) prints it and keeps it for summary.txt."""

    def __init__(self):
        self.lines = []

    def __call__(self, line=""):
        print(line)
        self.lines.append(line)

    def write(self, out):
        (Path(out) / "summary.txt").write_text("\n".join(self.lines) + "\n")
        print(f"\nfigures and summary.txt in {out}")


def cell_label(cell):
    """'task=lookup variant=none seed=2': a cell's ids, for messages."""
    return " ".join(f"{k}={v}" for k, v in cell.items() if k not in ("config", "device", "compile", "dtype", "tf32"))


def training_report(records, out, say):
    """training.png (every cell's loss curve; diverged cells in red, ending in an x) and, in the
    summary, which cells diverged and the likely cause. Returns False when no cell finished training
    (the caller then has nothing else to draw)."""
    bad = [r for r in records if r["status"] == "diverged"]
    if bad:
        lrs = sorted({r["cell"].get("config", {}).get("lr") for r in bad} - {None})
        say(f"\n{len(bad)} of {len(records)} cell(s) diverged (a non-finite loss or gradient stopped training; "
            f"they have no test rows): " + "; ".join(cell_label(r["cell"]) for r in bad[:8]) +
            (f"; and {len(bad) - 8} more" if len(bad) > 8 else ""))
        say(f"  the usual cause is a learning rate too high for the model (here --lr {', '.join(map(str, lrs))}): "
            "try a smaller --lr, a longer --warmup, or --grad-clip 1")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in records:
        curve = np.array(r.get("train", {}).get("loss_curve") or [], dtype=float).reshape(-1, 2)
        if len(curve):
            ok = r["status"] != "diverged"
            ax.plot(curve[:, 0], curve[:, 1], color="C0" if ok else "red", alpha=0.35 if ok else 0.9, lw=1)
            if not ok:
                ax.plot(curve[-1, 0], curve[-1, 1], "x", color="red", ms=8)
    ax.plot([], [], color="C0", label=f"finished ({len(records) - len(bad)} cells)")
    ax.plot([], [], color="red", marker="x", label=f"diverged ({len(bad)} cells)")
    ax.set(xlabel="training step", ylabel="training loss", title="training loss of every cell")
    if ax.get_lines() and any(len(line.get_xdata()) for line in ax.get_lines()):
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(out) / "training.png", dpi=110)
    plt.close(fig)
    if len(bad) == len(records):
        say("no cell finished training: no accuracy or variance figures (training.png shows the losses)")
    return len(bad) < len(records)


def ticks_at(ax, xs):
    """Label a log-scaled x axis at the values themselves (e.g. the test lengths)."""
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()


def save_figure(fig, path):
    """tight_layout, save as PNG and close."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


METRIC_LABELS = {  # axis labels for the metrics of the tidy rows
    "accuracy": "accuracy", "exact": "exact match", "comp_std": "std of a component across samples",
    "vec_mean": "per-vector mean", "vec_var": "per-vector variance", "entropy": "attention entropy H",
    "eff_n": "effective number of attended tokens exp(H)", "target_mass": "attention mass on the answer",
    "token_acc": "per-token accuracy", "id_acc": "position-id accuracy"}
THEORY_STYLES = [("black", ":"), ("tab:purple", "-."), ("tab:brown", (0, (1, 3))), ("tab:olive", (0, (3, 1, 1, 1)))]


def plot_vs_length(rows, metric, path, train_len, group="variant", chance=None, logy=False, title=None,
                   ylabel=None, extra=(), ax=None, style=None):
    """metric vs test length (log2 x), one line per group with a mean ± std band over seeds, a
    dashed line at the largest training length, an optional chance line and extra (x, y, label)
    curves (e.g. theory, each its own colour and dash). style(group) -> {color, ls, label} keeps a
    variant's colour the same in every figure of a script. The legend sits outside the axes, clear
    of the data. Saves to path unless an axis is given."""
    plt = pyplot()
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(7.5, 4))
    for g, (xs, m, s, n) in sorted(mean_std_by(rows, "length", metric, group).items(), key=lambda t: str(t[0])):
        st = dict(style(g)) if style else {}
        label = st.pop("label", " ".join(map(str, g)) if isinstance(g, tuple) else str(g))
        line, = ax.plot(xs, m, marker="o", ms=3, label=f"{label} (n={n.min()})", **st)
        lo, hi = (np.maximum(m - s, m * 0.05), m + s) if logy else (m - s, m + s)
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
    for (x, y, label), (color, ls) in zip(extra, THEORY_STYLES):
        ax.plot(x, y, color=color, ls=ls, lw=1.4, label=label)
    ax.axvline(train_len, color="gray", ls="--", lw=1, label=f"max train length {train_len}")
    if chance is not None:
        ax.axhline(chance, color="red", ls=":", lw=1, label=f"chance {chance:g}")
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("test length")
    ax.set_ylabel(ylabel or METRIC_LABELS.get(metric, metric))
    ax.set_title(title or f"{METRIC_LABELS.get(metric, metric)} vs length (mean ± std over seeds)", fontsize=10)
    legend_outside(ax)
    ax.grid(alpha=0.3)
    if own:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


class Palette:
    """One colour per group value (variant, format, ...), fixed for a whole report: pass it as the
    style of every plot, or read .colors, so that a variant keeps its colour in every figure."""

    def __init__(self, groups):
        names = sorted(set(groups), key=str)
        cmap = "tab10" if len(names) <= 10 else "tab20"
        self.colors = {g: pyplot().get_cmap(cmap)(i % 20) for i, g in enumerate(names)}

    def __call__(self, group):
        return {"color": self.colors.get(group)}


def legend_outside(ax):
    """The legend to the right of the axes, where it cannot cover data."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)


def plot_attention_maps(maps, path, titles, suptitle="", train_len=None):
    """Heatmaps of 2-D attention maps (queries x keys), one panel each; a dashed line at train_len."""
    plt = pyplot()
    cols = min(4, len(maps))
    rows = math.ceil(len(maps) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3 * rows), squeeze=False)
    for ax, m, t in zip(axes.flat, maps, titles):
        ax.imshow(np.asarray(m), aspect="auto", cmap="viridis", interpolation="nearest")
        if train_len is not None:
            ax.axvline(train_len - 0.5, color="w", ls="--", lw=1)
            ax.axhline(train_len - 0.5, color="w", ls="--", lw=1)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    for ax in list(axes.flat)[len(maps):]:
        ax.axis("off")
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# =============================================================================================
# 7. The CLI: config dataclass -> flags, presets, device, errors as one line
# =============================================================================================

def _parse_value(kind, elem, s):
    if kind is bool:
        check(s.lower() in ("1", "0", "true", "false", "yes", "no"), f"expected true/false, got {s!r}")
        return s.lower() in ("1", "true", "yes")
    if kind is tuple:
        return tuple(elem(x) for x in s.split(",") if x.strip())
    return kind(s)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one 'error: ...' line (exit 2), like every other bad input."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")


TYPE_NAMES = {int: "integer", float: "number", str: "string", bool: "true/false"}


def flag_type(kind, elem):
    """The argparse type of a config field, named for argparse's message ('invalid integer value')."""
    def parse(s):
        return _parse_value(kind, elem, s)
    parse.__name__ = f"comma-separated {TYPE_NAMES[elem]}" if kind is tuple else TYPE_NAMES[kind]
    return parse


def make_parser(description, config_cls, presets):
    p = OneLineParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="quick", choices=list(presets),
                   help="smoke: seconds (tests); quick: minutes on a laptop CPU; paper: paper scale, for a GPU")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--out", default="out/<script>/<preset>", help="output directory")
    p.add_argument("--dtype", default="fp32", choices=DTYPES,
                   help="fp32 everywhere, or bf16 autocast for training and accuracy (CUDA only; probes stay fp32)")
    p.add_argument("--tf32", action="store_true", help="allow TensorFloat-32 matmuls on CUDA (off by default)")
    p.add_argument("--jobs", type=int, default=0,
                   help=f"cells run in parallel processes (0 = one per CPU core on CPU; on CUDA "
                        f"{JOBS_PER_GPU} per GPU, at most one per CPU core)")
    p.add_argument("--shard", default="0/1", help="I/N: run only cells i with i %% N == I (cluster job arrays)")
    p.add_argument("--fresh", action="store_true", help="recompute cells that already have results")
    p.add_argument("--plot-only", metavar="DIR", default=None, help="redraw figures and summary from DIR; no training")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (never the eval)")
    g = p.add_argument_group("experiment config (the default in brackets, then what each preset sets)")
    for f in fields(config_cls):
        d = getattr(config_cls(), f.name)
        kind = type(d) if not isinstance(d, (list, tuple)) else tuple
        elem = type(d[0]) if kind is tuple and d else str
        fmt = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
        shown = "; ".join([fmt(d)] + [f"{name}: {fmt(v[f.name])}" for name, v in presets.items() if f.name in v])
        choices = f" {{{','.join(f.metadata['choices'])}}}" if "choices" in f.metadata else ""
        g.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                       metavar=kind.__name__.upper() if kind is not tuple else "A,B,...",
                       type=flag_type(kind, elem),
                       help=f.metadata.get("help", "") + choices + f" [{shown}]".replace("%", "%%"))
    return p


def parse_config(args, config_cls, presets):
    """Class defaults <- preset <- flags given on the command line; then every field is checked."""
    given = {f.name: getattr(args, f.name) for f in fields(config_cls) if getattr(args, f.name, None) is not None}
    cfg = replace(replace(config_cls(), **presets[args.preset]), **given)
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        vals = v if isinstance(v, tuple) else (v,)
        flag = "--" + f.name.replace("_", "-")
        check(len(vals) > 0, f"{flag} needs at least one value")
        check(all(math.isfinite(x) for x in vals if isinstance(x, float)), f"{flag} must be a finite number, got {v}")
        if "min" in f.metadata:
            check(all(x >= f.metadata["min"] for x in vals), f"{flag} must be >= {f.metadata['min']}, got {v}")
        if "max" in f.metadata:
            check(all(x <= f.metadata["max"] for x in vals), f"{flag} must be <= {f.metadata['max']}, got {v}")
        if "choices" in f.metadata:
            bad = [x for x in vals if x not in f.metadata["choices"]]
            if bad:
                raise UsageError(f"{flag}: unknown {bad[0]!r}; choose from {', '.join(f.metadata['choices'])}")
    return cfg


def pick_device(name="auto", dtype="fp32", tf32=False):
    """(torch.device, precision {'dtype', 'tf32'}), printing the choice and the reason."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
        why = "auto-detected"
    else:
        why = "requested"
    check(name != "cuda" or torch.cuda.is_available(), "--device cuda requested but CUDA is not available here")
    check(name != "mps" or has_mps, "--device mps requested but MPS is not available here")
    check(dtype == "fp32" or (name == "cuda" and torch.cuda.is_bf16_supported()),
          f"--dtype {dtype} needs a CUDA GPU with bf16; this run is on {name}")
    check(not tf32 or name == "cuda", "--tf32 applies to CUDA only")
    device = torch.device(name)
    what = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) \
        if name == "cuda" else platform.processor() or name
    shown = {"fp32": "float32", "bf16": "bfloat16 autocast (probes in float32)"}[dtype]
    shown += f", TF32 {'on' if tf32 else 'off'}" if name == "cuda" else ""
    print(f"device: {name} ({what}, {why}); dtype: {shown}")
    set_precision(dtype, tf32)
    return device, {"dtype": dtype, "tf32": tf32}


def parse_shard(s):
    try:
        i, n = (int(x) for x in s.split("/"))
    except ValueError:
        raise UsageError(f"--shard must look like I/N (e.g. 0/4), got {s!r}") from None
    check(n >= 1 and 0 <= i < n, f"--shard I/N needs 0 <= I < N, got {s!r}")
    return i, n


def default_jobs(device):
    """One cell process per CPU core on CPU. On CUDA several per GPU: each step of these small models
    is a few hundred tiny kernels, so one process leaves a GPU mostly idle (bench.py measures it)."""
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(cores, JOBS_PER_GPU * torch.cuda.device_count()))
    return cores if device.type == "cpu" else 1


def setup_run(args, script):
    """Resolve --device, --dtype, --jobs, --shard, --out and the CPU thread count for a run."""
    check(args.jobs >= 0, f"--jobs must be >= 0, got {args.jobs}")
    device, precision = pick_device(args.device, args.dtype, args.tf32)
    jobs = args.jobs or default_jobs(device)
    # Tiny models on CPU: one thread per process beats PyTorch's default team of threads (see
    # bench.py); with several jobs each worker process is single-threaded anyway.
    torch.set_num_threads(1)
    shard = parse_shard(args.shard)
    out = Path(args.out.replace("<script>", script).replace("<preset>", args.preset))
    prepare_out(out)
    return device, precision, jobs, shard, out


def prepare_out(out):
    """Check before any training that results can be written under `out`: a directory, writable."""
    check(not out.exists() or out.is_dir(), f"--out {out} is a file, not a directory")
    try:
        (out / "cells").mkdir(parents=True, exist_ok=True)
        probe = out / "cells" / f".write-test.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {out} is not writable: {e.strerror or e}") from None


def cli_main(fn):
    """Run fn(); bad input -> one 'error: ...' line and exit 2; a file-system fault (a full disk, a
    directory that turned read-only) -> one line and exit 3; Ctrl-C -> exit 130. Finished cells are
    kept in every case: re-running the same command resumes."""
    try:
        fn()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; finished cells are kept: re-run the same command to resume "
              "once this is fixed", file=sys.stderr)
        sys.exit(EXIT_IO)
    except KeyboardInterrupt:
        print("\ninterrupted: finished cells are saved; re-run the same command to resume", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)

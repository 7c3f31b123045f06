"""common.py: the transformer, its training loop and its evaluation, read top to bottom.

  1. the model    a pre-LN GPT (NoPE, learned or RoPE positions, explicit position ids, an optional norm
                  on the attention output). Attention runs three ways: fused; explicit rows for chosen
                  queries (answers, probes, and with every query the full maps); decoding with a KVCache.
  2. training     TrainConfig and train(): AdamW, warmup + cosine, gradient clipping; raises Diverged.
  3. evaluation   fixed test sets, evaluate_by_length(), evaluate_with_probes(): tidy rows.

A task is a pure function `sample_batch(rng, batch_size, length) -> dict` of CPU tensors, driven by an
explicit np.random.Generator: idx (B, T) token ids, targets (B, P) labels (-1 = ignored) at the positions
`at` (B, P) (without `at`, targets are (B, T)), and optional position_ids (B, T), default 0..T-1.

Read next: one paper's script. harness.py (sweeps, files), cli.py (flags), faults.py and reporting.py (statistics, figures)
are machinery that no result depends on.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import time
from collections import OrderedDict, defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

POS_ENCODINGS = ("none", "learned", "rope")
ATTN_OUT_NORMS = ("none", "layernorm", "standardize")
EVAL_SEED = 12345  # every variant and every training seed is tested on the same examples


class UsageError(ValueError):
    """Bad input: the command line prints it as one line and exits with status 2."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise UsageError(msg)


# ---------------------------------------------------------------------------- 1. the model

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
    attn_out_norm: str = "none"   # none | layernorm (affine) | standardize (no affine), after W_O


def rope_angles(pos, hs, base):
    """cos, sin of the RoPE angles pos * base^(-2i/hs), (B, 1, T, hs) each (both halves alike), pos (B, T):
    once per forward."""
    inv_freq = base ** (-torch.arange(0, hs, 2, device=pos.device, dtype=torch.float32) / hs)  # (hs/2,)
    ang = pos[:, None, :, None].float() * inv_freq  # (B, 1, T, hs/2)
    ang = torch.cat([ang, ang], dim=-1)  # (B, 1, T, hs)
    return ang.cos(), ang.sin()


def apply_rope(x, rope):
    """Rotate pairs of channels (i, i + hs/2) of x (..., B, nh, T, hs) by the angles of rope_angles():
    [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]."""
    cos, sin = (t.to(x.dtype) for t in rope)
    x1, x2 = x.chunk(2, dim=-1)  # (..., hs/2) each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def gather_at(x, at):  # x (B, T, C) at the positions at (B, P): (B, P, C)
    return x.gather(1, at[:, :, None].expand(-1, -1, x.size(-1)))


def attention_rows(q, k, at):
    """softmax(q k^T / sqrt(hs)) for the queries at positions `at` (B, P) only, causal, in float32:
    (B, nh, P, T). O(P T) memory; with at = every position, the full maps."""
    B, nh, T, hs = q.shape
    qa = q.gather(2, at[:, None, :, None].expand(B, nh, at.size(1), hs))  # (B, nh, P, hs)
    with torch.autocast(q.device.type, enabled=False):  # scores in float32 under bf16 autocast too
        scores = (qa.float() @ k.float().transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, P, T)
    future = torch.arange(T, device=q.device) > at[:, None, :, None]  # (B, 1, P, T)
    return F.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


class KVCache:  # one layer's keys and values for decoding, preallocated (no torch.cat per token)
    def __init__(self, max_len):
        self.max_len, self.n, self.k, self.v = max_len, 0, None, None

    def append(self, k, v):  # k, v (B, nh, T, hs) of the new positions; returns all cached so far
        B, nh, T, hs = k.shape
        check(self.n == 0 or T == 1, "after the prompt, decode one token at a time")
        check(self.n + T <= self.max_len, f"the key/value cache holds {self.max_len} positions")
        if self.k is None:
            self.k, self.v = k.new_empty(B, nh, self.max_len, hs), v.new_empty(B, nh, self.max_len, hs)
        self.k[:, :, self.n:self.n + T], self.v[:, :, self.n:self.n + T] = k, v
        self.n += T
        return self.k[:, :, :self.n], self.v[:, :, :self.n]  # (B, nh, n, hs) each


def check_model_shape(n_embd, n_head, rope=False):
    """The width splits into equal heads (of even size for RoPE): scripts check it before any training."""
    check(n_embd % n_head == 0, f"--n-embd {n_embd} must be divisible by --n-head {n_head}")
    check(not rope or (n_embd // n_head) % 2 == 0, f"rope needs an even head size; --n-embd / --n-head = "
          f"{n_embd // n_head}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, three ways (x (B, T, C); rope: rope_angles() of the ids, or None):
      forward     y (B, T, C) from the fused kernel; forward_probed also returns chosen queries' rows
      forward_at  y (B, P, C) for the queries at `at` alone from explicit rows (B, nh, P, T), returned too:
                  the last block when only answers are read; with every position, the full maps
      decode      y for the new positions, attending to everything in the KVCache
    qkv() and out() are where a subclass changes it (vanishing_variance_fixes.py)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)      # W_O

    def qkv(self, x, rope):
        """q, k, v (B, nh, T, hs) of x (B, T, C)."""
        B, T, C = x.shape
        nh = self.cfg.n_head
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))  # (B, nh, T, hs)
        if rope is not None:  # q and k rotated in one call: half the kernel launches
            q, k = apply_rope(torch.stack((q, k)), rope).unbind(0)
        return q, k, v

    def out(self, y, x):
        """Heads y (B, nh, T, hs) -> (B, T, C) through W_O; x: the input at y's queries (the gate fix reads it)."""
        B, nh, T, hs = y.shape
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, nh * hs))  # (B, T, C): heads side by side

    def forward(self, x, rope):
        q, k, v = self.qkv(x, rope)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True), x)

    def forward_probed(self, x, rope, rows_at):  # forward(), and the attention rows of the queries at rows_at
        q, k, v = self.qkv(x, rope)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True), x), attention_rows(q, k, rows_at)

    def forward_at(self, x, rope, at):
        q, k, v = self.qkv(x, rope)
        rows = attention_rows(q, k, at)  # (B, nh, P, T)
        return self.out(rows.to(v.dtype) @ v, gather_at(x, at)), rows  # (B, P, C)

    def decode(self, x, rope, cache: KVCache):
        q, k, v = self.qkv(x, rope)
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
    """Pre-LN block: x + norm_out(attn(ln_1(x))), then x + mlp(ln_2(x)). The probed methods also return the
    attention output at `at` before ('pre') and after ('post') the norm (B, P, C), and the rows ('attn')."""

    def __init__(self, cfg: GPTConfig, attention=CausalSelfAttention):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = attention(cfg)
        self.attn_out_norm = {"layernorm": nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
                              "standardize": nn.LayerNorm(cfg.n_embd, elementwise_affine=False),
                              }.get(cfg.attn_out_norm, nn.Identity())
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias) if cfg.mlp else None
        self.mlp = MLP(cfg) if cfg.mlp else None

    def feed_forward(self, x):  # x + mlp(ln_2(x)); attention-only blocks pass x through
        return x if self.mlp is None else x + self.mlp(self.ln_2(x))

    def forward(self, x, rope):
        return self.feed_forward(x + self.attn_out_norm(self.attn(self.ln_1(x), rope)))

    def forward_probed(self, x, rope, at):
        a, rows = self.attn.forward_probed(self.ln_1(x), rope, at)
        n = self.attn_out_norm(a)
        return self.feed_forward(x + n), {"attn": rows, "pre": gather_at(a, at), "post": gather_at(n, at)}

    def forward_at(self, x, rope, at):
        a, rows = self.attn.forward_at(self.ln_1(x), rope, at)  # (B, P, C)
        n = self.attn_out_norm(a)
        return self.feed_forward(gather_at(x, at) + n), {"attn": rows, "pre": a, "post": n}  # (B, P, C)

    def decode(self, x, rope, cache):
        return self.feed_forward(x + self.attn_out_norm(self.attn.decode(self.ln_1(x), rope, cache)))


def token_loss(logits, targets):
    """Cross-entropy in float32 over every scored position; targets < 0 are ignored."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


class GPT(nn.Module):
    Attention = CausalSelfAttention  # a subclass may swap in its own (vanishing_variance_fixes.py)

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        check(cfg.pos in POS_ENCODINGS, f"unknown positional encoding {cfg.pos!r}; choose from {POS_ENCODINGS}")
        check(cfg.attn_out_norm in ATTN_OUT_NORMS, f"unknown attn_out_norm {cfg.attn_out_norm!r}; choose from "
              f"{ATTN_OUT_NORMS}")
        check_model_shape(cfg.n_embd, cfg.n_head, cfg.pos == "rope")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList([Block(cfg, self.Attention) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.add_heads(cfg)  # before the init below, which then draws every module's weights
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def add_heads(self, cfg):
        """Where a subclass adds output heads (sparse_planted.py's position head)."""

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def embed(self, idx, position_ids=None):
        """Token (+ learned position) embeddings (B, T, C) and the RoPE angles (or None), once per forward."""
        B, T = idx.shape
        if self.wpe is not None and (position_ids is None or position_ids.device.type == "cpu"):
            # an id past the table would index out of range: say so (on a GPU max() would sync every forward)
            top = T - 1 if position_ids is None else -1 if torch.compiler.is_compiling() else int(position_ids.max())
            check(top < self.cfg.block_size, f"position id {top} is beyond the learned position table "
                  f"(block_size={self.cfg.block_size}); raise block_size or test shorter lengths")
        if position_ids is None:
            position_ids = torch.arange(T, device=idx.device).expand(B, T)  # (B, T)
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        hs = self.cfg.n_embd // self.cfg.n_head
        return x, (rope_angles(position_ids, hs, self.cfg.rope_base) if self.cfg.pos == "rope" else None)

    def trunk(self, idx, position_ids=None, at=None):
        """Final hidden states (B, T, C), or (B, P, C) at `at`: then the last block runs for those queries
        alone (keys and values still from every position), O(P T) attention and its MLP on P positions."""
        x, rope = self.embed(idx, position_ids)
        for i, block in enumerate(self.blocks):
            x = block.forward_at(x, rope, at)[0] if at is not None and i == len(self.blocks) - 1 else block(x, rope)
        return self.ln_f(x)

    def forward(self, idx, targets=None, position_ids=None, at=None):
        """idx (B, T) -> (logits, loss): logits (B, T, V), or (B, P, V) at `at` (B, P), with targets shaped alike."""
        logits = self.lm_head(self.trunk(idx, position_ids, at))
        return logits, (None if targets is None else token_loss(logits, targets))

    def loss(self, batch):  # what train() minimizes, for a batch of a task's sampler
        return self(batch["idx"], batch["targets"], batch.get("position_ids"), batch.get("at"))[1]

    @torch.no_grad()
    def probe(self, idx, at, position_ids=None):
        """Logits at `at` (B, P, V) and, per layer, Block's record at `at` ('pre', 'post', 'attn'); O(T) memory."""
        x, rope = self.embed(idx, position_ids)
        recs = []
        for i, block in enumerate(self.blocks):
            x, rec = (block.forward_at if i == len(self.blocks) - 1 else block.forward_probed)(x, rope, at)
            recs.append(rec)
        return self.lm_head(self.ln_f(x)), recs

    def new_caches(self, max_len):
        return [KVCache(max_len) for _ in self.blocks]  # one per block, for decode() of up to max_len tokens

    @torch.no_grad()
    def decode_hidden(self, idx, position_ids, caches):  # decode() before the head: (B, C)
        x, rope = self.embed(idx, position_ids)
        for block, cache in zip(self.blocks, caches):
            x = block.decode(x, rope, cache)
        return self.ln_f(x[:, -1])

    @torch.no_grad()
    def decode(self, idx, position_ids, caches):
        """Next-token logits (B, V) with caches = new_caches(T): the prompt (B, T), then one token (B, 1) at a time."""
        return self.lm_head(self.decode_hidden(idx, position_ids, caches))


# ---------------------------------------------------------------------------- 2. training

def arg(default, help, **meta):
    """A dataclass field whose help text (and optional min / max / choices / late) becomes a command-line flag."""
    value = dict(default_factory=lambda: tuple(default)) if isinstance(default, tuple) else dict(default=default)
    return field(**value, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Training hyper-parameters. Experiment configs subclass this and add their own fields."""
    seeds: int = arg(3, "training seeds: N (0..N-1), a range A-B or a list A,B; each sets init and data", seeds=True)
    steps: int = arg(2000, "optimizer steps per run", min=1)
    batch_size: int = arg(64, "training batch size", min=1)
    lr: float = arg(1e-3, "peak learning rate (AdamW)", min=0)
    warmup: int = arg(100, "linear warmup steps", min=0)
    min_lr_frac: float = arg(0.1, "cosine decays to lr * min_lr_frac", min=0, max=1)
    weight_decay: float = arg(0.1, "AdamW weight decay on matrices", min=0)
    grad_clip: float = arg(1.0, "clip the global grad norm (0 = off)", min=0)
    eval_every: int = arg(0, "print a one-line eval every N steps (0 = off; shown with --jobs 1)", min=0)
    eval_examples: int = arg(1000, "test examples per length", min=1)
    # One compute dtype, float32: these models are tiny, so bf16 buys little speed and would blur the
    # small variance differences the papers are about. bf16 is opt-in on CUDA; probes stay float32.
    dtype: str = arg("fp32", "fp32, or bf16 autocast for training and accuracy (CUDA only; probes stay fp32)",
                     choices=("fp32", "bf16"))
    tf32: bool = arg(False, "allow TensorFloat-32 matmuls on CUDA (10-bit mantissa)")
    compile: bool = arg(False, "torch.compile the training step (never the evaluation: its lengths vary)")


class Diverged(RuntimeError):
    """A non-finite loss or gradient stopped training; .result holds train()'s record up to there."""

    def __init__(self, result):
        super().__init__(f"diverged at step {result['steps']} (loss {result['final_loss']})")
        self.result = result


def lr_at(step, cfg: TrainConfig):
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def autocast(device, dtype="fp32"):
    """bf16 autocast where dtype asks for it (the command line allows it on CUDA only); otherwise float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


@contextmanager
def matmul_precision(tf32):
    """TF32 matmuls on CUDA on or off inside (a cell's training and its whole evaluation), restored after."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def to_device(batch, device):  # a sampler's batch on the device
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def sample_length_range(rng, batch_size, sample, lo, hi):
    """A training batch of one length l ~ U[lo, hi]: sample(rng, batch_size, l) (bind with functools.partial)."""
    return sample(rng, batch_size, int(rng.integers(lo, hi + 1)))


def train(model, sample_batch, cfg: TrainConfig, device, data_seed, eval_fn=None, progress=True, desc="train",
          on_progress=None):
    """Train on batches of `sample_batch(rng, batch_size)`. Returns {steps, final_loss, seconds, loss_curve};
    raises Diverged at a non-finite loss or gradient (checked every 10 steps: the only device syncs)."""
    with matmul_precision(cfg.tf32):  # restored on return
        model.to(device).train()
        rng = np.random.default_rng(data_seed)
        groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]  # gains, biases
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
        step_loss = torch.compile(model.loss) if cfg.compile else model.loss  # eval always uses the eager model
        t0, curve, loss_val = time.time(), [], float("nan")
        pbar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False, mininterval=0.5)
        for step in pbar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            with autocast(device, cfg.dtype):
                loss = step_loss(to_device(sample_batch(rng, cfg.batch_size), device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else 1e30)
            last = step == cfg.steps - 1
            if step % 10 == 0 or last:
                loss_val = loss.item()
                if not (math.isfinite(loss_val) and math.isfinite(gnorm.item())):
                    raise Diverged({"steps": step + 1, "final_loss": loss_val, "seconds": round(time.time() - t0, 2),
                                    "loss_curve": curve})
                if step % max(1, cfg.steps // 50) == 0 or last:
                    curve.append((step, round(loss_val, 5)))
                pbar.set_postfix(loss=f"{loss_val:.4f}")
                if on_progress:
                    on_progress((step + 1) / cfg.steps)
            opt.step()
            if eval_fn is not None and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last) and progress:
                tqdm.write(f"{desc} step {step + 1}: loss {loss_val:.4f}, " +
                           ", ".join(f"{k} {v:.3f}" for k, v in eval_fn(model).items()))
                model.train()
        return {"steps": step + 1, "final_loss": loss_val, "seconds": round(time.time() - t0, 2), "loss_curve": curve}


# ---------------------------------------------------------------------------- 3. evaluation by length

TEST_SETS = OrderedDict()  # (key, length, n, seed, tokens per batch) -> [batch, ...] on the CPU, 1 GiB at most


def eval_batches(sample_batch, length, n, seed=EVAL_SEED, tokens_per_batch=2**16, key=None):
    """Batches totalling n examples of one length from a generator seeded by (seed, length) only: every
    variant and seed sees the same test set. With a key (hashable, naming what sample_batch draws), they
    are drawn once per process and shared by later cells (do not modify them in place)."""
    if key is None:
        yield from draw_test_set(sample_batch, length, n, seed, tokens_per_batch)
        return
    key = (key, length, n, seed, tokens_per_batch)
    if key not in TEST_SETS:
        TEST_SETS[key] = list(draw_test_set(sample_batch, length, n, seed, tokens_per_batch))
        while len(TEST_SETS) > 1 and sum(v.numel() * v.element_size() for batches in TEST_SETS.values()
                                         for b in batches for v in b.values() if torch.is_tensor(v)) > 2**30:
            TEST_SETS.popitem(last=False)  # the oldest first
    yield from TEST_SETS[key]


def draw_test_set(sample_batch, length, n, seed, tokens_per_batch):
    rng = np.random.default_rng([seed, length])
    bs = max(1, min(512, tokens_per_batch // length))
    for start in range(0, n, bs):
        yield sample_batch(rng, min(bs, n - start), length)


def accuracy_at(model, batch):
    """1 for an example whose answers at batch['at'] are all right, else 0."""
    logits, _ = model(batch["idx"], position_ids=batch.get("position_ids"), at=batch["at"])
    hit = (logits.argmax(-1) == batch["targets"]) | (batch["targets"] < 0)  # (B, P)
    return {"accuracy": hit.all(-1).float()}


def eval_bar(lengths, n):
    """The bar of an evaluation over `lengths` (n examples each), in the main process only. It appears once
    the evaluation has run 5 s (N = 65536 takes minutes) and advances per batch by B*N^2, the attention's
    cost, so that its time left means something."""
    return tqdm(total=n * sum(L * L for L in lengths), delay=5, leave=False, disable=mp.parent_process() is not None,
                bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")


@torch.no_grad()
def evaluate_by_length(model, sample_batch, lengths, n, device, score=accuracy_at, seed=EVAL_SEED,
                       tokens_per_batch=2**16, key=None, dtype="fp32"):
    """Rows [{length, <metric>: mean over n examples, ..., n}] of score(model, batch) -> {metric: (B,)}."""
    model.eval()
    rows, bar = [], eval_bar(lengths, n)
    for length in lengths:
        sums = defaultdict(list)  # per-batch sums stay on the device: one sync per length, not per batch
        bar.set_description(f"evaluate N={length}", refresh=False)
        for b in eval_batches(sample_batch, length, n, seed, tokens_per_batch, key):
            with autocast(device, dtype):
                out = score(model, to_device(b, device))
            for k, v in out.items():
                sums[k].append(batch_sum(v))
            bar.update(len(b["idx"]) * length * length)
        rows.append({"length": length, **mean_of_sums(sums, n), "n": n})
    bar.close()
    model.train()
    return rows


def batch_sum(v):
    """A per-example metric (B,) summed over the batch; one of shape (B, S) column by column (float32)."""
    return v.float().sum() if v.dim() == 1 else torch.stack([c.contiguous().sum() for c in v.float().unbind(1)])


def mean_of_sums(sums, n):
    """{metric: mean over n examples} of per-batch sums, added in float64 in batch order (a list for (B, S))."""
    means = {k: torch.stack(v).tolist() for k, v in sums.items()}  # (batches,) or (batches, S)
    return {k: [sum(c) / n for c in zip(*s)] if isinstance(s[0], list) else sum(s) / n for k, s in means.items()}


def probe_stats(v):
    """The paper's quantities of v (n, C), attention outputs of n samples at one position: the std of each
    component across samples (mean over components), and each vector's mean and variance (mean over samples)."""
    v = v.double()
    return {"comp_std": float(v.std(0).mean()), "vec_mean": float(v.mean(1).mean()),
            "vec_var": float(v.var(1, unbiased=False).mean())}


@torch.no_grad()
def evaluate_with_probes(model, sample_batch, lengths, n, device, extra=None, keep=(), seed=EVAL_SEED,
                         tokens_per_batch=2**16, key=None):
    """One float32 pass per length (memory linear in it) that scores the answer at the last `at` position
    and probes the attention output there, per layer, before ('pre') and after ('post') the norm.
    Returns rows [{length, accuracy, <extra(batch, logits, recs) metrics>, n}], probe rows [{length,
    layer, where, comp_std, vec_mean, vec_var, entropy H of the query's attention, eff_n = exp(H), n}],
    and kept {(length, layer, where): (n, C) array} of the raw vectors at the lengths in `keep`."""
    model.eval()
    rows, probe_rows, kept, bar = [], [], {}, eval_bar(lengths, n)
    for length in lengths:
        sums, vecs, ent = defaultdict(list), defaultdict(list), defaultdict(list)
        bar.set_description(f"evaluate N={length}", refresh=False)
        for b in eval_batches(sample_batch, length, n, seed, tokens_per_batch, key):
            b = to_device(b, device)
            logits, recs = model.probe(b["idx"], b["at"][:, -1:], b.get("position_ids"))
            metrics = {"accuracy": (logits[:, 0].argmax(-1) == b["targets"][:, -1]).float(),
                       **(extra(b, logits, recs) if extra else {})}
            for k, v in metrics.items():
                sums[k].append(batch_sum(v))
            for layer, r in enumerate(recs):
                for where in ("pre", "post"):
                    vecs[layer, where].append(r[where][:, 0])  # kept on the device until the length is done
                p = r["attn"][:, :, 0]  # (B, nh, T): the query's attention weights
                ent[layer].append(-(p * p.clamp_min(1e-30).log()).sum(-1))  # (B, nh)
            bar.update(len(b["idx"]) * length * length)
        rows.append({"length": length, **mean_of_sums(sums, n), "n": n})
        for (layer, where), vs in vecs.items():
            v, h = torch.cat(vs).cpu(), torch.cat(ent[layer]).cpu()
            probe_rows.append({"length": length, "layer": layer, "where": where, **probe_stats(v),
                               "entropy": float(h.mean()), "eff_n": float(h.exp().mean()), "n": n})
            if length in keep:
                kept[length, layer, where] = v.numpy()
    bar.close()
    model.train()
    return rows, probe_rows, kept

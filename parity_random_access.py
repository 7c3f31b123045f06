"""parity_random_access.py — parity, random access into the context, and mnemonic anchors.

Reproduces Ebrahimi, Panchal & Memisevic, "Your Context Is Not an Array: Unveiling Random Access
Limitations in Transformers", COLM 2024, arXiv 2408.05506. Their claims:
  (1) length generalization on parity fails because the model cannot *index* into its context: a
      scratchpad step that must fetch bit i finds it at a distance that grows with n;
  (2) a format that removes the need to index (the bits interleaved with the running parities)
      generalizes;
  (3) random "mnemonic" anchor tokens before every bit, repeated before every scratchpad step, let
      the model find bit i by content and generalize from 10-20 bits to 60; a unique key is what does
      the work;
  (4) attention maps show the "step i reads bit i" line hold inside the training length and break
      beyond it; mnemonics also help multi-digit addition.

Token ids: 0-9 digits (bits are 0 and 1), 10 '+', 11 '=', 12 '$' (end of answer), 13 '^' (start of
sequence), 14.. anchors. Every format is a function below whose docstring shows its 4-bit example;
sample_batch puts '^' in front of every sequence (below, left out). The loss is on the tokens the model
must produce only. Parity formats, bits 1 0 1 1 (running parities 1 1 0 1), anchors as
letters A B C D (fresh random anchor tokens per example):
  none         1 0 1 1 = 1 $                          produced: the answer and '$'
  scratchpad   1 0 1 1 = 1 1 0 1 $                    produced: p_1..p_n and '$'
  interleaved  1 1 0 1 1 0 1 1                        b_1 p_1 b_2 p_2 ...: produced p_i (no '$': the
                                                      input's end is the end)
  mnemonic     A 1 B 0 C 1 D 1 = A 1 B 1 C 0 D 1 $    produced: p_i and '$'; anchors are given
  constant     Z 1 Z 0 Z 1 Z 1 = Z 1 Z 1 Z 0 Z 1 $    one anchor everywhere (no unique key)
  cyclic       A 1 B 0 A 1 B 1 = A 1 B 1 A 0 B 1 $    anchors repeat with period `cycle` (2 here)
  misaligned   A 1 B 0 C 1 D 1 = E 1 F 1 G 0 H 1 $    scratchpad anchors are not the input's
Addition, least-significant digit first, operands padded to d+1 digits; 47 + 85 = 132 (d = 2):
  add            7 4 0 + 5 8 0 = 2 3 1 $
  add-mnemonic   A 7 B 4 C 0 + A 5 B 8 C 0 = A 2 B 3 C 1 $   one anchor per digit position, shared

Evaluation is greedy and autoregressive with a key/value cache: the tokens a format gives (input
bits, '=', anchors) are fed from the example, every produced token is the model's own argmax. The
model gets exactly as many positions as the gold answer; generation stops at its first '$', and
whatever it would have said after that counts as wrong. Metrics per length: final-answer accuracy
(p_n for parity, chance 0.5; the whole sum for addition), exact match of everything produced,
early and late stops ('$' before its place / not at its place), and accuracy per step index.

Training (the same for every format): 3 pre-LN blocks, d = 64, 4 heads, RoPE (or NoPE), AdamW.
Two ingredients stand in for what the paper's pretrained language models brought, and each is a
flag, so their effect can be measured (docs/parity_random_access.md):
  * copy pre-training (`--pretrain-steps`, default 1000): a generic induction task (`sample_copy`:
    random tokens, then the same tokens again) before the task's own training (`--steps`);
  * randomized position ids (`--positions random`, Ruoss et al. 2023, the default): each example's
    positions are a sorted random subset of 0..T_test-1, in training and at test, so a model trained on
    20 bits has seen the distances a 60-bit example uses. `--positions plain` uses 0..T-1.
Training lengths: n ~ U[10, 20] bits per batch; tests: n = 10 ... 60. Addition: 1..5 digits, each example
its own (one batch mixes digit counts, sample_mixed); tests: 3 ... 15 digits.

Commands and measured run times (2-core CPU, 2 cells at a time):
  python parity_random_access.py                       # quick: scratchpad, interleaved, mnemonic, 3 seeds: 10.9 min
  python parity_random_access.py --preset smoke        # ~30 s: what the tests run
  python parity_random_access.py --formats none,constant,cyclic,misaligned   # the anchor ablations, 12 cells: 24.6 min
  python parity_random_access.py --formats add,add-mnemonic                   # addition at the quick budget
      # (too short to learn it: the claims setting gives 2000 + 6000 steps)
  python parity_random_access.py --formats mnemonic --pretrain-steps 2000 --steps 3000   # 17.2 min, 3 seeds
  python parity_random_access.py --device cuda --preset paper   # every format, RoPE and NoPE, n to 100, 5 seeds
  python parity_random_access.py --experiment claims   # the claim table: CLAIMS_RUNS, each format in the setting
      # where it learns, 10 seeds, n to 100, one resumable folder. Measured: scratchpad 43.5 min, interleaved
      # 8.5 min, mnemonic RoPE + NoPE 75 min, none 8.7 min, constant + cyclic 131 min (20 cells, sharing the
      # cores with addition runs); misaligned ~11 min a cell, add-mnemonic ~12 min (3 cells on 2 cores); add
      # ~5.2 min a cell (2 on 2 cores; 23 min for 8). Committed cells: --out results/parity_random_access/claims
      # resumes them

Deviations: no code was released with the paper. Our models are small transformers trained from scratch; the paper's were most likely
pretrained language models, fine-tuned, hence the two ingredients above (reported with and without).
The exact token layouts above, the ablations' details (cyclic period 4; misaligned = fresh anchors in
the scratchpad) and the '$' stopping rule are our choices.

Read with common.py (the model, training and evaluation); the results are in docs/parity_random_access.md.
"""
import functools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import common as C
import faults
import harness as H
import reporting as R

PLUS, SEP, EOS, BOS, A0 = 10, 11, 12, 13, 14
NAMES = {PLUS: "+", SEP: "=", EOS: "$", BOS: "^"}
PARITY_FORMATS = ("none", "scratchpad", "interleaved", "mnemonic", "constant", "cyclic", "misaligned")
ADD_FORMATS = ("add", "add-mnemonic")
FORMATS = PARITY_FORMATS + ADD_FORMATS
COPY_MAX = 40  # copy pre-training sequences: 5..COPY_MAX tokens, copied once (at most 2 * 40 + 2 tokens)
RETRIEVING = ("scratchpad", "mnemonic", "constant", "cyclic", "misaligned")  # a step must fetch bit i from afar


# ---------------------------------------------------------------------------------------- formats
# Each returns tokens (B, T) and the layout shared by every row: `produced` (T,) marks the tokens the
# model must produce, `inputs` (n,) the positions of the input bits / digits, `steps` (S,) those of
# the produced scratchpad steps p_1..p_S (the answer digits for addition).

def running_parity(bits):
    return np.cumsum(bits, axis=1) % 2  # p_i = b_1 xor ... xor b_i


def col(v, B):
    return np.full((B, 1), v, dtype=np.int64)


def fmt_none(bits):
    """1 0 1 1 = 1 $  (bits, '=', the parity, '$')."""
    B, n = bits.shape
    tok = np.concatenate([bits, col(SEP, B), running_parity(bits)[:, -1:], col(EOS, B)], axis=1)
    produced = np.r_[np.zeros(n + 1, bool), True, True]
    return tok, produced, np.arange(n), np.array([n + 1])


def fmt_scratchpad(bits):
    """1 0 1 1 = 1 1 0 1 $  (bits, '=', running parities p_1..p_n, '$'): the step that writes p_i
    needs bit i, which sits n + 1 positions back: an index that depends on n."""
    B, n = bits.shape
    tok = np.concatenate([bits, col(SEP, B), running_parity(bits), col(EOS, B)], axis=1)
    produced = np.r_[np.zeros(n + 1, bool), np.ones(n + 1, bool)]
    return tok, produced, np.arange(n), n + 1 + np.arange(n)


def fmt_interleaved(bits):
    """1 1 0 1 1 0 1 1  (b_1 p_1 b_2 p_2 ...): bit i is always the token just before p_i."""
    B, n = bits.shape
    tok = np.stack([bits, running_parity(bits)], axis=2).reshape(B, 2 * n)  # (B, n, 2) -> (B, 2n)
    produced = np.tile([False, True], n)
    return tok, produced, 2 * np.arange(n), 2 * np.arange(n) + 1


def fmt_anchored(bits, a_in, a_out):
    """A 1 B 0 C 1 D 1 = A 1 B 1 C 0 D 1 $ with a_in = a_out = A B C D: anchor a_in[i] before bit i,
    anchor a_out[i] (given, not produced) before p_i. Every mnemonic variant is this layout."""
    B, n = bits.shape
    inp = np.stack([a_in, bits], axis=2).reshape(B, 2 * n)  # (B, n, 2) -> (B, 2n): a_1 b_1 a_2 b_2 ...
    out = np.stack([a_out, running_parity(bits)], axis=2).reshape(B, 2 * n)  # a_1 p_1 a_2 p_2 ...
    tok = np.concatenate([inp, col(SEP, B), out, col(EOS, B)], axis=1)
    produced = np.r_[np.zeros(2 * n + 1, bool), np.tile([False, True], n), True]
    return tok, produced, 2 * np.arange(n) + 1, 2 * n + 2 + 2 * np.arange(n)


def distinct_anchors(rng, B, k, pool):
    """(B, k) anchor token ids, distinct within a row, from a pool of `pool` anchors."""
    C.check(k <= pool, f"{k} distinct anchors needed but the pool has {pool}; raise --anchors")
    return A0 + np.argsort(rng.random((B, pool)), axis=1)[:, :k]


def fmt_mnemonic(bits, rng, pool):
    """A 1 B 0 C 1 D 1 = A 1 B 1 C 0 D 1 $  (fresh anchors, sampled without replacement per example)."""
    a = distinct_anchors(rng, *bits.shape, pool)
    return fmt_anchored(bits, a, a)


def fmt_constant(bits, rng, pool):
    """Z 1 Z 0 Z 1 Z 1 = Z 1 Z 1 Z 0 Z 1 $  (the first anchor token everywhere)."""
    a = np.full(bits.shape, A0)
    return fmt_anchored(bits, a, a)


def fmt_cyclic(bits, rng, pool, cycle):
    """A 1 B 0 A 1 B 1 = A 1 B 1 A 0 B 1 $ for cycle = 2: `cycle` fresh anchors, repeated."""
    a = distinct_anchors(rng, bits.shape[0], cycle, pool)[:, np.arange(bits.shape[1]) % cycle]
    return fmt_anchored(bits, a, a)


def fmt_misaligned(bits, rng, pool):
    """A 1 B 0 C 1 D 1 = E 1 F 1 G 0 H 1 $  (2n fresh anchors: the scratchpad's are not the input's)."""
    n = bits.shape[1]
    a = distinct_anchors(rng, bits.shape[0], 2 * n, pool)
    return fmt_anchored(bits, a[:, :n], a[:, n:])


def add_digits(x, y):
    """Digits of x + y, least significant first; x, y (B, m) digits LSD first (top digit 0)."""
    B, m = x.shape
    s, carry = np.zeros((B, m), np.int64), np.zeros(B, np.int64)
    for j in range(m):
        t = x[:, j] + y[:, j] + carry
        s[:, j], carry = t % 10, t // 10
    return s


def fmt_add(x, y):
    """47 + 85 = 132:  7 4 0 + 5 8 0 = 2 3 1 $  (LSD first, operands padded to d+1 digits)."""
    B, m = x.shape
    tok = np.concatenate([x, col(PLUS, B), y, col(SEP, B), add_digits(x, y), col(EOS, B)], axis=1)
    produced = np.r_[np.zeros(2 * m + 2, bool), np.ones(m + 1, bool)]
    return tok, produced, np.arange(m), 2 * m + 2 + np.arange(m)


def fmt_add_mnemonic(x, y, rng, pool):
    """47 + 85 = 132:  A 7 B 4 C 0 + A 5 B 8 C 0 = A 2 B 3 C 1 $  (anchor j marks digit j everywhere)."""
    B, m = x.shape
    a = distinct_anchors(rng, B, m, pool)
    pair = lambda d: np.stack([a, d], axis=2).reshape(B, 2 * m)  # (B, m, 2) -> (B, 2m): a_1 d_1 a_2 d_2 ...
    tok = np.concatenate([pair(x), col(PLUS, B), pair(y), col(SEP, B), pair(add_digits(x, y)), col(EOS, B)], 1)
    produced = np.r_[np.zeros(4 * m + 2, bool), np.tile([False, True], m), True]
    return tok, produced, 2 * np.arange(m) + 1, 4 * m + 3 + 2 * np.arange(m)


def sample_batch(rng, batch_size, n, fmt, pool=128, cycle=4):
    """One batch of `fmt` with n bits (parity) or n-digit operands (addition). Returns
      idx (B, T), at (B, P) the positions whose next token is produced, targets (B, P) those tokens,
      inputs (n,) positions of the input bits / digits, steps (S,) positions of the step tokens."""
    C.check(fmt in FORMATS, f"unknown format {fmt!r}; choose from {FORMATS}")
    if fmt in ADD_FORMATS:
        x, y = (np.concatenate([rng.integers(0, 10, (batch_size, n)), col(0, batch_size)], 1) for _ in range(2))
        tok, produced, inputs, steps = fmt_add(x, y) if fmt == "add" else fmt_add_mnemonic(x, y, rng, pool)
    else:
        bits = rng.integers(0, 2, (batch_size, n))
        if fmt in ("none", "scratchpad", "interleaved"):
            tok, produced, inputs, steps = globals()[f"fmt_{fmt}"](bits)
        elif fmt == "cyclic":
            tok, produced, inputs, steps = fmt_cyclic(bits, rng, pool, cycle)
        else:
            tok, produced, inputs, steps = globals()[f"fmt_{fmt}"](bits, rng, pool)
    tok = np.concatenate([col(BOS, batch_size), tok], axis=1)  # every sequence starts with '^'
    produced, inputs, steps = np.r_[False, produced], inputs + 1, steps + 1
    at = np.flatnonzero(produced) - 1  # the model predicts token t + 1 at position t
    return {"idx": torch.from_numpy(tok), "at": torch.from_numpy(np.tile(at, (batch_size, 1))),
            "targets": torch.from_numpy(tok[:, at + 1]), "inputs": torch.from_numpy(inputs),
            "steps": torch.from_numpy(steps)}


def sample_copy(rng, batch_size, length, pool=128):
    """Generic pre-training (optional, `--pretrain-steps`): `length` random tokens (digits and
    anchors), '=', the same tokens again; the loss is on the copy. Copying needs an induction head
    (find the previous occurrence of the current token, say what came after it), the circuit that
    content-based addressing uses. A stand-in for the language pre-training the paper's models had.
    Example, length 4:  ^ 7 A3 1 A9 = 7 A3 1 A9  (produced: the copy)."""
    vocab = np.r_[np.arange(10), A0 + np.arange(pool)]
    x = vocab[rng.integers(0, len(vocab), (batch_size, length))]
    tok = np.concatenate([col(BOS, batch_size), x, col(SEP, batch_size), x], axis=1)
    at = np.arange(length + 1, 2 * length + 1)
    return {"idx": torch.from_numpy(tok), "at": torch.from_numpy(np.tile(at, (batch_size, 1))),
            "targets": torch.from_numpy(tok[:, at + 1])}


def decode(ids):
    """Token ids -> text, anchors as A0, A1, ... (their index in the pool)."""
    return " ".join(NAMES.get(t, str(t)) if t < A0 else f"A{t - A0}" for t in ids if t >= 0)


def seq_len(fmt, n):
    return sample_batch(np.random.default_rng(0), 1, n, fmt, pool=4 * n + 4)["idx"].shape[1]


# ---------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def greedy(model, batch):
    """Greedy autoregressive decoding with a key/value cache. Given tokens come from batch['idx'];
    at every produced position the model's argmax is written and fed back. Returns the sequence
    (B, T) with -1 at produced positions after the model's first '$' (it stopped there)."""
    idx = batch["idx"]
    B, T = idx.shape
    pos = batch.get("position_ids", torch.arange(T, device=idx.device).expand(B, T))
    at = batch["at"][0].tolist()  # the produced positions minus one, read once: no device sync per token
    produced = set(t + 1 for t in at)
    seq, start = idx.clone(), at[0] + 1
    caches = model.new_caches(T)
    logits = model.decode(seq[:, :start], pos[:, :start], caches)  # the prompt, in one pass
    for t in range(start, T):
        if t in produced:
            seq[:, t] = logits.argmax(-1)
        if t < T - 1:
            logits = model.decode(seq[:, t:t + 1], pos[:, t:t + 1], caches)  # (B, V)
    stop = first_eos(seq)  # (B,)
    mask = torch.zeros(T, dtype=torch.bool)
    mask[sorted(produced)] = True
    seq[(torch.arange(T, device=idx.device) > stop[:, None]) & mask.to(idx.device)] = -1
    return seq


def first_eos(seq):
    """Position of the first '$' in each row of seq (B, T), or T where there is none. Only the model
    writes '$' (it is never a given token), so this is where generation stopped."""
    said = seq == EOS
    return torch.where(said.any(1), said.float().argmax(1), seq.size(1))


def score(fmt):
    """Per-example metrics of greedy generation, for evaluate_by_length."""
    def fn(model, batch):
        seq = greedy(model, batch)
        gold = batch["idx"]
        prod = batch["at"][0] + 1
        right = seq[:, prod] == gold[:, prod]  # (B, P)
        steps = seq[:, batch["steps"]] == gold[:, batch["steps"]]  # (B, S)
        out = {"accuracy": steps.all(1) if fmt in ADD_FORMATS else steps[:, -1], "exact": right.all(1)}
        if (gold[0, prod] == EOS).any():  # formats that end with '$'
            end = int(prod[-1])
            first = first_eos(seq)  # greedy() keeps the model's first '$' and blanks what follows
            out.update(stop_early=first < end, stop_late=first > end)
        out["step_acc"] = steps  # (B, S): evaluate_by_length gives one mean per step
        return out
    return fn


@torch.no_grad()
def attention_maps(model, idx, position_ids=None):
    """Full attention maps per layer, (B, nh, T, T) each: the explicit rows of every query."""
    x, rope = model.embed(idx, position_ids)
    every = torch.arange(idx.size(1), device=idx.device).expand(idx.size(0), -1)  # (B, T)
    maps = []
    for block in model.blocks:
        x, rec = block.forward_at(x, rope, every)
        maps.append(rec["attn"])
    return maps


@torch.no_grad()
def attention_on_bits(model, batch):
    """Attention from the query that writes step i (the token before p_i) to the position of input
    bit i, per layer and head: (L, nh, S) averaged over the batch, and the maps (L, nh, S, n) of
    example 0 (rows: steps, columns: input bits). From explicit maps of a teacher-forced batch."""
    maps = attention_maps(model, batch["idx"], batch.get("position_ids"))  # L x (B, nh, T, T)
    q, k = batch["steps"] - 1, batch["inputs"]
    sub = torch.stack([m[:, :, q][:, :, :, k] for m in maps])  # (L, B, nh, S, n)
    right = sub.diagonal(dim1=-2, dim2=-1)  # (L, B, nh, S): query of step i -> bit i
    return right.mean(1), sub[:, 0]


# ---------------------------------------------------------------------------------------- config

@dataclass
class Config(C.TrainConfig):
    formats: tuple = C.arg(("scratchpad", "interleaved", "mnemonic"), "formats to train and compare", choices=FORMATS)
    pos: tuple = C.arg(("rope",), "positional encodings to compare", choices=C.POS_ENCODINGS)
    positions: str = C.arg("random", "training position ids: plain (0..T-1), or random (a sorted random subset of "
                                    "0..T_test-1 per example, in training and test, Ruoss et al. 2023: every "
                                    "distance the test uses is trained)", choices=("plain", "random"))
    n_layer: int = C.arg(3, "transformer blocks", min=1)
    n_head: int = C.arg(4, "attention heads", min=1)
    n_embd: int = C.arg(64, "model width", min=1)
    train_min: int = C.arg(10, "fewest bits in training (parity)", min=1)
    train_max: int = C.arg(20, "most bits in training (parity)", min=1)
    test_lengths: tuple = C.arg((10, 15, 20, 25, 30, 40, 50, 60), "bits n at test (parity)", min=1)
    add_train_max: int = C.arg(5, "addition: operands of 1..add_train_max digits in training (each example its own)",
                               min=1)
    add_test_lengths: tuple = C.arg((3, 5, 8, 10, 15), "addition: operand digits at test", min=1)
    anchors: int = C.arg(128, "anchor pool size (mnemonic formats); >= the largest n (2n for misaligned)", min=1)
    cycle: int = C.arg(4, "period of the anchors in the cyclic format", min=1)
    pretrain_steps: int = C.arg(1000, "steps of generic copy pre-training (sample_copy, 5-40 tokens) before the task; "
                                   "0 = none", min=0)
    map_length: int = C.arg(40, "n of the examples whose attention maps are measured and drawn", min=1)
    probe_examples: int = C.arg(256, "examples per length for the attention-output variance probe", min=2)


PRESETS = {
    "smoke": dict(seeds=2, steps=30, pretrain_steps=20, formats=("scratchpad", "mnemonic", "add-mnemonic"),
                  eval_examples=32, test_lengths=(10, 20, 40), add_test_lengths=(5, 10, 15), probe_examples=16),
    "quick": dict(seeds=3, steps=1000, lr=3e-3, eval_examples=500),
    "paper": dict(seeds=5, steps=3000, pretrain_steps=2000, lr=3e-3, formats=FORMATS, pos=("rope", "none"),
                  anchors=256, test_lengths=(10, 15, 20, 25, 30, 40, 50, 60, 80, 100)),
}


# --experiment claims: the runs behind the claim table of docs/parity_random_access.md, 10 seeds each unless --seeds is given.
# (formats, position encodings, what the run changes in the config). Every cell keeps its own config,
# so one folder holds them all, a stopped run resumes, and one report compares them.
CLAIMS_TEST = (10, 15, 20, 25, 30, 40, 50, 60, 80, 100)  # 5x the longest training length
MNEMONIC_BUDGET = dict(pretrain_steps=2000, steps=3000, test_lengths=CLAIMS_TEST)
CLAIMS_RUNS = (
    (("scratchpad",), ("rope",), dict(positions="plain", steps=8000, test_lengths=CLAIMS_TEST[:8])),  # learns n <= 20
    (("interleaved",), ("rope",), dict(pretrain_steps=0, steps=2000, test_lengths=CLAIMS_TEST)),
    (("mnemonic",), ("rope", "none"), MNEMONIC_BUDGET),
    (("none",), ("rope",), dict(test_lengths=CLAIMS_TEST)),  # no scratchpad: the quick budget
    (("constant", "cyclic"), ("rope",), MNEMONIC_BUDGET),
    (("misaligned",), ("rope",), {**MNEMONIC_BUDGET, "anchors": 2 * CLAIMS_TEST[-1]}),  # 2n fresh anchors
    (("add", "add-mnemonic"), ("rope",), dict(pretrain_steps=2000, steps=6000)),  # 1..5 digits, tested to 15
)


def lengths_of(fmt, cfg):
    """(train range, test lengths) of a format: bits for parity, operand digits for addition."""
    if fmt in ADD_FORMATS:
        return (1, cfg.add_train_max), cfg.add_test_lengths
    return (cfg.train_min, cfg.train_max), cfg.test_lengths


def validate(cfg):
    """Constraints between flags, checked before any training."""
    for pos in cfg.pos:
        C.check_model_shape(cfg.n_embd, cfg.n_head, pos == "rope")
    C.check(cfg.train_min <= cfg.train_max, f"--train-min {cfg.train_min} > --train-max {cfg.train_max}")
    C.check(cfg.map_length >= cfg.train_max, f"--map-length {cfg.map_length} must reach --train-max {cfg.train_max}")
    if any(f in PARITY_FORMATS for f in cfg.formats):  # the test lengths size the position table
        C.check(cfg.train_max <= max(cfg.test_lengths),
                f"--train-max {cfg.train_max} beyond the longest --test-lengths {max(cfg.test_lengths)}")
    if any(f in ADD_FORMATS for f in cfg.formats):
        C.check(cfg.add_train_max <= max(cfg.add_test_lengths), f"--add-train-max {cfg.add_train_max} beyond "
                f"the longest --add-test-lengths {max(cfg.add_test_lengths)}")
    need = {"mnemonic": max(cfg.test_lengths + (cfg.map_length,)), "cyclic": cfg.cycle,
            "misaligned": 2 * max(cfg.test_lengths + (cfg.map_length,)), "add-mnemonic": max(cfg.add_test_lengths) + 1}
    for fmt, k in need.items():
        C.check(fmt not in cfg.formats or cfg.anchors >= k,
                f"format {fmt} needs at least {k} anchors at these lengths; got --anchors {cfg.anchors}")


def build_model(fmt, pos, cfg):
    T = max(seq_len(fmt, max(lengths_of(fmt, cfg)[1] + (cfg.map_length,))), 2 * COPY_MAX + 2)  # task, pre-training
    return C.GPT(C.GPTConfig(vocab_size=A0 + cfg.anchors, block_size=T, n_layer=cfg.n_layer, n_head=cfg.n_head,
                             n_embd=cfg.n_embd, pos=pos))


def random_positions(batch, rng, max_pos):
    """Randomized position ids (Ruoss et al. 2023): per example a sorted random subset of
    0..max_pos-1, max_pos = the longest test sequence, in training and at test alike, so the
    positions and distances a long test sequence uses have been trained."""
    B, T = batch["idx"].shape
    pid = np.sort(np.argsort(rng.random((B, max_pos)), axis=1)[:, :T], axis=1)
    return {**batch, "position_ids": torch.from_numpy(pid)}


def sample_test(rng, B, n, fmt, anchors, cycle, max_pos=0):
    """sample_batch in format fmt, with randomized position ids below max_pos if max_pos > 0."""
    b = sample_batch(rng, B, n, fmt, anchors, cycle)
    return random_positions(b, rng, max_pos) if max_pos else b


def with_random_positions(rng, B, sample, max_pos):
    """A training batch from sample(rng, B) with randomized position ids below max_pos."""
    return random_positions(sample(rng, B), rng, max_pos)


def test_key(fmt, cfg, max_pos):
    """What samplers(fmt, cfg, max_pos)'s test sampler draws: its test sets are drawn once per process."""
    return ("parity_random_access", fmt, cfg.anchors, cfg.cycle, max_pos if cfg.positions == "random" else 0)


def sample_answer_only(rng, B, n, test):
    """A test batch scored at the final answer only (for the probes)."""
    return answer_only(test(rng, B, n))


def samplers(fmt, cfg, max_pos):
    """(train(rng, B), test(rng, B, n)): parity training draws n ~ U[lo, hi] per batch, addition per
    example (sample_mixed). test is a functools.partial, so every cell of a run shares one test set per n."""
    (lo, hi), _ = lengths_of(fmt, cfg)
    test = functools.partial(sample_test, fmt=fmt, anchors=cfg.anchors, cycle=cfg.cycle,
                             max_pos=max_pos if cfg.positions == "random" else 0)
    if fmt in ADD_FORMATS:
        return functools.partial(sample_mixed, lo=lo, hi=hi, sample=test), test
    return functools.partial(C.sample_length_range, sample=test, lo=lo, hi=hi), test


def sample_mixed(rng, batch_size, lo, hi, sample):
    """A training batch whose examples have n ~ U[lo, hi] each (one draw per example, not per batch):
    sample(rng, b, n) for each n drawn, right-padded with '$' to the longest row. A shorter row's extra
    scored positions repeat its last one with target -1, which the loss ignores; its padding sits after
    its own tokens, which causal attention never lets them see. With one n per batch, addition's loss
    swung between digit counts from step to step, and neither format learned 5 digits (docs/log.md)."""
    ns = rng.integers(lo, hi + 1, batch_size)
    parts = [sample(rng, int((ns == n).sum()), int(n)) for n in np.unique(ns)]
    T, P = max(b["idx"].shape[1] for b in parts), max(b["at"].shape[1] for b in parts)

    def right(x, width, fill=None):  # (b, t) -> (b, width): pad with `fill`, or repeat the last column
        tail = x[:, -1:].expand(-1, width - x.shape[1]) if fill is None else x.new_full((len(x), width - x.shape[1]), fill)
        return torch.cat([x, tail], 1)
    out = {"idx": torch.cat([right(b["idx"], T, EOS) for b in parts]),
           "at": torch.cat([right(b["at"], P) for b in parts]),
           "targets": torch.cat([right(b["targets"], P, -1) for b in parts])}
    if "position_ids" in parts[0]:  # ids of the padding: the row's last id again (never attended to)
        out["position_ids"] = torch.cat([right(b["position_ids"], T) for b in parts])
    return out


def answer_only(batch):
    """The batch with one scored position: the one that writes the last step (the final answer)."""
    q = batch["steps"][-1:] - 1
    return {**batch, "at": q.expand(batch["idx"].shape[0], 1), "targets": batch["idx"][:, q + 1]}


# ---------------------------------------------------------------------------------------- one cell

def build(cell):
    """The cell's model, untrained (the harness seeds torch with the cell's seed first: the init seed)."""
    return build_model(cell["fmt"], cell["pos"], Config(**cell["config"]))


def seq_lens(cell):
    """(longest training sequence, longest test sequence) in tokens."""
    (_, hi), lengths = lengths_of(cell["fmt"], Config(**cell["config"]))
    return seq_len(cell["fmt"], hi), seq_len(cell["fmt"], max(lengths))


def train(model, cell):
    """Optional copy pre-training, then the task (each with its own optimizer run and data seed)."""
    cfg, fmt, pos, seed = Config(**cell["config"]), cell["fmt"], cell["pos"], cell["seed"]
    device, hi = torch.device(cell["device"]), lengths_of(fmt, cfg)[0][1]
    data, test = samplers(fmt, cfg, model.cfg.block_size)
    key = test_key(fmt, cfg, model.cfg.block_size)

    def in_distribution(m):
        return {f"accuracy@{hi}": C.evaluate_by_length(m, test, [hi], 128, device, score(fmt), key=key,
                                                       dtype=cfg.dtype)[0]["accuracy"]}
    pre = None
    if cfg.pretrain_steps:  # a separate optimizer run: warmup and cosine schedule of its own
        copy = functools.partial(C.sample_length_range, sample=functools.partial(sample_copy, pool=cfg.anchors),
                                 lo=5, hi=COPY_MAX)
        if cfg.positions == "random":
            copy = functools.partial(with_random_positions, sample=copy, max_pos=model.cfg.block_size)
        pre = C.train(model, copy, replace(cfg, steps=cfg.pretrain_steps), device, data_seed=20_000 + seed,
                      **H.train_options(f"pretrain/seed{seed}"))
    result = C.train(model, data, cfg, device, data_seed=10_000 + seed, eval_fn=in_distribution,
                     **H.train_options(f"{fmt}/{pos}/seed{seed}"))
    return {"train": result, "pretrain": pre}


def evaluate(model, cell):
    """Accuracy per n and per step, probes, decoded examples, and the attention on the bits."""
    cfg, fmt, device = Config(**cell["config"]), cell["fmt"], torch.device(cell["device"])
    lengths = lengths_of(fmt, cfg)[1]
    _, test = samplers(fmt, cfg, model.cfg.block_size)
    key = test_key(fmt, cfg, model.cfg.block_size)
    rows = []
    for r in C.evaluate_by_length(model, test, lengths, cfg.eval_examples, device, score(fmt), tokens_per_batch=2**15,
                                  key=key, dtype=cfg.dtype):
        step_acc = r.pop("step_acc")
        rows.append({"table": "accuracy", **r})
        rows += [{"table": "step", "length": r["length"], "step": i + 1, "accuracy": v} for i, v in enumerate(step_acc)]
    _, probes, _ = C.evaluate_with_probes(model, functools.partial(sample_answer_only, test=test), lengths,
                                          cfg.probe_examples, device, key=("answer only",) + key)
    rows += [{"table": "probe", **r} for r in probes if r["where"] == "pre"]
    out = {"rows": rows, "examples": examples(model, test, lengths, device, key)}
    if fmt in RETRIEVING:  # attention from step i to bit i: per step at n = map_length, and per n
        b = C.to_device(next(C.eval_batches(test, cfg.map_length, 64, key=key)), device)
        mass, maps = attention_on_bits(model, b)
        out["mass"] = np.round(mass.cpu().numpy(), 4).tolist()  # (L, nh, S)
        out["maps"] = np.round(maps.cpu().numpy(), 3).tolist()  # (L, nh, S, n), example 0
        by_n = {n: attention_on_bits(model, C.to_device(next(C.eval_batches(test, n, 32, key=key)), device))
                for n in lengths}
        out["mass_by_n"] = [{"length": n, "mass": np.round(m.mean(-1).cpu().numpy(), 4).tolist()}  # (L, nh)
                            for n, (m, _) in by_n.items()]
        if cfg.train_max in by_n:  # the maps of one example inside the training length, next to n = map_length
            out["maps_train"] = np.round(by_n[cfg.train_max][1].cpu().numpy(), 3).tolist()  # (L, nh, S, n)
    return out


@torch.no_grad()
def examples(model, test, lengths, device, key, k=3):
    """One decoded greedy generation at the shortest and longest test length, and a few mistakes."""
    out = []
    for n in (lengths[0], lengths[-1]):
        b = C.to_device(next(C.eval_batches(test, n, 32, key=key)), device)
        seq, gold = greedy(model, b), b["idx"]
        wrong = (seq != gold).any(1).nonzero()[:, 0].tolist()
        start = int(b["at"][0, 0]) + 1
        for i in [0] + [w for w in wrong if w != 0][:k - 1]:
            bad = (seq[i, b["steps"]] != gold[i, b["steps"]]).nonzero()[:, 0].tolist()
            verdict = f"WRONG from step {bad[0] + 1}" if bad else "WRONG (stop)" if i in wrong else "right"
            out.append(f"n={n} {verdict}: {decode(gold[i, :start].tolist())} -> model: "
                       f"{decode(seq[i, start:].tolist())}  (gold: {decode(gold[i, start:].tolist())})")
    return out


# ---------------------------------------------------------------------------------------- report

def setting(rec, steps=False):
    """'position encoding, training position ids' of a cell, e.g. 'rope, random', and with steps=True
    the steps too ('rope, random, 1000+1000 steps': copy pre-training + task)."""
    conf = rec["cell"]["config"]
    more = f", {conf.get('pretrain_steps', 0)}+{conf['steps']} steps" if steps else ""
    return f"{rec['cell']['pos']}, {conf.get('positions', 'plain')}{more}"


def best_head(mass, hi):
    """(layer, head) whose attention from step i to bit i is largest within the training length:
    the retrieving head. mass: (L, nh, S)."""
    m = np.asarray(mass)[:, :, :hi].mean(-1)
    return np.unravel_index(m.argmax(), m.shape)


def mixed_budgets(records):
    """Whether the records' cells differ in their (copy pre-training, task) steps."""
    return len({(rec["cell"]["config"].get("pretrain_steps"), rec["cell"]["config"]["steps"]) for rec in records}) > 1


def labelled(records):
    """Copies of the records, each with its `label` and its rows' `variant` set to it (the caller's
    records are left as they were)."""
    out, steps = [], mixed_budgets(records)
    for rec in records:  # one label per (format, position encoding, training position ids[, steps])
        where = setting(rec, steps=steps)
        lab = f"{rec['cell']['fmt']}, {where}"
        out.append({**rec, "label": lab, "setting": where,
                    "rows": [{**r, "variant": lab, "setting": where} for r in rec["rows"]]})
    return out


def length_groups(acc, cfg):
    """[(formats, longest training length, chance, what the x axis counts)]: parity, then addition."""
    parity = [f for f in PARITY_FORMATS if R.select(acc, fmt=f)]
    adds = [f for f in ADD_FORMATS if R.select(acc, fmt=f)]
    groups = [(parity, cfg.train_max, 0.5, "bits n"), (adds, cfg.add_train_max, None, "operand digits")]
    return [g for g in groups if g[0]]


def fig_accuracy(acc, groups, palette, out):
    """accuracy.png: final-answer accuracy and exact match vs n, mean ± std over seeds, a dot per seed."""
    plt = R.pyplot()
    fig, axes = plt.subplots(len(groups), 2, figsize=(15, 4.5 * len(groups)), squeeze=False)
    for i, (fmts, hi, chance, what) in enumerate(groups):
        sel = [r for r in acc if r["fmt"] in fmts]
        for ax, metric, ylabel, title in ((axes[i, 0], "accuracy", "final-answer accuracy", "final answer, greedy"),
                                          (axes[i, 1], "exact", "exact match", "exact match of everything produced")):
            R.plot_vs_length(sel, metric, None, hi, chance=chance if metric == "accuracy" else None, ax=ax,
                             ylabel=ylabel, style=palette, title=f"{title} (mean ± std, dots: seeds); x: {what}",
                             seeds=True)
            R.ticks_at(ax, sorted({r["length"] for r in sel}))
    R.save_figure(fig, out / "accuracy.png")


def fig_steps(acc, steps, groups, palette, out):
    """steps.png: the accuracy of each scratchpad step i at the longest test length."""
    plt = R.pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(8 * len(groups), 4.2), squeeze=False)
    for ax, (fmts, hi, chance, what) in zip(axes[0], groups):
        L = max(r["length"] for r in acc if r["fmt"] in fmts)
        sel = [r for r in steps if r["fmt"] in fmts and r["length"] == L]
        R.band(ax, sel, "step", "accuracy", "variant", palette.colors)
        ax.axvline(hi, color="gray", ls="--", lw=1, label=f"max train length {hi}")
        if chance:
            ax.axhline(chance, color="red", ls=":", lw=1, label=f"chance {chance:g}")
        ax.set(xlabel="step index i", ylabel="accuracy of step i (greedy)", ylim=(-0.02, 1.02),
               title=f"per-step accuracy at {what} = {L}")
        R.legend_outside(ax)
        ax.grid(alpha=0.3)
    R.save_figure(fig, out / "steps.png")


def retrieval_mass(records, cfg):
    """Per retrieving format's record: its label and the attention from step i to bit i of its
    retrieving head (best_head), one value per step at n = map_length."""
    out = []
    for rec in records:
        if rec.get("mass") and rec["cell"]["fmt"] in RETRIEVING:
            layer, head = retrieving_head(rec, cfg)
            out.append((rec["label"], np.asarray(rec["mass"][layer][head], dtype=float)))
    return out


def retrieving_head(rec, cfg):
    """(layer, head) that reads bit i best at the longest tested n within the training length (from
    mass_by_n), or, for records without it, within the first train_max steps at n = map_length."""
    inside = [m for m in rec.get("mass_by_n") or () if m["length"] <= cfg.train_max]
    if not inside:
        return best_head(rec["mass"], cfg.train_max)
    m = np.asarray(max(inside, key=lambda m: m["length"])["mass"])  # (L, nh)
    return np.unravel_index(m.argmax(), m.shape)


def mass_rows(records, cfg):
    """Tidy rows {variant, fmt, setting, seed, length, mass}: attention from the query of step i to bit i, averaged
    over steps and 32 examples of length n, in each record's retrieving head."""
    rows = []
    for rec in records:
        if rec.get("mass_by_n"):
            layer, head = retrieving_head(rec, cfg)
            rows += [{"variant": rec["label"], "fmt": rec["cell"]["fmt"], "setting": rec["setting"],
                      "seed": rec["cell"]["seed"], "length": m["length"], "mass": m["mass"][layer][head]}
                     for m in rec["mass_by_n"]]
    return rows


def learned_score(rec, cfg):
    """Final-answer accuracy at the longest training length, then nearest map_length: which seed to show."""
    rows = R.select(rec["rows"], table="accuracy")
    if not rows:
        return 0.0, 0.0
    return tuple(min(rows, key=lambda r: abs(r["length"] - L))["accuracy"] for L in (cfg.train_max, cfg.map_length))


def maps_to_show(records, cfg):
    """[(record, seeds it was chosen from, which maps, their n)]: per scratchpad / mnemonic setting, the seed
    that learned best (a map of a model that failed in distribution would show nothing about length).
    Chosen among all seeds, so a folder that keeps only that seed's maps (the committed ones) draws the same."""
    show = []
    for f in ("scratchpad", "mnemonic"):
        for lab in sorted({rec["label"] for rec in records if rec["cell"]["fmt"] == f}):
            recs = [rec for rec in records if rec["label"] == lab]
            rec = max(recs, key=lambda r: learned_score(r, cfg))
            if not rec.get("maps"):
                continue
            if rec.get("maps_train"):
                show.append((rec, len(recs), "maps_train", cfg.train_max))
            show.append((rec, len(recs), "maps", cfg.map_length))
    return show


def draw_maps(axes, rec, of, key, n, cfg):
    """One row of heatmaps: every head of the retrieving layer of rec, maps `key` at n."""
    layer, _ = retrieving_head(rec, cfg)
    for h, ax in enumerate(axes):
        ax.imshow(np.asarray(rec[key][layer][h]), cmap="viridis", vmin=0, aspect="auto", interpolation="nearest")
        if n > cfg.train_max:
            ax.axvline(cfg.train_max - 0.5, color="w", ls="--", lw=1)
            ax.axhline(cfg.train_max - 0.5, color="w", ls="--", lw=1)
        ax.set(title=f"n = {n}: layer {layer} head {h}", xlabel="input bit j", ylabel="step i")
        if h == 0:
            best = f" (best of {of})" if of > 1 else ""
            ax.set_ylabel(f"{rec['label']}\nseed {rec['cell']['seed']}{best}\nstep i", fontsize=7)
        ax.title.set_fontsize(8)


def draw_mass(ax, ax_n, records, cfg, palette):
    """The retrieving head's mass on bit i: per step at n = map_length (ax), and by n (ax_n, if given)."""
    curves = [{"variant": lab, "step": i + 1, "mass": v} for lab, m in retrieval_mass(records, cfg)
              for i, v in enumerate(m)]
    R.band(ax, curves, "step", "mass", "variant", palette.colors)
    ax.axvline(cfg.train_max, color="gray", ls="--", lw=1, label=f"max train length {cfg.train_max}")
    ax.set(xlabel="step i", ylabel="attention on bit i", ylim=(0, 1.02),
           title=f"per step, n = {cfg.map_length} (mean ± std over seeds)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if ax_n is not None:
        by_n = mass_rows(records, cfg)
        R.plot_vs_length(by_n, "mass", None, cfg.train_max, ax=ax_n, style=palette, ylabel="attention on bit i",
                         title="vs n, averaged over the steps (mean ± std, dots: seeds)", seeds=True)
        ax_n.set_ylim(0, 1.02)
        R.ticks_at(ax_n, sorted({r["length"] for r in by_n}))
        ax_n.title.set_fontsize(9)


def fig_attention(records, cfg, palette, out):
    """attention.png: the maps of the retrieving layer (per format and setting, the seed that did best
    at map_length), and the mass from step i to bit i vs i, mean ± std over seeds."""
    with_maps = [rec for rec in records if rec.get("maps")]
    if not with_maps:
        return
    show = maps_to_show(records, cfg) or [(with_maps[0], 1, "maps", cfg.map_length)]
    nh = len(show[0][0]["maps"][0])
    fig, axes = R.pyplot().subplots(len(show) + 1, nh, figsize=(3.1 * nh, 3.0 * (len(show) + 1)), squeeze=False)
    for i, (rec, of, key, n) in enumerate(show):
        draw_maps(axes[i], rec, of, key, n, cfg)
    gs = axes[-1, 0].get_gridspec()
    for ax in axes[-1]:
        ax.remove()
    by_n = bool(mass_rows(records, cfg))
    draw_mass(fig.add_subplot(gs[-1, :nh // 2 if by_n else nh]), fig.add_subplot(gs[-1, nh // 2:]) if by_n else None,
              records, cfg, palette)
    fig.suptitle("attention from scratchpad step i (rows) to input bit j (columns), one example, layer of the retrieving "
                 "head\n(the head that reads bit i best within the training length); dashed: training length. "
                 "Bottom: the mass that head puts on bit i", fontsize=10)
    R.save_figure(fig, out / "attention.png")


def fig_variance(probe, groups, palette, out):
    """variance.png: the attention-output std at the query that writes the final answer, per layer."""
    panels = [([r for r in probe if r["fmt"] in fmts and r["layer"] == layer], hi,
               f"layer {layer}: attention-output std\nat the answer query; x: {what}", "variant")
              for fmts, hi, _, what in groups for layer in sorted({r["layer"] for r in probe})]
    if panels:
        R.fig_attention_std(panels, out / "variance.png", "test length", palette)


def say_tables(records, acc, probe, groups, cfg, say):
    """Per group: ID vs OOD tables of every metric, final-answer accuracy by length; then the
    attention-output std ratio, the retrieval mass, and a few decoded examples."""
    for fmts, hi, _, what in groups:
        recs = [{**rec, "rows": R.select(rec["rows"], table="accuracy")} for rec in records if rec["cell"]["fmt"] in fmts]
        for metric in ("accuracy", "exact", "stop_early", "stop_late"):
            if any(metric in r for rec in recs for r in rec["rows"]):
                R.summarize(recs, metric, hi, say=say)
        say(f"\nfinal-answer accuracy by {what} (mean ± std over seeds):")
        group_acc = [r for r in acc if r["fmt"] in fmts]
        say_per_seed(group_acc, say_by_length(group_acc, "accuracy", say), what, say)
    if probe:
        say("\nattention-output std at the answer query, std(longest n) / std(shortest n), mean over seeds:")
        for g, (xs, m, _, _) in sorted(R.mean_std_by(probe, "length", "comp_std", ("variant", "layer")).items()):
            say(f"  {g[0]:<28} layer {g[1]}: {m[-1] / m[0]:.2f}  (n = {xs[0]} -> {xs[-1]})")
    mass = retrieval_mass(records, cfg)
    if mass:
        say(f"\nattention mass from step i to bit i at n = {cfg.map_length} (retrieving head), mean over seeds:")
        for g, (inside, beyond, last) in mass_table(mass, cfg).items():
            say(f"  {g:<28} steps <= {cfg.train_max}: {inside:.2f}   steps > {cfg.train_max}: {beyond:.2f}   "
                f"last step: {last:.2f}")
    say_final_losses(records, say)
    by_n = mass_rows(records, cfg)
    if by_n:
        say("\nattention on bit i by n (retrieving head, averaged over the steps of 32 examples; mean ± std over seeds):")
        say_by_length(by_n, "mass", say)
    for rec in records:
        if rec["cell"]["seed"] == 0 and rec.get("examples"):
            say(f"\nexamples ({rec['label']}, seed 0):")
            for e in rec["examples"][:4]:
                say(f"  {e if len(e) < 400 else e[:400] + ' ...'}")


def say_by_length(rows, y, say):
    """A table of y, mean ± std over seeds, a line per variant and a column per length; returns the lengths."""
    Ls = sorted({r["length"] for r in rows})
    w = max(len(r["variant"]) for r in rows)
    say(f"  {'':<{w}}" + "".join(f"{L:>12}" for L in Ls))
    for g, (xs, m, s, n) in sorted(R.mean_std_by(rows, "length", y, "variant").items()):
        at = dict(zip(xs, zip(m, s)))
        say(f"  {g:<{w}}" + "".join(f"{at[L][0]:>6.2f}±{at[L][1]:<5.2f}" if L in at else f"{'-':>12}" for L in Ls))
    return Ls


def say_final_losses(records, say):
    """The loss of the last training batch, copy pre-training and task, median [min, max] over seeds: did
    a setting that failed at least fit its training data?"""
    say("\nfinal training loss (last batch), median [min, max] over seeds:")
    for lab in sorted({rec["label"] for rec in records}):
        recs = [rec for rec in records if rec["label"] == lab and rec["status"] == "ok"]
        text = []
        for stage, name in (("pretrain", "copy pre-training"), ("train", "task")):
            v = [rec[stage]["final_loss"] for rec in recs if (rec.get(stage) or {}).get("final_loss") is not None]
            if v:
                text.append(f"{name} {np.median(v):.3g} [{min(v):.3g}, {max(v):.3g}]")
        say(f"  {lab}: " + "; ".join(text or ["-"]) + f" ({len(recs)} seeds)")


def say_per_seed(acc, Ls, what, say):
    """Final-answer accuracy of every seed at every length: the seeds behind each mean above."""
    say(f"\nfinal-answer accuracy per seed, by {what}:")
    for g in sorted({r["variant"] for r in acc}):
        say(f"  {g}\n  {'seed':>6}" + "".join(f"{L:>7}" for L in Ls))
        for seed in sorted({r["seed"] for r in acc if r["variant"] == g}):
            at = {r["length"]: r["accuracy"] for r in acc if r["variant"] == g and r["seed"] == seed}
            say(f"  {seed:>6}" + "".join(f"{at[L]:>7.3f}" if L in at else f"{'-':>7}" for L in Ls))


def mass_table(mass, cfg):
    """{label: (mean mass of steps within the training length, beyond it, at the last step)} over seeds."""
    by = {}
    for lab, m in mass:
        by.setdefault(lab, []).append((m[:cfg.train_max].mean(), m[cfg.train_max:].mean(), m[-1]))
    return {g: tuple(np.array(v).mean(0)) for g, v in sorted(by.items())}


GENERALIZES = 0.95  # a seed generalizes: final-answer accuracy >= this at GENERALIZE_X x the longest training length
GENERALIZE_X = 3
LEARNED = 0.98  # a seed learned the task: final-answer accuracy >= this at every tested n within the training lengths


def report(records, cfg, out):
    """Figures, claims.json and the printed summary, from the cell records alone (so --plot-only
    redraws them)."""
    out = Path(out)
    records = labelled(records)
    rows = [r for rec in records for r in rec["rows"]]
    acc, steps, probe = (R.select(rows, table=t) for t in ("accuracy", "step", "probe"))
    palette = R.Palette(r["variant"] for r in rows)  # one colour per format / setting in every figure
    say = R.Summary()
    if not R.training_report(records, out, say):  # every cell diverged: nothing else to draw
        return say.write(out)
    groups = length_groups(acc, cfg)
    fig_accuracy(acc, groups, palette, out)
    fig_steps(acc, steps, groups, palette, out)
    fig_attention(records, cfg, palette, out)
    fig_variance(probe, groups, palette, out)
    say(f"\n=== parity_random_access: {sum(r['status'] == 'ok' for r in records)} runs ok, "
        f"{sum(r['status'] == 'diverged' for r in records)} diverged ===")
    verdicts = claims(acc, mass_rows(records, cfg), cfg)
    faults.atomic_write(out / "claims.json", json.dumps(verdicts, indent=1))
    budget = ", copy pre-training + task steps]" if mixed_budgets(records) \
        else f"]; {cfg.pretrain_steps} copy pre-training steps"
    say(f"\nthe paper's claims next to what was measured (final-answer accuracy, mean ± std over seeds; "
        f"[position encoding, training position ids{budget}; a seed "
        f"generalizes when its accuracy is >= {GENERALIZES} at {GENERALIZE_X}x the longest training length, "
        "or at the longest tested length below that; the verdict is judged there too)")
    for c in verdicts:
        say(claim_line(c))
    say_claim_table(verdicts, say)
    say_tables(records, acc, probe, groups, cfg, say)
    say.write(out)


def seeds_generalizing(acc, g, at):
    """(k, n, (lo, hi)): seeds of setting g whose final-answer accuracy at length `at` is >= GENERALIZES,
    with the 95% Wilson interval."""
    v = R.per_seed(acc, "accuracy", variant=g, length=at)
    k = sum(x >= GENERALIZES for x in v.values())
    return k, len(v), R.wilson_ci(k, len(v))


def seeds_learned(acc, g, hi):
    """(k, n, (lo, hi)): seeds of setting g with final-answer accuracy >= LEARNED at every tested length
    <= hi (the task learned in distribution), with the 95% Wilson interval."""
    rows = [r for r in R.select(acc, variant=g) if r["length"] <= hi]
    seeds = sorted({r["seed"] for r in R.select(acc, variant=g)})
    k = sum(all(r["accuracy"] >= LEARNED for r in rows if r["seed"] == s) for s in seeds)
    return k, len(seeds), R.wilson_ci(k, len(seeds))


def reproduced(ok, why=""):
    return "reproduced" if ok else f"NOT reproduced{why}"


# The verdict rules, each (accuracy at the longest training n, at 3x, mnemonic's at its longest n) -> words.
def learns_then_collapses(inside, at_3x, mnemonic):
    return reproduced(inside >= 0.95 and at_3x <= 0.6)


def no_length_general_rule(inside, at_3x, mnemonic):
    return reproduced(at_3x <= 0.6)


def generalizes(inside, at_3x, mnemonic):
    return reproduced(at_3x >= 0.95, " (partly)" if at_3x > 0.6 else "")


def fails_without_a_unique_key(inside, at_3x, mnemonic):
    """Near chance at 3x, and well below mnemonic where it ran."""
    if math.isnan(mnemonic):
        return reproduced(at_3x <= 0.6) + " (no mnemonic run to compare)"
    return reproduced(at_3x <= 0.6 and at_3x < mnemonic - 0.2)


def measured(inside, at_3x, mnemonic):
    return "measured"


def measured_alone(inside, at_3x, mnemonic):  # add-mnemonic's, until addition_verdict() pairs it with plain add
    return "measured (no plain add run to compare)"


ACCURACY_CLAIMS = (  # (format, claim, verdict rule), in the order of the paper
    ("scratchpad", "(1) scratchpad learns in distribution, collapses beyond", learns_then_collapses),
    ("none", "(1) no scratchpad: no length-general rule", no_length_general_rule),
    ("interleaved", "(2) interleaved (no indexing) generalizes", generalizes),
    ("mnemonic", "(3) mnemonic anchors generalize", generalizes),
    ("constant", "(3) without a unique key it fails", fails_without_a_unique_key),
    ("cyclic", "(3) without a unique key it fails", fails_without_a_unique_key),
    ("misaligned", "(3) without a unique key it fails", fails_without_a_unique_key),
    ("add", "(5) addition, plain", measured),
    ("add-mnemonic", "(5) addition with mnemonics generalizes further than plain", measured_alone))


def accuracy_claim(acc, fmt, setting, claim, rule, mnemonic, cfg):
    """One claim on final-answer accuracy as data: at the longest training n, at GENERALIZE_X x it and at
    the longest tested n (mean, std, median over seeds), the seeds that learned and that generalize (95%
    Wilson intervals), and rule's verdict. None where the format was not run in this setting."""
    g = next((r["variant"] for r in acc if r["fmt"] == fmt and r["setting"] == setting), None)
    if g is None:
        return None
    hi = cfg.add_train_max if fmt in ADD_FORMATS else cfg.train_max
    tested = sorted({r["length"] for r in R.select(acc, variant=g)})
    top, gen_at = tested[-1], max([L for L in tested if L <= GENERALIZE_X * hi] or [tested[-1]])
    inside, at_gen, beyond = (R.seed_stats(list(R.per_seed(acc, "accuracy", variant=g, length=L).values()))
                              for L in (hi, gen_at, top))
    k, n, ci = seeds_generalizing(acc, g, gen_at)
    kl, _, cil = seeds_learned(acc, g, hi)
    return {"claim": claim, "setting": setting, "fmt": fmt, "variant": g, "train_max": hi, "test_max": top,
            "inside": inside, "at_generalize": at_gen, "beyond": beyond, "seeds_learned": kl, "seeds_learned_ci": cil,
            "generalize_at": gen_at, "seeds_ok": k, "seeds": n, "seeds_ok_ci": ci,
            "verdict": rule(inside["mean"], at_gen["mean"], mnemonic)}


def mass_claim(by_n, fmt, setting, cfg):
    """Claim (4) as data: the retrieving head's mass on bit i at n = train_max and at 3x (mass_rows())."""
    rows = R.select(by_n, fmt=fmt, setting=setting)
    if not rows:
        return None
    tested = sorted({r["length"] for r in rows})
    at_in = max([L for L in tested if L <= cfg.train_max] or tested[:1])
    at_out = max([L for L in tested if L <= GENERALIZE_X * cfg.train_max] or tested[-1:])
    return {"claim": "(4) step i attends to bit i", "setting": setting, "fmt": fmt, "n_inside": at_in,
            "n_beyond": at_out, "mass_inside": R.seed_stats(list(R.per_seed(rows, "mass", length=at_in).values())),
            "mass_beyond": R.seed_stats(list(R.per_seed(rows, "mass", length=at_out).values())), "verdict": "measured"}


def addition_verdict(acc, add, mnem):
    """Claim (5): add-mnemonic minus plain add at 3x the digits, paired by seed on the same sums."""
    d = [p for p in R.paired_diff_ci(acc, "accuracy", mnem["variant"], add["variant"])
         if p["length"] == mnem["generalize_at"]]
    mnem["paired_at_generalize"] = d[0] if d else None
    mnem["verdict"] = reproduced(bool(d) and d[0]["lo"] > 0) + \
        ("" if add["seeds_learned"] else " (plain add never learned the training range)")


def claims(acc, by_n, cfg):
    """The paper's claims as data, one dict per (claim, setting), judged at GENERALIZE_X x the longest
    training length (the paper's 20 -> 60): ACCURACY_CLAIMS, then the attention mass of claim (4), then
    the paired addition comparison. by_n: mass_rows()."""
    out = []
    for setting in sorted({r["setting"] for r in acc}):
        made, mnemonic = {}, float("nan")  # mnemonic's accuracy at its longest n, where it ran
        for fmt, claim, rule in ACCURACY_CLAIMS:
            made[fmt] = accuracy_claim(acc, fmt, setting, claim, rule, mnemonic, cfg)
            if fmt == "mnemonic" and made[fmt]:
                mnemonic = made[fmt]["beyond"]["mean"]
        out += [c for fmt, c in made.items() if c and fmt not in ADD_FORMATS]
        out += [c for c in (mass_claim(by_n, f, setting, cfg) for f in ("scratchpad", "mnemonic")) if c]
        if made["add"] and made["add-mnemonic"]:
            addition_verdict(acc, made["add"], made["add-mnemonic"])
        out += [c for c in (made["add"], made["add-mnemonic"]) if c]
    return out


def say_claim_table(verdicts, say):
    """The accuracy claims as a markdown table: final-answer accuracy mean ± std (median) over seeds at the
    longest training n, at 3x and at the longest tested n; the seeds that learned the task and that
    generalize, with 95% Wilson intervals."""
    rows = [[c["claim"], f"`{c['fmt']}`", c["setting"], f"n = {c['train_max']}: {R.stat_text(c['inside'])}",
             f"n = {c['generalize_at']}: {R.stat_text(c['at_generalize'])}", f"n = {c['test_max']}: {R.stat_text(c['beyond'])}",
             f"{c['seeds_learned']}/{c['seeds']} [{c['seeds_learned_ci'][0]:.2f}, {c['seeds_learned_ci'][1]:.2f}]",
             f"{c['seeds_ok']}/{c['seeds']} [{c['seeds_ok_ci'][0]:.2f}, {c['seeds_ok_ci'][1]:.2f}]", c["verdict"]]
            for c in verdicts if "inside" in c]
    if rows:
        R.markdown_table(say, ["claim", "format", "setting", "longest training n", "at 3x", "longest n",
                               f"seeds that learned it (>= {LEARNED} at every n within training) [95% CI]",
                               f"seeds that generalize (>= {GENERALIZES} at 3x) [95% CI]", "verdict"], rows)


def claim_line(c):
    """One printed line of a claim."""
    if "mass_inside" in c:
        i, o = c["mass_inside"], c["mass_beyond"]
        return (f"  [{c['setting']}] {c['claim']}, {c['fmt']} (retrieving head, mean ± std over seeds): "
                f"n={c['n_inside']} {i['mean']:.2f} ± {i['std']:.2f}, n={c['n_beyond']} {o['mean']:.2f} ± {o['std']:.2f}")
    i, o, ci, cl = c["inside"], c["beyond"], c["seeds_ok_ci"], c["seeds_learned_ci"]
    return (f"  [{c['setting']}] {c['claim']}: {c['fmt']} n={c['train_max']} {i['mean']:.2f} ± {i['std']:.2f}, "
            f"n={c['test_max']} {o['mean']:.2f} ± {o['std']:.2f} (median {o['median']:.2f}); learned (>= {LEARNED} "
            f"at every n <= {c['train_max']}): {c['seeds_learned']}/{c['seeds']} [{cl[0]:.2f}, {cl[1]:.2f}]; "
            f"generalize (>= {GENERALIZES} at n={c['generalize_at']}): {c['seeds_ok']}/{c['seeds']} "
            f"[{ci[0]:.2f}, {ci[1]:.2f}]{paired_text(c)} -> {c['verdict']}")


def paired_text(c):
    """', minus plain add ...' for the addition claim: the paired difference at 3x with its 95% t-interval."""
    d = c.get("paired_at_generalize")
    return f"; minus plain add at n={c['generalize_at']}, paired by seed: {R.diff_text(d)} ({d['n']} seeds)" \
        if d else ""



def examples_of_formats(cfg):
    for fmt in cfg.formats:
        ex = sample_batch(np.random.default_rng(0), 1, 4, fmt, cfg.anchors, cfg.cycle)
        print(f"{fmt:>13} (n=4): {decode(ex['idx'][0].tolist())}")


SCRIPT = H.Script(
    name="parity_random_access", description=__doc__.splitlines()[0], config=Config, presets=PRESETS,
    axes={"seed": "seeds", "fmt": "formats", "pos": "pos"},  # seed-major: a stopped run holds whole seeds
    build=build, train=train, evaluate=evaluate, report=report, validate=validate, examples=examples_of_formats,
    eval_fields=("test_lengths", "add_test_lengths", "eval_examples", "probe_examples", "map_length"),
    seq_lens=seq_lens,
    experiments={"main": [{}],  # the formats and settings the flags give
                 "claims": [dict(seeds=10, formats=f, pos=p, **change) for f, p, change in CLAIMS_RUNS]})

if __name__ == "__main__":
    H.main(SCRIPT)

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
      beyond it;
  (5) mnemonics also help multi-digit addition beyond the trained number of digits.

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

Commands (their run times on 2 CPU cores: docs/parity_random_access.md):
  python parity_random_access.py                       # quick: scratchpad, interleaved, mnemonic, 3 seeds
  python parity_random_access.py --preset smoke        # seconds: what the tests run
  python parity_random_access.py --formats none,constant,cyclic,misaligned   # the anchor ablations
  python parity_random_access.py --formats add,add-mnemonic                   # addition at the quick budget
      # (too short to learn it: the claims setting gives 2000 + 6000 steps)
  python parity_random_access.py --formats mnemonic --pretrain-steps 2000 --steps 3000
  python parity_random_access.py --device cuda --preset paper   # every format, RoPE and NoPE, n to 100, 5 seeds
  python parity_random_access.py --experiment claims   # the claim table: CLAIMS_RUNS, each format in the setting
      # where it learns, 10 seeds, n to 100, one resumable folder (results/parity_random_access/claims)

Deviations: no code was released with the paper. Our models are small transformers trained from scratch; the paper's were most likely
pretrained language models, fine-tuned, hence the two ingredients above (reported with and without).
The exact token layouts above, the ablations' details (cyclic period 4; misaligned = fresh anchors in
the scratchpad) and the '$' stopping rule are our choices.

Read with common.py (the model, training and evaluation); the results are in docs/parity_random_access.md.
"""
import functools
from dataclasses import dataclass, replace

import numpy as np
import torch

import common as C
import harness as H
import parity_random_access_report as PR

PLUS, SEP, EOS, BOS, A0 = 10, 11, 12, 13, 14
NAMES = {PLUS: "+", SEP: "=", EOS: "$", BOS: "^"}
PARITY_FORMATS = ("none", "scratchpad", "interleaved", "mnemonic", "constant", "cyclic", "misaligned")
ADD_FORMATS = ("add", "add-mnemonic")
FORMATS = PARITY_FORMATS + ADD_FORMATS
COPY_MAX = 40  # copy pre-training sequences: 5..COPY_MAX tokens, copied once (at most 2 * 40 + 2 tokens)
FAMILIES = {"parity": PARITY_FORMATS, "addition": ADD_FORMATS}  # the report tells them apart
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


def render(ids):
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
# --experiment depth: `none` (no scratchpad) at 1, 3, 4 and 6 blocks, the claims run's budget otherwise. One
# layer provably cannot compute parity; four suffice for a construction (Kozachinskiy, Steifer & Walega 2026,
# "Parity, Sensitivity, and Transformers", arXiv 2602.05896). The 3-block cells are the claims run's `none` cells.
DEPTHS = (1, 3, 4, 6)


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

def build(cell, cfg):
    """The cell's model, untrained (the harness seeds torch with the cell's seed first: the init seed)."""
    return build_model(cell["fmt"], cell["pos"], cfg)


def seq_lens(cell, cfg):
    """(longest training sequence, longest test sequence) in tokens."""
    (_, hi), lengths = lengths_of(cell["fmt"], cfg)
    return seq_len(cell["fmt"], hi), seq_len(cell["fmt"], max(lengths))


def train(model, cell, cfg):
    """Optional copy pre-training, then the task (each with its own optimizer run and data seed)."""
    fmt, pos, seed = cell["fmt"], cell["pos"], cell["seed"]
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


def evaluate(model, cell, cfg):
    """Accuracy per n and per step, probes, decoded examples, and the attention on the bits."""
    fmt, device = cell["fmt"], torch.device(cell["device"])
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
            out.append(f"n={n} {verdict}: {render(gold[i, :start].tolist())} -> model: "
                       f"{render(seq[i, start:].tolist())}  (gold: {render(gold[i, start:].tolist())})")
    return out


def examples_of_formats(cfg):
    for fmt in cfg.formats:
        ex = sample_batch(np.random.default_rng(0), 1, 4, fmt, cfg.anchors, cfg.cycle)
        print(f"{fmt:>13} (n=4): {render(ex['idx'][0].tolist())}")


SCRIPT = H.Script(
    name="parity_random_access", description=__doc__.splitlines()[0], config=Config, presets=PRESETS,
    axes={"seed": "seeds", "fmt": "formats", "pos": "pos"},  # seed-major: a stopped run holds whole seeds
    build=build, train=train, evaluate=evaluate, report=functools.partial(PR.report, families=FAMILIES),
    validate=validate, examples=examples_of_formats,
    eval_fields=("test_lengths", "add_test_lengths", "eval_examples", "probe_examples", "map_length"),
    seq_lens=seq_lens,
    experiments={"main": [{}],  # the formats and settings the flags give
                 "claims": [dict(seeds=10, formats=f, pos=p, **change) for f, p, change in CLAIMS_RUNS],
                 "depth": [dict(seeds=10, formats=("none",), pos=("rope",), n_layer=n, test_lengths=CLAIMS_TEST)
                           for n in DEPTHS]})

if __name__ == "__main__":
    H.main(SCRIPT)

"""vanishing_variance.py — attention-output variance and LayerNorm after attention.

Reproduces Li, Boduljak & Zhou, "On Vanishing Variance in Transformer Length Generalization",
ICLR 2025 SCOPE workshop, arXiv 2504.02827. Their claims:
  (1) for a fixed query, the variance of the attention output shrinks as the number of attended
      tokens N grows (uniform attention over i.i.d. values: Var = sigma^2 / N);
  (2) so the layers after attention see a distribution shift at lengths beyond training;
  (3) LayerNorm on the attention output gives significantly better length generalization on argmax
      retrieval and dictionary lookup; it reduces, but does not remove, the shift.

What this script does (`python vanishing_variance.py`, the `quick` preset):
  * theory: the closed form sigma^2/N and a simulation of softmax attention with a fixed query, with
    their log-log slopes (numpy, seconds);
  * trains NoPE transformers at N = 16 on both tasks, with attn_out_norm = none | layernorm |
    standardize (common.GPTConfig.attn_out_norm), several seeds, and tests every model on the same examples at
    N = 16 ... 2048 (quick) or ... 16384 (paper);
  * measures per length, at the query: accuracy, the per-component std of the attention output across
    samples (the paper's Fig. 1) before and after the norm, the per-vector mean and variance (its
    Fig. 3), per-feature distributions (its Fig. 2), attention entropy / effective number of attended
    tokens and the attention mass on the item that holds the answer;
  * compares layernorm and standardize against none per seed, paired on identical test sets, with a
    95% confidence interval, and prints the paper's claim next to what was measured.

Beyond the paper: vanishing_variance_beyond.py runs the fix ladder (headnorm, gate, ssmax, logn, with
vanishing_variance_fixes.py's models), test-time edits, argmax-gap and the training-length runs on these
same models; the flags --heads, --edits and --train-mix below are its measurements.

Tasks (order-invariant; the model has no positional encoding). Every input token is one item
(a, b) embedded as A(a) + B(b); b = n_classes marks the query token. The answer is read at the query.
  argmax retrieval  N items (priority a, payload b): distinct priorities from a grid of 2^30 values,
                    embedded with sin/cos features of a / 2^30 (continuous and ordered, as in
                    Velickovic et al. 2024); target = payload of the largest priority.
                    Example, N = 4, 8 classes: (51, 2) (902, 5) (7, 1) (424, 0) query -> 5
  argmax-gap        argmax retrieval whose largest priority exceeds all others by at least 1/16 of
                    the range at every N (beyond the paper: vanishing_variance_beyond.py --experiment gap; with continuous
                    priorities the top two drift together like 1/N, which sharper attention cannot undo)
  dictionary lookup N (key a, value b) pairs with distinct keys from a key set of 4 x the largest test
                    N (learned key table); then the query (key, marker); target = that key's value.
                    Example, N = 3: (17, 4) (3, 0) (250, 6) query(3) -> 0
Token id = a * (n_classes + 1) + b.

Commands (run times: docs/vanishing_variance.md):
  python vanishing_variance.py                          # quick: minutes on a laptop CPU
  python vanishing_variance.py --preset smoke           # seconds: what the tests run
  python vanishing_variance.py --device cuda --preset paper   # N to 16384, 5 seeds
  python vanishing_variance.py --n-layer 1 --mlp false  # other architectures (docs/vanishing_variance.md)

Deviations from the paper: the paper's body gives few architecture details, so we train small
NoPE models from scratch (2 pre-LN blocks, d = 64, 4 heads by default: of the architectures we
tried, the one where the claim shows most; docs/vanishing_variance.md); the argmax encoding follows
Velickovic et al.'s max-retrieval setup with our own priority embedding; the Llama-3.2-1B measurement
of Fig. 1 is out of scope (no model downloads here), our Fig. 1 quantity comes from the trained
models and the theory curves.

Read with common.py (the model, training and evaluation); the results are in docs/vanishing_variance.md.
"""
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

import common as C
import harness as H
import vanishing_variance_fixes as fixes
import vanishing_variance_report as VVR

TASKS = ("argmax", "lookup", "argmax-gap")  # argmax-gap: beyond the paper (vanishing_variance_beyond.py)
GAP = 1 / 16  # argmax-gap: the largest priority exceeds all others by at least this fraction of the range
VARIANTS = C.ATTN_OUT_NORMS + fixes.FIXES  # the paper's norms (common.py), then the fix ladder's (the fixes module)
GRID = 2**30  # argmax priorities: distinct integers below GRID


# ---------------------------------------------------------------------------------------- tasks

def sample_argmax(rng, batch_size, length, n_classes=8, gap=0.0):
    """Argmax retrieval: `length` items (priority, payload) and a query; target = payload of the
    item with the largest priority. Returns idx (B, N+1), at (B, 1), targets (B, 1), item (B,)
    (the position of the answering item). gap > 0 (task argmax-gap): priorities are drawn below
    (1 - gap) GRID and the largest is then raised by gap GRID, so it exceeds every other by at least
    gap (in units of the whole range) at every N; with gap = 0 the top two drift together like 1/N."""
    q = _distinct(rng, batch_size, length, round(GRID * (1 - gap)))  # distinct priorities within an example
    c = rng.integers(0, n_classes, size=(batch_size, length))
    item = q.argmax(1)
    q[np.arange(batch_size), item] += round(GRID * gap)
    return _pack(q, c, np.zeros(batch_size, dtype=np.int64), c[np.arange(batch_size), item], item, n_classes)


def sample_lookup(rng, batch_size, length, n_classes=8, n_keys=8192):
    """Dictionary lookup: `length` (key, value) pairs with distinct keys from range(n_keys), then a
    query key; target = its value. Same returns as sample_argmax."""
    if n_keys < length:
        raise C.UsageError(f"dictionary lookup needs n_keys >= length ({n_keys} < {length})")
    if length * length < n_keys:  # duplicates are rare: draw and redraw the odd row
        keys = _distinct(rng, batch_size, length, n_keys)
    else:                          # a random subset per row
        keys = np.argsort(rng.random((batch_size, n_keys)), axis=1)[:, :length]
    vals = rng.integers(0, n_classes, size=(batch_size, length))
    item = rng.integers(0, length, size=batch_size)
    rows = np.arange(batch_size)
    return _pack(keys, vals, keys[rows, item], vals[rows, item], item, n_classes)


def _distinct(rng, b, n, high):
    """(b, n) integers below high, distinct within each row (rows with a repeat are redrawn)."""
    x = rng.integers(0, high, size=(b, n))
    while True:
        s = np.sort(x, axis=1)
        tied = (s[:, 1:] == s[:, :-1]).any(axis=1)
        if not tied.any():
            return x
        x[tied] = rng.integers(0, high, size=(int(tied.sum()), n))


def _pack(a, b, query_a, target, item, n_classes):
    """Items (a, b) then the query (query_a, n_classes) as token ids a * (n_classes + 1) + b."""
    B, N = a.shape
    ids = np.concatenate([a * (n_classes + 1) + b, (query_a * (n_classes + 1) + n_classes)[:, None]], axis=1)
    return {"idx": torch.from_numpy(ids), "at": torch.full((B, 1), N), "targets": torch.from_numpy(target)[:, None],
            "item": torch.from_numpy(item)}


def render(batch, i, n_classes=8):
    """Human-readable example i of a batch: '(a,b) (a,b) ... ? -> target'."""
    ids = batch["idx"][i].tolist()
    items = " ".join(f"({t // (n_classes + 1)},{t % (n_classes + 1)})" for t in ids[:-1][:6])
    more = " ..." if len(ids) > 7 else ""
    return f"{items}{more} query({ids[-1] // (n_classes + 1)}) -> {int(batch['targets'][i, 0])}"


class ItemEmbedding(nn.Module):
    """Embeds token id = a * (n_classes + 1) + b as A(a) + B(b). A: for argmax, a learned linear map
    of sin/cos features of the priority a / GRID (continuous, ordered); for lookup, a key table."""

    def __init__(self, task, n_embd, n_classes, n_keys, n_freq=16):
        super().__init__()
        self.task, self.nb = task, n_classes + 1
        self.B = nn.Embedding(self.nb, n_embd)
        if task.startswith("argmax"):
            self.register_buffer("freq", math.pi * torch.arange(1, n_freq + 1, dtype=torch.float32))
            self.A = nn.Linear(2 * n_freq + 1, n_embd)
        else:
            self.A = nn.Embedding(n_keys, n_embd)
        nn.init.normal_(self.B.weight, std=0.02)
        nn.init.normal_(self.A.weight, std=0.02)

    def forward(self, idx):
        a, b = idx // self.nb, idx % self.nb
        if self.task.startswith("argmax"):  # in float32 under bf16 autocast too: 8 bits would merge priorities
            p = (a.double() / GRID).float()[..., None]  # (B, T, 1) in [0, 1)
            with torch.autocast(idx.device.type, enabled=False):
                a_emb = self.A(torch.cat([p, (p * self.freq).sin(), (p * self.freq).cos()], dim=-1))
        else:
            a_emb = self.A(a)
        return a_emb + self.B(b)  # (B, T, C)


# ---------------------------------------------------------------------------------------- config

@dataclass
class Config(C.TrainConfig):
    tasks: tuple = C.arg(("argmax", "lookup"), "tasks to run", choices=TASKS)
    variants: tuple = C.arg(("none", "layernorm", "standardize"), "norms on the attention output to compare",
                            choices=VARIANTS)
    n_layer: int = C.arg(2, "transformer blocks", min=1)
    mlp: bool = C.arg(True, "an MLP in each block (false: attention-only blocks)")
    n_head: int = C.arg(4, "attention heads", min=1)
    n_embd: int = C.arg(64, "model width", min=1)
    n_classes: int = C.arg(8, "payload / value classes (chance = 1 / n_classes)", min=2)
    train_len: int = C.arg(16, "number of items N during training", min=1)
    train_mix: bool = C.arg(False, "train on every N up to --train-len (each batch draws N uniformly from "
                            "1 .. train_len) instead of N = train_len only", late=True)
    mix_scale: str = C.arg("uniform", "how --train-mix draws N: uniform on 1 .. train_len, or log (N = 2^u, u uniform "
                           "on [0, log2 train_len]: half the batches at N <= sqrt(train_len))",
                           choices=("uniform", "log"), late=True)
    test_lengths: tuple = C.arg((16, 32, 64, 128, 256, 512, 1024, 2048), "test N", min=1)
    keep_lengths: tuple = C.arg((16, 256, 2048), "N whose raw attention outputs are kept for the distribution plot",
                                min=1)
    heads: bool = C.arg(False, "also measure each head's output std at the query (the fix ladder)")
    edits: bool = C.arg(False, "also apply the test-time edits to the none models (the fix ladder)")


PRESETS = {
    "smoke": dict(seeds=2, steps=40, eval_examples=64, test_lengths=(16, 64, 256), keep_lengths=(16, 256)),
    "quick": dict(seeds=3, steps=2000, lr=3e-3),
    "paper": dict(seeds=5, steps=10000, lr=3e-3, batch_size=128,
                  test_lengths=tuple(2**k for k in range(4, 15)), keep_lengths=(16, 256, 2048, 16384)),
}


def validate(cfg):
    """Constraints between flags, checked before any training."""
    C.check_model_shape(cfg.n_embd, cfg.n_head)
    C.check(cfg.train_len < max(cfg.test_lengths), f"--test-lengths must reach beyond --train-len {cfg.train_len} "
            f"(the longest is {max(cfg.test_lengths)}): nothing would be tested out of distribution")
    extra = sorted(set(cfg.keep_lengths) - set(cfg.test_lengths))
    C.check(not extra, f"--keep-lengths {','.join(map(str, extra))} not among --test-lengths")
    C.check(cfg.train_len >= 2 or not cfg.edits, "--edits needs --train-len >= 2 (they sharpen by log N / log N_train)")


def n_keys(cfg):
    return 4 * max(cfg.test_lengths)  # a key set of 4x the largest test N: keys stay distinct and mostly unseen


def sampler(task, cfg):
    """sample(rng, B, N) for a task."""
    if task == "argmax":
        return functools.partial(sample_argmax, n_classes=cfg.n_classes)
    if task == "argmax-gap":
        return functools.partial(sample_argmax, n_classes=cfg.n_classes, gap=GAP)
    return functools.partial(sample_lookup, n_classes=cfg.n_classes, n_keys=n_keys(cfg))


def test_key(task, cfg):
    """What sampler(task, cfg) draws: its test sets are drawn once per process under this key."""
    return ("vanishing_variance", task, cfg.n_classes, n_keys(cfg))


def build_model(task, variant, cfg):
    """A NoPE model with one attention variant: a norm after attention (common.GPT), or a fix of the
    ladder (vanishing_variance_fixes.FixGPT; n_train is the training sequence, train_len items + query)."""
    shape = dict(vocab_size=cfg.n_classes, block_size=1, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                 mlp=cfg.mlp, pos="none")
    if variant in fixes.FIXES:
        model = fixes.FixGPT(fixes.FixConfig(**shape, fix=variant, n_train=cfg.train_len + 1))
    else:
        model = C.GPT(C.GPTConfig(**shape, attn_out_norm=variant))
    model.wte = ItemEmbedding(task, cfg.n_embd, cfg.n_classes, n_keys(cfg))  # items, not a token table
    return model


# ---------------------------------------------------------------------------------------- one cell

def target_mass(batch, logits, recs):
    """Attention of the query on the item that holds the answer (max over heads; mean over layers)."""
    per_layer = []
    for r in recs:
        rows = r["attn"][:, :, 0]  # (B, nh, T): the query's attention
        on_item = rows.gather(2, batch["item"][:, None, None].expand(-1, rows.size(1), 1))[..., 0]  # (B, nh)
        per_layer.append(on_item.max(1).values)  # (B,)
    return {"target_mass": torch.stack(per_layer).mean(0)}


def at_length(rng, batch_size, sample, length):
    """A training batch at one fixed length (bind sample and length with functools.partial)."""
    return sample(rng, batch_size, length)


def up_to_length(rng, batch_size, sample, length, scale="uniform"):
    """A training batch at N drawn from 1 .. length (--train-mix), uniformly or log-uniformly (--mix-scale
    log). Short batches give the query a clear signal early on: trained at N = 256 only, lookup stays at
    chance (2000 steps, 10 of 10 seeds)."""
    if scale == "log":
        return sample(rng, batch_size, int(min(length, round(2 ** rng.uniform(0, math.log2(length))))))
    return sample(rng, batch_size, int(rng.integers(1, length + 1)))


def build(cell, cfg):
    """The cell's model, untrained (the harness seeds torch with the cell's seed first: the init seed)."""
    return build_model(cell["task"], cell["variant"], cfg)


def seq_lens(cell, cfg):
    """(longest training sequence, longest test sequence) in tokens: N items + the query."""
    return cfg.train_len + 1, max(cfg.test_lengths) + 1


def train(model, cell, cfg):
    task, variant, seed = cell["task"], cell["variant"], cell["seed"]
    device, key, sample = torch.device(cell["device"]), test_key(task, cfg), sampler(task, cfg)

    def in_distribution(m):
        return {f"accuracy@{cfg.train_len}": C.evaluate_by_length(m, sample, [cfg.train_len], 256, device,
                                                                  key=key)[0]["accuracy"]}
    data = functools.partial(up_to_length, scale=cfg.mix_scale) if cfg.train_mix else at_length
    data = functools.partial(data, sample=sample, length=cfg.train_len)
    return {"train": C.train(model, data, cfg, device, data_seed=10_000 + seed, eval_fn=in_distribution,
                             **H.train_options(f"{task}/{variant}/seed{seed}"))}


def evaluate(model, cell, cfg):
    """Every test length: accuracy, probes, and with --heads / --edits the fix-ladder measurements."""
    task, variant, seed = cell["task"], cell["variant"], cell["seed"]
    device, key, sample = torch.device(cell["device"]), test_key(task, cfg), sampler(task, cfg)
    rows, probes, kept = C.evaluate_with_probes(model, sample, cfg.test_lengths, cfg.eval_examples, device,
                                                extra=target_mass, keep=cfg.keep_lengths, key=key)
    out = {"rows": [{"table": "accuracy", **r} for r in rows] + [{"table": "probe", **r} for r in probes]}
    if cfg.heads:  # vanishing_variance_beyond.py --experiment fixes (kept out of the main job: it is slow)
        out["rows"] += fixes.head_std_rows(model, sample, cfg.test_lengths, device)
    if cfg.edits and variant == "none":
        out["rows"] += fixes.edit_rows(model, sample, cfg.test_lengths, cfg.train_len, cfg.eval_examples, device,
                                   target_mass, key)
    out["mistakes"] = mistakes(model, sample, max(cfg.test_lengths), device, cfg.n_classes, key)
    if seed == 0:  # component 0 of the raw outputs, for the distribution figure (kept small)
        out["kept"] = [{"length": L, "layer": layer, "where": w, "values": np.round(v[:, 0], 6).tolist()}
                       for (L, layer, w), v in kept.items()]
    return out


@torch.no_grad()
def mistakes(model, sample, length, device, n_classes, key, k=3):
    """A few decoded test examples the model gets wrong at `length` (shown in the summary)."""
    b = C.to_device(next(C.eval_batches(sample, length, 32, key=key)), device)
    logits, _ = model(b["idx"], at=b["at"])
    pred = logits[:, 0].argmax(-1)
    wrong = (pred != b["targets"][:, 0]).nonzero()[:k, 0].tolist()
    return [f"N={length}: {render(b, i, n_classes)}, model said {int(pred[i])}" for i in wrong]


# ---------------------------------------------------------------------------------------- theory


# ---------------------------------------------------------------------------------------- report
# The report is drawn from the cell records alone (so --plot-only redraws it): claims() turns the rows
# into verdicts as data, each fig_* function draws one figure, say_* functions print; report() calls them.


def examples(cfg):
    """Print the theory's slopes and one example of each task."""
    th = VVR.theory(cfg.test_lengths)
    print("theory: log-log slope of the attention-output std vs N: " +
          ", ".join(f"{k} {VVR.slope(x, y):+.3f}" for k, (x, y) in th.items()))
    ex = sample_argmax(np.random.default_rng(0), 1, 4, cfg.n_classes)
    print(f"argmax example (N=4): {render(ex, 0, cfg.n_classes)}")
    ex = sample_lookup(np.random.default_rng(0), 1, 4, cfg.n_classes, n_keys(cfg))
    print(f"lookup example (N=4): {render(ex, 0, cfg.n_classes)}")


SCRIPT = H.Script(
    name="vanishing_variance", description=__doc__.splitlines()[0], config=Config, presets=PRESETS,
    axes={"seed": "seeds", "task": "tasks", "variant": "variants"},  # seed-major: a stopped run has whole seeds
    build=build, train=train, evaluate=evaluate, report=VVR.report, validate=validate, examples=examples,
    eval_fields=("test_lengths", "eval_examples", "keep_lengths", "heads", "edits"), seq_lens=seq_lens)

if __name__ == "__main__":
    H.main(SCRIPT)

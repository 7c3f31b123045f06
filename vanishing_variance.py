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

Beyond the paper (`--experiment fixes`): is the failure at long N one of scale (the paper's account)
or of selection (the query's attention spreads out)? A fix ladder, retrained with 10 seeds: none,
layernorm, headnorm and gate act on the attention output; ssmax and logn act on the logits. And
test-time edits of the trained none models, no retraining: restore each head's output scale, sharpen
the query's logits, or both. Both live in vanishing_variance_fixes.py, with their formulas and sources.

Tasks (order-invariant; the model has no positional encoding). Every input token is one item
(a, b) embedded as A(a) + B(b); b = n_classes marks the query token. The answer is read at the query.
  argmax retrieval  N items (priority a, payload b): distinct priorities from a grid of 2^30 values,
                    embedded with sin/cos features of a / 2^30 (continuous and ordered, as in
                    Velickovic et al. 2024); target = payload of the largest priority.
                    Example, N = 4, 8 classes: (51, 2) (902, 5) (7, 1) (424, 0) query -> 5
  argmax-gap        argmax retrieval whose largest priority exceeds all others by at least 1/16 of
                    the range at every N (beyond the paper, --experiment gap: with continuous
                    priorities the top two drift together like 1/N, which sharper attention cannot undo)
  dictionary lookup N (key a, value b) pairs with distinct keys from a key set of 4 x the largest test
                    N (learned key table); then the query (key, marker); target = that key's value.
                    Example, N = 3: (17, 4) (3, 0) (250, 6) query(3) -> 0
Token id = a * (n_classes + 1) + b.

Commands and measured run times (2-core CPU, this repository's machine):
  python vanishing_variance.py                          # quick: 9 min on 2 CPU cores
  python vanishing_variance.py --preset smoke           # ~15 s: what the tests run
  python vanishing_variance.py --experiment fixes       # the fix ladder and the edits, 10 seeds: 96 min
  python vanishing_variance.py --experiment gap         # argmax vs argmax-gap, none and ssmax and the edits, 10 seeds
  python vanishing_variance.py --experiment ntrain      # lookup trained at N_train = 16, 64, 256 (not learned beyond 16)
  python vanishing_variance.py --experiment ntrain-mix  # the same, trained on every N up to N_train: 88 min on 2 CPU cores
  python vanishing_variance.py --device cuda --preset paper   # N to 16384, 5 seeds (not yet run on a GPU)
  python vanishing_variance.py --n-layer 1              # one block: 205 s (sweep)
  python vanishing_variance.py --n-layer 1 --mlp false  # one attention-only block (docs/vanishing_variance.md)

Deviations from the paper: the paper's body gives few architecture details, so we train small
NoPE models from scratch (2 pre-LN blocks, d = 64, 4 heads by default: of the architectures we
tried, the one where the claim shows most; docs/vanishing_variance.md); the argmax encoding follows
Velickovic et al.'s max-retrieval setup with our own priority embedding; the Llama-3.2-1B measurement
of Fig. 1 is out of scope (no model downloads here), our Fig. 1 quantity comes from the trained
models and the theory curves.

Read with common.py (the model, training and evaluation); the results are in docs/vanishing_variance.md.
"""
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import common as C
import harness as H
import reporting as R
import vanishing_variance_fixes as F
from vanishing_variance_fixes import EDITS

TASKS = ("argmax", "lookup", "argmax-gap")  # argmax-gap: beyond the paper (--experiment gap)
GAP = 1 / 16  # argmax-gap: the largest priority exceeds all others by at least this fraction of the range
VARIANTS = C.ATTN_OUT_NORMS + F.FIXES  # the paper's norms (common.py), then the fix ladder's (the fixes module)
LADDER = ("none", "layernorm", "headnorm", "gate", "ssmax", "logn")  # --experiment fixes
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


def decode(batch, i, n_classes=8):
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
    if variant in F.FIXES:
        model = F.FixGPT(F.FixConfig(**shape, fix=variant, n_train=cfg.train_len + 1))
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


def up_to_length(rng, batch_size, sample, length):
    """A training batch at N drawn uniformly from 1 .. length (--train-mix). Short batches give the query a
    clear signal early on: trained at N = 256 only, lookup stays at chance (2000 steps, 10 of 10 seeds)."""
    return sample(rng, batch_size, int(rng.integers(1, length + 1)))


def build(cell):
    """The cell's model, untrained (the harness seeds torch with the cell's seed first: the init seed)."""
    return build_model(cell["task"], cell["variant"], Config(**cell["config"]))


def seq_lens(cell):
    """(longest training sequence, longest test sequence) in tokens: N items + the query."""
    cfg = Config(**cell["config"])
    return cfg.train_len + 1, max(cfg.test_lengths) + 1


def train(model, cell):
    cfg, task, variant, seed = Config(**cell["config"]), cell["task"], cell["variant"], cell["seed"]
    device, key, sample = torch.device(cell["device"]), test_key(task, cfg), sampler(task, cfg)

    def in_distribution(m):
        return {f"accuracy@{cfg.train_len}": C.evaluate_by_length(m, sample, [cfg.train_len], 256, device,
                                                                  key=key)[0]["accuracy"]}
    data = functools.partial(up_to_length if cfg.train_mix else at_length, sample=sample, length=cfg.train_len)
    return {"train": C.train(model, data, cfg, device, data_seed=10_000 + seed, eval_fn=in_distribution,
                             **H.train_options(f"{task}/{variant}/seed{seed}"))}


def evaluate(model, cell):
    """Every test length: accuracy, probes, and with --heads / --edits the fix-ladder measurements."""
    cfg, task, variant, seed = Config(**cell["config"]), cell["task"], cell["variant"], cell["seed"]
    device, key, sample = torch.device(cell["device"]), test_key(task, cfg), sampler(task, cfg)
    rows, probes, kept = C.evaluate_with_probes(model, sample, cfg.test_lengths, cfg.eval_examples, device,
                                                extra=target_mass, keep=cfg.keep_lengths, key=key)
    out = {"rows": [{"table": "accuracy", **r} for r in rows] + [{"table": "probe", **r} for r in probes]}
    if cfg.heads:  # --experiment fixes (~10 s a cell at these lengths: kept out of the main job)
        out["rows"] += F.head_std_rows(model, sample, cfg.test_lengths, device)
    if cfg.edits and variant == "none":
        out["rows"] += F.edit_rows(model, sample, cfg.test_lengths, cfg.train_len, cfg.eval_examples, device,
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
    return [f"N={length}: {decode(b, i, n_classes)}, model said {int(pred[i])}" for i in wrong]


# ---------------------------------------------------------------------------------------- theory

def theory(lengths, sigma=1.0, betas=(1.0, 3.0), samples=2000, seed=0):
    """Closed form and simulation of the attention output's std for a fixed query.
    Uniform attention over N i.i.d. values of variance sigma^2: Var = sigma^2 / N (slope -0.5 for std).
    Softmax attention with scores beta * z_i (z_i ~ N(0, 1), independent of the values):
    Var = sigma^2 E[sum_i p_i^2] = sigma^2 / N_eff, simulated. Returns {label: (lengths, std)}."""
    rng = np.random.default_rng(seed)
    Ns = np.array(lengths, dtype=float)
    out = {"uniform: sigma/sqrt(N)": (Ns, sigma / np.sqrt(Ns))}
    for beta in betas:
        std = []
        for N in lengths:
            reps = max(50, min(samples, 2**22 // N))
            s = beta * rng.standard_normal((reps, N))
            p = np.exp(s - s.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            y = (p * rng.standard_normal((reps, N)) * sigma).sum(1)
            std.append(y.std())
        out[f"softmax, beta={beta:g} (simulated)"] = (Ns, np.array(std))
    return out


def slope(xs, ys):
    """Least-squares slope of log y against log x."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    ok = (xs > 0) & (ys > 0)
    return float(np.polyfit(np.log(xs[ok]), np.log(ys[ok]), 1)[0]) if ok.sum() >= 2 else float("nan")


# ---------------------------------------------------------------------------------------- report
# The report is drawn from the cell records alone (so --plot-only redraws it): claims() turns the rows
# into verdicts as data, each fig_* function draws one figure, say_* functions print; report() calls them.

CLAIMS = {  # what each variant is claimed (or hoped) to do; the paper's own claim is layernorm's
    "layernorm": "LayerNorm after attention gives significantly better length generalization (Li et al. 2025)",
    "standardize": "the same norm without affine parameters helps too (Li et al. 2025)",
    "headnorm": "per-head output normalization before W_O helps (AVNorm, 2025)",
    "gate": "a per-head sigmoid gate on the attention output helps (Qiu et al. 2025)",
    "ssmax": "Scalable-Softmax, logits times s_h log n, helps (Nakanishi 2025)",
    "logn": "log-n scaling of the logits at inference only helps (long-context LLMs)",
    "scale": "restoring each head's output std at test time recovers accuracy (scale is the cause)",
    "select": "sharpening the query's logits by log N / log N_train at test time recovers accuracy "
              "(dispersion is the cause)",
    "both": "sharpening, then restoring the scale, recovers accuracy",
}
COLORS = {"none": "C0", "layernorm": "C1", "standardize": "C2", "headnorm": "C3", "gate": "C4",  # the same
          "ssmax": "C5", "logn": "C6",                                                           # in every figure
          "no edit": "C0", "scale": "C7", "select": "C8", "both": "C9"}
NORMS_AFTER_WO = ("layernorm", "standardize")  # the variants whose output is probed before and after them


def style(group):
    """Plot style of a variant or an edit, or of (variant, where): its colour; dashed after the norm."""
    variant, where = group if isinstance(group, tuple) else (group, "pre")
    label = variant
    if isinstance(group, tuple) and variant in NORMS_AFTER_WO:
        label = f"{variant}, {'before' if where == 'pre' else 'after'} the norm"
    return {"color": COLORS.get(variant), "ls": "--" if where == "post" else "-", "label": label}


def edit_table(acc, edits):
    """The edit rows plus the unedited `none` rows as edit = 'no edit', for the same seeds: one table
    in which every edit is paired with its own model unedited."""
    seeds = {(r["task"], r["seed"]) for r in edits}
    plain = [{**r, "edit": "no edit"} for r in R.select(acc, variant="none") if (r["task"], r["seed"]) in seeds]
    return plain + edits


def compare(rows, metric, a, b, length, by, diffs):
    """a vs b at one length, paired by seed: per-seed stats of a and b, the paired difference with a 95%
    CI (from diffs, paired_diff_ci's rows), and the fraction of seeds where a beats b with its 95%
    Wilson interval."""
    va, vb = R.per_seed(rows, metric, length=length, **{by: a}), R.per_seed(rows, metric, length=length, **{by: b})
    seeds = sorted(set(va) & set(vb))
    d = [r for r in diffs if r["length"] == length]
    wins = sum(va[s] > vb[s] for s in seeds)
    return {"a": R.seed_stats([va[s] for s in seeds]), "b": R.seed_stats([vb[s] for s in seeds]),
            "diff": d[0]["diff"] if d else float("nan"), "lo": d[0]["lo"] if d else float("nan"),
            "hi": d[0]["hi"] if d else float("nan"), "wins": wins, "n": len(seeds),
            "wins_ci": R.wilson_ci(wins, len(seeds))}


MATTERS = 0.02  # a paired difference counts when its 95% interval excludes 0 and it is at least this large


def verdict(d_rows, train_len):
    """Plain words from the paired differences by length [{length, diff, lo, hi}] beyond training: better
    (or worse) where the interval excludes 0 and the difference is at least MATTERS."""
    ood = [r for r in d_rows if r["length"] > train_len]
    better = [r["length"] for r in ood if r["lo"] > 0 and r["diff"] >= MATTERS]
    worse = [r["length"] for r in ood if r["hi"] < 0 and r["diff"] <= -MATTERS]
    if ood and len(better) == len(ood):
        return "yes, at every N > training"
    if better and not worse and better == [r["length"] for r in ood][-len(better):]:
        return f"yes, at every N >= {better[0]}"
    if better:
        return f"only at N = {better}" + (f"; worse at N = {worse}" if worse else "")
    return f"no (worse at N = {worse})" if worse else "no (no significant difference)"


def claims(acc, edits, cfg):
    """The verdicts as data: one dict per (task, variant or edit) against its baseline (none, or the
    same model unedited): claim, task, what, setting, the comparison at the longest N (compare())
    and the verdict over all N. The printed summary and the documents' tables come from these."""
    out, top = [], max(cfg.test_lengths)
    for task in TASKS:
        t_acc = R.select(acc, task=task)
        none = {n: R.seed_stats(list(R.per_seed(t_acc, "accuracy", variant="none", length=n).values()))["mean"]
                for n in (cfg.train_len, top)} if R.select(t_acc, variant="none") else {}
        loss = none[cfg.train_len] - none[top] if none else float("nan")  # what none loses beyond training
        for v in [v for v in VARIANTS if v != "none" and R.select(t_acc, variant=v)]:
            d = R.paired_diff_ci(t_acc, "accuracy", v, "none")
            out.append({"claim": CLAIMS[v], "task": task, "variant": v, "edit": None, "what": v, "baseline": "none",
                        "setting": f"trained at N = {cfg.train_len}, tested at N = {top}",
                        **compare(t_acc, "accuracy", v, "none", top, "variant", d), "loss": loss,
                        "verdict": verdict(d, cfg.train_len)})
        t_edit = edit_table(t_acc, R.select(edits, task=task))
        for e in [e for e in EDITS if R.select(t_edit, edit=e)]:
            d = R.paired_diff_ci(t_edit, "accuracy", e, "no edit", by="edit")
            out.append({"claim": CLAIMS[e], "task": task, "variant": "none", "edit": e, "what": f"none + {e} (test time)",
                        "baseline": "the same none model, unedited",
                        "setting": f"none trained at N = {cfg.train_len}, edited at N = {top}",
                        **compare(t_edit, "accuracy", e, "no edit", top, "edit", d), "loss": loss,
                        "verdict": verdict(d, cfg.train_len)})
    return out


def fig_accuracy(acc, tasks, cfg, out):
    """accuracy.png: accuracy vs N per variant (mean ± std), and the paired difference to none per
    seed (dots) with its 95% CI."""
    plt = R.pyplot()
    fig, axes = plt.subplots(2, len(tasks), figsize=(7.5 * len(tasks), 8), squeeze=False)
    for j, task in enumerate(tasks):
        R.plot_vs_length(R.select(acc, task=task), "accuracy", None, cfg.train_len, chance=1 / cfg.n_classes,
                         ax=axes[0, j], title=f"{task}: accuracy (mean ± std over seeds)", style=style)
        _paired_panel(axes[1, j], R.select(acc, task=task), "variant", "none",
                      [v for v in VARIANTS if v != "none"], cfg, f"{task}: paired difference to none, "
                      "per seed (dots), 95% CI")
    R.save_figure(fig, out / "accuracy.png")


def _paired_panel(ax, rows, by, base, others, cfg, title):
    """Paired difference of each of `others` to `base` vs N: a line with its 95% CI band, and a dot
    per seed."""
    for v in [v for v in others if R.select(rows, **{by: v})]:
        d = R.paired_diff_ci(rows, "accuracy", v, base, by=by)
        if not d:
            continue
        xs = [r["length"] for r in d]
        ax.plot(xs, [r["diff"] for r in d], marker="o", ms=3, label=f"{v} − {base} ({R.seeds_text(d[0]['n'])})",
                color=COLORS[v])
        ax.fill_between(xs, [r["lo"] for r in d], [r["hi"] for r in d], color=COLORS[v], alpha=0.15)
        b = {(r["seed"], r["length"]): r["accuracy"] for r in R.select(rows, **{by: base})}
        pts = [(r["length"], r["accuracy"] - b[r["seed"], r["length"]]) for r in R.select(rows, **{by: v})
               if (r["seed"], r["length"]) in b]
        ax.scatter([x * (1 + 0.04 * (others.index(v) - len(others) / 2)) for x, _ in pts], [y for _, y in pts],
                   s=6, color=COLORS[v], alpha=0.4, lw=0)
    ax.axhline(0, color="k", lw=0.8)
    ax.axvline(cfg.train_len, color="gray", ls="--", lw=1, label=f"max train length {cfg.train_len}")
    ax.set_xscale("log", base=2)
    R.ticks_at(ax, sorted({r["length"] for r in rows}))
    ax.set(xlabel="test length N", ylabel=f"accuracy difference to {base}", title=title)
    R.legend_outside(ax)
    ax.grid(alpha=0.3)


def fig_variance(probe, tasks, cfg, out, th):
    """variance.png (the paper's Fig. 1): per-component std of the attention output vs N, one row per
    layer, with the theory curves scaled to none at the shortest N. Returns {(task, variant, where,
    layer): (log-log slope, std(N_max) / std(N_min))}."""
    plt = R.pyplot()
    layers = sorted({r["layer"] for r in probe}) or [0]
    lengths = sorted({r["length"] for r in probe}) or list(cfg.test_lengths)
    fig, axes = plt.subplots(len(layers), len(tasks), figsize=(8 * len(tasks), 4.5 * len(layers)), squeeze=False)
    slopes = {}
    for j, task in enumerate(tasks):
        for i, layer in enumerate(layers):
            p = [r for r in R.select(probe, task=task, layer=layer)
                 if r["where"] == "pre" or r["variant"] in NORMS_AFTER_WO]
            base = R.mean_std_by(R.select(p, variant="none", where="pre"), "length", "comp_std", "variant")
            scale = base["none"][1][0] if base else 1.0
            extra = [(x, y / y[0] * scale, f"theory: {k}") for k, (x, y) in th.items()]
            R.plot_vs_length(p, "comp_std", None, cfg.train_len, group=("variant", "where"), logy=True,
                             ax=axes[i, j], extra=extra, style=style,
                             title=f"{task}, layer {layer}: attention-output std vs N\n(theory scaled to none "
                                   f"at N={lengths[0]})")
            for key, (xs, m, _, _) in R.mean_std_by(p, "length", "comp_std", ("variant", "where", "layer")).items():
                slopes[(task,) + key] = (slope(xs, m), m[-1] / m[0])
    R.save_figure(fig, out / "variance.png")
    return slopes


def fig_shift(probe, tasks, cfg, out):
    """shift.png (the paper's Fig. 3): per-vector mean and variance of the layer-0 attention output,
    none vs layernorm before and after the norm."""
    plt = R.pyplot()
    fig, axes = plt.subplots(2, len(tasks), figsize=(7.5 * len(tasks), 8), squeeze=False)
    for j, task in enumerate(tasks):
        p = [r for r in R.select(probe, task=task, layer=0)  # for none, 'post' is 'pre' again
             if (r["variant"], r["where"]) in (("none", "pre"), ("layernorm", "pre"), ("layernorm", "post"))]
        R.plot_vs_length(p, "vec_mean", None, cfg.train_len, group=("variant", "where"), ax=axes[0, j], style=style,
                         title=f"{task}: per-vector mean of the attention output (layer 0)")
        R.plot_vs_length(p, "vec_var", None, cfg.train_len, group=("variant", "where"), ax=axes[1, j], logy=True,
                         style=style, title=f"{task}: per-vector variance (layer 0)")
    R.save_figure(fig, out / "shift.png")


def fig_distributions(records, tasks, out):
    """distributions.png (the paper's Fig. 2): one component of the layer-0 attention output at a few
    N, none and layernorm after the norm (seed 0)."""
    plt = R.pyplot()
    kept = {(rec["cell"].get("task"), rec["cell"].get("variant")): rec["kept"] for rec in records if rec.get("kept")}
    panels = [(t, v, w) for t in tasks for v, w in (("none", "pre"), ("layernorm", "post")) if (t, v) in kept]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (t, v, w) in zip(axes[0], panels):
        for k in sorted(R.select(kept[t, v], layer=0, where=w), key=lambda k: k["length"]):
            ax.hist(k["values"], bins=40, density=True, histtype="step", label=f"N={k['length']}")
        ax.set(title=f"{t}, {v}\n({'before' if w == 'pre' else 'after'} the norm): component 0",
               xlabel="value of attention-output component 0", ylabel="density")
        ax.legend(fontsize=7)
    R.save_figure(fig, out / "distributions.png")


def fig_why(acc, probe, tasks, cfg, out):
    """why.png: the dispersion of the query's attention, exp(H) in layer 0, and its mass on the
    answering item, vs N per variant."""
    plt = R.pyplot()
    lengths = np.array(sorted({r["length"] for r in acc}) or cfg.test_lengths, dtype=float)
    fig, axes = plt.subplots(2, len(tasks), figsize=(7.5 * len(tasks), 8), squeeze=False)
    for j, task in enumerate(tasks):
        R.plot_vs_length(R.select(probe, task=task, layer=0, where="pre"), "eff_n", None, cfg.train_len,
                         logy=True, ax=axes[0, j], extra=[(lengths, lengths + 1.0, "all N+1 tokens")],
                         style=style, title=f"{task}: effective number of attended tokens exp(H) (layer 0)")
        R.plot_vs_length(R.select(acc, task=task), "target_mass", None, cfg.train_len, ax=axes[1, j], style=style,
                         title=f"{task}: attention mass on the answering item (max over heads)")
    R.save_figure(fig, out / "why.png")


def std_ratios(heads, cfg):
    """{(task, variant, layer): [per seed: mean over heads of std(N_max) / std(N_train)]} of each
    head's output at the query (head_std rows)."""
    top, out = max(cfg.test_lengths), {}
    by = {(r["task"], r["variant"], r["seed"], r["layer"], r["head"], r["length"]): r["std"] for r in heads}
    for (task, v, seed, layer, head, length), std in by.items():
        if length == top and (task, v, seed, layer, head, cfg.train_len) in by:
            out.setdefault((task, v, layer, seed), []).append(std / by[task, v, seed, layer, head, cfg.train_len])
    ratios = {}
    for (task, v, layer, seed), r in sorted(out.items()):
        ratios.setdefault((task, v, layer), []).append(float(np.mean(r)))
    return ratios


def fig_ladder(acc, ratios, tasks, cfg, out):
    """ladder.png: every variant at the longest N, a dot per seed and the mean ± 95% CI: accuracy,
    the paired difference to none, the attention mass on the answer, and the per-head output std
    ratio std(N_max) / std(N_train) in layer 0 (ratios: std_ratios())."""
    plt = R.pyplot()
    top = max(cfg.test_lengths)
    n_rows = 4 if ratios else 3  # per-head stds: --experiment fixes only
    fig, axes = plt.subplots(n_rows, len(tasks), figsize=(6.5 * len(tasks), 3.3 * n_rows), squeeze=False)
    for j, task in enumerate(tasks):
        t_acc = R.select(acc, task=task, length=top)
        variants = [v for v in VARIANTS if R.select(t_acc, variant=v)]
        none = R.per_seed(t_acc, "accuracy", variant="none")
        for i, v in enumerate(variants):
            a = R.per_seed(t_acc, "accuracy", variant=v)
            R.seed_dots(axes[0, j], i, list(a.values()), COLORS[v])
            if v != "none":
                R.seed_dots(axes[1, j], i, [a[s] - none[s] for s in a if s in none], COLORS[v])
            R.seed_dots(axes[2, j], i, list(R.per_seed(t_acc, "target_mass", variant=v).values()), COLORS[v])
            if ratios:
                R.seed_dots(axes[3, j], i, ratios.get((task, v, 0), []), COLORS[v])
        titles = (f"accuracy at N = {top} (trained at N = {cfg.train_len})", "paired difference to none",
                  "attention mass on the answering item", f"head output std(N = {top}) / std(N = {cfg.train_len}), "
                                                          "layer 0, mean over heads")
        for i, ax in enumerate(axes[:, j]):
            ax.set_xticks(range(len(variants)), variants)
            ax.set_title(f"{task}: {titles[i]}\n(dots: seeds; squares: mean ± 95% CI)", fontsize=9)
            ax.grid(alpha=0.3)
        axes[0, j].axhline(1 / cfg.n_classes, color="red", ls=":", lw=1, label="chance")
        axes[1, j].axhline(0, color="k", lw=0.8)
        if ratios:
            axes[3, j].axhline(1, color="k", lw=0.8)
            axes[3, j].set_yscale("log")
    R.save_figure(fig, out / "ladder.png")


def fig_edits(acc, edits, tasks, cfg, out):
    """edits.png: the test-time edits of the none models vs N: accuracy, the paired difference to the
    same model unedited (dots: seeds; band: 95% CI), and the attention mass on the answering item."""
    plt = R.pyplot()
    fig, axes = plt.subplots(3, len(tasks), figsize=(7.5 * len(tasks), 11.5), squeeze=False)
    for j, task in enumerate(tasks):
        rows = edit_table(R.select(acc, task=task), R.select(edits, task=task))
        R.plot_vs_length(rows, "accuracy", None, cfg.train_len, group="edit", chance=1 / cfg.n_classes, ax=axes[0, j],
                         style=style, title=f"{task}: none models edited at test time (mean ± std over seeds)")
        _paired_panel(axes[1, j], rows, "edit", "no edit", list(EDITS), cfg,
                      f"{task}: edited − unedited, per seed (dots), 95% CI")
        R.plot_vs_length(rows, "target_mass", None, cfg.train_len, group="edit", ax=axes[2, j], style=style,
                         title=f"{task}: attention mass on the answering item")
    R.save_figure(fig, out / "edits.png")


def say_claims(rows, say):
    """The claims as a markdown table (as docs/vanishing_variance.md quotes it)."""
    say("\n| task | variant or edit | claim | accuracy at the longest N: it / baseline (mean ± std, median) "
        "| paired difference [95% CI] | seeds where it beats the baseline [95% CI] | verdict over N |")
    say("|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["a"], r["b"]
        say(f"| {r['task']} | {r['what']} | {r['claim']} | {a['mean']:.3f} ± {a['std']:.3f} ({a['median']:.3f}) / "
            f"{b['mean']:.3f} ± {b['std']:.3f} ({b['median']:.3f}) | {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] | "
            f"{r['wins']}/{r['n']} [{r['wins_ci'][0]:.2f}, {r['wins_ci'][1]:.2f}] | {r['verdict']} |")


def say_ladder(acc, probe, ratios, verdicts, cfg, say):
    """The ladder as a markdown table, per task and variant: accuracy at N_train and at the longest N
    (mean ± std, median), the paired difference to none with its 95% CI, the seeds where it beats
    none, and at the longest N: exp(H) of the query in layer 0, its mass on the answering item and the
    per-head output std ratio (layer 0)."""
    top, lo = max(cfg.test_lengths), cfg.train_len
    by = {(c["task"], c["variant"], c["edit"]): c for c in verdicts}
    say(f"\n| task | variant | accuracy at N = {lo} | accuracy at N = {top} (median) | − none, paired [95% CI] | "
        f"seeds better than none [95% CI] | exp(H), layer 0 | mass on the answer | head std ratio {top}/{lo} |")
    say("|---|---|---|---|---|---|---|---|---|")
    for task in TASKS:
        for v in [v for v in VARIANTS if R.select(acc, task=task, variant=v)]:
            a_lo = R.seed_stats(list(R.per_seed(acc, "accuracy", task=task, variant=v, length=lo).values()))
            a = R.seed_stats(list(R.per_seed(acc, "accuracy", task=task, variant=v, length=top).values()))
            h = R.seed_stats(list(R.per_seed(probe, "eff_n", task=task, variant=v, length=top, layer=0,
                                             where="pre").values()))
            m = R.seed_stats(list(R.per_seed(acc, "target_mass", task=task, variant=v, length=top).values()))
            r = R.seed_stats(ratios.get((task, v, 0), []))
            ratio = f"{r['mean']:.2f}" if r["n"] else "-"  # per-head stds: measured with --heads only
            c = by.get((task, v, None))
            diff = f"{c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]" if c else ""
            wins = f"{c['wins']}/{c['n']} [{c['wins_ci'][0]:.2f}, {c['wins_ci'][1]:.2f}]" if c else ""
            say(f"| {task} | {v} | {a_lo['mean']:.3f} | {a['mean']:.3f} ± {a['std']:.3f} ({a['median']:.3f}) | {diff} | "
                f"{wins} | {h['mean']:.1f} | {m['mean']:.2f} | {ratio} |")


def edit_stats(rows, metric):
    return R.seed_stats([r[metric] for r in rows if metric in r])


def say_edits(acc, probe, edits, verdicts, cfg, say):
    """The test-time edits as a markdown table, per task: at the longest N, accuracy (mean ± std,
    median), the paired difference to the same model unedited with its 95% CI, the seeds it helps,
    exp(H) of the query in layer 0, its mass on the answering item, and the mean layer-0 head factor."""
    top = max(cfg.test_lengths)
    by = {(c["task"], c["variant"], c["edit"]): c for c in verdicts}
    say(f"\n| task | none models at N = {top} | accuracy (median) | − unedited, paired [95% CI] | seeds it helps "
        "[95% CI] | exp(H), layer 0 | mass on the answer | layer-0 head factor |")
    say("|---|---|---|---|---|---|---|---|")
    for task in TASKS:
        rows = [r for r in edit_table(R.select(acc, task=task), R.select(edits, task=task)) if r["length"] == top]
        for e in [e for e in ("no edit",) + EDITS if R.select(rows, edit=e)]:
            stat = functools.partial(edit_stats, R.select(rows, edit=e))
            a, c = stat("accuracy"), by.get((task, "none", e))
            diff = f"{c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]" if c else ""
            wins = f"{c['wins']}/{c['n']} [{c['wins_ci'][0]:.2f}, {c['wins_ci'][1]:.2f}]" if c else ""
            eff = stat("eff_n") if e != "no edit" else R.seed_stats(list(R.per_seed(
                probe, "eff_n", task=task, variant="none", length=top, layer=0, where="pre").values()))
            fac = f"{stat('factor')['mean']:.2f}" if e != "no edit" else "1"
            say(f"| {task} | {e} | {a['mean']:.3f} ± {a['std']:.3f} ({a['median']:.3f}) | {diff} | {wins} | {eff['mean']:.1f} | "
                f"{stat('target_mass')['mean']:.2f} | {fac} |")


def say_recovered(verdicts, cfg, say):
    """How much of what `none` loses beyond training each fix or edit wins back at the longest N: the
    paired difference (and its 95% CI) over the loss, none's mean accuracy at N_train minus at N_max.
    A share near 1 closes the gap; near 0, the fix does not touch what limits the task."""
    top = max(cfg.test_lengths)
    say(f"\nshare of none's loss (accuracy at N = {cfg.train_len} minus at N = {top}) won back at N = {top}, "
        "paired 95% CI")
    for c in verdicts:
        if c["loss"] > 0:
            say(f"  {c['task']:<10} {c['what']:<28} loss {c['loss']:.3f}: {c['diff'] / c['loss']:+.0%} "
                f"[{c['lo'] / c['loss']:+.0%}, {c['hi'] / c['loss']:+.0%}]")


HOLDS = 0.95  # a model "holds" at N when its accuracy there is at least this


def say_gap_vs_argmax(acc, cfg, say):
    """--experiment gap: argmax-gap − argmax for the none models at every N, matched by seed (the same
    initialization; the test sets differ, so a 95% t-interval over the per-seed differences), and the
    seeds of each task that hold (accuracy >= HOLDS) at the longest N, with a Wilson interval."""
    none = R.select(acc, variant="none")
    if not (R.select(none, task="argmax") and R.select(none, task="argmax-gap")):
        return
    d = R.paired_diff_ci(none, "accuracy", "argmax-gap", "argmax", by="task")
    say("\nargmax-gap − argmax, none models, matched by seed (95% CI): " +
        ", ".join(f"N={r['length']}: {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]" for r in d))
    top = max(cfg.test_lengths)
    for task in ("argmax", "argmax-gap"):
        for v in [v for v in VARIANTS if R.select(acc, task=task, variant=v)]:
            a = list(R.per_seed(acc, "accuracy", task=task, variant=v, length=top).values())
            say(f"  {task:<10} {v:<6} seeds with accuracy >= {HOLDS} at N = {top}: {holds_text(a)}")


def holds_text(accuracies):
    """'k/n [lo, hi]': the seeds whose accuracy is at least HOLDS, with a 95% Wilson interval."""
    k = sum(x >= HOLDS for x in accuracies)
    lo, hi = R.wilson_ci(k, len(accuracies))
    return f"{k}/{len(accuracies)} [{lo:.2f}, {hi:.2f}]"


def say_headline(acc, probe, say):
    """The headline numbers: at the training N and the longest N, per task and variant,
    accuracy (mean ± std over seeds), exp(H) of the query's layer-0 attention, and its attention mass
    on the item that holds the answer (mean over seeds)."""
    lengths = sorted({r["length"] for r in acc})
    lo, hi = lengths[0], lengths[-1]
    say(f"\nheadline, N = {lo} -> N = {hi} (mean over seeds): accuracy (± std), exp(H) in layer 0 = the number of "
        "tokens the query attends to, attention mass on the answering item")
    for task in TASKS:
        for v in VARIANTS:
            a = R.mean_std_by(R.select(acc, task=task, variant=v), "length", "accuracy", "variant").get(v)
            h = R.mean_std_by(R.select(probe, task=task, variant=v, layer=0, where="pre"), "length", "eff_n",
                              "variant").get(v)
            m = R.mean_std_by(R.select(acc, task=task, variant=v), "length", "target_mass", "variant").get(v)
            if a is None or h is None or m is None:
                continue
            say(f"  {task:<7} {v:<12} accuracy {a[1][0]:.3f} -> {a[1][-1]:.3f} ± {a[2][-1]:.3f}   "
                f"exp(H) {h[1][0]:.1f} -> {h[1][-1]:.1f}   mass on the answer {m[1][0]:.2f} -> {m[1][-1]:.2f}")


def key(r):  # a row's model: (variant, seed)
    return r["variant"], r["seed"]


def predictors(acc, probe, cfg, variants=VARIANTS):
    """Which measurement tracks accuracy beyond the training length? Pearson r, per task, over every
    (cell, N > N_train) point of the given variants, between accuracy and: the attention mass on the
    answering item, log exp(H) in layer 0, and the layer-0 attention-output std relative to the same
    cell's at N_train (the paper's quantity, before any norm). Returns {task: {name: (r, points)}}."""
    out = {}
    acc = [r for r in acc if r["variant"] in variants]
    for task in TASKS:
        base = {key(r): r["comp_std"] for r in R.select(probe, task=task, layer=0, where="pre", length=cfg.train_len)}
        pr = {key(r) + (r["length"],): r for r in R.select(probe, task=task, layer=0, where="pre")}
        pts = [(r["accuracy"], r["target_mass"], math.log(pr[key(r) + (r["length"],)]["eff_n"]),
                pr[key(r) + (r["length"],)]["comp_std"] / base[key(r)])
               for r in R.select(acc, task=task) if r["length"] > cfg.train_len and key(r) + (r["length"],) in pr
               and key(r) in base]
        if len(pts) < 3:
            continue
        a = np.array(pts)
        out[task] = {name: (float(np.corrcoef(a[:, 0], a[:, i])[0, 1]), len(a)) for i, name in
                     enumerate(("mass on the answer", "log exp(H), layer 0", "std(N) / std(N_train), layer 0"), 1)}
    return out


def say_details(records, acc, ratios, slopes, th, cfg, say):
    """Theory slopes, the trained models' std slopes and head std ratios, per-task tables with the
    paired differences by N, and a few decoded mistakes."""
    for k, (x, y) in th.items():
        say(f"theory  {k:<34} log-log slope of std vs N: {slope(x, y):+.3f}")
    say("\ntrained models: per-component std of the attention output, slope and std(N_max)/std(N_min)")
    for (task, variant, where, layer), (sl, ratio) in sorted(slopes.items()):
        say(f"  {task:<7} {variant:<12} {where:<4} layer {layer}: slope {sl:+.3f}, ratio {ratio:.3f}")
    if ratios:
        say(f"\nper-head output std(N = {max(cfg.test_lengths)}) / std(N = {cfg.train_len}) at the query, mean over "
            "heads, then mean ± std over seeds")
        for (task, v, layer), r in ratios.items():
            say(f"  {task:<7} {v:<12} layer {layer}: {np.mean(r):.3f} ± {np.std(r):.3f}")
    for task in TASKS:
        recs = [{**rec, "rows": R.select(rec["rows"], table="accuracy")} for rec in records
                if rec["cell"].get("task") == task]
        if not R.select(acc, task=task):
            continue
        say(f"\n--- {task} ---")
        table = R.summarize(recs, "accuracy", cfg.train_len, say=say)
        for v in [v for v in VARIANTS if v != "none" and v in table]:
            d = R.paired_diff_ci(R.select(acc, task=task), "accuracy", v, "none")
            say(f"  {v} − none, paired over seeds (95% CI): " +
                ", ".join(f"N={r['length']}: {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]" for r in d))
    firsts = {}
    for rec in records:
        firsts.setdefault(rec["cell"].get("task"), rec)
    for rec in firsts.values():
        for m in rec.get("mistakes", []):
            say(f"mistake ({rec['cell'].get('task')}/{rec['cell'].get('variant')}/seed {rec['cell'].get('seed')}): {m}")


NTRAIN = (16, 64, 256)  # --experiment ntrain: lookup trained at these N
RATIOS = (2, 8)  # N / N_train at which every N_train is compared


def ntrain_run(n):
    """One run of --experiment ntrain: lookup none models trained at N = n, tested (with the edits) from n
    to 2048, so every n shares one key table (sized from 2048). n = 16 is the fix ladder's own setting."""
    lengths = tuple(2**k for k in range(int(math.log2(n)), 12))
    return dict(tasks=("lookup",), variants=("none",), seeds=10, heads=True, edits=True, train_len=n,
                test_lengths=lengths, keep_lengths=tuple(L for L in (16, 256, 2048) if L in lengths))


def ntrain_mix_run(n):
    """One run of --experiment ntrain-mix: as ntrain_run(n), but trained on every N up to n (--train-mix),
    for 4000 steps. Trained at N = n only for 2000 steps, lookup is not learned from n = 64 on (accuracy at
    N = n below 0.95 on 9 of 10 seeds at n = 64, at chance on all 10 at n = 256); short examples give the
    query's attention a signal to start from (this run learns n = 64 on 10 of 10 seeds, n = 256 on 2)."""
    return {**ntrain_run(n), "train_mix": True, "steps": 4000, "heads": False}


def ntrain_rows(records):
    """Accuracy rows of the none models, unedited and edited ('edit'), with n_train and ratio = N / n_train."""
    out = []
    for rec in records:
        n = rec["cell"]["config"]["train_len"]
        acc = [{**r, "edit": "no edit"} for r in R.select(rec["rows"], table="accuracy")]
        out += [{**r, "n_train": n, "ratio": r["length"] // n} for r in acc + R.select(rec["rows"], table="edit")]
    return out


def report_ntrain(records, out, say):
    """--experiment ntrain: does the lookup gap at a fixed ratio N / N_train shrink as N_train grows, and does
    select (logits x log N / log N_train) still recover it? ntrain.png and a table per ratio."""
    rows = ntrain_rows(records)
    trained = "on every N up to N_train" if Config(**records[0]["cell"]["config"]).train_mix else "at N_train only"
    plt = R.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(19, 5))
    colors = dict(zip(NTRAIN, ("C0", "C1", "C2")))
    for ax, edit in zip(axes, ("no edit", "select")):
        R.band(ax, R.select(rows, edit=edit), "ratio", "accuracy", "n_train", colors, label=ntrain_label)
        R.dots(ax, R.select(rows, edit=edit), "ratio", "accuracy", "n_train", colors)
        ax.set(xscale="log", xlabel="N / N_train", ylabel="accuracy", ylim=(0, 1.02),
               title=f"lookup, none models trained {trained}\n{edit if edit == 'no edit' else 'edited: ' + edit}")
    for n in NTRAIN:
        d = R.paired_diff_ci(R.select(rows, n_train=n), "accuracy", "select", "no edit", by="edit")
        xs = [r["length"] // n for r in d]
        axes[2].plot(xs, [r["diff"] for r in d], marker="o", ms=3, color=colors[n],
                     label=f"{ntrain_label(n)} ({R.seeds_text(d[0]['n'])})" if d else None)
        axes[2].fill_between(xs, [r["lo"] for r in d], [r["hi"] for r in d], color=colors[n], alpha=0.15)
    axes[2].set(xscale="log", xlabel="N / N_train", ylabel="select − unedited",
                title="select − the same model unedited, paired 95% CI")
    axes[2].axhline(0, color="k", lw=0.8)
    for ax in axes:
        R.ticks_at(ax, sorted({r["ratio"] for r in rows}))
        ax.axvline(1, color="gray", ls="--", lw=1, label="training length (ratio 1)")
        ax.grid(alpha=0.3)
        R.legend_outside(ax)
    R.save_figure(fig, Path(out) / "ntrain.png")
    say_ntrain(rows, say)


def say_ntrain(rows, say):
    """The --experiment ntrain tables. Per N_train: accuracy in distribution and the seeds that learned the
    task (>= HOLDS at N = N_train). Per ratio N / N_train: the loss acc(N_train) − acc(N) of the unedited
    models, its difference to the smallest N_train's (different models: a Welch interval), and select −
    unedited, paired by seed on identical test sets."""
    plain, ns = R.select(rows, edit="no edit"), sorted({r["n_train"] for r in rows})
    say("\n| N_train | accuracy at N = N_train (median) | seeds that learned it (>= "
        f"{HOLDS}) [95% CI] |\n|---|---|---|")
    for n in ns:
        a = list(R.per_seed(plain, "accuracy", n_train=n, length=n).values())
        say(f"| {n} | {R.stat_text(R.seed_stats(a))} | {holds_text(a)} |")
    say(f"\n| N / N_train | N_train | N | none (median) | loss from N_train | loss − N_train = {ns[0]}'s [95% CI] | "
        "select (median) | select − none, paired [95% CI] | seeds select helps |")
    say("|---|---|---|---|---|---|---|---|---|")
    for ratio in ntrain_ratios(plain):
        losses = {n: ntrain_losses(plain, n, ratio) for n in ns}
        for n in [n for n in ns if losses[n]]:
            t = R.select(rows, n_train=n, ratio=ratio)
            none = R.seed_stats(list(R.per_seed(t, "accuracy", edit="no edit").values()))
            w = R.welch_ci(losses[n], losses[ns[0]]) if n != ns[0] and losses[ns[0]] else None
            d = R.paired_diff_ci(t, "accuracy", "select", "no edit", by="edit")  # empty when run with --edits false
            c = compare(t, "accuracy", "select", "no edit", ratio * n, "edit", d) if d else None
            said = f"{R.stat_text(c['a'])} | {R.diff_text(d[0], 3)} | {c['wins']}/{c['n']}" if c else " |  | "
            say(f"| {ratio}x | {n} | {ratio * n} | {R.stat_text(none)} | {R.mean_std_text(losses[n])} | "
                f"{R.diff_text(w, 3) if w else ''} | {said} |")


def ntrain_ratios(plain):
    """The ratios N / N_train the table shows: RATIOS, the largest ratio two N_train share, and the largest."""
    have = {(r["ratio"], r["n_train"]) for r in plain}
    ratios = {ratio for ratio, _ in have}
    shared = [ratio for ratio in ratios if sum(ratio == x for x, _ in have) >= 2] or [max(ratios)]
    return sorted(ratios & set(RATIOS) | {max(shared), max(ratios)})


def ntrain_losses(plain, n, ratio):
    """Per seed, accuracy at N = n minus at N = ratio * n (the unedited models trained at n)."""
    at_n = R.per_seed(plain, "accuracy", n_train=n, length=n)
    far = R.per_seed(plain, "accuracy", n_train=n, length=ratio * n)
    return [at_n[s] - far[s] for s in sorted(set(at_n) & set(far))]


def ntrain_label(n):
    return f"N_train = {n}"


def report(records, cfg, out):
    """Figures, claims.json and the printed summary, from the cell records alone."""
    out = Path(out)
    if len({rec["cell"]["config"]["train_len"] for rec in records}) > 1:  # --experiment ntrain
        say = R.Summary()
        report_ntrain(records, out, say)
        return say.write(out)
    rows = [r for rec in records for r in rec["rows"]]
    acc, probe = R.select(rows, table="accuracy"), R.select(rows, table="probe")
    heads, edits = R.select(rows, table="head_std"), R.select(rows, table="edit")
    tasks = [t for t in TASKS if R.select(acc, task=t)]
    say = R.Summary()
    if not R.training_report(records, out, say):  # every cell diverged: nothing else to draw
        return say.write(out)
    th = theory(sorted({r["length"] for r in acc}) or list(cfg.test_lengths))
    fig_accuracy(acc, tasks, cfg, out)
    slopes = fig_variance(probe, tasks, cfg, out, th)
    fig_shift(probe, tasks, cfg, out)
    fig_distributions(records, tasks, out)
    fig_why(acc, probe, tasks, cfg, out)
    ratios = std_ratios(heads, cfg)  # per-head output std(N_max) / std(N_train), per seed
    fig_ladder(acc, ratios, tasks, cfg, out)
    if edits:
        fig_edits(acc, edits, tasks, cfg, out)
    verdicts = claims(acc, edits, cfg)
    H.atomic_write(out / "claims.json", json.dumps(verdicts, indent=1))
    say(f"\n=== vanishing_variance: {sum(r['status'] == 'ok' for r in records)} runs ok, "
        f"{sum(r['status'] == 'diverged' for r in records)} diverged ===")
    say(f"\npaper's claim: {CLAIMS['layernorm']}")
    say(f"(better or worse at N: the paired 95% interval excludes 0 and the difference is at least {MATTERS})")
    say(f"{'task':<8} {'variant or edit':<28} reproduced?")
    for r in verdicts:
        say(f"{r['task']:<{max(8, len(r['task']) + 1)}} {r['what']:<28} {r['verdict']}")
    say_details(records, acc, ratios, slopes, th, cfg, say)
    say_headline(acc, probe, say)
    say(f"\nwhat tracks accuracy beyond N = {cfg.train_len}: Pearson r over every (cell, N) point")
    for models, variants in (("none models", ("none",)), ("all models", VARIANTS)):
        for task, rs in predictors(acc, probe, cfg, variants).items():
            say(f"  {task:<7} {models:<12} " + ", ".join(f"{name}: r = {r:+.2f}" for name, (r, n) in rs.items()) +
                f" ({next(iter(rs.values()))[1]} points)")
    say_claims(verdicts, say)
    say_ladder(acc, probe, ratios, verdicts, cfg, say)
    if edits:
        say_edits(acc, probe, edits, verdicts, cfg, say)
    say_recovered(verdicts, cfg, say)
    say_gap_vs_argmax(acc, cfg, say)
    say.write(out)



def examples(cfg):
    """Print the theory's slopes and one example of each task."""
    th = theory(cfg.test_lengths)
    print("theory: log-log slope of the attention-output std vs N: " +
          ", ".join(f"{k} {slope(x, y):+.3f}" for k, (x, y) in th.items()))
    ex = sample_argmax(np.random.default_rng(0), 1, 4, cfg.n_classes)
    print(f"argmax example (N=4): {decode(ex, 0, cfg.n_classes)}")
    ex = sample_lookup(np.random.default_rng(0), 1, 4, cfg.n_classes, n_keys(cfg))
    print(f"lookup example (N=4): {decode(ex, 0, cfg.n_classes)}")


SCRIPT = H.Script(
    name="vanishing_variance", description=__doc__.splitlines()[0], config=Config, presets=PRESETS,
    axes={"seed": "seeds", "task": "tasks", "variant": "variants"},  # seed-major: a stopped run has whole seeds
    build=build, train=train, evaluate=evaluate, report=report, validate=validate, examples=examples,
    eval_fields=("test_lengths", "eval_examples", "keep_lengths", "heads", "edits"), seq_lens=seq_lens,
    experiments={"main": [{}],  # the paper's reproduction
                 "fixes": [dict(variants=LADDER, seeds=10, heads=True, edits=True)],  # the fix ladder and edits
                 "gap": [dict(tasks=("argmax", "argmax-gap"), variants=("none", "ssmax"), seeds=10, edits=True)],
                 "ntrain": [ntrain_run(n) for n in NTRAIN],
                 "ntrain-mix": [ntrain_mix_run(n) for n in reversed(NTRAIN)]})  # the longest cells first

if __name__ == "__main__":
    H.main(SCRIPT)

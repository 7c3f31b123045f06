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
    standardize (common.GPTConfig), several seeds, and tests every model on the same examples at
    N = 16 ... 2048 (quick) or ... 16384 (paper);
  * measures per length, at the query: accuracy, the per-component std of the attention output across
    samples (the paper's Fig. 1) before and after the norm, the per-vector mean and variance (its
    Fig. 3), per-feature distributions (its Fig. 2), attention entropy / effective number of attended
    tokens and the attention mass on the item that holds the answer;
  * compares layernorm and standardize against none per seed, paired on identical test sets, with a
    95% confidence interval, and prints the paper's claim next to what was measured.

Beyond the paper (`--experiment fixes`): is the failure at long N one of scale (the paper's account)
or of selection (the query's attention spreads out)? A fix ladder, retrained with 10 seeds: none,
layernorm, headnorm and gate act on the attention output; ssmax and logn act on the logits
(common.GPTConfig.attn_out_norm / attn_logits, their formulas and sources there). And test-time
edits of the trained none models, no retraining (edited()): restore each head's output scale, sharpen
the query's logits, or both.

Tasks (order-invariant; the model has no positional encoding). Every input token is one item
(a, b) embedded as A(a) + B(b); b = n_classes marks the query token. The answer is read at the query.
  argmax retrieval  N items (priority a, payload b): distinct priorities from a grid of 2^30 values,
                    embedded with sin/cos features of a / 2^30 (continuous and ordered, as in
                    Velickovic et al. 2024); target = payload of the largest priority.
                    Example, N = 4, 8 classes: (51, 2) (902, 5) (7, 1) (424, 0) query -> 5
  dictionary lookup N (key a, value b) pairs with distinct keys from a key set of 4 x the largest test
                    N (learned key table); then the query (key, marker); target = that key's value.
                    Example, N = 3: (17, 4) (3, 0) (250, 6) query(3) -> 0
Token id = a * (n_classes + 1) + b.

Commands and measured run times (2-core CPU, this repository's machine):
  python vanishing_variance.py                          # quick: 9.3 min on 2 CPU cores
  python vanishing_variance.py --preset smoke           # ~15 s: what the tests run
  python vanishing_variance.py --experiment fixes       # the fix ladder and the edits, 10 seeds: 96 min
  python vanishing_variance.py --device cuda --preset paper   # N to 16384, 5 seeds (not yet run on a GPU)
  python vanishing_variance.py --n-layer 1              # one block: 205 s (sweep)
  python vanishing_variance.py --n-layer 1 --mlp false  # one attention-only block (see README)

Deviations from the paper: the paper's body gives few architecture details, so we train small
NoPE models from scratch (2 pre-LN blocks, d = 64, 4 heads by default: of the architectures we
tried, the one where the claim shows most; see README); the argmax encoding follows
Velickovic et al.'s max-retrieval setup with our own priority embedding; the Llama-3.2-1B measurement
of Fig. 1 is out of scope (no model downloads here), our Fig. 1 quantity comes from the trained
models and the theory curves.
"""
import contextlib
import functools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import common as C

TASKS = ("argmax", "lookup")
VARIANTS = C.ATTN_OUT_NORMS + ("ssmax", "logn")  # output side (common.ATTN_OUT_NORMS), then logit side
LADDER = ("none", "layernorm", "headnorm", "gate", "ssmax", "logn")  # --experiment fixes
EDITS = ("scale", "select", "both")  # test-time edits of trained `none` models (--experiment fixes)
CAL_SEED, CAL_EXAMPLES = 54_321, 256  # unlabeled inputs on which head stds are measured, apart from the test set
GRID = 2**30  # argmax priorities: distinct integers below GRID


# ---------------------------------------------------------------------------------------- tasks

def sample_argmax(rng, batch_size, length, n_classes=8):
    """Argmax retrieval: `length` items (priority, payload) and a query; target = payload of the
    item with the largest priority. Returns idx (B, N+1), at (B, 1), targets (B, 1), item (B,)
    (the position of the answering item)."""
    q = _distinct(rng, batch_size, length, GRID)  # distinct priorities within an example
    c = rng.integers(0, n_classes, size=(batch_size, length))
    item = q.argmax(1)
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
        if task == "argmax":
            self.register_buffer("freq", math.pi * torch.arange(1, n_freq + 1, dtype=torch.float32))
            self.A = nn.Linear(2 * n_freq + 1, n_embd)
        else:
            self.A = nn.Embedding(n_keys, n_embd)
        nn.init.normal_(self.B.weight, std=0.02)
        nn.init.normal_(self.A.weight, std=0.02)

    def forward(self, idx):
        a, b = idx // self.nb, idx % self.nb
        if self.task == "argmax":
            p = (a.double() / GRID).float()[..., None]  # (B, T, 1) in [0, 1)
            a_emb = self.A(torch.cat([p, (p * self.freq).sin(), (p * self.freq).cos()], dim=-1))
        else:
            a_emb = self.A(a)
        return a_emb + self.B(b)  # (B, T, C)


# ---------------------------------------------------------------------------------------- config

@dataclass
class Config(C.TrainConfig):
    tasks: tuple = C.arg(TASKS, "tasks to run", choices=TASKS)
    variants: tuple = C.arg(("none", "layernorm", "standardize"), "norms on the attention output to compare",
                            choices=VARIANTS)
    n_layer: int = C.arg(2, "transformer blocks", min=1)
    mlp: bool = C.arg(True, "an MLP in each block (false: attention-only blocks)")
    n_head: int = C.arg(4, "attention heads", min=1)
    n_embd: int = C.arg(64, "model width", min=1)
    n_classes: int = C.arg(8, "payload / value classes (chance = 1 / n_classes)", min=2)
    train_len: int = C.arg(16, "number of items N during training", min=1)
    test_lengths: tuple = C.arg((16, 32, 64, 128, 256, 512, 1024, 2048), "test N", min=1)
    keep_lengths: tuple = C.arg((16, 256, 2048), "N whose raw attention outputs are kept for the distribution plot",
                                min=1)


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


def n_keys(cfg):
    return 4 * max(cfg.test_lengths)  # SPEC: the key set is >= 4x the largest test N


def sampler(task, cfg):
    """sample(rng, B, N) for a task; a functools.partial, so every cell shares one test set per N."""
    if task == "argmax":
        return functools.partial(sample_argmax, n_classes=cfg.n_classes)
    return functools.partial(sample_lookup, n_classes=cfg.n_classes, n_keys=n_keys(cfg))


def build_model(task, variant, cfg):
    """A NoPE model with one attention variant: an output-side one (attn_out_norm) or a logit-side one
    (attn_logits: ssmax, logn; their n_train is the training sequence, train_len items + the query)."""
    side = dict(attn_logits=variant) if variant in C.ATTN_LOGITS else dict(attn_out_norm=variant)
    model = C.GPT(C.GPTConfig(vocab_size=cfg.n_classes, block_size=1, n_layer=cfg.n_layer, n_head=cfg.n_head,
                              n_embd=cfg.n_embd, mlp=cfg.mlp, pos="none", n_train=cfg.train_len + 1, **side))
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


def run_cell(cell):
    cfg, task, variant, seed = Config(**cell["config"]), cell["task"], cell["variant"], cell["seed"]
    device = C.cell_device(cell)
    torch.manual_seed(seed)  # init seed; data seed below; the test set has its own fixed seed
    model = build_model(task, variant, cfg)
    sample = sampler(task, cfg)
    in_dist = lambda m: {f"accuracy@{cfg.train_len}": C.evaluate_by_length(m, sample, [cfg.train_len], 256,
                                                                          device)[0]["accuracy"]}
    result = C.train(model, lambda rng, b: sample(rng, b, cfg.train_len), cfg, device, data_seed=10_000 + seed,
                     eval_fn=in_dist, compile=cell.get("compile", False), progress=C.is_main_process(),
                     desc=f"{task}/{variant}/seed{seed}")
    if result["diverged"]:
        return {"status": "diverged", "train": result, "rows": []}
    rows, probes, kept = C.evaluate_with_probes(model, sample, cfg.test_lengths, cfg.eval_examples, device,
                                                extra=target_mass, keep=cfg.keep_lengths)
    out = {"train": result, "rows": [{"table": "accuracy", **r} for r in rows] +
                                    [{"table": "probe", **r} for r in probes]}
    if cell.get("heads"):  # --experiment fixes (~10 s a cell at these lengths: kept out of the main job)
        out["rows"] += head_std_rows(model, sample, cfg, device)
    if cell.get("edits"):  # --experiment fixes, on the `none` models
        out["rows"] += edit_rows(model, sample, cfg, device)
    out["mistakes"] = mistakes(model, sample, max(cfg.test_lengths), device, cfg.n_classes)
    if seed == 0:  # component 0 of the raw outputs, for the distribution figure (kept small)
        out["kept"] = {f"{L}/{layer}/{w}": np.round(v[:, 0], 6).tolist() for (L, layer, w), v in kept.items()}
    return out


@torch.no_grad()
def mistakes(model, sample, length, device, n_classes, k=3):
    """A few decoded test examples the model gets wrong at `length` (shown in the summary)."""
    b = C.to_device(next(C.eval_batches(sample, length, 32)), device)
    logits, _ = model(b["idx"], at=b["at"])
    pred = logits[:, 0].argmax(-1)
    wrong = (pred != b["targets"][:, 0]).nonzero()[:k, 0].tolist()
    return [f"N={length}: {decode(b, i, n_classes)}, model said {int(pred[i])}" for i in wrong]


# ---------------------------------------------------------------------------------------- test-time edits
# Is the failure at long N one of *scale* (each head's output shrinks, the paper's account) or of
# *selection* (the query's attention spreads over more items)? Edit a trained `none` model at test
# time, no retraining, and see which edit brings the accuracy back:
#   scale   each head's output at the query rescaled to its std at the training length (restores scale)
#   select  the query's logits sharpened by log N / log N_train (restores selection; cf. the logn variant,
#           which does this at every position with n = position + 1)
#   both    select, then scale (the factors measured with the sharpening on)
# The factors are measured on unlabeled inputs (calibration(), CAL_SEED), never on the test set.

def calibration(sample, length, device):
    """CAL_EXAMPLES unlabeled inputs (B, N+1) at `length`, drawn apart from the test set."""
    return sample(np.random.default_rng(CAL_SEED + length), CAL_EXAMPLES, length)["idx"].to(device)


def _sharpen_query(factor, module, args, qkv):
    """Forward hook on c_attn: q of the last token (the query) times factor. qkv (B, T, 3C), q first."""
    qkv = qkv.clone()
    qkv[:, -1, :qkv.size(-1) // 3] *= factor
    return qkv


def _scale_heads(factors, module, args):
    """Forward pre-hook on c_proj (W_O): head h's output at the last token times factors[h]."""
    y = args[0].clone()  # (B, T, C): heads side by side
    B, C = y.size(0), y.size(-1)
    y[:, -1] = (y[:, -1].view(B, len(factors), C // len(factors)) * factors[:, None]).view(B, C)  # (B, nh, hs)
    return (y,)


def _keep_query(seen, module, args):
    """Forward pre-hook on c_proj: keep the heads' output at the last token, (B, C)."""
    seen.append(args[0][:, -1])


@contextlib.contextmanager
def edited(model, sharpen=1.0, head_scale=None):
    """Test-time edits at the query (the last token, where these tasks read the answer) in every block:
    its logits q.k/sqrt(hs) times `sharpen` (q is scaled; NoPE, so nothing rotates), and head h's
    output times head_scale[layer, h] before W_O. Hooks on c_attn and c_proj, so every forward path
    (fast, probed, answer-only) sees them; removed on exit."""
    hooks = []
    for layer, block in enumerate(model.blocks):
        if sharpen != 1.0:
            hooks.append(block.attn.c_attn.register_forward_hook(functools.partial(_sharpen_query, sharpen)))
        if head_scale is not None:
            hooks.append(block.attn.c_proj.register_forward_pre_hook(functools.partial(_scale_heads,
                                                                                       head_scale[layer])))
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def head_std(model, idx):
    """(n_layer, nh): the std over examples of each head's output at the query (the input of W_O, so
    after the gate of `gate` and the per-head norm of `headnorm`), root-mean-square over its channels."""
    seen = []
    hooks = [b.attn.c_proj.register_forward_pre_hook(functools.partial(_keep_query, seen)) for b in model.blocks]
    try:
        model.eval()
        model(idx, at=torch.full((idx.size(0), 1), idx.size(1) - 1, device=idx.device))
    finally:
        for h in hooks:
            h.remove()
    nh = model.cfg.n_head
    return torch.stack([y.float().view(y.size(0), nh, -1).var(0).mean(-1).sqrt() for y in seen])  # (L, nh)


def restore_scale(model, ref, idx, sharpen=1.0):
    """Factors (n_layer, nh) that bring each head's output std at the query on inputs idx back to ref,
    block by block: a block's factors are measured with the earlier blocks already rescaled."""
    scale = torch.ones_like(ref)
    for layer in range(len(model.blocks)):
        with edited(model, sharpen, scale):
            now = head_std(model, idx)
        scale[layer] = ref[layer] / now[layer].clamp_min(1e-12)
    return scale


def head_std_rows(model, sample, cfg, device):
    """Tidy rows {table: head_std, length, layer, head, std} on the calibration inputs."""
    rows = []
    for length in cfg.test_lengths:
        for layer, stds in enumerate(head_std(model, calibration(sample, length, device)).tolist()):
            rows += [{"table": "head_std", "length": length, "layer": layer, "head": h, "std": v}
                     for h, v in enumerate(stds)]
    return rows


def edit_rows(model, sample, cfg, device):
    """Accuracy, mass on the answer and layer-0 exp(H) of the model under each edit, per test length,
    on the same test examples as every other row: {table: edit, edit, length, accuracy, target_mass,
    eff_n, factor (mean head factor of layer 0, 1 if none), sharpen, n}."""
    ref = head_std(model, calibration(sample, cfg.train_len, device))
    rows = []
    for length in cfg.test_lengths:
        idx = calibration(sample, length, device)
        sharpen = max(1.0, math.log(length) / math.log(cfg.train_len))
        for edit in EDITS:
            s = 1.0 if edit == "scale" else sharpen
            scale = None if edit == "select" else restore_scale(model, ref, idx, s)
            with edited(model, s, scale):
                acc, probes, _ = C.evaluate_with_probes(model, sample, [length], cfg.eval_examples, device,
                                                        extra=target_mass)
            eff = [r["eff_n"] for r in probes if r["layer"] == 0 and r["where"] == "pre"][0]
            rows.append({"table": "edit", "edit": edit, **acc[0], "eff_n": eff, "sharpen": s,
                         "factor": 1.0 if scale is None else float(scale[0].mean())})
    return rows


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
    plain = [{**r, "edit": "no edit"} for r in C.select(acc, variant="none") if (r["task"], r["seed"]) in seeds]
    return plain + edits


def compare(rows, metric, a, b, length, by, diffs):
    """a vs b at one length, paired by seed: per-seed stats of a and b, the paired difference with a 95%
    CI (from diffs, paired_diff_ci's rows), and the fraction of seeds where a beats b with its 95%
    Wilson interval."""
    va, vb = C.per_seed(rows, metric, length=length, **{by: a}), C.per_seed(rows, metric, length=length, **{by: b})
    seeds = sorted(set(va) & set(vb))
    d = [r for r in diffs if r["length"] == length]
    wins = sum(va[s] > vb[s] for s in seeds)
    return {"a": C.seed_stats([va[s] for s in seeds]), "b": C.seed_stats([vb[s] for s in seeds]),
            "diff": d[0]["diff"] if d else float("nan"), "lo": d[0]["lo"] if d else float("nan"),
            "hi": d[0]["hi"] if d else float("nan"), "wins": wins, "n": len(seeds),
            "wins_ci": C.wilson_ci(wins, len(seeds))}


def verdict(d_rows, train_len):
    """Plain words from the paired differences by length [{length, diff, lo, hi}] beyond training."""
    ood = [r for r in d_rows if r["length"] > train_len]
    better = [r["length"] for r in ood if r["lo"] > 0]
    worse = [r["length"] for r in ood if r["hi"] < 0]
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
    and the verdict over all N. The printed summary and the README tables come from these."""
    out, top = [], max(cfg.test_lengths)
    for task in TASKS:
        t_acc = C.select(acc, task=task)
        for v in [v for v in VARIANTS if v != "none" and C.select(t_acc, variant=v)]:
            d = C.paired_diff_ci(t_acc, "accuracy", v, "none")
            out.append({"claim": CLAIMS[v], "task": task, "what": v, "baseline": "none",
                        "setting": f"trained at N = {cfg.train_len}, tested at N = {top}",
                        **compare(t_acc, "accuracy", v, "none", top, "variant", d),
                        "verdict": verdict(d, cfg.train_len)})
        t_edit = edit_table(t_acc, C.select(edits, task=task))
        for e in [e for e in EDITS if C.select(t_edit, edit=e)]:
            d = C.paired_diff_ci(t_edit, "accuracy", e, "no edit", by="edit")
            out.append({"claim": CLAIMS[e], "task": task, "what": f"none + {e} (test time)",
                        "baseline": "the same none model, unedited",
                        "setting": f"none trained at N = {cfg.train_len}, edited at N = {top}",
                        **compare(t_edit, "accuracy", e, "no edit", top, "edit", d),
                        "verdict": verdict(d, cfg.train_len)})
    return out


def seed_dots(ax, x, values, color, width=0.25, seed=0):
    """One dot per seed at x (jittered), with the mean ± 95% t-interval as a bar."""
    v = np.asarray(values, dtype=float)
    if not len(v):
        return
    jitter = np.random.default_rng(seed).uniform(-width / 2, width / 2, len(v))
    ax.scatter(x + jitter, v, s=10, color=color, alpha=0.6, lw=0)
    half = C.t_half_width(v) if len(v) > 1 else 0.0
    ax.errorbar(x + width * 0.8, v.mean(), yerr=half, fmt="s", ms=5, color=color, capsize=3)


def fig_accuracy(acc, tasks, cfg, out):
    """accuracy.png: accuracy vs N per variant (mean ± std), and the paired difference to none per
    seed (dots) with its 95% CI."""
    plt = C.pyplot()
    fig, axes = plt.subplots(2, len(tasks), figsize=(7.5 * len(tasks), 8), squeeze=False)
    for j, task in enumerate(tasks):
        C.plot_vs_length(C.select(acc, task=task), "accuracy", None, cfg.train_len, chance=1 / cfg.n_classes,
                         ax=axes[0, j], title=f"{task}: accuracy (mean ± std over seeds)", style=style)
        _paired_panel(axes[1, j], C.select(acc, task=task), "variant", "none",
                      [v for v in VARIANTS if v != "none"], cfg, f"{task}: paired difference to none, "
                      "per seed (dots), 95% CI")
    C.save_figure(fig, out / "accuracy.png")


def _paired_panel(ax, rows, by, base, others, cfg, title):
    """Paired difference of each of `others` to `base` vs N: a line with its 95% CI band, and a dot
    per seed."""
    for v in [v for v in others if C.select(rows, **{by: v})]:
        d = C.paired_diff_ci(rows, "accuracy", v, base, by=by)
        if not d:
            continue
        xs = [r["length"] for r in d]
        ax.plot(xs, [r["diff"] for r in d], marker="o", ms=3, label=f"{v} − {base} (n={d[0]['n']})", color=COLORS[v])
        ax.fill_between(xs, [r["lo"] for r in d], [r["hi"] for r in d], color=COLORS[v], alpha=0.15)
        b = {(r["seed"], r["length"]): r["accuracy"] for r in C.select(rows, **{by: base})}
        pts = [(r["length"], r["accuracy"] - b[r["seed"], r["length"]]) for r in C.select(rows, **{by: v})
               if (r["seed"], r["length"]) in b]
        ax.scatter([x * (1 + 0.04 * (others.index(v) - len(others) / 2)) for x, _ in pts], [y for _, y in pts],
                   s=6, color=COLORS[v], alpha=0.4, lw=0)
    ax.axhline(0, color="k", lw=0.8)
    ax.axvline(cfg.train_len, color="gray", ls="--", lw=1, label=f"max train length {cfg.train_len}")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="test length N", ylabel=f"accuracy difference to {base}", title=title)
    C.legend_outside(ax)
    ax.grid(alpha=0.3)


def fig_variance(probe, tasks, cfg, out, th):
    """variance.png (the paper's Fig. 1): per-component std of the attention output vs N, one row per
    layer, with the theory curves scaled to none at the shortest N. Returns {(task, variant, where,
    layer): (log-log slope, std(N_max) / std(N_min))}."""
    plt = C.pyplot()
    layers = sorted({r["layer"] for r in probe}) or [0]
    lengths = sorted({r["length"] for r in probe}) or list(cfg.test_lengths)
    fig, axes = plt.subplots(len(layers), len(tasks), figsize=(8 * len(tasks), 4.5 * len(layers)), squeeze=False)
    slopes = {}
    for j, task in enumerate(tasks):
        for i, layer in enumerate(layers):
            p = [r for r in C.select(probe, task=task, layer=layer)
                 if r["where"] == "pre" or r["variant"] in NORMS_AFTER_WO]
            base = C.mean_std_by(C.select(p, variant="none", where="pre"), "length", "comp_std", "variant")
            scale = base["none"][1][0] if base else 1.0
            extra = [(x, y / y[0] * scale, f"theory: {k}") for k, (x, y) in th.items()]
            C.plot_vs_length(p, "comp_std", None, cfg.train_len, group=("variant", "where"), logy=True,
                             ax=axes[i, j], extra=extra, style=style,
                             title=f"{task}, layer {layer}: attention-output std vs N\n(theory scaled to none "
                                   f"at N={lengths[0]})")
            for key, (xs, m, _, _) in C.mean_std_by(p, "length", "comp_std", ("variant", "where", "layer")).items():
                slopes[(task,) + key] = (slope(xs, m), m[-1] / m[0])
    C.save_figure(fig, out / "variance.png")
    return slopes


def fig_shift(probe, tasks, cfg, out):
    """shift.png (the paper's Fig. 3): per-vector mean and variance of the layer-0 attention output,
    none vs layernorm before and after the norm."""
    plt = C.pyplot()
    fig, axes = plt.subplots(2, len(tasks), figsize=(7.5 * len(tasks), 8), squeeze=False)
    for j, task in enumerate(tasks):
        p = [r for r in C.select(probe, task=task, layer=0)  # for none, 'post' is 'pre' again
             if (r["variant"], r["where"]) in (("none", "pre"), ("layernorm", "pre"), ("layernorm", "post"))]
        C.plot_vs_length(p, "vec_mean", None, cfg.train_len, group=("variant", "where"), ax=axes[0, j], style=style,
                         title=f"{task}: per-vector mean of the attention output (layer 0)")
        C.plot_vs_length(p, "vec_var", None, cfg.train_len, group=("variant", "where"), ax=axes[1, j], logy=True,
                         style=style, title=f"{task}: per-vector variance (layer 0)")
    C.save_figure(fig, out / "shift.png")


def fig_distributions(records, tasks, out):
    """distributions.png (the paper's Fig. 2): one component of the layer-0 attention output at a few
    N, none and layernorm after the norm (seed 0)."""
    plt = C.pyplot()
    kept = {(rec["cell"].get("task"), rec["cell"].get("variant")): rec["kept"] for rec in records if rec.get("kept")}
    panels = [(t, v, w) for t in tasks for v, w in (("none", "pre"), ("layernorm", "post")) if (t, v) in kept]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (t, v, w) in zip(axes[0], panels):
        for L in sorted({int(k.split("/")[0]) for k in kept[t, v]}):
            vals = kept[t, v].get(f"{L}/0/{w}")
            if vals:
                ax.hist(vals, bins=40, density=True, histtype="step", label=f"N={L}")
        ax.set(title=f"{t}, {v} ({'before' if w == 'pre' else 'after'} the norm): component 0",
               xlabel="value of attention-output component 0", ylabel="density")
        ax.legend(fontsize=7)
    C.save_figure(fig, out / "distributions.png")


def fig_why(acc, probe, tasks, cfg, out):
    """why.png: the dispersion of the query's attention, exp(H) in layer 0, and its mass on the
    answering item, vs N per variant."""
    plt = C.pyplot()
    lengths = np.array(sorted({r["length"] for r in acc}) or cfg.test_lengths, dtype=float)
    fig, axes = plt.subplots(2, len(tasks), figsize=(7.5 * len(tasks), 8), squeeze=False)
    for j, task in enumerate(tasks):
        C.plot_vs_length(C.select(probe, task=task, layer=0, where="pre"), "eff_n", None, cfg.train_len,
                         logy=True, ax=axes[0, j], extra=[(lengths, lengths + 1.0, "all N+1 tokens")],
                         style=style, title=f"{task}: effective number of attended tokens exp(H) (layer 0)")
        C.plot_vs_length(C.select(acc, task=task), "target_mass", None, cfg.train_len, ax=axes[1, j], style=style,
                         title=f"{task}: attention mass on the answering item (max over heads)")
    C.save_figure(fig, out / "why.png")


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
    plt = C.pyplot()
    top = max(cfg.test_lengths)
    n_rows = 4 if ratios else 3  # per-head stds: --experiment fixes only
    fig, axes = plt.subplots(n_rows, len(tasks), figsize=(6.5 * len(tasks), 3.3 * n_rows), squeeze=False)
    for j, task in enumerate(tasks):
        t_acc = C.select(acc, task=task, length=top)
        variants = [v for v in VARIANTS if C.select(t_acc, variant=v)]
        none = C.per_seed(t_acc, "accuracy", variant="none")
        for i, v in enumerate(variants):
            a = C.per_seed(t_acc, "accuracy", variant=v)
            seed_dots(axes[0, j], i, list(a.values()), COLORS[v])
            if v != "none":
                seed_dots(axes[1, j], i, [a[s] - none[s] for s in a if s in none], COLORS[v])
            seed_dots(axes[2, j], i, list(C.per_seed(t_acc, "target_mass", variant=v).values()), COLORS[v])
            if ratios:
                seed_dots(axes[3, j], i, ratios.get((task, v, 0), []), COLORS[v])
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
    C.save_figure(fig, out / "ladder.png")


def fig_edits(acc, edits, tasks, cfg, out):
    """edits.png: the test-time edits of the none models vs N: accuracy, the paired difference to the
    same model unedited (dots: seeds; band: 95% CI), and the attention mass on the answering item."""
    plt = C.pyplot()
    fig, axes = plt.subplots(3, len(tasks), figsize=(7.5 * len(tasks), 11.5), squeeze=False)
    for j, task in enumerate(tasks):
        rows = edit_table(C.select(acc, task=task), C.select(edits, task=task))
        C.plot_vs_length(rows, "accuracy", None, cfg.train_len, group="edit", chance=1 / cfg.n_classes, ax=axes[0, j],
                         style=style, title=f"{task}: none models edited at test time (mean ± std over seeds)")
        _paired_panel(axes[1, j], rows, "edit", "no edit", list(EDITS), cfg,
                      f"{task}: edited − unedited, per seed (dots), 95% CI")
        C.plot_vs_length(rows, "target_mass", None, cfg.train_len, group="edit", ax=axes[2, j], style=style,
                         title=f"{task}: attention mass on the answering item")
    C.save_figure(fig, out / "edits.png")


def say_claims(rows, say):
    """The claims as a markdown table (pasted into the README as printed)."""
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
    by = {(c["task"], c["what"]): c for c in verdicts}
    say(f"\n| task | variant | accuracy at N = {lo} | accuracy at N = {top} (median) | − none, paired [95% CI] | "
        f"seeds better than none [95% CI] | exp(H), layer 0 | mass on the answer | head std ratio {top}/{lo} |")
    say("|---|---|---|---|---|---|---|---|---|")
    for task in TASKS:
        for v in [v for v in VARIANTS if C.select(acc, task=task, variant=v)]:
            a_lo = C.seed_stats(list(C.per_seed(acc, "accuracy", task=task, variant=v, length=lo).values()))
            a = C.seed_stats(list(C.per_seed(acc, "accuracy", task=task, variant=v, length=top).values()))
            h = C.seed_stats(list(C.per_seed(probe, "eff_n", task=task, variant=v, length=top, layer=0,
                                             where="pre").values()))
            m = C.seed_stats(list(C.per_seed(acc, "target_mass", task=task, variant=v, length=top).values()))
            r = C.seed_stats(ratios.get((task, v, 0), []))
            c = by.get((task, v))
            diff = f"{c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]" if c else ""
            wins = f"{c['wins']}/{c['n']} [{c['wins_ci'][0]:.2f}, {c['wins_ci'][1]:.2f}]" if c else ""
            say(f"| {task} | {v} | {a_lo['mean']:.3f} | {a['mean']:.3f} ± {a['std']:.3f} ({a['median']:.3f}) | {diff} | "
                f"{wins} | {h['mean']:.1f} | {m['mean']:.2f} | {r['mean']:.2f} |")


def say_edits(acc, probe, edits, verdicts, cfg, say):
    """The test-time edits as a markdown table, per task: at the longest N, accuracy (mean ± std,
    median), the paired difference to the same model unedited with its 95% CI, the seeds it helps,
    exp(H) of the query in layer 0, its mass on the answering item, and the mean layer-0 head factor."""
    top = max(cfg.test_lengths)
    by = {(c["task"], c["what"]): c for c in verdicts}
    say(f"\n| task | none models at N = {top} | accuracy (median) | − unedited, paired [95% CI] | seeds it helps "
        "[95% CI] | exp(H), layer 0 | mass on the answer | layer-0 head factor |")
    say("|---|---|---|---|---|---|---|---|")
    for task in TASKS:
        rows = [r for r in edit_table(C.select(acc, task=task), C.select(edits, task=task)) if r["length"] == top]
        for e in [e for e in ("no edit",) + EDITS if C.select(rows, edit=e)]:
            stat = lambda m: C.seed_stats([r[m] for r in C.select(rows, edit=e) if m in r])
            a, c = stat("accuracy"), by.get((task, f"none + {e} (test time)"))
            diff = f"{c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]" if c else ""
            wins = f"{c['wins']}/{c['n']} [{c['wins_ci'][0]:.2f}, {c['wins_ci'][1]:.2f}]" if c else ""
            eff = stat("eff_n") if e != "no edit" else C.seed_stats(list(C.per_seed(
                probe, "eff_n", task=task, variant="none", length=top, layer=0, where="pre").values()))
            fac = f"{stat('factor')['mean']:.2f}" if e != "no edit" else "1"
            say(f"| {task} | {e} | {a['mean']:.3f} ± {a['std']:.3f} ({a['median']:.3f}) | {diff} | {wins} | {eff['mean']:.1f} | "
                f"{stat('target_mass')['mean']:.2f} | {fac} |")


def say_headline(acc, probe, say):
    """The README's headline numbers: at the training N and the longest N, per task and variant,
    accuracy (mean ± std over seeds), exp(H) of the query's layer-0 attention, and its attention mass
    on the item that holds the answer (mean over seeds)."""
    lengths = sorted({r["length"] for r in acc})
    lo, hi = lengths[0], lengths[-1]
    say(f"\nheadline, N = {lo} -> N = {hi} (mean over seeds): accuracy (± std), exp(H) in layer 0 = the number of "
        "tokens the query attends to, attention mass on the answering item")
    for task in TASKS:
        for v in VARIANTS:
            a = C.mean_std_by(C.select(acc, task=task, variant=v), "length", "accuracy", "variant").get(v)
            h = C.mean_std_by(C.select(probe, task=task, variant=v, layer=0, where="pre"), "length", "eff_n",
                              "variant").get(v)
            m = C.mean_std_by(C.select(acc, task=task, variant=v), "length", "target_mass", "variant").get(v)
            if a is None or h is None or m is None:
                continue
            say(f"  {task:<7} {v:<12} accuracy {a[1][0]:.3f} -> {a[1][-1]:.3f} ± {a[2][-1]:.3f}   "
                f"exp(H) {h[1][0]:.1f} -> {h[1][-1]:.1f}   mass on the answer {m[1][0]:.2f} -> {m[1][-1]:.2f}")


def predictors(acc, probe, cfg, variants=VARIANTS):
    """Which measurement tracks accuracy beyond the training length? Pearson r, per task, over every
    (cell, N > N_train) point of the given variants, between accuracy and: the attention mass on the
    answering item, log exp(H) in layer 0, and the layer-0 attention-output std relative to the same
    cell's at N_train (the paper's quantity, before any norm). Returns {task: {name: (r, points)}}."""
    out = {}
    acc = [r for r in acc if r["variant"] in variants]
    for task in TASKS:
        key = lambda r: (r["variant"], r["seed"])
        base = {key(r): r["comp_std"] for r in C.select(probe, task=task, layer=0, where="pre", length=cfg.train_len)}
        pr = {key(r) + (r["length"],): r for r in C.select(probe, task=task, layer=0, where="pre")}
        pts = [(r["accuracy"], r["target_mass"], math.log(pr[key(r) + (r["length"],)]["eff_n"]),
                pr[key(r) + (r["length"],)]["comp_std"] / base[key(r)])
               for r in C.select(acc, task=task) if r["length"] > cfg.train_len and key(r) + (r["length"],) in pr
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
        recs = [{**rec, "rows": C.select(rec["rows"], table="accuracy")} for rec in records
                if rec["cell"].get("task") == task]
        if not C.select(acc, task=task):
            continue
        say(f"\n--- {task} ---")
        table = C.summarize(recs, "accuracy", cfg.train_len, say=say)
        for v in [v for v in VARIANTS if v != "none" and v in table]:
            d = C.paired_diff_ci(C.select(acc, task=task), "accuracy", v, "none")
            say(f"  {v} − none, paired over seeds (95% CI): " +
                ", ".join(f"N={r['length']}: {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]" for r in d))
    firsts = {}
    for rec in records:
        firsts.setdefault(rec["cell"].get("task"), rec)
    for rec in firsts.values():
        for m in rec.get("mistakes", []):
            say(f"mistake ({rec['cell'].get('task')}/{rec['cell'].get('variant')}/seed {rec['cell'].get('seed')}): {m}")


def report(records, cfg, out):
    """Figures, claims.json and the printed summary, from the cell records alone."""
    out = Path(out)
    rows = [r for rec in records for r in rec["rows"]]
    acc, probe = C.select(rows, table="accuracy"), C.select(rows, table="probe")
    heads, edits = C.select(rows, table="head_std"), C.select(rows, table="edit")
    tasks = [t for t in TASKS if C.select(acc, task=t)]
    say = C.Summary()
    if not C.training_report(records, out, say):  # every cell diverged: nothing else to draw
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
    C.atomic_write(out / "claims.json", json.dumps(verdicts, indent=1))
    say(f"\n=== vanishing_variance: {sum(r['status'] == 'ok' for r in records)} runs ok, "
        f"{sum(r['status'] == 'diverged' for r in records)} diverged ===")
    say_details(records, acc, ratios, slopes, th, cfg, say)
    say_headline(acc, probe, say)
    say(f"\nwhat tracks accuracy beyond N = {cfg.train_len}: Pearson r over every (cell, N) point")
    for models, variants in (("none models", ("none",)), ("all models", VARIANTS)):
        for task, rs in predictors(acc, probe, cfg, variants).items():
            say(f"  {task:<7} {models:<12} " + ", ".join(f"{name}: r = {r:+.2f}" for name, (r, n) in rs.items()) +
                f" ({next(iter(rs.values()))[1]} points)")
    say(f"\npaper's claim: {CLAIMS['layernorm']}")
    say(f"{'task':<8} {'variant or edit':<28} reproduced?")
    for r in verdicts:
        say(f"{r['task']:<8} {r['what']:<28} {r['verdict']}")
    say_claims(verdicts, say)
    say_ladder(acc, probe, ratios, verdicts, cfg, say)
    if edits:
        say_edits(acc, probe, edits, verdicts, cfg, say)
    say.write(out)



EXPERIMENTS = {  # what --experiment changes, unless the flag itself is given
    "main": {},
    "fixes": dict(variants=LADDER, seeds=10),
}


def main():
    parser = C.make_parser(__doc__.splitlines()[0], Config, PRESETS)
    parser.add_argument("--experiment", default="main", choices=list(EXPERIMENTS),
                        help="main: the paper's reproduction; fixes: the fix ladder (variants "
                             f"{','.join(LADDER)}, 10 seeds) and the test-time edits of the none models, "
                             "in <out>-fixes")
    args = parser.parse_args()
    cfg = C.parse_config(args, Config, PRESETS)
    cfg = replace(cfg, **{k: v for k, v in EXPERIMENTS[args.experiment].items() if not hasattr(args, k)})
    if args.plot_only:
        recs, cfg = C.saved_run(args.plot_only, Config, cfg)
        return report(recs, cfg, Path(args.plot_only))
    validate(cfg)
    C.check(args.experiment != "fixes" or cfg.train_len >= 2, "--experiment fixes needs --train-len >= 2 "
            "(the edits sharpen by log N / log N_train)")
    if args.experiment != "main" and args.out == parser.get_default("out"):
        args.out += f"-{args.experiment}"
    device, precision, jobs, shard, out = C.setup_run(args, "vanishing_variance")
    th = theory(cfg.test_lengths)
    print("theory: log-log slope of the attention-output std vs N: " +
          ", ".join(f"{k} {slope(x, y):+.3f}" for k, (x, y) in th.items()))
    ex = sample_argmax(np.random.default_rng(0), 1, 4, cfg.n_classes)
    print(f"argmax example (N=4): {decode(ex, 0, cfg.n_classes)}")
    ex = sample_lookup(np.random.default_rng(0), 1, 4, cfg.n_classes, n_keys(cfg))
    print(f"lookup example (N=4): {decode(ex, 0, cfg.n_classes)}")
    cells = C.make_cells(cfg, device, precision, sweep_fields=("seeds", "variants", "tasks"), seed=range(cfg.seeds),
                         task=cfg.tasks, variant=cfg.variants)  # seed by seed: a stopped run has whole seeds
    for c in cells:
        c["compile"] = args.compile
        if args.experiment == "fixes":  # these cells also measure per-head stds, and the none cells the
            c["heads"] = True            # test-time edits (so they have cell files of their own)
            if c["variant"] == "none":
                c["edits"] = True
    records = C.run_sweep(cells, run_cell, out, jobs, shard, args.fresh)
    C.write_results(out, records, cfg, C.environment(device, precision))
    report(records, cfg, out)


if __name__ == "__main__":
    C.cli_main(main)

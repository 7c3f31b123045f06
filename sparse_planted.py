"""sparse_planted.py — sparse planted correlations, locality, and (predictive) position coupling.

Reproduces Golowich, Jelassi, Brandfonbrener, Kakade & Malach, "The Role of Sparsity for Length
Generalization in Transformers" (ICML 2025: "...in LLMs"), arXiv 2502.16792. Their claims:
  (1) length generalization happens when each predicted token depends on a small number k of earlier
      tokens ("k-sparse planted correlations"), and it gets better as k gets smaller;
  (2) position coupling (position ids that put the tokens a prediction depends on next to it) removes
      the theory's locality requirement;
  (3) Predictive Position Coupling (PPC) trains the model to predict the coupled position ids, so
      coupling works on tasks whose ids depend on the input.

The experiments (`--experiments`, any subset):
  sparsity   one model per K in --k-train, trained on k ~ U[1, K]; each k tested at lengths L..8L
  fixed      the control: one model per k in --fixed-k, trained on that k alone
  locality   the k planted bits lie within the last W bits before '=' (W in --windows; 0 = anywhere);
             NoPE, RoPE, and RoPE with coupled position ids
  ppc        pointer-chasing copy: NoPE, RoPE, and a learned-position model trained on coupled ids with
             a position-id head, tested with the gold ids ('oracle') and with its own ('ppc')

Sparse parity D^sp(l, k) (sparsity, fixed, locality). Tokens 0 1 (bits), 0* 1* (planted bits), '=',
'^' (start). l bits, k of them planted (marked) at random places; the label after '=' is the parity of
the planted bits; loss and accuracy on that one token (chance 0.5). l = 10, k = 3:
    ^ 1 0 1* 0 0* 1 1 1* 0 0 =   ->  0          (1 + 0 + 1 = 2: even)
Locality W = 4 puts the planted bits among the last 4 before '='. Coupled position ids give every
planted bit the id of '=' (everything else keeps its index), so under RoPE the query sees them at
relative distance 0 wherever they lie:
    ^ 1 0 1 0* 1 1* 1 0 =     ids 0 1 2 3 9 5 9 7 8 9

Pointer-chasing copy (ppc). n cells, each a value (0-9) and a jump (>1 >2 >3, or E in the last cell).
Starting at cell 0, copy the cell's value and move by its jump until the last cell, then write '$'.
Jumps that would overshoot are shortened, so every chain ends on the last cell. n = 5:
    ^ 3 >2 7 >1 1 >2 4 >1 9 E =   ->  3 1 9 $        (cells 0 -> 2 -> 4)
Coupled ids: '^' 0, both tokens of cell i get i + 1, and each token carries the id of the cell
that the *next* output copies ('=' the first cell's, the last value n + 1: the end):
    ids  0  1 1  2 2  3 3  4 4  5 5  1   3 5 6 6
so the next value sits at relative id 0 and the next id is this id plus the jump found there. In
training every id is shifted by a random offset (Cho et al. 2024), so the whole position table is
trained; a position-id head is trained with cross-entropy next to the token loss. Evaluation is
greedy and autoregressive (key/value cache): 'oracle' feeds the gold ids, 'ppc' the head's argmax.
Metrics: per-token accuracy of the output (values and '$'), exact match, and id accuracy.

Commands and measured run times (2-core CPU, 2 cells at a time; results in the README section):
  python sparse_planted.py                         # quick: sparsity (K = 4, 6) + fixed k = 1..5, 5 seeds,
                                                   #   35 cells: 14.9 min (a second run from scratch gave identical rows)
  python sparse_planted.py --preset smoke          # ~35 s: what the tests run
  python sparse_planted.py --experiments locality  # NoPE / RoPE / coupled RoPE x W = 4, 8, anywhere: 13.7 min
  python sparse_planted.py --experiments ppc       # NoPE, RoPE, coupled (oracle and PPC), 4000 steps: 24.2 min
  python sparse_planted.py --experiments ppc --ppc-variants coupled --ppc-steps 16000 --seeds 2 \
      --out out/sparse_planted/ppc_long            # longer PPC training: 13.1 min
  python sparse_planted.py --experiments sparsity,fixed,locality,ppc   # reuses the cells above: one report
  python sparse_planted.py --device cuda --preset paper   # everything at paper scale (not run: no GPU yet)

Deviations: no code was released and the paper's body could not be read here; the protocol follows
SPEC.md. Our choices: the token layouts above, the locality window anchored at '=', coupling in the
locality experiment by giving planted bits the query's id, the pointer-chasing task and its id scheme,
absolute (learned) position embeddings for the coupled models (the id head needs absolute ids), and one
coupled model evaluated two ways (oracle / ppc) instead of two models. The paper's natural-language
experiment (C4) is out of scope: nothing is downloaded here.
"""
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import common as C

# sparse parity tokens
ZERO, ONE, ZERO_P, ONE_P, SEP, BOS = 0, 1, 2, 3, 4, 5
SPARSE_NAMES = ["0", "1", "0*", "1*", "=", "^"]
# pointer-chasing tokens: values 0-9, jumps >1 >2 >3, the last cell's E, then '=', '$', '^'
N_VALUES, JUMP1, END, P_SEP, P_EOS, P_BOS = 10, 10, 13, 14, 15, 16
POINTER_NAMES = [str(v) for v in range(N_VALUES)] + [">1", ">2", ">3", "E", "=", "$", "^"]
EXPERIMENTS = ("sparsity", "fixed", "locality", "ppc")
LOCALITY_VARIANTS = ("nope", "rope", "coupled")
PPC_VARIANTS = ("nope", "rope", "coupled")  # 'coupled' is evaluated as 'oracle' and as 'ppc'


# ---------------------------------------------------------------------------------------- tasks

def sample_sparse(rng, batch_size, length, k, window=0, coupled=False):
    """Sparse parity D^sp(length, k), see the module docstring. k: an int, or an array (B,) of per-example
    k. window > 0: the planted bits lie among the last `window` bits. Returns idx (B, length + 2),
    at = targets' position ('=', the last), targets (B, 1), planted (B, length + 2) bool, and with
    coupled=True position_ids where planted bits share the id of '='."""
    B, T = batch_size, length + 2
    k = np.broadcast_to(np.asarray(k), (B,))
    C.check(k.min() >= 1 and k.max() <= (window or length), f"cannot plant k={k.max()} bits among "
            f"{window or length}")
    bits = rng.integers(0, 2, (B, length))
    r = rng.random((B, length))
    if window:
        r[:, :length - window] = np.inf  # only the last `window` bits can be planted
    rank = r.argsort(1).argsort(1)  # (B, length): the order of each bit's random number
    planted = rank < k[:, None]  # the k smallest: k distinct random places in the window
    idx = np.full((B, T), SEP)
    idx[:, 0] = BOS
    idx[:, 1:-1] = bits + 2 * planted  # 0 1 0* 1*
    out = {"idx": torch.from_numpy(idx), "at": torch.full((B, 1), T - 1),
           "targets": torch.from_numpy((bits * planted).sum(1, keepdims=True) % 2),
           "planted": torch.from_numpy(np.pad(planted, ((0, 0), (1, 1))))}
    if coupled:
        pid = np.where(out["planted"].numpy(), T - 1, np.arange(T))
        out["position_ids"] = torch.from_numpy(pid)
    return out


def sample_mixture(rng, batch_size, length, K):
    """Sparse parity with k ~ U[1, K] drawn per example."""
    return sample_sparse(rng, batch_size, length, rng.integers(1, K + 1, batch_size))


def sample_pointer(rng, batch_size, n, offset_max=0):
    """Pointer-chasing copy with n cells, see the module docstring. Returns idx (B, T) (padded with
    '$' after each example's end), targets (B, T) (next token at the produced positions, else -1),
    position_ids (B, T) the coupled ids (+ a random offset in 0..offset_max per example),
    pos_targets (B, T) the next token's id where that token is a value, else -1, prompt (the prompt
    length 2n + 2) and chain, a list of the visited cells per example."""
    B, P = batch_size, 2 * n + 2
    vals = rng.integers(0, N_VALUES, (B, n))
    jumps = np.minimum(rng.integers(1, 4, (B, n)), n - 1 - np.arange(n))  # none overshoots the last cell
    chains = []
    for b in range(B):  # follow the jumps from cell 0 to the last cell
        c, chain = 0, [0]
        while c < n - 1:
            c += int(jumps[b, c])
            chain.append(c)
        chains.append(chain)
    T = P + max(len(ch) for ch in chains) + 1
    idx = np.full((B, T), P_EOS)
    pid = np.full((B, T), n + 1)
    idx[:, 0], pid[:, 0] = P_BOS, 0
    idx[:, 1:P - 1:2], idx[:, 2:P - 1:2] = vals, JUMP1 + jumps - 1
    idx[:, P - 2], idx[:, P - 1] = END, P_SEP  # the last cell's jump, then '='
    pid[:, 1:P - 1] = np.repeat(np.arange(1, n + 1), 2)
    targets, pos_targets = np.full((B, T), -1), np.full((B, T), -1)
    for b, chain in enumerate(chains):
        m = len(chain)
        idx[b, P:P + m] = vals[b, chain]  # then '$' (already there)
        pid[b, P - 1:P + m - 1] = np.array(chain) + 1  # '=' and the values: the id of the cell copied next
        targets[b, P - 1:P + m] = idx[b, P:P + m + 1]  # the m values and '$'
        pos_targets[b, P - 1:P + m - 1] = pid[b, P:P + m]  # the ids of the m values
    off = rng.integers(0, offset_max + 1, (B, 1))
    return {"idx": torch.from_numpy(idx), "targets": torch.from_numpy(targets),
            "position_ids": torch.from_numpy(pid + off),
            "pos_targets": torch.from_numpy(np.where(pos_targets >= 0, pos_targets + off, -1)),
            "prompt": P, "chain": chains}


def decode(ids, names):
    return " ".join(names[i] for i in ids)


# ---------------------------------------------------------------------------------------- pointer chasing: greedy

@torch.no_grad()
def greedy_pointer(model, batch, ids):
    """Greedy generation after the prompt, as many tokens as the longest gold answer in the batch.
    ids: 'plain' (0..T-1, NoPE / RoPE), 'gold' (the coupled ids from the example: oracle) or
    'predicted' (each new token gets the id the position head predicted for it: PPC).
    Returns (tokens (B, T), ids fed (B, T), ids predicted (B, T) or None)."""
    idx, P = batch["idx"], batch["prompt"]
    B, T = idx.shape
    fed = torch.arange(T, device=idx.device).expand(B, T).clone() if ids == "plain" else batch["position_ids"].clone()
    seq, pred = idx.clone(), None
    caches = model.new_caches(T)
    out = model.decode(idx[:, :P], fed[:, :P], caches)
    for t in range(P, T):
        tok, pos = out if isinstance(out, tuple) else (out, None)
        seq[:, t] = tok.argmax(-1)
        if pos is not None:
            pred = torch.full_like(idx, -1) if pred is None else pred
            pred[:, t] = pos.argmax(-1)
            if ids == "predicted":
                fed[:, t] = pred[:, t]
        if t < T - 1:
            out = model.decode(seq[:, t:t + 1], fed[:, t:t + 1], caches)
    return seq, fed, pred


def score_pointer(ids):
    """Per-example metrics of greedy_pointer: token accuracy over the produced positions (values and
    '$'), exact match, and (with a position head) the accuracy of the predicted ids of the values."""
    def score(model, batch):
        seq, _, pred = greedy_pointer(model, batch, ids)
        produced = torch.zeros_like(batch["targets"], dtype=torch.bool)
        produced[:, 1:] = batch["targets"][:, :-1] >= 0  # positions that hold produced tokens
        hit = (seq == batch["idx"]) & produced
        out = {"token_acc": hit.sum(1) / produced.sum(1), "exact": (hit.sum(1) == produced.sum(1)).float()}
        if pred is not None:
            valued = torch.zeros_like(produced)
            valued[:, 1:] = batch["pos_targets"][:, :-1] >= 0
            out["id_acc"] = ((pred == batch["position_ids"]) & valued).sum(1) / valued.sum(1)
        return out
    return score


# ---------------------------------------------------------------------------------------- config

@dataclass
class Config(C.TrainConfig):
    experiments: tuple = C.arg(("sparsity", "fixed"), "experiments to run", choices=EXPERIMENTS)
    k_train: tuple = C.arg((4, 6), "sparsity: one model per K, trained on k ~ U[1, K]", min=1)
    fixed_k: tuple = C.arg((1, 2, 3, 4, 5), "fixed: one model per k, trained on that k only (the control)", min=1)
    n_layer: int = C.arg(2, "transformer blocks", min=1)
    n_head: int = C.arg(4, "attention heads", min=1)
    n_embd: int = C.arg(64, "model width", min=1)
    train_min: int = C.arg(8, "fewest bits l in training (at least the largest k)", min=1)
    train_max: int = C.arg(20, "most bits l in training: L", min=1)
    test_lengths: tuple = C.arg((20, 40, 80, 160), "bits l at test (L, 2L, 4L, 8L)", min=1)
    windows: tuple = C.arg((4, 8, 0), "locality: the planted bits lie among the last W bits (0 = anywhere)", min=0)
    loc_k: int = C.arg(3, "locality: planted bits per example", min=1)
    loc_variants: tuple = C.arg(LOCALITY_VARIANTS, "locality: position encodings", choices=LOCALITY_VARIANTS)
    loc_steps: int = C.arg(2000, "locality: optimizer steps per run", min=1)
    ppc_variants: tuple = C.arg(PPC_VARIANTS, "ppc: NoPE, RoPE, coupled (evaluated as oracle and ppc)",
                                choices=PPC_VARIANTS)
    ppc_min: int = C.arg(5, "ppc: fewest cells in training", min=2)
    ppc_max: int = C.arg(20, "ppc: most cells in training", min=2)
    ppc_test: tuple = C.arg((10, 20, 40, 80), "ppc: cells n at test", min=2)
    ppc_steps: int = C.arg(4000, "ppc: optimizer steps per run", min=1)
    probe_examples: int = C.arg(256, "examples per length for the attention-output variance probe", min=2)


PRESETS = {
    "smoke": dict(seeds=2, steps=30, loc_steps=30, ppc_steps=30, experiments=EXPERIMENTS, k_train=(3,),
                  fixed_k=(2,), windows=(4, 0), test_lengths=(20, 40), ppc_test=(10, 20), eval_examples=32,
                  probe_examples=16),
    "quick": dict(seeds=5, steps=3000, lr=3e-3, eval_examples=500),
    "paper": dict(seeds=5, steps=10000, loc_steps=10000, ppc_steps=30000, lr=1e-3, experiments=EXPERIMENTS,
                  k_train=(4, 6, 8, 10, 12), fixed_k=(1, 2, 3, 4, 5, 6, 8), train_min=12, train_max=40,
                  test_lengths=(40, 80, 160, 320), windows=(4, 8, 16, 0), ppc_test=(10, 20, 40, 80, 160)),
}


def validate(cfg):
    """Constraints between flags, checked before any training."""
    rope = ("locality" in cfg.experiments and set(cfg.loc_variants) - {"nope"}) or \
        ("ppc" in cfg.experiments and "rope" in cfg.ppc_variants)
    C.check_model_shape(cfg.n_embd, cfg.n_head, bool(rope))
    C.check(cfg.train_min <= cfg.train_max, f"--train-min {cfg.train_min} > --train-max {cfg.train_max}")
    C.check(cfg.ppc_min <= cfg.ppc_max, f"--ppc-min {cfg.ppc_min} > --ppc-max {cfg.ppc_max}")
    C.check("locality" not in cfg.experiments or max(cfg.windows) <= cfg.train_max,
            f"--windows {max(cfg.windows)} longer than the training sequences (--train-max {cfg.train_max})")
    ks = (cfg.k_train if "sparsity" in cfg.experiments else ()) + (cfg.fixed_k if "fixed" in cfg.experiments else ())
    C.check(not ks or max(ks) <= cfg.train_max, f"k={max(ks + (0,))} planted bits need train_max >= k")
    C.check(min(cfg.test_lengths) >= max(ks + (cfg.loc_k,)), "every test length must hold the largest k")
    C.check("locality" not in cfg.experiments or all(w == 0 or w >= cfg.loc_k for w in cfg.windows),
            f"a window must hold loc_k={cfg.loc_k} planted bits (or be 0 = anywhere)")


def variants_of(exp, cfg):
    if exp == "sparsity":
        return [f"K={K}" for K in cfg.k_train]
    if exp == "fixed":
        return [f"k={k}" for k in cfg.fixed_k]
    if exp == "locality":
        return [f"{v}, W={w or 'all'}" for w in cfg.windows for v in cfg.loc_variants]
    return list(cfg.ppc_variants)


# ---------------------------------------------------------------------------------------- one cell

def sparse_samplers(exp, variant, cfg):
    """(train(rng, B), test_k(k) -> test(rng, B, l), probe test(rng, B, l), ks tested, steps, pos)."""
    if exp == "locality":
        pos, w = variant.split(", W=")
        w = 0 if w == "all" else int(w)
        k = cfg.loc_k
        test_k = lambda kk: functools.partial(sample_sparse, k=kk, window=w, coupled=pos == "coupled")
        lo = max(cfg.train_min, w, k)
        train = lambda rng, B: test_k(k)(rng, B, int(rng.integers(lo, cfg.train_max + 1)))
        return train, test_k, test_k(k), [k], cfg.loc_steps, "none" if pos == "nope" else "rope"
    K = int(variant.split("=")[1])
    test_k = lambda kk: functools.partial(sample_sparse, k=kk)
    lo = max(cfg.train_min, K)
    if exp == "sparsity":  # k ~ U[1, K] per example
        mix = functools.partial(sample_mixture, K=K)
        return (lambda rng, B: mix(rng, B, int(rng.integers(lo, cfg.train_max + 1))), test_k, mix,
                list(range(1, K + 1)), cfg.steps, "none")
    return (lambda rng, B: test_k(K)(rng, B, int(rng.integers(lo, cfg.train_max + 1))), test_k, test_k(K),
            [K], cfg.steps, "none")


def run_sparse(cell, cfg, device):
    train, test_k, probe_test, ks, steps, pos = sparse_samplers(cell["exp"], cell["variant"], cfg)
    torch.manual_seed(cell["seed"])  # init seed; data seed below; test sets have their own fixed seed
    model = C.GPT(C.GPTConfig(vocab_size=len(SPARSE_NAMES), n_layer=cfg.n_layer, n_head=cfg.n_head,
                              n_embd=cfg.n_embd, pos=pos))
    hi = cfg.train_max
    in_dist = lambda m: {f"acc@{hi},k={k}": C.evaluate_by_length(m, test_k(k), [hi], 128, device)[0]["accuracy"]
                         for k in ks}
    result = C.train(model, train, C.replace(cfg, steps=steps), device, data_seed=10_000 + cell["seed"],
                     eval_fn=in_dist, compile=cell.get("compile", False), progress=C.is_main_process(),
                     desc=f"{cell['exp']}/{cell['variant']}/seed{cell['seed']}")
    if result["diverged"]:
        return {"status": "diverged", "train": result, "rows": []}
    rows = []
    for k in ks:
        for r in C.evaluate_by_length(model, test_k(k), cfg.test_lengths, cfg.eval_examples, device):
            rows.append({"table": "accuracy", "k": k, **r})
    _, probes, _ = C.evaluate_with_probes(model, probe_test, cfg.test_lengths, cfg.probe_examples, device)
    rows += [{"table": "probe", **r} for r in probes if r["where"] == "pre"]
    return {"train": result, "rows": rows, "examples": sparse_examples(model, test_k(ks[-1]), cfg, device)}


@torch.no_grad()
def sparse_examples(model, test, cfg, device, k=3):
    """One decoded example at the longest length and a few mistakes there."""
    b = C.to_device(next(C.eval_batches(test, cfg.test_lengths[-1], 64)), device)
    logits, _ = model(b["idx"], position_ids=b.get("position_ids"), at=b["at"])
    pred, gold = logits[:, 0].argmax(-1), b["targets"][:, 0]
    wrong = (pred != gold).nonzero()[:, 0].tolist()
    return [f"l={cfg.test_lengths[-1]} {'right' if i not in wrong else 'WRONG'}: "
            f"{decode(b['idx'][i].tolist(), SPARSE_NAMES)} -> model {int(pred[i])} (gold {int(gold[i])})"
            for i in [0] + [w for w in wrong if w != 0][:k - 1]]


def pointer_samplers(variant, cfg, block):
    """(train(rng, B), test(rng, B, n)) for a pointer-chasing variant. Coupled ids get a random offset in
    training so that every row of the learned position table is trained; NoPE / RoPE train without ids
    (0..T-1). Test batches hold the gold coupled ids; greedy_pointer decides which ids are fed."""
    def train(rng, B):
        n = int(rng.integers(cfg.ppc_min, cfg.ppc_max + 1))
        if variant == "coupled":
            return sample_pointer(rng, B, n, offset_max=block - n - 2)
        b = sample_pointer(rng, B, n)
        return {"idx": b["idx"], "targets": b["targets"]}
    return train, sample_pointer


def run_pointer(cell, cfg, device):
    variant, seed = cell["variant"], cell["seed"]
    block = max(cfg.ppc_test) + 2  # ids 0 .. n + 1
    torch.manual_seed(seed)
    pos = {"nope": "none", "rope": "rope", "coupled": "learned"}[variant]
    model = C.GPT(C.GPTConfig(vocab_size=len(POINTER_NAMES), block_size=block, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, pos=pos,
                              pos_vocab=block if variant == "coupled" else 0))
    train, test = pointer_samplers(variant, cfg, block)
    modes = {"coupled": [("oracle", "gold"), ("ppc", "predicted")]}.get(variant, [(variant, "plain")])
    hi = cfg.ppc_max
    in_dist = lambda m: {f"{name} exact@{hi}": C.evaluate_by_length(m, test, [hi], 128, device,
                                                                    score_pointer(ids))[0]["exact"]
                         for name, ids in modes}
    result = C.train(model, train, C.replace(cfg, steps=cfg.ppc_steps), device, data_seed=10_000 + seed,
                     eval_fn=in_dist, compile=cell.get("compile", False), progress=C.is_main_process(),
                     desc=f"ppc/{variant}/seed{seed}")
    if result["diverged"]:
        return {"status": "diverged", "train": result, "rows": []}
    rows = []
    for name, ids in modes:
        for r in C.evaluate_by_length(model, test, cfg.ppc_test, cfg.eval_examples, device, score_pointer(ids),
                                      tokens_per_batch=2**14):
            rows.append({"table": "accuracy", "variant": name, **r})
    return {"train": result, "rows": rows, "examples": pointer_examples(model, test, modes, cfg, device)}


@torch.no_grad()
def pointer_examples(model, test, modes, cfg, device):
    """One greedy generation per mode at the shortest and the longest test n."""
    out = []
    for n in (cfg.ppc_test[0], cfg.ppc_test[-1]):
        b = C.to_device(next(C.eval_batches(test, n, 8)), device)
        P, gold = b["prompt"], b["idx"][0]
        m = len(b["chain"][0]) + 1
        for name, ids in modes:
            seq, fed, _ = greedy_pointer(model, b, ids)
            verdict = "right" if (seq[0, P:P + m] == gold[P:P + m]).all() else "WRONG"
            out.append(f"n={n} {name} {verdict}: {decode(gold[:P].tolist(), POINTER_NAMES)} -> model: "
                       f"{decode(seq[0, P:P + m].tolist(), POINTER_NAMES)}  (gold: "
                       f"{decode(gold[P:P + m].tolist(), POINTER_NAMES)})")
    return out


def run_cell(cell):
    cfg, device = Config(**cell["config"]), C.cell_device(cell)
    return run_pointer(cell, cfg, device) if cell["exp"] == "ppc" else run_sparse(cell, cfg, device)


# ---------------------------------------------------------------------------------------- report

def rankdata(x):
    """Ranks 0..n-1 of x, ties sharing their mean rank."""
    x = np.asarray(x, float)
    r = np.empty(len(x))
    r[x.argsort(kind="mergesort")] = np.arange(len(x))
    for v in np.unique(x):
        r[x == v] = r[x == v].mean()
    return r


def spearman(x, y):
    rx, ry = rankdata(x), rankdata(y)
    return float(np.corrcoef(rx, ry)[0, 1]) if rx.std() > 0 and ry.std() > 0 else float("nan")


def spearman_ci(points, n_boot=2000, seed=0):
    """Spearman's rho of accuracy against k over the (seed, k, accuracy) points, and a 95% bootstrap
    interval that resamples whole seeds (the independent unit). Returns (rho, lo, hi)."""
    seeds = sorted({s for s, _, _ in points})
    by = {s: [(k, a) for ss, k, a in points if ss == s] for s in seeds}
    rho = spearman([k for _, k, _ in points], [a for _, _, a in points])
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        pts = [p for s in rng.choice(seeds, len(seeds)) for p in by[s]]
        boots.append(spearman([k for k, _ in pts], [a for _, a in pts]))
    boots = np.array(boots)
    boots = boots[~np.isnan(boots)]
    lo, hi = (np.percentile(boots, [2.5, 97.5]) if len(boots) else (float("nan"),) * 2)
    return rho, float(lo), float(hi)


POS_COLORS = {"nope": "C0", "rope": "C1", "coupled": "C2", "oracle": "C2", "ppc": "C3"}  # in every figure


def pos_style(pos):
    return {"color": POS_COLORS.get(pos)}


def line_with_band(ax, rows, x, y, group, colors, label=str):
    for g, (xs, m, s, n) in sorted(C.mean_std_by(rows, x, y, group).items(), key=lambda t: str(t[0])):
        line, = ax.plot(xs, m, marker="o", ms=3, label=f"{label(g)} (n={n.min()})", color=colors.get(g))
        ax.fill_between(xs, m - s, m + s, color=line.get_color(), alpha=0.2)


def accuracy_axes(ax, xlabel, title):
    """Chance line, labels, 0..1 range, legend and grid of an accuracy-vs-category panel."""
    ax.axhline(0.5, color="red", ls=":", lw=1, label="chance 0.5")
    ax.set(xlabel=xlabel, ylabel="accuracy", ylim=(0, 1.05), title=title)
    ax.title.set_fontsize(9)
    C.legend_outside(ax)
    ax.grid(alpha=0.3)


def say_table(say, rows, metric, group, x="l", label=str, width=20):
    """Print metric by length, one line per group: mean ± std over seeds. Returns {group: {length: mean}}."""
    out = {}
    say(f"  {'':<{width}}" + "".join(f"{x + '=' + str(L):>13}" for L in sorted({r['length'] for r in rows})))
    for g, (xs, m, s, n) in sorted(C.mean_std_by(rows, "length", metric, group).items()):
        say(f"  {label(g):<{width}}" + "".join(f"{a:>7.2f}±{b:<5.2f}" for a, b in zip(m, s)) + f"  ({n.min()} seeds)")
        out[g] = dict(zip(xs.tolist(), m.tolist()))
    return out


def report(records, cfg, out):
    """Figures and the printed summary, from the cell records alone (so --plot-only redraws them)."""
    plt = C.pyplot()
    out = Path(out)
    rows = [r for rec in records for r in rec["rows"]]
    acc, probe = C.select(rows, table="accuracy"), C.select(rows, table="probe")
    sp = [r for r in acc if r["exp"] in ("sparsity", "fixed")]
    for r in sp:  # the fixed-k control is one family: its models share the label 'fixed k'
        r["family"] = r["variant"] if r["exp"] == "sparsity" else "fixed k (one model per k)"
    L = cfg.train_max
    palette = C.Palette([r["family"] for r in sp] + [r["variant"] for r in probe])  # models: the same colour
    k_palette = C.Palette(r["k"] for r in sp)                                        # in every figure
    say = C.Summary()
    if not C.training_report(records, out, say):  # every cell diverged: nothing else to draw
        return say.write(out)

    say(f"\n=== sparse_planted: {sum(r['status'] == 'ok' for r in records)} runs ok, "
        f"{sum(r['status'] == 'diverged' for r in records)} diverged ===")
    found = {}
    if sp:  # (1) sparsity: accuracy vs l per k, and accuracy vs k per model family
        fams = sorted({r["family"] for r in sp}, key=lambda f: (f.startswith("fixed"), f))
        fig, axes = plt.subplots(1, len(fams), figsize=(6.5 * len(fams), 4), squeeze=False)
        for ax, fam in zip(axes[0], fams):
            C.plot_vs_length([r for r in sp if r["family"] == fam], "accuracy", None, L, group="k", chance=0.5, ax=ax,
                             title=f"{fam}:\none line per k (legend: k, seeds)", style=k_palette)
            ax.set(xlabel="bits l", ylim=(0, 1.05))
            C.ticks_at(ax, sorted({r["length"] for r in sp}))
        C.save_figure(fig, out / "sparsity_by_length.png")
        ood = sorted({r["length"] for r in sp if r["length"] > L})
        fig, axes = plt.subplots(1, max(1, len(ood)), figsize=(6.5 * max(1, len(ood)), 4), squeeze=False)
        for ax, length in zip(axes[0], ood or [L]):
            sel = [r for r in sp if r["length"] == length]
            line_with_band(ax, sel, "k", "accuracy", "family", colors=palette.colors)
            for i, fam in enumerate(fams):  # every seed as a dot: the spread is often bimodal
                pts = [r for r in sel if r["family"] == fam]
                ax.scatter([r["k"] + 0.08 * (i - 1) for r in pts], [r["accuracy"] for r in pts], s=8, alpha=0.4,
                           color=palette.colors[fam])
            accuracy_axes(ax, "k (planted bits)",
                          f"l = {length} ({length / L:g} x the training length {L}); mean ± std, dots: seeds")
        C.save_figure(fig, out / "sparsity_vs_k.png")
        say(f"\n(1) sparse parity, accuracy by k and length l (trained on l <= {L}); mean ± std over seeds")
        for fam in fams:
            found[fam] = say_table(say, [r for r in sp if r["family"] == fam], "accuracy", "k",
                                   label=lambda k, f=fam: f"{f}, k={k}", width=32)
        say("\n  Spearman rank correlation of accuracy with k (points: seed x k; 95% CI: bootstrap over seeds)")
        for fam in fams:
            for length in ood:
                pts = [(r["seed"], r["k"], r["accuracy"]) for r in sp if r["family"] == fam and r["length"] == length]
                rho, lo, hi = spearman_ci(pts)
                found.setdefault("points", {})[fam, length] = pts
                say(f"  {fam:<28} l={length:<5} rho = {rho:+.2f}  [{lo:+.2f}, {hi:+.2f}]")
    loc = [r for r in acc if r["exp"] == "locality"]
    if loc:  # (2) locality: one panel per window, and accuracy at the longest length vs window
        for r in loc:
            r["pos"], r["W"] = r["variant"].split(", W=")
        Ws = sorted({r["W"] for r in loc}, key=lambda w: (w == "all", int(w) if w != "all" else 0))
        fig, axes = plt.subplots(1, len(Ws) + 1, figsize=(5.8 * (len(Ws) + 1), 4), squeeze=False)
        for ax, w in zip(axes[0], Ws):
            C.plot_vs_length([r for r in loc if r["W"] == w], "accuracy", None, L, group="pos", chance=0.5, ax=ax,
                             title=f"planted bits in the last W = {w} bits\n(k = {cfg.loc_k})", style=pos_style)
            ax.set(xlabel="bits l", ylim=(0, 1.05))
            C.ticks_at(ax, sorted({r["length"] for r in loc}))
        top = max(r["length"] for r in loc)
        ax = axes[0, -1]
        pts = [{**r, "w": Ws.index(r["W"])} for r in loc if r["length"] == top]
        line_with_band(ax, pts, "w", "accuracy", "pos", colors=POS_COLORS)
        ax.set_xticks(range(len(Ws)), Ws)
        accuracy_axes(ax, "window W (locality)", f"accuracy at l = {top} (mean ± std over seeds)")
        C.save_figure(fig, out / "locality.png")
        say(f"\n(2) locality (k = {cfg.loc_k} planted bits among the last W before '='): accuracy, mean ± std over seeds")
        found["loc"] = {g: a[max(a)] for g, a in say_table(say, loc, "accuracy", "variant").items()}
    ppc = [r for r in acc if r["exp"] == "ppc"]
    if ppc:  # (3) pointer chasing: token accuracy, exact match, id accuracy vs n
        metrics = [m for m in ("token_acc", "exact", "id_acc") if any(m in r for r in ppc)]
        fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4), squeeze=False)
        titles = {"token_acc": "per-token accuracy, greedy", "exact": "exact match of the whole output",
                  "id_acc": "accuracy of the predicted position ids"}
        for ax, m in zip(axes[0], metrics):
            for g, (xs, mm, s, n) in sorted(C.mean_std_by(ppc, "length", m, "variant").items(),
                                            key=lambda t: list(POS_COLORS).index(t[0]) if t[0] in POS_COLORS else 9):
                line, = ax.plot(xs, mm, marker="o", ms=3, color=POS_COLORS.get(g), label=f"{g} (n={n.min()})")
                ax.fill_between(xs, mm - s, mm + s, color=line.get_color(), alpha=0.2)
            ax.axvline(cfg.ppc_max, color="gray", ls="--", lw=1, label=f"max train length {cfg.ppc_max}")
            ax.set(xlabel="cells n", ylabel=C.METRIC_LABELS.get(m, m), ylim=(0, 1.05), title=titles[m] + " (mean ± std)")
            ax.set_xscale("log", base=2)
            C.ticks_at(ax, sorted({r["length"] for r in ppc}))
            C.legend_outside(ax)
            ax.grid(alpha=0.3)
        C.save_figure(fig, out / "ppc.png")
        say("\n(3) pointer-chasing copy, greedy decoding; mean ± std over seeds")
        for m in metrics:
            say(f"  {m}:")
            for g, a in say_table(say, ppc, m, "variant", x="n").items():
                found.setdefault("ppc", {})[g, m] = a
    if probe:  # (4) attention-output variance at the query '=' (the sparsity models' if there are any)
        shown = [r for r in probe if r["exp"] in ("sparsity", "fixed")] or probe
        layers = sorted({r["layer"] for r in probe})
        fig, axes = plt.subplots(1, len(layers), figsize=(7 * len(layers), 4.2), squeeze=False)
        for ax, layer in zip(axes[0], layers):
            C.plot_vs_length(C.select(shown, layer=layer), "comp_std", None, L, logy=True, ax=ax, style=palette,
                             title=f"layer {layer}: attention-output std\nat the query '='")
            ax.set_xlabel("bits l")
            C.ticks_at(ax, sorted({r["length"] for r in probe}))
        C.save_figure(fig, out / "variance.png")
        say("\n(4) attention-output std at '=', std(longest l) / std(shortest l), mean over seeds:")
        for g, (xs, m, _, _) in sorted(C.mean_std_by(probe, "length", "comp_std", ("variant", "layer")).items()):
            say(f"  {g[0]:<20} layer {g[1]}: {m[-1] / m[0]:.2f}  (l = {xs[0]} -> {xs[-1]})")
    for rec in records:
        if rec["cell"].get("seed") == 0 and rec.get("examples"):
            say(f"\nexamples ({rec['cell']['exp']} {rec['cell']['variant']}, seed 0):")
            for e in rec["examples"][:4]:
                say(f"  {e if len(e) < 300 else e[:300] + ' ...'}")
    say("\nthe paper's claims next to what was measured (mean over seeds)")
    for line in claims(found, cfg):
        say(line)
    say.write(out)


def claims(found, cfg):
    """One line per claim, from the tables the report printed."""
    out, L = [], cfg.train_max
    for fam in [f for f in found if isinstance(f, str) and (f.startswith("K=") or f.startswith("fixed"))]:
        by_k = found[fam]
        top = max(x for k in by_k for x in by_k[k])
        learned = [k for k in sorted(by_k) if by_k[k].get(L, 0) >= 0.95]  # ~100% in distribution
        missed = [k for k in sorted(by_k) if k not in learned]
        at_top = [by_k[k][top] for k in learned]
        rho, lo, hi = spearman_ci([p for p in found["points"][fam, top] if p[1] in learned]) \
            if len(learned) > 1 else (float("nan"),) * 3
        mono = all(a >= b - 0.02 for a, b in zip(at_top, at_top[1:]))
        verdict = ("reproduced" if mono and hi < 0 else "direction reproduced, not significant" if mono and rho < 0
                   else "NOT reproduced")
        out.append(f"  (1) {fam}: ~100% in distribution (l={L}) for k = {','.join(map(str, learned)) or 'none'}"
                   + (f" (not learned: k = {','.join(map(str, missed))}, left out)" if missed else "")
                   + f"; at l={top} by k " + " ".join(f"{a:.2f}" for a in at_top)
                   + f"; rho {rho:+.2f} [{lo:+.2f}, {hi:+.2f}]; monotone (within 0.02): {'yes' if mono else 'no'}"
                   + f" -> {verdict}")
    if "loc" in found:
        by, spread = found["loc"], {}
        for pos in ("nope", "rope", "coupled"):
            accs = {g.split("W=")[1]: a for g, a in by.items() if g.startswith(pos + ",")}
            if accs:
                spread[pos] = (max(accs.values()) - min(accs.values()), min(accs.values()))
                out.append(f"  (2) {pos}: accuracy at the longest l by window W: "
                           + ", ".join(f"W={w} {a:.2f}" for w, a in accs.items())
                           + f" (spread {spread[pos][0]:.2f})")
        if "coupled" in spread:
            ok = spread["coupled"][0] <= 0.1 and spread["coupled"][1] >= 0.9
            out.append(f"      claim: coupling removes the dependence on W -> {'reproduced' if ok else 'NOT reproduced'} "
                       f"(coupled: spread {spread['coupled'][0]:.2f}, worst {spread['coupled'][1]:.2f}; needs <= 0.10 "
                       f"and >= 0.90)")
    if "ppc" in found:
        p = found["ppc"]
        n_top = max(max(v) for v in p.values())
        get = lambda g, m: p.get((g, m), {}).get(n_top, float("nan"))
        out.append(f"  (3) pointer chasing at n={n_top} (trained n <= {cfg.ppc_max}), token accuracy / exact: "
                   + ", ".join(f"{g} {get(g, 'token_acc'):.2f} / {get(g, 'exact'):.2f}"
                               for g in ("nope", "rope", "oracle", "ppc") if (g, "token_acc") in p))
        ppc_t, best = get("ppc", "token_acc"), max(get("nope", "token_acc"), get("rope", "token_acc"))
        if not np.isnan(ppc_t) and not np.isnan(best):
            verdict = ("reproduced" if get("ppc", "exact") >= 0.9 else
                       "partly (beats NoPE/RoPE, but not exact)" if ppc_t > best + 0.1 else "NOT reproduced")
            out.append(f"      claim: PPC length-generalizes where NoPE/RoPE do not -> {verdict} "
                       f"(ppc {ppc_t:.2f} vs best baseline {best:.2f} token accuracy; exact match >= 0.90 needed)")
    return out


def main():
    parser = C.make_parser(__doc__.splitlines()[0], Config, PRESETS)
    args = parser.parse_args()
    cfg = C.parse_config(args, Config, PRESETS)
    if args.plot_only:
        recs, cfg = C.saved_run(args.plot_only, Config, cfg)
        return report(recs, cfg, Path(args.plot_only))
    validate(cfg)
    device, precision, jobs, shard, out = C.setup_run(args, "sparse_planted")
    rng = np.random.default_rng(0)
    print(f"sparse parity (l=10, k=3): {decode(sample_sparse(rng, 1, 10, 3)['idx'][0].tolist(), SPARSE_NAMES)}")
    ex = sample_pointer(rng, 1, 5)
    print(f"pointer chasing (n=5):     {decode(ex['idx'][0].tolist(), POINTER_NAMES)}")
    cells = []
    sweep = ("seeds", "experiments", "k_train", "fixed_k", "windows", "loc_variants", "ppc_variants")
    for exp in sorted(cfg.experiments, key=lambda e: -{"ppc": 3, "locality": 2}.get(e, 1)):
        # the slow experiments first, so the parallel workers finish together
        cells += C.make_cells(cfg, device, precision, sweep_fields=sweep, exp=[exp], variant=variants_of(exp, cfg),
                              seed=range(cfg.seeds))
    for c in cells:
        c["compile"] = args.compile
    records = C.run_sweep(cells, run_cell, out, jobs, shard, args.fresh)
    C.write_results(out, records, cfg, C.environment(device, precision))
    report(records, cfg, out)


if __name__ == "__main__":
    C.cli_main(main)

"""sparse_planted.py — sparse planted correlations, locality, and (predictive) position coupling.

Reproduces Golowich, Jelassi, Brandfonbrener, Kakade & Malach, "The Role of Sparsity for Length
Generalization in Transformers" (ICML 2025: "...in LLMs"), arXiv 2502.16792. Their claims:
  (1) length generalization happens when each predicted token depends on a small number k of earlier
      tokens ("k-sparse planted correlations"), and it gets better as k gets smaller;
  (2) position coupling (position ids that put the tokens a prediction depends on next to it) removes
      the theory's locality requirement;
  (3) Predictive Position Coupling (PPC) trains the model to predict the coupled position ids, so
      coupling works on tasks whose ids depend on the input.

The studies (`--studies`, any subset):
  sparsity   one model per K in --k-train, trained on k ~ U[1, K]; each k tested at lengths L..8L
  fixed      the control: one model per k in --fixed-k, trained on that k alone
  locality   unmarked bits; the label is the parity of the k bits at fixed distances before '=', spread
             over the last W (W in --windows); NoPE, RoPE, and RoPE with coupled position ids
  ppc        pointer-chasing copy: NoPE, RoPE, and a learned-position model trained on coupled ids with
             a position-id head, tested with the gold ids ('oracle') and with its own ('ppc')

Sparse parity D^sp(l, k) (sparsity, fixed). Tokens 0 1 (bits), 0* 1* (planted bits), '=', '^' (start).
l bits, k of them planted (marked) at random places; the label after '=' is the parity of the planted
bits; loss and accuracy on that one token (chance 0.5). l = 10, k = 3:
    ^ 1 0 1* 0 0* 1 1 1* 0 0 =   ->  0          (1 + 0 + 1 = 2: even)
The marks let a model find the planted bits by content at any distance, so no window can matter here.

The locality task (locality) is found by position only: the same bits without marks, and the label is
the parity of the k bits that lie W, ..., 1 places before '=' (spread_offsets: evenly over the last
W; k = 3, W = 8: the bits 8, 4 and 1 places back). l = 10, W = 8 (the planted bits in brackets only
here, for the reader; the model sees plain 0 and 1):
    ^ 1 0 [1] 0 0 0 [1] 1 0 [0] =   ->  0          (1 + 1 + 0 = 2: even)
Every W trains on the same lengths (l from --loc-min to L) and is tested on the same bit strings, so
W is the only difference between two runs and the comparison can be paired. Coupled position ids
give the planted bits the id of '=' (everything else keeps its index), so under RoPE the query sees
them at relative distance 0 whatever W is:
    ^ 1 0 1 0 0 0 1 1 0 0 =    ids 0 1 2 11 4 5 6 11 8 9 11 11
The default is k = 1 (one bit, W places back): in a pilot, RoPE did not learn k = 3 at fixed places
in 2000 steps (0.50 in distribution, 3 seeds) and k = 2 fell to chance by 4x (2 seeds).

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

Commands (their run times on 2 CPU cores and the results: docs/sparse_planted.md):
  python sparse_planted.py                         # quick: sparsity (K = 4, 6) + fixed k = 1..5, 5 seeds, 35 cells
  python sparse_planted.py --seeds 10              # the sparsity claims: the same 10 seeds, reusing quick's 5 (70 cells)
  python sparse_planted.py --preset smoke          # seconds: what the tests run
  python sparse_planted.py --studies locality --seeds 10   # the locality claims: NoPE / RoPE / coupled RoPE
                                                   #   x W = 1, 4, 16 x 10 seeds, 90 cells
  python sparse_planted.py --studies ppc           # NoPE, RoPE, coupled (oracle and PPC), 4000 steps
  python sparse_planted.py --studies ppc --ppc-steps 16000 --seeds 5 \
      --out results/sparse_planted/ppc16k          # the PPC claims: 15 cells
  python sparse_planted.py --device cuda --preset paper   # everything at paper scale

Deviations: no code was released with the paper. Our choices: the token layouts above, the locality task (unmarked bits at fixed distances
before '='), coupling in it by giving the planted bits the query's id, the pointer-chasing task and its id scheme,
absolute (learned) position embeddings for the coupled models (the id head needs absolute ids), and one
coupled model evaluated two ways (oracle / ppc) instead of two models. The paper's natural-language
experiment (C4) is out of scope: nothing is downloaded.

Read with common.py (the model, training and evaluation); the results are in docs/sparse_planted.md.
"""
import functools
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn

import common as C
import harness as H
import reporting as R
import sparse_planted_report as SR

# sparse parity tokens
ZERO, ONE, ZERO_P, ONE_P, SEP, BOS = 0, 1, 2, 3, 4, 5
SPARSE_NAMES = ["0", "1", "0*", "1*", "=", "^"]
# pointer-chasing tokens: values 0-9, jumps >1 >2 >3, the last cell's E, then '=', '$', '^'
N_VALUES, JUMP1, END, P_SEP, P_EOS, P_BOS = 10, 10, 13, 14, 15, 16
POINTER_NAMES = [str(v) for v in range(N_VALUES)] + [">1", ">2", ">3", "E", "=", "$", "^"]
STUDIES = ("sparsity", "fixed", "locality", "ppc")
LOCALITY_VARIANTS = ("nope", "rope", "coupled")
PPC_VARIANTS = ("nope", "rope", "coupled")  # 'coupled' is evaluated as 'oracle' and as 'ppc'


# ---------------------------------------------------------------------------------------- tasks

def sample_sparse(rng, batch_size, length, k):
    """Sparse parity D^sp(length, k), see the module docstring. k: an int, or an array (B,) of per-example
    k. Returns idx (B, length + 2), at = targets' position ('=', the last), targets (B, 1) and planted
    (B, length + 2) bool."""
    B, T = batch_size, length + 2
    k = np.broadcast_to(np.asarray(k), (B,))
    C.check(k.min() >= 1 and k.max() <= length, f"cannot plant k={k.max()} bits among {length}")
    bits = rng.integers(0, 2, (B, length))
    rank = rng.random((B, length)).argsort(1).argsort(1)  # (B, length): the order of each bit's random number
    planted = rank < k[:, None]  # the k smallest: k distinct random places
    idx = np.full((B, T), SEP)
    idx[:, 0] = BOS
    idx[:, 1:-1] = bits + 2 * planted  # 0 1 0* 1*
    return {"idx": torch.from_numpy(idx), "at": torch.full((B, 1), T - 1),
            "targets": torch.from_numpy((bits * planted).sum(1, keepdims=True) % 2),
            "planted": torch.from_numpy(np.pad(planted, ((0, 0), (1, 1))))}


def spread_offsets(k, window):
    """How far before '=' the k planted bits of the locality task lie: spread evenly over 1..W, the
    farthest exactly W back (k = 3, W = 8: 8, 4, 1)."""
    return np.round(np.linspace(window, 1, k)).astype(int)


def sample_local(rng, batch_size, length, k, window, coupled=False):
    """The locality task, see the module docstring: plain bits (nothing marks the planted ones), label
    the parity of the bits spread_offsets(k, window) places before '='. The bits are the generator's
    first draw, so one seed gives the same bit strings for every W (paired test sets). Returns idx
    (B, length + 2), at, targets (B, 1), planted (B, length + 2) bool, and with coupled=True
    position_ids where the planted bits share the id of '='."""
    B, T = batch_size, length + 2
    C.check(1 <= k <= window <= length, f"the locality task needs k={k} <= W={window} <= l={length}")
    bits = rng.integers(0, 2, (B, length))
    idx = np.full((B, T), SEP)
    idx[:, 0] = BOS
    idx[:, 1:-1] = bits
    where = T - 1 - spread_offsets(k, window)  # positions in idx
    planted = np.zeros((B, T), bool)
    planted[:, where] = True
    out = {"idx": torch.from_numpy(idx), "at": torch.full((B, 1), T - 1),
           "targets": torch.from_numpy(idx[:, where].sum(1, keepdims=True) % 2),
           "planted": torch.from_numpy(planted)}
    if coupled:
        out["position_ids"] = torch.from_numpy(np.where(planted, T - 1, np.arange(T)))
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


def render(ids, names):
    return " ".join(names[i] for i in ids)


class PositionCoupledGPT(C.GPT):
    """common.GPT with a second head that predicts the next token's position id in 0..pos_vocab-1
    (Predictive Position Coupling, Golowich et al. 2025): the loss adds the cross-entropy of
    batch['pos_targets'] (-1 = ignored), and decoding returns the ids' logits too."""

    def __init__(self, cfg: C.GPTConfig, pos_vocab):
        self.pos_vocab = pos_vocab
        super().__init__(cfg)

    def add_heads(self, cfg):
        self.pos_head = nn.Linear(cfg.n_embd, self.pos_vocab, bias=False)

    def forward(self, idx, targets=None, position_ids=None, at=None, pos_targets=None):
        x = self.trunk(idx, position_ids, at)
        logits = self.lm_head(x)
        loss = None if targets is None else C.token_loss(logits, targets)
        if pos_targets is not None:
            pos_loss = C.token_loss(self.pos_head(x), pos_targets)
            loss = pos_loss if loss is None else loss + pos_loss
        return logits, loss

    def loss(self, batch):
        return self(batch["idx"], batch["targets"], batch.get("position_ids"), batch.get("at"),
                    batch.get("pos_targets"))[1]

    @torch.no_grad()
    def logits_and_ids(self, idx, position_ids=None, at=None):
        """(token logits, position-id logits (.., pos_vocab))."""
        x = self.trunk(idx, position_ids, at)
        return self.lm_head(x), self.pos_head(x)

    @torch.no_grad()
    def decode_with_ids(self, idx, position_ids, caches):
        """common.GPT.decode's next-token logits (B, V) and the position-id logits (B, pos_vocab)."""
        x = self.decode_hidden(idx, position_ids, caches)
        return self.lm_head(x), self.pos_head(x)


def decode_step(model, idx, position_ids, caches):
    """(next-token logits, position-id logits or None for a model without a position head)."""
    if hasattr(model, "decode_with_ids"):
        return model.decode_with_ids(idx, position_ids, caches)
    return model.decode(idx, position_ids, caches), None


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
    tok, pos = decode_step(model, idx[:, :P], fed[:, :P], caches)
    for t in range(P, T):
        seq[:, t] = tok.argmax(-1)
        if pos is not None:
            pred = torch.full_like(idx, -1) if pred is None else pred
            pred[:, t] = pos.argmax(-1)
            if ids == "predicted":
                fed[:, t] = pred[:, t]
        if t < T - 1:
            tok, pos = decode_step(model, seq[:, t:t + 1], fed[:, t:t + 1], caches)
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
            out.update(first_drift(pred, batch["position_ids"], valued))
        return out
    return score


def first_drift(pred, gold, valued):
    """Where the predicted ids first leave the gold ones. pred, gold (B, T) ids; valued (B, T) the
    positions whose id was predicted. Per example: ids_ok, how many ids came out right before the
    first wrong one (all of them if none is wrong); and per jump length j = 1, 2, 3 (gold id minus the
    id before it; the step to the end id counts as 1) tries_j, the predictions up to and including
    the first wrong one, and fails_j, 1 if the first wrong one is a jump of j. Over a test set,
    mean(fails_j) / mean(tries_j) is the chance that a jump of j is where the chain first drifts."""
    T = pred.shape[1]
    t = torch.arange(T, device=pred.device).expand_as(pred)
    wrong = (pred != gold) & valued
    first = torch.where(wrong, t, T).amin(1, keepdim=True)  # (B, 1): T when nothing is wrong
    jump = torch.zeros_like(gold)
    jump[:, 1:] = gold[:, 1:] - gold[:, :-1]
    upto = valued & (t <= first)
    out = {"ids_ok": (valued & (t < first)).sum(1).float()}
    for j in (1, 2, 3):
        out[f"tries_j{j}"] = (upto & (jump == j)).sum(1).float()
        out[f"fails_j{j}"] = (wrong & (t == first) & (jump == j)).sum(1).float()
    return out


# ---------------------------------------------------------------------------------------- config

@dataclass
class Config(C.TrainConfig):
    studies: tuple = C.arg(("sparsity", "fixed"), "studies to run (each its own models and claims)", choices=STUDIES)
    k_train: tuple = C.arg((4, 6), "sparsity: one model per K, trained on k ~ U[1, K]", min=1)
    fixed_k: tuple = C.arg((1, 2, 3, 4, 5), "fixed: one model per k, trained on that k only (the control)", min=1)
    n_layer: int = C.arg(2, "transformer blocks", min=1)
    n_head: int = C.arg(4, "attention heads", min=1)
    n_embd: int = C.arg(64, "model width", min=1)
    train_min: int = C.arg(8, "fewest bits l in training (at least the largest k)", min=1)
    train_max: int = C.arg(20, "most bits l in training: L", min=1)
    test_lengths: tuple = C.arg((20, 40, 80, 160), "bits l at test (L, 2L, 4L, 8L)", min=1)
    windows: tuple = C.arg((1, 4, 16), "locality: the planted bits are spread over the last W bits", min=1)
    loc_min: int = C.arg(16, "locality: fewest bits in training, the same for every W (at least the largest W)",
                         min=1)
    loc_k: int = C.arg(1, "locality: planted bits per example", min=1)
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
    "smoke": dict(seeds=2, steps=30, loc_steps=30, ppc_steps=30, studies=STUDIES, k_train=(3,),
                  fixed_k=(2,), windows=(1, 4), test_lengths=(20, 40), ppc_test=(10, 20), eval_examples=32,
                  probe_examples=16),
    "quick": dict(seeds=5, steps=3000, lr=3e-3, eval_examples=500),
    "paper": dict(seeds=5, steps=10000, loc_steps=10000, ppc_steps=30000, lr=1e-3, studies=STUDIES,
                  k_train=(4, 6, 8, 10, 12), fixed_k=(1, 2, 3, 4, 5, 6, 8), train_min=12, train_max=40,
                  test_lengths=(40, 80, 160, 320), windows=(1, 4, 16, 32), loc_min=32, ppc_test=(10, 20, 40, 80, 160)),
}


def validate(cfg):
    """Constraints between flags, checked before any training."""
    rope = ("locality" in cfg.studies and set(cfg.loc_variants) - {"nope"}) or \
        ("ppc" in cfg.studies and "rope" in cfg.ppc_variants)
    C.check_model_shape(cfg.n_embd, cfg.n_head, bool(rope))
    C.check(cfg.train_min <= cfg.train_max, f"--train-min {cfg.train_min} > --train-max {cfg.train_max}")
    C.check(cfg.ppc_min <= cfg.ppc_max, f"--ppc-min {cfg.ppc_min} > --ppc-max {cfg.ppc_max}")
    C.check("ppc" not in cfg.studies or cfg.ppc_max <= max(cfg.ppc_test), f"--ppc-max {cfg.ppc_max} beyond the "
            f"longest --ppc-test {max(cfg.ppc_test)}: the position table is sized from the test lengths")
    C.check("locality" not in cfg.studies or max(cfg.windows) <= cfg.loc_min <= cfg.train_max,
            f"the locality task trains on l = --loc-min {cfg.loc_min} .. --train-max {cfg.train_max}, which must "
            f"hold the largest window {max(cfg.windows)}")
    ks = (cfg.k_train if "sparsity" in cfg.studies else ()) + (cfg.fixed_k if "fixed" in cfg.studies else ())
    C.check(not ks or max(ks) <= cfg.train_max, f"k={max(ks + (0,))} planted bits need train_max >= k")
    C.check(min(cfg.test_lengths) >= max(ks + (cfg.loc_k,)), "every test length must hold the largest k")
    C.check("locality" not in cfg.studies or min(cfg.windows) >= cfg.loc_k,
            f"a window must hold loc_k={cfg.loc_k} planted bits")


def axes_of(exp, cfg):
    """The cell fields of one study, structured (no strings to parse back): sparsity K, fixed k_only,
    locality W and pos, ppc variant."""
    return {"sparsity": dict(K=cfg.k_train), "fixed": dict(k_only=cfg.fixed_k),
            "locality": dict(W=cfg.windows, pos=cfg.loc_variants), "ppc": dict(variant=cfg.ppc_variants)}[exp]


# ---------------------------------------------------------------------------------------- one cell

def sparse_samplers(cell, cfg):
    """(train(rng, B), test_k(k) -> test(rng, B, l), probe test(rng, B, l), ks tested, steps, pos)."""
    if cell["exp"] == "locality":  # every W trains on the same lengths, loc_min..train_max
        coupled, k = cell["pos"] == "coupled", cfg.loc_k

        def test_k(kk):
            return functools.partial(sample_local, k=kk, window=cell["W"], coupled=coupled)
        train = functools.partial(C.sample_length_range, sample=test_k(k), lo=cfg.loc_min, hi=cfg.train_max)
        return train, test_k, test_k(k), [k], cfg.loc_steps, "none" if cell["pos"] == "nope" else "rope"
    K = cell["K"] if cell["exp"] == "sparsity" else cell["k_only"]

    def test_k(kk):
        return functools.partial(sample_sparse, k=kk)
    lo = max(cfg.train_min, K)
    if cell["exp"] == "sparsity":  # k ~ U[1, K] per example
        mix = functools.partial(sample_mixture, K=K)
        return (functools.partial(C.sample_length_range, sample=mix, lo=lo, hi=cfg.train_max), test_k, mix,
                list(range(1, K + 1)), cfg.steps, "none")
    return (functools.partial(C.sample_length_range, sample=test_k(K), lo=lo, hi=cfg.train_max), test_k, test_k(K),
            [K], cfg.steps, "none")


def build_sparse(cell, cfg):
    pos = sparse_samplers(cell, cfg)[5]
    return C.GPT(C.GPTConfig(vocab_size=len(SPARSE_NAMES), n_layer=cfg.n_layer, n_head=cfg.n_head,
                             n_embd=cfg.n_embd, pos=pos))


def train_sparse(model, cell, cfg, device):
    train, test_k, _, ks, steps, _ = sparse_samplers(cell, cfg)
    hi = cfg.train_max

    def in_distribution(m):
        return {f"acc@{hi},k={k}": C.evaluate_by_length(m, test_k(k), [hi], 128, device, dtype=cfg.dtype)[0]["accuracy"]
                for k in ks}
    return {"train": C.train(model, train, replace(cfg, steps=steps), device, data_seed=10_000 + cell["seed"],
                             eval_fn=in_distribution, **H.train_options(R.cell_label(cell)))}


def evaluate_sparse(model, cell, cfg, device):
    _, test_k, probe_test, ks, _, _ = sparse_samplers(cell, cfg)
    rows = []
    for k in ks:  # accuracy and the mass on the planted bits, in the probed pass's own hook
        acc, _, _ = C.evaluate_with_probes(model, test_k(k), cfg.test_lengths, cfg.eval_examples, device,
                                           extra=planted_mass)
        for r in acc:
            mass = r.pop("mass")  # one value per layer
            rows.append({"table": "accuracy", "k": k, **r})
            rows += [{"table": "mass", "k": k, "length": r["length"], "layer": layer, "mass": v, "n": r["n"]}
                     for layer, v in enumerate(mass)]
    _, probes, _ = C.evaluate_with_probes(model, probe_test, cfg.test_lengths, cfg.probe_examples, device)
    rows += [{"table": "probe", **r} for r in probes if r["where"] == "pre"]
    return {"rows": rows, "examples": sparse_examples(model, test_k(ks[-1]), cfg, device)}


def planted_mass(batch, logits, recs):
    """evaluate_with_probes' extra metric: per example, the attention mass that the query '=' puts on the
    planted bits in the head that puts the most there, one column per layer (B, n_layer)."""
    planted = batch["planted"].to(recs[0]["attn"].dtype)[:, None, :]  # (B, 1, T)
    return {"mass": torch.stack([(r["attn"][:, :, 0] * planted).sum(-1).amax(1) for r in recs], 1)}  # (B, nh, T) -> (B,)


@torch.no_grad()
def sparse_examples(model, test, cfg, device, k=3):
    """One decoded example at the longest length and a few mistakes there."""
    b = C.to_device(next(C.eval_batches(test, cfg.test_lengths[-1], 64)), device)
    logits, _ = model(b["idx"], position_ids=b.get("position_ids"), at=b["at"])
    pred, gold = logits[:, 0].argmax(-1), b["targets"][:, 0]
    wrong = (pred != gold).nonzero()[:, 0].tolist()
    return [f"l={cfg.test_lengths[-1]} {'right' if i not in wrong else 'WRONG'}: "
            f"{render(b['idx'][i].tolist(), SPARSE_NAMES)} -> model {int(pred[i])} (gold {int(gold[i])})"
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


def build_pointer(cell, cfg):
    block = max(cfg.ppc_test) + 2  # ids 0 .. n + 1
    pos = {"nope": "none", "rope": "rope", "coupled": "learned"}[cell["variant"]]
    shape = C.GPTConfig(vocab_size=len(POINTER_NAMES), block_size=block, n_layer=cfg.n_layer, n_head=cfg.n_head,
                        n_embd=cfg.n_embd, pos=pos)
    return PositionCoupledGPT(shape, pos_vocab=block) if cell["variant"] == "coupled" else C.GPT(shape)


def pointer_modes(variant):
    """(name, ids fed) of each way a model is tested: the coupled model with gold and with its own ids."""
    return {"coupled": [("oracle", "gold"), ("ppc", "predicted")]}.get(variant, [(variant, "plain")])


def train_pointer(model, cell, cfg, device):
    variant, seed, hi, key = cell["variant"], cell["seed"], cfg.ppc_max, ("sparse_planted", "pointer")
    train, test = pointer_samplers(variant, cfg, model.cfg.block_size)

    def in_distribution(m):
        return {f"{name} exact@{hi}": C.evaluate_by_length(m, test, [hi], 128, device, score_pointer(ids), key=key,
                                                           dtype=cfg.dtype)[0]["exact"] for name, ids in
                pointer_modes(variant)}
    return {"train": C.train(model, train, replace(cfg, steps=cfg.ppc_steps), device, data_seed=10_000 + seed,
                             eval_fn=in_distribution, **H.train_options(f"ppc/{variant}/seed{seed}"))}


def evaluate_pointer(model, cell, cfg, device):
    modes, rows = pointer_modes(cell["variant"]), []
    for name, ids in modes:
        for r in C.evaluate_by_length(model, sample_pointer, cfg.ppc_test, cfg.eval_examples, device,
                                      score_pointer(ids), tokens_per_batch=2**14, key=("sparse_planted", "pointer"),
                                      dtype=cfg.dtype):
            rows.append({"table": "accuracy", "variant": name, **r})
    return {"rows": rows, "examples": pointer_examples(model, sample_pointer, modes, cfg, device)}


@torch.no_grad()
def pointer_examples(model, test, modes, cfg, device):
    """One greedy generation per mode at the shortest and the longest test n."""
    out = []
    for n in (cfg.ppc_test[0], cfg.ppc_test[-1]):
        b = C.to_device(next(C.eval_batches(test, n, 8, key=("sparse_planted", "pointer"))), device)
        P, gold = b["prompt"], b["idx"][0]
        m = len(b["chain"][0]) + 1
        for name, ids in modes:
            seq, fed, _ = greedy_pointer(model, b, ids)
            verdict = "right" if (seq[0, P:P + m] == gold[P:P + m]).all() else "WRONG"
            out.append(f"n={n} {name} {verdict}: {render(gold[:P].tolist(), POINTER_NAMES)} -> model: "
                       f"{render(seq[0, P:P + m].tolist(), POINTER_NAMES)}  (gold: "
                       f"{render(gold[P:P + m].tolist(), POINTER_NAMES)})")
    return out


def build(cell, cfg):
    """The cell's model, untrained (the harness seeds torch with the cell's seed first: the init seed)."""
    return build_pointer(cell, cfg) if cell["exp"] == "ppc" else build_sparse(cell, cfg)


def seq_lens(cell, cfg):
    """(longest training sequence, longest test sequence) in tokens: at most 3n + 3 for pointer chasing,
    length + 2 for sparse parity."""
    if cell["exp"] == "ppc":
        return 3 * cfg.ppc_max + 3, 3 * max(cfg.ppc_test) + 3
    return cfg.train_max + 2, max(cfg.test_lengths) + 2


def train(model, cell, cfg):
    device = torch.device(cell["device"])
    return train_pointer(model, cell, cfg, device) if cell["exp"] == "ppc" else train_sparse(model, cell, cfg, device)


def evaluate(model, cell, cfg):
    device = torch.device(cell["device"])
    return evaluate_pointer(model, cell, cfg, device) if cell["exp"] == "ppc" else \
        evaluate_sparse(model, cell, cfg, device)


def print_examples(cfg):
    rng = np.random.default_rng(0)
    print(f"sparse parity (l=10, k=3): {render(sample_sparse(rng, 1, 10, 3)['idx'][0].tolist(), SPARSE_NAMES)}")
    ex = sample_pointer(rng, 1, 5)
    print(f"pointer chasing (n=5):     {render(ex['idx'][0].tolist(), POINTER_NAMES)}")


SLOW_FIRST = {"ppc": 0, "locality": 1, "sparsity": 2, "fixed": 2}  # so that parallel workers finish together


def groups(cfg):
    """One sub-sweep per study, the slow ones first: its own axes (axes_of), then the seed."""
    return [{"exp": [exp], **axes_of(exp, cfg), "seed": H.seed_list(cfg.seeds)}
            for exp in sorted(cfg.studies, key=SLOW_FIRST.get)]


SCRIPT = H.Script(
    name="sparse_planted", description=__doc__.splitlines()[0], config=Config, presets=PRESETS,
    axes={"exp": "studies", "K": "k_train", "k_only": "fixed_k", "W": "windows", "pos": "loc_variants",
          "variant": "ppc_variants", "seed": "seeds"},
    groups=groups, build=build, train=train, evaluate=evaluate, validate=validate,
    report=functools.partial(SR.report, offsets=spread_offsets),
    examples=print_examples, eval_fields=("test_lengths", "eval_examples", "probe_examples", "ppc_test"),
    seq_lens=seq_lens)

if __name__ == "__main__":
    H.main(SCRIPT)

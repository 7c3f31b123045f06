"""sparse_planted.py: generator oracles (recompute every label and every coupled id from the input),
the position-id head, PPC greedy decoding (on a hand-made model and against a full forward), the rank
statistics, and the smoke preset end to end (files, figures, --plot-only, bad input)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common as C
import reporting as R
import sparse_planted as S
import sparse_planted_report as SR

SCRIPT = str(Path(S.__file__))


@pytest.mark.parametrize("length,k", [(8, 1), (20, 6), (33, 3), (160, 12)])
def test_sparse_parity_oracle(length, k):
    b = S.sample_sparse(np.random.default_rng(length + k), 64, length, k)
    idx, planted = b["idx"].numpy(), b["planted"].numpy()
    T = length + 2
    assert idx.shape == (64, T) and (idx[:, 0] == S.BOS).all() and (idx[:, -1] == S.SEP).all()
    body = idx[:, 1:-1]
    assert set(np.unique(body)) <= {S.ZERO, S.ONE, S.ZERO_P, S.ONE_P}
    marked = body >= S.ZERO_P  # recomputed from the tokens alone
    assert (marked == planted[:, 1:-1]).all() and (marked.sum(1) == k).all()
    assert ((body == S.ONE_P).sum(1) % 2 == b["targets"].numpy()[:, 0]).all()  # the label: parity of 1*
    assert (b["at"].numpy() == T - 1).all() and "position_ids" not in b
    if length >= 20:
        q = length // 4  # places spread over the whole input: some in the first and some in the last quarter
        assert marked[:, :q].any() and marked[:, -q:].any()


def test_sparse_parity_per_example_k_and_bad_k():
    ks = np.array([1, 2, 3, 4, 5, 6] * 4)
    b = S.sample_sparse(np.random.default_rng(0), 24, 10, ks)
    assert (b["planted"].numpy().sum(1) == ks).all()
    with pytest.raises(C.UsageError):
        S.sample_sparse(np.random.default_rng(0), 4, 10, 11)


@pytest.mark.parametrize("length,k,window", [(16, 3, 4), (20, 3, 8), (160, 3, 16), (40, 1, 8), (33, 5, 33)])
@pytest.mark.parametrize("coupled", [False, True])
def test_locality_oracle(length, k, window, coupled):
    b = S.sample_local(np.random.default_rng(length), 64, length, k, window, coupled)
    idx, planted = b["idx"].numpy(), b["planted"].numpy()
    T = length + 2
    assert idx.shape == (64, T) and (idx[:, 0] == S.BOS).all() and (idx[:, -1] == S.SEP).all()
    assert set(np.unique(idx[:, 1:-1])) <= {S.ZERO, S.ONE}  # nothing marks the planted bits
    back = [T - 1 - i for i in range(T) if planted[0, i]]  # how far before '=' each planted bit is
    assert (planted == planted[0]).all() and len(back) == k and max(back) == window and min(back) == (window if k == 1 else 1)
    want = sum(idx[:, T - 1 - d] for d in back) % 2  # the label, recomputed from the tokens at those distances
    assert (b["targets"].numpy()[:, 0] == want).all()
    if coupled:
        assert (b["position_ids"].numpy() == np.where(planted, T - 1, np.arange(T))).all()
    else:
        assert "position_ids" not in b


def test_locality_test_sets_share_their_bits_across_windows():
    """Paired comparisons across W: one seed gives the same bit strings for every window."""
    a, b = (S.sample_local(np.random.default_rng(7), 32, 40, 3, w) for w in (4, 16))
    assert torch.equal(a["idx"], b["idx"]) and not torch.equal(a["targets"], b["targets"])
    with pytest.raises(C.UsageError):
        S.sample_local(np.random.default_rng(0), 4, 10, 3, 12)


def test_mass_on_planted_bits_matches_a_manual_softmax():
    """planted_mass: the query's attention on the planted bits, the best head, recomputed by hand."""
    torch.manual_seed(0)
    model = C.GPT(C.GPTConfig(vocab_size=6, n_layer=1, n_head=2, n_embd=16, pos="rope", mlp=False)).eval()
    b = S.sample_local(np.random.default_rng(0), 8, 12, 3, 8)
    logits, recs = model.probe(b["idx"], b["at"])
    out = {"accuracy": (logits[:, 0].argmax(-1) == b["targets"][:, 0]).float(), **S.planted_mass(b, logits, recs)}
    blk = model.blocks[0]
    x = blk.ln_1(model.wte(b["idx"]))
    q, k, _ = blk.attn.c_attn(x).split(16, dim=2)
    q, k = (t.view(8, 14, 2, 8).transpose(1, 2) for t in (q, k))  # (B, nh, T, hs)
    rope = C.rope_angles(torch.arange(14)[None], 8, model.cfg.rope_base)
    q, k = C.apply_rope(q, rope), C.apply_rope(k, rope)
    p = torch.softmax(q[:, :, -1:] @ k.transpose(-1, -2) / 8 ** 0.5, -1)[:, :, 0]  # (B, nh, T): '=' attends to all
    want = (p * b["planted"][:, None].float()).sum(-1).amax(1)
    assert torch.allclose(out["mass"][:, 0], want, atol=1e-5) and out["mass"].shape == (8, model.cfg.n_layer)
    assert torch.equal(out["accuracy"], C.accuracy_at(model, b)["accuracy"])


def follow(cells):
    """Oracle: the pointer-chasing output from (value, jump-token) cells."""
    out, c = [], 0
    while True:
        v, j = cells[c]
        out.append(v)
        if j == S.END:
            return out
        c += j - S.JUMP1 + 1


@pytest.mark.parametrize("n", [2, 5, 20, 80])
def test_pointer_chasing_oracle(n):
    off_max = 7
    b = S.sample_pointer(np.random.default_rng(n), 32, n, offset_max=off_max)
    idx, tgt, pid, ptg = (b[k].numpy() for k in ("idx", "targets", "position_ids", "pos_targets"))
    P = b["prompt"]
    assert P == 2 * n + 2 and (idx[:, 0] == S.P_BOS).all() and (idx[:, P - 1] == S.P_SEP).all()
    for i in range(32):
        cells = list(zip(idx[i, 1:P - 1:2], idx[i, 2:P - 1:2]))
        assert all(v < S.N_VALUES for v, _ in cells) and cells[-1][1] == S.END
        assert all(S.JUMP1 <= j < S.END and c + j - S.JUMP1 + 1 <= n - 1 for c, (_, j) in enumerate(cells[:-1]))
        out = follow(cells)
        m = len(out)
        assert list(idx[i, P:P + m]) == out and idx[i, P + m] == S.P_EOS and (idx[i, P + m:] == S.P_EOS).all()
        assert list(tgt[i, P - 1:P + m]) == out + [S.P_EOS] and (tgt[i, :P - 1] == -1).all() \
            and (tgt[i, P + m:] == -1).all()
        # coupled ids, recomputed: '^' 0, cell c -> c + 1, '=' and each value: the id of the cell copied next
        chain, c = [0], 0
        while cells[c][1] != S.END:
            c += cells[c][1] - S.JUMP1 + 1
            chain.append(c)
        off = pid[i, 0]
        assert 0 <= off <= off_max
        want = [0] + [c + 1 for c in range(n) for _ in (0, 1)] + [ch + 1 for ch in chain] + [n + 1]
        assert list(pid[i, :P + m] - off) == want
        assert list(ptg[i, P - 1:P + m - 1]) == list(pid[i, P:P + m])  # the next value's id
        assert (ptg[i, :P - 1] == -1).all() and (ptg[i, P + m - 1:] == -1).all()


def test_position_head_loss_is_the_sum_of_two_cross_entropies():
    torch.manual_seed(0)
    model = S.PositionCoupledGPT(C.GPTConfig(vocab_size=17, block_size=30, n_layer=1, n_head=2, n_embd=16,
                                             pos="learned"), pos_vocab=30)
    b = S.sample_pointer(np.random.default_rng(0), 4, 6, offset_max=10)
    logits, loss = model(b["idx"], b["targets"], b["position_ids"], pos_targets=b["pos_targets"])
    same, pos_logits = model.logits_and_ids(b["idx"], b["position_ids"])
    assert torch.equal(same, logits)
    assert logits.shape[-1] == 17 and pos_logits.shape[-1] == 30
    want = F.cross_entropy(logits.reshape(-1, 17), b["targets"].reshape(-1), ignore_index=-1) + \
        F.cross_entropy(pos_logits.reshape(-1, 30), b["pos_targets"].reshape(-1), ignore_index=-1)
    assert torch.allclose(loss, want)
    assert torch.allclose(model.loss(b), want)  # what train() minimizes
    plain = C.GPT(C.GPTConfig(vocab_size=17, block_size=30, n_layer=1, n_head=2, n_embd=16, pos="learned"))
    own = plain(b["idx"], position_ids=b["position_ids"])[0]
    assert torch.allclose(plain.loss(b), F.cross_entropy(own.reshape(-1, 17), b["targets"].reshape(-1),
                                                         ignore_index=-1))  # no head: ids are ignored


class Scripted(torch.nn.Module):
    """A hand-made model: says the gold next token and the gold next id, except that at the second
    produced step it predicts id `bad_id` (once), and after being fed that id it writes token 0."""

    def __init__(self, batch, bad_id):
        super().__init__()
        self.b, self.bad, self.seen = batch, bad_id, []

    def new_caches(self, max_len):
        return [{}]

    def decode_with_ids(self, idx, pos, caches):
        t = caches[0]["t"] = caches[0].get("t", 0) + idx.shape[1]  # the position being predicted
        self.seen.append(pos[:, -1].clone())
        nxt, nid = self.b["idx"][:, t].clone(), self.b["position_ids"][:, t].clone()
        if t == self.b["prompt"] + 1:
            nid[:] = self.bad
        if (pos[:, -1] == self.bad).any():
            nxt[pos[:, -1] == self.bad] = 0
        return F.one_hot(nxt, 17).float(), F.one_hot(nid, 40).float()


def test_ppc_greedy_feeds_the_predicted_ids_on_a_hand_made_model():
    b = S.sample_pointer(np.random.default_rng(3), 1, 8)
    P, m = b["prompt"], len(b["chain"][0])
    assert m >= 4 and b["idx"][0, P + 2] != 0  # the example is long enough to see the detour
    for ids, want in (("gold", dict(token_acc=1.0, exact=1.0)),
                      ("predicted", dict(token_acc=m / (m + 1), exact=0.0))):
        model = Scripted(b, bad_id=39)
        seq, fed, pred = S.greedy_pointer(model, b, ids)
        assert int(pred[0, P + 1]) == 39 and (pred[0, P:P + m] != b["position_ids"][0, P:P + m]).sum() == 1
        if ids == "gold":
            assert (fed == b["position_ids"]).all() and (seq == b["idx"]).all()
        else:  # the predicted id is what the next step is given, and the wrong id leads to a wrong token
            assert int(fed[0, P + 1]) == 39 and int(model.seen[2][0]) == 39
            assert int(seq[0, P + 2]) == 0 and (seq[0, :P + 2] == b["idx"][0, :P + 2]).all()
        out = S.score_pointer(ids)(Scripted(b, bad_id=39), b)
        assert {k: round(float(out[k][0]), 6) for k in want} == {k: round(v, 6) for k, v in want.items()}
        assert abs(float(out["id_acc"][0]) - (m - 1) / m) < 1e-6


def test_first_drift_counts_jumps_up_to_the_first_wrong_id():
    gold = torch.tensor([[0, 5, 6, 8, 11, 12, 0], [0, 5, 6, 8, 11, 12, 0]])  # jumps 1, 2, 3, 1 from position 2 on
    valued = torch.tensor([[0, 0, 1, 1, 1, 1, 0]] * 2, dtype=torch.bool)
    pred = gold.clone()
    pred[0, 4] = 10  # row 0 drifts at the jump of 3, after 2 right ids; a wrong id after it does not count
    pred[0, 5] = 0
    out = S.first_drift(pred, gold, valued)
    assert out["ids_ok"].tolist() == [2, 4]
    assert [out[f"tries_j{j}"].tolist() for j in (1, 2, 3)] == [[1, 2], [1, 1], [1, 1]]
    assert [out[f"fails_j{j}"].tolist() for j in (1, 2, 3)] == [[0, 0], [0, 0], [1, 0]]


@pytest.mark.parametrize("ids", ["plain", "gold", "predicted"])
def test_greedy_pointer_equals_the_full_forward(ids):
    """Every produced token (and predicted id) is the argmax of a full forward over what was fed."""
    torch.manual_seed(1)
    pos = "rope" if ids == "plain" else "learned"
    shape = C.GPTConfig(vocab_size=17, block_size=40, n_layer=2, n_head=2, n_embd=16, pos=pos)
    model = (C.GPT(shape) if ids == "plain" else S.PositionCoupledGPT(shape, pos_vocab=40)).eval()
    b = S.sample_pointer(np.random.default_rng(0), 6, 7)
    seq, fed, pred = S.greedy_pointer(model, b, ids)
    P, T = b["prompt"], b["idx"].shape[1]
    logits, pos_logits = model.logits_and_ids(seq, fed) if ids != "plain" else (model(seq, position_ids=fed)[0], None)
    assert (seq[:, :P] == b["idx"][:, :P]).all()
    assert (seq[:, P:] == logits[:, P - 1:T - 1].argmax(-1)).all()
    if pos_logits is not None:
        assert (pred[:, P:] == pos_logits[:, P - 1:T - 1].argmax(-1)).all()
        assert ((fed == pred) if ids == "predicted" else (fed == b["position_ids"]))[:, P:].all()


def test_rank_statistics():
    assert list(R.rankdata([3, 1, 2, 2])) == [3, 0, 1.5, 1.5]
    assert R.spearman([1, 2, 3, 4], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(-1)
    pts = [(s, k, 1.0 - 0.1 * k + 0.01 * s) for s in range(3) for k in range(1, 6)]
    rho, lo, hi = R.spearman_ci(pts)
    assert rho < -0.9 and lo <= rho <= hi < 0
    flat = [(s, k, 0.5 + 0.01 * ((s * 7 + k * 3) % 5)) for s in range(5) for k in range(1, 6)]
    rho, lo, hi = R.spearman_ci(flat)
    assert lo < 0 < hi  # no trend: the interval covers 0


def test_ppc_claims_oracle():
    """ppc_claims() on rows built by hand: per-seed token accuracies 0.5 + 0.1 s (ppc) and 0.2 (rope) at
    n = 40, so the mean, its t-interval and the paired difference are known in closed form."""
    cfg = S.Config(ppc_test=(20, 40))
    rows = [{"variant": v, "seed": s, "length": n, "token_acc": a, "exact": float(a == 1.0), "id_acc": a}
            for s in range(4) for n in cfg.ppc_test
            for v, a in (("ppc", 1.0 if n == 20 else 0.5 + 0.1 * s), ("rope", 1.0 if n == 20 else 0.2))]
    out = SR.ppc_claims(rows, cfg)
    ppc = next(c for c in out if c["setting"] == "ppc" and "by_n" in c)
    at40 = ppc["by_n"][-1]["token_acc"]  # 0.5, 0.6, 0.7, 0.8: mean 0.65, sd 0.129, t(3) = 3.182
    half = 3.182 * np.std([0.5, 0.6, 0.7, 0.8], ddof=1) / 2
    assert abs(at40["mean"] - 0.65) < 1e-12 and abs(at40["ci"][1] - 0.65 - half) < 1e-3
    assert ppc["by_n"][0]["exact"]["hold"]["k"] == 4 and ppc["by_n"][-1]["exact"]["hold"]["k"] == 0
    (verdict,) = [c for c in out if "best_baseline" in c]
    d = verdict["paired_minus_baseline"]
    assert verdict["best_baseline"] == "rope" and d["n"] == 4 and abs(d["diff"] - 0.45) < 1e-12
    assert abs(d["hi"] - d["diff"] - half) < 1e-3  # the same spread: rope is constant
    assert verdict["verdict"] == "partly (beats NoPE / RoPE, but not exact)"


def test_smoke_preset_end_to_end(tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, "--preset", "smoke", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    acc = [r for r in res["rows"] if r["table"] == "accuracy"]
    sp = [r for r in acc if r["exp"] == "sparsity"]
    assert {(r["k"], r["length"]) for r in sp} == {(k, L) for k in (1, 2, 3) for L in (20, 40)}
    assert len(sp) == 3 * 2 * 2  # k x lengths x seeds
    assert {r["variant"] for r in acc if r["exp"] == "ppc"} == {"nope", "rope", "oracle", "ppc"}
    assert all("id_acc" in r and "ids_ok" in r for r in acc if r.get("variant") in ("oracle", "ppc"))
    assert {(r["pos"], r["W"]) for r in acc if r["exp"] == "locality"} == {(v, w) for v in S.LOCALITY_VARIANTS
                                                                          for w in (1, 4)}
    mass = [r for r in res["rows"] if r["table"] == "mass"]
    assert {(r["exp"], r["layer"]) for r in mass} == {(e, layer) for e in ("sparsity", "fixed", "locality") for layer in (0, 1)}
    assert len(mass) == 2 * len([r for r in acc if r["exp"] != "ppc"]) and all(0 <= r["mass"] <= 1 for r in mass)
    assert all(0 <= r[k] <= 1 for r in acc for k in ("accuracy", "token_acc", "exact", "id_acc") if k in r)
    assert any(r["table"] == "probe" and r["comp_std"] > 0 for r in res["rows"])
    figs = ["sparsity_by_length.png", "sparsity_vs_k.png", "sparsity_mass.png", "locality.png", "ppc.png",
            "variance.png"]
    for f in figs:
        assert (tmp_path / f).stat().st_size > 10_000, f
        (tmp_path / f).unlink()
    summary = (tmp_path / "summary.txt").read_text()
    assert "rho" in summary and "claim" in summary
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert {c["setting"] for c in claims if "by_W" in c} == set(S.LOCALITY_VARIANTS)
    assert {c["setting"] for c in claims if "by_k" in c} == {"K=3", "fixed k (one model per k)"}
    p = subprocess.run([sys.executable, SCRIPT, "--plot-only", str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert all((tmp_path / f).exists() for f in figs)


@pytest.mark.parametrize("flags,word", [(["--windows", "2", "--loc-k", "3"], "window"), (["--windows", "32"], "loc-min"),
                                        (["--k-train", "30"], "train_max"),
                                        (["--studies", "bogus"], "studies")])
def test_bad_input_is_one_line_and_exit_2(tmp_path, flags, word):
    p = subprocess.run([sys.executable, SCRIPT, "--preset", "smoke", *flags, "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and word in p.stderr and "Traceback" not in p.stderr


def test_rho_keeps_every_k_when_one_seed_fails_one_k():
    """One seed that did not learn k = 3 in distribution is left out at k = 3 alone, and reported; rho is
    still over k = 1, 2, 3 with the other seeds' k = 3 (a k is never dropped for every seed)."""
    rows = [{"exp": "fixed", "family": "fixed", "seed": s, "k": k, "length": L,
             "accuracy": (0.5 if (s, k) == (0, 3) else 1.0) if L == 20 else 1.0 - 0.1 * k - 0.01 * s}
            for s in range(4) for k in (1, 2, 3) for L in (20, 160)]
    (c,) = SR.sparsity_claims(rows, 20)
    assert c["ks"] == [1, 2, 3] and c["unlearned"] == [{"seed": 0, "k": 3}]
    kept = [(r["seed"], r["k"], r["accuracy"]) for r in rows if r["length"] == 160 and (r["seed"], r["k"]) != (0, 3)]
    assert len(kept) == 11 and c["rho"] == pytest.approx(R.spearman_ci(kept)[0])
    assert c["rho"] < -0.8 and c["verdict"] == "reproduced"
    by_k3 = next(d for d in c["by_k"] if d["k"] == 3)["by_length"]
    assert next(x for x in by_k3 if x["length"] == 160)["n"] == 4  # the per-k table still shows every seed

"""vanishing_variance.py: task oracles, distinctness up to the largest test length, the theory,
and the smoke preset end to end (files, figures, --plot-only)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vanishing_variance as VV
import vanishing_variance_beyond as VVB
import vanishing_variance_report as VVR

ROOT = Path(__file__).resolve().parent.parent

NC = VV.Config().n_classes


def split(batch):
    ids = batch["idx"].numpy()
    return ids // (NC + 1), ids % (NC + 1)  # (a, b) per token


@pytest.mark.parametrize("length", [1, 16, 2048])
def test_argmax_oracle(length):
    batch = VV.sample_argmax(np.random.default_rng(length), 64, length, NC)
    a, b = split(batch)
    assert batch["idx"].shape == (64, length + 1) and (batch["at"][:, 0] == length).all()
    assert (b[:, -1] == NC).all() and (b[:, :-1] < NC).all()  # the query is last, items are items
    best = a[:, :-1].argmax(1)
    assert (batch["targets"][:, 0].numpy() == b[np.arange(64), best]).all()
    assert (batch["item"].numpy() == best).all()
    assert all(len(set(row)) == length for row in a[:, :-1])  # distinct priorities


@pytest.mark.parametrize("length", [2, 16, 2048])
def test_argmax_gap_oracle(length):
    """argmax-gap: the same task, with the top priority at least GAP of the range above every other."""
    batch = VV.sample_argmax(np.random.default_rng(length), 64, length, NC, gap=VV.GAP)
    a, b = split(batch)
    top2 = np.sort(a[:, :-1], axis=1)[:, -2:]
    assert ((top2[:, 1] - top2[:, 0]) >= VV.GAP * VV.GRID).all() and (a[:, :-1] < VV.GRID).all()
    best = a[:, :-1].argmax(1)
    assert (batch["targets"][:, 0].numpy() == b[np.arange(64), best]).all() and (batch["item"].numpy() == best).all()
    plain = VV.sample_argmax(np.random.default_rng(length), 64, length, NC)
    if length == 2048:  # without the gap, the top two lie about GRID / N apart
        assert np.median(np.diff(np.sort(split(plain)[0][:, :-1], axis=1)[:, -2:])) < VV.GAP * VV.GRID / 50


@pytest.mark.parametrize("length", [1, 16, 2048])
def test_lookup_oracle(length):
    batch = VV.sample_lookup(np.random.default_rng(length), 64, length, NC, n_keys=4 * 2048)
    a, b = split(batch)
    for i in range(64):
        keys, query = list(a[i, :-1]), a[i, -1]
        assert len(set(keys)) == length and keys.count(query) == 1  # distinct keys, query among them
        j = keys.index(query)
        assert batch["targets"][i, 0] == b[i, j] and batch["item"][i] == j
    assert (b[:, -1] == NC).all()


def test_keys_and_priorities_stay_distinct_at_paper_lengths():
    cfg = VV.Config(test_lengths=(16, 16384))
    assert VV.n_keys(cfg) >= 4 * 16384
    look = VV.sample_lookup(np.random.default_rng(0), 4, 16384, NC, VV.n_keys(cfg))
    arg = VV.sample_argmax(np.random.default_rng(0), 4, 16384, NC)
    for batch in (look, arg):
        a, _ = split(batch)
        assert all(len(np.unique(row)) == 16384 for row in a[:, :-1])


def test_item_embedding_is_a_sum_of_parts():
    emb = VV.ItemEmbedding("lookup", 16, NC, 100)
    ids = torch.tensor([[3 * (NC + 1) + 5, 3 * (NC + 1) + NC]])
    out = emb(ids)
    assert torch.allclose(out[0, 0] - out[0, 1], emb.B.weight[5] - emb.B.weight[NC])


def test_theory_slopes():
    th = VVR.theory([16, 64, 256, 1024])
    uniform = th["uniform: sigma/sqrt(N)"]
    assert abs(VVR.slope(*uniform) + 0.5) < 1e-9
    soft = [VVR.slope(x, y) for label, (x, y) in th.items() if label.startswith("softmax")]
    assert all(-0.55 < s < -0.05 for s in soft), soft  # a fixed query: the std still vanishes,
    assert soft[0] < soft[1]                           # more slowly for sharper attention (beta 1 vs 3)


def test_smoke_preset_end_to_end(tmp_path):
    cmd = [sys.executable, str(Path(VV.__file__)), "--preset", "smoke", "--out", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "paper's claim" in p.stdout and "reproduced?" in p.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    acc = [r for r in res["rows"] if r["table"] == "accuracy"]
    assert len(acc) == 2 * 3 * 2 * 3  # tasks x variants x seeds x lengths
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["target_mass"] <= 1 for r in acc)
    probes = [r for r in res["rows"] if r["table"] == "probe"]
    assert {r["where"] for r in probes} == {"pre", "post"} and all(r["comp_std"] > 0 for r in probes)
    std = [r for r in probes if r["task"] == "lookup" and r["variant"] == "none" and r["where"] == "pre"]
    by_len = {}
    for r in std:
        by_len.setdefault(r["length"], []).append(r["comp_std"])
    assert np.mean(by_len[256]) < np.mean(by_len[16])  # the variance vanishes with N
    figs = ["accuracy.png", "variance.png", "shift.png", "distributions.png", "why.png"]
    assert not (tmp_path / "ladder.png").exists()  # the paper's report only: the ladder is vanishing_variance_beyond's
    for f in figs:
        assert (tmp_path / f).stat().st_size > 10_000, f
        (tmp_path / f).unlink()
    assert "reproduced?" in (tmp_path / "summary.txt").read_text()
    p = subprocess.run([sys.executable, str(Path(VV.__file__)), "--plot-only", str(tmp_path)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert all((tmp_path / f).exists() for f in figs)
    tables = sorted(line for line in p.stdout.splitlines() if "±" in line or "paired" in line)
    shutil.rmtree(tmp_path / "cells")  # results.json alone: the same tables, rebuilt from its cells and rows
    p = subprocess.run([sys.executable, str(Path(VV.__file__)), "--plot-only", str(tmp_path)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert tables and sorted(line for line in p.stdout.splitlines() if "±" in line or "paired" in line) == tables


def test_claims_oracle():
    """compare() and verdict() on rows built by hand: layernorm = none + 0.10 or + 0.12 beyond training."""
    cfg = VV.Config(test_lengths=(16, 64))
    gain = lambda v, s, L: 0.1 + 0.02 * (s % 2) if v != "none" and L > 16 else 0.0
    rows = [{"task": "lookup", "variant": v, "seed": s, "length": L, "accuracy": 0.5 + 0.01 * s + gain(v, s, L)}
            for v in ("none", "layernorm") for s in range(10) for L in (16, 64)]
    (c,) = VVR.claims(rows, cfg)
    assert c["what"] == "layernorm" and c["n"] == 10 and c["wins"] == 10
    assert abs(c["diff"] - 0.11) < 1e-12 and 0.1 < c["lo"] < 0.11 < c["hi"] < 0.12
    assert c["verdict"].startswith("yes") and c["wins_ci"][0] > 0.7
    assert abs(c["a"]["median"] - (0.545 + 0.11)) < 1e-12 and abs(c["b"]["mean"] - 0.545) < 1e-12


def test_share_of_the_loss_won_back():
    """none falls from 0.9 (N = 16) to 0.5 (N = 64) and layernorm is 0.1 better at 64: it wins back a
    quarter of the loss; the claim carries the loss and the printed share is diff / loss."""
    cfg = VV.Config(test_lengths=(16, 64))
    rows = [{"task": "lookup", "variant": v, "seed": s, "length": L,
             "accuracy": (0.9 if L == 16 else 0.5 + (0.1 + 0.01 * (s % 2) if v == "layernorm" else 0)) + 0.001 * s}
            for v in ("none", "layernorm") for s in range(10) for L in (16, 64)]
    (c,) = VVR.claims(rows, cfg)
    assert abs(c["loss"] - 0.4) < 1e-12 and abs(c["diff"] - 0.105) < 1e-12
    lines = []
    VVB.say_recovered([c], cfg, lines.append)
    assert "loss 0.400: +26% [" in lines[-1], lines


def test_gap_vs_argmax_oracle():
    """argmax-gap − argmax matched by seed, and the seeds that hold >= 0.95 at the longest N, on rows
    built by hand: argmax 0.70 + 0.01 s at N = 64, argmax-gap 0.99 except seed 3 (0.90)."""
    cfg = VV.Config(test_lengths=(16, 64))
    acc = {("argmax", 64): lambda s: 0.70 + 0.01 * s, ("argmax-gap", 64): lambda s: 0.90 if s == 3 else 0.99}
    rows = [{"task": t, "variant": "none", "seed": s, "length": L, "accuracy": acc.get((t, L), lambda s: 1.0)(s)}
            for t in ("argmax", "argmax-gap") for s in range(10) for L in (16, 64)]
    lines = []
    VVB.say_gap_vs_argmax(rows, cfg, lines.append)
    want = np.mean([(0.90 if s == 3 else 0.99) - 0.70 - 0.01 * s for s in range(10)])
    assert "N=16: +0.000 [+0.000, +0.000]" in lines[0] and f"N=64: {want:+.3f} [" in lines[0], lines
    assert lines[1].endswith("0/10 [0.00, 0.28]") and lines[2].endswith("9/10 [0.60, 0.98]"), lines


def test_wilson_interval():
    from reporting import wilson_ci
    lo, hi = wilson_ci(10, 10)
    assert abs(lo - 0.7225) < 1e-3 and hi == 1.0
    lo, hi = wilson_ci(5, 10)
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3


def test_fixes_experiment_end_to_end(tmp_path):
    cmd = [sys.executable, str(Path(VVB.__file__)), "--preset", "smoke", "--experiment", "fixes", "--seeds", "2",
           "--variants", "none,ssmax", "--tasks", "lookup", "--out", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    edits = [r for r in res["rows"] if r["table"] == "edit"]
    assert {r["variant"] for r in edits} == {"none"} and {r["edit"] for r in edits} == set(VVB.EDITS)
    assert len(edits) == 2 * 3 * 3  # seeds x edits x lengths
    assert all(r["sharpen"] == 1.0 for r in edits if r["edit"] == "scale" or r["length"] == 16)
    assert all(abs(r["sharpen"] - np.log(r["length"]) / np.log(16)) < 1e-9 for r in edits if r["edit"] != "scale")
    heads = [r for r in res["rows"] if r["table"] == "head_std"]
    assert len(heads) == 2 * 2 * 2 * 4 * 3  # variants x seeds x layers x heads x lengths
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert [c["what"] for c in claims] == ["ssmax"] + [f"none + {e} (test time)" for e in VVB.EDITS]
    for f in ("ladder.png", "edits.png", "accuracy.png"):
        assert (tmp_path / f).stat().st_size > 10_000, f
    assert "| lookup | none + select (test time) |" in (tmp_path / "summary.txt").read_text()


def test_verdict_needs_a_minimum_effect():
    """A difference whose interval excludes 0 but is smaller than MATTERS (e.g. -0.001) is no verdict."""
    tiny = [{"length": 32, "diff": -0.001, "lo": -0.0015, "hi": -0.0005}, {"length": 64, "diff": 0.05, "lo": 0.03,
                                                                           "hi": 0.07}]
    assert VVR.verdict(tiny, 16) == "yes, at every N >= 64"
    assert VVR.verdict([dict(tiny[0])], 16) == "no (no significant difference)"
    assert VVR.verdict([{"length": 32, "diff": -0.03, "lo": -0.05, "hi": -0.01}], 16) == "no (worse at N = [32])"


def test_gap_task_runs_with_the_edits(tmp_path):
    """argmax-gap end to end (the task of --experiment gap): claims for ssmax and every edit of none."""
    p = subprocess.run([sys.executable, str(ROOT / "vanishing_variance_beyond.py"), "--preset", "smoke", "--device",
                        "cpu", "--experiment", "gap", "--tasks", "argmax-gap", "--variants", "none,ssmax", "--seeds", "1", "--edits", "true",
                        "--jobs", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert {(c["task"], c["what"]) for c in claims} == {("argmax-gap", "ssmax")} | {
        ("argmax-gap", f"none + {e} (test time)") for e in VVB.EDITS}


def test_ntrain_at_16_reuses_the_fix_ladder_cells():
    """--experiment ntrain's N_train = 16 run is the fix ladder's lookup/none setting: the same cell keys,
    so copying the ladder's cells into its folder saves retraining them."""
    from dataclasses import replace
    import harness as H
    base = replace(VV.Config(), **VV.PRESETS["quick"])
    ladder = H.sweep_cells(VV.SCRIPT, [replace(base, **run) for run in VVB.SCRIPT.experiments["fixes"]], torch.device("cpu"))
    ntrain = H.sweep_cells(VV.SCRIPT, [replace(base, **VVB.ntrain_run(16))], torch.device("cpu"))
    keys = {H.cell_key(c) for c in ladder if c["task"] == "lookup" and c["variant"] == "none"}
    assert len(keys) == 10 and {H.cell_key(c) for c in ntrain} == keys


def test_committed_cells_keep_their_keys():
    """Every cell of the committed fix ladder, gap and ntrain runs is found under the key its command computes
    today: a config field added later (declared late=True, such as train_mix) stays out of the key at its
    default. A field added without it would orphan every committed cell, and this test fails."""
    from dataclasses import replace
    import harness as H
    base = replace(VV.Config(), **VV.PRESETS["quick"])
    for experiment, folder in (("fixes", "fixes"), ("gap", "gap"), ("ntrain", "ntrain")):
        cells = H.sweep_cells(VV.SCRIPT, [replace(base, **run) for run in VVB.SCRIPT.experiments[experiment]],
                              torch.device("cpu"))
        have = {p.stem for p in (ROOT / "results" / "vanishing_variance" / folder / "cells").glob("*.json")}
        assert cells and {H.cell_key(c) for c in cells} <= have, experiment


def test_train_mix_enters_the_key_and_draws_every_length():
    """--train-mix changes the cell (its key holds train_mix) and trains on every N from 1 to N_train."""
    from dataclasses import replace
    import functools
    import harness as H
    cfg = replace(VV.Config(), tasks=("lookup",), variants=("none",), seeds=1)
    (plain,) = H.sweep_cells(VV.SCRIPT, [cfg], torch.device("cpu"))
    (mixed,) = H.sweep_cells(VV.SCRIPT, [replace(cfg, train_mix=True)], torch.device("cpu"))
    assert "train_mix" not in plain["config"] and mixed["config"]["train_mix"] is True
    assert H.cell_key(plain) != H.cell_key(mixed)
    data = functools.partial(VV.up_to_length, sample=VV.sampler("lookup", cfg), length=8)
    rng = np.random.default_rng(0)
    lengths = {data(rng, 4)["idx"].shape[1] - 1 for _ in range(200)}
    assert lengths == set(range(1, 9))


def test_welch_interval():
    """Hand-computed: [1, 2, 3] vs [4, 6, 8]: −4, se = sqrt(1/3 + 4/3), Welch df = 2.94 -> t(2) = 4.303."""
    from reporting import welch_ci
    w = welch_ci([1, 2, 3], [4, 6, 8])
    half = 4.303 * (5 / 3) ** 0.5
    assert w["diff"] == -4 and abs(w["lo"] - (-4 - half)) < 1e-9 and abs(w["hi"] - (-4 + half)) < 1e-9


def test_ntrain_tables_oracle():
    """--experiment ntrain's tables on records built by hand: at N_train = 64 seed 0 never learns (0.5 in
    distribution); at 8x every model trained at 16 loses 0.20 − 0.01 s, and select wins back 0.05."""
    def acc(n, s, L):
        if L == n:
            return 0.5 if (n, s) == (64, 0) else 1.0
        return {16: 0.8, 64: 0.9}[n] + 0.01 * s if L == 8 * n else 0.95
    records = [{"cell": {"seed": s, "config": {"train_len": n}},
                "rows": [{"table": "accuracy", "seed": s, "length": L, "accuracy": acc(n, s, L)} for L in (n, 2 * n, 8 * n)]
                + [{"table": "edit", "edit": "select", "seed": s, "length": L, "accuracy": acc(n, s, L) + 0.05 * (L > n)}
                   for L in (n, 2 * n, 8 * n)]}
               for n in (16, 64) for s in range(10)]
    lines = []
    VVB.say_ntrain(VVB.ntrain_rows(records), lines.append)
    text = "\n".join(lines)
    assert "| 16 | 1.00 ± 0.00 (1.00) | 10/10 [0.72, 1.00] |" in text
    assert "| 64 | 0.95 ± 0.15 (1.00) | 9/10 [0.60, 0.98] |" in text
    loss16 = [0.2 - 0.01 * s for s in range(10)]
    row = [line for line in lines if line.startswith("| 8x | 16 | 128 |")][0]
    assert f"| {np.mean(loss16):.3f} ± {np.std(loss16):.3f} |" in row and "| +0.050 [+0.050, +0.050] | 10/10 |" in row
    assert row.endswith(f"| {0.05 / np.mean(loss16):.0%} |")  # the share of the loss select wins back
    loss64 = [0.5 - 0.9] + [0.1 - 0.01 * s for s in range(1, 10)]  # seed 0: 0.5 in distribution, 0.9 at 8x
    assert f"N_train = 16: {np.mean(loss16):.3f} (10 seeds), N_train = 64: {np.mean(loss64):.3f} (10 seeds); " \
           "8x holds (loss <= 0.01) at N_train = 64, not at 16" in text
    lines = []  # without the edits (--edits false): the select columns stay empty
    VVB.say_ntrain([r for r in VVB.ntrain_rows(records) if r["edit"] == "no edit"], lines.append)
    assert [line for line in lines if line.startswith("| 8x | 16 | 128 |")][0].endswith("|  |  |  |")

"""parity_random_access.py: format oracles (decode back to bits / digits and recompute every label),
anchor uniqueness, greedy decoding (== decoding without a cache; stopping rules on hand-made
models), and the smoke preset end to end (files, figures, --plot-only, bad input)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common as C
import cli
import harness as H
import reporting as R
import parity_random_access as P
import parity_random_access_report as PR
from reference import reference_maps

SCRIPT = str(Path(P.__file__))


def parts(b):
    idx = b["idx"].numpy()
    return idx, b["inputs"].numpy(), b["steps"].numpy(), b["at"].numpy()


@pytest.mark.parametrize("fmt", P.PARITY_FORMATS)
@pytest.mark.parametrize("n", [1, 4, 20, 60])
def test_parity_oracle(fmt, n):
    b = P.sample_batch(np.random.default_rng(n), 32, n, fmt, pool=128, cycle=4)
    idx, inputs, steps, at = parts(b)
    bits = idx[:, inputs]
    assert inputs.shape == (n,) and set(np.unique(bits)) <= {0, 1}
    assert (idx[:, 0] == P.BOS).all() and (idx[:, 1:] != P.BOS).all()  # one start token, first
    parity = np.array([[sum(row[:i + 1]) % 2 for i in range(n)] for row in bits])  # recomputed from the input
    if fmt == "none":
        assert (idx[:, steps[0]] == parity[:, -1]).all() and (idx[:, -1] == P.EOS).all()
    else:
        assert (idx[:, steps] == parity).all()
    assert (b["targets"].numpy() == idx[:, at[0] + 1]).all() and (at == at[0]).all()  # labels = next tokens
    if fmt != "interleaved":
        assert (idx[:, -1] == P.EOS).all() and at[0, -1] == idx.shape[1] - 2  # '$' is produced, last
        assert (idx[:, :steps[0]] != P.EOS).all()
    if fmt in ("mnemonic", "constant", "cyclic", "misaligned"):
        a_in, a_out = idx[:, inputs - 1], idx[:, steps - 1]  # the anchor before each bit / step
        assert (a_in >= P.A0).all() and (a_out >= P.A0).all()
        assert not np.isin(at[0] + 1, np.r_[inputs - 1, steps - 1]).any()  # anchors are given, not produced
        for i in range(32):
            if fmt == "mnemonic":
                assert len(set(a_in[i])) == n and (a_in[i] == a_out[i]).all()  # unique keys, repeated
            elif fmt == "constant":
                assert set(a_in[i]) == set(a_out[i]) == {P.A0}
            elif fmt == "cyclic":
                assert (a_in[i] == a_out[i]).all() and len(set(a_in[i])) == min(n, 4)
                assert all(a_in[i, j] == a_in[i, j % 4] for j in range(n))
            else:  # misaligned: 2n distinct anchors, the scratchpad's not in the input
                assert len(set(a_in[i]) | set(a_out[i])) == 2 * n


@pytest.mark.parametrize("fmt", P.ADD_FORMATS)
@pytest.mark.parametrize("d", [1, 3, 12])
def test_addition_oracle(fmt, d):
    b = P.sample_batch(np.random.default_rng(d), 32, d, fmt, pool=64)
    idx, inputs, steps, at = parts(b)
    plus = int(np.flatnonzero(idx[0] == P.PLUS)[0])
    x = idx[:, inputs]                                    # first operand, LSD first, d+1 digits
    y = idx[:, plus + inputs]                             # second operand, same layout ('^' comes first)
    s = idx[:, steps]
    num = lambda digits: digits @ (10 ** np.arange(digits.shape[1], dtype=object))
    assert x.shape[1] == d + 1 and (x[:, -1] == 0).all() and (y[:, -1] == 0).all()
    assert (num(x) + num(y) == num(s)).all()
    assert (b["targets"].numpy() == idx[:, at[0] + 1]).all() and (idx[:, -1] == P.EOS).all()
    if fmt == "add-mnemonic":
        assert (np.diff(inputs) == 2).all()
        for i in range(32):  # one anchor per digit position, shared by both operands and the sum
            a = idx[i, inputs - 1]
            assert len(set(a)) == d + 1
            assert (idx[i, plus + inputs - 1] == a).all() and (idx[i, steps - 1] == a).all()


def test_addition_formats_are_tested_on_the_same_sums():
    """The paired add-mnemonic - add difference in claims() needs both formats' test sets at each n to
    hold the same sums, in the same order: recompute the operands from each format's tokens."""
    cfg = P.Config(add_test_lengths=(3, 15), eval_examples=500)
    operands = {}
    for fmt in ("add", "add-mnemonic"):
        _, test = P.samplers(fmt, cfg, P.build_model(fmt, "rope", cfg).cfg.block_size)  # as run_cell does
        for n in cfg.add_test_lengths:
            (b,) = list(C.eval_batches(test, n, cfg.eval_examples))  # one batch of 500 at these lengths
            idx, inputs, _, _ = parts(b)
            plus = int(np.flatnonzero(idx[0] == P.PLUS)[0])
            operands[fmt, n] = (idx[:, inputs], idx[:, plus + inputs])
    for n in cfg.add_test_lengths:
        assert all((a == m).all() for a, m in zip(operands["add", n], operands["add-mnemonic", n]))
    assert not (operands["add", 3][0][:, :3] == operands["add", 3][0][0, :3]).all()  # not one constant sum


@pytest.mark.parametrize("positions", ["plain", "random"])
def test_mixed_addition_batch_pads_without_changing_any_row(positions):
    """Addition trains on batches of mixed digit counts: every row's scored logits equal those of the
    row alone (the '$' padding and the ignored targets change nothing), and its labels are its sums."""
    cfg = P.Config(formats=("add",), positions=positions, add_train_max=5, add_test_lengths=(5,))
    model = tiny("add")
    train, _ = P.samplers("add", cfg, model.cfg.block_size)
    b = train(np.random.default_rng(0), 48)
    rows = (b["targets"] >= 0).sum(1)  # m + 1 answer digits and '$' per row
    assert len(set(rows.tolist())) == 5 and (b["targets"][:, 0] >= 0).all()  # 5 digit counts in one batch
    with torch.no_grad():
        logits, _ = model(b["idx"], None, b.get("position_ids"), b["at"])
        for i in (0, 20, 47):
            k, t = int(rows[i]), int(b["at"][i, rows[i] - 1]) + 2  # the row's own tokens end with its '$'
            assert b["idx"][i, t - 1] == P.EOS and (b["targets"][i, :k] == b["idx"][i, b["at"][i, :k] + 1]).all()
            alone = b["position_ids"][i:i + 1, :t] if positions == "random" else None
            ref, _ = model(b["idx"][i:i + 1, :t], None, alone, b["at"][i:i + 1, :k])
            assert torch.allclose(logits[i, :k], ref[0], atol=1e-5)
            w = k - 1  # digits per operand and in the sum: ^ x(w) + y(w) = s(w) $, LSD first
            x, y, z = (b["idx"][i, 1 + j * (w + 1):1 + j * (w + 1) + w].numpy() for j in range(3))
            num = lambda d: int(sum(int(v) * 10 ** e for e, v in enumerate(d)))
            assert b["idx"][i, w + 1] == P.PLUS and num(x) + num(y) == num(z)


def test_copy_pretraining_oracle():
    b = P.sample_copy(np.random.default_rng(0), 16, 7, pool=32)
    idx, at = b["idx"].numpy(), b["at"].numpy()
    assert idx.shape == (16, 16) and (idx[:, 0] == P.BOS).all() and (idx[:, 8] == P.SEP).all()
    assert (idx[:, 1:8] == idx[:, 9:]).all()
    assert (at[0] == np.arange(8, 15)).all() and (b["targets"].numpy() == idx[:, 9:]).all()
    assert ((idx[:, 1:] < 10) | ((idx[:, 1:] >= P.A0) & (idx[:, 1:] < P.A0 + 32)) | (idx[:, 1:] == P.SEP)).all()


def test_random_positions_are_sorted_distinct_and_in_range():
    b = P.random_positions(P.sample_batch(np.random.default_rng(0), 64, 20, "mnemonic"), np.random.default_rng(1), 242)
    pid = b["position_ids"].numpy()
    assert pid.shape == b["idx"].shape and (np.diff(pid, axis=1) > 0).all() and pid.min() >= 0 and pid.max() < 242
    assert pid[:, -1].max() > 200  # the training positions reach the range a 60-bit test uses


def test_too_few_anchors_is_a_usage_error():
    with pytest.raises(C.UsageError):
        P.sample_batch(np.random.default_rng(0), 2, 70, "mnemonic", pool=64)


def tiny(fmt, pos="rope"):
    torch.manual_seed(0)
    cfg = P.Config(n_layer=2, n_embd=32, anchors=64, test_lengths=(4, 12), map_length=20)
    return P.build_model(fmt, pos, cfg).eval()


@pytest.mark.parametrize("fmt", ["scratchpad", "interleaved", "mnemonic", "add-mnemonic"])
def test_greedy_equals_decoding_without_cache(fmt):
    model = tiny(fmt)
    b = P.sample_batch(np.random.default_rng(0), 8, 6, fmt, pool=64)
    seq = P.greedy(model, b)
    ref = b["idx"].clone()  # the plain way: rerun the whole prefix for every produced token
    for t in (b["at"][0] + 1).tolist():
        logits, _ = model(ref[:, :t])
        ref[:, t] = logits[:, -1].argmax(-1)
    stopped = seq < 0
    assert ((seq == ref) | stopped).all()
    first = torch.where(stopped.any(1), stopped.float().argmax(1), seq.size(1))
    assert all((ref[i, :first[i]] == P.EOS).any() or not stopped[i].any() for i in range(8))


class Scripted(torch.nn.Module):
    """A hand-made 'model' for the stopping rules: says the gold next token, except where the mode
    says otherwise ('early': '$' at the first produced step; 'late': never '$'; 'flip': flips p_2)."""

    def __init__(self, gold, mode):
        super().__init__()
        self.gold, self.mode = gold, mode

    def new_caches(self, max_len):
        return [{}]

    def decode(self, idx, pos, caches):
        t = caches[0]["t"] = caches[0].get("t", 0) + idx.shape[1]  # the position being predicted
        nxt = self.gold[:, t].clone()
        first = int((self.gold[0] == P.SEP).nonzero()[0, 0]) + 1
        if self.mode == "early" and t == first:
            nxt[:] = P.EOS
        if self.mode == "late":
            nxt[nxt == P.EOS] = 0
        if self.mode == "flip" and t == first + 1:
            nxt = 1 - nxt
        return F.one_hot(nxt, 20).float()


@pytest.mark.parametrize("mode,expect", [
    ("gold", dict(accuracy=1, exact=1, stop_early=0, stop_late=0)),
    ("early", dict(accuracy=0, exact=0, stop_early=1, stop_late=0)),
    ("late", dict(accuracy=1, exact=0, stop_early=0, stop_late=1)),
    ("flip", dict(accuracy=1, exact=0, stop_early=0, stop_late=0)),  # p_2 wrong, the rest teacher-given
])
def test_stopping_rules_on_hand_made_models(mode, expect):
    b = P.sample_batch(np.random.default_rng(0), 4, 5, "scratchpad")
    out = P.score("scratchpad")(Scripted(b["idx"], mode), b)
    assert {k: float(out[k].float().mean()) for k in expect} == expect
    assert float(out["step_acc"][:, 0].float().mean()) == (0 if mode == "early" else 1)


def test_attention_on_bits_reads_the_maps():
    model = tiny("scratchpad")
    b = P.sample_batch(np.random.default_rng(0), 4, 10, "scratchpad")
    mass, maps = P.attention_on_bits(model, b)
    full = reference_maps(model, b["idx"])  # an independent computation
    i = 3  # step 4 is written at position steps[3] - 1 and should read bit 4 at inputs[3]
    assert torch.allclose(mass[1, 0, i], full[1][:, 0, b["steps"][i] - 1, b["inputs"][i]].mean())
    assert maps.shape == (2, 4, 10, 10) and torch.allclose(maps[0, 1, i, 0], full[0][0, 1, b["steps"][i] - 1, b["inputs"][0]])


def test_smoke_preset_end_to_end(tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, "--preset", "smoke", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    acc = [r for r in res["rows"] if r["table"] == "accuracy"]
    assert {r["fmt"] for r in acc} == {"scratchpad", "mnemonic", "add-mnemonic"}
    assert len(acc) == 3 * 2 * 3  # formats x seeds x lengths
    assert all(0 <= r[k] <= 1 for r in acc for k in ("accuracy", "exact", "stop_early", "stop_late"))
    steps = [r for r in res["rows"] if r["table"] == "step" and r["fmt"] == "mnemonic" and r["length"] == 40]
    assert sorted({r["step"] for r in steps}) == list(range(1, 41))
    assert any(r["table"] == "probe" and r["comp_std"] > 0 for r in res["rows"])
    figs = ["accuracy.png", "steps.png", "attention.png", "variance.png"]
    for f in figs:
        assert (tmp_path / f).stat().st_size > 10_000, f
        (tmp_path / f).unlink()
    summary = (tmp_path / "summary.txt").read_text()
    assert "claim" in summary
    r = next(r for r in acc if r["fmt"] == "mnemonic" and r["seed"] == 1)  # its row in the per-seed table:
    table = summary.split("final-answer accuracy per seed, by bits n:")[1].split("\n  mnemonic")[1]
    line = next(x for x in table.splitlines()[2:] if x.split()[0] == "1").split()
    lengths = sorted({a["length"] for a in acc if a["fmt"] == "mnemonic"})
    assert line[1 + lengths.index(r["length"])] == f"{r['accuracy']:.3f}"
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert {c["fmt"] for c in claims} == {"scratchpad", "mnemonic", "add-mnemonic"}
    assert all(c["seeds"] == 2 for c in claims if "seeds" in c)
    p = subprocess.run([sys.executable, SCRIPT, "--plot-only", str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert all((tmp_path / f).exists() for f in figs)


def test_claims_oracle():
    """claims() on rows built by hand: mnemonic generalizes on 7 of 10 seeds, scratchpad on none;
    addition with anchors beats plain addition at 3x the longest training length (5 digits)."""
    cfg = P.Config(test_lengths=(20, 40, 60, 100), add_test_lengths=(5, 15))
    where = "rope, random"
    row = lambda fmt, s, L, a: {"variant": f"{fmt}, {where}", "fmt": fmt, "setting": where, "seed": s, "length": L,
                                "accuracy": a}
    acc = []
    for s in range(10):
        for L in cfg.test_lengths:
            acc.append(row("mnemonic", s, L, 1.0 if L == 20 or s < 7 else 0.6))
            acc.append(row("scratchpad", s, L, 1.0 if L == 20 else 0.5))
        acc += [row("add", s, 5, 0.99), row("add", s, 15, 0.2), row("add-mnemonic", s, 5, 1.0),
                row("add-mnemonic", s, 15, min(1.0, 0.9 + 0.02 * s))]
    mass = [{"variant": f"scratchpad, {where}", "fmt": "scratchpad", "setting": where, "seed": s, "length": L,
             "mass": 0.9 if L == 20 else 0.1 * s} for s in range(10) for L in cfg.test_lengths]
    out = PR.claims(acc, mass, cfg, P.ADD_FORMATS)
    by = {c["fmt"]: c for c in out if "seeds" in c}
    mn, sp = by["mnemonic"], by["scratchpad"]
    assert mn["generalize_at"] == 60 and mn["test_max"] == 100  # 3 x the longest training length (20)
    assert (mn["seeds_ok"], mn["seeds"]) == (7, 10) and mn["seeds_ok_ci"] == R.wilson_ci(7, 10)
    assert abs(mn["beyond"]["mean"] - 0.88) < 1e-12 and mn["beyond"]["median"] == 1.0
    assert mn["verdict"] == "partly"
    assert sp["seeds_ok"] == 0 and sp["inside"]["mean"] == 1.0 and sp["verdict"] == "reproduced"
    assert (mn["seeds_learned"], sp["seeds_learned"]) == (10, 10)  # 1.0 at n = 20 for every seed
    att, = [c for c in out if "mass_inside" in c]
    assert (att["fmt"], att["n_inside"], att["n_beyond"]) == ("scratchpad", 20, 60)
    assert att["mass_inside"]["mean"] == 0.9 and abs(att["mass_beyond"]["mean"] - 0.45) < 1e-12
    add, am = by["add"], by["add-mnemonic"]
    assert (add["train_max"], add["generalize_at"], add["seeds_learned"]) == (5, 15, 10)
    assert am["seeds_ok"] == 7 and am["verdict"] == "reproduced"  # seeds 3..9 >= 0.95 at 15 digits; plain: 0.2
    d = am["paired_at_generalize"]  # mean of 0.9 + 0.02 s (capped at 1) - 0.2 over the 10 seeds
    assert d["n"] == 10 and abs(d["diff"] - 0.77) < 1e-12 and 0 < d["lo"] < d["diff"] < d["hi"]


def test_attention_figure_shows_the_same_seed_when_only_its_maps_are_kept():
    """Committed folders keep the maps of the seed the figure shows and no other: the choice and its
    "best of 10" must not change."""
    cfg = P.Config(test_lengths=(20, 40))
    recs = [{"label": "mnemonic, rope", "cell": {"fmt": "mnemonic", "seed": s}, "maps": [[[[s]]]],
             "rows": [{"table": "accuracy", "length": L, "accuracy": 1.0 if L == 20 else 0.5 + 0.04 * (s % 7)}
                      for L in cfg.test_lengths]} for s in range(10)]
    (rec, of, key, n), = PR.maps_to_show(recs, cfg)
    assert (rec["cell"]["seed"], of, key, n) == (6, 10, "maps", cfg.map_length)  # the best at n = 40
    kept = [r if r is rec else {k: v for k, v in r.items() if k != "maps"} for r in recs]
    assert PR.maps_to_show(kept, cfg) == [(rec, 10, "maps", cfg.map_length)]


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, "--preset", "smoke", "--anchors", "8", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "anchors" in p.stderr and "Traceback" not in p.stderr


def cells_of(argv, claims=False):
    """The cells main() would run for these flags (no training)."""
    args = cli.make_parser(P.SCRIPT).parse_args(argv + (["--experiment", "claims"] if claims else []))
    return H.sweep_cells(P.SCRIPT, cli.run_configs(args, P.SCRIPT), torch.device("cpu"))


def test_claims_experiment_reuses_the_standalone_commands_cells():
    """--experiment claims runs each CLAIMS_RUNS setting with its own config; its cells are exactly those
    of the standalone commands the README documents, so either reuses the other's results."""
    cells = cells_of([], claims=True)
    assert len(cells) == 10 * (1 + 1 + 2 + 2 + 1 + 1 + 2)  # scratchpad, interleaved, mnemonic x 2, constant, cyclic,
    # misaligned, none, add, add-mnemonic
    keys = {H.cell_key(c) for c in cells}
    L = ",".join(map(str, P.CLAIMS_TEST))
    standalone = [
        ["--formats", "scratchpad", "--positions", "plain", "--steps", "8000", "--test-lengths", L[:L.index(",80")]],
        ["--formats", "interleaved", "--pretrain-steps", "0", "--steps", "2000", "--test-lengths", L],
        ["--formats", "mnemonic,constant,cyclic", "--pos", "rope,none", "--pretrain-steps", "2000", "--steps", "3000",
         "--test-lengths", L],
        ["--formats", "misaligned", "--pretrain-steps", "2000", "--steps", "3000", "--test-lengths", L, "--anchors", "200"],
        ["--formats", "none", "--test-lengths", L],
        ["--formats", "add,add-mnemonic", "--pretrain-steps", "2000", "--steps", "6000"],
    ]
    found = set()
    for argv in standalone:
        found |= {H.cell_key(c) for c in cells_of(argv + ["--seeds", "10"])} & keys
    assert found == keys
    by = {(c["fmt"], c["pos"]): c["config"] for c in cells}
    assert by[("scratchpad", "rope")]["positions"] == "plain" and by[("mnemonic", "none")]["steps"] == 3000

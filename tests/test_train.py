"""Training: a tiny model learns, runs are deterministic, divergence is caught, the schedule."""
import contextlib
import functools
import math
import warnings

import numpy as np
import pytest
import torch

import common as C
import harness as H
import reporting as R
from toy_experiment import sample_batch


def make(seed, norm="none"):
    torch.manual_seed(seed)
    return C.GPT(C.GPTConfig(vocab_size=16, n_layer=1, n_head=2, n_embd=32, attn_out_norm=norm))


def fit(seed, steps=150, data_seed=None, norm="none"):
    model = make(seed, norm)
    cfg = C.TrainConfig(steps=steps, batch_size=32, lr=3e-3, warmup=10)
    out = C.train(model, lambda rng, b: sample_batch(rng, b, 8), cfg, torch.device("cpu"),
                  data_seed=10_000 + seed if data_seed is None else data_seed, progress=False)
    return model, out


def test_tiny_model_learns_copy_last_token():
    model, out = fit(0)
    assert out["steps"] == 150
    rows = C.evaluate_by_length(model, sample_batch, [8, 16], 500, torch.device("cpu"))
    assert [r["length"] for r in rows] == [8, 16] and all(r["n"] == 500 for r in rows)
    assert rows[0]["accuracy"] >= 0.99, rows
    assert out["loss_curve"][-1][1] < out["loss_curve"][0][1] / 10


def test_same_seed_same_model_different_seed_different_model():
    (a, ra), (b, rb), (c, _) = fit(1, 40), fit(1, 40), fit(2, 40)
    assert ra["loss_curve"] == rb["loss_curve"]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    _, rd = fit(1, 40, data_seed=999)  # same init, other data: another run
    assert rd["loss_curve"] != ra["loss_curve"]


def test_divergence_is_detected_and_stops_the_run():
    model = make(0)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(C.Diverged) as e:
        C.train(model, functools.partial(sample_batch, length=8), C.TrainConfig(steps=50), torch.device("cpu"),
                data_seed=0, progress=False)
    assert e.value.result["steps"] == 1 and math.isnan(e.value.result["final_loss"])


def test_lr_schedule_warmup_then_cosine():
    cfg = C.TrainConfig(steps=1000, lr=1.0, warmup=100, min_lr_frac=0.1)
    assert math.isclose(C.lr_at(0, cfg), 0.01) and math.isclose(C.lr_at(99, cfg), 1.0)
    assert math.isclose(C.lr_at(100, cfg), 1.0) and math.isclose(C.lr_at(1000, cfg), 0.1)
    assert all(C.lr_at(s, cfg) >= C.lr_at(s + 1, cfg) for s in range(100, 999))


def test_eval_sets_depend_on_length_and_eval_seed_only():
    a = next(C.eval_batches(sample_batch, 12, 10))
    b = next(C.eval_batches(sample_batch, 12, 10))
    c = next(C.eval_batches(sample_batch, 12, 10, seed=1))
    assert torch.equal(a["idx"], b["idx"]) and not torch.equal(a["idx"], c["idx"])
    sizes = [len(x["idx"]) for x in C.eval_batches(sample_batch, 2**14, 10)]  # long: small batches
    assert sum(sizes) == 10 and max(sizes) == 4


def test_probe_pass_scores_like_the_plain_evaluation():
    model, _ = fit(3, 60)
    plain = C.evaluate_by_length(model, sample_batch, [8, 24], 200, torch.device("cpu"))
    rows, probes, kept = C.evaluate_with_probes(model, sample_batch, [8, 24], 200, torch.device("cpu"), keep=(24,))
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in plain]
    assert {(r["length"], r["layer"], r["where"]) for r in probes} == {(L, 0, w) for L in (8, 24) for w in ("pre", "post")}
    assert kept[24, 0, "pre"].shape == (200, 32) and set(kept) == {(24, 0, "pre"), (24, 0, "post")}


def test_paired_diff_ci_pairs_by_seed():
    rows = [{"variant": v, "seed": s, "length": 8, "acc": base + s * 0.1 + (0.05 if v == "ln" else 0)}
            for v, base in (("ln", 0.5), ("none", 0.5)) for s in range(3)]
    (r,) = R.paired_diff_ci(rows, "acc", "ln", "none")
    # the seed effect cancels in the paired difference: every seed gains exactly 0.05, so the CI is a point
    assert abs(r["diff"] - 0.05) < 1e-12 and abs(r["hi"] - r["lo"]) < 1e-9 and r["n"] == 3
    rows[0]["acc"] += 0.3  # one seed differs: the interval widens (t with 2 degrees of freedom)
    (r,) = R.paired_diff_ci(rows, "acc", "ln", "none")
    assert r["lo"] < r["diff"] < r["hi"] and abs((r["hi"] - r["diff"]) - 4.303 * 0.1) < 1e-9  # sd 0.1732 / sqrt 3 = 0.1


def test_test_sets_are_cached_under_an_explicit_key_only():
    named = functools.partial(sample_batch, vocab=12)
    first = list(C.eval_batches(named, 9, 700, key=("toy", 12)))
    again = list(C.eval_batches(functools.partial(sample_batch, vocab=12), 9, 700, key=("toy", 12)))
    assert all(a is b for a, b in zip(first, again)) and len(first) == len(again) == 2
    fresh = list(C.eval_batches(named, 9, 700))  # no key: drawn again, the same examples
    assert fresh[0] is not first[0] and torch.equal(fresh[0]["idx"], first[0]["idx"])
    other = next(C.eval_batches(functools.partial(sample_batch, vocab=13), 9, 700, key=("toy", 13)))
    assert not torch.equal(other["idx"], first[0]["idx"])  # another key: another test set


def test_fp32_by_default_and_precision_from_the_config():
    cfg = C.TrainConfig()
    assert cfg.dtype == "fp32" and not cfg.tf32 and not cfg.compile
    assert isinstance(C.autocast(torch.device("cpu"), cfg.dtype), contextlib.nullcontext)
    assert isinstance(C.autocast(torch.device("cpu"), "bf16"), torch.autocast)  # CPU autocast (tests only)
    with warnings.catch_warnings():  # without CUDA torch warns that it disables autocast
        warnings.simplefilter("ignore")
        assert isinstance(C.autocast(torch.device("cuda"), "bf16"), torch.autocast)
    cell = H.make_cells(cfg, {"seed": "seeds"}, torch.device("cpu"))[0]
    assert cell["config"]["dtype"] == "fp32" and "seeds" not in cell["config"]  # precision is part of the cell


def labels_on_log_axis(lo, hi):
    """The non-empty y tick labels save_figure's formatting gives a log axis spanning lo .. hi."""
    plt = R.pyplot()
    fig, ax = plt.subplots()
    ax.set_yscale("log")
    ax.plot([0, 1], [lo, hi])
    ax.set_ylim(lo, hi)
    R.plain_log_labels(ax)
    fig.canvas.draw()
    ticks = ax.yaxis.get_major_ticks() + ax.yaxis.get_minor_ticks()
    labels = sorted({float(t.label1.get_text()) for t in ticks
                     if t.label1.get_text() and lo <= t.get_loc() <= hi})
    plt.close(fig)
    return labels


def test_log_axes_get_plain_labels_and_enough_of_them():
    assert labels_on_log_axis(0.1, 1000) == [0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 300, 500, 1000]
    assert labels_on_log_axis(0.75, 1.3) == [0.8, 0.9, 1]  # too narrow for 1-2-3-5 labels: every tick


def test_a_two_line_suptitle_stays_above_the_panel_titles(tmp_path):
    import matplotlib.text
    plt = R.pyplot()
    fig, axes = plt.subplots(7, 4, figsize=(12.4, 21))  # the shape of parity's attention.png
    for ax in axes.flat:
        ax.set_title("a panel title")
    gs = axes[-1, 0].get_gridspec()
    for ax in axes[-1]:
        ax.remove()
    fig.add_subplot(gs[-1, :])  # a panel across the bottom row, as parity's attention.png has
    fig.suptitle("a figure title\non two lines", fontsize=10)
    R.save_figure(fig, tmp_path / "f.png")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    renderer = FigureCanvasAgg(fig).get_renderer()  # save_figure closed the figure's own canvas
    top, = [t for t in fig.findobj(matplotlib.text.Text) if t.get_text() == "a figure title\non two lines"]
    assert all(top.get_window_extent(renderer).y0 >= ax.title.get_window_extent(renderer).y1 for ax in axes[0])

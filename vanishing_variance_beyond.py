"""vanishing_variance_beyond.py: beyond Li et al. 2025, what limits length generalization on these tasks.

Is the failure at long N one of *scale* (each head's output shrinks: the paper's account) or of
*selection* (the query's attention spreads over more items)? Four experiments on the models of
vanishing_variance.py, each a named run of its sweep (the same cells, flags and files):

  --experiment fixes       the fix ladder, retrained per seed: none, layernorm (the paper), headnorm and
                           gate on the attention output, ssmax and logn on the logits (their formulas and
                           sources: vanishing_variance_fixes.py); each head's output std at the query;
                           and the test-time edits of the none models: restore the heads' output scale
                           (scale), sharpen the query's logits by log N / log N_train (select), or both
  --experiment gap         argmax-gap against argmax: with a margin between the top two priorities that
                           does not shrink with N, is the argmax failure one of selection?
  --experiment ntrain      lookup trained at N_train = 16, 64, 256: does the loss at a fixed ratio
                           N / N_train shrink as N_train grows, and does select still recover it?
  --experiment ntrain-mix  the same, trained on every N up to N_train (--train-mix)
  --experiment ntrain-log  the same, N drawn log-uniformly (--mix-scale log): more short batches

Usage: python vanishing_variance_beyond.py --experiment fixes (run times and results:
docs/vanishing_variance.md). Read vanishing_variance.py and its report first: this file adds the runs,
their claims, tables and figures.
"""
import functools
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

import faults
import harness as H
import reporting as R
import vanishing_variance as VV
import vanishing_variance_report as VVR
from vanishing_variance_fixes import EDITS
from vanishing_variance_report import COLORS, HOLDS, compare, holds_text, ordered, style, verdict

EDIT_CLAIMS = {
    "scale": "restoring each head's output std at test time recovers accuracy (scale is the cause)",
    "select": "sharpening the query's logits by log N / log N_train at test time recovers accuracy "
              "(dispersion is the cause)",
    "both": "sharpening, then restoring the scale, recovers accuracy",
}

LADDER = ("none", "layernorm", "headnorm", "gate", "ssmax", "logn")  # --experiment fixes


NTRAIN = (16, 64, 256)  # --experiment ntrain: lookup trained at these N


RATIOS = (2, 8)  # N / N_train at which every N_train is compared
HOLD_RATIO, HOLD_LOSS = 8, 0.01  # "8x holds": accuracy at 8 N_train within 0.01 of that at N_train


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


def edit_table(acc, edits):
    """The edit rows plus the unedited `none` rows as edit = 'no edit', for the same seeds: one table
    in which every edit is paired with its own model unedited."""
    seeds = {(r["task"], r["seed"]) for r in edits}
    plain = [{**r, "edit": "no edit"} for r in R.select(acc, variant="none") if (r["task"], r["seed"]) in seeds]
    return plain + edits


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
        variants = ordered(r["variant"] for r in t_acc)
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
        ylabels = ("accuracy", "− none (accuracy)", "attention mass", "std ratio")
        for i, ax in enumerate(axes[:, j]):
            ax.set_xticks(range(len(variants)), variants)
            ax.set_ylabel(ylabels[i])
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
        R.paired_panel(axes[1, j], rows, "edit", "no edit", list(EDITS), COLORS, cfg.train_len,
                       f"{task}: edited − unedited, per seed (dots), 95% CI")
        R.plot_vs_length(rows, "target_mass", None, cfg.train_len, group="edit", ax=axes[2, j], style=style,
                         title=f"{task}: attention mass on the answering item")
    R.save_figure(fig, out / "edits.png")


def say_ladder(acc, probe, ratios, verdicts, cfg, say):
    """The ladder as a markdown table, per task and variant: accuracy at N_train and at the longest N
    (mean ± std, median), the paired difference to none with its 95% CI, the seeds where it beats
    none, and at the longest N: exp(H) of the query in layer 0, its mass on the answering item and the
    per-head output std ratio (layer 0)."""
    top, lo = max(cfg.test_lengths), cfg.train_len
    by = {(c["task"], c["variant"], c["edit"]): c for c in verdicts}
    heads = bool(ratios)  # per-head stds: measured with --heads only; no empty column without them
    say(f"\n| task | variant | accuracy at N = {lo} | accuracy at N = {top} (median) | − none, paired [95% CI] | "
        f"seeds better than none [95% CI] | exp(H), layer 0 | mass on the answer |" +
        (f" head std ratio {top}/{lo} |" if heads else ""))
    say("|---|---|---|---|---|---|---|---|" + ("---|" if heads else ""))
    for task in ordered(r["task"] for r in acc):
        for v in ordered(r["variant"] for r in R.select(acc, task=task)):
            a_lo = R.seed_stats(list(R.per_seed(acc, "accuracy", task=task, variant=v, length=lo).values()))
            a = R.seed_stats(list(R.per_seed(acc, "accuracy", task=task, variant=v, length=top).values()))
            h = R.seed_stats(list(R.per_seed(probe, "eff_n", task=task, variant=v, length=top, layer=0,
                                             where="pre").values()))
            m = R.seed_stats(list(R.per_seed(acc, "target_mass", task=task, variant=v, length=top).values()))
            r = R.seed_stats(ratios.get((task, v, 0), []))
            ratio = (f" {r['mean']:.2f} |" if r["n"] else " - |") if heads else ""
            c = by.get((task, v, None))
            diff = R.diff_text(c, 3) if c else ""
            wins = R.count_text(c["wins"], c["n"], c["wins_ci"]) if c else ""
            say(f"| {task} | {v} | {a_lo['mean']:.3f} | {a['mean']:.3f} ± {a['std']:.3f} ({a['median']:.3f}) | {diff} | "
                f"{wins} | {h['mean']:.1f} | {m['mean']:.2f} |{ratio}")


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
    for task in ordered(r["task"] for r in acc):
        rows = [r for r in edit_table(R.select(acc, task=task), R.select(edits, task=task)) if r["length"] == top]
        for e in [e for e in ("no edit",) + EDITS if R.select(rows, edit=e)]:
            stat = functools.partial(edit_stats, R.select(rows, edit=e))
            a, c = stat("accuracy"), by.get((task, "none", e))
            diff = R.diff_text(c, 3) if c else ""
            wins = R.count_text(c["wins"], c["n"], c["wins_ci"]) if c else ""
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


def say_gap_vs_argmax(acc, cfg, say):
    """--experiment gap: argmax-gap − argmax for the none models at every N, matched by seed (the same
    initialization; the test sets differ, so a 95% t-interval over the per-seed differences), and the
    seeds of each task that hold (accuracy >= HOLDS) at the longest N, with a Wilson interval."""
    none = R.select(acc, variant="none")
    if not (R.select(none, task="argmax") and R.select(none, task="argmax-gap")):
        return
    d = R.paired_diff_ci(none, "accuracy", "argmax-gap", "argmax", by="task")
    say("\nargmax-gap − argmax, none models, matched by seed (95% CI): " +
        ", ".join(f"N={r['length']}: {R.diff_text(r, 3)}" for r in d))
    top = max(cfg.test_lengths)
    for task in ("argmax", "argmax-gap"):
        for v in ordered(r["variant"] for r in R.select(acc, task=task)):
            a = list(R.per_seed(acc, "accuracy", task=task, variant=v, length=top).values())
            say(f"  {task:<10} {v:<6} seeds with accuracy >= {HOLDS} at N = {top}: {holds_text(a)}")


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
    trained = "on every N up to N_train" if VV.Config(**records[0]["cell"]["config"]).train_mix else "at N_train only"
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
    models, its difference to the smallest N_train's (different models: a Welch interval), select −
    unedited, paired by seed on identical test sets, and that difference over the mean loss (where the
    loss is at least 0.01)."""
    plain, ns = R.select(rows, edit="no edit"), sorted({r["n_train"] for r in rows})
    say("\n| N_train | accuracy at N = N_train (median) | seeds that learned it (>= "
        f"{HOLDS}) [95% CI] |\n|---|---|---|")
    for n in ns:
        a = list(R.per_seed(plain, "accuracy", n_train=n, length=n).values())
        say(f"| {n} | {R.stat_text(R.seed_stats(a))} | {holds_text(a)} |")
    say(f"\n| N / N_train | N_train | N | none (median) | loss from N_train | loss − N_train = {ns[0]}'s [95% CI] | "
        "select (median) | select − none, paired [95% CI] | seeds select helps | share of the loss select wins back |")
    say("|---|---|---|---|---|---|---|---|---|---|")
    for ratio in ntrain_ratios(plain):
        losses = {n: ntrain_losses(plain, n, ratio) for n in ns}
        for n in [n for n in ns if losses[n]]:
            t = R.select(rows, n_train=n, ratio=ratio)
            none = R.seed_stats(list(R.per_seed(t, "accuracy", edit="no edit").values()))
            w = R.welch_ci(losses[n], losses[ns[0]]) if n != ns[0] and losses[ns[0]] else None
            d = R.paired_diff_ci(t, "accuracy", "select", "no edit", by="edit")  # empty when run with --edits false
            c = compare(t, "accuracy", "select", "no edit", ratio * n, "edit", d) if d else None
            back = f"{d[0]['diff'] / np.mean(losses[n]):.0%}" if c and np.mean(losses[n]) >= 0.01 else ""
            said = f"{R.stat_text(c['a'])} | {R.diff_text(d[0], 3)} | {c['wins']}/{c['n']} | {back}" if c else " |  |  | "
            say(f"| {ratio}x | {n} | {ratio * n} | {R.stat_text(none)} | {R.mean_std_text(losses[n])} | "
                f"{R.diff_text(w, 3) if w else ''} | {said} |")
    eight = {n: ntrain_losses(plain, n, HOLD_RATIO) for n in ns}
    held = [n for n in ns if eight[n] and round(np.mean(eight[n]), 3) <= HOLD_LOSS]  # decided as printed
    say(f"\nloss at {HOLD_RATIO}x N_train (accuracy at N_train minus at {HOLD_RATIO} N_train, mean over seeds): " +
        ", ".join(f"N_train = {n}: {np.mean(v):.3f} ({len(v)} seeds)" for n, v in eight.items() if v) +
        f"; {HOLD_RATIO}x holds (loss <= {HOLD_LOSS}) at N_train = {', '.join(map(str, held)) or 'none'}" +
        (f", not at {', '.join(str(n) for n in ns if n not in held and eight[n])}" if len(held) < len(ns) else ""))


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


def edit_claims(t_acc, t_edits, task, cfg):
    """One task's test-time edits as data, each against the same none model unedited (as variant_claims)."""
    t_edit, top = edit_table(t_acc, t_edits), max(cfg.test_lengths)
    out = []
    for e in [e for e in EDITS if R.select(t_edit, edit=e)]:
        d = R.paired_diff_ci(t_edit, "accuracy", e, "no edit", by="edit")
        out.append({"claim": EDIT_CLAIMS[e], "task": task, "variant": "none", "edit": e,
                    "what": f"none + {e} (test time)", "baseline": "the same none model, unedited",
                    "setting": f"none trained at N = {cfg.train_len}, edited at N = {top}",
                    **compare(t_edit, "accuracy", e, "no edit", top, "edit", d), "loss": VVR.none_loss(t_acc, cfg),
                    "verdict": verdict(d, cfg.train_len)})
    return out


def claims(acc, edits, cfg):
    """Per task: every variant against none, then every edit against the model unedited."""
    out = []
    for task in ordered(r["task"] for r in acc):
        t_acc = R.select(acc, task=task)
        out += VVR.variant_claims(t_acc, task, cfg) + edit_claims(t_acc, R.select(edits, task=task), task, cfg)
    return out


def report(records, cfg, out):
    """The paper's figures and tables (vanishing_variance_report), then the ladder, the edits, the shares of
    the loss won back and argmax-gap; --experiment ntrain(-mix) (several N_train) has its own report."""
    out, say = Path(out), R.Summary()
    if len({rec["cell"]["config"]["train_len"] for rec in records}) > 1:
        report_ntrain(records, out, say)
        return say.write(out)
    rows = [r for rec in records for r in rec["rows"]]
    acc, probe = R.select(rows, table="accuracy"), R.select(rows, table="probe")
    heads, edits = R.select(rows, table="head_std"), R.select(rows, table="edit")
    tasks = ordered(r["task"] for r in acc)
    if not R.training_report(records, out, say):  # every cell diverged: nothing else to draw
        return say.write(out)
    th, slopes = VVR.paper_figures(records, acc, probe, tasks, cfg, out)
    ratios = std_ratios(heads, cfg)  # per-head output std(N_max) / std(N_train), per seed
    fig_ladder(acc, ratios, tasks, cfg, out)
    if edits:
        fig_edits(acc, edits, tasks, cfg, out)
    verdicts = claims(acc, edits, cfg)
    faults.atomic_write(out / "claims.json", json.dumps(verdicts, indent=1))
    VVR.say_verdicts(records, verdicts, say)
    VVR.say_details(records, acc, ratios, slopes, th, cfg, say)
    VVR.say_headline(acc, probe, say)
    VVR.say_predictors(acc, probe, cfg, say)
    VVR.say_claims(verdicts, say)
    say_ladder(acc, probe, ratios, verdicts, cfg, say)
    if edits:
        say_edits(acc, probe, edits, verdicts, cfg, say)
    say_recovered(verdicts, cfg, say)
    say_gap_vs_argmax(acc, cfg, say)
    say.write(out)


SCRIPT = replace(VV.SCRIPT, description=__doc__.splitlines()[0], report=report, experiments={
    "fixes": [dict(variants=LADDER, seeds=10, heads=True, edits=True)],  # the fix ladder and the edits
    "gap": [dict(tasks=("argmax", "argmax-gap"), variants=("none", "ssmax"), seeds=10, edits=True)],
    "ntrain": [ntrain_run(n) for n in NTRAIN],
    "ntrain-mix": [ntrain_mix_run(n) for n in reversed(NTRAIN)],  # the longest cells first
    "ntrain-log": [{**ntrain_mix_run(n), "mix_scale": "log"} for n in reversed(NTRAIN)]})

if __name__ == "__main__":
    H.main(SCRIPT)

"""vanishing_variance_report.py: the report of vanishing_variance.py (Li et al. 2025), drawn from the cell
records alone, so `--plot-only` redraws it.

  theory       the closed form sigma^2 / N and a simulation of softmax attention with a fixed query
  claims       the paper's claims as data (claim, task, setting, comparison at the longest N, verdict)
  figures      accuracy.png, variance.png (the paper's Fig. 1), shift.png (Fig. 3), distributions.png
               (Fig. 2), why.png (the query's attention): one fig_* function each
  the summary  say_* functions print tables; report() calls them in order

Every comparison is paired by seed on identical test sets (reporting.paired_diff_ci). The work beyond
the paper (fix ladder, test-time edits, argmax-gap, N_train) reports in vanishing_variance_beyond.py.
"""
import json
import math
from pathlib import Path

import numpy as np

import faults
import reporting as R


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




CLAIMS = {  # what each variant is claimed (or hoped) to do; the paper's own claim is layernorm's
    "layernorm": "LayerNorm after attention gives significantly better length generalization (Li et al. 2025)",
    "standardize": "the same norm without affine parameters helps too (Li et al. 2025)",
    "headnorm": "per-head output normalization before W_O helps (AVNorm, 2025)",
    "gate": "a per-head sigmoid gate on the attention output helps (Qiu et al. 2025)",
    "ssmax": "Scalable-Softmax, logits times s_h log n, helps (Nakanishi 2025)",
    "logn": "log-n scaling of the logits at inference only helps (long-context LLMs)",
}


COLORS = {"none": "C0", "layernorm": "C1", "standardize": "C2", "headnorm": "C3", "gate": "C4",  # the same
          "ssmax": "C5", "logn": "C6",                                                           # in every figure
          "no edit": "C0", "scale": "C7", "select": "C8", "both": "C9"}


TASK_ORDER = ("argmax", "lookup", "argmax-gap")  # the order of tables and panels
VARIANT_ORDER = ("none", "layernorm", "standardize", "headnorm", "gate", "ssmax", "logn")
NORMS_AFTER_WO = ("layernorm", "standardize")  # the variants whose output is probed before and after them


def ordered(names):
    """Tasks or variants in display order, each once."""
    return sorted(set(names), key=(TASK_ORDER + VARIANT_ORDER).index)


def style(group):
    """Plot style of a variant or an edit, or of (variant, where): its colour; dashed after the norm."""
    variant, where = group if isinstance(group, tuple) else (group, "pre")
    label = variant
    if isinstance(group, tuple) and variant in NORMS_AFTER_WO:
        label = f"{variant}, {'before' if where == 'pre' else 'after'} the norm"
    return {"color": COLORS.get(variant), "ls": "--" if where == "post" else "-", "label": label,
            **EDIT_LINES.get(variant, {})}


# Edits that change little lie on the unedited curve: "no edit" is drawn wide beneath, "scale" dashed on top.
EDIT_LINES = {"no edit": {"lw": 4, "alpha": 0.5, "zorder": 1}, "scale": {"ls": "--", "zorder": 3},
              "both": {"ls": ":", "zorder": 3}}


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
    (or worse) where the interval excludes 0 and the difference is at least MATTERS, both as printed (3
    decimals: +0.020 [+0.003, +0.037] is better, though the float behind +0.020 may be 0.01999...)."""
    ood = [{**r, **{k: round(r[k], 3) for k in ("diff", "lo", "hi")}}  # decided on the values as printed
           for r in d_rows if r["length"] > train_len]
    better = [r["length"] for r in ood if r["lo"] > 0 and r["diff"] >= MATTERS]
    worse = [r["length"] for r in ood if r["hi"] < 0 and r["diff"] <= -MATTERS]
    if ood and len(better) == len(ood):
        return "yes, at every N > training"
    if better and not worse and better == [r["length"] for r in ood][-len(better):]:
        return f"yes, at every N >= {better[0]}"
    if better:
        return f"only at N = {better}" + (f"; worse at N = {worse}" if worse else "")
    return f"no (worse at N = {worse})" if worse else "no (no significant difference)"


def none_loss(t_acc, cfg):
    """What `none` loses beyond training on one task: its mean accuracy at N_train minus at the longest N."""
    top = max(cfg.test_lengths)
    if not R.select(t_acc, variant="none"):
        return float("nan")
    mean = {n: R.seed_stats(list(R.per_seed(t_acc, "accuracy", variant="none", length=n).values()))["mean"]
            for n in (cfg.train_len, top)}
    return mean[cfg.train_len] - mean[top]


def variant_claims(t_acc, task, cfg):
    """One task's verdicts as data: per variant against none, claim, task, what, setting, the comparison
    at the longest N (compare()), none's loss and the verdict over all N."""
    out, top = [], max(cfg.test_lengths)
    for v in [v for v in ordered(r["variant"] for r in t_acc) if v != "none"]:
        d = R.paired_diff_ci(t_acc, "accuracy", v, "none")
        out.append({"claim": CLAIMS[v], "task": task, "variant": v, "edit": None, "what": v, "baseline": "none",
                    "setting": f"trained at N = {cfg.train_len}, tested at N = {top}",
                    **compare(t_acc, "accuracy", v, "none", top, "variant", d), "loss": none_loss(t_acc, cfg),
                    "verdict": verdict(d, cfg.train_len)})
    return out


def claims(acc, cfg):
    """The verdicts as data, task by task: the printed summary and the documents' tables come from these."""
    return [c for task in ordered(r["task"] for r in acc) for c in variant_claims(R.select(acc, task=task), task, cfg)]


def fig_accuracy(acc, tasks, cfg, out):
    """accuracy.png: accuracy vs N per variant (mean ± std), and the paired difference to none per
    seed (dots) with its 95% CI."""
    plt = R.pyplot()
    fig, axes = plt.subplots(2, len(tasks), figsize=(7.5 * len(tasks), 8), squeeze=False)
    for j, task in enumerate(tasks):
        R.plot_vs_length(R.select(acc, task=task), "accuracy", None, cfg.train_len, chance=1 / cfg.n_classes,
                         ax=axes[0, j], title=f"{task}: accuracy (mean ± std over seeds)", style=style)
        R.paired_panel(axes[1, j], R.select(acc, task=task), "variant", "none", [v for v in VARIANT_ORDER if v != "none"],
                       COLORS, cfg.train_len, f"{task}: paired difference to none, per seed (dots), 95% CI")
    R.save_figure(fig, out / "accuracy.png")


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


def say_claims(rows, say):
    """The claims as a markdown table (as docs/vanishing_variance.md quotes it)."""
    say("\n| task | variant or edit | claim | accuracy at the longest N: it / baseline (mean ± std, median) "
        "| paired difference [95% CI] | seeds where it beats the baseline [95% CI] | verdict over N |")
    say("|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["a"], r["b"]
        say(f"| {r['task']} | {r['what']} | {r['claim']} | {a['mean']:.3f} ± {a['std']:.3f} ({a['median']:.3f}) / "
            f"{b['mean']:.3f} ± {b['std']:.3f} ({b['median']:.3f}) | {R.diff_text(r, 3)} | "
            f"{R.count_text(r['wins'], r['n'], r['wins_ci'])} | {r['verdict']} |")


HOLDS = 0.95  # a model "holds" at N when its accuracy there is at least this


def holds_text(accuracies):
    """'k/n [lo, hi]': the seeds whose accuracy is at least HOLDS, with a 95% Wilson interval."""
    return R.holding_text(R.seeds_holding(accuracies, HOLDS))


def say_headline(acc, probe, say):
    """The headline numbers: at the training N and the longest N, per task and variant,
    accuracy (mean ± std over seeds), exp(H) of the query's layer-0 attention, and its attention mass
    on the item that holds the answer (mean over seeds)."""
    lengths = sorted({r["length"] for r in acc})
    lo, hi = lengths[0], lengths[-1]
    say(f"\nheadline, N = {lo} -> N = {hi} (mean over seeds): accuracy (± std), exp(H) in layer 0 = the number of "
        "tokens the query attends to, attention mass on the answering item")
    for task in ordered(r["task"] for r in acc):
        for v in ordered(r["variant"] for r in acc):
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


def predictors(acc, probe, cfg, variants=None):
    """Which measurement tracks accuracy beyond the training length? Pearson r, per task, over every
    (cell, N > N_train) point of the given variants, between accuracy and: the attention mass on the
    answering item, log exp(H) in layer 0, and the layer-0 attention-output std relative to the same
    cell's at N_train (the paper's quantity, before any norm). Returns {task: {name: (r, points)}}."""
    out = {}
    acc = [r for r in acc if variants is None or r["variant"] in variants]
    for task in ordered(r["task"] for r in acc):
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
    for task in ordered(r["task"] for r in acc):
        recs = [{**rec, "rows": R.select(rec["rows"], table="accuracy")} for rec in records
                if rec["cell"].get("task") == task]
        if not R.select(acc, task=task):
            continue
        say(f"\n--- {task} ---")
        table = R.summarize(recs, "accuracy", cfg.train_len, say=say)
        for v in [v for v in VARIANT_ORDER if v != "none" and v in table]:
            d = R.paired_diff_ci(R.select(acc, task=task), "accuracy", v, "none")
            say(f"  {v} − none, paired over seeds (95% CI): " +
                ", ".join(f"N={r['length']}: {R.diff_text(r, 3)}" for r in d))
    firsts = {}
    for rec in records:
        firsts.setdefault(rec["cell"].get("task"), rec)
    for rec in firsts.values():
        for m in rec.get("mistakes", []):
            say(f"mistake ({rec['cell'].get('task')}/{rec['cell'].get('variant')}/seed {rec['cell'].get('seed')}): {m}")


def paper_figures(records, acc, probe, tasks, cfg, out):
    """accuracy, variance, shift, distributions and why.png; returns the theory curves and the slopes."""
    th = theory(sorted({r["length"] for r in acc}) or list(cfg.test_lengths))
    fig_accuracy(acc, tasks, cfg, out)
    slopes = fig_variance(probe, tasks, cfg, out, th)
    fig_shift(probe, tasks, cfg, out)
    fig_distributions(records, tasks, out)
    fig_why(acc, probe, tasks, cfg, out)
    return th, slopes


def say_verdicts(records, verdicts, say):
    say(f"\n=== vanishing_variance: {sum(r['status'] == 'ok' for r in records)} runs ok, "
        f"{sum(r['status'] == 'diverged' for r in records)} diverged ===")
    say(f"\npaper's claim: {CLAIMS['layernorm']}")
    say(f"(better or worse at N: the paired 95% interval excludes 0 and the difference is at least {MATTERS})")
    say(f"{'task':<8} {'variant or edit':<28} reproduced?")
    for r in verdicts:
        say(f"{r['task']:<{max(8, len(r['task']) + 1)}} {r['what']:<28} {r['verdict']}")
    R.few_seeds_note(records, "docs/vanishing_variance.md (layernorm helps on lookup, modestly; on argmax "
                              "no significant gain)", say)


def say_predictors(acc, probe, cfg, say):
    say(f"\nwhat tracks accuracy beyond N = {cfg.train_len}: Pearson r over every (cell, N) point")
    for models, variants in (("none models", ("none",)), ("all models", None)):
        for task, rs in predictors(acc, probe, cfg, variants).items():
            say(f"  {task:<7} {models:<12} " + ", ".join(f"{name}: r = {r:+.2f}" for name, (r, n) in rs.items()) +
                f" ({next(iter(rs.values()))[1]} points)")


def report(records, cfg, out):
    """Figures, claims.json and the printed summary of the paper's claims, from the cell records alone."""
    out = Path(out)
    rows = [r for rec in records for r in rec["rows"]]
    acc, probe = R.select(rows, table="accuracy"), R.select(rows, table="probe")
    say = R.Summary()
    if not R.training_report(records, out, say):  # every cell diverged: nothing else to draw
        return say.write(out)
    th, slopes = paper_figures(records, acc, probe, ordered(r["task"] for r in acc), cfg, out)
    verdicts = claims(acc, cfg)
    faults.atomic_write(out / "claims.json", json.dumps(verdicts, indent=1))
    say_verdicts(records, verdicts, say)
    say_details(records, acc, {}, slopes, th, cfg, say)
    say_headline(acc, probe, say)
    say_predictors(acc, probe, cfg, say)
    say_claims(verdicts, say)
    say.write(out)

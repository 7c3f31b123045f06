"""reporting.py: statistics over seeds, tables and the figure helpers the three scripts share.

  statistics  select(), per_seed(), seed_stats(), t_half_width(), paired_diff_ci(), welch_ci(), wilson_ci(),
              spearman_ci() (a bootstrap over seeds), mean_std_by(), summarize()
  tables      markdown_table(): the one writer of every claims table; Summary: the printed summary
  figures     plot_vs_length() (mean ± std band per group, clipped to [0, 1] for accuracies, training
              length marked), seed_dots() (a dot per seed, mean ± 95% CI), band(), Palette,
              training_report(), fig_attention_std() (the attention-output std by length)

Every verdict in the documents is computed here from tidy rows; nothing here trains or reads files.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

# =============================================================================================
# Statistics
# =============================================================================================


def select(rows, **eq):
    return [r for r in rows if all(r.get(k) == v for k, v in eq.items())]


def per_seed(rows, metric, **eq):
    """{seed: metric} of the rows matching eq (one row per seed expected)."""
    return {r["seed"]: r[metric] for r in select(rows, **eq) if metric in r}


def seed_stats(values):
    """{mean, std, median, n} of one number per seed."""
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v)), "n": len(v)} if len(v) \
        else {"mean": float("nan"), "std": float("nan"), "median": float("nan"), "n": 0}


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}  # Student t, two-sided 95%


def t_half_width(values):
    """Half-width of the 95% t-interval of the mean of `values` (nan with fewer than two)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float("nan")
    return T975[max(k for k in T975 if k <= len(v) - 1)] * v.std(ddof=1) / math.sqrt(len(v))


def paired_diff_ci(rows, metric, a, b, by="variant", x="length"):
    """Per x: mean over seeds of metric(a) - metric(b), paired by seed on identical test sets, with a
    95% t-interval over seeds. Returns [{x, diff, lo, hi, n}] (lo = hi = nan with one seed)."""
    val = {(r[by], r["seed"], r[x]): r[metric] for r in rows if metric in r}
    out = []
    for xv in sorted({k[2] for k in val}):
        d = np.array([val[a, s, xv] - val[b, s, xv] for (v, s, xx) in val if v == a and xx == xv and (b, s, xv) in val])
        if len(d) == 0:
            continue
        half = t_half_width(d)
        out.append({x: xv, "diff": float(d.mean()), "lo": float(d.mean() - half), "hi": float(d.mean() + half),
                    "n": len(d)})
    return out


def welch_ci(a, b):
    """mean(a) − mean(b) for two independent groups of seeds (different models: nothing to pair), with a
    95% Welch t-interval (degrees of freedom by Welch–Satterthwaite, rounded down). {diff, lo, hi}."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return {"diff": d, "lo": float("nan"), "hi": float("nan")}
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se > 0 else len(a) + len(b) - 2
    half = T975[max(k for k in T975 if k <= max(1, math.floor(df)))] * se
    return {"diff": d, "lo": d - half, "hi": d + half}


def diff_text(d, places=2):
    """A paired_diff_ci() row as printed: '+0.65 [+0.35, +0.94]'."""
    return f"{d['diff']:+.{places}f} [{d['lo']:+.{places}f}, {d['hi']:+.{places}f}]"


def seeds_holding(values, threshold):
    """{k, n, ci}: the seeds whose value is at least threshold, of n, with the 95% Wilson interval."""
    v = list(values)
    k = sum(x >= threshold for x in v)
    return {"k": k, "n": len(v), "ci": list(wilson_ci(k, len(v)))}


def few_seeds_note(records, doc, say, enough=10):
    """Under a verdict of fewer than `enough` seeds: what it rests on and the document to read it against
    (training is chaotic: a few seeds, on another machine above all, can say otherwise)."""
    seeds = len({rec["cell"].get("seed") for rec in records})
    if seeds < enough:
        say(f"note: these verdicts rest on {seeds} seed(s); read them against {doc}, whose verdicts rest on "
            f"{enough} or more seeds a setting. With few seeds, on another machine above all, a verdict can differ.")


def count_text(k, n, ci):
    """'k/n [lo, hi]': a count of seeds with its 95% interval."""
    return f"{k}/{n} [{ci[0]:.2f}, {ci[1]:.2f}]"


def holding_text(h):
    """A seeds_holding() record as printed: 'k/n [lo, hi]'."""
    return count_text(h["k"], h["n"], h["ci"])


def wilson_ci(k, n, z=1.96):
    """95% Wilson score interval (lo, hi) of a fraction k / n (sound at k = 0 or k = n, unlike k/n ± 2 se)."""
    if n == 0:
        return float("nan"), float("nan")
    p, z2 = k / n, z * z
    mid, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, mid - half), min(1.0, mid + half)


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
    """Spearman's rho of y against x over (seed, x, y) points, and a 95% bootstrap interval that
    resamples whole seeds (the independent unit). Returns (rho, lo, hi)."""
    seeds = sorted({s for s, _, _ in points})
    by = {s: [(x, y) for ss, x, y in points if ss == s] for s in seeds}
    rho = spearman([x for _, x, _ in points], [y for _, _, y in points])
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        pts = [p for s in rng.choice(seeds, len(seeds)) for p in by[s]]
        boots.append(spearman([x for x, _ in pts], [y for _, y in pts]))
    boots = np.array(boots)
    boots = boots[~np.isnan(boots)]
    lo, hi = (np.percentile(boots, [2.5, 97.5]) if len(boots) else (float("nan"),) * 2)
    return rho, float(lo), float(hi)


def group_key(group):
    """A row's group value: r[group], or a tuple of values when group is a tuple of keys."""
    def key(r):
        return tuple(r.get(g) for g in group) if isinstance(group, tuple) else r.get(group)
    return key


def mean_std_by(rows, x, y, group):
    """{group value: (xs, mean, std, n_seeds)} of y over seeds at each x; `group` is a key or a tuple."""
    gkey = group_key(group)
    acc = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get(y) is not None and not (isinstance(r[y], float) and math.isnan(r[y])):
            acc[gkey(r)][r[x]].append(float(r[y]))
    out = {}
    for g, byx in acc.items():
        xs = sorted(byx)
        out[g] = (np.array(xs), np.array([np.mean(byx[v]) for v in xs]),
                  np.array([np.std(byx[v]) for v in xs]), np.array([len(byx[v]) for v in xs]))
    return out


def stat_text(s):
    """A seed_stats() record as printed: 'mean ± std (median)'."""
    return f"{s['mean']:.2f} ± {s['std']:.2f} ({s['median']:.2f})"


def mean_std_text(v):
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "n/a"


def summarize(records, metric, train_len, group="variant", say=print):
    """Print (with `say`) per group: in-distribution (length <= train_len) and out-of-distribution
    mean ± std over seeds (each seed first averaged over its lengths), and how many seeds diverged.
    Returns the table."""
    table = {}
    runs = defaultdict(lambda: {"id": [], "ood": [], "diverged": 0})
    for rec in records:
        if not rec["rows"] and rec["status"] != "diverged":
            continue
        g = rec["cell"].get(group, rec["rows"][0].get(group) if rec["rows"] else None)
        if rec["status"] == "diverged":
            runs[g]["diverged"] += 1
            continue
        vals = [(r["length"], r[metric]) for r in rec["rows"] if metric in r]
        inside = [v for L, v in vals if L <= train_len]
        beyond = [v for L, v in vals if L > train_len]
        for part, sel in (("id", inside), ("ood", beyond)):
            if sel:
                runs[g][part].append(float(np.mean(sel)))
    say(f"\n{metric}: in distribution (ID: lengths <= {train_len}) and out of distribution (OOD: lengths > "
        f"{train_len}), each seed averaged over those lengths; mean ± std over seeds")
    w = max([16] + [len(str(g)) for g in runs])
    say(f"  {group:<{w}} {'ID':>15} {'OOD':>15}  seeds")
    for g, r in runs.items():
        table[g] = {"id_mean": float(np.mean(r["id"])) if r["id"] else None,
                    "id_std": float(np.std(r["id"])) if r["id"] else None,
                    "ood_mean": float(np.mean(r["ood"])) if r["ood"] else None,
                    "ood_std": float(np.std(r["ood"])) if r["ood"] else None,
                    "seeds": len(r["id"] or r["ood"]), "diverged": r["diverged"]}
        div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
        say(f"  {str(g):<{w}} {mean_std_text(r['id']):>15} {mean_std_text(r['ood']):>15}  "
            f"{len(r['id'] or r['ood'])}{div}")
    return table


# =============================================================================================
# Tables and the printed summary
# =============================================================================================

def markdown_table(say, header, rows):
    """Print a markdown table: header (column titles) and rows (lists of cells, already formatted)."""
    say("\n| " + " | ".join(header) + " |")
    say("|" + "---|" * len(header))
    for r in rows:
        say("| " + " | ".join(str(c) for c in r) + " |")


def say_by_length(rows, y, say, group="variant"):
    """A table of y, mean ± std over seeds, a line per group and a column per length; returns the lengths."""
    Ls = sorted({r["length"] for r in rows})
    w = max(len(str(r[group])) for r in rows)
    say(f"  {'':<{w}}" + "".join(f"{L:>12}" for L in Ls))
    for g, (xs, m, s, n) in sorted(mean_std_by(rows, "length", y, group).items()):
        at = dict(zip(xs, zip(m, s)))
        say(f"  {g:<{w}}" + "".join(f"{at[L][0]:>6.2f}±{at[L][1]:<5.2f}" if L in at else f"{'-':>12}" for L in Ls))
    return Ls


def say_examples(records, say, label, width):
    """A few decoded examples of each seed-0 cell (its 'examples'), each cut at width characters; label(rec)
    names the cell."""
    for rec in records:
        if rec["cell"].get("seed") == 0 and rec.get("examples"):
            say(f"\nexamples ({label(rec)}):")
            for e in rec["examples"][:4]:
                say(f"  {e if len(e) < width else e[:width] + ' ...'}")


class Summary:
    """The printed summary of a report: say(line) prints it and keeps it for summary.txt."""

    def __init__(self):
        self.lines = []

    def __call__(self, line=""):
        print(line)
        self.lines.append(line)

    def write(self, out):
        (Path(out) / "summary.txt").write_text("\n".join(self.lines) + "\n")
        print(f"\nfigures and summary.txt in {out}")


# =============================================================================================
# Figures
# =============================================================================================

def pyplot():
    """matplotlib.pyplot on the Agg backend (figures are only saved: no display needed). MPLBACKEND is
    overridden before the import, since matplotlib refuses to import with an unknown one."""
    os.environ["MPLBACKEND"] = "Agg"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """One shared legend, plain numbers on log axes, tight_layout, save as PNG and close."""
    shared_legend(fig)
    for ax in fig.axes:
        plain_log_labels(ax)
        if not ax.has_data() and not ax.get_legend():  # an unused panel of a grid: not drawn
            ax.set_axis_off()
    lines = fig.get_suptitle().count("\n") + 1 if fig.get_suptitle() else 0  # keep the panels below it
    fig.tight_layout(rect=(0, 0, 1, 1 - lines * 18 / (72 * fig.get_figheight())))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)


def plain_log_labels(ax):
    """0.3 and 2 rather than 3 x 10^-1 and 2 x 10^0 on a log-scaled axis. An axis that spans too little
    for three labels at 1, 2, 3 and 5 times a power of ten (0.75 ... 1.3) labels every minor tick."""
    from matplotlib.ticker import FuncFormatter
    for axis, scale, (lo, hi) in ((ax.xaxis, ax.get_xscale(), ax.get_xlim()), (ax.yaxis, ax.get_yscale(), ax.get_ylim())):
        if scale == "log":
            lo, hi = min(lo, hi), max(lo, hi)
            labelled = [t for t in axis.get_minorticklocs() if lo <= t <= hi and plain_minor(t)]
            labelled += [t for t in axis.get_majorticklocs() if lo <= t <= hi]
            axis.set_major_formatter(FuncFormatter(plain_number))
            axis.set_minor_formatter(FuncFormatter(plain_minor if len(labelled) >= 3 else plain_number))


def plain_number(x, pos=None):
    return f"{x:g}"


def plain_minor(x, pos=None):
    """A minor tick's label only at 2, 3 and 5 times a power of ten (the others would crowd)."""
    lead = x / 10 ** math.floor(math.log10(x) + 1e-9) if x > 0 else 0
    return f"{x:g}" if round(lead, 6) in (2, 3, 5) else ""


def shared_legend(fig):
    """The panels' legends merged into one to the right of the figure (each label once): a variant has
    one colour in every panel, so one key serves them all."""
    entries = {}
    for ax in fig.axes:
        if ax.get_legend() is not None:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                entries.setdefault(label, handle)
            ax.get_legend().remove()
    if entries:
        fig.legend(list(entries.values()), list(entries), fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5),
                   frameon=False)


def ticks_at(ax, xs):
    """Label a log-scaled x axis at the values themselves (e.g. the test lengths)."""
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()


def legend_outside(ax):
    """The legend to the right of the axes, where it cannot cover data."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)


class Palette:
    """One colour per group value (variant, format, ...), fixed for a whole report: pass it as the
    style of every plot, or read .colors, so that a variant keeps its colour in every figure."""

    def __init__(self, groups):
        names = sorted(set(groups), key=str)
        cmap = "tab10" if len(names) <= 10 else "tab20"
        self.colors = {g: pyplot().get_cmap(cmap)(i % 20) for i, g in enumerate(names)}

    def __call__(self, group):
        return {"color": self.colors.get(group)}


def seeds_text(n):
    return f"{n} seed" + ("" if n == 1 else "s")


def paired_panel(ax, rows, by, base, others, colors, train_len, title):
    """Accuracy of each of `others` minus `base` vs length, paired by seed: a line with its 95% CI band, and
    a dot per seed (colors: {variant: colour})."""
    for v in [v for v in others if select(rows, **{by: v})]:
        d = paired_diff_ci(rows, "accuracy", v, base, by=by)
        if not d:
            continue
        xs = [r["length"] for r in d]
        ax.plot(xs, [r["diff"] for r in d], marker="o", ms=3, label=f"{v} − {base} ({seeds_text(d[0]['n'])})",
                color=colors[v])
        ax.fill_between(xs, [r["lo"] for r in d], [r["hi"] for r in d], color=colors[v], alpha=0.15)
        b = {(r["seed"], r["length"]): r["accuracy"] for r in select(rows, **{by: base})}
        pts = [(r["length"], r["accuracy"] - b[r["seed"], r["length"]]) for r in select(rows, **{by: v})
               if (r["seed"], r["length"]) in b]
        ax.scatter([x * (1 + 0.04 * (others.index(v) - len(others) / 2)) for x, _ in pts], [y for _, y in pts],
                   s=6, color=colors[v], alpha=0.4, lw=0)
    ax.axhline(0, color="k", lw=0.8)
    ax.axvline(train_len, color="gray", ls="--", lw=1, label=f"max train length {train_len}")
    ax.set_xscale("log", base=2)
    ticks_at(ax, sorted({r["length"] for r in rows}))
    ax.set(xlabel="test length N", ylabel=f"accuracy difference to {base}", title=title)
    legend_outside(ax)
    ax.grid(alpha=0.3)


def band(ax, rows, x, y, group, colors, label=str):
    """A line per group with its mean ± std band over seeds (colors: {group: colour}; the legend follows
    the order of colors, then the groups it lacks by name)."""
    order = list(colors)

    def legend_order(item):
        g = item[0]
        return (order.index(g), "") if g in order else (len(order), str(g))
    for g, (xs, m, s, n) in sorted(mean_std_by(rows, x, y, group).items(), key=legend_order):
        line, = ax.plot(xs, m, marker="o", ms=3, label=f"{label(g)} ({seeds_text(n.min())})", color=colors.get(g))
        lo, hi = (np.clip(m - s, 0, 1), np.clip(m + s, 0, 1)) if y in FRACTIONS else (m - s, m + s)
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)


def dots(ax, rows, x, y, group, colors, spread=0.03, log=True):
    """A dot per row (one seed each) at (x, y), each group shifted a little sideways so that groups do not
    hide each other: by a factor 1 + spread * offset on a log x axis, by spread * offset on a linear one."""
    key = group_key(group)
    groups = sorted({key(r) for r in rows if y in r}, key=str)
    for i, g in enumerate(groups):
        pts = [r for r in rows if key(r) == g and y in r]
        off = spread * (i - (len(groups) - 1) / 2)
        ax.scatter([r[x] * (1 + off) if log else r[x] + off for r in pts], [r[y] for r in pts], s=7, alpha=0.5, lw=0,
                   color=colors.get(g))


def seed_dots(ax, x, values, color, width=0.25, seed=0):
    """One dot per seed at x (jittered), with the mean ± 95% t-interval as a bar beside them."""
    v = np.asarray(values, dtype=float)
    if not len(v):
        return
    jitter = np.random.default_rng(seed).uniform(-width / 2, width / 2, len(v))
    ax.scatter(x + jitter, v, s=10, color=color, alpha=0.6, lw=0)
    half = t_half_width(v) if len(v) > 1 else 0.0
    ax.errorbar(x + width * 0.8, v.mean(), yerr=half, fmt="s", ms=5, color=color, capsize=3)


METRIC_LABELS = {  # axis labels for the metrics of the tidy rows
    "accuracy": "accuracy", "exact": "exact match", "comp_std": "std of a component across samples",
    "vec_mean": "per-vector mean", "vec_var": "per-vector variance", "entropy": "attention entropy H",
    "eff_n": "effective number of attended tokens exp(H)", "target_mass": "attention mass on the answer",
    "token_acc": "per-token accuracy", "id_acc": "position-id accuracy"}
FRACTIONS = {"accuracy", "exact", "token_acc", "id_acc", "target_mass", "mass", "stop_early", "stop_late"}
THEORY_STYLES = [("black", ":"), ("tab:purple", "-."), ("tab:brown", (0, (1, 3))), ("tab:olive", (0, (3, 1, 1, 1)))]


def plot_vs_length(rows, metric, path, train_len, group="variant", chance=None, logy=False, title=None,
                   ylabel=None, extra=(), ax=None, style=None, seeds=False):
    """metric vs test length (log2 x), one line per group with a mean ± std band over seeds (and with
    seeds=True a dot per seed), a dashed line at the largest training length, an optional chance line
    and extra (x, y, label) curves (e.g. theory, each its own colour and dash). style(group) -> {color,
    ls, label} keeps a variant's colour the same in every figure of a script. The legend sits outside
    the axes, clear of the data. Saves to path unless an axis is given."""
    plt = pyplot()
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(7.5, 4))
    colors = {}
    for g, (xs, m, s, n) in sorted(mean_std_by(rows, "length", metric, group).items(), key=lambda t: str(t[0])):
        st = dict(style(g)) if style else {}
        label = st.pop("label", " ".join(map(str, g)) if isinstance(g, tuple) else str(g))
        line, = ax.plot(xs, m, marker="o", ms=3, label=f"{label} ({seeds_text(n.min())})", **st)
        lo, hi = (np.maximum(m - s, m * 0.05), m + s) if logy else (m - s, m + s)
        if metric in FRACTIONS:  # a band of an accuracy or a probability stays in [0, 1]
            lo, hi = np.clip(lo, 0, 1), np.clip(hi, 0, 1)
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
        colors[g] = line.get_color()
    if seeds:
        dots(ax, rows, "length", metric, group, colors)
    for (x, y, label), (color, ls) in zip(extra, THEORY_STYLES):
        ax.plot(x, y, color=color, ls=ls, lw=1.4, label=label)
    ax.axvline(train_len, color="gray", ls="--", lw=1, label=f"max train length {train_len}")
    if chance is not None:
        ax.axhline(chance, color="red", ls=":", lw=1, label=f"chance {chance:g}")
    ax.set_xscale("log", base=2)
    ticks_at(ax, sorted({r["length"] for r in rows}) or [train_len])  # plain numbers, not 2^k
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("test length")
    ax.set_ylabel(ylabel or METRIC_LABELS.get(metric, metric))
    ax.set_title(title or f"{METRIC_LABELS.get(metric, metric)} vs length (mean ± std over seeds)", fontsize=10)
    legend_outside(ax)
    ax.grid(alpha=0.3)
    if own:
        save_figure(fig, path)


def fig_attention_std(panels, path, xlabel, style):
    """The attention-output std at the query vs length, the quantity of Li et al.'s Fig. 1, one panel
    each: panels is [(rows, train_len, title, group)], rows carrying comp_std and the group's field."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.2), squeeze=False)
    for ax, (rows, train_len, title, group) in zip(axes[0], panels):
        plot_vs_length(rows, "comp_std", None, train_len, group=group, logy=True, ax=ax, style=style, title=title)
        ax.set_xlabel(xlabel)
        ticks_at(ax, sorted({r["length"] for r in rows}))
    save_figure(fig, path)


def cell_label(cell):
    """'task=lookup variant=none seed=2': a cell's ids, for messages."""
    return " ".join(f"{k}={v}" for k, v in cell.items() if k not in ("config", "device"))


def training_report(records, out, say):
    """training.png (every cell's loss curve; diverged cells in red, ending in an x) and, in the
    summary, which cells diverged and the likely cause. Returns False when no cell finished training
    (the caller then has nothing else to draw)."""
    bad = [r for r in records if r["status"] == "diverged"]
    if bad:
        lrs = sorted({r["cell"].get("config", {}).get("lr") for r in bad} - {None})
        say(f"\n{len(bad)} of {len(records)} cell(s) diverged (a non-finite loss or gradient stopped training; "
            f"they have no test rows): " + "; ".join(cell_label(r["cell"]) for r in bad[:8]) +
            (f"; and {len(bad) - 8} more" if len(bad) > 8 else ""))
        say(f"  the usual cause is a learning rate too high for the model (here --lr {', '.join(map(str, lrs))}): "
            "try a smaller --lr, a longer --warmup, or --grad-clip 1")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    kinds = {}  # one colour per setting (the cell's ids but the seed): its seeds share it
    for r in records:
        curve = np.array(r.get("train", {}).get("loss_curve") or [], dtype=float).reshape(-1, 2)
        kind = ", ".join(str(v) for k, v in r["cell"].items() if k not in ("seed", "device", "config", "weights"))
        color = kinds.setdefault(kind, f"C{len(kinds) % 10}")
        if len(curve):
            ok = r["status"] != "diverged"
            ax.plot(curve[:, 0], curve[:, 1], color=color if ok else "red", alpha=0.5 if ok else 0.9, lw=1)
            if not ok:
                ax.plot(curve[-1, 0], curve[-1, 1], "x", color="red", ms=8)
    for kind, color in list(kinds.items())[:10]:
        ax.plot([], [], color=color, label=kind or "finished")
    ax.plot([], [], color="red", marker="x", label=f"diverged ({len(bad)} of {len(records)} cells)")
    ax.set(xlabel="training step", ylabel="training loss", title="training loss of every cell (a line per seed)")
    if any(len(line.get_xdata()) for line in ax.get_lines()):
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, Path(out) / "training.png")
    if len(bad) == len(records):
        say("no cell finished training: no accuracy or variance figures (training.png shows the losses)")
    return len(bad) < len(records)

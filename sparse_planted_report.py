"""sparse_planted_report.py: the report of sparse_planted.py (Golowich et al. 2025), drawn from the cell
records alone, so `--plot-only` redraws it.

  labels     family(), model_label(): a row's model and family, made here at drawing time from its fields
  figures    sparsity.png and sparsity_mass.png (claim 1), locality.png (claim 2), ppc.png (claim 3),
             variance.png
  claims     the claims as data, each with its kind (sparsity, locality, ppc): seeds that hold with Wilson
             intervals, Spearman's rho over k, paired differences between position encodings
  tables     say_* functions; report() calls them in order

The locality task's offsets come from the script: SCRIPT.report is
functools.partial(report, offsets=spread_offsets).
"""
import functools
import json
from pathlib import Path

import numpy as np

import faults
import reporting as R


POS_COLORS = {"nope": "C0", "rope": "C1", "coupled": "C2", "oracle": "C2", "ppc": "C3"}  # in every figure
POS_ORDER = list(POS_COLORS)
HOLDS = 0.9  # a seed holds at a length: accuracy (or exact match) >= this there
LEARNED = 0.95  # a k (or W) is learned in distribution: mean accuracy >= this at the longest training length
MATTERS = 0.05  # a paired difference counts when its 95% interval excludes 0 and it is at least this large


def pos_style(pos):
    return {"color": POS_COLORS.get(pos)}


def family(row):
    """A sparsity row's model family, for grouping, labels and colours: 'K=4' (k ~ U[1, 4]) or the fixed-k
    control (one model per k, drawn as one family)."""
    return f"K={row['K']}" if row["exp"] == "sparsity" else "fixed k (one model per k)"


def model_label(row):
    """A row's model as a legend label (display only; the cell fields are what is compared)."""
    if row["exp"] == "sparsity":
        return f"K={row['K']}"
    if row["exp"] == "fixed":
        return f"k={row['k_only']} only"
    if row["exp"] == "locality":
        return f"{row['pos']}, W={row['W']}"
    return row["variant"]


def accuracy_axes(ax, xlabel, title):
    """Chance line, labels, 0..1 range, legend and grid of an accuracy-vs-category panel."""
    ax.axhline(0.5, color="red", ls=":", lw=1, label="chance 0.5")
    ax.set(xlabel=xlabel, ylabel="accuracy", ylim=(0, 1.05), title=title)
    ax.title.set_fontsize(9)
    R.legend_outside(ax)
    ax.grid(alpha=0.3)


def say_table(say, rows, metric, group, x="l", label=str, width=20):
    """Print metric by length, one line per group: mean ± std over seeds."""
    say(f"  {'':<{width}}" + "".join(f"{x + '=' + str(L):>13}" for L in sorted({r['length'] for r in rows})))
    for g, (xs, m, s, n) in sorted(R.mean_std_by(rows, "length", metric, group).items(), key=lambda t: str(t[0])):
        say(f"  {label(g):<{width}}" + "".join(f"{a:>7.2f}±{b:<5.2f}" for a, b in zip(m, s)) + f"  ({n.min()} seeds)")


def k_label(fam, k):
    return f"{fam}, k={k}"


def pos_w_label(g):
    return f"{g[0]}, W={g[1]}"


def families(sp):
    return sorted({r["family"] for r in sp}, key=lambda f: (f.startswith("fixed"), f))


def fig_sparsity(sp, L, palette, k_palette, out):
    """sparsity_by_length.png: accuracy vs l, one line per k, a panel per family; sparsity_vs_k.png:
    accuracy vs k beyond the training length, a line per family, a dot per seed."""
    plt = R.pyplot()
    fams = families(sp)
    fig, axes = plt.subplots(1, len(fams), figsize=(6.5 * len(fams), 4), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        R.plot_vs_length([r for r in sp if r["family"] == fam], "accuracy", None, L, group="k", chance=0.5, ax=ax,
                         title=f"{fam}:\none line per k (legend: k, seeds)", style=k_palette)
        ax.set(xlabel="bits l", ylim=(0, 1.05))
        R.ticks_at(ax, sorted({r["length"] for r in sp}))
    R.save_figure(fig, out / "sparsity_by_length.png")
    ood = sorted({r["length"] for r in sp if r["length"] > L}) or [L]
    fig, axes = plt.subplots(1, len(ood), figsize=(6.5 * len(ood), 4), squeeze=False)
    for ax, length in zip(axes[0], ood):
        sel = [r for r in sp if r["length"] == length]
        R.band(ax, sel, "k", "accuracy", "family", palette.colors)
        R.dots(ax, sel, "k", "accuracy", "family", palette.colors, spread=0.08, log=False)
        accuracy_axes(ax, "k (planted bits)", f"l = {length} ({length / L:g} x the training length {L}); "
                                              "mean ± std, dots: seeds")
    R.save_figure(fig, out / "sparsity_vs_k.png")


def fig_sparsity_mass(mass, L, k_palette, out):
    """sparsity_mass.png: the attention mass the query '=' puts on the planted bits (the head that puts
    the most there) vs l, one line per k; a row per layer, a column per family."""
    plt = R.pyplot()
    fams, layers = families(mass), sorted({r["layer"] for r in mass})
    fig, axes = plt.subplots(len(layers), len(fams), figsize=(6.5 * len(fams), 3.8 * len(layers)), squeeze=False)
    for i, layer in enumerate(layers):
        for ax, fam in zip(axes[i], fams):
            R.plot_vs_length(R.select(mass, family=fam, layer=layer), "mass", None, L, group="k", ax=ax,
                             style=k_palette, ylabel="attention mass on the planted bits",
                             title=f"{fam}, layer {layer}: mass on the planted bits\n(best head; legend: k, seeds)")
            ax.set(xlabel="bits l", ylim=(0, 1.05))
            R.ticks_at(ax, sorted({r["length"] for r in mass}))
    R.save_figure(fig, out / "sparsity_mass.png")


def fig_locality(loc, loc_mass, cfg, out, offsets):
    """locality.png: top, accuracy vs l per position encoding, a panel per window W, then accuracy at
    the longest l vs W with a dot per seed; bottom, the attention mass of '=' on the planted bits in
    layer 0 (the best head) vs l."""
    plt = R.pyplot()
    Ws, L = sorted({r["W"] for r in loc}), cfg.train_max
    fig, axes = plt.subplots(2, len(Ws) + 1, figsize=(5.8 * (len(Ws) + 1), 8), squeeze=False)
    for i, w in enumerate(Ws):
        where = ", ".join(map(str, offsets(cfg.loc_k, w)))
        R.plot_vs_length(R.select(loc, W=w), "accuracy", None, L, group="pos", chance=0.5, ax=axes[0, i],
                         style=pos_style, title=f"W = {w}: label from the bit(s) {where} places before '='")
        R.plot_vs_length(R.select(loc_mass, W=w, layer=0), "mass", None, L, group="pos", ax=axes[1, i], style=pos_style,
                         ylabel="attention mass on the planted bits",
                         title=f"W = {w}: layer 0, mass of '=' on the planted bits (best head)")
        for ax in axes[:, i]:
            ax.set(xlabel="bits l", ylim=(0, 1.05))
            R.ticks_at(ax, sorted({r["length"] for r in loc}))
    axes[1, -1].axis("off")
    top = max(r["length"] for r in loc)
    sel = [{**r, "w_i": Ws.index(r["W"])} for r in loc if r["length"] == top]  # W as categories, evenly spaced
    R.band(axes[0, -1], sel, "w_i", "accuracy", "pos", POS_COLORS)
    R.dots(axes[0, -1], sel, "w_i", "accuracy", "pos", POS_COLORS, spread=0.08, log=False)
    axes[0, -1].set_xticks(range(len(Ws)), Ws)
    accuracy_axes(axes[0, -1], "window W", f"accuracy at l = {top} ({top / L:g} x L); mean ± std, dots: seeds")
    R.save_figure(fig, out / "locality.png")


PPC_TITLES = {"token_acc": "per-token accuracy, greedy", "exact": "exact match of the whole output",
              "id_acc": "accuracy of the predicted position ids"}


def fig_ppc(ppc, cfg, out):
    """ppc.png: token accuracy, exact match and id accuracy vs n, one line per model / decoding, a dot
    per seed."""
    plt = R.pyplot()
    metrics = [m for m in PPC_TITLES if any(m in r for r in ppc)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        R.plot_vs_length(ppc, m, None, cfg.ppc_max, ax=ax, style=pos_style,
                         title=PPC_TITLES[m] + " (mean ± std, dots: seeds)")
        R.dots(ax, [r for r in ppc if m in r], "length", m, "variant", POS_COLORS)
        ax.set(xlabel="n, cells of the pointer chain", ylim=(0, 1.05))
        R.ticks_at(ax, sorted({r["length"] for r in ppc}))
    R.save_figure(fig, out / "ppc.png")


def fig_variance(probe, L, palette, out):
    """variance.png: the attention-output std at the query '=' vs l, a panel per layer."""
    R.fig_attention_std([(R.select(probe, layer=layer), L, f"layer {layer}: attention-output std\nat the query '='",
                          "model") for layer in sorted({r["layer"] for r in probe})], out / "variance.png", "bits l",
                        palette)


def holding(values, ok=HOLDS):
    """{k, n, ci}: the seeds at or above ok, of n, with the 95% Wilson interval."""
    return R.seeds_holding(values, ok)


def unlearned_pairs(rows, ks, L):
    """[(seed, k)] whose accuracy at the training length L is below LEARNED: left out of rho one by one."""
    return [(seed, k) for k in ks for seed, v in sorted(R.per_seed(rows, "accuracy", k=k, length=L).items())
            if v < LEARNED]


def sparsity_claims(sp, L):
    """Claim (1) as data, one dict per model family: per k the accuracy at L and at each longer l (mean,
    std, median over seeds; seeds that hold >= HOLDS), and Spearman's rho of accuracy with k at each l
    beyond L (95% bootstrap CI over seeds) over every k the family was trained on. A (seed, k) that was
    not learned in distribution is left out of rho alone and reported (never the k for every seed)."""
    out = []
    for fam in families(sp):
        rows = R.select(sp, family=fam)
        lengths, ks = sorted({r["length"] for r in rows}), sorted({r["k"] for r in rows})
        by_k = [{"k": k, "by_length": [{"length": Lx, **R.seed_stats(v), "hold": holding(v)} for Lx, v in (
            (Lx, list(R.per_seed(rows, "accuracy", k=k, length=Lx).values())) for Lx in lengths)]} for k in ks]
        unlearned = unlearned_pairs(rows, ks, L)
        kept = [r for r in rows if (r["seed"], r["k"]) not in unlearned]
        top = lengths[-1]
        at_top = [np.mean(v) for v in (list(R.per_seed(kept, "accuracy", k=k, length=top).values()) for k in ks) if v]
        rho_by = [{"length": Lx, **dict(zip(("rho", "lo", "hi"), R.spearman_ci(
            [(r["seed"], r["k"], r["accuracy"]) for r in kept if r["length"] == Lx])))} for Lx in lengths if Lx > L]
        rho, lo, hi = (rho_by[-1]["rho"], rho_by[-1]["lo"], rho_by[-1]["hi"]) if rho_by else (float("nan"),) * 3
        mono = all(a >= b - 0.02 for a, b in zip(at_top, at_top[1:]))
        verdict = ("untested: fewer than two k learned in distribution" if len(at_top) < 2 else
                   "reproduced" if mono and hi < 0 else "direction reproduced, not significant" if mono and rho < 0
                   else "not reproduced")
        out.append({"claim": "(1) accuracy beyond the training length falls as k grows", "setting": fam,
                    "train_max": L, "test_max": top, "by_k": by_k, "ks": ks,
                    "unlearned": [{"seed": seed, "k": k} for seed, k in unlearned], "rho": rho, "rho_ci": [lo, hi],
                    "rho_by_length": rho_by, "monotone": mono, "verdict": verdict})
    return out


def locality_claims(loc, L):
    """Claim (2) as data: per position encoding, accuracy at L and at the longest l per W (mean, std,
    median; seeds that hold), and the paired difference largest W - smallest W at the longest l (same
    bit strings, 95% t-interval over seeds). Then the coupling verdict: some uncoupled model depends on
    W, and the coupled one neither depends on it nor falls below HOLDS."""
    top, Ws = max(r["length"] for r in loc), sorted({r["W"] for r in loc})
    out = []
    for pos in sorted({r["pos"] for r in loc}, key=POS_ORDER.index):
        rows = R.select(loc, pos=pos)
        by_w = [{"W": w, **{name: {**R.seed_stats(v), "hold": holding(v)} for name, v in (
            ("inside", list(R.per_seed(rows, "accuracy", W=w, length=L).values())),
            ("beyond", list(R.per_seed(rows, "accuracy", W=w, length=top).values())))}} for w in Ws]
        learned = [x["W"] for x in by_w if x["inside"]["mean"] >= LEARNED]  # compare only W learned in distribution
        d = next((x for x in R.paired_diff_ci(rows, "accuracy", learned[-1], learned[0], by="W")
                  if x["length"] == top), None) if len(learned) > 1 else None
        if d is None:
            verdict = "untested: fewer than two W learned in distribution"
        else:  # an interval that excludes 0, and a difference that matters
            verdict = "depends on W" if (d["hi"] < 0 or d["lo"] > 0) and abs(d["diff"]) >= MATTERS else \
                "no W dependence found"
        out.append({"claim": "(2) accuracy beyond the training length depends on the window W", "setting": pos,
                    "train_max": L, "test_max": top, "by_W": by_w, "learned_W": learned,
                    "diff_W": d and {**d, "a": learned[-1], "b": learned[0]}, "verdict": verdict})
    by = {c["setting"]: c for c in out}
    if "coupled" in by and len(Ws) > 1:
        uncoupled = [p for p in ("nope", "rope") if p in by and by[p]["verdict"] == "depends on W"]
        worst = min(x["beyond"]["mean"] for x in by["coupled"]["by_W"])
        if not uncoupled:
            verdict = "untested: no uncoupled model here depends on W"
        else:
            verdict = "reproduced" if by["coupled"]["verdict"] != "depends on W" and worst >= HOLDS else "not reproduced"
        out.append({"claim": "(2) position coupling removes the dependence on W", "setting": "coupled",
                    "uncoupled_dependent": uncoupled, "coupled_worst": worst, "verdict": verdict})
    pairs = [{"W": w, "a": "coupled", "b": "rope", **d} for w in Ws
             for d in R.paired_diff_ci(R.select(loc, W=w), "accuracy", "coupled", "rope", by="pos") if d["length"] > L]
    pairs += [{"pos": p, "a": Ws[-1], "b": Ws[0], **d} for p in sorted({r["pos"] for r in loc}, key=POS_ORDER.index)
              for d in R.paired_diff_ci(R.select(loc, pos=p), "accuracy", Ws[-1], Ws[0], by="W") if d["length"] > L]
    out.append({"claim": "(2) paired differences in accuracy, by length", "setting": "locality", "pairs": pairs,
                "verdict": "measured"})
    return out


def ppc_claims(ppc, cfg):
    """Claim (3) as data: per model / decoding, token accuracy, exact match and id accuracy at every n
    (mean, std, median, the 95% t-interval of the mean; seeds that hold), where the predicted ids first
    drift, and the verdict at the longest n with PPC - the better baseline, paired by seed on the same
    test sequences."""
    out, by = [], {}
    for g in sorted({r["variant"] for r in ppc}, key=POS_ORDER.index):
        rows = R.select(ppc, variant=g)
        by_n = []
        for n in sorted({r["length"] for r in rows}):
            d = {"n": n}
            for m in PPC_TITLES:
                v = list(R.per_seed(rows, m, length=n).values())
                if v:
                    s, half = R.seed_stats(v), R.t_half_width(v)
                    d[m] = {**s, "ci": (max(0.0, s["mean"] - half), min(1.0, s["mean"] + half)),  # fractions
                            "hold": holding(v)}
            at_n = R.select(rows, length=n)
            if at_n and "ids_ok" in at_n[0]:  # where the predicted ids first drift
                d["ids_ok"] = R.seed_stats([r["ids_ok"] for r in at_n])
                d["drift_by_jump"] = {j: R.seed_stats([r[f"fails_j{j}"] / r[f"tries_j{j}"] for r in at_n
                                                       if r[f"tries_j{j}"] > 0]) for j in (1, 2, 3)}
            by_n.append(d)
        by[g] = by_n[-1]
        out.append({"claim": "(3) pointer chasing", "setting": g, "train_max": cfg.ppc_max, "by_n": by_n,
                    "verdict": "measured"})
    if "ppc" in by and ({"nope", "rope"} & by.keys()):
        ppc_t, ppc_e = by["ppc"]["token_acc"]["mean"], by["ppc"]["exact"]["mean"]
        base = max((g for g in ("nope", "rope") if g in by), key=lambda g: by[g]["token_acc"]["mean"])
        best = by[base]["token_acc"]["mean"]
        paired = [d for d in R.paired_diff_ci(ppc, "token_acc", "ppc", base) if d["length"] == by["ppc"]["n"]]
        out.append({"claim": "(3) paired differences in per-token accuracy, by length", "setting": "ppc",
                    "verdict": "measured", "pairs": [{"a": "ppc", "b": b, **d} for b in ("nope", "rope", "oracle")
                                                     if b in by for d in R.paired_diff_ci(ppc, "token_acc", "ppc", b)
                                                     if d["length"] > cfg.ppc_max]})
        out.append({"claim": "(3) PPC length-generalizes where NoPE / RoPE do not", "setting": "ppc",
                    "n": by["ppc"]["n"], "ppc_token_acc": ppc_t, "ppc_exact": ppc_e, "best_baseline": base,
                    "best_baseline_token_acc": best, "paired_minus_baseline": paired[0] if paired else None,
                    "verdict": "reproduced" if ppc_e >= HOLDS else
                    "partly (beats NoPE / RoPE, but not exact)" if ppc_t > best + 0.1 else "not reproduced"})
    return out


def stat_ci(s):
    return f"{R.stat_text(s)} [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}]"




def say_sparsity_claims(sp, say):
    longer = [x["length"] for x in sp[0]["by_k"][0]["by_length"] if x["length"] > sp[0]["train_max"]]
    R.markdown_table(say, ["model", "k", f"l = {sp[0]['train_max']} (training)"] + [
        f"l = {Lx}: {what}" for Lx in longer for what in ("accuracy", f"seeds >= {HOLDS} [95% CI]")],
        [[c["setting"], d["k"], R.stat_text({x["length"]: x for x in d["by_length"]}[c["train_max"]])] +
         [cell for x in d["by_length"] if x["length"] in longer for cell in (R.stat_text(x), R.holding_text(x["hold"]))]
         for c in sp for d in c["by_k"]])
    for c in sp:
        left = ", ".join(f"seed {u['seed']} at k = {u['k']}" for u in c["unlearned"]) or "none"
        say(f"  {c['setting']}: rho(accuracy, k) at l = {c['test_max']} over k = {','.join(map(str, c['ks']))}: "
            f"{c['rho']:+.2f} [{c['rho_ci'][0]:+.2f}, {c['rho_ci'][1]:+.2f}]; monotone: "
            f"{'yes' if c['monotone'] else 'no'} -> {c['verdict']}")
        say(f"    left out, not learned in distribution (< {LEARNED} at l = {c['train_max']}): {left}")
        say("    rho by length: " + ", ".join(f"l = {x['length']}: {x['rho']:+.2f} [{x['lo']:+.2f}, {x['hi']:+.2f}]"
                                       for x in c["rho_by_length"]))


def say_locality_claims(loc, say):
    top = loc[0]["test_max"]
    rows = []
    for c in loc:
        d = c["diff_W"]
        for i, x in enumerate(c["by_W"]):
            diff = "" if i else c["verdict"] if d is None else f"W = {d['a']} - {d['b']}: {R.diff_text(d)} -> {c['verdict']}"
            rows.append([c["setting"], x["W"], R.stat_text(x["inside"]), R.stat_text(x["beyond"]), R.holding_text(x["beyond"]["hold"]), diff])
    R.markdown_table(say, ["position ids", "W", f"l = {loc[0]['train_max']} (training)", f"l = {top}",
                           f"seeds >= {HOLDS} at l = {top} [95% CI]",
                           f"largest - smallest W learned in distribution, at l = {top}, paired [95% CI]"], rows)


def say_ppc_claims(pp, say):
    rows = []
    for c in pp:
        for d in c["by_n"]:
            by_j = " / ".join(f"{d['drift_by_jump'][j]['mean']:.3f}" for j in (1, 2, 3)) if "ids_ok" in d else "-"
            rows.append([c["setting"], d["n"], stat_ci(d["token_acc"]), stat_ci(d["exact"]), R.holding_text(d["exact"]["hold"]),
                         stat_ci(d["id_acc"]) if "id_acc" in d else "-", R.stat_text(d["ids_ok"]) if "ids_ok" in d else "-",
                         by_j])
    R.markdown_table(say, ["model / decoding", "n", "per-token accuracy [95% CI of the mean]", "exact match [95% CI]",
                           f"seeds with exact >= {HOLDS} [95% CI]", "id accuracy [95% CI]",
                           "ids right before the first wrong one", "first-drift chance at a jump of 1 / 2 / 3"], rows)


def say_claims(verdicts, say):
    """The claims as markdown tables (as docs/sparse_planted.md quotes them), then the other claims' lines."""
    for key, table in (("by_k", say_sparsity_claims), ("by_W", say_locality_claims), ("by_n", say_ppc_claims)):
        if any(key in c for c in verdicts):
            table([c for c in verdicts if key in c], say)
    for c in verdicts:
        if "pairs" in c:
            say(f"  {c['claim']} (paired by seed on the same test sequences, 95% t-interval):")
            for d in c["pairs"]:
                within = f"W = {d['W']}: " if "W" in d else f"{d['pos']}: W = " if "pos" in d else ""
                say(f"    {within}{d['a']} - {d['b']} at {'n' if c['setting'] == 'ppc' else 'l'} = {d['length']}: "
                    f"{R.diff_text(d)} ({d['n']} seeds)")
        elif "by_k" not in c and "by_W" not in c and "by_n" not in c:
            detail = {k: v for k, v in c.items() if k not in ("claim", "setting", "verdict")}
            say(f"  {c['claim']}: {c['verdict']}  ({', '.join(f'{k} {say_value(v)}' for k, v in detail.items())})")


def say_value(v):
    """A claim field as printed: floats to 2 places, a paired difference as diff [lo, hi] (n seeds)."""
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, dict) and "diff" in v:
        return f"{R.diff_text(v)} ({v['n']} seeds)"
    return str(v)


def say_sparsity(sp, mass, L, say):
    say(f"\n(1) sparse parity, accuracy by k and length l (trained on l <= {L}); mean ± std over seeds")
    for fam in families(sp):
        say_table(say, R.select(sp, family=fam), "accuracy", "k", label=functools.partial(k_label, fam), width=32)
    say("  attention mass of '=' on the planted bits (best head, last layer), mean ± std over seeds")
    last = max(r["layer"] for r in mass)
    for fam in families(sp):
        say_table(say, R.select(mass, family=fam, layer=last), "mass", "k", label=functools.partial(k_label, fam),
                  width=32)


def say_locality(loc, loc_mass, cfg, say):
    say(f"\n(2) locality (the {cfg.loc_k} bits spread over the last W before '='): accuracy, mean ± std over seeds")
    say_table(say, loc, "accuracy", ("pos", "W"), label=pos_w_label)
    for layer in sorted({r["layer"] for r in loc_mass}):
        say(f"  attention mass of '=' on the planted bits, layer {layer} (best head), mean ± std over seeds")
        say_table(say, R.select(loc_mass, layer=layer), "mass", ("pos", "W"), label=pos_w_label)


def say_ppc(ppc, say):
    say("\n(3) pointer-chasing copy, greedy decoding; mean ± std over seeds")
    for m in [m for m in PPC_TITLES if any(m in r for r in ppc)]:
        say(f"  {m}:")
        say_table(say, ppc, m, "variant", x="n")


def say_variance(probe, say):
    say("\n(4) attention-output std at '=', std(longest l) / std(shortest l), mean over seeds:")
    for g, (xs, m, _, _) in sorted(R.mean_std_by(probe, "length", "comp_std", ("model", "layer")).items()):
        say(f"  {g[0]:<20} layer {g[1]}: {m[-1] / m[0]:.2f}  (l = {xs[0]} -> {xs[-1]})")


def report(records, cfg, out, offsets):
    """Figures, claims.json and the printed summary, from the cell records alone (so --plot-only
    redraws them)."""
    out, L = Path(out), cfg.train_max
    rows = [{**r, "model": model_label(r)} for rec in records for r in rec["rows"]]
    rows = [{**r, "family": family(r)} if r["exp"] in ("sparsity", "fixed") else r for r in rows]
    acc, probe, mass = (R.select(rows, table=t) for t in ("accuracy", "probe", "mass"))
    sp, sp_mass = ([r for r in t if r["exp"] in ("sparsity", "fixed")] for t in (acc, mass))
    loc, loc_mass, ppc = R.select(acc, exp="locality"), R.select(mass, exp="locality"), R.select(acc, exp="ppc")
    palette = R.Palette([r["family"] for r in sp] + [r["model"] for r in probe])  # one colour per model,
    k_palette = R.Palette(r["k"] for r in sp)                                     # in every figure
    say = R.Summary()
    if not R.training_report(records, out, say):  # every cell diverged: nothing else to draw
        return say.write(out)
    say(f"\n=== sparse_planted: {sum(r['status'] == 'ok' for r in records)} runs ok, "
        f"{sum(r['status'] == 'diverged' for r in records)} diverged ===")
    verdicts = (sparsity_claims(sp, L) if sp else []) + (locality_claims(loc, L) if loc else []) + \
        (ppc_claims(ppc, cfg) if ppc else [])
    faults.atomic_write(out / "claims.json", json.dumps(verdicts, indent=1))
    say(f"\nthe paper's claims next to what was measured (mean ± std (median) over seeds; a seed holds at a "
        f"length when it scores >= {HOLDS} there)")
    say_claims(verdicts, say)
    R.few_seeds_note(records, "docs/sparse_planted.md", say)
    if sp:
        fig_sparsity(sp, L, palette, k_palette, out)
        fig_sparsity_mass(sp_mass, L, k_palette, out)
        say_sparsity(sp, sp_mass, L, say)
    if loc:
        fig_locality(loc, loc_mass, cfg, out, offsets)
        say_locality(loc, loc_mass, cfg, say)
    if ppc:
        fig_ppc(ppc, cfg, out)
        say_ppc(ppc, say)
    if probe:  # (4) attention-output variance at the query '=' (the sparsity models' if there are any)
        fig_variance([r for r in probe if r["exp"] in ("sparsity", "fixed")] or probe, L, palette, out)
        say_variance(probe, say)
    R.say_examples(records, say, lambda rec: R.cell_label(rec["cell"]), 300)
    say.write(out)

"""parity_random_access_report.py: the report of parity_random_access.py (Ebrahimi et al. 2024), drawn from
the cell records alone, so `--plot-only` redraws it.

  labels     setting() and labelled(): a label per (format, position encoding, training position ids),
             made here at drawing time from the cells' structured fields
  figures    accuracy.png, steps.png (accuracy per scratchpad step), attention.png (step i -> bit i, the
             maps of the best seed), variance.png
  claims     the paper's claims as data: ACCURACY_CLAIMS (format, claim, named verdict rule), the
             attention mass of claim (4), the paired addition comparison of claim (5)
  tables     say_* functions; report() calls them in order

The formats' families (parity, addition) come from the script: SCRIPT.report is
functools.partial(report, families=FAMILIES).
"""
import json
import math
from pathlib import Path

import numpy as np

import faults
import reporting as R


def setting(rec, steps=False, layers=False):
    """'position encoding, training position ids' of a cell, e.g. 'rope, random', with steps=True the
    steps too ('rope, random, 1000+1000 steps': copy pre-training + task), with layers=True the depth."""
    conf = rec["cell"]["config"]
    more = f", {conf.get('pretrain_steps', 0)}+{conf['steps']} steps" if steps else ""
    more += f", {conf['n_layer']} layer{'s' * (conf['n_layer'] > 1)}" if layers else ""
    return f"{rec['cell']['pos']}, {conf.get('positions', 'plain')}{more}"


def best_head(mass, hi):
    """(layer, head) whose attention from step i to bit i is largest within the training length:
    the retrieving head. mass: (L, nh, S)."""
    m = np.asarray(mass)[:, :, :hi].mean(-1)
    return np.unravel_index(m.argmax(), m.shape)


def mixed_budgets(records):
    """Whether the records' cells differ in their (copy pre-training, task) steps."""
    return len({(rec["cell"]["config"].get("pretrain_steps"), rec["cell"]["config"]["steps"]) for rec in records}) > 1


def labelled(records):
    """Copies of the records, each with its `label` and its rows' `variant` set to it (the caller's
    records are left as they were)."""
    out, steps = [], mixed_budgets(records)
    layers = len({rec["cell"]["config"].get("n_layer") for rec in records}) > 1  # --experiment depth
    for rec in records:  # one label per (format, position encoding, training position ids[, steps][, depth])
        where = setting(rec, steps=steps, layers=layers)
        lab = f"{rec['cell']['fmt']}, {where}"
        out.append({**rec, "label": lab, "setting": where,
                    "rows": [{**r, "variant": lab, "setting": where} for r in rec["rows"]]})
    return out


def length_groups(acc, cfg, families):
    """[(formats, longest training length, chance, what the x axis counts)]: parity, then addition."""
    parity = [f for f in families["parity"] if R.select(acc, fmt=f)]
    adds = [f for f in families["addition"] if R.select(acc, fmt=f)]
    groups = [(parity, cfg.train_max, 0.5, "bits n"), (adds, cfg.add_train_max, None, "operand digits")]
    return [g for g in groups if g[0]]


def fig_accuracy(acc, groups, palette, out):
    """accuracy.png: final-answer accuracy and exact match vs n, mean ± std over seeds, a dot per seed."""
    plt = R.pyplot()
    fig, axes = plt.subplots(len(groups), 2, figsize=(15, 4.5 * len(groups)), squeeze=False)
    for i, (fmts, hi, chance, what) in enumerate(groups):
        sel = [r for r in acc if r["fmt"] in fmts]
        for ax, metric, ylabel, title in ((axes[i, 0], "accuracy", "final-answer accuracy", "final answer, greedy"),
                                          (axes[i, 1], "exact", "exact match", "exact match of everything produced")):
            R.plot_vs_length(sel, metric, None, hi, chance=chance if metric == "accuracy" else None, ax=ax,
                             ylabel=ylabel, style=palette, title=f"{title} (mean ± std, dots: seeds); x: {what}",
                             seeds=True)
            R.ticks_at(ax, sorted({r["length"] for r in sel}))
    R.save_figure(fig, out / "accuracy.png")


def fig_steps(acc, steps, groups, palette, out):
    """steps.png: the accuracy of each scratchpad step i at the longest test length."""
    plt = R.pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(8 * len(groups), 4.2), squeeze=False)
    for ax, (fmts, hi, chance, what) in zip(axes[0], groups):
        L = max(r["length"] for r in acc if r["fmt"] in fmts)
        sel = [r for r in steps if r["fmt"] in fmts and r["length"] == L]
        R.band(ax, sel, "step", "accuracy", "variant", palette.colors)
        ax.axvline(hi, color="gray", ls="--", lw=1, label=f"max train length {hi}")
        if chance:
            ax.axhline(chance, color="red", ls=":", lw=1, label=f"chance {chance:g}")
        ax.set(xlabel="step index i", ylabel="accuracy of step i (greedy)", ylim=(-0.02, 1.02),
               title=f"per-step accuracy at {what} = {L}")
        R.legend_outside(ax)
        ax.grid(alpha=0.3)
    R.save_figure(fig, out / "steps.png")


def retrieval_mass(records, cfg):
    """Per retrieving format's record: its label and the attention from step i to bit i of its
    retrieving head (best_head), one value per step at n = map_length."""
    out = []
    for rec in records:
        if rec.get("mass"):  # only the retrieving formats' cells hold it
            layer, head = retrieving_head(rec, cfg)
            out.append((rec["label"], np.asarray(rec["mass"][layer][head], dtype=float)))
    return out


def retrieving_head(rec, cfg):
    """(layer, head) that reads bit i best at the longest tested n within the training length (from
    mass_by_n), or, for records without it, within the first train_max steps at n = map_length."""
    inside = [m for m in rec.get("mass_by_n") or () if m["length"] <= cfg.train_max]
    if not inside:
        return best_head(rec["mass"], cfg.train_max)
    m = np.asarray(max(inside, key=lambda m: m["length"])["mass"])  # (L, nh)
    return np.unravel_index(m.argmax(), m.shape)


def mass_rows(records, cfg):
    """Tidy rows {variant, fmt, setting, seed, length, mass}: attention from the query of step i to bit i, averaged
    over steps and 32 examples of length n, in each record's retrieving head."""
    rows = []
    for rec in records:
        if rec.get("mass_by_n"):
            layer, head = retrieving_head(rec, cfg)
            rows += [{"variant": rec["label"], "fmt": rec["cell"]["fmt"], "setting": rec["setting"],
                      "seed": rec["cell"]["seed"], "length": m["length"], "mass": m["mass"][layer][head]}
                     for m in rec["mass_by_n"]]
    return rows


def learned_score(rec, cfg):
    """Final-answer accuracy at the longest training length, then nearest map_length: which seed to show."""
    rows = R.select(rec["rows"], table="accuracy")
    if not rows:
        return 0.0, 0.0
    return tuple(min(rows, key=lambda r: abs(r["length"] - L))["accuracy"] for L in (cfg.train_max, cfg.map_length))


def maps_to_show(records, cfg):
    """[(record, seeds it was chosen from, which maps, their n)]: per scratchpad / mnemonic setting, the seed
    that learned best (a map of a model that failed in distribution would show nothing about length).
    Chosen among all seeds, so a folder that keeps only that seed's maps (the committed ones) draws the same."""
    show = []
    for f in ("scratchpad", "mnemonic"):
        for lab in sorted({rec["label"] for rec in records if rec["cell"]["fmt"] == f}):
            recs = [rec for rec in records if rec["label"] == lab]
            rec = max(recs, key=lambda r: learned_score(r, cfg))
            if not rec.get("maps"):
                continue
            if rec.get("maps_train"):
                show.append((rec, len(recs), "maps_train", cfg.train_max))
            show.append((rec, len(recs), "maps", cfg.map_length))
    return show


def draw_maps(axes, rec, of, key, n, cfg):
    """One row of heatmaps: every head of the retrieving layer of rec, maps `key` at n."""
    layer, _ = retrieving_head(rec, cfg)
    for h, ax in enumerate(axes):
        im = ax.imshow(np.asarray(rec[key][layer][h]), cmap="viridis", vmin=0, vmax=1, aspect="auto",
                       interpolation="nearest")  # one scale for every map: the colour bar at the row's end
        if n > cfg.train_max:
            ax.axvline(cfg.train_max - 0.5, color="w", ls="--", lw=1)
            ax.axhline(cfg.train_max - 0.5, color="w", ls="--", lw=1)
        ax.set(title=f"n = {n}: layer {layer} head {h}", xlabel="input bit j")
        if h == 0:
            best = f" (best of {of})" if of > 1 else ""
            fmt, where = rec["label"].split(", ", 1)
            ax.set_ylabel(f"{fmt}, seed {rec['cell']['seed']}{best}\n{where}\n\nstep i", fontsize=9)
        ax.title.set_fontsize(10)
    axes[-1].figure.colorbar(im, ax=axes[-1], fraction=0.05, pad=0.03, label="attention weight")


def draw_mass(ax, ax_n, records, cfg, palette):
    """The retrieving head's mass on bit i: per step at n = map_length (ax), and by n (ax_n, if given)."""
    curves = [{"variant": lab, "step": i + 1, "mass": v} for lab, m in retrieval_mass(records, cfg)
              for i, v in enumerate(m)]
    R.band(ax, curves, "step", "mass", "variant", palette.colors)
    ax.axvline(cfg.train_max, color="gray", ls="--", lw=1, label=f"max train length {cfg.train_max}")
    ax.set(xlabel="step i", ylabel="attention on bit i", ylim=(0, 1.02),
           title=f"per step, n = {cfg.map_length} (mean ± std over seeds)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if ax_n is not None:
        by_n = mass_rows(records, cfg)
        R.plot_vs_length(by_n, "mass", None, cfg.train_max, ax=ax_n, style=palette, ylabel="attention on bit i",
                         title="vs n, averaged over the steps (mean ± std, dots: seeds)", seeds=True)
        ax_n.set_ylim(0, 1.02)
        R.ticks_at(ax_n, sorted({r["length"] for r in by_n}))
        ax_n.title.set_fontsize(9)


def fig_attention(records, cfg, palette, out):
    """attention.png: the maps of the retrieving layer (per format and setting, the seed that did best
    at map_length), and the mass from step i to bit i vs i, mean ± std over seeds."""
    with_maps = [rec for rec in records if rec.get("maps")]
    if not with_maps:
        return
    show = maps_to_show(records, cfg) or [(with_maps[0], 1, "maps", cfg.map_length)]
    nh = len(show[0][0]["maps"][0])
    fig, axes = R.pyplot().subplots(len(show) + 1, nh, figsize=(3.1 * nh, 3.0 * (len(show) + 1)), squeeze=False)
    for i, (rec, of, key, n) in enumerate(show):
        draw_maps(axes[i], rec, of, key, n, cfg)
    gs = axes[-1, 0].get_gridspec()
    for ax in axes[-1]:
        ax.remove()
    by_n = bool(mass_rows(records, cfg))
    draw_mass(fig.add_subplot(gs[-1, :nh // 2 if by_n else nh]), fig.add_subplot(gs[-1, nh // 2:]) if by_n else None,
              records, cfg, palette)
    fig.suptitle("attention from scratchpad step i (rows) to input bit j (columns), one example, layer of the retrieving "
                 "head\n(the head that reads bit i best within the training length); dashed: training length. "
                 "Bottom: the mass that head puts on bit i", fontsize=10)
    R.save_figure(fig, out / "attention.png")


def fig_variance(probe, groups, palette, out):
    """variance.png: the attention-output std at the query that writes the final answer, per layer."""
    panels = [([r for r in probe if r["fmt"] in fmts and r["layer"] == layer], hi,
               f"layer {layer}: attention-output std\nat the answer query; x: {what}", "variant")
              for fmts, hi, _, what in groups for layer in sorted({r["layer"] for r in probe})]
    if panels:
        R.fig_attention_std(panels, out / "variance.png", "test length", palette)


def say_tables(records, acc, probe, groups, cfg, say):
    """Per group: ID vs OOD tables of every metric, final-answer accuracy by length; then the
    attention-output std ratio, the retrieval mass, and a few decoded examples."""
    for fmts, hi, _, what in groups:
        recs = [{**rec, "rows": R.select(rec["rows"], table="accuracy")} for rec in records if rec["cell"]["fmt"] in fmts]
        for metric in ("accuracy", "exact", "stop_early", "stop_late"):
            if any(metric in r for rec in recs for r in rec["rows"]):
                R.summarize(recs, metric, hi, say=say)
        say(f"\nfinal-answer accuracy by {what} (mean ± std over seeds):")
        group_acc = [r for r in acc if r["fmt"] in fmts]
        say_per_seed(group_acc, R.say_by_length(group_acc, "accuracy", say), what, say)
    if probe:
        say("\nattention-output std at the answer query, std(longest n) / std(shortest n), mean over seeds:")
        for g, (xs, m, _, _) in sorted(R.mean_std_by(probe, "length", "comp_std", ("variant", "layer")).items()):
            say(f"  {g[0]:<28} layer {g[1]}: {m[-1] / m[0]:.2f}  (n = {xs[0]} -> {xs[-1]})")
    mass = retrieval_mass(records, cfg)
    if mass:
        say(f"\nattention mass from step i to bit i at n = {cfg.map_length} (retrieving head), mean over seeds:")
        for g, (inside, beyond, last) in mass_table(mass, cfg).items():
            say(f"  {g:<28} steps <= {cfg.train_max}: {inside:.2f}   steps > {cfg.train_max}: {beyond:.2f}   "
                f"last step: {last:.2f}")
    say_final_losses(records, say)
    by_n = mass_rows(records, cfg)
    if by_n:
        say("\nattention on bit i by n (retrieving head, averaged over the steps of 32 examples; mean ± std over seeds):")
        R.say_by_length(by_n, "mass", say)
    R.say_examples(records, say, lambda rec: f"{rec['label']}, seed 0", 400)


def say_final_losses(records, say):
    """The loss of the last training batch, copy pre-training and task, median [min, max] over seeds: did
    a setting that failed at least fit its training data?"""
    say("\nfinal training loss (last batch), median [min, max] over seeds:")
    for lab in sorted({rec["label"] for rec in records}):
        recs = [rec for rec in records if rec["label"] == lab and rec["status"] == "ok"]
        text = []
        for stage, name in (("pretrain", "copy pre-training"), ("train", "task")):
            v = [rec[stage]["final_loss"] for rec in recs if (rec.get(stage) or {}).get("final_loss") is not None]
            if v:
                text.append(f"{name} {np.median(v):.3g} [{min(v):.3g}, {max(v):.3g}]")
        say(f"  {lab}: " + "; ".join(text or ["-"]) + f" ({len(recs)} seeds)")


def say_per_seed(acc, Ls, what, say):
    """Final-answer accuracy of every seed at every length: the seeds behind each mean above."""
    say(f"\nfinal-answer accuracy per seed, by {what}:")
    for g in sorted({r["variant"] for r in acc}):
        say(f"  {g}\n  {'seed':>6}" + "".join(f"{L:>7}" for L in Ls))
        for seed in sorted({r["seed"] for r in acc if r["variant"] == g}):
            at = {r["length"]: r["accuracy"] for r in acc if r["variant"] == g and r["seed"] == seed}
            say(f"  {seed:>6}" + "".join(f"{at[L]:>7.3f}" if L in at else f"{'-':>7}" for L in Ls))


def mass_table(mass, cfg):
    """{label: (mean mass of steps within the training length, beyond it, at the last step)} over seeds."""
    by = {}
    for lab, m in mass:
        by.setdefault(lab, []).append((m[:cfg.train_max].mean(), m[cfg.train_max:].mean(), m[-1]))
    return {g: tuple(np.array(v).mean(0)) for g, v in sorted(by.items())}


GENERALIZES = 0.95  # a seed generalizes: final-answer accuracy >= this at GENERALIZE_X x the longest training length
GENERALIZE_X = 3
LEARNED = 0.98  # a seed learned the task: final-answer accuracy >= this at every tested n within the training lengths


def report(records, cfg, out, families):
    """Figures, claims.json and the printed summary, from the cell records alone (so --plot-only
    redraws them)."""
    out = Path(out)
    records = labelled(records)
    rows = [r for rec in records for r in rec["rows"]]
    acc, steps, probe = (R.select(rows, table=t) for t in ("accuracy", "step", "probe"))
    palette = R.Palette(r["variant"] for r in rows)  # one colour per format / setting in every figure
    say = R.Summary()
    if not R.training_report(records, out, say):  # every cell diverged: nothing else to draw
        return say.write(out)
    groups = length_groups(acc, cfg, families)
    fig_accuracy(acc, groups, palette, out)
    fig_steps(acc, steps, groups, palette, out)
    fig_attention(records, cfg, palette, out)
    fig_variance(probe, groups, palette, out)
    say(f"\n=== parity_random_access: {sum(r['status'] == 'ok' for r in records)} runs ok, "
        f"{sum(r['status'] == 'diverged' for r in records)} diverged ===")
    verdicts = claims(acc, mass_rows(records, cfg), cfg, families["addition"])
    faults.atomic_write(out / "claims.json", json.dumps(verdicts, indent=1))
    budget = ", copy pre-training + task steps]" if mixed_budgets(records) \
        else f"]; {cfg.pretrain_steps} copy pre-training steps"
    say(f"\nthe paper's claims next to what was measured (final-answer accuracy, mean ± std over seeds; "
        f"[position encoding, training position ids{budget}; a seed "
        f"generalizes when its accuracy is >= {GENERALIZES} at {GENERALIZE_X}x the longest training length, "
        "or at the longest tested length below that; the verdict is judged there too)")
    for c in verdicts:
        say(claim_line(c))
    R.few_seeds_note(records, "docs/parity_random_access.md", say)
    say_claim_table(verdicts, say)
    say_tables(records, acc, probe, groups, cfg, say)
    say.write(out)


def seeds_generalizing(acc, g, at):
    """(k, n, (lo, hi)): seeds of setting g whose final-answer accuracy at length `at` is >= GENERALIZES,
    with the 95% Wilson interval."""
    v = R.per_seed(acc, "accuracy", variant=g, length=at)
    k = sum(x >= GENERALIZES for x in v.values())
    return k, len(v), R.wilson_ci(k, len(v))


def seeds_learned(acc, g, hi):
    """(k, n, (lo, hi)): seeds of setting g with final-answer accuracy >= LEARNED at every tested length
    <= hi (the task learned in distribution), with the 95% Wilson interval."""
    rows = [r for r in R.select(acc, variant=g) if r["length"] <= hi]
    seeds = sorted({r["seed"] for r in R.select(acc, variant=g)})
    k = sum(all(r["accuracy"] >= LEARNED for r in rows if r["seed"] == s) for s in seeds)
    return k, len(seeds), R.wilson_ci(k, len(seeds))


def reproduced(ok, why=""):
    return "reproduced" if ok else f"not reproduced{why}"


# The verdict rules, each (accuracy at the longest training n, at 3x, mnemonic's at its longest n) -> words.
def learns_then_collapses(inside, at_3x, mnemonic):
    return reproduced(inside >= 0.95 and at_3x <= 0.6)


def no_length_general_rule(inside, at_3x, mnemonic):
    return reproduced(at_3x <= 0.6)


def generalizes(inside, at_3x, mnemonic):
    return "partly" if 0.6 < at_3x < 0.95 else reproduced(at_3x >= 0.95)


def fails_without_a_unique_key(inside, at_3x, mnemonic):
    """Near chance at 3x, and well below mnemonic where it ran."""
    if math.isnan(mnemonic):
        return reproduced(at_3x <= 0.6) + " (no mnemonic run to compare)"
    return reproduced(at_3x <= 0.6 and at_3x < mnemonic - 0.2)


def measured(inside, at_3x, mnemonic):
    return "measured"


def measured_alone(inside, at_3x, mnemonic):  # add-mnemonic's, until addition_verdict() pairs it with plain add
    return "measured (no plain add run to compare)"


ACCURACY_CLAIMS = (  # (format, claim, verdict rule), in the order of the paper
    ("scratchpad", "(1) scratchpad learns in distribution, collapses beyond", learns_then_collapses),
    ("none", "(1) no scratchpad: no length-general rule", no_length_general_rule),
    ("interleaved", "(2) interleaved (no indexing) generalizes", generalizes),
    ("mnemonic", "(3) mnemonic anchors generalize", generalizes),
    ("constant", "(3) without a unique key it fails", fails_without_a_unique_key),
    ("cyclic", "(3) without a unique key it fails", fails_without_a_unique_key),
    ("misaligned", "(3) without a unique key it fails", fails_without_a_unique_key),
    ("add", "(5) addition, plain", measured),
    ("add-mnemonic", "(5) addition with mnemonics generalizes further than plain", measured_alone))


def accuracy_claim(acc, fmt, setting, claim, rule, mnemonic, cfg, addition):
    """One claim on final-answer accuracy as data: at the longest training n, at GENERALIZE_X x it and at
    the longest tested n (mean, std, median over seeds), the seeds that learned and that generalize (95%
    Wilson intervals), and rule's verdict. None where the format was not run in this setting."""
    g = next((r["variant"] for r in acc if r["fmt"] == fmt and r["setting"] == setting), None)
    if g is None:
        return None
    hi = cfg.add_train_max if fmt in addition else cfg.train_max
    tested = sorted({r["length"] for r in R.select(acc, variant=g)})
    top, gen_at = tested[-1], max([L for L in tested if L <= GENERALIZE_X * hi] or [tested[-1]])
    inside, at_gen, beyond = (R.seed_stats(list(R.per_seed(acc, "accuracy", variant=g, length=L).values()))
                              for L in (hi, gen_at, top))
    k, n, ci = seeds_generalizing(acc, g, gen_at)
    kl, _, cil = seeds_learned(acc, g, hi)
    return {"claim": claim, "setting": setting, "fmt": fmt, "variant": g, "train_max": hi, "test_max": top,
            "inside": inside, "at_generalize": at_gen, "beyond": beyond, "seeds_learned": kl, "seeds_learned_ci": cil,
            "generalize_at": gen_at, "seeds_ok": k, "seeds": n, "seeds_ok_ci": ci,
            "verdict": rule(inside["mean"], at_gen["mean"], mnemonic)}


def mass_claim(by_n, fmt, setting, cfg):
    """Claim (4) as data: the retrieving head's mass on bit i at n = train_max and at 3x (mass_rows())."""
    rows = R.select(by_n, fmt=fmt, setting=setting)
    if not rows:
        return None
    tested = sorted({r["length"] for r in rows})
    at_in = max([L for L in tested if L <= cfg.train_max] or tested[:1])
    at_out = max([L for L in tested if L <= GENERALIZE_X * cfg.train_max] or tested[-1:])
    return {"claim": "(4) step i attends to bit i", "setting": setting, "fmt": fmt, "n_inside": at_in,
            "n_beyond": at_out, "mass_inside": R.seed_stats(list(R.per_seed(rows, "mass", length=at_in).values())),
            "mass_beyond": R.seed_stats(list(R.per_seed(rows, "mass", length=at_out).values())), "verdict": "measured"}


def addition_verdict(acc, add, mnem):
    """Claim (5): add-mnemonic minus plain add at 3x the digits, paired by seed on the same sums."""
    d = [p for p in R.paired_diff_ci(acc, "accuracy", mnem["variant"], add["variant"])
         if p["length"] == mnem["generalize_at"]]
    mnem["paired_at_generalize"] = d[0] if d else None
    mnem["verdict"] = reproduced(bool(d) and d[0]["lo"] > 0) + \
        ("" if add["seeds_learned"] else " (plain add never learned the training range)")


def claims(acc, by_n, cfg, addition):
    """The paper's claims as data, one dict per (claim, setting), judged at GENERALIZE_X x the longest
    training length (the paper's 20 -> 60): ACCURACY_CLAIMS, then the attention mass of claim (4), then
    the paired addition comparison. by_n: mass_rows()."""
    out = []
    for setting in sorted({r["setting"] for r in acc}):
        made, mnemonic = {}, float("nan")  # mnemonic's accuracy at its longest n, where it ran
        for fmt, claim, rule in ACCURACY_CLAIMS:
            made[fmt] = accuracy_claim(acc, fmt, setting, claim, rule, mnemonic, cfg, addition)
            if fmt == "mnemonic" and made[fmt]:
                mnemonic = made[fmt]["beyond"]["mean"]
        out += [c for fmt, c in made.items() if c and fmt not in addition]
        out += [c for c in (mass_claim(by_n, f, setting, cfg) for f in ("scratchpad", "mnemonic")) if c]
        if made["add"] and made["add-mnemonic"]:
            addition_verdict(acc, made["add"], made["add-mnemonic"])
        out += [c for c in (made["add"], made["add-mnemonic"]) if c]
    return out


def say_claim_table(verdicts, say):
    """The accuracy claims as a markdown table: final-answer accuracy mean ± std (median) over seeds at the
    longest training n, at 3x and at the longest tested n; the seeds that learned the task and that
    generalize, with 95% Wilson intervals."""
    rows = [[c["claim"], f"`{c['fmt']}`", c["setting"], f"n = {c['train_max']}: {R.stat_text(c['inside'])}",
             f"n = {c['generalize_at']}: {R.stat_text(c['at_generalize'])}", f"n = {c['test_max']}: {R.stat_text(c['beyond'])}",
             R.count_text(c["seeds_learned"], c["seeds"], c["seeds_learned_ci"]),
             R.count_text(c["seeds_ok"], c["seeds"], c["seeds_ok_ci"]), c["verdict"]]
            for c in verdicts if "inside" in c]
    if rows:
        R.markdown_table(say, ["claim", "format", "setting", "longest training n", "at 3x", "longest n",
                               f"seeds that learned it (>= {LEARNED} at every n within training) [95% CI]",
                               f"seeds that generalize (>= {GENERALIZES} at 3x) [95% CI]", "verdict"], rows)


def claim_line(c):
    """One printed line of a claim."""
    if "mass_inside" in c:
        i, o = c["mass_inside"], c["mass_beyond"]
        return (f"  [{c['setting']}] {c['claim']}, {c['fmt']} (retrieving head, mean ± std over seeds): "
                f"n={c['n_inside']} {i['mean']:.2f} ± {i['std']:.2f}, n={c['n_beyond']} {o['mean']:.2f} ± {o['std']:.2f}")
    i, o, ci, cl = c["inside"], c["beyond"], c["seeds_ok_ci"], c["seeds_learned_ci"]
    return (f"  [{c['setting']}] {c['claim']}: {c['fmt']} n={c['train_max']} {i['mean']:.2f} ± {i['std']:.2f}, "
            f"n={c['test_max']} {o['mean']:.2f} ± {o['std']:.2f} (median {o['median']:.2f}); learned (>= {LEARNED} "
            f"at every n <= {c['train_max']}): {c['seeds_learned']}/{c['seeds']} [{cl[0]:.2f}, {cl[1]:.2f}]; "
            f"generalize (>= {GENERALIZES} at n={c['generalize_at']}): {c['seeds_ok']}/{c['seeds']} "
            f"[{ci[0]:.2f}, {ci[1]:.2f}]{paired_text(c)} -> {c['verdict']}")


def paired_text(c):
    """', minus plain add ...' for the addition claim: the paired difference at 3x with its 95% t-interval."""
    d = c.get("paired_at_generalize")
    return f"; minus plain add at n={c['generalize_at']}, paired by seed: {R.diff_text(d)} ({d['n']} seeds)" \
        if d else ""

"""Li et al. 2025's Fig. 1 on a pretrained causal language model: the attention output's std across sequences
falls with the number of tokens N the query attends to.

Li, Boduljak & Zhou, "On Vanishing Variance in Transformer Length Generalization" (arXiv 2504.02827), Fig. 1:
in Llama-3.2-1B, the std of a fixed component of the first layer's attention output, taken across many
sequences at one query position, shrinks as N grows ("even in the latest LLMs"). This script measures it in
any causal LM of the Llama layout that `transformers` loads (model.model.layers[0].self_attn.o_proj: Llama,
Mistral, Qwen2/3, ...):

  for N = 16, 32, ... up to --max-len: --samples windows of N tokens at random offsets of a text; through the
  first block only (a hook on o_proj stops the forward there); at the last position, the attention output
  before the output projection (the heads' weighted sums of values) and after it; per component, the std
  over the windows; the rows give its mean over components (comp_std) and component 0 alone (comp0_std).

The figure draws std(N) / std(16) on log-log axes with the sigma/sqrt(N) law of uniform attention over
independent values, and, on the same axes, the repository's own trained models (layer 0 of the `none`
models in --ours, mean over seeds).

The text: --text FILE, or by default this repository's .py and .md files (no download). A model folder
without a tokenizer (the tests' tiny random model) reads the text's bytes as token ids (mod the vocabulary).

Needs `pip install transformers` (an optional dependency: no other script imports it) and the model's
weights: a hub name such as meta-llama/Llama-3.2-1B (a download, and the licence the hub asks for), or a
local folder. No pretrained weights are measured in this repository's documents; the tests run the real
loading and measuring code on a tiny randomly initialised Llama built locally.

  pip install transformers
  python vanishing_variance_pretrained.py --model meta-llama/Llama-3.2-1B --device cuda   # ~1-2 min on a GPU
  python vanishing_variance_pretrained.py --plot-only out/vanishing_variance_pretrained   # redraw from rows
"""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

import common as C
import reporting as R
from cli import OneLineParser, pick_device
from faults import EXIT_USAGE, atomic_write, read_json

ROOT = Path(__file__).resolve().parent
WHERE = {"pre": "before o_proj (heads' outputs)", "post": "after o_proj"}


class Captured(Exception):
    """Raised by the hook on o_proj: the layers above the first are never run."""


def load_model(name, device):
    """(model, tokenizer or None) for a hub name or a local folder; one line if transformers is missing."""
    try:
        import transformers
    except ImportError:
        raise C.UsageError("this script needs the optional package transformers: pip install transformers") from None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).to(device).eval()
    except (OSError, ValueError) as e:
        raise C.UsageError(f"cannot load model {name!r}: {str(e).splitlines()[0][:200]}") from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a folder with weights only: the text's bytes are the tokens
    return model, tokenizer


def first_attention(model):
    """The first block's attention module (it must have o_proj, the output projection)."""
    try:
        attn = model.model.layers[0].self_attn
        attn.o_proj
    except AttributeError:
        raise C.UsageError(f"{type(model).__name__} is not of the Llama layout (model.model.layers[0].self_attn."
                           "o_proj); this script measures those") from None
    return attn


def token_stream(text, tokenizer, vocab_size):
    """The text as one long array of token ids."""
    if tokenizer is None:
        return np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64) % vocab_size
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def default_text():
    return "\n".join(p.read_text() for p in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("**/*.md")))


@torch.no_grad()
def capture(model, ids):
    """The first layer's attention output at the last position of each sequence in ids (B, N): a dict
    {'pre': (B, H*dh) input of o_proj, 'post': (B, d) its output}, both float64 on the CPU."""
    attn, out = first_attention(model), {}

    def hook(module, args, result):
        out["pre"], out["post"] = args[0][:, -1].double().cpu(), result[:, -1].double().cpu()
        raise Captured

    handle = attn.o_proj.register_forward_hook(hook)
    try:
        model(input_ids=ids)
    except Captured:
        pass
    finally:
        handle.remove()
    return out


def measure(model, stream, lengths, samples, device, seed=0, tokens_per_batch=2**16):
    """Rows {length, where, comp_std, comp0_std, n}: per component, the std across `samples` windows."""
    rng, rows = np.random.default_rng(seed), []
    for n in lengths:
        starts = rng.integers(0, len(stream) - n + 1, size=samples)
        got = {"pre": [], "post": []}
        per = max(1, tokens_per_batch // n)
        for i in range(0, samples, per):
            ids = torch.from_numpy(np.stack([stream[s:s + n] for s in starts[i:i + per]])).to(device)
            for k, v in capture(model, ids).items():
                got[k].append(v)
        for where, vs in got.items():
            v = torch.cat(vs)
            rows.append({"length": n, "where": where, "comp_std": float(v.std(0).mean()),
                         "comp0_std": float(v[:, 0].std()), "n": samples})
    return rows


def ours(folder):
    """Layer 0 of the repository's `none` models in folder: {task: [(N, mean comp_std over seeds)]}."""
    out = {}
    for p in sorted((Path(folder) / "cells").glob("*.json")):
        rec = read_json(p)
        for r in rec["rows"]:
            if r.get("table") == "probe" and r["layer"] == 0 and r["where"] == "pre" and r["variant"] == "none":
                out.setdefault(r["task"], {}).setdefault(r["length"], []).append(r["comp_std"])
    return {t: sorted((n, float(np.mean(v))) for n, v in d.items()) for t, d in out.items()}


def figure(rows, name, mine, path):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for where, style, marker in (("pre", "-", "o"), ("post", "--", "^")):
        pts = sorted((r["length"], r["comp_std"]) for r in rows if r["where"] == where)
        n, s = np.array(pts).T
        ax.plot(n, s / s[0], style, marker=marker, color="C0", label=f"{name}: {WHERE[where]}")
    for i, (task, pts) in enumerate(sorted(mine.items())):
        n, s = np.array(pts).T
        ax.plot(n, s / s[0], ":", marker="s", color=f"C{i + 1}", label=f"this repository's {task} models (none, layer 0)")
    n = np.array(sorted({r["length"] for r in rows} | {x for p in mine.values() for x, _ in p}), float)
    ax.plot(n, np.sqrt(n[0] / n), color="k", lw=1, label=r"$\sigma/\sqrt{N}$ (uniform attention)")
    ax.set(xscale="log", yscale="log", xlabel="N, tokens attended to", ylabel="std across sequences / std at the first N",
           title="First-layer attention output at the query (Li et al. Fig. 1)")
    ax.legend(fontsize=7)
    R.save_figure(fig, path)


def report(rows, meta, out, mine):
    text = [f"model {meta['model']}: first-layer attention output at the last position, std across "
            f"{rows[0]['n']} windows (mean over components; component 0)"]
    for r in rows:
        text.append(f"  N={r['length']:>6}  {r['where']:<4} comp_std {r['comp_std']:.4g}  comp0_std {r['comp0_std']:.4g}")
    for where in WHERE:
        pts = [(r["length"], r["comp_std"]) for r in rows if r["where"] == where]
        if len(pts) > 1:
            slope = np.polyfit(*np.log(np.array(pts)).T, 1)[0]
            text.append(f"log-log slope of comp_std vs N, {WHERE[where]}: {slope:+.3f} (uniform attention: -0.500)")
    print("\n".join(text))
    atomic_write(out / "summary.txt", "\n".join(text) + "\n")
    figure(rows, meta["model"], mine, out / "pretrained.png")
    print(f"rows in {out / 'results.json'} and {out / 'results.csv'}; figure {out / 'pretrained.png'}")


def main(argv=None):
    p = OneLineParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--model", help="a hub name (meta-llama/Llama-3.2-1B) or a local model folder")
    p.add_argument("--text", help="a text file to cut windows from (default: this repository's .py and .md files)")
    p.add_argument("--min-len", type=int, default=16, help="the shortest N (then doubling)")
    p.add_argument("--max-len", type=int, default=4096, help="the longest N (at most the model's context)")
    p.add_argument("--samples", type=int, default=256, help="windows per N")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--ours", default=str(ROOT / "results/vanishing_variance/quick"),
                   help="a vanishing_variance.py results folder whose none models are drawn on the same axes")
    p.add_argument("--out", default="out/vanishing_variance_pretrained")
    p.add_argument("--plot-only", metavar="DIR", help="redraw the figure and summary from DIR/results.json")
    args = p.parse_args(argv)
    try:
        run(args, p)
    except C.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def run(args, parser):
    mine = ours(args.ours) if Path(args.ours).is_dir() else {}
    if args.plot_only:
        res = read_json(Path(args.plot_only) / "results.json")
        return report(res["rows"], res["meta"], Path(args.plot_only), mine)
    C.check(args.model, "--model is needed (a hub name or a local folder), or --plot-only DIR")
    C.check(2 <= args.min_len <= args.max_len, f"--min-len {args.min_len} must be in 2..--max-len {args.max_len}")
    C.check(args.samples >= 2, f"--samples must be >= 2 (a std), got {args.samples}")
    C.check(not args.text or Path(args.text).is_file(), f"--text {args.text}: no such file")
    text = Path(args.text).read_text(errors="replace") if args.text else default_text()
    device = pick_device(args.device, C.TrainConfig())
    model, tokenizer = load_model(args.model, device)
    first_attention(model)
    context = getattr(model.config, "max_position_embeddings", args.max_len)
    stream = token_stream(text, tokenizer, model.config.vocab_size)
    lengths = [n for n in (args.min_len * 2**i for i in range(40)) if n <= min(args.max_len, context, len(stream) // 4)]
    C.check(lengths, f"the text has {len(stream)} tokens: too short for N = {args.min_len} (it needs 4 N)")
    print(f"model {args.model}: N = {', '.join(map(str, lengths))}, {args.samples} windows each, "
          f"from {len(stream):,} tokens of text")
    rows = measure(model, stream, lengths, args.samples, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "text": args.text or "the repository's .py and .md files", "tokens": len(stream)}
    atomic_write(out / "results.json", json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = io.StringIO()
    csv.DictWriter(table, fieldnames=list(rows[0])).writeheader()
    csv.DictWriter(table, fieldnames=list(rows[0])).writerows(rows)
    atomic_write(out / "results.csv", table.getvalue())
    report(rows, meta, out, mine)


if __name__ == "__main__":
    main()

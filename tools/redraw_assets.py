"""Redraw every figure under assets/ from the committed cells, with the --plot-only command the documents
name: each asset is one figure of one committed folder, as --plot-only draws it now.

  python tools/redraw_assets.py            # all of them (about 2 minutes on 2 CPU cores)
  python tools/redraw_assets.py --check    # redraw into a temporary folder and name the assets that differ
"""
from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# (committed folder, script, flags) -> {asset: the figure --plot-only writes}
ASSETS = {
    ("results/vanishing_variance/quick", "vanishing_variance", ()): {
        "vanishing_variance/variance.png": "variance.png", "vanishing_variance/accuracy.png": "accuracy.png",
        "vanishing_variance/distributions.png": "distributions.png", "vanishing_variance/shift.png": "shift.png",
        "vanishing_variance/why.png": "why.png"},
    ("results/vanishing_variance/fixes", "vanishing_variance_beyond", ("--experiment", "fixes")): {
        "vanishing_variance/ladder.png": "ladder.png", "vanishing_variance/edits.png": "edits.png",
        "vanishing_variance/accuracy_fixes.png": "accuracy.png"},
    ("results/vanishing_variance/fixes20", "vanishing_variance_beyond", ("--experiment", "fixes")): {
        "vanishing_variance/argmax_20seeds.png": "accuracy.png"},
    ("results/vanishing_variance/gap", "vanishing_variance_beyond", ("--experiment", "gap")): {
        "vanishing_variance/gap_accuracy.png": "accuracy.png"},
    ("results/vanishing_variance/ntrain_mix", "vanishing_variance_beyond", ("--experiment", "ntrain-mix")): {
        "vanishing_variance/ntrain_mix.png": "ntrain.png"},
    ("results/vanishing_variance/ntrain_log", "vanishing_variance_beyond", ("--experiment", "ntrain-log")): {
        "vanishing_variance/ntrain_log.png": "ntrain.png"},
    ("results/parity_random_access/claims", "parity_random_access", ("--experiment", "claims")): {
        "parity_random_access/claims/accuracy.png": "accuracy.png",
        "parity_random_access/claims/attention.png": "attention.png"},
    ("results/parity_random_access/depth", "parity_random_access", ("--experiment", "depth")): {
        "parity_random_access/depth/accuracy.png": "accuracy.png"},
    ("results/sparse_planted/claims", "sparse_planted", ()): {
        "sparse_planted/sparsity_vs_k.png": "sparsity_vs_k.png",
        "sparse_planted/sparsity_by_length.png": "sparsity_by_length.png",
        "sparse_planted/sparsity_mass.png": "sparsity_mass.png", "sparse_planted/variance.png": "variance.png"},
    ("results/sparse_planted/locality", "sparse_planted", ()): {"sparse_planted/locality.png": "locality.png"},
    ("results/sparse_planted/ppc16k", "sparse_planted", ()): {"sparse_planted/ppc.png": "ppc.png"},
}


def redraw(dest):
    """Draw every asset into dest (a folder laid out as assets/); returns the assets drawn."""
    from inprocess import run_main
    drawn = []
    for (folder, script, flags), figures in ASSETS.items():
        if not (ROOT / folder / "cells").is_dir():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "run"
            shutil.copytree(ROOT / folder, copy)
            p = run_main(importlib.import_module(script).SCRIPT, *flags, "--plot-only", copy)
            if p.returncode != 0:
                raise SystemExit(f"error: {script}.py --plot-only {folder} failed: {p.stderr[-500:]}")
            for asset, name in figures.items():
                (dest / asset).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(copy / name, dest / asset)
                drawn.append(asset)
        print(f"{folder}: {', '.join(figures)}")
    return drawn


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare with assets/ instead of writing there")
    args = p.parse_args()
    if not args.check:
        redraw(ROOT / "assets")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        drawn = redraw(Path(tmp))
        differ = [a for a in drawn if (Path(tmp) / a).read_bytes() != (ROOT / "assets" / a).read_bytes()]
    print(f"{len(drawn)} assets redrawn, {len(differ)} differ from assets/: {', '.join(differ) or 'none'}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

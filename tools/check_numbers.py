"""Every number in the README's results tables (and, with --docs, in the documents' tables) is printed by
the --plot-only commands its paper's document names, on the committed cells.

  python tools/check_numbers.py          # README tables: prints each row's missing numbers; exit 1 if any
  python tools/check_numbers.py --docs   # the documents' tables too

A document names its commands as `cp -r results/X /tmp/Y && python SCRIPT [--experiment E] --plot-only
/tmp/Y`; each is run here on a copy of results/X (in this process, figures included) and its printed
output kept. A number is a decimal (0.22, +0.074, -0.001), a count of seeds (9/10) or a percentage (85%),
looked up with the sign as written and whole (0.22 does not match 0.225); U+2212 is read as '-'.
"""
from __future__ import annotations

import argparse
import importlib
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

DOCS = {"Li et al.": "docs/vanishing_variance.md", "Ebrahimi et al.": "docs/parity_random_access.md",
        "Golowich et al.": "docs/sparse_planted.md"}
COMMAND = re.compile(r"cp -r (results/\S+) (/tmp/\S+) && python (\S+)\.py((?: --experiment \S+)?) --plot-only (\S+)")
NUMBER = re.compile(r"(?<![\w.])[+-]?(?:\d+\.\d+|\d+/\d+|\d+%)(?![\w.]*\d)")


def plain(text):
    return text.replace("\u2212", "-")


def commands(doc):
    """(results folder, script, extra flags) of each --plot-only command a document names, in order."""
    seen = []
    for m in COMMAND.finditer((ROOT / doc).read_text()):
        c = (m.group(1), m.group(3), m.group(4).split())
        if c not in seen:
            seen.append(c)
    return seen


def plot_only(folder, script, flags):
    """What `python SCRIPT FLAGS --plot-only <copy of folder>` prints (figures are built, not rendered:
    only the text is checked, and rendering is most of the time)."""
    import reporting as R
    from inprocess import run_main
    save, R.save_figure = R.save_figure, lambda fig, path: R.pyplot().close(fig)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "run"
            shutil.copytree(ROOT / folder, copy)
            p = run_main(importlib.import_module(script).SCRIPT, *flags, "--plot-only", copy)
    finally:
        R.save_figure = save
    if p.returncode != 0:
        raise SystemExit(f"error: {script}.py {' '.join(flags)} --plot-only {folder} failed: {p.stderr[-500:]}")
    return plain(p.stdout)


def sections(readme):
    """{paper: [table rows]} of the README's results tables, by the bold paper line above each table."""
    out, paper = {}, None
    for line in readme.splitlines():
        hit = next((k for k in DOCS if line.startswith(f"**{k}")), None)
        if hit:
            paper = hit
        elif line.startswith("## ") and paper:
            paper = None if "glance" not in line else paper
        elif paper and line.startswith("| ") and not line.startswith("| claim") and not line.startswith("|---"):
            out.setdefault(paper, []).append(line)
    return out


def doc_rows(doc):
    return [line for line in (ROOT / doc).read_text().splitlines()
            if line.startswith("| ") and not set(line) <= set("|- ")]


def missing(row, printed):
    """The numbers of a table row that the printed output does not hold."""
    gone = []
    for cell in plain(row).split("|")[2:]:  # not the first column (a claim's name, a setting)
        for n in NUMBER.findall(cell):
            if not re.search(r"(?<![\w.])" + re.escape(n) + r"(?![\d])", printed):
                gone.append(n)
    return gone


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", action="store_true", help="check the documents' tables as well")
    args = p.parse_args(argv)
    tables, bad, total = sections((ROOT / "README.md").read_text()), 0, 0
    for paper, doc in DOCS.items():
        printed = "\n".join(plot_only(*c) for c in commands(doc))
        rows = tables.get(paper, []) + (doc_rows(doc) if args.docs else [])
        for row in rows:
            gone = missing(row, printed)
            total += len(NUMBER.findall(plain(row)))
            if gone:
                bad += len(gone)
                print(f"{doc if row not in tables.get(paper, []) else 'README'}: {', '.join(gone)} not printed: "
                      f"{row[:140]}")
        print(f"{paper}: {len(rows)} rows checked against {len(commands(doc))} --plot-only commands")
    print(f"{total} numbers, {bad} not printed by the commands named")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

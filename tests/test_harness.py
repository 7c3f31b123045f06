"""harness.py on the committed results: every committed cell keeps its key under today's code."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import harness as H
import parity_random_access as P
import sparse_planted as S
import vanishing_variance as VV

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"vanishing_variance": VV.SCRIPT, "parity_random_access": P.SCRIPT, "sparse_planted": S.SCRIPT}
FOLDERS = sorted(p for p in (ROOT / "results").glob("*/*") if (p / "cells").is_dir())


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_committed_cell_is_made_again_under_its_key(folder):
    """Each committed cell, rebuilt from its own config and ids by today's config class and make_cells, gets
    the key its file is named by: a field renamed or added without late=True would orphan them all."""
    script = SCRIPTS[folder.parent.name]
    for path in sorted((folder / "cells").glob("*.json")):
        cell = json.loads(path.read_text())["cell"]
        if "weights" in cell:  # an --eval-only cell: its key names the weights it tested, not a sweep's
            continue
        ids = {k: v for k, v in cell.items() if k not in ("config", "device")}
        axes = {f: (ids[c],) for c, f in script.axes.items() if c in ids}
        cfg = replace(script.config(**cell["config"]), **axes)
        made = H.sweep_cells(script, [cfg], torch.device(cell["device"]))
        assert H.cell_key(cell) in {H.cell_key(c) for c in made}, path
        assert path.stem == H.cell_key(cell), path

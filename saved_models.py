"""saved_models.py: the trained weights a sweep saves beside each cell file (cells/<key>.pt), and what reads
them back: --eval-only's EvaluateSaved and its checks before any evaluation, and load_model(path), a
saved model on its own for your own analysis.

  save_weights        a state dict on the CPU, written atomically
  read_weights        torch.load(weights_only=True): a damaged file is one line naming it
  check_saved_models  --eval-only: each setting builds the model trained (check_same_model), each file
                      is a regular file whose tensors fit it (check_weights)
  EvaluateSaved       a saved model tested again (a cell of --eval-only)
  load_model          (model, cell record) from a cells/<key>.pt or its .json
"""
from __future__ import annotations

import functools
import io
from dataclasses import fields
from pathlib import Path

import torch

import common as C
import reporting as R
from faults import atomic_write, check_record, one_per_shape, read_json


def save_weights(model, path):
    """The trained weights (a state dict on the CPU), written atomically: a .pt file exists only whole."""
    buf = io.BytesIO()  # serialized in memory first: a full disk is then an OSError like any other write
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    atomic_write(path, functools.partial(Path.write_bytes, data=buf.getvalue()))


def read_weights(path):
    """A saved state dict; a file that cannot be read (truncated, not a model) is one line, naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, pickle errors, EOFError, ... for a damaged file
        raise C.UsageError(f"cannot read saved model {path} ({type(e).__name__}); delete it and its cell file "
                           "(the same name, .json) and re-run the sweep to train it again") from None


def check_weights(path, model, label):
    """A saved model that fits the model its cell builds: a regular file (a named pipe would block) holding a
    state dict with the same tensor names and shapes; anything else is one line naming the file."""
    again = "delete it and its cell file (the same name, .json) and re-run the sweep to train it again"
    C.check(path.is_file(), f"saved model {path} is not a regular file; {again}")
    state = read_weights(path)
    C.check(isinstance(state, dict) and all(torch.is_tensor(v) for v in state.values()),
            f"saved model {path} holds a {type(state).__name__}, not a model's state dict; {again}")
    want, have = ({k: tuple(v.shape) for k, v in s.items()} for s in (model.state_dict(), state))
    diff = [f"{k} {have.get(k, 'missing')} where the model has {want.get(k, 'none')}"
            for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    C.check(not diff, f"saved model {path} does not fit the {label} model ({'; '.join(diff[:2])}"
                      f"{f'; {len(diff) - 2} more' if len(diff) > 2 else ''}): {again}")


def check_saved_models(script, cells, originals, cell_dir):
    """--eval-only, before any evaluation: each setting builds the model that was trained (check_same_model),
    and each saved model is readable and fits it (check_weights). originals: {weights key: trained cell}."""
    for cell in one_per_shape(cells):
        check_same_model(script, cell, originals[cell["weights"]])
    for cell in cells:
        with torch.device("meta"):  # shapes only: no memory, no time
            model = script.build(cell, script.config(**cell["config"]))
        check_weights(Path(cell_dir) / f"{cell['weights']}.pt", model, R.cell_label(originals[cell["weights"]]))


def check_same_model(script, cell, original):
    """Refuse an evaluation setting that would build the model differently from the one trained (a
    larger lookup key table, a longer position table): the weights would not fit, or mean something else."""
    with torch.device("meta"):
        new, old = (script.build(c, script.config(**c["config"])) for c in (cell, original))
    diff = [f"{f.name} {getattr(old.cfg, f.name)} -> {getattr(new.cfg, f.name)}" for f in fields(old.cfg)
            if getattr(old.cfg, f.name) != getattr(new.cfg, f.name)]
    shapes_new, shapes_old = ({k: tuple(v.shape) for k, v in m.state_dict().items()} for m in (new, old))
    diff += [f"{k} {shapes_old.get(k)} -> {shapes_new.get(k)}" for k in sorted(set(shapes_new) | set(shapes_old))
             if shapes_new.get(k) != shapes_old.get(k)]
    C.check(not diff, f"--eval-only: with these settings the {R.cell_label(original)} model would be built "
                      f"differently from the one trained ({'; '.join(diff[:3])}): testing that needs new models")


class EvaluateSaved:
    """A saved model tested again (--eval-only): built from the cell's config (the original's, with
    only evaluation fields changed), loaded with the weights the cell names, evaluated. The original
    record's other fields (the training curve, ...) are carried over."""

    def __init__(self, script, cell_dir):
        self.script, self.cell_dir = script, Path(cell_dir)

    def __call__(self, cell):
        script, cfg = self.script, self.script.config(**cell["config"])
        torch.manual_seed(cell["seed"])
        model = script.build(cell, cfg)
        model.load_state_dict(read_weights(self.cell_dir / f"{cell['weights']}.pt"))
        model.to(torch.device(cell["device"]))
        original = read_json(self.cell_dir / f"{cell['weights']}.json")
        kept = {k: v for k, v in original.items() if k not in ("cell", "status", "rows", "seconds")}
        with C.matmul_precision(cfg.tf32):  # as the sweep evaluated it
            return {**kept, **script.evaluate(model, cell, cfg)}


PAPER_SCRIPTS = ("vanishing_variance", "parity_random_access", "sparse_planted")


def load_model(path, device="cpu"):
    """A saved model on its own, for your own analysis: path is a cells/<key>.pt (or the cell's .json beside
    it, which holds the ids and config that build the model). Returns (model in eval mode, cell record).
    The script is the one of PAPER_SCRIPTS whose config has the cell's fields.
        import saved_models; model, rec = saved_models.load_model("out/vanishing_variance/quick/cells/<key>.pt")
        logits, _ = model(idx, at=at)    # as the script's evaluate() calls it"""
    import importlib
    path = Path(path)
    rec = read_json(path.with_suffix(".json"))
    check_record(rec, path.with_suffix(".json"))
    cell = rec["cell"]
    scripts = [importlib.import_module(name).SCRIPT for name in PAPER_SCRIPTS]
    mine = [s for s in scripts if set(cell["config"]) <= {f.name for f in fields(s.config)} and set(s.axes) <= set(cell)]
    C.check(mine, f"{path}: a cell of none of {', '.join(PAPER_SCRIPTS)} (its config fields are not theirs)")
    script, cfg = mine[0], mine[0].config(**cell["config"])
    model = script.build(cell, cfg)
    weights = path.with_name(f"{cell['weights']}.pt") if "weights" in cell else path.with_suffix(".pt")  # --eval-only cells name theirs
    check_weights(weights, model, R.cell_label(cell))
    model.load_state_dict(read_weights(weights))
    return model.to(device).eval(), rec

"""Saved models and --eval-only: a sweep saves each cell's weights; testing them again at a length they
never saw gives the rows of a fresh run that had that length from the start; settings that would need
another model are refused before anything runs."""
import json
import os
from pathlib import Path

import torch

import harness as H
import saved_models as S
import vanishing_variance as VV
from inprocess import run_main

SMOKE = ["--preset", "smoke", "--device", "cpu", "--jobs", "1", "--seeds", "1", "--variants", "none",
         "--keep-lengths", "16"]


def vv(*args, check=True):  # python vanishing_variance.py ARGS, in this process
    p = run_main(VV.SCRIPT, *args)
    assert not check or p.returncode == 0, p.stderr[-2000:]
    return p


def cell_rows(out, eval_only):
    """Rows of the cells in out that are (or are not) --eval-only cells, without the ids that say so."""
    rows = []
    for f in (Path(out) / "cells").glob("*.json"):
        rec = json.loads(f.read_text())
        if ("weights" in rec["cell"]) == eval_only:
            rows += [{k: v for k, v in r.items() if k != "weights"} for r in rec["rows"]]
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))


def test_eval_only_at_a_new_length_equals_a_fresh_run_with_that_length(tmp_path):
    a, b = tmp_path / "trained", tmp_path / "fresh"
    vv(*SMOKE, "--test-lengths", "16,64,256", "--out", str(a))
    assert len(list((a / "cells").glob("*.pt"))) == 2  # argmax and lookup: one saved model a cell
    p = vv("--eval-only", str(a), "--test-lengths", "16,32,64,256", "--keep-lengths", "16", "--device", "cpu", "--jobs", "1")
    assert "eval-only: 2 saved model(s)" in p.stdout and "running 2" in p.stdout
    vv(*SMOKE, "--test-lengths", "16,32,64,256", "--out", str(b))
    new, fresh = cell_rows(a, eval_only=True), cell_rows(b, eval_only=False)
    assert any(r["length"] == 32 for r in new) and new == fresh  # N = 32 was never tested before
    assert cell_rows(a, eval_only=False) != fresh  # the original rows are kept apart, unchanged
    p = vv("--eval-only", str(a), "--test-lengths", "16,32,64,256", "--keep-lengths", "16", "--device", "cpu", "--jobs", "1")
    assert "2 already done, running 0" in p.stdout  # a re-run resumes


def test_a_saved_model_loads_on_its_own_with_load_model(tmp_path):
    """saved_models.load_model(path) rebuilds the cell's model from the cell file beside the weights and loads
    them: evaluated again, it gives the recorded rows; a file that is no cell of a paper script is one line."""
    vv(*SMOKE, "--tasks", "argmax", "--out", str(tmp_path))
    pt = next((tmp_path / "cells").glob("*.pt"))
    model, rec = S.load_model(pt)
    assert not model.training and H.cell_key(rec["cell"]) == pt.stem
    trained = {r["length"]: r["accuracy"] for r in rec["rows"] if r["table"] == "accuracy"}
    rows = VV.evaluate(model, rec["cell"], VV.Config(**rec["cell"]["config"]))["rows"]
    assert {r["length"]: r["accuracy"] for r in rows if r["table"] == "accuracy"} == trained
    rec["cell"]["config"]["train_min"] = 3  # a field no paper script has with these axes
    pt.with_suffix(".json").write_text(json.dumps(rec))
    try:
        S.load_model(pt)
        raise AssertionError("a foreign cell was loaded")
    except H.C.UsageError as e:
        assert "a cell of none of" in str(e)


def one_line(p, msg):
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == H.EXIT_USAGE and "Traceback" not in p.stderr and msg in last, p.stderr[-2000:]


def test_eval_only_refuses_what_would_need_new_models(tmp_path):
    vv(*SMOKE, "--out", str(tmp_path))
    one_line(vv("--eval-only", str(tmp_path), "--steps", "10", check=False), "--steps would need new models")
    # the lookup key table is sized from the longest test N: a longer one means another model
    one_line(vv("--eval-only", str(tmp_path), "--test-lengths", "16,512", "--keep-lengths", "16", check=False),
             "built differently from the one trained (wte.A.weight")
    p = vv("--eval-only", str(tmp_path), "--tasks", "argmax", "--test-lengths", "16,512", "--keep-lengths", "16",
           "--device", "cpu")  # the axes pick models: argmax has no key table, so N = 512 is fine
    assert "eval-only: 1 saved model(s)" in p.stdout
    one_line(vv("--eval-only", str(tmp_path / "nowhere"), check=False), "no such results directory")
    weights = sorted((tmp_path / "cells").glob("*.pt"))[0]
    weights.write_bytes(weights.read_bytes()[:100])  # a damaged file: found before any evaluation
    one_line(vv("--eval-only", str(tmp_path), check=False), f"cannot read saved model {weights}")
    vv(*SMOKE, "--tasks", "argmax", "--save-models", "false", "--out", str(tmp_path / "unsaved"))
    one_line(vv("--eval-only", str(tmp_path / "unsaved"), check=False), "no saved models")


def test_a_saved_model_that_does_not_fit_is_one_line_before_any_evaluation(tmp_path):
    """Another model size, a list, a named pipe (which would block a read): each named in one line, exit 2."""
    vv(*SMOKE, "--tasks", "argmax", "--out", str(tmp_path))
    weights = next((tmp_path / "cells").glob("*.pt"))
    good = weights.read_bytes()
    torch.save({k: v[..., :3] if v.dim() else v for k, v in torch.load(weights, weights_only=True).items()}, weights)
    one_line(vv("--eval-only", str(tmp_path), check=False), f"saved model {weights} does not fit")
    torch.save([1, 2], weights)
    one_line(vv("--eval-only", str(tmp_path), check=False), "holds a list, not a model's state dict")
    weights.unlink()
    os.mkfifo(weights)
    one_line(vv("--eval-only", str(tmp_path), check=False), "is not a regular file")
    weights.unlink()
    weights.write_bytes(good)
    assert vv("--eval-only", str(tmp_path), "--jobs", "1").returncode == 0


def test_a_folder_of_another_script_is_refused_up_front(tmp_path):
    import sparse_planted as S
    assert run_main(S.SCRIPT, "--preset", "smoke", "--device", "cpu", "--jobs", "1", "--studies", "fixed",
                    "--seeds", "1", "--fixed-k", "1", "--out", tmp_path).returncode == 0
    one_line(vv("--eval-only", str(tmp_path), check=False), "holds results of another script")


def test_eval_only_of_two_settings_counts_each_seed_once(tmp_path):
    """Seed 0 trained twice (40 and 80 steps) in one folder: --eval-only tests both and reports one setting."""
    for steps in ("40", "80"):
        vv(*SMOKE, "--tasks", "argmax", "--steps", steps, "--out", str(tmp_path))
    p = vv("--eval-only", str(tmp_path), "--jobs", "1")
    assert "eval-only: 2 saved model(s)" in p.stdout and "holds cells of 2 settings (steps=40" in p.stdout
    assert [line.split()[-1] for line in p.stdout.splitlines() if line.startswith("  none ")] == ["1"]  # seeds: 1

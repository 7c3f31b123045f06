"""The experiment machinery end to end, through tests/toy_experiment.py: files written, plots,
--plot-only, --shard, seed lists, and one-line errors for bad input (resume after a hard kill and --jobs:
test_cuda.py, on every device)."""
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import harness as H
import toy_experiment as T
from inprocess import run_main, with_flags

TOY = [sys.executable, str(Path(__file__).parent / "toy_experiment.py")]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run(*args, check=True, device="cpu"):
    """The toy experiment on `device` (CPU by default: these tests assert CPU behaviour, such as
    bit-identical rows across --jobs, shards and resume, which CUDA kernels do not promise)."""
    p = subprocess.run(TOY + with_flags(["--device", device], args), capture_output=True, text=True, env=ENV,
                       timeout=300)
    if check:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


def rows(out):
    return json.loads((Path(out) / "results.json").read_text())["rows"]


def test_smoke_run_writes_results_and_plots_and_plot_only_redraws(tmp_path):
    p = run("--preset", "smoke", "--out", str(tmp_path), "--jobs", "1")
    assert "device: cpu" in p.stdout and "out of distribution (OOD" in p.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    env = res["environment"]
    assert env["torch"] == torch.__version__ and res["config"]["steps"] == 30
    assert env["dtype"] == "fp32" and env["tf32"] is False and "cuda" in env  # fp32 unless asked
    assert all("dtype" not in c and "tf32" not in c for c in res["cells"])  # fp32 cells keep their keys
    acc = [r for r in res["rows"] if r["table"] == "accuracy"]
    assert sorted((r["variant"], r["seed"], r["length"]) for r in acc) == sorted(
        (v, s, L) for v in ("none", "layernorm") for s in (0, 1) for L in (8, 16, 32))
    probe = [r for r in res["rows"] if r["table"] == "probe"]
    assert len(probe) == 2 * 2 * 3 * 2 and all(r["comp_std"] > 0 and r["eff_n"] >= 1 for r in probe)
    assert (tmp_path / "results.csv").read_text().startswith("variant,seed,device,table,length")
    for png in ("accuracy.png", "variance.png"):
        assert (tmp_path / png).stat().st_size > 10_000
        (tmp_path / png).unlink()
    run("--preset", "smoke", "--plot-only", str(tmp_path))
    assert (tmp_path / "accuracy.png").exists() and (tmp_path / "variance.png").exists()


def kill_mid_sweep(args, out, device="cpu", timeout=180):
    """Start the toy sweep and SIGKILL it once two cells are saved; returns how many were."""
    p = subprocess.Popen(TOY + ["--device", device] + args + ["--out", str(out)], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and len(list((out / "cells").glob("*.json")) if (out / "cells").exists() else []) < 2:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    return len(list((out / "cells").glob("*.json")))


def test_shards_give_the_same_rows(tmp_path):
    """Two shards into one folder merge into the rows of one run (--jobs and resume: test_cuda.py, per device)."""
    run("--preset", "smoke", "--jobs", "1", "--out", str(tmp_path / "one"))
    for i in (0, 1):
        p = run("--preset", "smoke", "--jobs", "1", "--shard", f"{i}/2", "--out", str(tmp_path / "sh"))
        assert f"2 in shard {i}/2" in p.stdout
    run("--preset", "smoke", "--plot-only", str(tmp_path / "sh"))
    key = lambda r: (r["variant"], r["seed"], r["table"], r["length"], r.get("layer"), r.get("where"))
    assert sorted(rows(tmp_path / "one"), key=str) != []
    merged = H.load_results(tmp_path / "sh")
    assert sorted((r for rec in merged for r in rec["rows"]), key=key) == sorted(rows(tmp_path / "one"), key=key)


BAD = [
    (["--variants", "none,bogus"], "unknown 'bogus'"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--test-lengths", "8,-4"], "--test-lengths must be >= 1"),
    (["--pos", "learned", "--block-size", "16"], "exceeds the learned position table"),
    (["--shard", "2/2"], "--shard"),
    (["--shard", "x"], "--shard"),
    (["--jobs", "-1"], "--jobs"),
    (["--plot-only", "/nonexistent/dir"], "no such directory"),
    (["--preset", "huge"], "invalid choice"),
    (["--steps", "many"], "invalid"),
    (["--dtype", "fp16"], "unknown 'fp16'"),
    (["--seeds", "5-2"], "invalid seeds range '5-2': A-B needs 0 <= A <= B"),
    (["--seeds", "a,b"], "invalid seeds value: 'a,b'"),
    (["--seeds", "0-100000000"], "names 100,000,001 seeds; a sweep takes at most 10,000"),  # at once, no MemoryError
    (["--seeds", "1000000000"], "names 1,000,000,000 seeds"),
]
if not torch.cuda.is_available():
    BAD += [(["--device", "cuda"], "CUDA is not available"),
            (["--dtype", "bf16"], "--dtype bf16 needs a CUDA GPU"),
            (["--tf32"], "--tf32 applies to CUDA only")]


@pytest.mark.parametrize("args,msg", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(args, msg, tmp_path):
    p = run_main(T.SCRIPT, *with_flags(["--device", "cpu", "--preset", "smoke", "--out", tmp_path], args))
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and msg in p.stderr.strip().splitlines()[-1], p.stderr


def test_bad_input_from_the_command_line_is_the_same_line(tmp_path):
    """One case through a fresh process: the in-process cases above see what a user sees."""
    p = run("--preset", "smoke", "--out", str(tmp_path), "--seeds", "5-2", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "A-B needs 0 <= A <= B" in p.stderr, p.stderr


def test_corrupt_results_file_is_reported_not_raised(tmp_path):
    run("--preset", "smoke", "--seeds", "1", "--variants", "none", "--out", str(tmp_path))
    cell = next((tmp_path / "cells").glob("*.json"))
    cell.write_text(cell.read_text()[:50])  # truncated, as by a full disk
    p = run("--preset", "smoke", "--plot-only", str(tmp_path), check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "cannot read results file" in p.stderr


def test_seed_lists_and_ranges_reuse_the_cells_of_a_count(tmp_path):
    toy = functools.partial(run_main, T.SCRIPT, "--device", "cpu", "--jobs", "1", "--preset", "smoke", "--variants",
                            "none", "--out", tmp_path)
    toy("--seeds", "2")
    p = toy("--seeds", "1-3")
    assert "3 cells, 3 in shard 0/1, 1 already done, running 2" in p.stdout  # seed 1 is reused
    p = toy("--seeds", "3,0")
    assert "2 cells, 2 in shard 0/1, 2 already done, running 0" in p.stdout
    assert sorted({r["seed"] for r in rows(tmp_path)}) == [0, 3]  # results.json holds the seeds asked for

"""The device path, run on every device present: the CPU always (so CI runs it), CUDA when there is one.
Equivalences hold within a tolerance (CUDA kernels do not promise bit-identical results; the CPU tests
elsewhere assert bit-identity), fp32 is the default, bf16 autocast keeps the task's inputs and the
attention scores in fp32, a tiny model learns in fp32 and bf16, the sweep runs two cells at once and
resumes after a kill, a device error is one line, and a cell is tested again under the precision it
was tested with. Only what needs CUDA itself (TF32 kernels, GPU memory, a CUDA-vs-CPU comparison, the
bf16 command line) skips without it."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common as C
import cli
import harness as H
import saved_models as S
import toy_experiment as T
import vanishing_variance as VV
from reference import reference_forward
from test_cli import kill_mid_sweep, rows, run
from test_model import ALL, tiny
from toy_experiment import sample_batch

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
TOL = 1e-4  # fp32 with TF32 off: only the order of the float sums differs between the paths


def on(device, *args, **kw):
    m = tiny(*args, **kw).to(device)
    idx = torch.randint(0, 20, (4, 33), generator=torch.Generator().manual_seed(3)).to(device)
    return m, idx


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pos,norm", ALL)
def test_fast_path_equals_reference(pos, norm, device):
    m, idx = on(device, pos, norm)
    assert torch.allclose(m(idx)[0], reference_forward(m, idx)[0], atol=TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pos,norm", ALL)
def test_answer_only_path_equals_full_forward(pos, norm, device):
    m, idx = on(device, pos, norm)
    at = torch.tensor([[4, 32], [0, 7], [9, 9], [31, 32]], device=device)
    full, _ = m(idx)
    part, _ = m(idx, at=at)
    assert torch.allclose(part, full[torch.arange(4, device=device)[:, None], at], atol=TOL)
    assert torch.allclose(m.probe(idx, at)[0], part, atol=TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pos,norm", ALL)
def test_decode_equals_forward(pos, norm, device):
    m, idx = on(device, pos, norm)
    pid = torch.arange(33, device=device).expand(4, 33) + 5
    full, _ = m(idx, position_ids=pid)
    caches = m.new_caches(33)
    steps = [m.decode(idx[:, :6], pid[:, :6], caches)]
    steps += [m.decode(idx[:, t:t + 1], pid[:, t:t + 1], caches) for t in range(6, 33)]
    assert torch.allclose(torch.stack(steps, 1), full[:, 5:], atol=TOL)


@needs_cuda
def test_cuda_matches_cpu():
    m, idx = on("cuda", "rope", "layernorm")
    cpu = tiny("rope", "layernorm")
    assert torch.allclose(m(idx)[0].cpu(), cpu(idx.cpu())[0], atol=TOL)


def train_copy_task(device, dtype, steps=150):
    torch.manual_seed(0)
    model = C.GPT(C.GPTConfig(vocab_size=16, n_layer=1, n_head=2, n_embd=32))
    cfg = C.TrainConfig(steps=steps, batch_size=32, lr=3e-3, warmup=10, dtype=dtype)
    out = C.train(model, lambda rng, b: sample_batch(rng, b, 8), cfg, torch.device(device), data_seed=0,
                  progress=False)
    return model, out


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_model_learns_copy_last_token_in_fp32(device):
    model, out = train_copy_task(device, "fp32")
    assert out["final_loss"] < 0.1 and not torch.backends.cuda.matmul.allow_tf32  # fp32, TF32 off
    assert next(model.parameters()).dtype == torch.float32
    with C.autocast(torch.device(device)):  # fp32 by default: no autocast, float32 logits
        assert model(torch.zeros(1, 8, dtype=torch.long, device=device))[0].dtype == torch.float32
    rows_ = C.evaluate_by_length(model, sample_batch, [8, 16], 500, torch.device(device))
    assert rows_[0]["accuracy"] >= 0.99, rows_


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_model_learns_copy_last_token_in_bf16(device):
    """bf16 autocast (on CPU as on CUDA): the weights stay fp32, the matmuls run in bf16, it still learns."""
    model, out = train_copy_task(device, "bf16", steps=200)
    assert next(model.parameters()).dtype == torch.float32
    with C.autocast(torch.device(device), "bf16"):
        assert model(torch.zeros(1, 8, dtype=torch.long, device=device))[0].dtype == torch.bfloat16
    rows_ = C.evaluate_by_length(model, sample_batch, [8], 500, torch.device(device), dtype="bf16")
    assert out["final_loss"] < 0.2 and rows_[0]["accuracy"] >= 0.95, (out["final_loss"], rows_)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_keeps_argmax_priorities_and_scores_in_fp32(device):
    """The argmax priorities (a / 2^30) would merge in bf16's 8 bits: their embedding stays fp32, equal to
    the fp32 one; the attention scores are computed in fp32 from the (bf16) q and k."""
    dev = torch.device(device)
    torch.manual_seed(0)
    model = VV.build_model("argmax", "none", VV.Config()).to(dev).eval()
    idx = VV.sample_argmax(np.random.default_rng(0), 8, 64)["idx"].to(dev)
    with torch.no_grad():
        fp32 = model.wte(idx)
        with C.autocast(dev, "bf16"):
            mixed = model.wte(idx)
            q, k, _ = model.blocks[0].attn.qkv(model.blocks[0].ln_1(mixed), None)
            at = torch.full((8, 1), 64, device=dev)
            rows_ = C.attention_rows(q, k, at)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, fp32)
    assert q.dtype == torch.bfloat16 and rows_.dtype == torch.float32
    assert torch.equal(rows_, C.attention_rows(q.float(), k.float(), at))


def test_emulated_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with pytest.raises(C.UsageError, match="no native bf16"):
        cli.pick_device("cuda", C.TrainConfig(dtype="bf16"))


def close(a, b, tol=0.02):
    """Rows of two runs agree: the same keys, every number within tol (CUDA is not bit-exact)."""
    key = lambda r: (r["variant"], r["seed"], r["table"], r["length"], r.get("layer"), r.get("where"))
    a, b = sorted(a, key=key), sorted(b, key=key)
    return len(a) == len(b) and all(key(x) == key(y) and all(
        abs(x[k] - y[k]) <= tol * max(1.0, abs(x[k])) for k in x if isinstance(x[k], float)) for x, y in zip(a, b))


def same(a, b, device):
    """Rows of two runs agree: bit for bit on the CPU, within close()'s tolerance on CUDA."""
    return a == b if device == "cpu" else close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_two_cells_two_jobs_on_one_device(tmp_path, device):
    p = run("--preset", "smoke", "--jobs", "2", "--out", str(tmp_path / "two"), device=device)
    assert "running 4 with 2 job(s)" in p.stdout
    run("--preset", "smoke", "--jobs", "1", "--out", str(tmp_path / "one"), device=device)
    assert same(rows(tmp_path / "two"), rows(tmp_path / "one"), device)


@pytest.mark.parametrize("device", DEVICES)
def test_resume_after_a_kill(tmp_path, device):
    args = ["--preset", "smoke", "--seeds", "4", "--jobs", "1"]
    run(*args, "--out", str(tmp_path / "ref"), device=device)
    done = kill_mid_sweep(args, tmp_path / "killed", device=device)
    out = tmp_path / "killed"
    assert 2 <= done < 8, "the kill should land mid-sweep"
    again = run(*args, "--out", str(out), device=device)
    assert f"{done} already done, running {8 - done}" in again.stdout
    assert same(rows(out), rows(tmp_path / "ref"), device)
    again = run(*args, "--out", str(out), device=device)  # a finished sweep re-runs nothing
    assert "8 already done, running 0" in again.stdout


@needs_cuda
def test_bf16_option_runs_and_is_recorded(tmp_path):
    p = run("--preset", "smoke", "--dtype", "bf16", "--jobs", "1", "--out", str(tmp_path), device="cuda")
    assert "bfloat16" in p.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["environment"]["dtype"] == "bf16" and res["environment"]["gpus"]
    assert res["config"]["dtype"] == "bf16"
    probe = [r for r in res["rows"] if r["table"] == "probe"]
    assert probe and all(r["comp_std"] > 0 for r in probe)


# ------------------------------------------------------------------ device errors: one line, exit 3

def run_main(script, args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["toy_experiment.py", *args])
    with pytest.raises(SystemExit) as e:
        H.main(script)
    return e.value.code, capsys.readouterr()


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_out_of_memory_in_a_cell_is_one_line_and_keeps_finished_cells(tmp_path, monkeypatch, capsys, jobs):
    """Seed 1's cells raise torch.OutOfMemoryError (what a GPU that is full raises); seed 0's finish."""
    script = dataclasses.replace(T.SCRIPT, train=T.train_or_run_out_of_memory)
    code, out = run_main(script, ["--preset", "smoke", "--variants", "none", "--device", "cpu", "--jobs", jobs,
                                  "--out", str(tmp_path)], monkeypatch, capsys)
    assert code == H.EXIT_IO
    lines = [x for x in out.err.splitlines() if x.strip() and "cells:" not in x]  # the progress bar goes to stderr too
    assert len(lines) == 1 and "Traceback" not in out.err, out.err
    assert "variant=none seed=1 ran out of memory" in lines[0] and "--jobs" in lines[0]
    if jobs == "1":  # seed 0 ran first and is kept (with two jobs the failure may stop it first)
        kept = [json.loads(p.read_text())["cell"]["seed"] for p in (tmp_path / "cells").glob("*.json")]
        assert kept == [0]


# ------------------------------------------------------------------ one precision per evaluation

def test_a_saved_model_is_tested_again_under_the_tf32_setting_of_its_sweep(tmp_path):
    """The TF32 flags (settable without CUDA) are on during a tf32 cell's training and its whole evaluation,
    in the sweep and again in --eval-only, and restored after; the re-evaluated rows equal the recorded."""
    seen = []

    def evaluate(model, cell, cfg):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return T.evaluate(model, cell, cfg)
    script = dataclasses.replace(T.SCRIPT, evaluate=evaluate)
    cfg = dataclasses.replace(T.Config(), **T.PRESETS["smoke"], tf32=True)
    cell = H.make_cells(cfg, script.axes, torch.device("cpu"))[0]
    cells = tmp_path / "cells"
    cells.mkdir()
    first = H._run_and_save(H.TrainAndEvaluate(script, cells), cells, cell)  # the cell file, as a sweep writes it
    again = S.EvaluateSaved(script, cells)({**cell, "weights": H.cell_key(cell)})
    assert seen == [True, True] and not torch.backends.cuda.matmul.allow_tf32
    assert [{k: v for k, v in r.items() if k not in cell} for r in first["rows"]] == again["rows"]


@needs_cuda
def test_tf32_training_sets_and_restores_the_flags_on_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    seen = []

    def sample(rng, b):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return sample_batch(rng, b, 8)
    model = C.GPT(C.GPTConfig(vocab_size=16, n_layer=1, n_head=2, n_embd=32))
    C.train(model, sample, C.TrainConfig(steps=3, tf32=True), torch.device("cuda"), 0, progress=False)
    assert seen == [True] * 3 and not torch.backends.cuda.matmul.allow_tf32


# ------------------------------------------------------------------ calibration memory

CALIBRATION_PEAK = """
import math, resource
from dataclasses import replace
import torch
import vanishing_variance as VV, vanishing_variance_fixes as fixes
torch.set_num_threads(1)
cfg = replace(VV.Config(), **VV.PRESETS["paper"])
model = VV.build_model("lookup", "none", cfg).eval()
idx = fixes.calibration(VV.sampler("lookup", cfg), 4096, torch.device("cpu"))  # 256 x 4097 tokens
with torch.no_grad():
    model(idx[:2], at=torch.full((2, 1), 4096))  # one small forward first: the allocator and kernels
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with fixes.edited(model, math.log(4097) / math.log(17), None):
    fixes.head_std(model, idx)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_calibration_memory_is_bounded_at_n_4096():
    """The head-std calibration at N = 4096 (256 examples, as --experiment fixes at --preset paper runs it)
    raises the process's peak memory by under 256 MiB (one forward of every example took 3.1 GiB)."""
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-c", CALIBRATION_PEAK], capture_output=True, text=True, cwd=root,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert float(p.stdout.strip()) < 256, p.stdout


@needs_cuda
def test_calibration_memory_on_cuda():
    import vanishing_variance_fixes as fixes
    cfg = dataclasses.replace(VV.Config(), **VV.PRESETS["paper"])
    model = VV.build_model("lookup", "none", cfg).cuda().eval()
    idx = fixes.calibration(VV.sampler("lookup", cfg), 4096, torch.device("cuda"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fixes.head_std(model, idx)
    assert torch.cuda.max_memory_allocated() - base < 256 * 2**20

"""The CUDA path: skipped without a GPU. Equivalences hold within a tolerance here (CUDA kernels
do not promise bit-identical results, which the CPU tests assert), fp32 is the default, the bf16
option runs, a tiny model learns, and the sweep runs several cells per GPU and resumes after a kill."""
import json

import pytest
import torch

import common as C
from test_cli import kill_mid_sweep, rows, run
from test_model import ALL, tiny
from toy_experiment import sample_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
TOL = 1e-4  # fp32 with TF32 off: only the order of the float sums differs between the paths


def on_gpu(*args, **kw):
    m = tiny(*args, **kw).to(CUDA)
    idx = torch.randint(0, 20, (4, 33), generator=torch.Generator().manual_seed(3)).to(CUDA)
    return m, idx


@pytest.mark.parametrize("pos,norm", ALL)
def test_fast_path_equals_manual_path(pos, norm):
    m, idx = on_gpu(pos, norm)
    assert torch.allclose(m(idx)[0], m(idx, manual=True)[0], atol=TOL)


@pytest.mark.parametrize("pos,norm", ALL)
def test_answer_only_path_equals_full_forward(pos, norm):
    m, idx = on_gpu(pos, norm)
    at = torch.tensor([[4, 32], [0, 7], [9, 9], [31, 32]], device=CUDA)
    full, _ = m(idx)
    part, _ = m(idx, at=at)
    assert torch.allclose(part, full[torch.arange(4, device=CUDA)[:, None], at], atol=TOL)
    assert torch.allclose(m.probe(idx, at)[0], part, atol=TOL)


@pytest.mark.parametrize("pos,norm", ALL)
def test_decode_equals_forward(pos, norm):
    m, idx = on_gpu(pos, norm)
    pid = torch.arange(33, device=CUDA).expand(4, 33) + 5
    full, _ = m(idx, position_ids=pid)
    caches = m.new_caches(33)
    steps = [m.decode(idx[:, :6], pid[:, :6], caches)]
    steps += [m.decode(idx[:, t:t + 1], pid[:, t:t + 1], caches) for t in range(6, 33)]
    assert torch.allclose(torch.stack(steps, 1), full[:, 5:], atol=TOL)


def test_cuda_matches_cpu():
    m, idx = on_gpu("rope", "layernorm")
    cpu = tiny("rope", "layernorm")
    assert torch.allclose(m(idx)[0].cpu(), cpu(idx.cpu())[0], atol=TOL)


def test_tiny_model_learns_copy_last_token_on_cuda_in_fp32():
    C.set_precision()
    torch.manual_seed(0)
    model = C.GPT(C.GPTConfig(vocab_size=16, n_layer=1, n_head=2, n_embd=32))
    cfg = C.TrainConfig(steps=150, batch_size=32, lr=3e-3, warmup=10)
    out = C.train(model, lambda rng, b: sample_batch(rng, b, 8), cfg, CUDA, data_seed=0, progress=False)
    assert not out["diverged"] and not torch.backends.cuda.matmul.allow_tf32
    assert next(model.parameters()).dtype == torch.float32
    with C.autocast(CUDA):  # fp32 by default: no autocast, float32 logits
        assert model(torch.zeros(1, 8, dtype=torch.long, device=CUDA))[0].dtype == torch.float32
    rows_ = C.evaluate_by_length(model, sample_batch, [8, 16], 500, CUDA)
    assert rows_[0]["accuracy"] >= 0.99, rows_


def test_bf16_option_runs_and_is_recorded(tmp_path):
    p = run("--preset", "smoke", "--dtype", "bf16", "--jobs", "1", "--out", str(tmp_path), device="cuda")
    assert "bfloat16" in p.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["environment"]["dtype"] == "bf16" and res["environment"]["gpus"]
    assert all(c.get("dtype") == "bf16" for c in res["cells"])
    probe = [r for r in res["rows"] if r["table"] == "probe"]
    assert probe and all(r["comp_std"] > 0 for r in probe)


def close(a, b, tol=0.02):
    """Rows of two runs agree: the same keys, every number within tol (CUDA is not bit-exact)."""
    key = lambda r: (r["variant"], r["seed"], r["table"], r["length"], r.get("layer"), r.get("where"))
    a, b = sorted(a, key=key), sorted(b, key=key)
    return len(a) == len(b) and all(key(x) == key(y) and all(
        abs(x[k] - y[k]) <= tol * max(1.0, abs(x[k])) for k in x if isinstance(x[k], float)) for x, y in zip(a, b))


def test_two_cells_two_jobs_on_one_gpu(tmp_path):
    p = run("--preset", "smoke", "--seeds", "1", "--jobs", "2", "--out", str(tmp_path / "two"), device="cuda")
    assert "running 2 with 2 job(s)" in p.stdout
    run("--preset", "smoke", "--seeds", "1", "--jobs", "1", "--out", str(tmp_path / "one"), device="cuda")
    assert close(rows(tmp_path / "two"), rows(tmp_path / "one"))


def test_resume_after_a_kill_on_cuda(tmp_path):
    args = ["--preset", "smoke", "--seeds", "4", "--jobs", "1"]
    run(*args, "--out", str(tmp_path / "ref"), device="cuda")
    done = kill_mid_sweep(args, tmp_path / "killed", device="cuda")
    out = tmp_path / "killed"
    assert 2 <= done < 8, "the kill should land mid-sweep"
    again = run(*args, "--out", str(out), device="cuda")
    assert f"{done} already done, running {8 - done}" in again.stdout
    assert close(rows(out), rows(tmp_path / "ref"))

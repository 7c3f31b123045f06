"""vanishing_variance_pretrained.py (Li et al.'s Fig. 1 on a pretrained LM) on a tiny randomly initialised
Llama built here (no download): the captured first-layer attention output equals the one recomputed by
hand, the script writes its rows, summary and figure and redraws them, and without transformers it is one line."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vanishing_variance_pretrained as P

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def by_hand(model, ids):
    """The first layer's attention output at the last position: RMSNorm, q/k/v, RoPE, causal softmax,
    grouped key/value heads, written out."""
    layer, B, N = model.model.layers[0], *ids.shape
    attn, cfg = layer.self_attn, model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    dh = cfg.hidden_size // H
    x = model.model.embed_tokens(ids)
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(B, N, H, dh).transpose(1, 2)
    k = attn.k_proj(h).view(B, N, KV, dh).transpose(1, 2).repeat_interleave(H // KV, dim=1)
    v = attn.v_proj(h).view(B, N, KV, dh).transpose(1, 2).repeat_interleave(H // KV, dim=1)
    cos, sin = model.model.rotary_emb(x, torch.arange(N)[None])  # (1, N, dh)

    def rope(t):
        half = torch.cat([-t[..., dh // 2:], t[..., :dh // 2]], -1)
        return t * cos[:, None] + half * sin[:, None]
    s = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(dh)
    s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    out = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, H * dh)[:, -1]
    return out, attn.o_proj(out)


def test_the_captured_output_is_the_attention_output(tiny):
    model, tokenizer = P.load_model(str(tiny), torch.device("cpu"))
    assert tokenizer is None  # weights only: the text's bytes are the tokens
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    got = P.capture(model, ids)
    with torch.no_grad():
        pre, post = by_hand(model, ids)
    torch.testing.assert_close(got["pre"], pre.double(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["post"], post.double(), atol=1e-5, rtol=1e-4)


def test_the_script_writes_rows_summary_and_figure_and_redraws(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    P.main(["--model", str(tiny), "--max-len", "64", "--samples", "8", "--device", "cpu", "--out", str(out)])
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["length"], r["where"]) for r in rows] == [(n, w) for n in (16, 32, 64) for w in ("pre", "post")]
    assert all(r["comp_std"] > 0 and r["n"] == 8 for r in rows)
    assert (out / "results.csv").read_text().count("\n") == len(rows) + 1
    (out / "pretrained.png").unlink()
    P.main(["--plot-only", str(out)])
    assert (out / "pretrained.png").exists() and "log-log slope" in (out / "summary.txt").read_text()


def test_without_transformers_or_a_model_it_is_one_line(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        P.main(["--model", str(tmp_path / "none-here"), "--device", "cpu", "--out", str(tmp_path)])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: cannot load model")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    with pytest.raises(SystemExit) as e:
        P.main(["--model", "meta-llama/Llama-3.2-1B", "--device", "cpu", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "pip install transformers" in err


def test_no_other_script_imports_transformers():
    code = ("import sys, vanishing_variance, vanishing_variance_beyond, parity_random_access, sparse_planted, bench; "
            "assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)

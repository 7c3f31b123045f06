"""The model: causality, fast == manual attention, position ids, probes, the variance law."""
import itertools
import math

import numpy as np
import pytest
import torch

import common as C
import vanishing_variance_fixes as fixes
from reference import reference_forward, reference_maps

VARIANTS = C.ATTN_OUT_NORMS + fixes.FIXES  # every attention variant: common's norms and the fix ladder's
ALL = list(itertools.product(C.POS_ENCODINGS, VARIANTS))


def tiny(pos="none", norm="none", seed=0, **kw):
    """A small random model; `norm` names any attention variant (a common.GPT norm or a fix)."""
    torch.manual_seed(seed)
    cfg = {**dict(vocab_size=20, block_size=64, n_layer=2, n_head=2, n_embd=16, pos=pos), **kw}
    if norm in fixes.FIXES:
        m = fixes.FixGPT(fixes.FixConfig(**cfg, fix=norm, n_train=8)).eval()
    else:
        m = C.GPT(C.GPTConfig(**cfg, attn_out_norm=norm)).eval()
    with torch.no_grad():  # sharper attention than at init, so position effects are far above float noise
        for b in m.blocks:
            b.attn.c_attn.weight[:32] *= 20
    return m


def forward_of(manual):
    def fused(m, idx):
        return m(idx)
    return reference_forward if manual else fused


@pytest.mark.parametrize("manual", [False, True], ids=["sdpa", "reference"])
@pytest.mark.parametrize("pos,norm", ALL)
def test_no_causal_leak(pos, norm, manual):
    m, forward = tiny(pos, norm), forward_of(manual)
    idx = torch.randint(0, 20, (3, 12), generator=torch.Generator().manual_seed(1))
    base, _ = forward(m, idx)
    for t in (0, 5, 11):
        idx2 = idx.clone()
        idx2[:, t] = (idx2[:, t] + 1) % 20
        new, _ = forward(m, idx2)
        assert torch.allclose(base[:, :t], new[:, :t], atol=1e-6), f"token {t} leaked into earlier logits"
        assert not torch.allclose(base[:, t], new[:, t]), "a changed token must change its own logits"


@pytest.mark.parametrize("pos,norm", ALL)
def test_fast_path_equals_manual_path(pos, norm):
    m = tiny(pos, norm)
    idx = torch.randint(0, 20, (4, 33))
    fast, _ = m(idx)
    slow, _ = reference_forward(m, idx)
    assert torch.allclose(fast, slow, atol=1e-5)


@pytest.mark.parametrize("pos,norm", ALL)
def test_answer_positions_only_path_equals_full_forward_and_does_not_leak(pos, norm):
    """With `at`, the last block runs for the answer queries alone; it must agree with the full
    forward, in the logits and in the gradients, and never see tokens after `at`."""
    m = tiny(pos, norm)
    idx = torch.randint(0, 20, (3, 14), generator=torch.Generator().manual_seed(2))
    at = torch.tensor([[4, 13], [0, 7], [9, 9]])
    rows = torch.arange(3)[:, None]
    full, _ = m(idx)
    part, _ = m(idx, at=at)
    assert torch.allclose(part, full[rows, at], atol=1e-5)
    assert torch.allclose(m.probe(idx, at)[0], part, atol=1e-6)
    targets = torch.tensor([[1, 2], [3, -1]])  # examples 0 and 1: distinct answer positions
    dense = targets.new_full((2, 14), -1).scatter(1, at[:2], targets)  # the same labels, (B, T)
    grads = []
    for kw in (dict(targets=targets, at=at[:2]), dict(targets=dense)):
        m.zero_grad()
        m(idx[:2], **kw)[1].backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))
    later = idx.clone()
    later[0, 5:] = (later[0, 5:] + 1) % 20  # tokens after position 4 change
    assert torch.allclose(m(later, at=at)[0][0, 0], part[0, 0], atol=1e-6)
    assert not torch.allclose(m(later, at=at)[0][0, 1], part[0, 1], atol=1e-6)


@pytest.mark.parametrize("pos,norm", ALL)
def test_kv_cache_decoding_equals_the_full_forward(pos, norm):
    m = tiny(pos, norm)
    idx = torch.randint(0, 20, (3, 16), generator=torch.Generator().manual_seed(2))
    pid = torch.arange(16).expand(3, 16) + 7  # offset positions: the cache must use the ids it is given
    full, _ = m(idx, position_ids=pid)
    caches = m.new_caches(16)
    steps = [m.decode(idx[:, :5], pid[:, :5], caches)]  # the prompt in one pass, then token by token
    steps += [m.decode(idx[:, t:t + 1], pid[:, t:t + 1], caches) for t in range(5, 16)]
    assert torch.allclose(torch.stack(steps, 1), full[:, 4:], atol=1e-5)
    with pytest.raises(C.UsageError):
        m.decode(idx[:, :2], pid[:, :2], caches)  # after the prompt: one token at a time
    with pytest.raises(C.UsageError, match="holds 16 positions"):
        m.decode(idx[:, :1], pid[:, :1], caches)  # the preallocated cache is full


def test_default_position_ids_equal_explicit_arange():
    idx = torch.randint(0, 20, (2, 10))
    ids = torch.arange(10).expand(2, 10)
    for pos in C.POS_ENCODINGS:
        m = tiny(pos)
        assert torch.allclose(m(idx)[0], m(idx, position_ids=ids)[0], atol=1e-6)


def test_position_ids_are_honoured():
    idx = torch.randint(0, 20, (2, 10))
    ids = torch.arange(10).expand(2, 10)
    coupled = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4]).expand(2, 10)  # two tokens share each id
    for pos in ("learned", "rope"):
        m = tiny(pos)
        assert not torch.allclose(m(idx, position_ids=ids)[0], m(idx, position_ids=coupled)[0], atol=1e-4)
    # NoPE ignores ids; RoPE sees only differences (a start offset changes nothing); learned sees absolutes
    nope, rope, learned = tiny("none"), tiny("rope"), tiny("learned")
    assert torch.allclose(nope(idx, position_ids=coupled)[0], nope(idx)[0], atol=1e-6)
    assert torch.allclose(rope(idx, position_ids=ids + 37)[0], rope(idx)[0], atol=1e-4)
    assert not torch.allclose(learned(idx, position_ids=ids + 37)[0], learned(idx)[0], atol=1e-4)


def test_learned_table_overflow_is_a_usage_error():
    m = tiny("learned", block_size=16)
    with pytest.raises(C.UsageError, match="beyond the learned position table"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(C.UsageError):
        m(torch.zeros(1, 4, dtype=torch.long), position_ids=torch.tensor([[0, 1, 2, 16]]))


def test_logits_at_and_masked_loss():
    m = tiny("rope")
    idx = torch.randint(0, 20, (3, 9))
    full, _ = m(idx)
    at = torch.tensor([[8], [4], [0]])
    part, _ = m(idx, at=at)
    assert torch.allclose(part[:, 0], full[torch.arange(3), at[:, 0]], atol=1e-6)
    targets = torch.full((3, 9), -1)
    targets[:, 3] = 5
    _, loss = m(idx, targets)
    ref = torch.nn.functional.cross_entropy(full[:, 3], torch.full((3,), 5))
    assert torch.allclose(loss, ref, atol=1e-5)


@pytest.mark.parametrize("pos,norm", [("rope", "layernorm"), ("none", "standardize"), ("learned", "none")])
def test_probe_matches_manual_attention(pos, norm):
    m = tiny(pos, norm)
    with torch.no_grad():  # outputs of O(1), far above LayerNorm's eps = 1e-5 (at init they are ~1e-5)
        m.blocks[0].attn.c_proj.weight *= 100
    idx = torch.randint(0, 20, (2, 15))
    at = torch.tensor([[3, 14], [7, 9]])
    logits, recs = m.probe(idx, at)
    maps = reference_maps(m, idx)
    assert torch.allclose(logits, m(idx, at=at)[0], atol=1e-6)
    for r, full in zip(recs, maps):
        rows = full[torch.arange(2)[:, None], :, at].transpose(1, 2)  # (B, nh, P, T)
        assert torch.allclose(r["attn"], rows, atol=1e-5)
        assert r["pre"].shape == r["post"].shape == (2, 2, 16)
        future = torch.arange(15)[None, None, None, :] > at[:, None, :, None]
        assert float(r["attn"].masked_select(future.expand_as(r["attn"])).abs().max()) == 0.0
    if norm == "standardize":  # no affine: each probed vector has mean 0 and variance 1
        post = recs[0]["post"]
        assert torch.allclose(post.mean(-1), torch.zeros(2, 2), atol=1e-5)
        assert torch.allclose(post.var(-1, unbiased=False), torch.ones(2, 2), atol=1e-3)


def test_uniform_attention_variance_is_sigma2_over_n():
    """With W_q = W_k = 0 attention is uniform over the prefix; with W_v = W_O = I the output at
    position N-1 is the mean of N i.i.d. vectors, so each component's variance is sigma^2 / N."""
    torch.manual_seed(0)
    V, Cd = 4096, 32
    m = C.GPT(C.GPTConfig(vocab_size=V, block_size=8, n_layer=1, n_head=1, n_embd=Cd, mlp=False)).eval()
    with torch.no_grad():
        w = m.blocks[0].attn.c_attn.weight  # (3C, C): q, k, v stacked
        w.zero_()
        w[2 * Cd:] = torch.eye(Cd)
        m.blocks[0].attn.c_attn.bias.zero_()
        m.blocks[0].attn.c_proj.weight.copy_(torch.eye(Cd))
        m.blocks[0].attn.c_proj.bias.zero_()
        sigma2 = float(m.blocks[0].ln_1(m.wte.weight).var(0).mean())  # per-component variance of values
    gen = torch.Generator().manual_seed(1)
    stds = {}
    for N in (16, 64, 256):
        idx = torch.stack([torch.randperm(V, generator=gen)[:N] for _ in range(3000)])  # distinct tokens
        _, recs = m.probe(idx, torch.full((3000, 1), N - 1))
        stats = C.probe_stats(recs[0]["pre"][:, 0])
        assert abs(stats["comp_std"] ** 2 * N / sigma2 - 1) < 0.1, (N, stats)
        assert abs(float(recs[0]["attn"][0, 0, 0, 0]) - 1 / N) < 1e-6  # uniform weights
        stds[N] = stats["comp_std"]
    slope = np.polyfit(np.log(list(stds)), np.log(list(stds.values())), 1)[0]
    assert abs(slope + 0.5) < 0.05
    assert math.isclose(float(recs[0]["attn"][0, 0, 0].sum()), 1.0, rel_tol=1e-5)


def test_bad_model_config_is_a_usage_error():
    with pytest.raises(C.UsageError, match="unknown positional encoding"):
        C.GPT(C.GPTConfig(pos="alibi"))
    with pytest.raises(C.UsageError, match="attn_out_norm"):
        C.GPT(C.GPTConfig(attn_out_norm="rmsnorm"))
    with pytest.raises(C.UsageError, match="divisible"):
        C.GPT(C.GPTConfig(n_embd=30, n_head=4))

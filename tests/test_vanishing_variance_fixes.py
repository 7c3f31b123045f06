"""The fix ladder's attention variants (vanishing_variance_fixes.py): each against its definition."""
import math

import pytest
import torch

import common as C
import vanishing_variance as VV
import vanishing_variance_fixes as fixes
from reference import reference_forward


def one_layer(fix=None):
    torch.manual_seed(0)
    shape = dict(vocab_size=20, n_layer=1, n_head=2, n_embd=16)
    m = (C.GPT(C.GPTConfig(**shape)) if fix is None else fixes.FixGPT(fixes.FixConfig(**shape, fix=fix, n_train=8))).eval()
    with torch.no_grad():
        m.blocks[0].attn.c_attn.weight[:32] *= 20
    return m


def test_bad_fix_config_is_a_usage_error():
    with pytest.raises(C.UsageError, match="unknown fix"):
        fixes.FixGPT(fixes.FixConfig(fix="sparsemax"))
    with pytest.raises(C.UsageError, match="n_train >= 2"):
        fixes.FixGPT(fixes.FixConfig(fix="ssmax"))


def test_ssmax_with_s_log_n_one_is_plain_softmax_and_n_counts_the_keys_of_each_query():
    """At query position i the query sees n = i + 1 keys: with s = 1 / log(i + 1), SSMax there equals
    plain softmax, and it does not at other positions (n is not the sequence length)."""
    plain, ss = one_layer(), one_layer("ssmax")
    ss.load_state_dict({**plain.state_dict(), "blocks.0.attn.ssmax_s": ss.blocks[0].attn.ssmax_s}, strict=True)
    idx = torch.randint(0, 20, (3, 12), generator=torch.Generator().manual_seed(4))
    ref, _ = plain(idx)
    for i in (3, 6, 11):
        with torch.no_grad():
            ss.blocks[0].attn.ssmax_s.fill_(1 / math.log(i + 1))
        out, _ = ss(idx)
        assert torch.allclose(out[:, i], ref[:, i], atol=1e-5)
        assert not torch.allclose(out[:, i - 2], ref[:, i - 2], atol=1e-3)
    fresh = one_layer("ssmax")
    assert torch.allclose(fresh.blocks[0].attn.ssmax_s, torch.full((2,), 1 / math.log(8)))  # starts at n_train


def test_logn_scales_only_at_inference_and_only_beyond_n_train():
    plain, ln = one_layer(), one_layer("logn")
    ln.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 20, (3, 14), generator=torch.Generator().manual_seed(5))
    ref, out = plain(idx)[0], ln(idx)[0]
    assert torch.allclose(out[:, :8], ref[:, :8], atol=1e-6)  # n <= n_train = 8: factor 1
    assert not torch.allclose(out[:, 8:], ref[:, 8:], atol=1e-3)
    ln.train(), plain.train()
    assert torch.allclose(ln(idx)[0], plain(idx)[0], atol=1e-6)  # training is unchanged


def keep_input(seen, module, args):
    seen.append(args[0])


def test_headnorm_standardizes_each_head_before_w_o():
    m = one_layer("headnorm")
    with torch.no_grad():  # head outputs far above the norm's eps = 1e-5
        m.blocks[0].attn.c_attn.weight[32:] *= 100
    seen = []
    m.blocks[0].attn.c_proj.register_forward_pre_hook(lambda mod, args: keep_input(seen, mod, args))
    m(torch.randint(0, 20, (3, 10)))
    heads = seen[0].view(3, 10, 2, 8)  # (B, T, nh, hs): the W_O input, heads side by side
    assert torch.allclose(heads.mean(-1), torch.zeros(3, 10, 2), atol=1e-5)
    assert torch.allclose(heads.var(-1, unbiased=False), torch.ones(3, 10, 2), atol=1e-3)


def test_a_gate_fixed_at_one_is_the_baseline():
    plain, gated = one_layer(), one_layer("gate")
    state = plain.state_dict()
    state.update({"blocks.0.attn.gate.weight": torch.zeros(2, 16), "blocks.0.attn.gate.bias": torch.full((2,), 1e4)})
    gated.load_state_dict(state)
    idx = torch.randint(0, 20, (3, 10))
    assert torch.allclose(gated(idx)[0], plain(idx)[0], atol=1e-6)
    with torch.no_grad():
        gated.blocks[0].attn.gate.bias.fill_(0.0)  # gates of 1/2: another model
    assert not torch.allclose(gated(idx)[0], plain(idx)[0], atol=1e-4)


def test_a_fix_model_draws_the_same_shared_weights_as_the_plain_model():
    """The fix's own parameters come after the plain ones in each block: with one seed, every shared
    parameter of a headnorm model equals the plain model's (nothing extra is drawn)."""
    plain, fixed = one_layer(), one_layer("headnorm")
    assert all(torch.equal(p, fixed.state_dict()[k]) for k, p in plain.state_dict().items())


# ------------------------------------------------------------------ test-time edits (--experiment fixes)

def one_block(task="lookup", seed=0):
    torch.manual_seed(seed)
    cfg = VV.Config(n_layer=1, test_lengths=(16, 64))
    model = VV.build_model(task, "none", cfg).eval()
    with torch.no_grad():  # a trained model's attention is not uniform: make the logits matter
        model.blocks[0].attn.c_attn.weight.mul_(20)
    return model, fixes.calibration(VV.sampler(task, cfg), 64, torch.device("cpu"))


def answer(model, idx):
    return model(idx, at=torch.full((idx.size(0), 1), idx.size(1) - 1))[0]


def test_sharpen_edit_equals_scaling_the_query_weights():
    """One block read at the query: q times s at the query alone == q times s everywhere (only the
    query's row reaches the answer), which is W_q, b_q times s."""
    model, idx = one_block()
    with fixes.edited(model, sharpen=2.5):
        edited = answer(model, idx)
    plain = answer(model, idx)
    C = model.cfg.n_embd
    with torch.no_grad():
        model.blocks[0].attn.c_attn.weight[:C] *= 2.5
        model.blocks[0].attn.c_attn.bias[:C] *= 2.5
    assert (edited - plain).abs().max() > 1e-3  # the edit does something
    assert torch.allclose(edited, answer(model, idx), atol=1e-5)


def test_scale_edit_equals_scaling_w_o_columns():
    model, idx = one_block(seed=1)
    factors = torch.tensor([[0.5, 2.0, 1.0, 3.0]])
    with fixes.edited(model, head_scale=factors):
        edited = answer(model, idx)
    hs = model.cfg.n_embd // model.cfg.n_head
    with torch.no_grad():
        model.blocks[0].attn.c_proj.weight.mul_(factors[0].repeat_interleave(hs)[None, :])  # column block h
    assert torch.allclose(edited, answer(model, idx), atol=1e-5)


def test_edits_are_removed_on_exit_and_identity_at_one():
    model, idx = one_block(seed=2)
    before = answer(model, idx)
    with fixes.edited(model, 1.0, torch.ones(1, 4)):
        assert torch.equal(answer(model, idx), before)
    with fixes.edited(model, 3.0, torch.full((1, 4), 2.0)):
        assert not torch.allclose(answer(model, idx), before)
    assert torch.equal(answer(model, idx), before)


def test_restore_scale_brings_every_block_back_to_the_reference():
    """Two blocks: block 1's factors are measured after block 0 is rescaled, so both match."""
    torch.manual_seed(0)
    cfg = VV.Config(test_lengths=(16, 256))
    model = VV.build_model("lookup", "none", cfg).eval()
    sample = VV.sampler("lookup", cfg)
    ref = fixes.head_std(model, fixes.calibration(sample, 16, torch.device("cpu")))
    idx = fixes.calibration(sample, 256, torch.device("cpu"))
    assert (fixes.head_std(model, idx) < 0.8 * ref).all()  # the heads' outputs shrink with N
    for sharpen in (1.0, 2.0):
        scale = fixes.restore_scale(model, ref, idx, sharpen)
        with fixes.edited(model, sharpen, scale):
            assert torch.allclose(fixes.head_std(model, idx), ref, rtol=1e-4)


def test_head_std_oracle():
    """head_std == the std over examples of each head's slice of W_O's input at the query, recomputed
    by the reference path."""
    model, idx = one_block(seed=3)
    seen = {}
    h = model.blocks[0].attn.c_proj.register_forward_hook(lambda m, a, o: seen.setdefault("y", a[0]))
    reference_forward(model, idx)
    h.remove()
    y = seen["y"][:, -1].double().view(idx.size(0), 4, -1)  # (B, nh, hs)
    assert torch.allclose(fixes.head_std(model, idx)[0].double(), y.var(0).mean(-1).sqrt(), rtol=1e-4)

"""vanishing_variance_fixes.py: beyond Li et al. 2025, the fix ladder and the test-time edits.

Is the failure at long N one of *scale* (each head's output shrinks, the paper's account) or of
*selection* (the query's attention spreads over more items)? Two tools, built by vanishing_variance.py
and run by `python vanishing_variance_beyond.py --experiment fixes`:

  the fix ladder   FixGPT: common.GPT whose attention (FixAttention) has one change, retrained per
                   seed. Output side, per head before W_O:
                     headnorm  each head's output standardized over its channels (AVNorm, 2025)
                     gate      each head's output times sigmoid(W_g x + b_g)_h (gated attention,
                               Qiu et al. 2025)
                   logit side, softmax(f * q k^T / sqrt(hs)) with n = the keys a query sees:
                     ssmax     f = s_h log n, s_h learned per head (Scalable-Softmax, Nakanishi 2025)
                     logn      f = max(1, log n / log n_train) at inference only (long-context LLMs)
  test-time edits  edited(): no retraining; at the query, restore each head's output scale to its
                   training-length std (scale), sharpen the logits by log N / log N_train (select), or
                   both. The factors are measured on unlabeled inputs (calibration()), never on the
                   test set.

Read vanishing_variance.py first: this module only adds these two tools.
"""
import contextlib
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C

FIXES = ("headnorm", "gate", "ssmax", "logn")
EDITS = ("scale", "select", "both")  # test-time edits of trained `none` models
CAL_SEED, CAL_EXAMPLES = 54_321, 256  # unlabeled inputs on which head stds are measured, apart from the test set
CAL_TOKENS = 2**16  # tokens per calibration forward: its memory is one test batch's at any N


@dataclass
class FixConfig(C.GPTConfig):
    fix: str = "headnorm"  # one of FIXES
    n_train: int = 0       # tokens of the longest training sequence: logn's reference length, and
                           # SSMax's start (s = 1 / log n_train: plain softmax at that length)


class FixAttention(C.CausalSelfAttention):
    """CausalSelfAttention with one fix: a factor on q per head and query (ssmax, logn), or a change of
    each head's output before W_O (headnorm, gate)."""
    start = 0  # the position of x's first token: 0, or while decoding the number of tokens already cached

    def __init__(self, cfg: FixConfig):
        super().__init__(cfg)
        if cfg.fix == "ssmax":  # s_h, one per head, starting where s log n_train = 1
            self.ssmax_s = nn.Parameter(torch.full((cfg.n_head,), 1 / math.log(cfg.n_train)))
        if cfg.fix == "gate":  # from the attention input (after ln_1), one gate per head
            self.gate = nn.Linear(cfg.n_embd, cfg.n_head)

    def qkv(self, x, rope):
        q, k, v = super().qkv(x, rope)
        scale = self.query_scale(x.size(1), self.start, x.device)
        return (q if scale is None else q * scale.to(q.dtype)), k, v

    def decode(self, x, rope, cache):
        self.start = cache.n  # the new queries see cache.n more keys than their index says
        try:
            return super().decode(x, rope, cache)
        finally:
            self.start = 0

    def query_scale(self, T, start, device):
        """(nh or 1, T, 1) factors on q, or None (plain softmax: headnorm, gate, logn in training)."""
        fix = self.cfg.fix
        if fix not in ("ssmax", "logn") or (fix == "logn" and self.training):
            return None
        log_n = torch.arange(start + 1, start + T + 1, device=device, dtype=torch.float32).log()  # (T,)
        if fix == "ssmax":
            return (self.ssmax_s[:, None] * log_n)[:, :, None]  # (nh, T, 1)
        return (log_n / math.log(self.cfg.n_train)).clamp_min(1.0)[None, :, None]  # (1, T, 1)

    def out(self, y, x):
        if self.cfg.fix == "headnorm":
            y = F.layer_norm(y, (y.size(-1),))
        elif self.cfg.fix == "gate":  # x: the input at the queries y belongs to
            y = y * torch.sigmoid(self.gate(x)).transpose(1, 2)[..., None]  # (B, nh, T, 1) gates
        return super().out(y, x)


class FixGPT(C.GPT):
    Attention = FixAttention

    def __init__(self, cfg: FixConfig):
        C.check(cfg.fix in FIXES, f"unknown fix {cfg.fix!r}; choose from {FIXES}")
        C.check(cfg.fix not in ("ssmax", "logn") or cfg.n_train >= 2,
                f"{cfg.fix} needs n_train >= 2 (the training sequence length in tokens)")
        super().__init__(cfg)


# ---------------------------------------------------------------------------------------- test-time edits

def calibration(sample, length, device):
    """CAL_EXAMPLES unlabeled inputs (B, N+1) at `length`, drawn apart from the test set."""
    return sample(np.random.default_rng(CAL_SEED + length), CAL_EXAMPLES, length)["idx"].to(device)


def _sharpen_query(factor, module, args, qkv):
    """Forward hook on c_attn: q of the last token (the query) times factor. qkv (B, T, 3C), q first."""
    qkv = qkv.clone()
    qkv[:, -1, :qkv.size(-1) // 3] *= factor
    return qkv


def _scale_heads(factors, module, args):
    """Forward pre-hook on c_proj (W_O): head h's output at the last token times factors[h]."""
    y = args[0].clone()  # (B, T, C): heads side by side
    B, C = y.size(0), y.size(-1)
    y[:, -1] = (y[:, -1].view(B, len(factors), C // len(factors)) * factors[:, None]).view(B, C)  # (B, nh, hs)
    return (y,)


def _keep_query(seen, module, args):
    """Forward pre-hook on c_proj: keep the heads' output at the last token, (B, C)."""
    seen.append(args[0][:, -1])


@contextlib.contextmanager
def edited(model, sharpen=1.0, head_scale=None):
    """Test-time edits at the query (the last token, where these tasks read the answer) in every block:
    its logits q.k/sqrt(hs) times `sharpen` (q is scaled; NoPE, so nothing rotates), and head h's
    output times head_scale[layer, h] before W_O. Hooks on c_attn and c_proj, so every forward path
    sees them; removed on exit."""
    hooks = []
    for layer, block in enumerate(model.blocks):
        if sharpen != 1.0:
            hooks.append(block.attn.c_attn.register_forward_hook(functools.partial(_sharpen_query, sharpen)))
        if head_scale is not None:
            hooks.append(block.attn.c_proj.register_forward_pre_hook(functools.partial(_scale_heads,
                                                                                       head_scale[layer])))
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def head_std(model, idx):
    """(n_layer, nh): the std over examples of each head's output at the query (the input of W_O, so
    after the gate of `gate` and the per-head norm of `headnorm`), root-mean-square over its channels."""
    seen, s1, s2, n = [], 0.0, 0.0, idx.size(0)
    hooks = [b.attn.c_proj.register_forward_pre_hook(functools.partial(_keep_query, seen)) for b in model.blocks]
    try:
        model.eval()
        for chunk in idx.split(max(1, CAL_TOKENS // idx.size(1))):  # chunks: per-channel sums and sums of squares
            seen.clear()
            model(chunk, at=torch.full((chunk.size(0), 1), idx.size(1) - 1, device=idx.device))
            y = torch.stack(seen).double()  # (L, b, C)
            s1, s2 = s1 + y.sum(1), s2 + (y * y).sum(1)  # (L, C) each
    finally:
        for h in hooks:
            h.remove()
    var = (s2 - s1 * s1 / n) / (n - 1)  # (L, C): the unbiased variance over the n examples
    return var.view(var.size(0), model.cfg.n_head, -1).mean(-1).sqrt().float()  # (L, nh)


def restore_scale(model, ref, idx, sharpen=1.0):
    """Factors (n_layer, nh) that bring each head's output std at the query on inputs idx back to ref,
    block by block: a block's factors are measured with the earlier blocks already rescaled."""
    scale = torch.ones_like(ref)
    for layer in range(len(model.blocks)):
        with edited(model, sharpen, scale):
            now = head_std(model, idx)
        scale[layer] = ref[layer] / now[layer].clamp_min(1e-12)
    return scale


def head_std_rows(model, sample, lengths, device):
    """Tidy rows {table: head_std, length, layer, head, std} on the calibration inputs."""
    rows = []
    for length in lengths:
        for layer, stds in enumerate(head_std(model, calibration(sample, length, device)).tolist()):
            rows += [{"table": "head_std", "length": length, "layer": layer, "head": h, "std": v}
                     for h, v in enumerate(stds)]
    return rows


def edit_rows(model, sample, lengths, train_len, n, device, extra, key):
    """Accuracy, extra metrics and layer-0 exp(H) of the model under each edit, per test length, on the
    same test examples as every other row (key: eval_batches'): {table: edit, edit, length, accuracy,
    ..., eff_n, factor (mean head factor of layer 0, 1 if none), sharpen, n}."""
    ref = head_std(model, calibration(sample, train_len, device))
    rows = []
    for length in lengths:
        idx = calibration(sample, length, device)
        sharpen = max(1.0, math.log(length) / math.log(train_len))
        for edit in EDITS:
            s = 1.0 if edit == "scale" else sharpen
            scale = None if edit == "select" else restore_scale(model, ref, idx, s)
            with edited(model, s, scale):
                acc, probes, _ = C.evaluate_with_probes(model, sample, [length], n, device, extra=extra, key=key)
            eff = [r["eff_n"] for r in probes if r["layer"] == 0 and r["where"] == "pre"][0]
            rows.append({"table": "edit", "edit": edit, **acc[0], "eff_n": eff, "sharpen": s,
                         "factor": 1.0 if scale is None else float(scale[0].mean())})
    return rows

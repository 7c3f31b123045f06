"""The reference forward: every block through explicit T x T attention maps, for the equivalence tests
(fast path == reference) and bench.py's baseline. Slow and O(T^2) in memory on purpose."""
import torch


def reference_maps(model, idx, position_ids=None):
    """Every layer's full attention maps (B, nh, T, T) from explicit q k^T, causal mask and softmax."""
    x, rope = model.embed(idx, position_ids)
    T, maps = idx.size(1), []
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    for block in model.blocks:
        q, k, v = block.attn.qkv(block.ln_1(x), rope)
        m = torch.softmax(((q @ k.transpose(-2, -1)) / q.size(-1) ** 0.5).masked_fill(future, float("-inf")), -1)
        maps.append(m)
        every = torch.arange(T).expand(idx.size(0), -1)
        x = block.forward_at(x, rope, every)[0]
    return maps


def reference_forward(model, idx, targets=None, position_ids=None, at=None):
    """(logits, loss) as model(idx, targets, position_ids, at) gives them, computed by every query's
    explicit attention rows in every block (CausalSelfAttention.forward_at with all positions)."""
    x, rope = model.embed(idx, position_ids)
    every = torch.arange(idx.size(1), device=idx.device).expand(idx.size(0), -1)  # (B, T)
    for block in model.blocks:
        x = block.forward_at(x, rope, every)[0]  # (B, T, C)
    if at is not None:
        x = x.gather(1, at[:, :, None].expand(-1, -1, x.size(-1)))  # (B, P, C)
    logits = model.lm_head(model.ln_f(x))
    if targets is None:
        return logits, None
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                             ignore_index=-1)
    return logits, loss


class Reference(torch.nn.Module):
    """A model whose forward is reference_forward (the same parameters): train() and the evaluators
    run it like any model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets=None, position_ids=None, at=None):
        return reference_forward(self.model, idx, targets, position_ids, at)

    def loss(self, batch):
        return self(batch["idx"], batch["targets"], batch.get("position_ids"), batch.get("at"))[1]

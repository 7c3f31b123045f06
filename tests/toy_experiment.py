"""A minimal experiment script on top of common.py, used by the tests (and a template for new ones).

Task "copy the last token": T random tokens from {2..V-1}; the model must output the last one.
Example (T = 4): idx = [7 3 9 5], at = [3], target = [5]. Trivial for any model; the point here is
the machinery: config flags, presets, the sweep, resume, shards, results files and plots.
"""
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common as C  # noqa: E402
import harness as H  # noqa: E402
import reporting as R  # noqa: E402


def sample_batch(rng, batch_size, length, vocab=16):
    idx = torch.from_numpy(rng.integers(2, vocab, size=(batch_size, length)))
    at = torch.full((batch_size, 1), length - 1)
    return {"idx": idx, "at": at, "targets": idx[:, -1:].clone()}


@dataclass
class Config(C.TrainConfig):
    variants: tuple = C.arg(("none", "layernorm"), "attention-output norms to compare", choices=C.ATTN_OUT_NORMS)
    pos: str = C.arg("none", "positional encoding", choices=C.POS_ENCODINGS)
    block_size: int = C.arg(64, "learned position table size", min=1)
    n_embd: int = C.arg(32, "model width", min=1)
    train_len: int = C.arg(8, "training length", min=1)
    test_lengths: tuple = C.arg((8, 16, 32), "test lengths", min=1)


PRESETS = {"smoke": dict(seeds=2, steps=30, eval_examples=64),
           "quick": dict(seeds=3, steps=200),
           "paper": dict(seeds=5, steps=2000)}


def build(cell, cfg):
    return C.GPT(C.GPTConfig(vocab_size=16, block_size=cfg.block_size, n_layer=1, n_head=2, n_embd=cfg.n_embd,
                             pos=cfg.pos, attn_out_norm=cell["variant"]))


def seq_lens(cell, cfg):
    return cfg.train_len, max(cfg.test_lengths)


def train(model, cell, cfg):
    data = functools.partial(C.sample_length_range, sample=sample_batch, lo=cfg.train_len, hi=cfg.train_len)
    return {"train": C.train(model, data, cfg, torch.device(cell["device"]), data_seed=10_000 + cell["seed"],
                             progress=False, on_progress=H.report_progress)}


def train_or_run_out_of_memory(model, cell, cfg):
    """train(), except that seed 1 fails as a full GPU does (the tests of a device error in a cell)."""
    if cell["seed"] == 1:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return train(model, cell, cfg)


def evaluate(model, cell, cfg):
    rows, probes, _ = C.evaluate_with_probes(model, sample_batch, cfg.test_lengths, cfg.eval_examples,
                                             torch.device(cell["device"]), key="toy")
    return {"rows": [{"table": "accuracy", **r} for r in rows] + [{"table": "probe", **r} for r in probes]}


def report(records, cfg, out):
    rows = [r for rec in records for r in rec["rows"]]
    R.plot_vs_length(R.select(rows, table="accuracy"), "accuracy", out / "accuracy.png", cfg.train_len, chance=1 / 14)
    R.plot_vs_length(R.select(rows, table="probe", where="pre"), "comp_std", out / "variance.png", cfg.train_len,
                     logy=True)
    R.summarize([{**rec, "rows": R.select(rec["rows"], table="accuracy")} for rec in records], "accuracy",
                cfg.train_len)


def validate(cfg):
    C.check(cfg.pos != "learned" or max(cfg.test_lengths) <= cfg.block_size,
            f"test length {max(cfg.test_lengths)} exceeds the learned position table ({cfg.block_size})")


SCRIPT = H.Script(name="toy", description=__doc__.splitlines()[0], config=Config, presets=PRESETS,
                  axes={"variant": "variants", "seed": "seeds"}, build=build, train=train, evaluate=evaluate,
                  report=report, validate=validate, eval_fields=("test_lengths", "eval_examples"),
                  seq_lens=seq_lens)

if __name__ == "__main__":
    H.main(SCRIPT)

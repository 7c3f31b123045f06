"""cli.py: a script's command line, made from its config dataclass: every field is a flag with its type,
default, presets and range; one precedence (class defaults <- preset <- experiment <- flags); bad input
is one 'error: ...' line and exit 2. harness.main() uses it.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
from dataclasses import fields, replace
from pathlib import Path

import torch

import common as C
from faults import EXIT_USAGE

JOBS_PER_GPU = 8   # default --jobs per GPU
DEFAULT_PRESET = "quick"


MAX_SEEDS = 10_000  # seeds in one sweep: far more than any run here; a typo (0-100000000) is refused at once


def parse_seeds(s):
    """--seeds: '10' (seeds 0..9), '10-19' (a range, both ends in) or '3,7' (a list)."""
    try:
        if "-" in s.strip()[1:]:
            a, b = (int(x) for x in s.split("-"))
            if not 0 <= a <= b:
                raise argparse.ArgumentTypeError(f"invalid seeds range {s!r}: A-B needs 0 <= A <= B")
            value, n = range(a, b + 1), b - a + 1  # a range object: nothing is built before the check
        elif "," in s:
            value = tuple(int(x) for x in s.split(","))
            n = len(value)
        else:
            value = n = int(s)
        if n > MAX_SEEDS:
            raise argparse.ArgumentTypeError(f"--seeds {s} names {n:,} seeds; a sweep takes at most {MAX_SEEDS:,}")
        return tuple(value) if isinstance(value, range) else value
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seeds value: {s!r} (a count, A-B or A,B,...)") from None


def _parse_value(kind, elem, s):
    if kind is bool:
        C.check(s.lower() in ("1", "0", "true", "false", "yes", "no"), f"expected true/false, got {s!r}")
        return s.lower() in ("1", "true", "yes")
    if kind is tuple:
        return tuple(_parse_value(elem, elem, x) for x in s.split(",") if x.strip())
    if kind is int and "e" in s.lower():  # 1e6 for a million
        x = float(s)
        C.check(x.is_integer(), f"expected an integer, got {s!r}")
        return int(x)
    return kind(s)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one 'error: ...' line (exit 2), like every other bad input."""

    def error(self, message):
        if message.endswith("expected one argument"):  # argparse reads a value such as -1/2 as a flag
            message += " (a value that starts with '-' is given as --flag=VALUE)"
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")


TYPE_NAMES = {int: "integer", float: "number", str: "string", bool: "true/false"}


def flag_type(kind, elem):
    """The argparse type of a config field, named for argparse's message ('invalid integer value')."""
    def parse(s):
        return _parse_value(kind, elem, s)
    parse.__name__ = f"comma-separated {TYPE_NAMES[elem]}" if kind is tuple else TYPE_NAMES[kind]
    return parse


def shown(v):
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)


def make_parser(script):
    p = OneLineParser(description=script.description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                      allow_abbrev=False)  # a flag is spelled out: --experiment never reaches another flag
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=list(script.presets),
                   help="smoke: seconds (tests); quick: minutes on a laptop CPU; paper: paper scale, for a GPU")
    if len(script.experiments) > 1:
        p.add_argument("--experiment", default=next(iter(script.experiments)), choices=list(script.experiments),
                       help="a named experiment: " + "; ".join(
                           f"{k}: " + " | ".join(", ".join(f"{f}={shown(v)}" for f, v in run.items()) or "the flags"
                                                 for run in runs) for k, runs in script.experiments.items()))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--out", default="out/<script>/<preset>",
                   help="output directory; a named --experiment appends -<experiment> to the default")
    p.add_argument("--jobs", type=int, default=0,
                   help=f"cells run in parallel processes (0 = one per CPU core on CPU; on CUDA "
                        f"{JOBS_PER_GPU} per GPU, at most one per CPU core)")
    p.add_argument("--shard", default="0/1", help="I/N: run only cells i with i %% N == I (cluster job arrays)")
    p.add_argument("--fresh", action="store_true", help="recompute cells that already have results")
    p.add_argument("--plot-only", metavar="DIR", default=None, help="redraw figures and summary from DIR; no training")
    p.add_argument("--eval-only", metavar="DIR", default=None,
                   help="test the models saved in DIR again, with the evaluation flags given (" +
                        ", ".join(flag_name(f) for f in script.eval_fields) + "); no training; new cells in DIR")
    p.add_argument("--save-models", type=flag_type(bool, bool), nargs="?", const="true", default=True,
                   metavar="BOOL", help="save each cell's trained weights as cells/<key>.pt (for --eval-only)")
    g = p.add_argument_group(f"experiment config (in brackets: the default, which is the {DEFAULT_PRESET} preset's, "
                             "then what the other presets set)")
    for f in fields(script.config):
        d = getattr(script.config(), f.name)
        kind = type(d) if not isinstance(d, (list, tuple)) else tuple
        elem = type(d[0]) if kind is tuple and d else str
        text = preset_defaults(script, f.name, d)
        choices = f" {{{','.join(f.metadata['choices'])}}}" if "choices" in f.metadata else ""
        g.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                       metavar="N|A-B|A,B" if f.metadata.get("seeds") else kind.__name__.upper() if kind is not tuple
                       else "A,B,...",
                       type=parse_seeds if f.metadata.get("seeds") else flag_type(kind, elem),
                       nargs="?" if kind is bool else None, const="true" if kind is bool else None,
                       help=f.metadata.get("help", "") + choices + f" [{text}]".replace("%", "%%"))
    return p


def preset_defaults(script, name, base):
    """'2000; smoke: 40; paper: 10000': the value a run gets without the flag (the default preset's), then
    the other presets' where they differ."""
    presets = script.presets
    value = presets.get(DEFAULT_PRESET, {}).get(name, base)
    return "; ".join([shown(value)] + [f"{p}: {shown(v.get(name, base))}" for p, v in presets.items()
                                       if p != DEFAULT_PRESET and v.get(name, base) != value])


def flag_name(field_name):
    return "--" + field_name.replace("_", "-")


def check_fields(cfg):
    """Every field of cfg within its declared range and choices."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        vals = tuple(v) if isinstance(v, (tuple, list)) else (v,)
        flag = flag_name(f.name)
        C.check(len(vals) > 0, f"{flag} needs at least one value")
        C.check(len(set(vals)) == len(vals), f"{flag} lists a value twice: {shown(v)}")
        C.check(all(math.isfinite(x) for x in vals if isinstance(x, float)), f"{flag} must be a finite number, got {v}")
        if f.metadata.get("seeds"):
            C.check(all(x >= 0 for x in vals) and (not isinstance(v, int) or v >= 1),
                    f"{flag} needs a count >= 1 or seeds >= 0, got {shown(v)}")
        if "min" in f.metadata:
            C.check(all(x >= f.metadata["min"] for x in vals), f"{flag} must be >= {f.metadata['min']}, got {v}")
        if "max" in f.metadata:
            C.check(all(x <= f.metadata["max"] for x in vals), f"{flag} must be <= {f.metadata['max']}, got {v}")
        bad = [x for x in vals if "choices" in f.metadata and x not in f.metadata["choices"]]
        C.check(not bad, f"{flag}: unknown {bad[0]!r}; choose from {', '.join(f.metadata.get('choices', ()))}"
                if bad else "")


def check_mode_flags(args, parser, script):
    """--plot-only and --eval-only read only some flags; any other flag given with one would be silently
    ignored, so it is refused (one line, exit 2), and so is the pair of them."""
    C.check(not (args.plot_only and args.eval_only), "--plot-only and --eval-only do not combine: --eval-only "
            "DIR tests the saved models and redraws DIR itself; run it alone")
    if not (args.plot_only or args.eval_only):
        return
    mode, configs = ("--plot-only", set()) if args.plot_only else ("--eval-only", {f.name for f in fields(script.config)})
    reads = {"plot_only", "preset", "experiment"} if args.plot_only else {"eval_only", "device", "jobs", "shard", "fresh"}
    given = [k for k, v in vars(args).items() if k not in reads | configs and v != parser.get_default(k)]
    why = {"out": f" ({mode} DIR writes into DIR)"}
    C.check(not given, f"{mode} does not take {', '.join(flag_name(k) for k in given)}"
            f"{why.get(given[0], '') if given else ''}: " + ("it redraws the saved results as they are"
                                                             if args.plot_only else "see --help"))


def run_configs(args, script):
    """The config of each run of the chosen experiment: class defaults <- preset <- the experiment's run
    <- the flags given on the command line (a flag always wins). Every field is checked."""
    runs = script.experiments[getattr(args, "experiment", next(iter(script.experiments)))]
    cfgs = [replace(replace(replace(script.config(), **script.presets[args.preset]), **run), **given_flags(args, script))
            for run in runs]
    for cfg in cfgs:
        check_fields(cfg)
    return cfgs


def given_flags(args, script):
    """The config fields set on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(script.config) if hasattr(args, f.name)}


def parse_shard(s):
    try:
        i, n = (int(x) for x in s.split("/"))
    except ValueError:
        raise C.UsageError(f"--shard must look like I/N (e.g. 0/4), got {s!r}") from None
    C.check(n >= 1 and 0 <= i < n, f"--shard I/N needs 0 <= I < N, got {s!r}")
    return i, n


def pick_device(name, cfg):
    """The torch.device, printing the choice and the reason; checks the dtype and TF32 asked for."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    why = "requested"
    if name == "auto":
        name, why = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu", "auto-detected"
    C.check(name != "cuda" or torch.cuda.is_available(), "--device cuda requested but CUDA is not available here")
    C.check(name != "mps" or has_mps, "--device mps requested but MPS is not available here")
    C.check(cfg.dtype == "fp32" or name == "cuda", f"--dtype {cfg.dtype} needs a CUDA GPU; this run is on {name}")
    C.check(cfg.dtype == "fp32" or torch.cuda.is_bf16_supported(including_emulation=False),
            f"--dtype {cfg.dtype}: this GPU has no native bf16 (it would be emulated, slower than fp32); use fp32")
    C.check(not cfg.tf32 or name == "cuda", "--tf32 applies to CUDA only")
    what = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) \
        if name == "cuda" else platform.processor() or name
    text = {"fp32": "float32", "bf16": "bfloat16 autocast (probes in float32)"}[cfg.dtype]
    text += f", TF32 {'on' if cfg.tf32 else 'off'}" if name == "cuda" else ""
    print(f"device: {name} ({what}, {why}); dtype: {text}")
    return torch.device(name)


def default_jobs(device):
    """One cell process per CPU core on CPU. On CUDA several per GPU: each step of these small models
    is a few hundred tiny kernels, so one process leaves a GPU mostly idle (bench.py measures it)."""
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(cores, JOBS_PER_GPU * torch.cuda.device_count()))
    return cores if device.type == "cpu" else 1


def out_dir(args, parser, script):
    """--out, with <script> and <preset> filled in; a named experiment's default folder gets its name."""
    out = os.path.expanduser(args.out)
    C.check(out.strip() != "", "--out needs a directory name")
    experiment = getattr(args, "experiment", "main")
    if experiment != "main" and out == parser.get_default("out"):
        out += f"-{experiment}"
    return Path(out.replace("<script>", script.name).replace("<preset>", args.preset))


def jobs_for(args, device):
    """--jobs, or the default for the device; sets this process to one thread as well."""
    # Tiny models on CPU: one thread per process beats PyTorch's default team of threads (bench.py);
    # with several jobs each worker process is single-threaded anyway.
    torch.set_num_threads(1)
    return args.jobs or default_jobs(device)

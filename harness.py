"""harness.py: the machinery around an experiment. No result depends on it; read it to run things.

  sweeps    make_cells() (one cell per combination of a script's declared axes), run_sweep(): cells
            in parallel processes, shards, one atomic file per finished cell and its saved weights,
            resume; TrainAndEvaluate (a cell start to end), EvaluateSaved (--eval-only)
  results   write_results() (results.json, results.csv), load_results() and saved_run() for
            --plot-only, environment()
  the CLI   Script (what a script declares), main(script): flags from the config dataclass, one
            precedence (class defaults <- preset <- experiment <- flags), device, a memory estimate,
            errors as one line (exit 2 bad input, 3 a file-system fault or a dead worker, 130 interrupted)

A script declares a Script (its config class, presets, named experiments, sweep axes, and build /
train / evaluate / report) and its __main__ is `harness.main(SCRIPT)`.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

import common as C
import reporting as R

EXIT_USAGE, EXIT_IO, EXIT_INTERRUPTED = 2, 3, 130  # bad input; a file-system fault; Ctrl-C
JOBS_PER_GPU = 8   # default --jobs per GPU


# =============================================================================================
# Sweeps: cells in parallel processes, shards, atomic results, resume
# =============================================================================================

def make_cells(cfg, axes, device, groups=None):
    """One cell per combination of the axes: axes maps a cell field to the config field that lists its
    values ('seeds' gives range(cfg.seeds)); earlier axes vary slowest. groups, if given, is a list of
    {cell field: values} sub-sweeps (each multiplied out on its own) instead. A cell's config leaves out
    every config field named in axes, so adding a seed or a variant later reuses every cell done. It also
    leaves out a field declared with late=True while it holds its default: a field added after cells were
    computed keeps their keys (and Config(**cell['config']) restores the default)."""
    late = {f.name for f in fields(cfg) if f.metadata.get("late") and getattr(cfg, f.name) == f.default}
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in axes.values() and k not in late}
    if groups is None:
        groups = [{cf: seed_list(cfg.seeds) if f == "seeds" else getattr(cfg, f) for cf, f in axes.items()}]
    return [{**dict(zip(g, combo)), "device": device.type, "config": config}
            for g in groups for combo in itertools.product(*g.values())]


def seed_list(seeds):
    """The seeds a --seeds value names: a count N (0..N-1), or the tuple of a list or range."""
    return list(range(seeds)) if isinstance(seeds, int) else list(seeds)


def parse_seeds(s):
    """--seeds: '10' (seeds 0..9), '10-19' (a range, both ends in) or '3,7' (a list)."""
    try:
        if "-" in s.strip()[1:]:
            a, b = (int(x) for x in s.split("-"))
            if not 0 <= a <= b:
                raise argparse.ArgumentTypeError(f"invalid seeds range {s!r}: A-B needs 0 <= A <= B")
            return tuple(range(a, b + 1))
        return tuple(int(x) for x in s.split(",")) if "," in s else int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seeds value: {s!r} (a count, A-B or A,B,...)") from None


def cell_key(cell):
    return hashlib.sha1(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:16]


def atomic_write(path: Path, data):
    """Write through a temp file of this process and thread, then rename: readers see the old file or
    the new, never half, and two writers never share a temp file. data: text, or a function that
    writes the path it is given (e.g. torch.save of a state dict)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        data(tmp) if callable(data) else tmp.write_text(data)
        os.replace(tmp, path)
    except OSError as e:  # a full disk: no half-written temp file left behind, and say where
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e
    except BaseException:  # Ctrl-C, an error in a worker
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temp_files(cell_dir):
    """Temp files of processes that no longer run (a run killed with kill -9 leaves them behind)."""
    for tmp in Path(cell_dir).glob(".*.tmp"):
        pid = tmp.name.split(".")[-3]
        if pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, but belongs to someone else
        return True
    return True


def save_weights(model, path):
    """The trained weights (a state dict on the CPU), written atomically: a .pt file exists only whole."""
    buf = io.BytesIO()  # serialized in memory first: a full disk is then an OSError like any other write
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    atomic_write(path, functools.partial(Path.write_bytes, data=buf.getvalue()))


class TrainAndEvaluate:
    """One cell, start to end, in any process (picklable): seed torch with the cell's seed (the init
    seed; each script's train() draws its data from a seed of its own), build, train, save the weights
    next to the cell file (cells/<key>.pt), evaluate."""

    def __init__(self, script, cell_dir, save_models=True):
        self.build, self.train, self.evaluate = script.build, script.train, script.evaluate
        self.cell_dir, self.save_models = Path(cell_dir), save_models

    def __call__(self, cell):
        torch.manual_seed(cell["seed"])
        model = self.build(cell)
        with C.matmul_precision(cell["config"].get("tf32", False)):  # one precision for training and every test
            out = self.train(model, cell)
            if self.save_models:
                save_weights(model, self.cell_dir / f"{cell_key(cell)}.pt")
            return {**out, **self.evaluate(model, cell)}


def read_weights(path):
    """A saved state dict; a file that cannot be read (truncated, not a model) is one line, naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, pickle errors, EOFError, ... for a damaged file
        raise C.UsageError(f"cannot read saved model {path} ({type(e).__name__}); delete it and its cell file "
                           "(the same name, .json) and re-run the sweep to train it again") from None


class EvaluateSaved:
    """A saved model tested again (--eval-only): built from the cell's config (the original's, with
    only evaluation fields changed), loaded with the weights the cell names, evaluated. The original
    record's other fields (the training curve, ...) are carried over."""

    def __init__(self, script, cell_dir):
        self.build, self.evaluate, self.cell_dir = script.build, script.evaluate, Path(cell_dir)

    def __call__(self, cell):
        torch.manual_seed(cell["seed"])
        model = self.build(cell)
        model.load_state_dict(read_weights(self.cell_dir / f"{cell['weights']}.pt"))
        model.to(torch.device(cell["device"]))
        original = _read_json(self.cell_dir / f"{cell['weights']}.json")
        kept = {k: v for k, v in original.items() if k not in ("cell", "status", "rows", "seconds")}
        with C.matmul_precision(cell["config"].get("tf32", False)):  # as the sweep evaluated it
            return {**kept, **self.evaluate(model, cell)}


class DeviceFault(OSError):
    """A cell ran out of memory or met an accelerator runtime error: the sweep ends with one line (exit 3)."""


def device_fault(cell, e):
    kind = "ran out of memory" if isinstance(e, torch.OutOfMemoryError) else "met a device error"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return DeviceFault(f"cell {R.cell_label(cell)} {kind} on {cell.get('device', 'its device')} ({first}): "
                       "run fewer cells at once (a lower --jobs) or smaller sizes")


def _run_and_save(run_cell, cell_dir, cell):
    t0 = time.time()
    report_progress(0.0)
    try:
        out = run_cell(cell)
    except C.Diverged as e:  # recorded, and the sweep goes on with the other cells
        tqdm.write(f"{R.cell_label(cell)}: {e}; run stopped")
        out = {"status": "diverged", "train": e.result, "rows": []}
    except (torch.OutOfMemoryError, torch.AcceleratorError) as e:
        raise device_fault(cell, e) from None
    ids = {k: v for k, v in cell.items() if k != "config"}
    rows = [{**ids, **r} for r in out.pop("rows", [])]
    record = {"cell": cell, "status": out.pop("status", "ok"), "rows": rows,
              "seconds": round(time.time() - t0, 2), **out}
    atomic_write(Path(cell_dir) / f"{cell_key(cell)}.json", json.dumps(record))
    report_progress(0.0)  # before the parent hears of it: the bar never counts a cell twice
    return record


def is_main_process():
    """True in the process the user started (show progress bars), False in --jobs worker processes."""
    return mp.current_process().name == "MainProcess"


PROGRESS = {"shared": None, "slot": 0, "parent": None}  # in a --jobs worker: its slot in the parent's array


def report_progress(fraction):
    """Tell the parent's progress bar how far this worker's current cell has trained (0..1). A worker
    whose parent was killed (kill -9) stops here instead of training on for nobody."""
    if PROGRESS["shared"] is not None:
        if os.getppid() != PROGRESS["parent"]:
            os._exit(1)
        PROGRESS["shared"][PROGRESS["slot"]] = fraction


def train_options(desc):
    """train()'s progress arguments in a cell: a bar in the main process, the shared progress in workers."""
    return dict(progress=is_main_process(), on_progress=report_progress, desc=desc)


def _worker_init(threads, shared, on_cuda):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    tolerant_streams()
    try:
        tqdm.set_lock(threading.RLock())  # workers draw no bars: no multiprocessing lock a kill would leak
        torch.set_num_threads(threads)
        worker = mp.current_process()._identity[0] - 1  # 0, 1, 2, ... within this pool
        PROGRESS.update(shared=shared, slot=worker % len(shared), parent=os.getppid())
        if on_cuda:  # several workers per GPU, spread round robin over the GPUs
            torch.cuda.set_device(worker % torch.cuda.device_count())
    except Exception as e:  # one line here; the parent sees a broken pool and ends the sweep (exit 3)
        print(f"a worker process could not start: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)


def run_sweep(cells, run_cell, out_dir, jobs=1, shard=(0, 1), fresh=False):
    """Run `run_cell(cell) -> {'rows': [...], ...}` for every cell of this shard (cells i with
    i % N == I), `jobs` at a time in separate processes. Each finished cell is written at once to
    out_dir/cells/<key>.json; cells already there are skipped unless fresh. A cell is a JSON-able dict:
    ids (variant, seed, ...) are copied into its rows; 'config' is not."""
    cells = list({cell_key(c): c for c in cells}.values())  # the same cell asked twice runs once
    cell_dir = Path(out_dir) / "cells"
    cell_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(cell_dir)
    atomic_write(Path(out_dir) / "sweep.json", json.dumps({"cells": [cell_key(c) for c in cells]}))
    i, n = shard
    mine = [c for j, c in enumerate(cells) if j % n == i]
    todo = [c for c in mine if fresh or not (cell_dir / f"{cell_key(c)}.json").exists()]
    load_cells(out_dir, keys=[cell_key(c) for c in mine if c not in todo])  # a broken one: one line, before training
    jobs = max(1, min(jobs, len(todo)))
    print(f"sweep: {len(cells)} cells, {len(mine)} in shard {i}/{n}, {len(mine) - len(todo)} already "
          f"done, running {len(todo)} with {jobs} job(s)")
    bar = tqdm(total=len(todo), desc="cells", disable=len(todo) < 2,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} [{elapsed}<{remaining}]")
    try:
        if jobs == 1 or len(todo) < 2:
            for c in todo:  # the cell's own training bar shows its steps
                _run_and_save(run_cell, cell_dir, c)
                bar.update()
        else:
            _run_in_pool(run_cell, cell_dir, todo, jobs, bar)
    finally:  # closed now, so that an error or 'interrupted' line is the last thing printed
        bar.close()
    return load_cells(out_dir, keys=[cell_key(c) for c in cells])


class WorkerDied(OSError):
    """A --jobs worker process died (killed, out of memory, a crash) or could not start."""


def _run_in_pool(run_cell, cell_dir, todo, jobs, bar):
    """Cells in `jobs` spawned processes (safe with CUDA and threads; each worker single-threaded).
    The bar moves from the first seconds: finished cells plus the trained fraction of those in flight,
    which the workers write to a shared array (report_progress). A worker that dies breaks the pool:
    the sweep stops with WorkerDied (exit 3) instead of waiting for a cell that will never finish."""
    ctx = mp.get_context("spawn")
    shared = ctx.RawArray("d", jobs)  # no lock, no semaphore: each worker writes its own slot
    on_cuda = any(c.get("device") == "cuda" for c in todo)  # a CPU run never touches a GPU it may have
    pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(1, shared, on_cuda))
    try:
        pending = {pool.submit(_Runner(run_cell, cell_dir), c) for c in todo}
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for f in done:
                f.result()  # a cell's own error, or BrokenProcessPool
            bar.n = len(todo) - len(pending) + sum(shared[:])
            bar.refresh()
    except BrokenProcessPool:
        _stop(pool)
        raise WorkerDied(None, "a worker process died or could not start (killed, out of memory, or a crash)") from None
    except BaseException:  # Ctrl-C or an error in a cell: stop the other workers now
        _stop(pool)
        raise
    pool.shutdown()


def _stop(pool):
    """Kill the pool's workers now (shutdown(cancel_futures) alone would wait for the cells in flight).
    The workers are this process's only multiprocessing children."""
    for p in mp.active_children():
        p.kill()
    pool.shutdown(wait=True, cancel_futures=True)


class _Runner:  # a picklable partial(_run_and_save, run_cell, cell_dir)
    def __init__(self, run_cell, cell_dir):
        self.run_cell, self.cell_dir = run_cell, cell_dir

    def __call__(self, cell):
        return _run_and_save(self.run_cell, self.cell_dir, cell)


# =============================================================================================
# Results
# =============================================================================================

def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise C.UsageError(f"cannot read results file {path}: {e}; delete it and re-run") from None


def load_cells(out_dir, keys=None):
    """Finished cell records under out_dir/cells (only `keys` if given), in a stable order."""
    cell_dir = Path(out_dir) / "cells"
    paths = sorted(cell_dir.glob("*.json")) if keys is None else \
        [cell_dir / f"{k}.json" for k in keys if (cell_dir / f"{k}.json").exists()]
    recs = [_read_json(p) for p in paths]
    for p, r in zip(paths, recs):
        check_record(r, p)
    return sorted(recs, key=record_order)  # the same order for a run, a re-run and --plot-only


def check_record(rec, path):
    """A cell record of the shape this harness writes: a cell (ids and a config), a status, tidy rows."""
    ok = isinstance(rec, dict) and {"cell", "rows", "status"} <= rec.keys() and isinstance(rec["cell"], dict) \
        and isinstance(rec["cell"].get("config"), dict) and isinstance(rec["status"], str) \
        and isinstance(rec["rows"], list) and all(isinstance(r, dict) for r in rec["rows"])
    ids = [k for k in rec["cell"] if k != "config"] if ok else []
    ok = ok and all(k in r for r in rec["rows"] for k in ids)  # each row carries its cell's ids
    C.check(ok, f"corrupt results file {path}: not a cell record (a cell with its config, a status, rows with "
                "the cell's ids); delete it and re-run")


def record_order(rec):
    """A record's cell ids, numbers before names, as a sort key (seed 2 before seed 10)."""
    ids = sorted((k, v) for k, v in rec["cell"].items() if k not in ("config", "device", "weights"))
    return [(k, (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))) for k, v in ids] + \
        [setting_text(rec) + str(rec["cell"].get("weights"))]


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device, cfg):
    """What results.json records of the machine: versions, device (GPU names), dtype and TF32."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "device": str(device), "dtype": cfg.dtype, "tf32": cfg.tf32,
           "cuda": torch.version.cuda, "git_commit": git_commit(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


def script_of(config_cls):
    """The script that defines an experiment config class: a results folder is tied to it."""
    return Path(sys.modules[config_cls.__module__].__file__).stem


def write_results(out_dir, records, cfg, env):
    """results.json (the script, config, environment, per-cell status, tidy rows) and results.csv
    (the rows), both through atomic_write. cfg: the experiment's config dataclass."""
    out_dir = Path(out_dir)
    rows = [r for rec in records for r in rec["rows"]]
    cells = [{**{k: v for k, v in rec["cell"].items() if k != "config"}, "status": rec["status"],
              "seconds": rec.get("seconds"), **({"train": rec["train"]} if "train" in rec else {})}
             for rec in records]
    atomic_write(out_dir / "results.json", json.dumps(
        {"script": script_of(type(cfg)), "config": dataclasses.asdict(cfg), "environment": env, "cells": cells,
         "rows": rows}, indent=1))
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
    atomic_write(out_dir / "results.csv", buf.getvalue())
    return rows


def load_results(out_dir):
    """Cell records for --plot-only: merged from cells/ (all shards), else rebuilt from results.json
    (its cells, each with its rows; without the extras that only cell files keep, such as maps)."""
    out_dir = Path(out_dir)
    C.check(out_dir.exists(), f"--plot-only: no such directory {out_dir}")
    C.check(out_dir.is_dir(), f"--plot-only: {out_dir} is a file, not a results directory")
    if (out_dir / "cells").is_dir():
        recs = load_cells(out_dir)
        if recs:
            return recs
    C.check((out_dir / "results.json").exists(), f"--plot-only: no results in {out_dir} (no cell files, no results.json)")
    res = _read_json(out_dir / "results.json")
    C.check(isinstance(res, dict) and {"rows", "cells", "config"} <= res.keys() and isinstance(res["config"], dict)
            and isinstance(res["rows"], list) and all(isinstance(r, dict) for r in res["rows"])
            and isinstance(res["cells"], list) and all(isinstance(c, dict) and "status" in c for c in res["cells"]),
            f"corrupt results file {out_dir / 'results.json'}: not the results of a sweep (config, cells, rows)")
    recs = []
    for c in res["cells"]:
        ids = {k: v for k, v in c.items() if k not in ("status", "seconds", "train")}
        recs.append({"cell": {**ids, "config": res["config"]}, "status": c["status"], "script": res.get("script"),
                     "rows": [r for r in res["rows"] if all(r.get(k) == v for k, v in ids.items())]})
    return recs


def setting_text(rec, mixed=False):
    """What a record's cell holds besides its ids: its config, its device, and whether it is an --eval-only
    cell (one that names the 'weights' it tested). The cells of one setting form one run; mixed (an
    experiment of several runs, each with its config): device and eval-only only."""
    cell = rec["cell"]
    return json.dumps({"config": None if mixed else cell.get("config"), "device": cell.get("device"),
                       "eval_only": "weights" in cell}, sort_keys=True)


def saved_run(out_dir, config_cls, mixed=False):
    """(records, config) of a saved run, for --plot-only: plots use the config the results came from.
    Refuses results that another script wrote (their config has fields this script does not know).
    Where cells of several settings share the folder (another config, another device, an --eval-only
    run), the newest setting's are shown, so that no seed counts twice."""
    recs, script = load_results(out_dir), script_of(config_cls)
    names = {f.name for f in fields(config_cls)}
    mine = [r for r in recs if set(r["cell"].get("config", {})) <= names and r.get("script") in (None, script)]
    C.check(mine, f"--plot-only: {out_dir} holds no results of {script}.py" +
            (" (they were written by another script or another version of this script)" if recs else ""))
    if len(mine) < len(recs):
        print(f"note: {len(recs) - len(mine)} result(s) in {out_dir} come from another script or another "
              "version of this script; ignored")
    if len({setting_text(r, mixed) for r in mine}) > 1:
        newest = setting_text(max(mine, key=functools.partial(cell_mtime, out_dir)), mixed)
        kept = [r for r in mine if setting_text(r, mixed) == newest]
        print(f"note: {len(mine) - len(kept)} cell(s) in {out_dir} come from another setting (config, device or "
              f"--eval-only run); shown: the newest ({len(kept)} cells)")
        mine = kept
    missing = unfinished(out_dir)
    if missing:
        print(f"note: {missing} cell(s) of the last sweep into {out_dir} have no results (an unfinished run, or "
              "other shards): the tables show the finished ones; re-run its command to finish it")
    return mine, config_cls(**mine[0]["cell"]["config"])


def cell_mtime(out_dir, rec):
    path = Path(out_dir) / "cells" / f"{cell_key(rec['cell'])}.json"
    return path.stat().st_mtime if path.exists() else 0.0


def unfinished(out_dir):
    """How many cells that the last sweep into out_dir planned (sweep.json) have no cell file."""
    plan = Path(out_dir) / "sweep.json"
    if not plan.exists():
        return 0
    planned = _read_json(plan)
    keys = planned.get("cells", []) if isinstance(planned, dict) else []
    return sum(not (Path(out_dir) / "cells" / f"{k}.json").exists() for k in keys)


# =============================================================================================
# The command line
# =============================================================================================

@dataclass
class Script:
    """What a script declares to the harness.
      name         the script's file name without .py (the default --out is out/<name>/<preset>)
      config       its config dataclass (a common.TrainConfig): every field is a flag
      presets      {name: {field: value}}: smoke (seconds, the tests), quick (minutes), paper
      axes         {cell field: config field}: the sweep axes ('seeds' -> seed 0..seeds-1)
      build        cell -> the cell's model, untrained (torch is seeded with the cell's seed first)
      train        (model, cell) -> {'train': ...}: trains in place; raises common.Diverged to record a
                   diverged run
      evaluate     (model, cell) -> {'rows': [...], ...}: tests a trained model (also a saved one: --eval-only)
      eval_fields  the config fields that only evaluation reads: the ones --eval-only may change
      seq_lens     cell -> (longest training sequence, longest test sequence) in tokens: for the memory
                   estimate made before any training
      report       (records, cfg, out) -> figures, claims and the printed summary
      experiments  {name: [changes, ...]}: a named experiment is one or more runs, each a dict of
                   config changes; a run's cells all go into one folder, out/<name>/<preset>-<experiment>
      validate     cfg -> None, raising UsageError: constraints between flags, before any training
      groups       cfg -> [{cell field: values}] where the axes do not simply multiply
      examples     cfg -> None: print an example of each task before the sweep"""
    name: str
    description: str
    config: type
    presets: dict
    axes: dict
    build: Callable
    train: Callable
    evaluate: Callable
    report: Callable
    eval_fields: tuple = ()
    seq_lens: Callable = None
    experiments: dict = field(default_factory=lambda: {"main": [{}]})
    validate: Callable = None
    groups: Callable = None
    examples: Callable = None


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


def make_parser(script: Script):
    p = OneLineParser(description=script.description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="quick", choices=list(script.presets),
                   help="smoke: seconds (tests); quick: minutes on a laptop CPU; paper: paper scale, for a GPU")
    if len(script.experiments) > 1:
        p.add_argument("--experiment", default=next(iter(script.experiments)), choices=list(script.experiments),
                       help="a named experiment: " + "; ".join(
                           f"{k}: " + " | ".join(", ".join(f"{f}={shown(v)}" for f, v in run.items()) or "the flags"
                                                 for run in runs) for k, runs in script.experiments.items()))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--out", default="out/<script>/<preset>", help="output directory")
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
    g = p.add_argument_group("experiment config (the default in brackets, then what each preset sets)")
    for f in fields(script.config):
        d = getattr(script.config(), f.name)
        kind = type(d) if not isinstance(d, (list, tuple)) else tuple
        elem = type(d[0]) if kind is tuple and d else str
        text = "; ".join([shown(d)] + [f"{name}: {shown(v[f.name])}" for name, v in script.presets.items()
                                       if f.name in v])
        choices = f" {{{','.join(f.metadata['choices'])}}}" if "choices" in f.metadata else ""
        g.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                       metavar=kind.__name__.upper() if kind is not tuple else "A,B,...",
                       type=parse_seeds if f.metadata.get("seeds") else flag_type(kind, elem),
                       nargs="?" if kind is bool else None, const="true" if kind is bool else None,
                       help=f.metadata.get("help", "") + choices + f" [{text}]".replace("%", "%%"))
    return p


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


def run_configs(args, script: Script):
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


def parse_shard(s):
    try:
        i, n = (int(x) for x in s.split("/"))
    except ValueError:
        raise C.UsageError(f"--shard must look like I/N (e.g. 0/4), got {s!r}") from None
    C.check(n >= 1 and 0 <= i < n, f"--shard I/N needs 0 <= I < N, got {s!r}")
    return i, n


def default_jobs(device):
    """One cell process per CPU core on CPU. On CUDA several per GPU: each step of these small models
    is a few hundred tiny kernels, so one process leaves a GPU mostly idle (bench.py measures it)."""
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(cores, JOBS_PER_GPU * torch.cuda.device_count()))
    return cores if device.type == "cpu" else 1


def prepare_out(out, flag="--out"):
    """Check before any work that results can be written under `out`: a directory, writable."""
    C.check(not out.exists() or out.is_dir(), f"{flag} {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise C.UsageError(f"{flag} {out} is not writable ({e.strerror or e}): results, figures and the summary "
                           "are written there") from None


def out_dir(args, parser, script):
    """--out, with <script> and <preset> filled in; a named experiment's default folder gets its name."""
    out = os.path.expanduser(args.out)
    C.check(out.strip() != "", "--out needs a directory name")
    experiment = getattr(args, "experiment", "main")
    if experiment != "main" and out == parser.get_default("out"):
        out += f"-{experiment}"
    return Path(out.replace("<script>", script.name).replace("<preset>", args.preset))


def sweep_cells(script: Script, cfgs, device):
    """Every cell of the runs' configs, in order (the same cell twice is run once)."""
    return [c for cfg in cfgs for c in make_cells(cfg, script.axes, device, script.groups(cfg) if script.groups
                                                  else None)]


def run(script: Script):
    """Parse the flags, then redraw a saved run (--plot-only), test saved models again (--eval-only), or
    run the sweep; then report."""
    parser = make_parser(script)
    args = parser.parse_args()
    cfgs = run_configs(args, script)
    if args.plot_only:
        recs, cfg = saved_run(args.plot_only, script.config, mixed=len(cfgs) > 1)
        prepare_out(Path(args.plot_only), "--plot-only")
        return report(script, recs, cfg, Path(args.plot_only))
    C.check(args.jobs >= 0, f"--jobs must be >= 0, got {args.jobs}")
    shard = parse_shard(args.shard)
    if args.eval_only:
        return eval_only(script, args, shard)
    for cfg in cfgs:
        if script.validate:
            script.validate(cfg)
    device = pick_device(args.device, cfgs[0])
    out = out_dir(args, parser, script)
    prepare_out(out)
    cells, jobs = sweep_cells(script, cfgs, device), jobs_for(args, device)
    check_memory(script, cells, device, jobs)
    if script.examples:
        script.examples(cfgs[0])
    runner = TrainAndEvaluate(script, out / "cells", args.save_models)
    records = run_sweep(cells, runner, out, jobs, shard, args.fresh)
    write_results(out, records, cfgs[0], environment(device, cfgs[0]))
    report(script, records, cfgs[0], out)


def memory_needed(script, cell, cfg):
    """{part: bytes} one cell process needs at most, for fp32: the model with its gradients and AdamW's
    two moments (16 B a parameter); a training batch's activations (~34 floats a token, layer and
    channel, and three copies of the attention matrix, which the math attention path keeps); the
    largest test set, which evaluation holds in memory (three int64 tensors a token); one evaluation or
    calibration forward (2**16 tokens, the most either runs at once; ~16 live floats a token and channel)."""
    with torch.device("meta"):  # shapes only
        model = script.build(cell)
    params = sum(p.numel() for p in model.parameters())
    t_train, t_test = script.seq_lens(cell)
    L, d, h = model.cfg.n_layer, model.cfg.n_embd, model.cfg.n_head
    return {"the model and its optimizer state": 16 * params,
            "a training batch": 4 * cfg.batch_size * t_train * L * (34 * d + 3 * h * t_train),
            "the largest test set": 24 * cfg.eval_examples * t_test,
            "an evaluation or calibration batch": 4 * 2**16 * 16 * d}


def check_memory(script, cells, device, jobs):
    """Refuse, before any training, sizes this machine cannot hold (an absurd --n-embd, --batch-size or
    --eval-examples), with the estimate, instead of an out-of-memory crash hours later."""
    if script.seq_lens is None:
        return
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    if device.type == "cuda":
        have = min(have, torch.cuda.get_device_properties(0).total_memory * torch.cuda.device_count())
    for cell in one_per_shape(cells):
        parts, label = memory_needed(script, cell, script.config(**cell["config"])), R.cell_label(
            {k: v for k, v in cell.items() if k != "seed"})
        need = sum(parts.values()) * min(jobs, len(cells))
        worst = max(parts, key=parts.get)
        C.check(not have or need <= 0.8 * have,
                f"{label} would need about {gigabytes(need)} of memory ({worst}: "
                f"{gigabytes(parts[worst])}{f', x {min(jobs, len(cells))} jobs' if min(jobs, len(cells)) > 1 else ''}), "
                f"more than this machine's {gigabytes(have)}: use smaller sizes (--n-embd, --batch-size, "
                "--eval-examples, test lengths) or fewer --jobs")


def one_per_shape(cells):
    """One cell of each model shape and setting: cells that differ only in their seed (and, for --eval-only
    cells, the weights they load) build the same model."""
    return list({cell_key({k: v for k, v in c.items() if k not in ("seed", "weights")}): c for c in cells}.values())


def gigabytes(n):
    return f"{n / 2**30:,.1f} GiB"


def report(script, records, cfg, out):
    """The script's report; records it cannot read (a cell file edited by hand, or written by another
    version of the script) end in one line, with the traceback saved in out/report-error.txt."""
    try:
        script.report(records, cfg, out)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        atomic_write(Path(out) / "report-error.txt", traceback.format_exc())
        raise C.UsageError(f"cannot report the results in {out} ({type(e).__name__}: {e}): a cell file of "
                           f"another shape (edited, or from another version of this script)? The traceback is in "
                           f"{Path(out) / 'report-error.txt'}; cell files are kept") from None


def jobs_for(args, device):
    """--jobs, or the default for the device; sets this process to one thread as well."""
    # Tiny models on CPU: one thread per process beats PyTorch's default team of threads (bench.py);
    # with several jobs each worker process is single-threaded anyway.
    torch.set_num_threads(1)
    return args.jobs or default_jobs(device)


def eval_only(script: Script, args, shard):
    """--eval-only DIR: every model saved in DIR tested again with the evaluation flags given. Each becomes
    a new cell in DIR (its config changed, and 'weights' naming the cell it loads), so its rows never
    mix with the originals', and a re-run resumes."""
    src = Path(os.path.expanduser(args.eval_only))
    C.check(src.is_dir(), f"--eval-only: no such results directory {src}")
    given, axes = given_flags(args, script), {f: cf for cf, f in script.axes.items()}  # config field -> cell field
    only = {axes[f]: seed_list(v) if f == "seeds" else v for f, v in given.items() if f in axes}  # --tasks argmax
    given = {f: v for f, v in given.items() if f not in axes}
    bad = [flag_name(f) for f in given if f not in script.eval_fields]
    C.check(not bad, f"--eval-only changes evaluation settings only ({', '.join(map(flag_name, script.eval_fields))}) "
                     f"and picks models by {', '.join(map(flag_name, axes))}; {', '.join(bad)} would need new models: "
                     "run a sweep instead")
    saved = [r for r in load_cells(src) if r["status"] == "ok" and "weights" not in r["cell"]
             and (src / "cells" / f"{cell_key(r['cell'])}.pt").exists()
             and all(r["cell"].get(cf) in values for cf, values in only.items())]
    C.check(saved, f"--eval-only: no saved models in {src / 'cells'}" + (" of the models picked" if only else "") +
            " (a sweep saves them unless --save-models false)")
    cfg = script.config(**{**saved[0]["cell"]["config"], **given})
    device = pick_device(args.device, cfg)
    new = {}  # saved models whose configs differ only in evaluation fields give one cell: the first's
    for r in saved:
        cell = {**r["cell"], "device": device.type, "config": {**r["cell"]["config"], **given}}
        new.setdefault(cell_key(cell), ({**cell, "weights": cell_key(r["cell"])}, r))
    cells, originals = [c for c, _ in new.values()], {c["weights"]: r["cell"] for c, r in new.values()}
    for cell in cells:
        read_weights(src / "cells" / f"{cell['weights']}.pt")  # a damaged file: found before any evaluation
    for cell in one_per_shape(cells):
        check_fields(script.config(**cell["config"]))
        if script.validate:
            script.validate(script.config(**cell["config"]))
        check_same_model(script, cell, originals[cell["weights"]])
    prepare_out(src, "--eval-only")
    jobs = jobs_for(args, device)
    check_memory(script, cells, device, jobs)
    print(f"eval-only: {len(cells)} saved model(s) in {src}, tested with "
          f"{', '.join(f'{flag_name(k)} {shown(v)}' for k, v in given.items()) or 'their own settings'}")
    records = run_sweep(cells, EvaluateSaved(script, src / "cells"), src, jobs, shard, args.fresh)
    write_results(src, records, cfg, environment(device, cfg))
    report(script, records, cfg, src)


def check_same_model(script, cell, original):
    """Refuse an evaluation setting that would build the model differently from the one trained (a
    larger lookup key table, a longer position table): the weights would not fit, or mean something else."""
    with torch.device("meta"):  # shapes only: no memory, no time
        new, old = script.build(cell), script.build(original)
    diff = [f"{f.name} {getattr(old.cfg, f.name)} -> {getattr(new.cfg, f.name)}" for f in fields(old.cfg)
            if getattr(old.cfg, f.name) != getattr(new.cfg, f.name)]
    shapes_new, shapes_old = ({k: tuple(v.shape) for k, v in m.state_dict().items()} for m in (new, old))
    diff += [f"{k} {shapes_old.get(k)} -> {shapes_new.get(k)}" for k in sorted(set(shapes_new) | set(shapes_old))
             if shapes_new.get(k) != shapes_old.get(k)]
    C.check(not diff, f"--eval-only: with these settings the {R.cell_label(original)} model would be built "
                      f"differently from the one trained ({'; '.join(diff[:3])}): testing that needs new models")


def interrupted(signum, frame):
    raise KeyboardInterrupt


class Tolerant:
    """stdout or stderr that never ends a run: once a write fails (a closed pipe: `| head -1`; a full
    disk: `>/dev/full`; a closed stream: `>&-`) output goes to /dev/null, and characters the encoding
    lacks (PYTHONIOENCODING=ascii) are replaced. Results go to files and are not affected."""

    def __init__(self, stream):
        self.stream = stream if stream is not None else open(os.devnull, "w")
        try:
            self.stream.reconfigure(errors="replace")
        except (AttributeError, OSError, ValueError):
            pass

    def write(self, text):
        try:
            return self.stream.write(text)
        except (OSError, ValueError):
            self._drop()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except (OSError, ValueError):
            self._drop()

    def _drop(self):
        try:  # what is still buffered goes to /dev/null too, or Python complains once more at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        self.stream = open(os.devnull, "w")

    def __getattr__(self, name):  # isatty, encoding, fileno, ... of the stream in use
        return getattr(self.stream, name)


def tolerant_streams():
    if not isinstance(sys.stdout, Tolerant):
        sys.stdout, sys.stderr = Tolerant(sys.stdout), Tolerant(sys.stderr)


def main(script: Script):
    """Run the script; bad input -> one 'error: ...' line and exit 2; a file-system fault (a full disk, a
    directory that turned read-only) or a dead worker -> one line and exit 3; Ctrl-C, SIGTERM or SIGHUP
    (what a cluster scheduler sends) -> exit 130. Finished cells are kept in every case: re-running the
    same command resumes."""
    tolerant_streams()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where the shell started us ignoring it (&)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    try:
        run(script)
    except C.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except OSError as e:  # WorkerDied too
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; finished cells are kept: re-run the same command to resume "
              "once this is fixed", file=sys.stderr)
        sys.exit(EXIT_IO)
    except KeyboardInterrupt:
        print("\ninterrupted: finished cells are saved; re-run the same command to resume", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)

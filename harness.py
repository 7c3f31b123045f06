"""harness.py: the sweep around an experiment. No result depends on it; read it to run things.

  cells      make_cells(): one cell per combination of a script's declared axes, keyed by its whole
             config (cell_key); TrainAndEvaluate (a cell start to end); --eval-only's cells (saved_models.py)
  the sweep  run_sweep(): cells in parallel processes (the pool), shards, one atomic file per finished
             cell and its saved weights, resume; progress bars that move within a cell
  files      write_results() (results.json, results.csv), load_results() and saved_run() for --plot-only
  main       Script (what a script declares), run(), eval_only(), main(): one error line and exit
             status per kind of fault (2 bad input, 3 a file-system or device fault, 130 interrupted)

The flags come from cli.py, the fault guards (atomic writes, record checks, the memory estimate,
tolerant streams) from faults.py. A script declares a Script and its __main__ is `harness.main(SCRIPT)`.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

import common as C
import reporting as R
from cli import (check_fields, check_mode_flags, flag_name, given_flags, jobs_for, make_parser, out_dir, parse_shard,
                 pick_device, run_configs, shown)
from faults import (EXIT_INTERRUPTED, EXIT_IO, EXIT_USAGE, HANGUPS, WorkerDied, atomic_write, check_memory, check_record,
                    check_row_types, device_fault, interrupted, one_per_shape, prepare_out, read_json,
                    remove_stale_temp_files, start_resource_tracker, tolerant_streams)
from saved_models import EvaluateSaved, check_saved_models, save_weights


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


def cell_key(cell):
    return hashlib.sha1(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:16]


class TrainAndEvaluate:
    """One cell, start to end, in any process (picklable): seed torch with the cell's seed (the init
    seed; each script's train() draws its data from a seed of its own), build, train, save the weights
    next to the cell file (cells/<key>.pt), evaluate."""

    def __init__(self, script, cell_dir, save_models=True):
        self.script, self.cell_dir, self.save_models = script, Path(cell_dir), save_models

    def __call__(self, cell):
        script, cfg = self.script, self.script.config(**cell["config"])
        torch.manual_seed(cell["seed"])
        model = script.build(cell, cfg)
        out = script.train(model, cell, cfg)  # common.train holds cfg.tf32 itself
        if self.save_models:
            save_weights(model, self.cell_dir / f"{cell_key(cell)}.pt")
        with C.matmul_precision(cfg.tf32):  # every test under the training's precision
            return {**out, **script.evaluate(model, cell, cfg)}


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
    by_key = {cell_key(c): c for c in cells}  # the same cell asked twice runs once
    cell_dir = Path(out_dir) / "cells"
    cell_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(cell_dir)
    atomic_write(Path(out_dir) / "sweep.json", json.dumps({"cells": list(by_key)}))
    i, n = shard
    mine = [k for j, k in enumerate(by_key) if j % n == i]
    C.check(mine, f"--shard {i}/{n}: this shard has no cells (the sweep has {len(by_key)}; shards {len(by_key)}/{n} "
                  f"to {n - 1}/{n} are empty)")
    done = {p.stem for p in cell_dir.glob("*.json")} if not fresh else set()
    todo = [by_key[k] for k in mine if k not in done]
    load_cells(out_dir, keys=[k for k in mine if k in done])  # a broken one: one line, before training
    jobs = max(1, min(jobs, len(todo)))
    print(f"sweep: {len(by_key)} cells, {len(mine)} in shard {i}/{n}, {len(mine) - len(todo)} already "
          f"done, running {len(todo)} with {jobs} job(s)")
    bar = CellBar(len(todo))
    try:
        if jobs == 1 or len(todo) < 2:
            for c in todo:  # the cell's own training bar shows its steps
                _run_and_save(run_cell, cell_dir, c)
                bar.show(bar.finished + 1, 0.0)
        else:
            _run_in_pool(run_cell, cell_dir, todo, jobs, bar)
    finally:  # closed now, so that an error or 'interrupted' line is the last thing printed
        bar.close()
    return load_cells(out_dir, keys=list(by_key))


class CellBar(tqdm):
    """The sweep's bar in whole cells ('4/10 done, ~3:10 left'), moved by the cells in flight too; time
    left is elapsed time scaled by what is left, once a cell has finished (before, a start-up guess)."""

    def __init__(self, total):
        super().__init__(total=total, desc="cells", disable=total < 2, bar_format=f"{{desc}}: |{{bar}}| 0/{total} done")
        self.show(0, 0.0)

    def show(self, finished, in_flight):
        self.finished, self.n = finished, finished + in_flight
        if self.disable:
            return
        left = self.format_dict["elapsed"] * (self.total - self.n) / self.n if finished else None
        text = f"{finished}/{self.total} done" + (f", ~{self.format_interval(left)} left" if left is not None else "")
        self.bar_format = "{desc}: {percentage:3.0f}%|{bar}| " + text + " [{elapsed}]"
        self.refresh()


def _run_in_pool(run_cell, cell_dir, todo, jobs, bar):
    """Cells in `jobs` spawned processes (safe with CUDA and threads; each worker single-threaded).
    The bar moves from the first seconds: finished cells plus the trained fraction of those in flight,
    which the workers write to a shared array (report_progress). A worker that dies breaks the pool:
    the sweep stops with WorkerDied (exit 3) instead of waiting for a cell that will never finish."""
    ctx = mp.get_context("spawn")
    start_resource_tracker()  # before the pool: one that a hang-up cannot kill
    shared = ctx.RawArray("d", jobs)  # no lock, no semaphore: each worker writes its own slot
    on_cuda = any(c.get("device") == "cuda" for c in todo)  # a CPU run never touches a GPU it may have
    pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(1, shared, on_cuda))
    try:
        pending = {pool.submit(functools.partial(_run_and_save, run_cell, cell_dir), c) for c in todo}
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for f in done:
                f.result()  # a cell's own error, or BrokenProcessPool
            bar.show(len(todo) - len(pending), sum(shared[:]))
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


# =============================================================================================
# Results
# =============================================================================================


def load_cells(out_dir, keys=None):
    """Finished cell records under out_dir/cells (only `keys` if given), in a stable order."""
    cell_dir = Path(out_dir) / "cells"
    paths = sorted(cell_dir.glob("*.json")) if keys is None else \
        [cell_dir / f"{k}.json" for k in keys if (cell_dir / f"{k}.json").exists()]
    recs = [read_json(p) for p in paths]
    for p, r in zip(paths, recs):
        check_record(r, p)
    check_row_types(recs, paths)
    return sorted(recs, key=record_order)  # the same order for a run, a re-run and --plot-only


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


def recorded_environment(out_dir):
    """The environment results.json recorded for the sweep (--plot-only keeps it), or None."""
    try:
        return read_json(Path(out_dir) / "results.json").get("environment")
    except (C.UsageError, AttributeError):  # none, or unreadable: the cells are the results
        return None


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
    res = read_json(out_dir / "results.json")
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
    run), one setting is shown, so that no seed counts twice: the last sweep's (last_sweep_setting)."""
    recs, script = load_results(out_dir), script_of(config_cls)
    names = {f.name for f in fields(config_cls)}
    mine = [r for r in recs if set(r["cell"].get("config", {})) <= names and r.get("script") in (None, script)]
    C.check(mine, f"--plot-only: {out_dir} holds no results of {script}.py" +
            (" (they were written by another script or another version of this script)" if recs else ""))
    if len(mine) < len(recs):
        print(f"note: {len(recs) - len(mine)} result(s) in {out_dir} come from another script or another "
              "version of this script; ignored")
    mine = one_setting(out_dir, mine, mixed)
    missing = unfinished(out_dir)
    if missing:
        print(f"note: {missing} cell(s) of the last sweep into {out_dir} have no results (an unfinished run, or "
              "other shards): the tables show the finished ones; re-run its command to finish it")
    return mine, config_cls(**mine[0]["cell"]["config"])


def one_setting(out_dir, recs, mixed=False):
    """The records of one setting (last_sweep_setting's), so that no seed counts twice; a note names the others."""
    groups = {}
    for r in recs:
        groups.setdefault(setting_text(r, mixed), []).append(r)
    if len(groups) == 1:
        return recs
    names, shown_key = setting_names(groups), last_sweep_setting(out_dir, groups)
    print(f"note: {out_dir} holds cells of {len(groups)} settings (" +
          "; ".join(f"{names[s]}: {len(v)} cells" for s, v in groups.items()) +
          f"); shown: {names[shown_key]}, the setting of the last sweep into it, so that no seed counts twice")
    return groups[shown_key]


def last_sweep_setting(out_dir, groups):
    """The setting most of whose cells the last sweep into out_dir planned (sweep.json); without one, the
    setting with the most cells (the first in record order on a tie)."""
    plan = Path(out_dir) / "sweep.json"
    last = set(read_json(plan).get("cells", [])) if plan.exists() else set()
    return max(groups, key=lambda s: (sum(cell_key(r["cell"]) in last for r in groups[s]), len(groups[s])))


def setting_names(groups):
    """{setting: what tells it apart from the others}: the config fields that differ, the device, --eval-only."""
    sets = {s: json.loads(s) for s in groups}
    cfgs = [v["config"] or {} for v in sets.values()]
    differ = sorted({k for c in cfgs for k in c if len({json.dumps(d.get(k)) for d in cfgs}) > 1})
    names = {}
    for s, v in sets.items():
        parts = [f"{k}={json.dumps(v['config'].get(k))}" for k in differ if v["config"]]
        parts += [f"device {v['device']}"] if len({x["device"] for x in sets.values()}) > 1 else []
        if len({x["eval_only"] for x in sets.values()}) > 1:
            parts.append("--eval-only" if v["eval_only"] else "trained")
        names[s] = ", ".join(parts) or "the same"
    return names


def unfinished(out_dir):
    """How many cells that the last sweep into out_dir planned (sweep.json) have no cell file."""
    plan = Path(out_dir) / "sweep.json"
    if not plan.exists():
        return 0
    planned = read_json(plan)
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
      build        (cell, cfg) -> the cell's model, untrained (torch is seeded with the cell's seed first);
                   cfg: the cell's config dataclass, as in train, evaluate and seq_lens
      train        (model, cell, cfg) -> {'train': ...}: trains in place; raises common.Diverged to record a
                   diverged run
      evaluate     (model, cell, cfg) -> {'rows': [...], ...}: tests a trained model (also a saved one: --eval-only)
      eval_fields  the config fields that only evaluation reads: the ones --eval-only may change
      seq_lens     (cell, cfg) -> (longest training sequence, longest test sequence) in tokens: for the memory
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


def sweep_cells(script: Script, cfgs, device):
    """Every cell of the runs' configs, in order (the same cell twice is run once)."""
    return [c for cfg in cfgs for c in make_cells(cfg, script.axes, device, script.groups(cfg) if script.groups
                                                  else None)]


def run(script: Script):
    """Parse the flags, then redraw a saved run (--plot-only), test saved models again (--eval-only), or
    run the sweep; then report."""
    parser = make_parser(script)
    args = parser.parse_args()
    check_mode_flags(args, parser, script)
    cfgs = run_configs(args, script)
    if args.plot_only:
        out = Path(args.plot_only)
        recs, cfg = saved_run(out, script.config, mixed=len(cfgs) > 1)
        prepare_out(out, "--plot-only")
        if (out / "cells").is_dir():  # results.json and .csv of the setting shown, from the cells (kept as they are)
            write_results(out, recs, cfg, recorded_environment(out))
        return script.report(recs, cfg, out)
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
    script.report(records, cfgs[0], out)


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
    recs, names = load_cells(src), {f.name for f in fields(script.config)}
    other = sorted({k for r in recs for k in r["cell"]["config"] if k not in names})
    C.check(not other, f"--eval-only: {src} holds results of another script (config fields {', '.join(other[:3])} "
                       f"are not {script.name}.py's): run that script's --eval-only")
    saved = [r for r in recs if r["status"] == "ok" and "weights" not in r["cell"]
             and any(f(src / "cells" / f"{cell_key(r['cell'])}.pt") for f in (Path.exists, Path.is_symlink))
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
    for cell in one_per_shape(cells):
        check_fields(script.config(**cell["config"]))
        if script.validate:
            script.validate(script.config(**cell["config"]))
    check_saved_models(script, cells, originals, src / "cells")
    prepare_out(src, "--eval-only")
    jobs = jobs_for(args, device)
    check_memory(script, cells, device, jobs)
    print(f"eval-only: {len(cells)} saved model(s) in {src}, tested with "
          f"{', '.join(f'{flag_name(k)} {shown(v)}' for k, v in given.items()) or 'their own settings'}")
    records = run_sweep(cells, EvaluateSaved(script, src / "cells"), src, jobs, shard, args.fresh)
    write_results(src, records, cfg, environment(device, cfg))
    script.report(one_setting(src, records), cfg, src)


def main(script: Script):
    """Run the script; bad input -> one 'error: ...' line and exit 2; a file-system fault (a full disk, a
    directory that turned read-only) or a dead worker -> one line and exit 3; Ctrl-C, SIGTERM, SIGHUP or
    SIGUSR1/2 (what a cluster scheduler sends) -> exit 130. Finished cells are kept in every case:
    re-running the same command resumes."""
    tolerant_streams()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where the shell started us ignoring it (&)
    for sig in (signal.SIGTERM, *HANGUPS):
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

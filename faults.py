"""faults.py: the guards that keep a sweep's results whole and its errors to one line. No result depends
on it; harness.py calls it.

  files      atomic_write (a file exists only whole), stale temp files of killed runs, prepare_out (a
             writable folder, checked before any work)
  records    read_json, check_record and check_row_types (a cell file of another shape is one line naming
             it); the checks of saved models are in saved_models.py
  memory     memory_needed / check_memory: sizes this machine cannot hold are refused before training
  devices    DeviceFault: a cell that runs out of (GPU) memory or meets a device error; WorkerDied
  streams    Tolerant stdout/stderr (a closed pipe never ends a run); interrupted (SIGTERM, SIGHUP)
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from multiprocessing import resource_tracker
from pathlib import Path

import torch

import common as C
import reporting as R

EXIT_USAGE, EXIT_IO, EXIT_INTERRUPTED = 2, 3, 130  # bad input; a file-system or device fault; Ctrl-C


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


MAX_JSON_BYTES = 1 << 30  # a results file is kilobytes to megabytes; a larger one is not this harness's


def read_json(path):
    """A results file's JSON; a file that is not one (truncated, nested too deep, too large) is one line."""
    try:
        if not Path(path).is_file():  # a named pipe would block the read forever
            raise ValueError("not a regular file")
        size = Path(path).stat().st_size
        if size > MAX_JSON_BYTES:
            raise ValueError(f"{size / 2**30:.1f} GiB, far larger than any results file")
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError, MemoryError) as e:  # RecursionError: lists nested 1000s deep
        raise C.UsageError(f"cannot read results file {path}: {str(e).splitlines()[0][:200]}; delete it and re-run") from None


def check_record(rec, path):
    """A cell record of the shape this harness writes: a cell (ids and a config), a status, tidy rows."""
    ok = isinstance(rec, dict) and {"cell", "rows", "status"} <= rec.keys() and isinstance(rec["cell"], dict) \
        and isinstance(rec["cell"].get("config"), dict) and isinstance(rec["status"], str) \
        and isinstance(rec["rows"], list) and all(isinstance(r, dict) for r in rec["rows"])
    ids = [k for k in rec["cell"] if k != "config"] if ok else []
    ok = ok and all(k in r for r in rec["rows"] for k in ids)  # each row carries its cell's ids
    C.check(ok, f"corrupt results file {path}: not a cell record (a cell with its config, a status, rows with "
                "the cell's ids); delete it and re-run")


def value_kind(v):
    return None if v is None else "bool" if isinstance(v, bool) else "number" if isinstance(v, (int, float)) \
        else type(v).__name__


def check_row_types(recs, paths):
    """Each row field holds one kind of value (number, text, ...) in every cell file of a folder; a file
    where it holds a kind the other files do not (a number become text: edited by hand) is named in one line."""
    kinds = {}  # field -> {kind: [paths]}
    for rec, path in zip(recs, paths):
        for row in rec["rows"]:
            for k, v in row.items():
                if value_kind(v):
                    kinds.setdefault(k, {}).setdefault(value_kind(v), []).append(path)
    for k, by_kind in kinds.items():
        if len(by_kind) > 1:
            (rare, where), (usual, _) = sorted(by_kind.items(), key=lambda kv: len(kv[1]))[:2]
            C.check(False, f"corrupt results file {where[0]}: row field {k!r} holds a {rare} where the other "
                           f"cells hold a {usual}; delete it and re-run")


RESULT_FILES = ("results.json", "results.csv", "claims.json", "summary.txt", "sweep.json")  # written in the out folder


def prepare_out(out, flag="--out"):
    """Check before any work that results can be written under `out`: a directory, writable, whose
    result files, where they exist, are files (a folder in their place is found now, not after training)."""
    C.check(not out.exists() or out.is_dir(), f"{flag} {out} is a file, not a directory")
    cells = out / "cells"
    C.check(cells.is_dir() or not (cells.exists() or cells.is_symlink()),
            f"{flag} {out}: {cells} must be the folder of cell files, and it is a file or a broken link: move it away")
    for name in RESULT_FILES:
        C.check(not (out / name).exists() or (out / name).is_file(),
                f"{flag} {out}: {out / name} must be a file (it is written there), and it is not: move it away")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise C.UsageError(f"{flag} {out} is not writable ({e.strerror or e}): results, figures and the summary "
                           "are written there") from None


def memory_needed(script, cell, cfg):
    """{part: bytes} one cell process needs at most, for fp32: the model with its gradients and AdamW's
    two moments (16 B a parameter); a training batch's activations (~34 floats a token, layer and
    channel, and three copies of the attention matrix, which the math attention path keeps); the
    largest test set, which evaluation holds in memory (three int64 tensors a token); one evaluation or
    calibration forward (2**16 tokens, the most either runs at once; ~16 live floats a token and channel)."""
    with torch.device("meta"):  # shapes only
        model = script.build(cell, cfg)
    params = sum(p.numel() for p in model.parameters())
    t_train, t_test = script.seq_lens(cell, cfg)
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
    shape = lambda c: json.dumps({k: v for k, v in c.items() if k not in ("seed", "weights")}, sort_keys=True)
    return list({shape(c): c for c in cells}.values())


def gigabytes(n):
    return f"{n / 2**30:,.1f} GiB"


class WorkerDied(OSError):
    """A --jobs worker process died (killed, out of memory, a crash) or could not start."""


class DeviceFault(OSError):
    """A cell ran out of memory or met an accelerator runtime error: the sweep ends with one line (exit 3)."""


def device_fault(cell, e):
    kind = "ran out of memory" if isinstance(e, torch.OutOfMemoryError) else "met a device error"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return DeviceFault(f"cell {R.cell_label(cell)} {kind} on {cell.get('device', 'its device')} ({first}): "
                       "run fewer cells at once (a lower --jobs) or smaller sizes")


HANGUPS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)  # what a closed terminal or Slurm sends, beside SIGTERM


def start_resource_tracker():
    """Start multiprocessing's resource tracker (one helper process per run) with HANGUPS ignored. It
    ignores SIGINT and SIGTERM by itself but not these: one sent to the whole process group (a closed
    terminal, Slurm's scancel or --signal) would kill it, and the tracker started in its place prints a
    KeyError traceback for each semaphore of the old one. SIG_IGN survives the exec that starts it."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in HANGUPS}
    try:
        resource_tracker.ensure_running()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


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

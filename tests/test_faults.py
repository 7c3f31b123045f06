"""Bad input and faults end in one 'error: ...' line and a documented exit status, before any training
where the input can be checked up front, and lose nothing already computed: one case per class of
input across the three scripts, the file system under --out (a file, read-only, full), every cell
diverging, and --plot-only on results another script wrote."""
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import common as C
import faults
import harness as H
import toy_experiment as T
from inprocess import run_main, with_flags
from test_cli import ENV, TOY

ROOT = Path(__file__).resolve().parent.parent
VV, PA, SP = "vanishing_variance.py", "parity_random_access.py", "sparse_planted.py"


def run(script, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / script), *with_flags(["--preset", "smoke", "--device", "cpu"], args)],
                          capture_output=True, text=True, timeout=timeout)


def inproc(script, *args):  # python SCRIPT --preset smoke --device cpu ARGS, in this process
    return run_main(importlib.import_module(script[:-3]).SCRIPT, *with_flags(["--preset", "smoke", "--device", "cpu"], args))


def toy(*args, check=True):  # python tests/toy_experiment.py --device cpu --jobs 1 ARGS, in this process
    p = run_main(T.SCRIPT, *with_flags(["--device", "cpu", "--jobs", "1"], args))
    assert not check or p.returncode == 0, p.stderr[-2000:]
    return p


def one_error_line(p, status, msg):
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == status, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and last.startswith("error: ") and msg in last, p.stderr[-2000:]


BAD = [  # (script, flags, part of the message): every class of bad input, checked before any training
    (VV, ["--steps", "1.5"], "invalid integer value"),                   # argparse types, named
    (VV, ["--test-lengths", "16,x"], "invalid comma-separated integer"),
    (VV, ["--mlp", "maybe"], "invalid true/false value"),
    (VV, ["--bogus-flag"], "unrecognized arguments"),
    (VV, ["--lr", "inf"], "finite"),                                     # numbers out of range
    (VV, ["--min-lr-frac", "2"], "--min-lr-frac must be <= 1"),
    (VV, ["--n-embd", "30"], "divisible by --n-head"),                   # constraints between flags
    (VV, ["--keep-lengths", "99"], "not among --test-lengths"),
    (VV, ["--train-len", "5000"], "must reach beyond --train-len"),
    (PA, ["--add-train-max", "50"], "--add-train-max 50 beyond"),
    (PA, ["--train-max", "100"], "--map-length 40 must reach --train-max 100"),
    (PA, ["--n-embd", "36", "--n-head", "4"], "even head size"),
    (SP, ["--windows", "100"], "must hold the largest window 100"),
    (SP, ["--n-embd", "30"], "divisible by --n-head"),
    (SP, ["--studies", "ppc", "--ppc-max", "30"], "--ppc-max 30 beyond"),
    (VV, ["--n-embd", "65536"], "the model and its optimizer state"),    # sizes no machine here holds
    (VV, ["--batch-size", "5e7"], "a training batch"),
    (VV, ["--eval-examples", "1e8"], "the largest test set"),
    (VV, ["--test-lengths", "16,100000000", "--keep-lengths", "16"], "the largest test set"),
    (PA, ["--shard", "-1/2"], "is given as --flag=VALUE"),              # argparse reads -1/2 as a flag
]


@pytest.mark.parametrize("script,args,msg", BAD, ids=[f"{s[:-3]} {' '.join(a)}" for s, a, _ in BAD])
def test_bad_input_is_one_line_before_any_training(script, args, msg, tmp_path):
    p = inproc(script, "--out", tmp_path, *args)
    one_error_line(p, H.EXIT_USAGE, msg)
    assert "sweep:" not in p.stdout  # refused before the sweep started


def test_bad_input_from_the_command_line_is_the_same_line(tmp_path):
    """One case through a fresh process: the in-process cases above see what a user sees."""
    one_error_line(run(PA, "--out", str(tmp_path), "--add-train-max", "50"), H.EXIT_USAGE, "--add-train-max 50 beyond")


def test_out_and_plot_only_that_are_files(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    one_error_line(inproc(VV, "--out", str(f)), H.EXIT_USAGE, "is a file, not a directory")
    one_error_line(inproc(VV, "--plot-only", str(f)), H.EXIT_USAGE, "is a file, not a results directory")


@pytest.mark.parametrize("what", ["a file", "a link to itself"])
def test_cells_that_is_no_folder_is_bad_input_before_any_training(what, tmp_path):
    (tmp_path / "cells").write_text("x") if what == "a file" else (tmp_path / "cells").symlink_to(tmp_path / "cells")
    p = toy("--preset", "smoke", "--out", tmp_path, check=False)
    one_error_line(p, H.EXIT_USAGE, "cells must be the folder of cell files")
    assert "sweep:" not in p.stdout


def test_every_cell_diverging_still_writes_summary_and_figure(tmp_path):
    p = inproc(VV, "--jobs", "1", "--lr", "1000", "--tasks", "argmax", "--seeds", "1", "--variants", "none,layernorm",
            "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert "2 of 2 cell(s) diverged" in summary and "--lr 1000.0" in summary and "variant=layernorm" in summary
    assert (tmp_path / "training.png").stat().st_size > 5_000
    res = json.loads((tmp_path / "results.json").read_text())
    assert [c["status"] for c in res["cells"]] == ["diverged", "diverged"]
    p = inproc(VV, "--plot-only", str(tmp_path))  # and the same from the saved results
    assert p.returncode == 0 and "2 of 2 cell(s) diverged" in p.stdout, p.stderr[-2000:]


def test_plot_only_refuses_results_of_another_script(tmp_path):
    toy("--preset", "smoke", "--seeds", "1", "--out", str(tmp_path))
    for script in (VV, PA, SP):
        one_error_line(run(script, "--plot-only", str(tmp_path)), H.EXIT_USAGE, "written by another script")
    (tmp_path / "results.json").unlink()
    one_error_line(inproc(VV, "--plot-only", str(tmp_path)), H.EXIT_USAGE, "written by another script")


def test_atomic_write_leaves_no_temp_file_on_a_full_disk(tmp_path, monkeypatch):
    target = tmp_path / "cell.json"
    target.write_text("old")

    def full(self, text):
        Path.write_bytes(self, text[:3].encode())  # half written, then the disk is full
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="No space left") as e:
        faults.atomic_write(target, "new contents")
    assert e.value.filename == str(target)
    monkeypatch.undo()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["cell.json"]


@pytest.fixture
def tmpfs(tmp_path):
    """A tiny file system (tmpfs) of 160 KiB: room for two of the toy's cells (a record and its
    saved model each). Needs root."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_a_disk_that_fills_up_mid_sweep(tmpfs):
    p = toy("--preset", "smoke", "--jobs", "1", "--out", str(tmpfs / "run"), check=False)
    one_error_line(p, H.EXIT_IO, "No space left on device")
    assert "re-run the same command to resume" in p.stderr
    cells = [c for c in (tmpfs / "run" / "cells").iterdir() if c.suffix != ".pt"]
    assert 1 <= len(cells) < 4 and all(c.suffix == ".json" and not c.name.startswith(".") for c in cells)
    assert all(json.loads(c.read_text())["status"] == "ok" for c in cells)  # what finished is intact


def test_a_read_only_out(tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    p = toy("--preset", "smoke", "--out", str(tmpfs / "run"), check=False)
    one_error_line(p, H.EXIT_USAGE, "is not writable (Read-only file system)")


def test_plot_only_of_a_read_only_folder_is_refused_up_front(tmpfs):
    toy("--preset", "smoke", "--seeds", "1", "--variants", "none", "--out", str(tmpfs / "run"))
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    p = toy("--preset", "smoke", "--plot-only", str(tmpfs / "run"), check=False)
    one_error_line(p, H.EXIT_USAGE, "--plot-only")
    assert "is not writable" in p.stderr


def interrupt_toy(tmp_path, sig, jobs, group=False):
    """Start the toy sweep, send it `sig` after a few seconds, and return (exit status, stderr). SIGINT is
    ignored in the child's parent setting, as in a suite started as a background job (`&`). group: the
    sweep runs in a session of its own and the signal goes to its whole process group (workers and
    multiprocessing's helper included), as a closed terminal or Slurm's scancel sends it."""
    p = subprocess.Popen(TOY + ["--device", "cpu", "--preset", "smoke", "--steps", "3000", "--jobs", str(jobs),
                                "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=ENV, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
                         start_new_session=group)
    time.sleep(8)
    workers = [c for c in children(p.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text(errors="ignore")]
    os.killpg(p.pid, sig) if group else p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    return p.returncode, err, workers


def alive(pid):
    """A process that exists and is not a zombie (Linux /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig,group", [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGHUP, False),
                                       (signal.SIGHUP, True), (signal.SIGUSR1, True)],
                         ids=["ctrl-c", "sigterm", "sighup", "sighup to the group", "slurm's sigusr1 to the group"])
def test_an_interrupt_ends_with_one_line_and_keeps_finished_cells(tmp_path, sig, group):
    jobs = 2 if sig == signal.SIGINT or group else 1
    status, err, workers = interrupt_toy(tmp_path, sig, jobs, group)
    assert status == H.EXIT_INTERRUPTED, err[-2000:]
    assert workers or jobs == 1, "no worker started"
    assert not [w for w in workers if alive(w)]  # the --jobs workers are stopped, not left running
    assert err.strip().splitlines()[-1].startswith("interrupted: finished cells are saved")
    assert "Traceback" not in err and "leaked" not in err
    assert not [c for c in (tmp_path / "cells").iterdir() if c.name.startswith(".")]  # no temp files


def children(pid):
    """The process ids whose parent is pid (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_a_dead_worker_ends_the_sweep_with_one_line_instead_of_hanging(tmp_path):
    p = subprocess.Popen(TOY + ["--device", "cpu", "--preset", "smoke", "--steps", "3000", "--jobs", "2",
                                "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=ENV)
    deadline = time.time() + 60
    workers = []
    while time.time() < deadline and len(workers) < 2:
        time.sleep(0.5)
        workers = [c for c in children(p.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text(errors="ignore")]
    assert workers, "no worker started"
    time.sleep(3)
    subprocess.run(["kill", "-9", str(workers[0])], check=True)  # as the out-of-memory killer would
    _, err = p.communicate(timeout=120)  # no hang
    last = err.strip().splitlines()[-1]
    assert p.returncode == H.EXIT_IO, err[-2000:]
    assert last.startswith("error: a worker process died") and "Traceback" not in err, err[-2000:]


FAILING_INIT = """
if "--multiprocessing-fork" in open("/proc/self/cmdline").read():  # in --jobs workers only
    import torch

    def fail(n):
        raise RuntimeError("cannot set up this worker")
    torch.set_num_threads = fail  # the worker initializer fails, as torch.cuda.set_device can
"""


def test_workers_that_cannot_start_end_the_sweep_with_one_line(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(FAILING_INIT)
    p = subprocess.run(TOY + ["--device", "cpu", "--preset", "smoke", "--jobs", "2", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, env={**ENV, "PYTHONPATH": str(tmp_path / "site")}, timeout=120)
    one_error_line(p, H.EXIT_IO, "a worker process died or could not start")


@pytest.mark.parametrize("args,msg", [(["--test-lengths", "8,16,16"], "lists a value twice"),
                                      (["--variants", "none,none"], "lists a value twice"),
                                      (["--out", ""], "--out needs a directory name")])
def test_duplicates_and_an_empty_out_are_refused(args, msg, tmp_path):
    p = toy("--preset", "smoke", *args, check=False) if args[0] == "--out" else \
        toy("--preset", "smoke", "--out", str(tmp_path), *args, check=False)
    one_error_line(p, H.EXIT_USAGE, msg)


def test_a_truncated_cell_of_this_sweep_is_found_before_training(tmp_path):
    toy("--preset", "smoke", "--seeds", "1", "--out", str(tmp_path))
    cell = sorted((tmp_path / "cells").glob("*.json"))[0]
    cell.write_text('{"cell": 1}')  # valid JSON of the wrong shape
    p = toy("--preset", "smoke", "--seeds", "2", "--out", str(tmp_path), check=False)
    one_error_line(p, H.EXIT_USAGE, str(cell))
    assert "sweep:" not in p.stdout  # found before any training


STREAMS = {"closed pipe": "{cmd} | head -1", "full disk": "{cmd} >/dev/full", "closed streams": "{cmd} >&- 2>&-",
           "ascii terminal": "PYTHONIOENCODING=ascii {cmd}", "unknown MPLBACKEND": "MPLBACKEND=nonsense {cmd}",
           "stderr on a full disk": "{cmd} 2>/dev/full"}


@pytest.mark.parametrize("how", list(STREAMS))
def test_a_broken_stdout_or_backend_never_ends_a_run(how, tmp_path):
    cmd = " ".join(TOY + ["--device", "cpu", "--preset", "smoke", "--out", str(tmp_path)])
    p = subprocess.run(["bash", "-c", STREAMS[how].format(cmd=cmd) + "; echo status=${PIPESTATUS[0]}"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert "status=0" in p.stdout and "Traceback" not in p.stderr, p.stdout[-1000:] + p.stderr[-1000:]
    assert (tmp_path / "results.json").exists() and (tmp_path / "accuracy.png").exists()


def test_stale_temp_files_of_a_killed_run_are_removed(tmp_path):
    (tmp_path / "cells").mkdir()
    stale = tmp_path / "cells" / ".abc.json.99999999.1.tmp"  # no such process
    stale.write_text("half a cell")
    toy("--preset", "smoke", "--seeds", "1", "--variants", "none", "--out", str(tmp_path))
    assert not stale.exists() and not list((tmp_path / "cells").glob(".*"))


def test_plot_only_says_when_cells_of_the_sweep_are_missing(tmp_path):
    toy("--preset", "smoke", "--out", str(tmp_path))
    sorted((tmp_path / "cells").glob("*.json"))[0].unlink()
    p = toy("--preset", "smoke", "--plot-only", str(tmp_path))
    assert "1 cell(s) of the last sweep" in p.stdout


WRONG = {"rows not records": ([1, 2], "not a cell record"),
         "rows without the cell's ids": ([{"table": "accuracy", "length": 8, "accuracy": 1.0}], "not a cell record"),
         "a metric that is no number": ([{"table": "accuracy", "length": 8, "accuracy": "high"}],
                                        "row field 'accuracy' holds a str")}


@pytest.mark.parametrize("case", list(WRONG))
def test_a_cell_of_the_wrong_shape_is_one_line(case, tmp_path):
    rows, msg = WRONG[case]
    toy("--preset", "smoke", "--seeds", "1", "--out", str(tmp_path))
    cell = sorted((tmp_path / "cells").glob("*.json"))[0]
    rec = json.loads(cell.read_text())
    ids = {k: v for k, v in rec["cell"].items() if k != "config"} if "ids" not in case else {}
    cell.write_text(json.dumps({**rec, "rows": [{**ids, **r} if isinstance(r, dict) else r for r in rows]}))
    p = toy("--preset", "smoke", "--plot-only", str(tmp_path), check=False)
    one_error_line(p, H.EXIT_USAGE, msg)
    assert str(cell) in p.stderr


def test_plot_only_never_counts_a_seed_twice_when_cells_differ_outside_their_config(tmp_path, capsys):
    toy("--preset", "smoke", "--out", str(tmp_path))
    for f in sorted((tmp_path / "cells").glob("*.json")):  # the same cells, as if run on a GPU too
        rec = json.loads(f.read_text())
        rec["cell"]["device"] = "cuda"
        rec["rows"] = [{**r, "device": "cuda"} for r in rec["rows"]]
        (f.parent / f"{H.cell_key(rec['cell'])}.json").write_text(json.dumps(rec))
    recs, _ = H.saved_run(tmp_path, T.Config)
    assert len(recs) == 4 and len({(r["cell"]["variant"], r["cell"]["seed"]) for r in recs}) == 4
    assert {r["cell"]["device"] for r in recs} == {"cpu"}  # the setting of the last sweep into the folder
    cuda = [H.cell_key(r["cell"]) for r in H.load_cells(tmp_path) if r["cell"]["device"] == "cuda"]
    (tmp_path / "sweep.json").write_text(json.dumps({"cells": cuda}))
    recs, _ = H.saved_run(tmp_path, T.Config)
    assert {r["cell"]["device"] for r in recs} == {"cuda"} and len(recs) == 4
    assert "2 settings (device cpu: 4 cells; device cuda: 4 cells); shown: device cuda" in capsys.readouterr().out


@pytest.mark.parametrize("args,msg", [(["--steps=-5"], "--steps must be >= 0"), (["--steps", "x"], "invalid int value"),
                                      (["--bogus"], "unrecognized arguments"), (["--dtype", "fp16"], "invalid choice")])
def test_bench_bad_flags_are_one_line(args, msg, capsys):
    import bench
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    err = capsys.readouterr().err
    assert e.value.code == H.EXIT_USAGE and err.count("\n") == 1 and err.startswith("error: ") and msg in err, err


def test_bench_jobs_ends_with_one_line_when_a_process_dies():
    import bench
    with pytest.raises(SystemExit, match="a --jobs scaling process died"):
        bench.bench_jobs(C.torch.device("cpu"), "fp32", (2,), 5, worker=dies)


def dies(device_name, dtype, steps, barrier, queue):  # a --jobs scaling process killed before its window
    import os
    os._exit(9)


def test_bench_estimates_print_from_measured_numbers():
    import bench
    results = {name: {"train": {"ours": {"ms_step": 10.0}}} for name in bench.MODELS}
    bench.print_estimates(results, {1: 10.0, 2: 18.0})
    assert all(results[name]["paper_hours"] > 0 for name in bench.MODELS)

"""The fault probe: 100+ things a careful user, an adversary or a cluster does to a run, each checked for
what the user sees: an exit status from the documented set (0 done, 2 bad input, 3 a fault, 130
interrupted), no traceback, no hang, and on a refusal one 'error: ...' line naming what is wrong.
`python -m pytest tests/test_probe.py` runs it (in this process: ~1 s a case); `python tests/probe.py`
prints the table (case, exit status, last line).

A case is (name, script, flags, setup, exit status, part of the last line). In flags, RUN is a copy of a
finished smoke run of the toy experiment (4 cells with saved models), EMPTY an empty folder, NONE a
path that does not exist; setup(run) breaks the copy first."""
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import toy_experiment as T  # noqa: E402
from inprocess import run_main  # noqa: E402

VV, PA, SP, TOY = "vanishing_variance", "parity_random_access", "sparse_planted", "toy"
OK, USAGE, FAULT = 0, 2, 3


def first_cell(run, ext="json"):
    return sorted((run / "cells").glob(f"*.{ext}"))[0]


def write(path, text):
    def setup(run):
        p = run / path if isinstance(path, str) else path(run)
        p.unlink(missing_ok=True)
        p.write_text(text) if isinstance(text, str) else p.write_bytes(text)
    return setup


def edit_cell(change):
    def setup(run):
        p = first_cell(run)
        rec = json.loads(p.read_text())
        change(rec)
        p.write_text(json.dumps(rec))
    return setup


def replace_with(kind, what="cells/*.json"):
    """Replace the first cell file (or the named file) with a folder, a named pipe, a link to itself, ..."""
    def setup(run):
        p = first_cell(run, what.split(".")[-1]) if what.startswith("cells/*") else run / what
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
        {"dir": lambda: p.mkdir(), "fifo": lambda: os.mkfifo(p), "self-link": lambda: p.symlink_to(p.name),
         "dangling": lambda: p.symlink_to("/nonexistent/x"), "file": lambda: p.write_text("x")}[kind]()
    return setup


def sparse_file(run):  # a 2 GiB file of holes: read whole, it would take 2 GiB of memory
    with open(first_cell(run), "r+b") as f:
        f.truncate(2 << 30)


def settings_twice(run):  # seed 0 of 'none' trained again at other steps: two settings in one folder
    run_main(T.SCRIPT, "--device", "cpu", "--jobs", "1", "--preset", "smoke", "--seeds", "1", "--variants", "none",
             "--steps", "40", "--out", run)


def state(change):
    def setup(run):
        import torch
        p = first_cell(run, "pt")
        sd = torch.load(p, weights_only=True)
        torch.save(change(sd), p)
    return setup


def nested(depth):
    return '{"cell": ' + "[" * depth + "]" * depth + "}"


CASES = [
    # --- numbers and names on the command line
    ("seeds: a hundred million", TOY, ["--seeds", "0-100000000"], None, USAGE, "a sweep takes at most"),
    ("seeds: a billion", TOY, ["--seeds", "1000000000"], None, USAGE, "names 1,000,000,000 seeds"),
    ("seeds: 0-1e15", TOY, ["--seeds", "0-1e15"], None, USAGE, "invalid seeds value"),
    ("seeds: reversed range", TOY, ["--seeds", "5-2"], None, USAGE, "A-B needs 0 <= A <= B"),
    ("seeds: letters", TOY, ["--seeds", "a,b"], None, USAGE, "invalid seeds value"),
    ("seeds: zero", TOY, ["--seeds", "0"], None, USAGE, "needs a count >= 1"),
    ("seeds: negative", TOY, ["--seeds=-3"], None, USAGE, "--seeds"),
    ("seeds: a seed twice", TOY, ["--seeds", "3,3"], None, USAGE, "lists a value twice"),
    ("seeds: empty", TOY, ["--seeds", ""], None, USAGE, "invalid seeds value"),
    ("steps: zero", TOY, ["--steps", "0"], None, USAGE, "--steps must be >= 1"),
    ("steps: negative", TOY, ["--steps=-5"], None, USAGE, "--steps must be >= 1"),
    ("steps: words", TOY, ["--steps", "many"], None, USAGE, "invalid integer value"),
    ("steps: fraction", TOY, ["--steps", "1.5"], None, USAGE, "invalid integer value"),
    ("steps: 1e400", TOY, ["--steps", "1e400"], None, USAGE, "--steps"),
    ("steps: nan", TOY, ["--steps", "nan"], None, USAGE, "--steps"),
    ("steps: given twice", TOY, ["--steps", "5", "--steps", "many"], None, USAGE, "invalid integer value"),
    ("lr: nan", TOY, ["--lr", "nan"], None, USAGE, "finite"),
    ("lr: inf", TOY, ["--lr", "inf"], None, USAGE, "finite"),
    ("lr: words", TOY, ["--lr", "fast"], None, USAGE, "invalid number value"),
    ("test lengths: negative", TOY, ["--test-lengths", "8,-4"], None, USAGE, "--test-lengths must be >= 1"),
    ("test lengths: zero", TOY, ["--test-lengths", "0"], None, USAGE, "--test-lengths must be >= 1"),
    ("test lengths: empty", TOY, ["--test-lengths", ","], None, USAGE, "needs at least one value"),
    ("test lengths: twice", TOY, ["--test-lengths", "8,16,16"], None, USAGE, "lists a value twice"),
    ("test lengths: a hundred million", TOY, ["--test-lengths", "8,100000000"], None, USAGE, "the largest test set"),
    ("width: huge", TOY, ["--n-embd", "1e6"], None, USAGE, "the model and its optimizer state"),
    ("batch: huge", TOY, ["--batch-size", "5e7"], None, USAGE, "a training batch"),
    ("batch: zero", TOY, ["--batch-size", "0"], None, USAGE, "--batch-size must be >= 1"),
    ("eval examples: huge", TOY, ["--eval-examples", "1e9"], None, USAGE, "the largest test set"),
    ("variants: unknown", TOY, ["--variants", "none,bogus"], None, USAGE, "unknown 'bogus'"),
    ("variants: empty", TOY, ["--variants", ""], None, USAGE, "needs at least one value"),
    ("bool: maybe", TOY, ["--save-models", "maybe"], None, USAGE, "invalid true/false value"),
    ("dtype: fp16", TOY, ["--dtype", "fp16"], None, USAGE, "unknown 'fp16'"),
    ("preset: unknown", TOY, ["--preset", "huge"], None, USAGE, "invalid choice"),
    ("device: unknown", TOY, ["--device", "tpu"], None, USAGE, "invalid choice"),
    ("flag: unknown", TOY, ["--bogus"], None, USAGE, "unrecognized arguments"),
    ("flag: abbreviated", TOY, ["--ste", "5"], None, USAGE, "unrecognized arguments"),
    ("flag: value missing", TOY, ["--steps"], None, USAGE, "expected one argument"),
    ("flag: stray word", TOY, ["extra"], None, USAGE, "unrecognized arguments"),
    ("jobs: negative", TOY, ["--jobs=-1"], None, USAGE, "--jobs must be >= 0"),
    ("jobs: words", TOY, ["--jobs", "all"], None, USAGE, "invalid int value"),
    ("shard: 2/2", TOY, ["--shard", "2/2"], None, USAGE, "0 <= I < N"),
    ("shard: x", TOY, ["--shard", "x"], None, USAGE, "must look like I/N"),
    ("shard: -1/2 unquoted", TOY, ["--shard", "-1/2"], None, USAGE, "--flag=VALUE"),
    ("shard: 1/0", TOY, ["--shard", "1/0"], None, USAGE, "--shard"),
    ("shard: empty, 50/400", TOY, ["--shard", "50/400", "--out", "EMPTY"], None, USAGE, "this shard has no cells"),
    ("learned positions too short", TOY, ["--pos", "learned", "--block-size", "16"], None, USAGE, "position table"),
    ("vv: lr schedule above 1", VV, ["--min-lr-frac", "2"], None, USAGE, "--min-lr-frac must be <= 1"),
    ("vv: heads do not divide", VV, ["--n-embd", "30"], None, USAGE, "divisible by --n-head"),
    ("vv: keep a length not tested", VV, ["--keep-lengths", "99"], None, USAGE, "not among --test-lengths"),
    ("pa: experiment unknown", PA, ["--experiment", "bogus"], None, USAGE, "invalid choice"),
    ("pa: experiment abbreviated", PA, ["--exp", "claims"], None, USAGE, "unrecognized arguments"),
    ("pa: addition beyond its test", PA, ["--add-train-max", "50"], None, USAGE, "--add-train-max 50 beyond"),
    ("pa: map shorter than training", PA, ["--train-max", "100"], None, USAGE, "--map-length 40 must reach"),
    ("pa: odd head size for RoPE", PA, ["--n-embd", "36", "--n-head", "4"], None, USAGE, "even head size"),
    ("pa: too few anchors", PA, ["--formats", "mnemonic", "--anchors", "5"], None, USAGE, "needs at least"),
    ("sp: window beyond the sequence", SP, ["--windows", "100"], None, USAGE, "largest window 100"),
    ("sp: study unknown", SP, ["--studies", "bogus"], None, USAGE, "unknown 'bogus'"),
    # --- flags that do not combine
    ("plot-only with eval-only", TOY, ["--plot-only", "RUN", "--eval-only", "RUN"], None, USAGE, "do not combine"),
    ("plot-only with --out", TOY, ["--plot-only", "RUN", "--out", "EMPTY"], None, USAGE, "does not take --out"),
    ("plot-only with --jobs", TOY, ["--plot-only", "RUN", "--jobs", "2"], None, USAGE, "does not take --jobs"),
    ("plot-only with --fresh", TOY, ["--plot-only", "RUN", "--fresh"], None, USAGE, "does not take --fresh"),
    ("plot-only with --shard", TOY, ["--plot-only", "RUN", "--shard", "0/2"], None, USAGE, "does not take --shard"),
    ("plot-only with --steps", TOY, ["--plot-only", "RUN", "--steps", "9"], None, USAGE, "does not take --steps"),
    ("plot-only with --device", TOY, ["--plot-only", "RUN", "--device", "cpu"], None, USAGE, "does not take --device"),
    ("eval-only with --out", TOY, ["--eval-only", "RUN", "--out", "EMPTY"], None, USAGE, "does not take --out"),
    ("eval-only with --save-models", TOY, ["--eval-only", "RUN", "--save-models", "false"], None, USAGE,
     "does not take --save-models"),
    ("eval-only with a training flag", TOY, ["--eval-only", "RUN", "--steps", "9"], None, USAGE,
     "--steps would need new models"),
    ("eval-only with a model flag", TOY, ["--eval-only", "RUN", "--n-embd", "64"], None, USAGE, "would need new models"),
    # --- the output folder
    ("out: empty name", TOY, ["--out", ""], None, USAGE, "--out needs a directory name"),
    ("out: a file", TOY, ["--out", "RUN/results.json"], None, USAGE, "is a file, not a directory"),
    ("out: under a file", TOY, ["--out", "RUN/results.json/x"], None, USAGE, "--out"),
    ("out: results.json a folder", TOY, ["--out", "RUN"], replace_with("dir", "results.json"), USAGE, "must be a file"),
    ("out: summary.txt a folder", TOY, ["--out", "RUN"], replace_with("dir", "summary.txt"), USAGE, "must be a file"),
    ("out: cells a file", TOY, ["--out", "RUN"], replace_with("file", "cells"), USAGE, "must be the folder of cell"),
    ("out: cells a dangling link", TOY, ["--out", "RUN"], replace_with("dangling", "cells"), USAGE, "broken link"),
    ("out: a finished run again", TOY, ["--out", "RUN"], None, OK, None),
    ("out: a finished run, --fresh", TOY, ["--out", "RUN", "--fresh"], None, OK, None),
    ("out: one cell lost, resume", TOY, ["--out", "RUN"], lambda run: first_cell(run).unlink(), OK, None),
    ("out: a stale temp file", TOY, ["--out", "RUN"], write("cells/.x.json.1.tmp", "{"), OK, None),
    ("out: a cell truncated", TOY, ["--out", "RUN"], lambda run: first_cell(run).write_text('{"cell": {'), USAGE,
     "cannot read results file"),
    # --- saved results, redrawn
    ("plot-only: no such folder", TOY, ["--plot-only", "NONE"], None, USAGE, "no such directory"),
    ("plot-only: a file", TOY, ["--plot-only", "RUN/results.json"], None, USAGE, "is a file"),
    ("plot-only: an empty folder", TOY, ["--plot-only", "EMPTY"], None, USAGE, "no results"),
    ("plot-only: a finished run", TOY, ["--plot-only", "RUN"], None, OK, None),
    ("plot-only: a run of another script", VV, ["--plot-only", "RUN"], None, USAGE, "written by another script"),
    ("plot-only: cell is empty", TOY, ["--plot-only", "RUN"], lambda run: first_cell(run).write_text(""), USAGE,
     "cannot read results file"),
    ("plot-only: cell is binary", TOY, ["--plot-only", "RUN"], write(first_cell, b"\x00\xff\xfe" * 100), USAGE,
     "cannot read results file"),
    ("plot-only: cell is a list", TOY, ["--plot-only", "RUN"], lambda run: first_cell(run).write_text("[]"), USAGE,
     "not a cell record"),
    ("plot-only: cell nested 100,000 deep", TOY, ["--plot-only", "RUN"], write(first_cell, nested(100_000)), USAGE,
     "cannot read results file"),
    ("plot-only: cell of 2 GiB", TOY, ["--plot-only", "RUN"], sparse_file, USAGE, "far larger than any results file"),
    ("plot-only: cell is a folder", TOY, ["--plot-only", "RUN"], replace_with("dir"), USAGE, "not a regular file"),
    ("plot-only: cell is a named pipe", TOY, ["--plot-only", "RUN"], replace_with("fifo"), USAGE, "not a regular file"),
    ("plot-only: cell links to itself", TOY, ["--plot-only", "RUN"], replace_with("self-link"), USAGE,
     "cannot read results file"),
    ("plot-only: cell without rows", TOY, ["--plot-only", "RUN"], edit_cell(lambda r: r.pop("rows")), USAGE,
     "not a cell record"),
    ("plot-only: rows of text", TOY, ["--plot-only", "RUN"], edit_cell(lambda r: r.update(rows=["x"])), USAGE,
     "not a cell record"),
    ("plot-only: a number become text", TOY, ["--plot-only", "RUN"],
     edit_cell(lambda r: r["rows"][0].update(accuracy="0.5")), USAGE, "holds a str"),
    ("plot-only: config not a dict", TOY, ["--plot-only", "RUN"],
     edit_cell(lambda r: r["cell"].update(config=[1])), USAGE, "not a cell record"),
    ("plot-only: a field of another script", TOY, ["--plot-only", "RUN"],
     edit_cell(lambda r: r["cell"]["config"].update(train_min=3)), OK, None),  # ignored, with a note
    ("plot-only: two settings", TOY, ["--plot-only", "RUN"], settings_twice, OK, None),
    ("plot-only: a copy on another path", TOY, ["--plot-only", "RUN"], lambda run: None, OK, None),
    ("plot-only: results.json a folder", TOY, ["--plot-only", "RUN"], replace_with("dir", "results.json"), USAGE,
     "must be a file"),
    # --- saved models, tested again
    ("eval-only: no such folder", TOY, ["--eval-only", "NONE"], None, USAGE, "no such results directory"),
    ("eval-only: an empty folder", TOY, ["--eval-only", "EMPTY"], None, USAGE, "no saved models"),
    ("eval-only: a finished run", TOY, ["--eval-only", "RUN", "--test-lengths", "8,64", "--jobs", "1"], None, OK, None),
    ("eval-only: the same again (resume)", TOY, ["--eval-only", "RUN", "--jobs", "1"], None, OK, None),
    ("eval-only: one variant picked", TOY, ["--eval-only", "RUN", "--variants", "none", "--jobs", "1"], None, OK, None),
    ("eval-only: a variant not saved", TOY, ["--eval-only", "RUN", "--variants", "standardize"], None, USAGE,
     "no saved models"),
    ("eval-only: a run of another script", VV, ["--eval-only", "RUN"], None, USAGE, "another script"),
    ("eval-only: weights truncated", TOY, ["--eval-only", "RUN"], write(lambda r: first_cell(r, "pt"), b"PK\x03"), USAGE,
     "cannot read saved model"),
    ("eval-only: weights empty", TOY, ["--eval-only", "RUN"], write(lambda r: first_cell(r, "pt"), b""), USAGE,
     "cannot read saved model"),
    ("eval-only: weights a folder", TOY, ["--eval-only", "RUN"], replace_with("dir", "cells/*.pt"), USAGE,
     "not a regular file"),
    ("eval-only: weights a named pipe", TOY, ["--eval-only", "RUN"], replace_with("fifo", "cells/*.pt"), USAGE,
     "not a regular file"),
    ("eval-only: weights a dangling link", TOY, ["--eval-only", "RUN"], replace_with("dangling", "cells/*.pt"), USAGE,
     "saved model"),
    ("eval-only: weights a list", TOY, ["--eval-only", "RUN"], state(lambda sd: list(sd.values())), USAGE,
     "holds a list"),
    ("eval-only: a tensor missing", TOY, ["--eval-only", "RUN"], state(lambda sd: dict(list(sd.items())[1:])), USAGE,
     "does not fit"),
    ("eval-only: a tensor of another shape", TOY, ["--eval-only", "RUN"],
     state(lambda sd: {**sd, next(iter(sd)): sd[next(iter(sd))][:1]}), USAGE, "does not fit"),
    ("eval-only: a tensor too many", TOY, ["--eval-only", "RUN"], state(lambda sd: {**sd, "extra.weight": sd[next(
        iter(sd))]}), USAGE, "does not fit"),
    ("eval-only: a cell file truncated", TOY, ["--eval-only", "RUN"],
     lambda run: first_cell(run).write_text('{"cell'), USAGE, "cannot read results file"),
    ("eval-only: two settings", TOY, ["--eval-only", "RUN", "--jobs", "1"], settings_twice, OK, None),
    ("eval-only: a copy on another path", TOY, ["--eval-only", "RUN", "--jobs", "1"], lambda run: None, OK, None),
]


def materialize(args, tmp, run_dir):
    """Flags with RUN, EMPTY, NONE replaced by paths under tmp."""
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    names = {"RUN": str(run_dir), "EMPTY": str(empty), "NONE": str(tmp / "nowhere")}
    return [next((a.replace(k, v) for k, v in names.items() if a.startswith(k)), a) for a in args]


_FINISHED = {}


def finished_run():
    """A finished smoke run of the toy experiment with saved models, made once a process."""
    if "dir" not in _FINISHED:
        d = Path(tempfile.mkdtemp(prefix="probe-run-"))
        p = run_main(T.SCRIPT, "--device", "cpu", "--jobs", "1", "--preset", "smoke", "--out", d)
        assert p.returncode == 0, p.stderr
        _FINISHED["dir"] = d
    return _FINISHED["dir"]


@contextlib.contextmanager
def deadline(seconds):
    """A hang becomes an error: SIGALRM after `seconds`."""
    def fire(*_):
        raise TimeoutError(f"no answer in {seconds} s (a hang)")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def probe(case, tmp):
    """Run one case in this process: (exit status, the last line printed, all of stderr)."""
    import importlib
    name, script, args, setup, _, _ = case
    run_dir = tmp / "run"
    shutil.copytree(finished_run(), run_dir, symlinks=True)
    if setup:
        setup(run_dir)
    flags = materialize(args, tmp, run_dir)
    if "--plot-only" not in flags:
        flags = (["--device", "cpu"] if "--device" not in flags else []) + flags
    if not {"--plot-only", "--eval-only", "--out"} & set(flags):  # never the default out/ of the checkout
        flags += ["--out", str(tmp / "out")]
    if "--eval-only" not in flags:  # --eval-only takes the saved models' settings, a preset included
        flags = ["--preset", "smoke"] + flags
    mod = T if script == TOY else importlib.import_module(script)
    with deadline(120):
        p = run_main(mod.SCRIPT, *flags)
    lines = (p.stderr.strip() or p.stdout.strip()).splitlines()
    return p.returncode, lines[-1] if lines else "", p.stderr


def verdict(case, status, last, stderr):
    """'' if the case behaves, else what is wrong."""
    _, _, _, _, want, msg = case
    if "Traceback" in stderr:
        return "traceback"
    if status != want:
        return f"exit {status}, expected {want}"
    if want == USAGE and not last.startswith("error: "):
        return "no one-line error"
    if msg and msg not in last:
        return f"last line lacks {msg!r}"
    return ""


if __name__ == "__main__":
    bad = 0
    print("| case | exit | last line |\n|---|---|---|")
    for case in CASES:
        with tempfile.TemporaryDirectory() as t:
            status, last, err = probe(case, Path(t))
        wrong = verdict(case, status, last, err)
        bad += bool(wrong)
        print(f"| {case[0]} | {status} | {last[:110].replace('|', '/')}{' **' + wrong + '**' if wrong else ''} |")
    print(f"\n{len(CASES)} cases, {bad} wrong")
    sys.exit(1 if bad else 0)

"""A script's command line run in this process (no fresh Python and torch for each call): what the tests
of flags, errors and saved models use where a subprocess would only add start-up time."""
import contextlib
import io
import signal
import subprocess
import sys

import harness as H


def run_main(script, *args):
    """harness.main(script) with these flags: a CompletedProcess(args, exit status, stdout, stderr)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv, handlers = sys.argv, {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    sys.argv = [f"{script.name}.py", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            H.main(script)
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
        for s, h in handlers.items():  # main() installs its own: the test process keeps pytest's
            signal.signal(s, h)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def with_flags(defaults, args):
    """A test helper's default flags (--device cpu, --jobs 1, ...) before args; with --plot-only, which
    refuses flags it would ignore, only the --preset among them."""
    args = [str(a) for a in args]
    if "--plot-only" in args:
        defaults = [x for i, x in enumerate(defaults) if "--preset" in defaults[max(0, i - 1):i + 1]]
    return [*defaults, *args]

"""The fault probe (tests/probe.py), one test a case: exit status, no traceback, no hang, the line."""
import pytest

from probe import CASES, probe, verdict


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_probe_case(case, tmp_path):
    status, last, stderr = probe(case, tmp_path)
    assert not verdict(case, status, last, stderr), f"exit {status}: {last}\n{stderr[-2000:]}"

"""The documents against the committed cells: every number of the README's results tables is printed by
the --plot-only commands its paper's document names (tools/check_numbers.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import check_numbers  # noqa: E402


def test_every_number_of_the_readme_tables_is_printed(capsys):
    status = check_numbers.main([])
    out = capsys.readouterr().out
    assert status == 0, out
    assert ", 0 not printed" in out

"""The segment job's progress bar ends with one final line, also in a log (stderr not a terminal)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("last_update_drawn", [True, False])
def test_the_final_line_is_written_once(last_update_drawn: bool, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.run import _progress_bar

    bar = _progress_bar(6, enabled=True)
    bar.update(4)  # one committed part, then the last one
    bar.mininterval = 0.0 if last_update_drawn else 3600.0  # parts are seconds apart: each update draws
    bar.update(2)
    bar.close()
    err = capsys.readouterr().err
    assert err.count("6/6") == 1 and err.endswith("\n"), err

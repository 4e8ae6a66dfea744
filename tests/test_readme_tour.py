"""The README's 30-line tour runs as written, and what it prints is real."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_tour_runs(capsys):
    section = README.read_text().split("## A 30-line tour", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 30
    scope = {"__name__": "readme_tour"}
    exec(compile(code, str(README), "exec"), scope)
    # The calibrated monitor scored every logged token and kept the most anomalous ones.
    res = scope["res"]
    assert res.rows == 5000
    top = res.top("blocks/1/resid:gauss")
    assert len(top) > 0 and top[0]["score"] >= top[-1]["score"]
    # The reloaded fitted monitor equals the in-memory one (compare() distance ~ 0).
    cmp = scope["audit"]["blocks/0/resid:gauss"]
    assert abs(cmp.distance) < 1e-6
    p = scope["p"]
    assert all(np.all((np.asarray(v) > 0) & (np.asarray(v) <= 1)) for v in p.values())
    assert "blocks/0/resid->blocks/1/resid" in p

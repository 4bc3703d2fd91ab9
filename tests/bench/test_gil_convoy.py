"""bench/gil_convoy.py at a small scale: rows of real-time factors by switch interval and duty, the
process's interval put back after (the figures live in the README)."""

import json
import os
import sys
import time

import pytest

from bench import gil_convoy


def test_rows_by_interval_and_duty_and_the_interval_is_put_back(tmp_path):
    before = sys.getswitchinterval()
    out = tmp_path / "rows.json"
    lines = []
    assert gil_convoy.main(["--switch-ms", "0.5,2", "--duty", "0.5", "--frames", "3", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["cpus"] == os.cpu_count() and saved["date"] == time.strftime("%Y-%m-%d") and saved["machine"]
    rows = saved["rows"]
    assert [r["switch_ms"] for r in rows] == [0.5, 2.0] and all(r["frames"] == 3 for r in rows)
    assert all(r["alone"] > 0 and r["duty_0.5"] > 0 for r in rows)
    assert sys.getswitchinterval() == before
    rows = gil_convoy.measure([1.0], [0.2, 1.0], frames=2, progress=lines.append)
    assert set(rows[0]) == {"switch_ms", "frames", "alone", "oversleep_p99_ms", "oversleep_max_ms",
                            "idle_oversleep_p99_ms", "idle_oversleep_max_ms", "duty_0.2", "duty_1"}
    assert 0 <= rows[0]["oversleep_p99_ms"] <= rows[0]["oversleep_max_ms"]
    assert lines[0].startswith("switch interval 1 ms: RTF alone ") and "(a 1 ms sleep beside it" in lines[0]
    assert "busy 20% " in lines[0] and "100% " in lines[0]


@pytest.mark.parametrize("argv,message", [
    (["--switch-ms", "0"], "switch interval(s) must be milliseconds in 0.01..100"),
    (["--switch-ms", "nan"], "switch interval(s) must be milliseconds in 0.01..100"),
    (["--duty", "0"], "duty must be shares in (0, 1]"),
    (["--duty", "1.5"], "duty must be shares in (0, 1]"),
    (["--frames", "1"], "frames must be 2..1000"),
    (["--duty", "half"], "comma-separated numbers"),
])
def test_bad_arguments_are_one_clear_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        gil_convoy.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err

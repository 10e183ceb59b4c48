"""The benchmark's arithmetic: each ours run is divided by the cp run of its own round, and the median of the
paired ratios is what the report states."""

from __future__ import annotations

from bench.run import StepResult, paired_ratios, table


def _r(step: str, seconds: float, round_: int, rc: int = 0) -> StepResult:
    return StepResult(step=step, command=step, seconds=seconds, returncode=rc, round=round_)


def test_each_ours_run_is_divided_by_the_cp_of_its_round():
    runs = [_r("cp", 20.0, 1), _r("ours", 30.0, 1), _r("cp", 40.0, 2), _r("ours", 20.0, 2), _r("cp", 25.0, 3), _r("ours", 25.0, 3)]
    p = paired_ratios(runs)
    assert [x["ratio"] for x in p["pairs"]] == [1.5, 0.5, 1.0]
    assert p["median_ratio"] == 1.0
    assert p["cp_range"] == [20.0, 40.0] and p["ours_range"] == [20.0, 30.0]
    rows = table(runs).splitlines()[2:]
    assert [r.split("|")[3].strip() for r in rows] == ["1.00", "1.50", "1.00", "0.50", "1.00", "1.00"]
    assert rows[3].split("|")[1].strip() == "ours (2)"


def test_a_failed_cp_pairs_with_nothing_and_one_pair_gives_no_median():
    runs = [_r("cp", 20.0, 1), _r("ours", 30.0, 1), _r("cp", 1.0, 2, rc=1), _r("ours", 20.0, 2)]
    assert paired_ratios(runs) is None  # the second ours has no valid cp to pair with
    assert paired_ratios([_r("cp", 20.0, 1), _r("ours", 30.0, 1), _r("cp", 40.0, 2), _r("ours", 20.0, 2)])["median_ratio"] == 1.0

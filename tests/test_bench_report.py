"""The benchmark's arithmetic: each ours run is divided by the cp run of its own round, and the median of the
paired ratios is what the report states."""

from __future__ import annotations

from bench.run import StepResult, paired_ratios, table


def _r(step: str, seconds: float, round_: int, rc: int = 0) -> StepResult:
    return StepResult(step=step, command=step, seconds=seconds, returncode=rc, round=round_)


def test_each_ours_run_is_divided_by_the_cp_of_its_round():
    runs = [
        _r("cp", 20.0, 1),
        _r("ours", 30.0, 1),
        _r("cp", 40.0, 2),
        _r("ours", 20.0, 2),
        _r("cp", 25.0, 3),
        _r("ours", 25.0, 3),
    ]
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
    assert (
        paired_ratios([_r("cp", 20.0, 1), _r("ours", 30.0, 1), _r("cp", 40.0, 2), _r("ours", 20.0, 2)])["median_ratio"]
        == 1.0
    )


def test_cold_and_warm_rounds_are_paired_within_their_page_cache_state():
    """--cache both: cp, ours cold, then cp, ours warm, per round; a warm ours is never divided by a cold cp."""

    def r(step, seconds, round_, cache):
        return StepResult(step=step, command=step, seconds=seconds, returncode=0, round=round_, cache=cache)

    runs = [
        r("cp", 30.0, 1, "cold"),
        r("ours", 33.0, 1, "cold"),
        r("cp", 15.0, 1, "warm"),
        r("ours", 18.0, 1, "warm"),
        r("cp", 40.0, 2, "cold"),
        r("ours", 32.0, 2, "cold"),
        r("cp", 20.0, 2, "warm"),
        r("ours", 22.0, 2, "warm"),
    ]
    assert [p["ratio"] for p in paired_ratios(runs, "cold")["pairs"]] == [1.1, 0.8]
    assert [p["ratio"] for p in paired_ratios(runs, "warm")["pairs"]] == [1.2, 1.1]
    assert paired_ratios(runs, "warm")["median_ratio"] == 1.15
    rows = table(runs).splitlines()[2:]
    assert rows[3].split("|")[1].strip() == "ours (1), warm" and rows[3].split("|")[3].strip() == "1.20"


def test_verify_rows_state_their_checks_and_the_ratio_to_the_floor():
    from bench.run import _step_notes

    verify = {
        "step": "verify",
        "returncode": 0,
        "seconds": 600.0,
        "extra": {
            "report": {
                "settings": {"dtype": "bfloat16", "prompts": ["a", "b"], "max_new_tokens": 8},
                "checks": [{"name": "files", "status": "PASS", "seconds": 30.0}],
            }
        },
    }
    floor = {
        "step": "floor",
        "returncode": 0,
        "seconds": 500.0,
        "extra": {
            "floor": {
                "floor_s": 400.0,
                "dtype": "bfloat16",
                "prompts": ["a", "b"],
                "tokens": [40, 700],
                "reference_forward_s": [100.0, 100.0],
                "converted_forward_s": [100.0, 100.0],
                "reference_load_s": 1.0,
                "converted_load_s": 2.0,
            }
        },
    }
    lines = _step_notes(verify, [verify, floor])
    assert lines[0].startswith("- verify: exit 0, dtype bfloat16, 2 prompts, 8 new tokens; files PASS 30.0 s")
    assert lines[1].startswith("- verify / floor = 600.0 / 400.0 s = 1.50")
    assert _step_notes(floor, [verify, floor])[0].startswith(
        "- floor: 400.0 s of forward passes, bfloat16, 2 prompts of 40-700 tokens"
    )


def test_cp_counts_with_its_sync():
    """The durable floor is cp -r plus the sync of the copies (the converter fsyncs; cp alone leaves dirty pages)."""
    cp = StepResult(step="cp", command="cp", seconds=10.0, returncode=0, round=1, extra={"fsync_seconds": 5.0})
    runs = [
        cp,
        _r("ours", 18.0, 1),
        StepResult(step="cp", command="cp", seconds=20.0, returncode=0, round=2),
        _r("ours", 30.0, 2),
    ]
    assert [p["ratio"] for p in paired_ratios(runs)["pairs"]] == [1.2, 1.5]
    row = table(runs).splitlines()[2]
    assert row.split("|")[2].strip() == "10.0 + 5.0 s" and row.split("|")[3].strip() == "1.00"
    assert table(runs).splitlines()[3].split("|")[3].strip() == "1.20"


def test_verify_rows_state_the_forward_passes_timed_inside_the_run():
    from bench.run import _step_notes

    verify = {
        "step": "verify",
        "returncode": 0,
        "seconds": 300.0,
        "extra": {
            "report": {
                "settings": {"dtype": "bfloat16", "prompts": ["a"], "max_new_tokens": 2},
                "checks": [
                    {
                        "name": "files",
                        "status": "PASS",
                        "seconds": 40.0,
                        "numbers": {"data_pass": {"converted_bytes": 14e9, "original_bytes": 14e9, "seconds": 40.0}},
                    },
                    {
                        "name": "logits",
                        "status": "PASS",
                        "seconds": 90.0,
                        "numbers": {
                            "seconds": {
                                "reference_forward": 60.0,
                                "converted_forward": 40.0,
                                "reference_load": 1.0,
                                "converted_load": 2.0,
                            }
                        },
                    },
                    {
                        "name": "generation",
                        "status": "PASS",
                        "seconds": 5.0,
                        "numbers": {"seconds": {"reference_decode": 3.0, "converted_decode": 2.0}},
                    },
                ],
            }
        },
    }
    line = _step_notes(verify, [verify])[1]
    assert "took 100.0 s (reference 60.0, converted 40.0); wall / forward passes = 3.00" in line
    assert "28.00 GB" not in line and "14.00 GB converted + 14.00 GB original in 40.0 s (0.70 GB/s" in line


def test_the_machine_line_states_the_bf16_units_and_the_measured_products():
    """What the short form can reach depends on the CPU's bf16 arithmetic: the report says which units it has and
    what the matrix-product probe measured, or that the probe failed."""
    from bench.run import _gemm_line

    line = "\n".join(_gemm_line({"bf16_units": ["avx512_bf16"], "gemm_gflops": {"float32": 192.5, "bfloat16": 794.7}}))
    assert "bf16 units: avx512_bf16" in line
    assert "192.5 GFLOPS in float32" in line and "794.7 GFLOPS in bfloat16" in line
    line = "\n".join(_gemm_line({"bf16_units": [], "gemm_gflops": {"error": "timed out"}}))
    assert "bf16 units: none" in line and "probe failed: timed out" in line

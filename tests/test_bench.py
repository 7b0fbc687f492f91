"""`python -m bcnn.bench` at a toy size: every case measured, and the ratios and targets it prints follow from
its own figures. Nothing here asserts a speed: the figures depend on the machine."""

import contextlib
import io
import json
import math

import pytest

from bcnn import bench
from bcnn.errors import UserError

# One loader worker whatever the machine (the default grows with its cores, and the loader case's batches with it).
TOY = ["--device", "cpu", "--image-size", "32", "--batch-size", "2", "--steps", "1", "--warmup", "0",
       "--classes", "5", "--cache-image-size", "32", "--cache-batch-size", "4", "--num-workers", "1"]


def run_bench(args: list[str]) -> str:
    """What `python -m bcnn.bench ARGS` prints on stdout (run in this process)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        bench.main(args)
    return stdout.getvalue()


@pytest.fixture(scope="module")
def bench_json() -> str:
    return run_bench([*TOY, "--json"])


def expected_cases() -> set:
    cases = set(bench.CASES)
    if bench.feature_cache_module() is None:
        cases -= set(bench.CACHE_CASES)
    return cases


def test_json_has_every_case_with_a_positive_speed(bench_json):
    result = json.loads(bench_json)  # stdout is the JSON and nothing else
    assert set(result["cases"]) == expected_cases()
    for name, case in result["cases"].items():
        for key in ("images_per_sec", "ms_per_step"):
            assert math.isfinite(case[key]) and case[key] > 0, (name, key, case[key])
        assert case["peak_memory_mib"] is None or case["peak_memory_mib"] >= 0
    assert (result["image_size"], result["batch_size"], result["classes"]) == (32, 2, 5)
    assert result["precision"] in ("bf16", "fp32") and result["device"]["type"] == "cpu"
    assert result["command"].startswith("python -m bcnn.bench --device cpu --image-size 32 --batch-size 2")


def test_ratios_and_targets_follow_from_the_figures(bench_json):
    result = json.loads(bench_json)
    cases, ratios = result["cases"], result["ratios"]
    ips = {name: case["images_per_sec"] for name, case in cases.items()}
    assert ratios["stage2_step_time_vs_bare"] == pytest.approx(ips["bare"] / ips["stage2_step"])
    assert ratios["stage1_step_time_vs_bare"] == pytest.approx(ips["bare"] / ips["stage1_step"])
    assert ratios["eval_time_vs_bare"] == pytest.approx(ips["bare"] / ips["eval"])
    assert ratios["speedup_vs_fp32_nchw"] == pytest.approx(ips["stage2_step"] / ips["stage2_step_fp32_nchw"])
    assert ratios["loader_vs_stage2_step"] == pytest.approx(ips["loader"] / ips["stage2_step"])
    for head in bench.HEADS:
        assert ratios[f"{head}_step_time_vs_bilinear"] == pytest.approx(ips["stage2_step"] / ips[f"stage2_step_{head}"])
    if "cached_stage1_epoch" in cases:
        live, cached = cases["live_stage1_epoch"], cases["cached_stage1_epoch"]
        assert ratios["cached_vs_live_epoch"] == pytest.approx(live["epoch_seconds"] / cached["epoch_seconds"])
        assert live["images_per_sec"] == pytest.approx(live["images_per_epoch"] / live["epoch_seconds"])
    checked = {check["ratio"]: check for check in result["targets"]}
    assert set(checked) == {"stage2_step_time_vs_bare", "speedup_vs_fp32_nchw", "loader_vs_stage2_step",
                            "cached_vs_live_epoch", "matrix_sqrt_step_time_vs_bilinear",
                            "compact_step_time_vs_bilinear"}
    for name, check in checked.items():
        value = ratios[name]
        assert check["value"] == value
        if value is None:
            assert check["status"] == "n/a"
            continue
        met = {"<=": value <= check["target"], ">=": value >= check["target"], ">": value > check["target"]}
        assert check["status"] == ("PASS" if met[check["comparison"]] else "MISS")


def test_human_form_prints_the_table_and_the_targets():
    report = run_bench(TOY)
    assert report.startswith("bcnn.bench on ")
    assert "targets:" in report and "reproduce: python -m bcnn.bench --device cpu --image-size 32" in report
    for name in expected_cases():
        assert f"\n{name} " in report
    targets = report.split("targets:")[1]
    for label in ("stage2_step time / bare time", "stage2_step speedup over fp32 + NCHW",
                  "loader images/s / stage2_step images/s", "live / cached stage-1 epoch time",
                  "matrix_sqrt stage2_step time / bilinear's", "compact stage2_step time / bilinear's"):
        line = next(line for line in targets.splitlines() if label in line)
        assert line.rstrip().endswith(("PASS", "MISS", "n/a"))


def test_fp16_on_the_cpu_is_refused_before_any_work():
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        bench.main([*TOY, "--precision", "fp16"])

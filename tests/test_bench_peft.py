"""python -m bcnn.bench --peft, on timm's test_vit (6 blocks of 64 channels, MLP 192) at 32 px: every case measured,
each trained-parameter count its method's formula, the ratios and the targets' verdicts following from the figures,
the human form printing the JSON's figures; without peft the LoRA row says so and the others still run."""

import contextlib
import io
import json
import statistics
import sys

import pytest
import timm

from bcnn.bench.__main__ import main
from bcnn.bench.peft import CASES, format_peft
from bcnn.errors import UserError

ARGV = ["--peft", "--device", "cpu", "--image-size", "32", "--batch-size", "2", "--precision", "fp32", "--steps", "2",
        "--warmup", "0", "--classes", "200", "--peft-backbone", "timm:test_vit"]
DIM, DEPTH, MLP = 64, 6, 192  # timm's test_vit (checked below)
RANK, PROMPTS = 8, 10  # model.lora_rank's and model.vpt_prompts's defaults
HEAD = (DIM + 1) * 200  # model.pooling=avg: the classifier over the 64-d token average


def run_bench(argv: list[str]) -> tuple[dict, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = main(argv)
    return result, out.getvalue()


@pytest.fixture(scope="module")
def bench() -> tuple[dict, str]:
    return run_bench([*ARGV, "--json"])


def test_every_case_is_measured_with_positive_figures_and_stdout_is_the_json(bench):
    result, stdout = bench
    assert json.loads(stdout) == json.loads(json.dumps(result))
    assert result["command"] == "python -m bcnn.bench " + " ".join(ARGV)
    assert list(result["cases"]) == list(CASES) == ["full", "lora", "bitfit", "vpt_deep"]
    for case in result["cases"].values():
        assert len(case["step_seconds"]) == 2 and min(case["step_seconds"]) > 0
        assert case["ms_per_step"] == pytest.approx(1000 * statistics.median(case["step_seconds"]))
        assert case["images_per_sec"] == pytest.approx(2000 / case["ms_per_step"])
        assert case["peak_memory_mib"] > 0 and case["optimizer_state_bytes"] > 0
        assert case["checkpoint_bytes"]["avg"] > 0 and case["checkpoint_bytes"]["compact"] > 0


def test_trained_parameters_are_each_methods_formula(bench):
    network = timm.create_model("test_vit")
    assert (network.embed_dim, len(network.blocks), network.blocks[0].mlp.fc1.out_features) == (DIM, DEPTH, MLP)
    cases = bench[0]["cases"]
    adapted = {
        "lora": DEPTH * RANK * (DIM + 3 * DIM),  # A (r x in) and B (out x r) of each block's qkv
        # the patch embedding's, each block's norm1, qkv, proj, norm2, fc1 and fc2, the final norm's
        "bitfit": DIM + DEPTH * (DIM + 3 * DIM + DIM + DIM + MLP + DIM) + DIM,
        "vpt_deep": PROMPTS * DIM * DEPTH,
    }
    for name, count in adapted.items():
        assert cases[name]["trained_backbone_params"] == count
        assert cases[name]["trained_params"] == count + HEAD
        assert cases[name]["all_params"] == cases["full"]["all_params"] + (count if name != "bitfit" else 0)
    full = cases["full"]
    assert full["trained_params"] == full["all_params"] == full["trained_backbone_params"] + HEAD
    # SGD's momentum: one float32 buffer per trained parameter
    assert all(case["optimizer_state_bytes"] == 4 * case["trained_params"] for case in cases.values())


def test_the_ratios_and_verdicts_follow_from_the_figures(bench):
    result = bench[0]
    cases, full = result["cases"], result["cases"]["full"]
    for name in ("lora", "bitfit", "vpt_deep"):
        case, ratios = cases[name], result["ratios"][name]
        rounds = [mine / theirs for mine, theirs in zip(case["step_seconds"], full["step_seconds"])]
        assert ratios["step_time_vs_full"] == pytest.approx(statistics.median(rounds))
        assert ratios["peak_memory_vs_full"] == pytest.approx(case["peak_memory_mib"] / full["peak_memory_mib"])
        assert ratios["optimizer_state_vs_full"] == pytest.approx(case["optimizer_state_bytes"] /
                                                                  full["optimizer_state_bytes"])
    expected = [(name, ratios[key], limit, "<=") for key, limit in (("step_time_vs_full", 0.75),
                                                                    ("optimizer_state_vs_full", 0.02))
                for name, ratios in result["ratios"].items()]
    expected.append(("lora", cases["lora"]["checkpoint_bytes"]["compact"] / 1e6, 40.0, "<"))
    assert [(check["case"], check["value"], check["target"], check["comparison"]) for check in result["targets"]] \
        == expected
    for check in result["targets"]:
        met = check["value"] <= check["target"] if check["comparison"] == "<=" else check["value"] < check["target"]
        assert check["status"] == ("PASS" if met else "MISS")


def test_the_human_form_prints_the_json_figures(bench):
    result = bench[0]
    text = format_peft(result)
    assert text.startswith("bcnn.bench --peft on ") and text.endswith(f"reproduce: {result['command']}")
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.split()[:1] and
            line.split()[0] in CASES}
    for name, case in result["cases"].items():
        ratios = result["ratios"].get(name)
        assert rows[name][1:4:2] == [f"{case['trained_params']:,}", f"{case['ms_per_step']:,.1f}"]
        assert rows[name][-2:] == [f"{case['checkpoint_bytes'][head] / 1e6:,.2f}" for head in ("avg", "compact")]
        if ratios:
            assert rows[name][4:9:2] == [f"{ratios['step_time_vs_full']:.3f}x", f"{ratios['peak_memory_vs_full']:.3f}x",
                                         f"{ratios['optimizer_state_vs_full']:.4f}x"]
    for check in result["targets"]:
        line = next(line for line in text.splitlines() if line.strip().startswith(check["label"]))
        value = f"{check['value']:.4f}" if check["target"] < 1 else f"{check['value']:.2f}"
        assert line.split()[-2:] == [value, check["status"]]


def test_without_peft_the_lora_row_says_so_and_the_others_are_measured(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `from peft import ...` raises ImportError
    argv = [*ARGV, "--json"]
    argv[argv.index("--steps") + 1] = "1"
    result, _ = run_bench(argv)
    lora = result["cases"]["lora"]
    assert lora == {"case": "lora", "not_measured": lora["not_measured"]}
    assert lora["not_measured"].startswith("model.adapt=lora uses Hugging Face peft, which is not installed")
    assert all(result["cases"][name]["ms_per_step"] > 0 for name in ("full", "bitfit", "vpt_deep"))
    assert set(result["ratios"]["lora"].values()) == {None}
    assert [check["status"] for check in result["targets"] if check["case"] == "lora"] == ["n/a"] * 3
    assert "lora      not measured: model.adapt=lora uses Hugging Face peft" in format_peft(result)


@pytest.mark.parametrize("argv, expected", [
    (["--peft-backbone", "timm:test_vit"], "--peft-backbone goes with --peft; add --peft, or leave it out."),
    (["--peft", "--num-workers", "1"], "--num-workers does not apply with --peft; drop --peft or leave"),
    (["--peft", "--probe-grid"], "--probe-grid and --peft are two benchmarks; run them one at a time."),
])
def test_options_that_do_not_go_with_peft_are_refused_in_one_sentence(argv, expected):
    with pytest.raises(UserError) as error:
        main(["--device", "cpu", *argv])
    assert expected in str(error.value)

"""`python -m bcnn.bench` at a toy size: every case measured, and the ratios and targets it prints follow from
its own figures. Nothing here asserts a speed: the figures depend on the machine."""

import contextlib
import io
import json
import math
import statistics

import pytest

from bcnn.bench import __main__ as bench_cli
from bcnn.bench import steps
from bcnn.bench.__main__ import check_combination, main, parse_args, resolve_settings
from bcnn.errors import UserError
from bcnn.models.pooling import HEADS, Pooling, register_head

# One loader worker whatever the machine (the default grows with its cores, and the loader case's batches with it).
# Two steps: the heads' ratio is then a median over two rounds. Two classes, fewer than the generated mini-CUBs'
# four (issue 28: their labels past the classifier's outputs ended the bench in an IndexError).
TOY = ["--device", "cpu", "--image-size", "32", "--batch-size", "2", "--steps", "2", "--warmup", "0",
       "--classes", "2", "--cache-image-size", "32", "--cache-batch-size", "4", "--num-workers", "1",
       "--heads-image-size", "40", "--heads-batch-size", "3"]


def run_bench(args: list[str]) -> str:
    """What `python -m bcnn.bench ARGS` prints on stdout (run in this process)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main(args)
    return stdout.getvalue()


@pytest.fixture(scope="module")
def bench_json() -> str:
    return run_bench([*TOY, "--json"])


def expected_cases() -> set:
    cases = set(steps.case_names())
    if steps.feature_cache_module() is None:
        cases -= set(steps.CACHE_CASES)
    return cases


def test_json_has_every_case_with_a_positive_speed(bench_json):
    result = json.loads(bench_json)  # stdout is the JSON and nothing else
    assert set(result["cases"]) == expected_cases()
    for name, case in result["cases"].items():
        for key in ("images_per_sec", "ms_per_step"):
            assert math.isfinite(case[key]) and case[key] > 0, (name, key, case[key])
        assert case["peak_memory_mib"] is None or case["peak_memory_mib"] >= 0
    assert (result["image_size"], result["batch_size"], result["classes"]) == (32, 2, 2)
    assert result["precision"] in ("bf16", "fp32") and result["device"]["type"] == "cpu"
    assert result["command"].startswith("python -m bcnn.bench --device cpu --image-size 32 --batch-size 2")
    check_combination(parse_args(result["command"].split()[3:]))  # the command it prints runs the same bench


def test_ratios_and_targets_follow_from_the_figures(bench_json):
    result = json.loads(bench_json)
    cases, ratios = result["cases"], result["ratios"]
    ips = {name: case["images_per_sec"] for name, case in cases.items()}
    assert ratios["stage2_step_time_vs_bare"] == pytest.approx(ips["bare"] / ips["stage2_step"])
    assert ratios["stage1_step_time_vs_bare"] == pytest.approx(ips["bare"] / ips["stage1_step"])
    assert ratios["eval_time_vs_bare"] == pytest.approx(ips["bare"] / ips["eval"])
    assert ratios["speedup_vs_fp32_nchw"] == pytest.approx(ips["stage2_step"] / ips["stage2_step_fp32_nchw"])
    assert ratios["loader_vs_stage2_step"] == pytest.approx(ips["loader"] / ips["stage2_step"])
    for head in steps.timed_heads():
        assert ratios[f"{head}_step_time_vs_bilinear"] == pytest.approx(ips["stage2_step"] / ips[f"stage2_step_{head}"])
        rounds = zip(cases[f"heads_{head}"]["step_seconds"], cases["heads_bilinear"]["step_seconds"])
        assert ratios[f"heads_{head}_vs_bilinear"] == pytest.approx(statistics.median(a / b for a, b in rounds))
    for head in ("bilinear", *steps.timed_heads()):  # at the heads' own size and batch, every round timed
        case = cases[f"heads_{head}"]
        assert case["images_per_step"] == 3 and case["timed_steps"] == len(case["step_seconds"]) == 2
        assert case["ms_per_step"] == pytest.approx(1000 * statistics.median(case["step_seconds"]))
        assert "at 40 px" in cases[f"heads_{head}"]["what"]
    if "cached_stage1_epoch" in cases:
        live, cached = cases["live_stage1_epoch"], cases["cached_stage1_epoch"]
        assert ratios["cached_vs_live_epoch"] == pytest.approx(live["epoch_seconds"] / cached["epoch_seconds"])
        assert live["images_per_sec"] == pytest.approx(live["images_per_epoch"] / live["epoch_seconds"])
    checked = {check["ratio"]: check for check in result["targets"]}
    assert set(checked) == {"stage2_step_time_vs_bare", "speedup_vs_fp32_nchw", "loader_vs_stage2_step",
                            "cached_vs_live_epoch", "heads_matrix_sqrt_vs_bilinear", "heads_compact_vs_bilinear"}
    assert (checked["heads_matrix_sqrt_vs_bilinear"]["target"], checked["heads_compact_vs_bilinear"]["target"]) == (
        1.16, 1.05)  # issue 22's targets, matrix_sqrt's as issue 28 decided it
    for name, check in checked.items():
        value = ratios[name]
        assert check["value"] == value
        if value is None:
            assert check["status"] == "n/a"
            continue
        met = {"<=": value <= check["target"], ">=": value >= check["target"], ">": value > check["target"]}
        assert check["status"] == ("PASS" if met[check["comparison"]] else "MISS")


def test_a_newly_registered_head_is_timed_beside_the_bilinear_one_with_no_change_to_the_bench():
    # docs/heads.md: registering a head is all it takes. A global max pooling, registered here and removed after.
    @register_head("toy_max")
    class MaxPooling(Pooling):
        def __init__(self, channels):
            super().__init__()
            self.output_dim = channels

        def forward(self, x, x_b=None):
            return x.amax(dim=(2, 3))

    try:
        assert "toy_max" in steps.timed_heads() and "heads_toy_max" in steps.case_names()
        settings = resolve_settings(parse_args(TOY))
        records = steps.measure_heads_side_by_side(settings, steps.vgg16_features("relu5_3", "none"))
        assert records["heads_toy_max"]["timed_steps"] == len(records["heads_toy_max"]["step_seconds"]) == 2
        assert set(records) == {f"heads_{head}" for head in ("bilinear", *steps.timed_heads())}
        assert steps.compute_ratios(records)["heads_toy_max_vs_bilinear"] > 0
    finally:
        HEADS.pop("toy_max")
    assert "toy_max" not in steps.timed_heads()


def test_human_form_prints_the_table_and_the_targets(bench_json, monkeypatch):
    # The same command without --json, printing the figures the module's bench run measured (measuring again would
    # cost the suite 20 s and test nothing more: format_report reads only the result).
    monkeypatch.setattr(bench_cli, "run", lambda settings: json.loads(bench_json))
    report = run_bench(TOY)
    assert report.startswith("bcnn.bench on ")
    assert "targets:" in report and "reproduce: python -m bcnn.bench --device cpu --image-size 32" in report
    for name in expected_cases():
        assert f"\n{name} " in report
    targets = report.split("targets:")[1]
    for label in ("stage2_step time / bare time", "stage2_step speedup over fp32 + NCHW",
                  "loader images/s / stage2_step images/s", "live / cached stage-1 epoch time",
                  "heads: matrix_sqrt step time / bilinear's", "heads: compact step time / bilinear's"):
        line = next(line for line in targets.splitlines() if label in line)
        assert line.rstrip().endswith(("PASS", "MISS", "n/a"))


def test_fp16_on_the_cpu_is_refused_before_any_work():
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        main([*TOY, "--precision", "fp16"])


def test_the_recipe_bench_times_each_part_and_projects_cubs_size(tmp_path):
    """`--recipe` at a toy size: photo-like JPEGs in the CUB layout, each part of the recipe timed, and the
    projection to CUB's counts recomputed here from the rates it reports."""
    # refused with --recipe, which does not use them
    steps_only = {"--cache-image-size", "--cache-batch-size", "--heads-image-size", "--heads-batch-size"}
    toy = [arg for i, arg in enumerate(TOY) if arg not in steps_only and (i == 0 or TOY[i - 1] not in steps_only)]
    result = json.loads(run_bench([*toy, "--recipe", "--recipe-images", "8", "--photo-side",
                                   "40", "--decode", "gpu", "--json"]))
    assert result["decode"] == "batched on cpu"
    recipe_args = parse_args(result["command"].split()[3:])  # the command it prints runs the same bench
    check_combination(recipe_args)
    assert (recipe_args.recipe_images, recipe_args.photo_side, recipe_args.classes) == (8, 40, 2)
    data = result["data"]
    assert data["train"] + data["val"] == math.ceil(8 / 0.9) and data["test"] == data["train"] + data["val"]
    cases = result["cases"]
    assert list(cases) == ["stage1_live_epoch", "cache_build", "stage1_cached_epoch", "stage2_epoch", "val_eval",
                           "test_eval"]
    assert cases["stage1_cached_epoch"]["images"] == 2 * data["train"]  # rows: center and flip of each image
    for case in cases.values():
        assert case["seconds"] > 0 and case["images_per_sec"] == pytest.approx(case["images"] / case["seconds"])
    rate = {name: case["images_per_sec"] for name, case in cases.items()}
    train, val, test = 5394, 600, 5794
    stage1 = (train + val) / rate["cache_build"] + 55 * (2 * train + val) / rate["stage1_cached_epoch"]
    stage2 = 25 * (train / rate["stage2_epoch"] + val / rate["val_eval"])
    projection = result["projection"]
    assert projection["stage1_cached_seconds"] == pytest.approx(stage1)
    assert projection["stage2_seconds"] == pytest.approx(stage2)
    assert projection["total_seconds"] == pytest.approx(stage1 + stage2 + test / rate["test_eval"])


def test_photo_like_images_compress_like_photos(tmp_path):
    from bcnn.bench.recipe import write_photo_cub
    _, mean_kb = write_photo_cub(tmp_path / "cub", trainval=4, test=2)
    assert 40 <= mean_kb <= 65  # CUB's photos: about 500 x 375 and 45 KB; the stripes of `synth` are a few KB


@pytest.mark.parametrize("argv, expected", [
    (["--image-size", "0"], "--image-size must be at least 16 (VGG16's relu5_3 map is 1/16 of the image), got 0."),
    (["--batch-size", "0"], "--batch-size must be at least 1 (a step takes one image at least), got 0."),
    (["--heads-image-size", "15"], "--heads-image-size must be at least 16 (VGG16's relu5_3 map is 1/16 of the "
                                   "image), got 15."),
    (["--classes", "1"], "--classes must be at least 2 (a classifier over one class learns nothing: its loss is 0 "
                         "whatever its weights), got 1."),
    (["--warmup", "-1"], "--warmup must be at least 0 (a count of untimed steps), got -1."),
    (["--decoders", "--classes", "5", "--precision", "fp32"], "--precision and --classes do not apply with "
                                                              "--decoders; drop --decoders or leave"),
    (["--recipe", "--heads-batch-size", "8"], "--heads-batch-size does not apply with --recipe; drop --recipe"),
    (["--recipe", "--recipe-images", "0"], "--recipe-images must be at least 4"),
    (["--photo-side", "200"], "--photo-side does not apply without --recipe; add --recipe or leave --photo-side out."),
    (["--decode", "gpu", "--recipe-images", "8"], "--recipe-images and --decode do not apply without --recipe"),
    (["--recipe", "--cache-batch-size", "8"], "--cache-batch-size does not apply with --recipe; drop --recipe"),
    (["--decoders", "--recipe"], "--decoders and --recipe are two benchmarks; run them one at a time."),
    (["--recipe", "--augment"], "--recipe and --augment are two benchmarks; run them one at a time."),
    (["--augment", "--recipe-images", "8"], "--recipe-images does not apply with --augment; drop --augment"),
    (["--decoders", "--heads-batch-size", "8"], "--heads-batch-size does not apply with --decoders; drop --decoders "
                                                "or leave --heads-batch-size out."),
    (["--protocol-sizes", "5", "5", "5"], "--protocol-sizes takes three positive numbers (queries, gallery, "
                                          "dimensions) and goes with --protocols"),
    (["--protocols", "--protocol-sizes", "5", "0", "5"], "--protocol-sizes takes three positive numbers"),
    (["--protocols", "--steps", "2"], "--steps does not apply with --protocols; drop --protocols"),
])
def test_bench_options_out_of_range_or_combined_badly_are_one_sentence_before_any_work(argv, expected):
    with pytest.raises(UserError) as error:
        main(["--device", "cpu", *argv])
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_the_decoder_bench_times_each_decoder_and_compares_their_pixels_with_pil():
    pytest.importorskip("torchcodec.decoders")
    result = json.loads(run_bench(["--decoders", "--device", "cpu", "--batch-size", "3", "--steps", "3",
                                   "--warmup", "0", "--json"]))
    assert set(result["speed"]) == {"torchcodec", "torchvision", "PIL"} and result["default_decoder"] == "torchcodec"
    for speed in result["speed"].values():
        assert speed["images_per_sec"] == pytest.approx(3 / speed["median_seconds"])
    assert result["torchcodec_over_torchvision"] > 0
    kinds = result["max_grey_levels_from_pil"]
    assert {"baseline 4:2:0", "progressive 4:4:4", "grayscale", "CMYK"} <= set(kinds)
    # libjpeg-turbo's integer IDCT in all three (0 measured here); one grey level is the batched path's bound
    assert all(levels <= 1 for by_decoder in kinds.values() for levels in by_decoder.values())
    assert result["command"] == "python -m bcnn.bench --decoders --device cpu --batch-size 3 --steps 3 --warmup 0"
    report = run_bench(["--decoders", "--device", "cpu", "--batch-size", "2", "--steps", "1", "--warmup", "0"])
    assert report.startswith("bcnn.bench --decoders on ") and "largest difference from PIL's RGB" in report



def test_the_augmentation_bench_times_each_set_against_the_step():
    result = json.loads(run_bench(["--augment", "--device", "cpu", "--image-size", "32", "--batch-size", "2",
                                   "--steps", "1", "--warmup", "0", "--num-workers", "1", "--precision", "fp32",
                                   "--json"]))
    from bcnn.bench.augment import AUGMENTATION_SETS
    assert [row["augmentations"] for row in result["sets"]] == list(AUGMENTATION_SETS)
    for row in result["sets"]:
        assert row["ms_per_image"] > 0 and row["loader_images_per_sec"] > 0
        assert math.isclose(row["loader_over_step"], row["loader_images_per_sec"] / result["step_images_per_sec"])
    assert result["mixup_cutmix_ms_per_batch"] > 0 and result["command"].endswith("--augment")


def test_the_protocols_bench_times_knn_and_retrieval_at_the_sizes_given(capsys):
    result = main(["--device", "cpu", "--protocols", "--protocol-sizes", "40", "50", "16", "--classes", "4", "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))  # stdout is the JSON alone
    assert (result["queries"], result["gallery"], result["dim"], result["classes"]) == (40, 50, 16, 4)
    assert result["knn_seconds"] > 0 and result["retrieval_seconds"] > 0 and result["knn_target_seconds"] == 10
    assert "--protocol-sizes 40 50 16 --classes 4" in result["command"]
    main(["--device", "cpu", "--protocols", "--protocol-sizes", "40", "50", "16", "--classes", "4"])
    assert "k-NN (k = 10, 20, 100, 200): 40 queries x 50 gallery x 16-d, 4 classes:" in capsys.readouterr().out

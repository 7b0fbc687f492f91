"""python -m bcnn.bench --runtime at a toy size (VGG16, bilinear, 32 px): every case measured, images/s and the
target's verdict following from the timed seconds, the human form printing the JSON's figures; options the runtime
bench does not use are refused in one sentence."""

import contextlib
import io
import json

import pytest

from bcnn.bench.__main__ import main
from bcnn.bench.runtime import BATCHES, format_runtime
from bcnn.errors import UserError

pytest.importorskip("onnxruntime")
ARGV = ["--runtime", "--device", "cpu", "--image-size", "32", "--steps", "2", "--warmup", "0", "--classes", "3"]


def test_every_runtime_case_is_measured_and_the_verdict_follows_from_the_figures():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = main([*ARGV, "--json"])
    assert json.loads(out.getvalue()) == json.loads(json.dumps(result))  # stdout is the JSON and nothing else
    expected = [f"{case}, batch {batch}" for batch in BATCHES for case in ("eager fp32", "eager bf16", "onnxruntime")]
    assert list(result["cases"]) == expected
    for row in result["cases"].values():
        assert row["seconds"] > 0 and row["images_per_second"] == pytest.approx(row["batch"] / row["seconds"])
    ratio = (result["cases"]["onnxruntime, batch 1"]["images_per_second"]
             / result["cases"]["eager fp32, batch 1"]["images_per_second"])
    assert result["onnx_over_eager_fp32_batch1"] == pytest.approx(ratio)
    assert result["target"]["met"] == (ratio >= 1.0)
    text = format_runtime(result)
    for name, row in result["cases"].items():
        line = next(line for line in text.splitlines() if line.startswith(name))
        assert line.split()[-2:] == [f"{row['seconds']:.3f}", f"{row['images_per_second']:.2f}"]
    assert text.splitlines()[-1].endswith(f"{ratio:.3f}  {'PASS' if ratio >= 1 else 'MISS'}")


@pytest.mark.parametrize("argv, expected", [
    (["--runtime", "--batch-size", "4"], "--batch-size does not apply with --runtime"),
    (["--runtime", "--peft"], "--peft and --runtime are two benchmarks; run them one at a time."),
])
def test_options_that_do_not_go_with_runtime_are_refused_in_one_sentence(argv, expected):
    with pytest.raises(UserError) as error:
        main(["--device", "cpu", *argv])
    assert expected in str(error.value)

"""On a CUDA GPU (`make test-gpu`; skipped without one): mixed-precision steps, a run killed and resumed, torchrun
with NCCL, and evaluation, prediction and the benchmark on the GPU against the same on the CPU.

Runs are tiny (random VGG16, 32-64 px) and use the commands a user runs; the CPU is the reference.
"""

import json
import math
import signal
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bcnn import predict as predict_cli
from bcnn.bench import steps as bench_steps
from bcnn.bench.__main__ import main as bench_main
from bcnn.config import Config, ModelConfig
from bcnn.data import write_synthetic_cub
from bcnn.engine import train_one_epoch
from bcnn.models import build_model
from bcnn.precision import autocast, grad_scaler
from bcnn.optim import build_optimizer
from helpers.numerics import FORWARD_RTOL, assert_same_training, relative_error
from helpers.runs import REPO, launch, small_run_args

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
TORCHRUN = (sys.executable, "-m", "torch.distributed.run")
KILL_HELPER = str(REPO / "tests" / "helpers" / "kill_after_save.py")
# Half-precision logits against float32's: each format rounds with relative error u (bf16 2^-9, fp16 2^-11) per
# operation, and through 13 convolutions the errors partly cancel. We allow 10u relative (L2 over the batch's
# logits): 2e-2 for bf16 (as the CPU test), 5e-3 for fp16.
HALF_LOGIT_RTOL = {"bf16": 10 * 2.0**-9, "fp16": 10 * 2.0**-11}


def cuda_run_args(data, run_dir, *extra):
    return [*small_run_args(data, run_dir, *extra), "--device=cuda"]  # the later --device wins


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_cub(tmp_path_factory.mktemp("gpu") / "cub", classes=3, per_class=13, seed=0)


@pytest.fixture(scope="module")
def cuda_run(data, tmp_path_factory):
    """helpers.runs.small_run_args on the GPU, one process, uninterrupted. Read it, never change it."""
    run_dir = tmp_path_factory.mktemp("cuda") / "run"
    result = launch(sys.executable, "-m", "bcnn.train", *cuda_run_args(data, run_dir))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return run_dir


def weights(run_dir):
    return torch.load(Path(run_dir) / "last.pt", map_location="cpu", weights_only=True)["model"]


def stage2_config() -> Config:
    """Everything trains, at the demo's stage-2 learning rates."""
    cfg = Config()
    cfg.model.backbone_weights, cfg.model.freeze_backbone = "none", False
    cfg.optim.lr, cfg.optim.backbone_lr = 1e-2, 1e-3
    return cfg


def initial_weights():
    torch.manual_seed(0)  # what bcnn.train does with train.seed 0 before it builds the model
    return build_model(ModelConfig(backbone_weights="none", freeze_backbone=False), num_classes=3,
                       input_size=32).state_dict()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_half_precision_training_step_has_finite_gradients_and_logits_close_to_float32(precision):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone_weights="none", freeze_backbone=False), num_classes=10, input_size=64)
    generator = torch.Generator().manual_seed(1)
    images, targets = torch.randn(8, 3, 64, 64, generator=generator), torch.randint(0, 10, (8,), generator=generator)
    with torch.no_grad():
        reference = model(images)  # float32 on the CPU: IEEE, no TF32
    model.to(CUDA, memory_format=torch.channels_last)
    with torch.no_grad(), autocast(precision, CUDA):
        logits = model(images.to(CUDA, memory_format=torch.channels_last))
    assert logits.dtype == torch.float32, "the head runs in float32"
    error = relative_error(logits.cpu(), reference)
    assert 0 < error < HALF_LOGIT_RTOL[precision], error

    before = {key: value.clone() for key, value in model.state_dict().items()}
    optimizer = build_optimizer(stage2_config(), model)
    scaler = grad_scaler(precision, CUDA)
    assert scaler.is_enabled() == (precision == "fp16")
    # Two steps of 4 images: fp16's scaler may skip a first step whose scaled gradients overflow.
    stats = train_one_epoch(model, DataLoader(TensorDataset(images, targets), batch_size=4), optimizer, CUDA,
                            epoch=1, scaler=scaler, log_every=0, precision=precision, channels_last=True)
    assert stats["images"] == 8 and math.isfinite(stats["loss"])
    gradients = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in gradients)
    after = model.state_dict()
    assert all(torch.isfinite(value).all() for value in after.values())
    for key in ("classifier.weight", "backbone.0.weight"):  # a step was applied, not every one skipped by the scaler
        assert not torch.equal(after[key].cpu(), before[key].cpu()), key


def test_a_cuda_run_killed_and_rerun_resumes_and_finishes(data, cuda_run, tmp_path):
    run_dir = tmp_path / "run"
    killed = launch(sys.executable, KILL_HELPER, *cuda_run_args(data, run_dir))  # SIGKILL after its first last.pt
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    again = launch(sys.executable, "-m", "bcnn.train", *cuda_run_args(data, run_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "epoch 1, step 2" in again.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    # cuDNN picks its algorithms per process (benchmark mode) and some sum in no fixed order: the resumed run
    # equals the uninterrupted one to rounding, not bit for bit.
    assert_same_training(weights(cuda_run), weights(run_dir), initial_weights())


def test_torchrun_with_one_process_on_cuda_trains_through_nccl_and_ddp(data, cuda_run, tmp_path):
    run_dir = tmp_path / "run"
    result = launch(*TORCHRUN, "--standalone", "--nproc_per_node=1", "-m", "bcnn.train",
                    *cuda_run_args(data, run_dir))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "1 process(es) (process group: nccl), device cuda:0" in log and "epoch 2 done" in log
    assert_same_training(weights(cuda_run), weights(run_dir), initial_weights())


def evaluate_on(device, checkpoint, output):
    result = launch(sys.executable, "-m", "bcnn.eval", "--checkpoint", str(checkpoint), "--split=test",
                    f"--device={device}", "--batch-size=4", f"--output={output}", "--no-figures")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(Path(output).read_text())


def test_eval_on_cuda_equals_eval_on_the_cpu(cuda_run, tmp_path):
    checkpoint = cuda_run / "best.pt"
    gpu = evaluate_on("cuda", checkpoint, tmp_path / "gpu.json")
    cpu = evaluate_on("cpu", checkpoint, tmp_path / "cpu.json")
    assert gpu["count"] == cpu["count"] == 21
    # IEEE float32 on both (eval's default precision turns TF32 off): the same images classified alike, and the
    # mean loss equal to forward-pass rounding (helpers.numerics.FORWARD_RTOL).
    for key in ("top1", "top5", "mean_class_acc"):
        assert gpu[key] == cpu[key], key
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=FORWARD_RTOL)


def test_predict_on_cuda_gives_the_probabilities_of_the_cpu(data, cuda_run, capsys):
    images = sorted(str(path) for path in (data / "images").rglob("*.jpg"))[:6]
    common = [*images, "--checkpoint", str(cuda_run / "best.pt"), "--topk", "3", "--json", "--batch-size", "4"]
    gpu, cpu = predict_cli.main([*common, "--device", "cuda"]), predict_cli.main([*common, "--device", "cpu"])
    capsys.readouterr()
    assert len(gpu) == len(cpu) == 6
    for on_gpu, on_cpu in zip(gpu, cpu):
        assert [p["class"] for p in on_gpu["predictions"]] == [p["class"] for p in on_cpu["predictions"]]
        # p_i moves by p_i * |dz_i - sum_j p_j dz_j| <= 2 max|dz| when the logits z move by dz; this model's
        # logits are below 1 (a normalised feature times a kaiming-initialised classifier) and agree to FORWARD_RTOL.
        assert [p["probability"] for p in on_gpu["predictions"]] == pytest.approx(
            [p["probability"] for p in on_cpu["predictions"]], abs=2 * FORWARD_RTOL)


def test_bench_on_cuda_emits_its_json(capsys):
    bench_main(["--device", "cuda", "--image-size", "64", "--batch-size", "4", "--steps", "2", "--warmup", "1",
                "--classes", "5", "--cache-image-size", "64", "--cache-batch-size", "8", "--num-workers", "1",
                "--heads-image-size", "64", "--heads-batch-size", "4", "--json"])
    result = json.loads(capsys.readouterr().out)  # stdout is the JSON and nothing else
    assert result["device"]["type"] == "cuda" and result["precision"] in ("bf16", "fp16")
    assert set(result["cases"]) == set(bench_steps.case_names())
    for name, case in result["cases"].items():
        assert case["images_per_sec"] > 0 and case["ms_per_step"] > 0, name
    # On CUDA every case that builds a model reports the allocator's peak (the loader alone allocates nothing; the
    # heads timed in turn share one peak, so none is theirs).
    assert all(case["peak_memory_mib"] > 0 for name, case in result["cases"].items()
               if name != "loader" and not name.startswith("heads_"))
    assert all(check["value"] is not None for check in result["targets"])



def test_the_decoder_bench_on_cuda_reports_each_decoder_and_its_pixels(capsys):
    # TorchCodec and torchvision through nvJPEG beside PIL (the figures docs/speed.md lacks); nvJPEG may round
    # otherwise than libjpeg-turbo, so the pixels are printed, bounded as test_nvjpeg_batches_match_the_pil_path's
    bench_main(["--decoders", "--device", "cuda", "--batch-size", "16", "--steps", "5", "--warmup", "1", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["device"]["type"] == "cuda" and all(s["images_per_sec"] > 0 for s in result["speed"].values())
    print(json.dumps(result["speed"]), json.dumps(result["max_grey_levels_from_pil"]))
    assert all(levels <= 16 for by_decoder in result["max_grey_levels_from_pil"].values()
               for levels in by_decoder.values())


def test_nvjpeg_batches_match_the_pil_path(data):
    """data.decode=gpu on the GPU (nvjpeg, the side stream) against the PIL path on the same images and seeds.
    On the CPU the two agree within one grey level (tests/test_gpu_decode.py); nvjpeg's IDCT and chroma
    upsampling may round differently. These bounds were written without a GPU to measure on: the mean within
    one level, no pixel past 16 (a wrong crop or flip is tens of levels off on the stripes). Measure, then tighten."""
    from bcnn.config import DataConfig
    from bcnn.data import build_dataset, build_loader
    from bcnn.data.gpu import DeviceDecodeLoader

    cfg = DataConfig(root=str(data), resize=72, crop=64, val_fraction=0.0, num_workers=1)
    dataset = build_dataset(cfg, "trainval")
    reference = build_loader(dataset, 8, True, num_workers=1, seed=1)
    batched = DeviceDecodeLoader(dataset, cfg, 8, True, num_workers=1, seed=1, device=CUDA)
    reference.sampler.set_epoch(1)
    batched.sampler.set_epoch(1)
    std = torch.tensor(dataset.normalisation[1]).view(1, 3, 1, 1) * 255
    differences = []
    for (expected, labels), (images, batched_labels) in zip(reference, batched):
        assert images.device.type == "cuda" and torch.equal(labels, batched_labels.cpu())
        differences.append(((images.cpu() - expected).abs() * std).flatten())
    levels = torch.cat(differences)
    print(f"nvjpeg vs PIL: mean {levels.mean():.3f}, max {levels.max():.2f} grey levels")
    assert levels.mean() <= 1.0 and levels.max() <= 16


def test_compact_head_is_deterministic_on_cuda_and_agrees_with_the_cpu():
    # Each bucket sums its channel pairs in one fixed order, forward and backward (a gather by a permutation, no
    # atomics): the same bits on every run, with PyTorch's deterministic mode on or off. Against the CPU: float32
    # sums of the Gram product in another order, sqrt(784) u = 1.7e-6 relative; allowed FORWARD_RTOL.
    from bcnn.models.pooling import CompactBilinearPooling

    head = CompactBilinearPooling(channels=512, dim=8192)
    x = torch.rand(4, 512, 28, 28, generator=torch.Generator().manual_seed(0))
    x = torch.where(x > 0.5, x, 0)
    weights = torch.randn(4, 8192, generator=torch.Generator().manual_seed(1))

    def forward_backward(device, deterministic):
        previous = torch.are_deterministic_algorithms_enabled(), torch.backends.cuda.matmul.allow_tf32
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 products, as on the CPU (bcnn.precision may allow TF32)
        try:
            leaf = x.to(device).requires_grad_()
            out = head.to(device)(leaf)
            (out * weights.to(device)).sum().backward()
            return out.detach().cpu(), leaf.grad.cpu()
        finally:
            torch.use_deterministic_algorithms(previous[0])
            torch.backends.cuda.matmul.allow_tf32 = previous[1]

    runs = [forward_backward(CUDA, deterministic) for deterministic in (False, False, False, True)]
    for out, grad in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(grad, runs[0][1])
    on_cpu = forward_backward(torch.device("cpu"), False)
    assert relative_error(runs[0][0], on_cpu[0]) < FORWARD_RTOL
    assert relative_error(runs[0][1], on_cpu[1]) < FORWARD_RTOL

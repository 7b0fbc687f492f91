"""bcnn.export: a checkpoint becomes an ONNX file or a torch.export program that gives the checkpoint's logits on
its test images at two batch sizes (the check the command runs, and here again on other images), with a sidecar
that says how to feed it; bcnn.onnx_predict, in a process where torch cannot be imported, gives bcnn.predict's
top-k on the same files; a file bcnn.export did not write is never replaced."""

import json
import subprocess
import sys

import pytest
import torch

from bcnn import export as export_cli
from bcnn import predict as predict_cli
from bcnn import train as train_cli
from bcnn.checkpoint import save_checkpoint
from bcnn.config import config_to_dict, load_config
from bcnn.data import build_dataset
from bcnn.errors import UserError
from bcnn.models import build_model
from bcnn.models.pooling import HEADS, Pooling, gram_matrix
from bcnn.models.trained import from_checkpoint
from helpers.runs import REPO, STAGE1

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")


def trained_checkpoint(data, folder, *overrides):
    run_dir = folder / "run"
    train_cli.main(["--config", STAGE1, f"--data.root={data}", f"--run-dir={run_dir}", "--device=cpu",
                    "--model.backbone=vgg16", "--model.backbone_weights=none", "--data.crop=32", "--data.resize=36",
                    "--data.val_fraction=0.34", "--data.num_workers=0", "--train.epochs=1", "--train.batch_size=4",
                    "--train.log_every=0", "--train.precision=fp32", "--train.heatmap_images=0",
                    "--train.projector=false", *overrides])
    return run_dir / "best.pt"


def untrained_checkpoint(data, folder, *overrides):
    """A checkpoint as bcnn.train writes one, of the model the overrides describe before any step (an export does not
    care how its weights were found, and training each would cost the suite seconds): its config and its dataset's
    classes, so that the parity check reads that dataset's test images."""
    cfg = load_config(STAGE1, [f"--data.root={data}", "--model.backbone=vgg16", "--model.backbone_weights=none",
                               "--data.crop=32", "--data.resize=36", *overrides])
    classes = build_dataset(cfg.data, "test", train_transform=False).classes
    torch.manual_seed(0)
    model = build_model(cfg.model, len(classes), input_size=cfg.data.crop)
    path = folder / "best.pt"
    save_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg), "classes": classes, "epoch": 0},
                    path)
    return path


@pytest.fixture(scope="module")
def checkpoint(cub_3x6, tmp_path_factory):
    return trained_checkpoint(cub_3x6, tmp_path_factory.mktemp("export"))


def test_onnx_export_gives_the_checkpoint_s_answers_and_predicts_without_torch(checkpoint, cub_3x6, tmp_path):
    output = tmp_path / "model.onnx"
    sidecar = export_cli.main([str(checkpoint), "--output", str(output)])
    written = json.loads((tmp_path / "model.onnx.json").read_text())
    assert written == sidecar and written["sha256"] == export_cli.file_sha256(output)
    trained = from_checkpoint(checkpoint)
    assert written["classes"] == trained.classes and written["input"]["height"] == 32
    assert written["parity"]["top1_agreement"] == 1.0
    assert written["parity"]["max_logit_difference"] <= written["parity"]["allowed"]

    # bcnn.onnx_predict where torch cannot be imported, against bcnn.predict through the checkpoint
    images = sorted(str(path) for path in (cub_3x6 / "images").rglob("*.jpg"))[:5]
    blocked = ("import sys; sys.modules.update(torch=None, torchvision=None); from bcnn.onnx_predict import main; "
               f"main({['--model', str(output), '--json', '--topk', '3', *images]!r})")
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    without_torch = json.loads(result.stdout)
    with_torch = predict_cli.main([*images, "--checkpoint", str(checkpoint), "--json", "--topk", "3", "--device",
                                   "cpu"])
    assert len(without_torch) == len(with_torch) == 5
    for ours, theirs in zip(without_torch, with_torch):
        assert [p["class"] for p in ours["predictions"]] == [p["class"] for p in theirs["predictions"]]
        for a, b in zip(ours["predictions"], theirs["predictions"]):
            # the same pixels (Pillow's resize both ways) and logits within the export's tolerance: softmax moves a
            # probability by at most half the largest logit difference
            assert a["probability"] == pytest.approx(b["probability"], abs=written["parity"]["allowed"] / 2)


def test_a_torch_export_program_gives_the_checkpoint_s_logits_at_any_batch(checkpoint, tmp_path):
    output = tmp_path / "model.pt2"
    sidecar = export_cli.main([str(checkpoint), "--format", "torch", "--output", str(output)])
    assert sidecar["format"] == "torch" and sidecar["parity"]["top1_agreement"] == 1.0
    program = torch.export.load(str(output)).module()
    trained = from_checkpoint(checkpoint)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)  # a batch size the check did not use
    mean, std = (torch.tensor(value).view(1, 3, 1, 1) for value in trained.normalisation)
    with torch.no_grad():
        logits, vectors = program(images)
        eager = trained.model((images.float() / 255 - mean) / std)
    torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-5)
    assert vectors.shape == (5, trained.model.pooling.output_dim)


def test_a_file_bcnn_export_did_not_write_is_never_replaced(checkpoint, tmp_path):
    output = tmp_path / "model.onnx"
    output.write_text("a user's file")
    with pytest.raises(UserError, match="model.onnx exists and bcnn.export did not write it"):
        export_cli.main([str(checkpoint), "--output", str(output), "--no-check"])
    assert output.read_text() == "a user's file" and not list(tmp_path.glob(".model.onnx.*"))
    output.unlink()
    export_cli.main([str(checkpoint), "--output", str(output), "--no-check"])
    export_cli.main([str(checkpoint), "--output", str(output), "--no-check"])  # its own file: replaced
    assert json.loads((tmp_path / "model.onnx.json").read_text())["parity"] == "not checked (--no-check)"


@pytest.mark.parametrize("head", [["--model.pooling=matrix_sqrt"], ["--model.pooling=isqrt_cov"],
                                  ["--model.pooling=compact", "--model.compact_dim=512"], ["--model.pooling=avg"],
                                  ["--model.backbone_b=vgg19", "--model.backbone_b_weights=none"]],
                         ids=["matrix_sqrt", "isqrt_cov", "compact", "avg", "two_networks"])
def test_every_head_exports_to_onnx_within_the_tolerance(head, cub_3x6, tmp_path):
    # the compact head's bucket table is a buffer (not a cache keyed on a data pointer): the exporter traces it
    checkpoint = untrained_checkpoint(cub_3x6, tmp_path, *head)
    sidecar = export_cli.main([str(checkpoint), "--output", str(tmp_path / "model.onnx")])
    assert sidecar["parity"]["top1_agreement"] == 1.0
    assert sidecar["parity"]["max_logit_difference"] <= sidecar["parity"]["allowed"]


def test_a_lora_vit_exports_merged(cub_3x6, tmp_path):
    pytest.importorskip("peft")
    checkpoint = untrained_checkpoint(cub_3x6, tmp_path, "--model.backbone=timm:vit_tiny_patch16_224",
                                    "--model.pooling=avg", "--model.adapt=lora", "--optim.backbone_lr=0.01")
    state = torch.load(checkpoint, weights_only=True)
    for key, value in state["model"].items():
        if ".lora_B." in key:
            value.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))  # a trained update: B = 0 at first
    save_checkpoint(state, checkpoint)
    sidecar = export_cli.main([str(checkpoint), "--output", str(tmp_path / "model.onnx")])
    assert sidecar["model"]["lora_layers_merged"] == 12  # each block's qkv: the graph holds plain weights
    assert sidecar["parity"]["top1_agreement"] == 1.0
    graph = onnx.load(str(tmp_path / "model.onnx"))
    assert not any("lora" in initializer.name.lower() for initializer in graph.graph.initializer)


# Each backbone family to ONNX (the average head: the heads are tested above on VGG16; torch.export is the first step
# of the ONNX exporter, and VGG16's program is tested above): a network of each torchvision family, and a timm
# transformer of each kind (a ViT with registers, a windowed Swin).
FAMILIES = {"resnet50": ["--data.crop=32", "--data.resize=36"],
            "densenet121": ["--data.crop=32", "--data.resize=36"],
            "convnext_tiny": ["--data.crop=32", "--data.resize=36"],
            "timm:vit_small_patch14_reg4_dinov2": ["--data.crop=28", "--data.resize=32"],
            "timm:swin_tiny_patch4_window7_224": ["--data.crop=64", "--data.resize=72"]}


@pytest.mark.export_families  # about 70 s of CPU: make test-export (make test leaves it out)
@pytest.mark.parametrize("backbone", FAMILIES)
def test_every_backbone_family_exports_within_the_tolerance(backbone, cub_3x6, tmp_path):
    checkpoint = untrained_checkpoint(cub_3x6, tmp_path, f"--model.backbone={backbone}", "--model.pooling=avg",
                                      *FAMILIES[backbone])
    sidecar = export_cli.main([str(checkpoint), "--output", str(tmp_path / "model.onnx")])
    assert sidecar["parity"]["top1_agreement"] == 1.0
    assert sidecar["parity"]["max_logit_difference"] <= sidecar["parity"]["allowed"]


def test_another_image_size_for_a_convolutional_backbone_and_its_refusals(checkpoint, cub_3x6, tmp_path):
    sidecar = export_cli.main([str(checkpoint), "--format", "torch", "--output", str(tmp_path / "m.pt2"),
                               "--image-size", "48", "--check-images", "5"])
    assert (sidecar["input"]["height"], sidecar["preprocess"]["resize_shorter_side"]) == (48, 54)  # 36 x 48 / 32
    assert sidecar["parity"]["images"] == 5 and sidecar["parity"]["batch_sizes"] == [1, 3]  # 1, then 3 and 1
    with pytest.raises(UserError, match="--check-images must be at least 2"):
        export_cli.main([str(checkpoint), "--format", "torch", "--output", str(tmp_path / "n.pt2"),
                         "--check-images", "1"])
    assert not (tmp_path / "n.pt2").exists()
    vit = untrained_checkpoint(cub_3x6, tmp_path, "--model.backbone=timm:vit_tiny_patch16_224", "--model.pooling=avg")
    with pytest.raises(UserError, match=r"--image-size 64: the model .* cannot take 64 x 64 images .*leave "
                                        r"--image-size out to export at its crop, 32"):
        export_cli.main([str(vit), "--output", str(tmp_path / "vit.onnx"), "--image-size", "64"])


class EighSqrtPooling(Pooling):
    """A head a researcher might add: the matrix square root of the Gram matrix by an eigendecomposition, which no
    ONNX operator computes (bcnn's matrix_sqrt uses Newton-Schulz, products only)."""

    def __init__(self, channels: int):
        super().__init__()
        self.output_dim = channels * channels

    def forward(self, x, x_b=None):
        values, vectors = torch.linalg.eigh(gram_matrix(x, x))
        root = (vectors * values.clamp_min(0).sqrt().unsqueeze(1)) @ vectors.transpose(1, 2)
        return torch.nn.functional.normalize(root.flatten(1), dim=1)


def test_a_head_onnx_cannot_express_is_refused_with_its_operation_and_the_issue_to_follow(cub_3x6, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.setitem(HEADS, "eigh_sqrt", EighSqrtPooling)
    checkpoint = untrained_checkpoint(cub_3x6, tmp_path, "--model.pooling=eigh_sqrt")
    with pytest.raises(UserError, match=r"has no ONNX function for aten\._linalg_eigh\b.*onnx/onnx#5570 and "
                                        r"pytorch/pytorch#81084; --format torch exports it"):
        export_cli.main([str(checkpoint), "--output", str(tmp_path / "model.onnx")])
    assert not list(tmp_path.glob("*model.onnx*"))  # nothing written, no temporary file left
    # the way out the refusal names: torch.export traces the eigendecomposition, and the program agrees
    sidecar = export_cli.main([str(checkpoint), "--format", "torch", "--output", str(tmp_path / "model.pt2")])
    assert sidecar["parity"]["top1_agreement"] == 1.0


def test_a_graph_onnx_runtime_cannot_run_is_refused_in_one_sentence(tmp_path):
    # a real ONNX file whose operator ONNX Runtime has no kernel for (a domain of its own), as an exporter could write
    node = onnx.helper.make_node("Sketch", ["images"], ["logits"], domain="bcnn.example")
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.UINT8,
                                                                                    [None, 3, 8, 8])],
                                   [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [None, 2])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18),
                                                         onnx.helper.make_opsetid("bcnn.example", 1)])
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(UserError, match=r"^ONNX Runtime cannot run the exported graph \(.*Sketch.*\); nothing was "
                                        r"written: open an issue at github.com/pytorch/pytorch"):
        export_cli.run_exported(tmp_path / "model.onnx", "onnx")


@pytest.mark.parametrize("operation, issue", [("aten._linalg_eigh", "onnx/onnx#5570"),
                                              ("aten._linalg_svd", "onnx/onnx#5570"),
                                              ("aten.linalg_cholesky_ex", "onnx/onnx#5570"),
                                              ("aten._fft_r2c", "pytorch/pytorch#188496"), ("DFT", "#188496"),
                                              ("aten.relu", "open an issue"), (None, "open an issue")])
def test_each_blocked_operation_names_the_issue_that_tracks_it(operation, issue):
    assert issue in export_cli.where_to_follow(operation)

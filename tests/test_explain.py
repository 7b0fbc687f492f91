"""Heatmaps (issue 20, bcnn/explain.py): the evidence of a model whose answer is known by construction (on a hand-made
network and on every backbone family: ResNet, ConvNeXt, ViT, Swin), every head on a real backbone, and bcnn.predict
--explain on a PNG, a grayscale JPEG and a CMYK JPEG (the files the synthetic CUB writes), a missing captum in one
sentence, and never replacing a file bcnn did not write."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bcnn import predict as predict_cli
from bcnn.checkpoint import save_checkpoint
from bcnn.config import ModelConfig, config_from_dict, config_to_dict, load_config
from bcnn.data import write_synthetic_cub
from bcnn.errors import UserError
from bcnn.explain import box_in_view, class_heatmaps, peak_cells, upsample
from bcnn.models import BilinearCNN, build_model
from bcnn.models.backbones import build_backbone
from bcnn.models.pooling import Pooling
from helpers.runs import STAGE1

pytest.importorskip("captum")


class TopLeftAverage(Pooling):
    """The mean feature over the map's top-left quadrant only: evidence elsewhere cannot reach the score."""

    def __init__(self, channels: int):
        super().__init__()
        self.output_dim = channels

    def forward(self, x, x_b=None):
        return x[:, :, : x.shape[2] // 2, : x.shape[3] // 2].mean(dim=(2, 3))


def test_the_evidence_of_a_quadrant_classifier_lies_in_its_quadrant():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, kernel_size=4, stride=4), nn.ReLU())  # 32 px -> an 8 x 8 map
    model = BilinearCNN(backbone, TopLeftAverage(8), num_classes=3)
    maps = class_heatmaps(model, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    assert maps.shape == (4, 8, 8)
    inside, outside = maps[:, :4, :4], maps.clone()
    outside[:, :4, :4] = 0
    assert torch.all(outside == 0)  # no gradient reaches the other three quadrants: exactly zero
    assert torch.all(inside.flatten(1).sum(1) > 0)
    assert all(row < 4 and column < 4 for row, column in peak_cells(maps))


@pytest.mark.parametrize("name, cut, size", [
    ("resnet50", "layer3", 64), ("convnext_tiny", "stage3", 64), ("timm:vit_tiny_patch16_224", "auto", 64),
    ("timm:swin_tiny_patch4_window7_224", "auto", 128)], ids=["resnet", "convnext", "vit", "swin"])
def test_on_every_backbone_family_the_evidence_lies_on_its_grid_where_the_classifier_looks(name, cut, size):
    # The same quadrant classifier on the real networks: a ResNet and a ConvNeXt map, a ViT's token grid and a
    # Swin's last stage (its channels-last output brought to (B, C, H, W)), each a 4 x 4 map at these sizes.
    pytest.importorskip("timm") if name.startswith("timm:") else None
    torch.manual_seed(0)
    backbone = build_backbone(name, "none", cut, size)
    model = BilinearCNN(backbone.module, TopLeftAverage(backbone.channels), num_classes=3)
    maps = class_heatmaps(model, torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 0]))
    assert maps.shape == (4, size // backbone.stride, size // backbone.stride) == (4, 4, 4)
    outside = maps.clone()
    outside[:, :2, :2] = 0
    # Exactly zero outside; inside, an untrained network's evidence for a class may be negative (clamped to 0)
    # for one image, not for all
    assert torch.all(outside == 0) and float(maps[:, :2, :2].sum()) > 0


def test_the_bilinear_evidence_is_each_position_s_term_of_the_score():
    # Before normalisation a bilinear head's score for class k is sum_p x_p' W_k x_p / HW; with the identity for the
    # normalisation the evidence at p must be twice position p's term (x_p . dS/dx_p = 2 x_p' W_k x_p / HW).
    torch.manual_seed(0)

    class Raw(Pooling):
        def __init__(self):
            super().__init__()
            self.output_dim = 16

        def forward(self, x, x_b=None):
            flat = x.flatten(2)  # (B, C, HW)
            return (flat @ flat.transpose(1, 2)).flatten(1) / flat.shape[2]

    model = BilinearCNN(nn.Conv2d(3, 4, kernel_size=8, stride=8), Raw(), num_classes=2).double()
    images = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        x = model.backbone(images)[0].flatten(1)  # (4, 16 positions)
        weights = model.classifier.weight[1].view(4, 4)
        terms = 2 * torch.einsum("cp,cd,dp->p", x, weights, x) / x.shape[1]
    model.float()
    maps = class_heatmaps(model, images.float(), torch.tensor([1]))[0].flatten()
    assert torch.allclose(maps.double(), terms.clamp_min(0), rtol=1e-4, atol=1e-6)  # float32 against float64


@pytest.mark.parametrize("head", ["bilinear", "matrix_sqrt", "isqrt_cov", "compact", "avg"])
def test_every_head_has_finite_evidence_on_the_backbone_grid(head):
    model = build_model(ModelConfig(backbone_weights="none", pooling=head, isqrt_reduce_dim=16, compact_dim=512), 3)
    images = torch.randn(2, 3, 64, 64)
    maps = class_heatmaps(model, images, torch.tensor([0, 2]))
    assert maps.shape == (2, 4, 4) and torch.isfinite(maps).all() and (maps >= 0).all()
    assert not any(param.grad is not None for param in model.parameters())  # the weights get no gradient
    on_image = upsample(maps, (64, 64))
    assert on_image.shape == (2, 64, 64) and float(on_image.amax()) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    cub = write_synthetic_cub(root / "cub", classes=3, per_class=6, seed=0)
    cfg = load_config(STAGE1, ["--data.crop=32", "--data.resize=40", f"--data.root={cub}"])
    photos = root / "photos"
    photos.mkdir()
    images = cub / "images"
    shutil.copy(images / "001.Synthetic_Class_1" / "Synthetic_Class_1_0001.jpg", photos / "gray.jpg")
    shutil.copy(images / "002.Synthetic_Class_2" / "Synthetic_Class_2_0002.jpg", photos / "cmyk.jpg")
    Image.open(images / "003.Synthetic_Class_3" / "Synthetic_Class_3_0001.jpg").save(photos / "colour.png")
    assert Image.open(photos / "gray.jpg").mode == "L" and Image.open(photos / "cmyk.jpg").mode == "CMYK"
    torch.manual_seed(0)
    model = build_model(cfg.model, 3)
    path = root / "best.pt"
    save_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg), "epoch": 1, "metrics": {},
                     "classes": CLASSES}, path)
    return {"checkpoint": str(path), "photos": photos, "cub": cub}


CLASSES = ["Synthetic Class 1", "Synthetic Class 2", "Synthetic Class 3"]  # as the CUB reader names them


def eval_split_images(checkpoint) -> dict[str, list[str]]:
    """Each class's test images in images.txt order, read from the CUB files themselves (not through bcnn.data)."""
    cub = checkpoint["cub"]
    paths = dict(line.split() for line in (cub / "images.txt").read_text().splitlines() if line.strip())
    test = {image_id for image_id, flag in (line.split() for line in
                                            (cub / "train_test_split.txt").read_text().splitlines() if line.strip())
            if flag == "0"}
    by_class = {name: [] for name in CLASSES}
    for image_id, relative in paths.items():
        if image_id in test:
            folder = relative.split("/")[0]  # 001.Synthetic_Class_1
            by_class[folder.split(".", 1)[1].replace("_", " ")].append(str(cub / "images" / relative))
    return by_class


def test_predict_explain_writes_a_heatmap_per_image_and_names_it_in_json(checkpoint, tmp_path, capsys):
    images = [str(checkpoint["photos"] / name) for name in ("colour.png", "gray.jpg", "cmyk.jpg")]
    folder = tmp_path / "heatmaps"
    results = predict_cli.main([*images, "--checkpoint", checkpoint["checkpoint"], "--json", "--device", "cpu",
                                "--explain", str(folder), "--topk", "3"])
    printed = json.loads(capsys.readouterr().out)
    assert [result["explanation"] for result in printed] == [result["explanation"] for result in results]
    for image, result in zip(images, results):
        png = Image.open(result["explanation"])
        assert png.format == "PNG" and png.info.get("Software") == "bcnn" and png.size[0] > 300
        assert result["explanation"] == str(folder / f"{image.rsplit('/', 1)[1].rsplit('.', 1)[0]}_best_explain.png")
        # the overlay differs from the plain view beside it: a heatmap was drawn
        pixels = np.asarray(png.convert("RGB"), dtype=np.int16)
        half = pixels.shape[1] // 2
        assert np.abs(pixels[:, :half] - pixels[:, half: 2 * half]).mean() > 1
    # Again, with another class: the files bcnn wrote are replaced, none other.
    predict_cli.main([images[0], "--checkpoint", checkpoint["checkpoint"], "--device", "cpu",
                      "--explain", str(folder), "--explain-class", "Synthetic Class 3"])
    assert "Synthetic Class 3" in capsys.readouterr().out


def test_predict_explain_refuses_what_it_cannot_do_in_one_sentence(checkpoint, tmp_path, monkeypatch):
    image = str(checkpoint["photos"] / "colour.png")
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "colour_best_explain.png").write_bytes(b"the user's own file")
    with pytest.raises(UserError, match="exists and is not a heatmap bcnn wrote, so bcnn.predict will not replace"):
        predict_cli.main([image, "--checkpoint", checkpoint["checkpoint"], "--explain", str(folder)])
    assert (folder / "colour_best_explain.png").read_bytes() == b"the user's own file"
    with pytest.raises(UserError, match="--explain-class 'Albatross' is not one of the checkpoint's 3 classes"):
        predict_cli.main([image, "--checkpoint", checkpoint["checkpoint"], "--explain", str(tmp_path / "x"),
                          "--explain-class", "Albatross"])
    with pytest.raises(UserError, match="--explain-class needs --explain"):
        predict_cli.main([image, "--checkpoint", checkpoint["checkpoint"], "--explain-class", "Synthetic Class 3"])
    monkeypatch.setitem(sys.modules, "captum.attr", None)  # as if captum were not installed
    with pytest.raises(UserError, match=r"heatmaps need captum, an optional extra: pip install captum"):
        predict_cli.main([image, "--checkpoint", checkpoint["checkpoint"], "--explain", str(tmp_path / "y")])


@pytest.mark.parametrize("size, box", [((500, 375), (120, 80, 200, 150)), ((300, 450), (10, 300, 280, 140)),
                                       ((64, 64), (0, 0, 64, 64))])
def test_a_box_lands_where_the_eval_transform_puts_its_pixels(size, box):
    # The reference: the box painted white on a black image of that size, through torchvision's own Resize and
    # CenterCrop; its white pixels' extent is where the box is in the view (to a pixel: interpolation blurs edges).
    from torchvision import transforms as T

    mask = Image.new("L", size)
    x, y, w, h = box
    mask.paste(255, (x, y, x + w, y + h))
    view = np.asarray(T.Compose([T.Resize(56), T.CenterCrop(48)])(mask)) > 127
    rows, columns = np.nonzero(view)
    x0, y0, x1, y1 = box_in_view(box, size, resize=56, crop=48)
    assert abs(x0 - columns.min()) <= 1 and abs(x1 - (columns.max() + 1)) <= 1
    assert abs(y0 - rows.min()) <= 1 and abs(y1 - (rows.max() + 1)) <= 1


def test_eval_s_confusion_gallery_shows_exactly_the_pair_s_misclassified_images(checkpoint, tmp_path, capsys):
    from bcnn import eval as eval_cli

    output = tmp_path / "eval_best_test.json"
    result = eval_cli.main(["--checkpoint", checkpoint["checkpoint"], "--split", "test", "--device", "cpu",
                            f"--output={output}"])
    gallery = result["confusion_gallery"]
    assert gallery and [(entry["true"], entry["predicted"]) for entry in gallery] == \
        [(pair["true"], pair["predicted"]) for pair in result["most_confused"][:len(gallery)]]
    png = tmp_path / "eval_best_test_confused_gallery.png"
    assert Image.open(png).info.get("Software") == "bcnn"
    # The reference: bcnn.predict's top-1 of every test image of the two classes, listed from the CUB files.
    capsys.readouterr()
    split = eval_split_images(checkpoint)
    for entry in gallery:
        predicted = {item["image"]: item["predictions"][0]["class"] for item in predict_cli.main(
            [*split[entry["true"]], *split[entry["predicted"]], "--checkpoint", checkpoint["checkpoint"],
             "--json", "--device", "cpu"])}
        confused = [path for path in split[entry["true"]] if predicted[path] == entry["predicted"]]
        correct = [path for path in split[entry["predicted"]] if predicted[path] == entry["predicted"]]
        assert entry["count"] == len(confused)
        assert [item["image"] for item in entry["confused"]] == confused[:4]
        assert [item["image"] for item in entry["correct"]] == correct[:4]


def test_projector_vectors_are_the_embeddings_or_their_principal_components():
    from bcnn.projector import COMPONENTS, MAX_DIM, projector_vectors

    small = torch.randn(30, 512)
    assert projector_vectors(small) is small  # the avg head's 512-d vectors go in whole
    torch.manual_seed(0)
    large = torch.randn(40, MAX_DIM + 100) @ torch.diag(torch.linspace(3, 0.1, MAX_DIM + 100))
    scores = projector_vectors(large).double()
    # The reference: the float64 SVD of the centred matrix, scores U S, each component up to its sign.
    centred = large.double() - large.double().mean(0)
    left, singular, _ = torch.linalg.svd(centred, full_matrices=False)
    reference = (left * singular)[:, : min(COMPONENTS, 40)]
    assert scores.shape == reference.shape
    kept = singular[: reference.shape[1]] > 1e-3 * singular[0]  # below that a direction is rounding, not data
    signs = torch.sign((scores * reference).sum(0))
    assert torch.allclose((scores * signs)[:, kept], reference[:, kept], rtol=1e-3, atol=1e-3 * float(singular[0]))


def read_projector(folder) -> tuple[np.ndarray, list[str]]:
    tensors = next(folder.rglob("tensors.tsv"))
    labels = (tensors.parent / "metadata.tsv").read_text().splitlines()
    assert (tensors.parent / "sprite.png").exists()  # the thumbnails
    return np.loadtxt(tensors, ndmin=2), labels


def test_training_writes_val_heatmaps_at_each_best_pt_and_the_val_embeddings_to_the_projector(checkpoint, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bcnn import eval as eval_cli
    from bcnn import train as train_cli
    from bcnn.data import build_dataset
    from bcnn.models import input_normalisation, load_model_weights

    run_dir = tmp_path / "run"
    train_cli.main(["--config", STAGE1, f"--data-root={checkpoint['cub']}", f"--run-dir={run_dir}", "--device=cpu",
                    "--data.crop=32", "--data.resize=40", "--data.val_fraction=0.34", "--train.epochs=3",
                    "--model.pooling=avg", "--train.heatmap_images=4", "--train.log_every=0"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best_writes = sum(row["val_top1"] > max([-1.0] + [r["val_top1"] for r in rows[:i]]) for i, row in enumerate(rows))
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    assert len(events.Images("val/heatmaps")) == best_writes >= 1

    # The projector holds model.embed of every val image under the final weights (last.pt), in the val order.
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    cfg = config_from_dict(state["config"])
    model = build_model(cfg.model, 3, input_size=cfg.data.crop)
    load_model_weights(model, state["model"])
    val = build_dataset(cfg.data, "val", train_transform=False, normalisation=input_normalisation(cfg.model.backbone))
    with torch.no_grad():
        expected = model.eval().embed(torch.stack([val[index][0] for index in range(len(val))])).numpy()
    vectors, labels = read_projector(run_dir / "projector")
    assert vectors.shape == expected.shape == (len(val), 512)
    assert np.allclose(vectors, expected, rtol=1e-5, atol=1e-6)  # the file's decimal text, from float32
    assert labels == [CLASSES[val.targets[index]] for index in range(len(val))]

    eval_cli.main(["--checkpoint", str(run_dir / "last.pt"), "--split", "val", "--device", "cpu", "--no-figures",
                   "--projector"])
    vectors, labels = read_projector(run_dir / "projector_last_val")
    assert np.allclose(vectors, expected, rtol=1e-5, atol=1e-6)

    # The projectors are bcnn's own: a new run over this one (--overwrite) sets them aside with the rest, and a
    # projector write cut short (its temporary folder) is cleared away.
    shutil.copytree(run_dir / "projector", run_dir / "projector.tmp")
    train_cli.main(["--config", STAGE1, f"--data-root={checkpoint['cub']}", f"--run-dir={run_dir}", "--device=cpu",
                    "--data.crop=32", "--data.resize=40", "--data.val_fraction=0.34", "--train.epochs=1",
                    "--model.pooling=avg", "--train.log_every=0", "--overwrite"])
    assert not (run_dir / "projector.tmp").exists() and not (run_dir / "projector_last_val").exists()
    assert read_projector(run_dir / "projector")[0].shape == expected.shape

"""Heatmaps (issues 20 and 28, bcnn/explain.py): the evidence of a model whose answer is known by construction (on a
hand-made network and on every backbone family: ResNet, ConvNeXt, ViT, Swin); what the signed evidence is, against
float64 references (the score's slope as a position's features or the whole map are scaled, and the formula of the
head without normalisation); every head on a real backbone; bcnn.predict --explain on a PNG, a grayscale JPEG and a
CMYK JPEG (the files the synthetic CUB writes), a missing captum, a folder it cannot write and a name too long, each
in one sentence, never replacing a file bcnn did not write nor writing into the user's photos; the pointing game
refusing what is not a box; the confusion gallery against bcnn.predict's answers."""

import copy
import errno
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bcnn import eval as eval_cli
from bcnn import predict as predict_cli
from bcnn.checkpoint import save_checkpoint
from bcnn.config import ModelConfig, config_from_dict, config_to_dict, load_config
from bcnn.data import write_synthetic_cub
from bcnn.errors import UserError, exit_on_user_error
from bcnn.explain import box_in_view, class_heatmaps, peak_cells, pointing_game, upsample
from bcnn.models import BilinearCNN, build_model
from bcnn.models.backbones import build_backbone
from bcnn.models.pooling import BilinearPooling, Pooling
from helpers.runs import STAGE1

pytest.importorskip("captum")

U = 2.0**-24  # float32's unit roundoff


def channel_terms(model, images, classes) -> torch.Tensor:
    """captum's A_c(p) dS/dA_c(p) for each channel c and position p, (B, C, h, w): class_heatmaps sums them over c."""
    from captum.attr import LayerGradientXActivation

    return LayerGradientXActivation(model.eval(), model.backbone).attribute(images, target=classes).detach()


def rounding(terms: torch.Tensor) -> torch.Tensor:
    """(B,) float64: what float32 may get wrong in any sum of an image's terms. A float32 sum of n numbers errs by at
    most n u sum|numbers|, and each term's gradient came through sums over the C channels: C u sum|terms|."""
    return terms.shape[1] * U * terms.abs().flatten(1).sum(1).double()


def score_in_float64(model, classes):
    """The class scores as a function of the backbone's map, through copies of the model's pooling and classifier in
    float64: the reference the tests differentiate numerically (captum's float32 backward plays no part in it)."""
    pooling, classifier = copy.deepcopy(model.pooling).double(), copy.deepcopy(model.classifier).double()
    rows = torch.arange(len(classes))

    def score(feature_map: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return classifier(pooling(feature_map.double()))[rows, classes]

    return score


def scaling_slope(score, feature_map: torch.Tensor, where=(...,), step: float = 1e-4) -> torch.Tensor:
    """d/dt score(the map with map[where] scaled by t) at t = 1, by a central difference in float64: its truncation
    error is step^2 / 6 of the third derivative (about 1e-9 of the score here), its rounding about 1e-16 / step."""
    def scaled(t: float) -> torch.Tensor:
        changed = feature_map.double().clone()
        changed[where] *= t
        return score(changed)

    return (scaled(1 + step) - scaled(1 - step)) / (2 * step)


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
    model = BilinearCNN(backbone, TopLeftAverage(8), num_classes=3).eval()
    images, classes = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    maps = class_heatmaps(model, images, classes)
    assert maps.shape == (4, 8, 8)
    outside = maps.clone()
    outside[:, :4, :4] = 0
    assert torch.all(outside == 0)  # no gradient reaches the other three quadrants: exactly zero
    # The head is linear in the map, so the evidence adds up to the score less the classifier's bias (Euler's theorem,
    # degree 1), and setting one position's features to zero takes exactly its value off the score.
    score, feature_map = score_in_float64(model, classes), model.backbone(images).detach()
    bound = rounding(channel_terms(model, images, classes))
    score_less_bias = score(feature_map) - model.classifier.bias.double()[classes]
    assert torch.all((maps.flatten(1).sum(1).double() - score_less_bias).abs() <= bound)
    zeroed = feature_map.clone()
    zeroed[:, :, 1, 2] = 0
    assert torch.all((score(zeroed) - score(feature_map) + maps[:, 1, 2].double()).abs() <= bound)
    # Where the evidence for the class adds up above zero, its peak is in the quadrant.
    assert (score_less_bias > 0).any()
    assert all(row < 4 and column < 4 for (row, column), positive in zip(peak_cells(maps), score_less_bias > 0)
               if positive)


@pytest.mark.parametrize("name, cut, size", [
    ("resnet50", "layer3", 64), ("convnext_tiny", "stage3", 64), ("timm:vit_tiny_patch16_224", "auto", 64),
    ("timm:swin_tiny_patch4_window7_224", "auto", 128)], ids=["resnet", "convnext", "vit", "swin"])
def test_on_every_backbone_family_the_evidence_lies_on_its_grid_where_the_classifier_looks(name, cut, size):
    # The same quadrant classifier on the real networks: a ResNet and a ConvNeXt map, a ViT's token grid and a
    # Swin's last stage (its channels-last output brought to (B, C, H, W)), each a 4 x 4 map at these sizes.
    pytest.importorskip("timm") if name.startswith("timm:") else None
    torch.manual_seed(0)
    backbone = build_backbone(name, "none", cut, size)
    model = BilinearCNN(backbone.module, TopLeftAverage(backbone.channels), num_classes=3).eval()  # BN: running stats
    images, classes = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 0])
    maps = class_heatmaps(model, images, classes)
    assert maps.shape == (4, size // backbone.stride, size // backbone.stride) == (4, 4, 4)
    outside = maps.clone()
    outside[:, :2, :2] = 0
    assert torch.all(outside == 0)  # exactly zero outside
    # inside, the values add up to the score less its bias: the head is linear in the map
    with torch.no_grad():
        score_less_bias = (model(images) - model.classifier.bias)[torch.arange(4), classes].double()
    bound = rounding(channel_terms(model, images, classes))
    assert torch.all((maps[:, :2, :2].flatten(1).sum(1).double() - score_less_bias).abs() <= bound)


class Gram(Pooling):
    """The bilinear head without its normalisation: X Xᵀ / HW flattened, so S = sum_p x_p' W x_p / HW + b."""

    def __init__(self, channels: int):
        super().__init__()
        self.output_dim = channels * channels

    def forward(self, x, x_b=None):
        flat = x.flatten(2)  # (B, C, HW)
        return (flat @ flat.transpose(1, 2)).flatten(1) / flat.shape[2]


def test_without_normalisation_the_bilinear_evidence_is_twice_each_position_s_term_of_the_score():
    # S = sum_p x_p' W x_p / HW + b: the evidence at p is x_p . dS/dx_p = 2 x_p' W x_p / HW, twice p's term; it adds up
    # to 2 (S - b), and setting p's features to zero takes exactly the term, half the value, off the score.
    torch.manual_seed(0)
    model = BilinearCNN(nn.Conv2d(3, 4, kernel_size=8, stride=8), Gram(4), num_classes=2).eval()  # a 4 x 4 map
    nn.init.normal_(model.classifier.bias)
    images, classes = torch.randn(3, 3, 32, 32), torch.tensor([1, 0, 1])
    maps = class_heatmaps(model, images, classes).flatten(1).double().numpy()  # (B, 16)
    bound = rounding(channel_terms(model, images, classes)).numpy()[:, None]
    # The reference: the formula, in float64 NumPy, from the backbone's map and the classifier's weights.
    feature_map = model.backbone(images).detach()
    x = feature_map.double().flatten(2).numpy()  # (B, C, HW)
    weights = model.classifier.weight.detach().double().numpy().reshape(2, 4, 4)[classes.numpy()]  # (B, C, C)
    bias = model.classifier.bias.detach().double().numpy()[classes.numpy()]
    terms = np.einsum("bcp,bcd,bdp->bp", x, weights, x) / x.shape[2]  # (B, HW)
    scores = terms.sum(1) + bias
    assert np.all(np.abs(maps - 2 * terms) <= bound)
    assert np.all(np.abs(maps.sum(1) - 2 * (scores - bias)) <= bound[:, 0])
    score = score_in_float64(model, classes)
    assert np.allclose(score(feature_map).numpy(), scores, rtol=1e-12, atol=0)  # the model is the formula
    for position in (0, 5, 15):
        zeroed = feature_map.clone()
        zeroed.flatten(2)[:, :, position] = 0
        dropped = score(feature_map) - score(zeroed)
        assert np.allclose(dropped.numpy(), terms[:, position], rtol=1e-9, atol=1e-12)  # float64 both: rounding only


@pytest.mark.parametrize("sqrt_eps", [1e-12, 1e-5], ids=["tiny_eps", "default_eps"])
def test_on_a_normalised_bilinear_head_the_evidence_sums_to_zero_and_each_value_is_the_score_s_slope(sqrt_eps):
    # The head the recipe trains (Gram -> sqrt(g + eps) -> L2) on a ReLU map as VGG's: the evidence at p is the slope of
    # the score as p's features are scaled, and its sum the slope as the whole map is scaled (Euler's theorem), zero
    # for a score the L2 normalisation makes blind to the map's scale: zero up to the square root's eps.
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 16, kernel_size=4, stride=4), nn.ReLU())  # 32 px -> an 8 x 8 map
    model = BilinearCNN(backbone, BilinearPooling(16, sqrt_eps=sqrt_eps, nonnegative_maps=True), num_classes=3).eval()
    nn.init.normal_(model.classifier.bias)  # a bias, which the evidence must not count
    images, classes = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    maps = class_heatmaps(model, images, classes).double()
    bound = rounding(channel_terms(model, images, classes))
    score, feature_map = score_in_float64(model, classes), model.backbone(images).detach()
    for row in range(8):
        for column in range(8):
            slope = scaling_slope(score, feature_map, (slice(None), slice(None), row, column))
            assert torch.all((maps[:, row, column] - slope).abs() <= bound), (row, column)
    total = maps.flatten(1).sum(1)
    assert torch.all((total - scaling_slope(score, feature_map)).abs() <= bound)
    score_less_bias = score(feature_map) - model.classifier.bias.double()[classes]
    if sqrt_eps == 1e-12:  # sqrt(g + eps) is sqrt(g) to 1e-6 of the smallest entries: the sum is 0 up to rounding
        assert torch.all(total.abs() <= bound) and torch.all(score_less_bias.abs() > 1000 * bound)
    # A Gram matrix is quadratic in x_p: zeroing p takes about half its value off the score (exactly half without
    # the normalisation). The remainder is second order in p's share of the Gram matrix (here up to 12%); measured
    # median 2-3% of the value, asked for 10%.
    dropped = torch.empty_like(maps)
    for row in range(8):
        for column in range(8):
            zeroed = feature_map.clone()
            zeroed[:, :, row, column] = 0
            dropped[:, row, column] = score(feature_map) - score(zeroed)
    assert float(((dropped - maps / 2).abs() / maps.abs()).median()) < 0.1


@pytest.mark.parametrize("head", ["bilinear", "matrix_sqrt", "isqrt_cov", "compact", "avg"])
def test_every_head_s_evidence_sums_to_the_score_s_slope_as_the_map_is_scaled(head):
    # On the real VGG16 map: finite, on the backbone's grid, no gradient left in the weights, and summed over the
    # positions the score's slope as the whole map is scaled (Euler's theorem), whatever the head makes of the scale.
    model = build_model(ModelConfig(backbone_weights="none", pooling=head, isqrt_reduce_dim=16, compact_dim=512), 3,
                        input_size=64)
    model.eval()  # the reference reads map and head as the heatmap does: iSQRT-COV's BN with its running stats
    images, classes = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    maps = class_heatmaps(model, images, classes)
    assert maps.shape == (2, 4, 4) and torch.isfinite(maps).all()
    assert not any(param.grad is not None for param in model.parameters())  # the weights get no gradient
    score, feature_map = score_in_float64(model, classes), model.backbone(images).detach()
    bound = rounding(channel_terms(model, images, classes))
    assert torch.all((maps.flatten(1).sum(1).double() - scaling_slope(score, feature_map)).abs() <= bound)


def test_upsample_divides_each_map_by_its_largest_magnitude_and_keeps_zero_at_zero():
    maps = torch.tensor([[[-4.0, 0.0], [2.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    assert torch.equal(upsample(maps, (2, 2)), torch.tensor([[[-1.0, 0.0], [0.5, 0.25]], [[0.0, 0.0], [0.0, 0.0]]]))
    on_image = upsample(maps, (8, 8))  # bilinear, align_corners=False: a corner pixel is its corner cell's value
    assert on_image.shape == (2, 8, 8) and float(on_image.abs().max()) <= 1.0
    assert float(on_image[0, 0, 0]) == -1.0 and float(on_image[0, -1, 0]) == 0.5 and float(on_image[0, 0, -1]) == 0.0
    assert torch.equal(on_image[1], torch.zeros(8, 8))  # an all-zero map stays zero, not NaN


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
    model = build_model(cfg.model, 3, input_size=cfg.data.crop)
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
                                "--explain", "--explain-dir", str(folder), "--topk", "3"])
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
                      "--explain", "--explain-dir", str(folder), "--explain-class", "Synthetic Class 3"])
    assert "Synthetic Class 3" in capsys.readouterr().out


def test_predict_explain_is_a_flag_that_never_writes_into_the_user_s_photos_and_cuts_long_names(
        checkpoint, tmp_path, monkeypatch):
    # `predict --explain photos/ bird.png`: photos/ is an input like bird.png, and the PNGs go to explanations/.
    photos = tmp_path / "photos"
    shutil.copytree(checkpoint["photos"], photos)
    # Two names too long for a PNG name beside them (255 bytes on ext4), alike for their first 242 bytes; one of
    # two-byte characters, which must not be cut in half.
    long_names = ["é" * 121 + "_a.png", "é" * 121 + "_b.png"]
    for name in long_names:
        shutil.copy(checkpoint["photos"] / "colour.png", tmp_path / name)
    before = sorted(path.name for path in photos.iterdir())
    monkeypatch.chdir(tmp_path)
    results = predict_cli.main(["--explain", "photos", *long_names, "--checkpoint", checkpoint["checkpoint"],
                                "--device", "cpu", "--json"])
    assert sorted(path.name for path in photos.iterdir()) == before  # nothing written into the user's folder
    assert [Path(result["image"]).name for result in results] == ["cmyk.jpg", "colour.png", "gray.jpg", *long_names]
    written = [Path(result["explanation"]) for result in results]
    assert all(path.parent == Path("explanations") and path.is_file() for path in written)
    assert [path.name for path in written[:3]] == ["cmyk_best_explain.png", "colour_best_explain.png",
                                                   "gray_best_explain.png"]
    limit = os.pathconf("explanations", "PC_NAME_MAX")
    for image, path in zip(long_names, written[3:]):
        stem = f"{Path(image).stem}_best_explain"
        tail = f"~{hashlib.sha1(stem.encode()).hexdigest()[:8]}.png"  # the whole name's hash: the same every run
        assert path.name.endswith(tail) and stem.startswith(path.name.removesuffix(tail))
        assert limit - 2 < len(path.name.encode()) <= limit  # cut at a whole character, as little as needed
    assert written[3] != written[4]


def test_predict_explain_refuses_what_it_cannot_do_in_one_sentence(checkpoint, tmp_path, monkeypatch, capsys):
    image = str(checkpoint["photos"] / "colour.png")
    command = [image, "--checkpoint", checkpoint["checkpoint"], "--device", "cpu"]
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "colour_best_explain.png").write_bytes(b"the user's own file")
    with pytest.raises(UserError, match="exists and is not a heatmap bcnn wrote, so bcnn.predict will not replace"):
        predict_cli.main([*command, "--explain", "--explain-dir", str(folder)])
    assert (folder / "colour_best_explain.png").read_bytes() == b"the user's own file"
    with pytest.raises(UserError, match="--explain-class 'Albatross' is not one of the checkpoint's 3 classes"):
        predict_cli.main([*command, "--explain", "--explain-dir", str(tmp_path / "x"), "--explain-class", "Albatross"])
    for option in (["--explain-class", "Synthetic Class 3"], ["--explain-dir", str(tmp_path / "z")]):
        with pytest.raises(UserError, match=f"{option[0]} goes with --explain, which is not given; add --explain"):
            predict_cli.main([*command, *option])
    under_a_file = str(checkpoint["photos"] / "colour.png" / "heatmaps")
    with pytest.raises(UserError, match=r"colour.png is a file, so no folder can be made there; pass --explain-dir"):
        predict_cli.main([*command, "--explain", "--explain-dir", under_a_file])
    # A folder, or a disk, that cannot be written: found before the model runs, or when the PNG is written.
    if os.geteuid() != 0:  # root writes into a read-only folder all the same
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(UserError, match=r"cannot write the heatmaps into .*locked \(permission denied\); pass"):
            predict_cli.main([*command, "--explain", "--explain-dir", str(locked)])
    real_file = predict_cli.tempfile.TemporaryFile

    def read_only_disk(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(predict_cli.tempfile, "TemporaryFile", read_only_disk)
    with pytest.raises(UserError, match=r"cannot write the heatmaps into .*ro \(read-only file system\); pass "
                                        "--explain-dir a folder you can write to"):
        predict_cli.main([*command, "--explain", "--explain-dir", str(tmp_path / "ro")])
    monkeypatch.setattr(predict_cli.tempfile, "TemporaryFile", real_file)
    monkeypatch.setattr(predict_cli, "save_figure", lambda figure, path: read_only_disk())  # full between the two
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(predict_cli.main)([*command, "--explain", "--explain-dir", str(tmp_path / "ro")])
    stderr = capsys.readouterr().err
    assert stop.value.code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert stderr.startswith(f"error: cannot write the heatmap {tmp_path / 'ro' / 'colour_best_explain.png'} "
                             "(read-only file system); pass --explain-dir a folder you can write to.")
    monkeypatch.setitem(sys.modules, "captum.attr", None)  # as if captum were not installed
    with pytest.raises(UserError, match=r"heatmaps need captum, an optional extra: pip install captum"):
        predict_cli.main([*command, "--explain", "--explain-dir", str(tmp_path / "y")])


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


@pytest.mark.parametrize("box, problem", [
    ((10, 10, -20, 30), r"\(x, y, w, h\) = \(10, 10, -20, 30\), has a width of -20, so it covers nothing"),
    ((10, 10, 0, 0), r"has a width of 0 and a height of 0, so it covers nothing"),
    ((float("nan"), 10, 20, 30), r"\(nan, 10, 20, 30\), is not finite"),
    ((10, 10, float("inf"), 30), r"is not finite"),
    ((600, 10, 20, 30), r"lies wholly outside the 500 x 375 image"),
    ((-50, -50, 40, 40), r"lies wholly outside the 500 x 375 image"),
    (("10", "10", "x", "30"), r"is not four numbers"), ((10, 10, 20), r"is not four numbers")])
def test_the_pointing_game_refuses_what_is_not_a_box_naming_the_image(box, problem):
    with pytest.raises(UserError, match=f"^the bounding box of images/gull.jpg, .*{problem}"):
        box_in_view(box, (500, 375), resize=56, crop=48, image="images/gull.jpg")
    # pointing_game checks the boxes it is given on its own, before any model runs: (x0, y0, x1, y1) in the view
    for bad in [(10, 10, 5, 30), (10, 10, 10, 30), (0, 0, 49, 48), (-1, 0, 20, 20), (float("nan"), 0, 9, 9), (1, 2)]:
        with pytest.raises(UserError, match=r"^the bounding box of b.jpg in the model's view, .* so the pointing "
                                            r"game cannot score it; correct it in the dataset's box annotations"):
            pointing_game(None, [], [(0, 0, 48, 48), bad], 48, "cpu", images=["a.jpg", "b.jpg"])


def test_a_real_box_the_centre_crop_cuts_off_is_not_scored_but_counted():
    """An object at the edge of a wide photo, wholly outside the centre crop: a box, but not one the model sees."""
    assert box_in_view((0, 0, 40, 300), (500, 375), resize=56, crop=48, image="images/gull.jpg") is None
    game = pointing_game(None, [], [], 48, "cpu")
    assert game == {"hits": 0, "images": 0, "outside_view": 0, "box_share": 0.0}


def corrupt_box(cub: Path, image_name: str, box: str) -> str:
    """Replace the box of the image named image_name in cub/bounding_boxes.txt; returns the image's path."""
    ids = {Path(path).name: (image_id, path) for image_id, path in
           (line.split() for line in (cub / "images.txt").read_text().splitlines() if line.strip())}
    image_id, relative = ids[image_name]
    lines = [f"{image_id} {box}" if line.split()[0] == image_id else line
             for line in (cub / "bounding_boxes.txt").read_text().splitlines() if line.strip()]
    (cub / "bounding_boxes.txt").write_text("\n".join(lines) + "\n")
    return str(cub / "images" / relative)


def evaluate_with_box(checkpoint, tmp_path, box: str):
    """bcnn.eval --pointing-game as its CLI runs, on a copy of the generated CUB whose first Synthetic Class 2 test
    image has the given box line; returns (the image's path, the JSON written or None)."""
    cub = tmp_path / "cub"
    shutil.copytree(checkpoint["cub"], cub)
    path = corrupt_box(cub, Path(eval_split_images(checkpoint)["Synthetic Class 2"][0]).name, box)
    output = tmp_path / "eval.json"
    exit_on_user_error(eval_cli.main)(["--checkpoint", checkpoint["checkpoint"], "--split", "test", "--device", "cpu",
                                       "--pointing-game", "--no-figures", f"--data-root={cub}", f"--output={output}"])
    return path, json.loads(output.read_text()) if output.exists() else None


def test_eval_pointing_game_refuses_a_bad_box_in_one_sentence(checkpoint, tmp_path, capsys):
    # A box in the generated CUB's file that is not one: bcnn.eval --pointing-game stops in one sentence naming the
    # image and the box (or the CUB reader does first, naming bounding_boxes.txt), and writes nothing; never a score
    # against a clipped box ("the boxes cover nan%").
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        evaluate_with_box(checkpoint, tmp_path, "10 10 -20 30")
    captured = capsys.readouterr()
    assert stop.value.code == 2 and "Traceback" not in captured.err and captured.err.count("\n") == 1
    assert "nan" not in captured.out + captured.err and not (tmp_path / "eval.json").exists()
    assert "has a width of -20, so it covers nothing" in captured.err or \
        str(tmp_path / "cub" / "bounding_boxes.txt") in captured.err


def test_eval_pointing_game_counts_a_box_the_centre_crop_cuts_off_without_scoring_it(checkpoint, tmp_path, capsys):
    # A real box in the corner of a 96-px image, which the 32-px centre crop cuts off whole: not scored, counted,
    # and said; the other images are scored as before.
    _, result = evaluate_with_box(checkpoint, tmp_path, "0 0 4 4")
    game = result["pointing_game"]
    assert game["outside_view"] == 1 and game["images"] == result["count"] - 1 and 0 <= game["hits"] <= game["images"]
    out = capsys.readouterr().out
    assert "1 image(s) not scored: the centre crop cuts their object's box off whole" in out and "nan" not in out


def test_eval_s_confusion_gallery_shows_exactly_the_pair_s_misclassified_images(checkpoint, tmp_path, capsys):
    output = tmp_path / "eval_best_test.json"
    result = eval_cli.main(["--checkpoint", checkpoint["checkpoint"], "--split", "test", "--device", "cpu",
                            f"--output={output}"])
    gallery = result["confusion_gallery"]
    assert gallery and [(entry["true"], entry["predicted"]) for entry in gallery] == \
        [(pair["true"], pair["predicted"]) for pair in result["most_confused"][:len(gallery)]]
    png = tmp_path / "eval_best_test_confused_gallery.png"
    assert Image.open(png).info.get("Software") == "bcnn"
    # The reference: bcnn.predict's probabilities of every class for every test image, listed from the CUB files.
    capsys.readouterr()
    split = eval_split_images(checkpoint)
    answers = {item["image"]: item["predictions"] for item in predict_cli.main(
        [*(path for paths in split.values() for path in paths), "--checkpoint", checkpoint["checkpoint"], "--json",
         "--device", "cpu", "--topk", "3"])}
    predicted = {path: predictions[0]["class"] for path, predictions in answers.items()}
    probability = {(path, row["class"]): row["probability"] for path, rows in answers.items() for row in rows}
    for entry in gallery:
        true, wrong = entry["true"], entry["predicted"]
        confused = [path for path in split[true] if predicted[path] == wrong]
        correct = [path for path in split[wrong] if predicted[path] == wrong]
        assert entry["count"] == len(confused)
        assert [item["image"] for item in entry["confused"]] == confused[:4]
        assert [item["image"] for item in entry["correct"]] == correct[:4]
        # each confused image with its probability of the class it was taken for and of its own (float32 logits of
        # one image in batches of other sizes: the kernels may add in another order, a few ulps apart)
        for item in entry["confused"]:
            assert item["probability"] == pytest.approx(probability[item["image"], wrong], rel=1e-5)
            assert item["probability_true"] == pytest.approx(probability[item["image"], true], rel=1e-5)


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

"""Multi-crop and multi-scale test-time augmentation (`python -m bcnn.eval --tta five_crop|ten_crop|multiscale`,
bcnn/tta.py): the views against crops cut here with PIL, and evaluate() and the command against the mean of the
views' logits computed here, one image at a time.

The model is an untrained demo model at 32 px on a 3-class mini-CUB (images resized to 40 px, so the corner crops
differ from the centre one and the multiscale resizes are 40, 46 and 52 px).
"""

import json
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bcnn import eval as eval_cli
from bcnn.checkpoint import save_checkpoint
from bcnn.config import config_to_dict, load_config
from bcnn.data import IMAGENET_MEAN, IMAGENET_STD, build_dataset
from bcnn.distributed import Context
from bcnn.engine import evaluate
from bcnn.models import build_model
from bcnn.run_dir import written_by_eval
from bcnn.tta import MULTISCALE_FACTORS, TTA_CHOICES, view_transform
from helpers.numerics import FORWARD_RTOL, relative_error
from helpers.runs import STAGE1

RESIZE, CROP, CLASSES = 40, 32, 3
MULTI_VIEW = ("five_crop", "ten_crop", "multiscale")


def resized(image: Image.Image, shorter: int) -> Image.Image:
    """The shorter side to `shorter` px, the longer in proportion (rounded down), bilinear, as Resize(int) does."""
    width, height = image.size
    if width <= height:
        return image.resize((shorter, int(shorter * height / width)), Image.BILINEAR)
    return image.resize((int(shorter * width / height), shorter), Image.BILINEAR)


def five_crops(image: Image.Image, crop: int) -> list[Image.Image]:
    """Top-left, top-right, bottom-left, bottom-right and centre squares of side `crop`."""
    width, height = image.size
    left, top = round((width - crop) / 2), round((height - crop) / 2)
    corners = [(0, 0), (width - crop, 0), (0, height - crop), (width - crop, height - crop), (left, top)]
    return [image.crop((x, y, x + crop, y + crop)) for x, y in corners]


def views_by_hand(image: Image.Image, tta: str) -> list[Image.Image]:
    if tta == "five_crop":
        return five_crops(resized(image, RESIZE), CROP)
    if tta == "ten_crop":
        mirror = resized(image, RESIZE).transpose(Image.FLIP_LEFT_RIGHT)
        return five_crops(resized(image, RESIZE), CROP) + five_crops(mirror, CROP)
    return [five_crops(resized(image, round(RESIZE * factor)), CROP)[-1] for factor in MULTISCALE_FACTORS]


def normalised(view: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(view, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return (pixels - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def reference(model, dataset, tta: str) -> dict:
    """Each test image's views cut here, classified as one batch, their logits averaged: the loss and the
    [true, predicted] counts evaluate() must give, and each image's margin between its top two classes."""
    logits, labels = [], []
    with torch.no_grad():
        for path, label in dataset.samples:
            with Image.open(path) as image:
                views = torch.stack([normalised(view) for view in views_by_hand(image.convert("RGB"), tta)])
            logits.append(model(views).mean(dim=0))
            labels.append(label)
    logits, labels = torch.stack(logits), torch.tensor(labels)
    counts = torch.zeros(CLASSES, CLASSES, dtype=torch.long)
    for label, guess in zip(labels.tolist(), logits.argmax(1).tolist()):
        counts[label, guess] += 1
    top2 = logits.topk(2, dim=1).values
    return {"loss": F.cross_entropy(logits, labels).item(), "confusion": counts,
            "margin": (top2[:, 0] - top2[:, 1]).min().item(), "scale": logits.abs().max().item()}


@pytest.fixture(scope="module")
def trained(cub_3x13, tmp_path_factory):
    """An untrained model saved as a checkpoint the command can read, and its config."""
    cfg = load_config(STAGE1, [f"--data.crop={CROP}", f"--data.resize={RESIZE}", f"--data.root={cub_3x13}"])
    torch.manual_seed(3)
    model = build_model(cfg.model, CLASSES, input_size=CROP).eval()
    checkpoint = tmp_path_factory.mktemp("tta") / "run" / "best.pt"
    save_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg),
                     "classes": build_dataset(cfg.data, "test").classes, "epoch": 1, "metrics": {}}, checkpoint)
    return types.SimpleNamespace(model=model, cfg=cfg, checkpoint=checkpoint)


@pytest.fixture(scope="module")
def references(trained) -> dict:
    dataset = build_dataset(trained.cfg.data, "test", train_transform=False)
    expected = {tta: reference(trained.model, dataset, tta) for tta in MULTI_VIEW}
    for tta, result in expected.items():  # else rounding could flip an argmax and the counts could not be compared
        assert result["margin"] > 100 * FORWARD_RTOL * result["scale"], tta
    return expected


@pytest.mark.parametrize("tta", MULTI_VIEW)
def test_views_are_the_crops_cut_by_hand(trained, tta):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))  # 70 x 50
    stacked = view_transform(trained.cfg.data, tta, (IMAGENET_MEAN, IMAGENET_STD))(image)
    by_hand = torch.stack([normalised(view) for view in views_by_hand(image, tta)])
    assert stacked.shape == (len(by_hand), 3, CROP, CROP)
    torch.testing.assert_close(stacked, by_hand, rtol=0, atol=1e-6)  # the same float32 steps: equal up to rounding


@pytest.mark.parametrize("tta", MULTI_VIEW)
def test_evaluate_averages_the_logits_of_each_images_views(trained, references, tta):
    dataset = build_dataset(trained.cfg.data, "test", train_transform=False)
    args = types.SimpleNamespace(tta=tta, num_workers=1)  # the loader bcnn.eval builds, with a worker
    loader = eval_cli.multi_view_loader(trained.cfg.data, dataset, 16, args, Context(0, 0, 1, torch.device("cpu")))
    images, _ = next(iter(loader))
    assert images.shape[0] == max(1, 16 // images.shape[1]) and images.shape[2:] == (3, CROP, CROP)
    result = evaluate(trained.model, loader, "cpu", CLASSES, tta=tta, confusion=True)
    expected = references[tta]
    assert result["count"] == len(dataset)
    assert torch.equal(result["confusion"], expected["confusion"])
    assert result["top1"] == pytest.approx(100 * expected["confusion"].diagonal().sum().item() / len(dataset))
    assert relative_error(torch.tensor(result["loss"]), torch.tensor(expected["loss"])) < FORWARD_RTOL


def test_the_command_evaluates_ten_crops_and_names_its_files_after_them(trained, references):
    argv = ["--checkpoint", str(trained.checkpoint), "--device=cpu", "--tta=ten_crop", "--num-workers=1",
            "--batch-size=20", "--no-figures"]
    result = eval_cli.main(argv)
    expected = references["ten_crop"]
    correct, count = expected["confusion"].diagonal().sum().item(), expected["confusion"].sum().item()
    written = json.loads((trained.checkpoint.parent / "eval_best_test_ten_crop.json").read_text())
    assert written["tta"] == "ten_crop" and written["count"] == count == result["count"]
    assert written["top1"] == pytest.approx(100 * correct / count)
    assert relative_error(torch.tensor(written["loss"]), torch.tensor(expected["loss"])) < FORWARD_RTOL
    for name in ("eval_best_test_ten_crop.json", "eval_best_test_ten_crop_per_class.csv"):
        assert written_by_eval(trained.checkpoint.parent / name), name  # so the next evaluation may replace it


def test_output_names_carry_the_tta_choice(tmp_path):
    names = {tta: eval_cli.output_paths(eval_cli.parse_args(["--checkpoint", str(tmp_path / "best.pt"),
                                                              f"--tta={tta}"]))["json"].name
             for tta in TTA_CHOICES}
    assert names == {"none": "eval_best_test.json", "flip": "eval_best_test_flip.json",
                     "five_crop": "eval_best_test_five_crop.json", "ten_crop": "eval_best_test_ten_crop.json",
                     "multiscale": "eval_best_test_multiscale.json"}


def test_a_loader_without_views_is_refused_for_a_multi_view_choice(trained):
    batch = [(torch.zeros(2, 3, CROP, CROP), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(ValueError, match="multi-view"):
        evaluate(trained.model, batch, "cpu", CLASSES, tta="five_crop")

"""bcnn.eval --knn and --retrieval: the numbers bcnn.protocols gives (tested there against NumPy) on the right
vectors: model.embed of the evaluated split, and for k-NN of the training images (trainval for test, train for
val), read through the eval transform with loader workers on; refused in one sentence where they cannot work."""

import json

import pytest
import torch

from bcnn import eval as eval_cli
from bcnn.checkpoint import save_checkpoint
from bcnn.config import config_to_dict, load_config
from bcnn.data import build_dataset, write_synthetic_cub
from bcnn.errors import UserError
from bcnn.models import build_model
from bcnn.protocols import knn_accuracy, retrieval_metrics
from helpers.runs import STAGE1, run_in_process

CLASSES = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained model's checkpoint on a 3 x 8 mini-CUB (random weights: the protocols need no training)."""
    root = tmp_path_factory.mktemp("protocols")
    cub = write_synthetic_cub(root / "cub", classes=CLASSES, per_class=8, seed=1)
    cfg = load_config(STAGE1, ["--data.crop=32", "--data.resize=40", f"--data.root={cub}", "--data.num_workers=1",
                               "--data.val_fraction=0.25"])
    torch.manual_seed(5)
    model = build_model(cfg.model, CLASSES, input_size=cfg.data.crop)
    path = root / "run" / "best.pt"
    save_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg),
                     "classes": build_dataset(cfg.data, "test").classes, "epoch": 1, "metrics": {}}, path)
    return path, cfg, model.eval()


def embed(model, cfg, split):
    """The split's model.embed vectors and labels, the dataset read here image by image, without a loader."""
    dataset = build_dataset(cfg.data, split, train_transform=False)
    with torch.no_grad():
        vectors = torch.cat([model.embed(dataset[index][0][None]) for index in range(len(dataset))])
    return vectors, torch.tensor(dataset.targets)


# the val split holds one image a class here: nothing to retrieve, so k-NN alone
@pytest.mark.parametrize("split, gallery, retrieval", [("test", "trainval", True), ("val", "train", False)])
def test_knn_and_retrieval_score_the_split_against_its_training_images(checkpoint, tmp_path, split, gallery,
                                                                         retrieval):
    path, cfg, model = checkpoint
    output = tmp_path / "e.json"
    result = run_in_process(eval_cli.main, "--checkpoint", path, "--split", split, "--knn",
                            *(["--retrieval"] if retrieval else []), "--device=cpu", "--no-figures",
                            f"--output={output}")
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads(output.read_text())
    queries, query_labels = embed(model, cfg, split)
    references, reference_labels = embed(model, cfg, gallery)
    expected_knn = knn_accuracy(queries, query_labels, references, reference_labels)
    assert written["knn"]["gallery_split"] == gallery and written["knn"]["gallery"] == len(references)
    # the same vectors up to a forward pass's rounding (batched through a loader here, one by one above): the
    # scores agree unless a neighbour's order flips on a near tie, which these random vectors do not have
    for k in (10, 20, 100, 200):
        assert written["knn"]["top1"][str(k)] == pytest.approx(expected_knn["top1"][k])
    assert f"k-NN top-1 against the {gallery} images ({len(references)})" in result.stdout
    assert written["cost"]["vector_size"] == model.pooling.output_dim and written["cost"]["gflops"] > 0
    if not retrieval:
        assert "retrieval" not in written
        return
    expected_retrieval = retrieval_metrics(queries, query_labels)
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "precision@1", "r_precision", "map@r"):
        assert written["retrieval"][key] == pytest.approx(expected_retrieval[key]), key
    assert "retrieval within the split" in result.stdout and "MAP@R" in result.stdout


def test_knn_on_training_images_is_refused_in_one_sentence(checkpoint):
    path, _, _ = checkpoint
    with pytest.raises(UserError, match=r"^--knn compares the evaluated images with the training images, and "
                                        r"--split trainval is training images itself; use --split test"):
        eval_cli.main(["--checkpoint", str(path), "--split", "trainval", "--knn", "--device=cpu"])

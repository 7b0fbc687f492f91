"""data.class_split=retrieval (metric learning's class-disjoint protocol) and bcnn.eval --config (a backbone's
frozen features scored without training): the halves read from the dataset's own files, a run trained on the first
half and scored by retrieval on the second through the commands, loader workers on, and the refusals where a
classifier would be scored on classes it never saw."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bcnn import eval as eval_cli
from bcnn import report as report_cli
from bcnn import train as train_cli
from bcnn.config import load_config
from bcnn.data import build_dataset, write_synthetic_cars, write_synthetic_cub
from bcnn.errors import UserError
from bcnn.models import build_model
from bcnn.protocols import knn_accuracy, retrieval_metrics
from helpers.runs import STAGE1, run_in_process

CLASSES = 5  # odd: the extra class goes to the test half (2 trained on, 3 tested)
SMALL = ["--data.crop=32", "--data.resize=40", "--data.num_workers=2"]


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    return write_synthetic_cub(tmp_path_factory.mktemp("class_split") / "cub", classes=CLASSES, per_class=6, seed=3)


def cub_files(root):
    """Every image of a CUB folder with its class id (1-based) and box, read from the text files directly."""
    paths = dict(line.split() for line in (root / "images.txt").read_text().splitlines())
    labels = dict(line.split() for line in (root / "image_class_labels.txt").read_text().splitlines())
    boxes = {image: tuple(map(float, rest)) for image, *rest in
             (line.split() for line in (root / "bounding_boxes.txt").read_text().splitlines())}
    return {str(root / "images" / paths[image]): (int(labels[image]), boxes[image]) for image in paths}


def test_the_first_half_of_the_classes_is_trained_on_and_the_second_half_is_the_test_split(cub):
    cfg = load_config(STAGE1, [f"--data.root={cub}", "--data.class_split=retrieval", "--data.val_fraction=0.34",
                               "--data.crop_to_bbox=true"])
    files = cub_files(cub)
    splits = {split: build_dataset(cfg.data, split, train_transform=False) for split in
              ("train", "val", "trainval", "test")}
    folders = (cub / "classes.txt").read_text().split()[1::2]  # "1 001.Synthetic_Class_1", in class id order
    names = [folder.split(".", 1)[1].replace("_", " ") for folder in folders]
    # classes 1-2 from the official train and test splits alike; classes 3-5, relabelled 0-2, are the test split
    expected = {"trainval": {path for path, (label, _) in files.items() if label <= 2},
                "test": {path for path, (label, _) in files.items() if label > 2}}
    for split, first, last in (("trainval", 1, 2), ("test", 3, 5)):  # class ids, 1-based
        dataset = splits[split]
        assert {path for path, _ in dataset.samples} == expected[split]
        assert all(label == files[path][0] - first for path, label in dataset.samples)
        assert all(box == files[path][1] for (path, _), box in zip(dataset.samples, dataset.bboxes))
        assert dataset.classes == names[first - 1:last]
    train, val = ({path for path, _ in splits[split].samples} for split in ("train", "val"))
    assert train | val == expected["trainval"] and not train & val
    assert {label for _, label in splits["val"].samples} == {0, 1}  # stratified: every trained class held out
    assert splits["test"][0][0].shape == (3, cfg.data.crop, cfg.data.crop)  # images load through the reader, cropped to their boxes


def test_stanford_cars_is_halved_in_its_own_class_order(tmp_path):
    cars = write_synthetic_cars(tmp_path, classes=4, per_class=4, seed=0)
    cfg = load_config(STAGE1, [f"--data.root={cars}", "--data.format=cars", "--data.class_split=retrieval"])
    trained, tested = (build_dataset(cfg.data, split, train_transform=False) for split in ("trainval", "test"))
    assert trained.classes == ["Synthetic Car 1 2012", "Synthetic Car 2 2012"]
    assert tested.classes == ["Synthetic Car 3 2012", "Synthetic Car 4 2012"]
    assert len(trained) == len(tested) == 8  # every image of its classes, official train and test


@pytest.fixture(scope="module")
def class_disjoint_run(cub, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("retrieval_run") / "run"
    train_cli.main(["--config", STAGE1, f"--data-root={cub}", f"--run-dir={run_dir}", "--device=cpu", *SMALL,
                    "--data.class_split=retrieval", "--data.val_fraction=0.34", "--train.epochs=1",
                    "--train.batch_size=4", "--train.log_every=0", "--train.precision=fp32",
                    "--train.heatmap_images=0", "--train.projector=false"])
    return run_dir / "best.pt"


def embed(model, cfg, split):
    """model.embed of the split's images, read here one by one (no loader)."""
    dataset = build_dataset(cfg.data, split, train_transform=False)
    with torch.no_grad():
        vectors = torch.cat([model.eval().embed(dataset[index][0][None]) for index in range(len(dataset))])
    return vectors, torch.tensor(dataset.targets)


def test_a_class_disjoint_run_is_scored_by_retrieval_on_the_classes_it_never_saw(class_disjoint_run, tmp_path):
    state = torch.load(class_disjoint_run, map_location="cpu", weights_only=True)
    assert state["classes"] == ["Synthetic Class 1", "Synthetic Class 2"]  # its classifier: the trained half only
    output = tmp_path / "test.json"
    result = run_in_process(eval_cli.main, "--checkpoint", class_disjoint_run, "--split", "test", "--retrieval",
                            "--device=cpu", f"--output={output}")
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads(output.read_text())
    cfg = load_config(STAGE1, [f"--data.root={state['config']['data']['root']}", *SMALL,
                               "--data.class_split=retrieval"])
    model = build_model(cfg.model, 2, input_size=32)
    model.load_state_dict(state["model"])
    vectors, labels = embed(model, cfg, "test")
    expected = retrieval_metrics(vectors, labels)
    assert written["count"] == len(labels) == 18 and "top1" not in written and written["class_split"] == "retrieval"
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "precision@1", "r_precision", "map@r"):
        assert written["retrieval"][key] == pytest.approx(expected[key]), key
    assert "embeddings only" in result.stdout and "retrieval within the split" in result.stdout
    # run again, into the run directory: the JSON it wrote is its own, replaced; bcnn.report carries its scores
    for _ in range(2):
        assert run_in_process(eval_cli.main, "--checkpoint", class_disjoint_run, "--split", "test", "--retrieval",
                              "--device=cpu").returncode == 0
    events = EventAccumulator(str(class_disjoint_run.parent)).Reload()  # beside the run's val curves, at its step
    for scalar in events.Scalars("eval_best_test/map@r"):  # one per evaluation above, all of the same checkpoint
        assert scalar.value == pytest.approx(written["retrieval"]["map@r"])
        assert scalar.step == state["metrics"]["global_step"]
    reported = report_cli.main([str(class_disjoint_run.parent), "--json"])
    assert reported["summary"]["map@r"]["mean"] == pytest.approx(expected["map@r"])
    assert reported["runs"][0]["views"][""] is None and reported["runs"][0]["images"] == 18  # no top-1 to report
    # val holds images of the trained classes: scored as any run's
    evaluated = eval_cli.main(["--checkpoint", str(class_disjoint_run), "--split", "val", "--device=cpu",
                               "--no-figures", f"--output={tmp_path / 'val.json'}"])
    assert evaluated["count"] == 4 and 0 <= evaluated["top1"] <= 100
    top1 = EventAccumulator(str(class_disjoint_run.parent)).Reload().Scalars("eval_best_val/top1")
    assert [scalar.value for scalar in top1] == [pytest.approx(evaluated["top1"])]


@pytest.mark.parametrize("flags, message", [
    ([], "the test split of a run trained with data.class_split=retrieval, whose classes the classifier never saw "
         "has no top-1 to score; pass --retrieval"),
    (["--retrieval", "--knn"], "--knn on the test split of data.class_split=retrieval would compare test images with "
                               "training images of other classes; drop --knn"),
    (["--retrieval", "--tta", "flip"], "--tta reads the classifier"),
])
def test_scoring_a_classifier_on_classes_it_never_saw_is_refused(class_disjoint_run, tmp_path, flags, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        eval_cli.main(["--checkpoint", str(class_disjoint_run), "--split", "test", "--device=cpu",
                       f"--output={tmp_path / 'e.json'}", *flags])
    assert not (tmp_path / "e.json").exists()


def test_a_backbone_s_frozen_features_are_scored_without_training(cub, tmp_path):
    # The backbone's weights from a file (as pretrained ones would come), so that the reference below has them too.
    overrides = [f"--data.root={cub}", *SMALL, "--data.val_fraction=0.34"]
    cfg = load_config(STAGE1, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, CLASSES, input_size=32)
    weights = tmp_path / "backbone.pt"
    torch.save(model.backbone.state_dict(), weights)
    output = tmp_path / "frozen.json"
    result = run_in_process(eval_cli.main, "--config", STAGE1, *overrides, f"--model.backbone_weights={weights}",
                            "--split", "test", "--knn", "--retrieval", "--device=cpu", f"--output={output}")
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads(output.read_text())
    queries, query_labels = embed(model, cfg, "test")
    gallery, gallery_labels = embed(model, cfg, "trainval")
    expected_knn, expected_retrieval = (knn_accuracy(queries, query_labels, gallery, gallery_labels),
                                        retrieval_metrics(queries, query_labels))
    for k in (10, 20):
        assert written["knn"]["top1"][str(k)] == pytest.approx(expected_knn["top1"][k])
    assert written["retrieval"]["map@r"] == pytest.approx(expected_retrieval["map@r"])
    assert written["checkpoint"] is None and written["backbone_weights"] == str(weights)
    assert written["cost"]["vector_size"] == model.pooling.output_dim


def test_a_model_without_training_has_no_top_1_and_config_keys_need_config(cub, tmp_path):
    with pytest.raises(UserError, match=r"^--config scores a model before any training, whose classifier has learnt "
                                        r"nothing; pass --knn and/or --retrieval"):
        eval_cli.main(["--config", STAGE1, f"--data.root={cub}", "--split", "test", "--device=cpu",
                       f"--output={tmp_path / 'e.json'}"])
    result = run_in_process(eval_cli.main, "--checkpoint", tmp_path / "best.pt", "--model.pooling=avg", "--knn")
    assert result.returncode == 2 and "config keys as --section.key=value go with --config only" in result.stderr

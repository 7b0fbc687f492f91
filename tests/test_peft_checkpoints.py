"""A model.adapt run's checkpoints (bcnn/models/frozen_weights.py) hold the tensors that trained and the head's, not
the frozen backbone, which its weights file rebuilds: best.pt evaluates (in a fresh process too) to the val numbers
the run logged for that epoch, with k-NN and the projector; predict explains from it; other frozen weights are refused in
one sentence; a Ctrl-C run resumes from such a last.pt bit for bit; BitFit's and VPT-deep's checkpoints evaluate,
predict and explain too."""

import json
import sys

import pytest
import torch

from bcnn import eval as eval_cli
from bcnn import predict as predict_cli
from bcnn import train as train_cli
from bcnn.errors import Interrupted, UserError
from bcnn.models.frozen_weights import ENTRY
from bcnn.models.trained import from_checkpoint
from helpers.runs import STAGE1, interrupt_after_first_last_pt, launch, load, rows_without_timing

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


def vit_weights_file(folder):
    """A timm ViT-Ti state dict, as a user's pretrained file would be (random numbers: no download)."""
    torch.manual_seed(1)
    path = folder / "vit_tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224").state_dict(), path)
    return path


def lora_run(data, run_dir, weights, *extra):
    return ["--config", STAGE1, f"--data.root={data}", f"--run-dir={run_dir}", "--device=cpu",
            "--model.backbone=timm:vit_tiny_patch16_224", f"--model.backbone_weights={weights}", "--model.pooling=avg",
            "--data.crop=32", "--data.resize=36", "--optim.backbone_lr=0.01", "--optim.lr=0.01", "--model.adapt=lora",
            "--model.lora_rank=4", "--data.val_fraction=0.34", "--train.batch_size=4", "--train.log_every=0",
            "--train.precision=fp32", "--train.heatmap_images=0", "--train.projector=false", *extra]


def test_a_lora_checkpoint_holds_what_trained_and_evaluates_predicts_explains(peft, cub_3x6, tmp_path):
    weights = vit_weights_file(tmp_path)
    run_dir = tmp_path / "run"
    train_cli.main(lora_run(cub_3x6, run_dir, weights, "--data.num_workers=2", "--train.epochs=1"))
    best, last = load(run_dir / "best.pt"), load(run_dir / "last.pt")
    whole = timm.create_model("vit_tiny_patch16_224").state_dict()
    for state in (best, last):
        backbone = [key for key in state["model"] if key.startswith("backbone.")]
        assert backbone and all(".lora_A." in key or ".lora_B." in key for key in backbone)  # no frozen tensor
        assert state[ENTRY]["weights"] == str(weights) and len(state[ENTRY]["sha256"]) == 64
    kept = sum(value.numel() for value in best["model"].values())
    assert kept < sum(value.numel() for value in whole.values()) / 20  # 0.1M of ViT-Ti's 5.7M

    # The backbone rebuilt from the file: best.pt's val numbers are the ones the run logged (in a fresh process:
    # BitFit's, below, where no peft import costs seconds).
    row = next(row for row in rows_without_timing(run_dir) if row["epoch"] == best["epoch"])
    evaluated = eval_cli.main(["--checkpoint", str(run_dir / "best.pt"), "--split", "val", "--device", "cpu", "--knn",
                               "--projector", "--no-figures", f"--output={tmp_path / 'val.json'}"])
    assert evaluated["top1"] == row["val_top1"] and evaluated["count"] == 3
    assert "knn" in evaluated and (run_dir / "projector_best_val").is_dir()

    image = sorted((cub_3x6 / "images").rglob("*.jpg"))[0]
    pytest.importorskip("captum")
    (predicted,) = predict_cli.main([str(image), "--checkpoint", str(run_dir / "best.pt"), "--json", "--device", "cpu",
                                     "--explain", f"--explain-dir={tmp_path / 'explain'}"])
    assert predicted["predictions"] and list((tmp_path / "explain").glob("*.png"))

    # Other frozen weights under the same name: refused, whichever tensor differs.
    state = torch.load(weights)
    state["blocks.3.mlp.fc1.weight"][0, 0] += 1e-3
    torch.save(state, weights)
    with pytest.raises(UserError, match=r"best.pt holds the tensors a model.adapt run trained beside frozen backbone "
                                        r"weights that differ from the ones model.backbone_weights=.*vit_tiny.pth gives "
                                        r"here \(their fingerprint does not match\); load it where"):
        from_checkpoint(run_dir / "best.pt")


def test_a_ctrl_c_lora_run_resumes_bit_for_bit_from_its_trained_tensors(peft, cub_3x13, tmp_path, monkeypatch):
    # LoRA's dropout on (its masks come from the generator a last.pt saves), a last.pt every 2 of the 3 steps an epoch.
    weights = vit_weights_file(tmp_path)

    def run(run_dir):
        return lora_run(cub_3x13, run_dir, weights, "--model.lora_dropout=0.1", "--data.num_workers=1",
                        "--train.epochs=2", "--train.checkpoint_every=2")

    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    train_cli.main(run(whole))
    interrupt_after_first_last_pt(monkeypatch)
    with pytest.raises(Interrupted, match="stopped training"):
        train_cli.main(run(stopped))
    first = load(stopped / "last.pt")
    assert (first["epoch"], first["step_in_epoch"]) == (0, 2) and ENTRY in first
    train_cli.main(run(stopped))
    expected, resumed = load(whole / "last.pt")["model"], load(stopped / "last.pt")["model"]
    assert expected.keys() == resumed.keys() and any(".lora_B." in key for key in expected)
    assert not any(".base_layer." in key for key in expected)  # the frozen weights came from the file
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    assert rows_without_timing(stopped) == rows_without_timing(whole)


@pytest.mark.parametrize("method", ["bitfit", "vpt_deep"])
def test_bitfit_and_vpt_checkpoints_evaluate_predict_and_explain(method, cub_3x6, tmp_path):
    weights = vit_weights_file(tmp_path)
    run_dir = tmp_path / "run"
    args = lora_run(cub_3x6, run_dir, weights, "--data.num_workers=2", "--train.epochs=1")
    train_cli.main([arg.replace("--model.adapt=lora", f"--model.adapt={method}") for arg in args
                    if arg != "--model.lora_rank=4"])
    best = load(run_dir / "best.pt")
    trained = {"bitfit": lambda key: key.endswith("bias"), "vpt_deep": lambda key: key.endswith(".prompts")}[method]
    backbone = [key for key in best["model"] if key.startswith("backbone.")]
    assert backbone and all(trained(key) for key in backbone) and ENTRY in best  # no frozen tensor kept
    row = next(row for row in rows_without_timing(run_dir) if row["epoch"] == best["epoch"])
    evaluate = ["--checkpoint", str(run_dir / "best.pt"), "--split", "val", "--device", "cpu", "--no-figures",
                f"--output={tmp_path / 'val.json'}"]
    if method == "bitfit":  # in a fresh process: the backbone's weights from the file, nothing from this one
        result = launch(sys.executable, "-m", "bcnn.eval", *evaluate)
        assert result.returncode == 0, result.stderr[-3000:]
        evaluated = json.loads((tmp_path / "val.json").read_text())
    else:
        evaluated = eval_cli.main(evaluate)
    assert evaluated["top1"] == row["val_top1"] and evaluated["count"] == 3
    pytest.importorskip("captum")
    image = sorted((cub_3x6 / "images").rglob("*.jpg"))[0]
    (predicted,) = predict_cli.main([str(image), "--checkpoint", str(run_dir / "best.pt"), "--json", "--device", "cpu",
                                     "--explain", f"--explain-dir={tmp_path / 'explain'}"])
    assert predicted["predictions"] and list((tmp_path / "explain").glob("*.png"))

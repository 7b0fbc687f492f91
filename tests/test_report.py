"""python -m bcnn.report over real runs: two seeds trained and evaluated (single view and flip) by the project's
own commands; the table's mean and spread against NumPy on the JSON files; a run without an evaluation and runs
that differ in more than the seed are said."""

import contextlib
import io
import json
import shutil
import subprocess

import numpy as np
import pytest
import yaml

from bcnn import eval as eval_cli
from bcnn import report
from bcnn import train as train_cli
from bcnn.errors import UserError
from helpers.runs import REPO, STAGE1, run_in_process

TINY = ["--device=cpu", "--data.resize=40", "--data.crop=32", "--data.val_fraction=0.34", "--data.num_workers=0",
        "--model.backbone_weights=none", "--train.batch_size=4", "--train.epochs=1", "--train.log_every=0",
        "--train.precision=fp32"]


def train_and_evaluate(data, run_dir, *extra, tta=("none", "flip")):
    train_cli.main(["--config", STAGE1, f"--data-root={data}", f"--run-dir={run_dir}", *TINY, *extra])
    for mode in tta:
        eval_cli.main(["--checkpoint", str(run_dir / "best.pt"), "--split", "test", "--device", "cpu", "--tta", mode,
                       "--no-figures"])


@pytest.fixture(scope="module")
def runs(cub_3x13, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    for seed in (0, 1):
        train_and_evaluate(cub_3x13, root / f"seed{seed}", f"--train.seed={seed}")
    # Tiny runs of a random frozen VGG16 all score chance: a third seed's files, the real ones with other numbers
    # in them, give the spread something to measure.
    shutil.copytree(root / "seed1", root / "seed2")
    config = yaml.safe_load((root / "seed2" / "config.yaml").read_text())
    config["train"]["seed"] = 2
    (root / "seed2" / "config.yaml").write_text(yaml.safe_dump(config))
    for suffix, shift in (("", 12.5), ("_flip", 7.25)):
        path = root / "seed2" / f"eval_best_test{suffix}.json"
        evaluation = json.loads(path.read_text())
        for key in ("top1", "top5", "mean_class_acc"):
            evaluation[key] = max(0.0, evaluation[key] - shift)
        path.write_text(json.dumps(evaluation))
    train_and_evaluate(cub_3x13, root / "other_lr", "--optim.lr=0.5", tta=("none",))
    (root / "not_evaluated").mkdir()
    return root


def test_the_table_gives_each_run_and_the_mean_and_std_over_seeds(runs):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = report.main([str(runs / f"seed{seed}") for seed in (0, 1, 2)] + ["--json"])
    assert json.loads(stdout.getvalue()) == json.loads(json.dumps(result))  # stdout is the JSON alone
    assert [row["seed"] for row in result["runs"]] == [0, 1, 2] and result["config_differences"] == []
    for suffix in ("", "_flip"):
        written = [json.loads((runs / f"seed{seed}" / f"eval_best_test{suffix}.json").read_text())
                   for seed in (0, 1, 2)]
        for key in ("top1", "top5", "mean_class_acc"):
            values = np.array([evaluation[key] for evaluation in written])
            stats = result["summary"][key + suffix]
            assert stats["n"] == 3 and values.std() > 0
            assert stats["mean"] == pytest.approx(values.mean(), rel=1e-12)
            assert stats["std"] == pytest.approx(values.std(ddof=1), rel=1e-12, abs=1e-12)
    assert all(row["images"] == 21 for row in result["runs"])  # the test split of cub_3x13

    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        report.main([str(runs / "seed0"), str(runs / "seed1")])
    text = table.getvalue()
    assert "top-1 (single view)" in text and "top-1 (flip)" in text and "mean ± std over 2 run(s)" in text


def test_a_run_without_flip_shows_a_dash_and_a_different_config_is_noted(runs):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = report.main([str(runs / "seed0"), str(runs / "other_lr")])
    assert result["runs"][1]["views"]["_flip"] is None
    assert result["summary"]["top1_flip"]["n"] == 1 and result["summary"]["top1_flip"]["std"] is None
    assert "note: the runs differ in optim.lr, not only in their seed" in stdout.getvalue()


def test_a_run_without_an_evaluation_is_one_sentence(runs, tmp_path):
    with pytest.raises(UserError, match="has no evaluation of best.pt on test; run python -m bcnn.eval"):
        report.main([str(runs / "not_evaluated")])
    with pytest.raises(UserError, match="is not a run directory"):
        report.main([str(tmp_path / "missing")])


def test_make_trains_evaluates_and_reports_each_seed_in_its_own_run_directory():
    # PY=echo: make prints the commands it would run, each as the shell expanded it.
    def make(*args):
        result = subprocess.run(["make", "-s", *args, "PY=echo"], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    stage2 = make("stage2", "SEEDS=2", "RECIPE=cub_vgg16_compact")
    assert len(stage2) == 2
    for seed, line in enumerate(stage2):
        assert "--config experiments/cub_vgg16_compact_stage2.yaml" in line and f"--train.seed={seed}" in line
        assert f"--run-dir=runs/cub_vgg16_compact_stage2_seed{seed} " in line
        assert f"--train.init_from=runs/cub_vgg16_compact_stage1_seed{seed}/best.pt" in line
    evaluations = make("eval", "SEEDS=2")
    assert len(evaluations) == 4 and all("--split test" in line for line in evaluations)
    assert [("--tta flip" in line, f"stage2_seed{seed}/best.pt" in line) for seed in (0, 1) for line in
            evaluations[2 * seed: 2 * seed + 2]] == [(False, True), (True, True)] * 2
    assert make("report", "SEEDS=3") == ["-m bcnn.report " + " ".join(f"runs/cub_vgg16_stage2_seed{seed}"
                                                                      for seed in range(3))]
    assert make("stage1") == ["-m bcnn.train --config experiments/cub_vgg16_stage1.yaml --data-root "
                              "data/CUB_200_2011 --device auto"]


def test_a_run_given_twice_counts_once(runs, capsys):
    result = report.main([str(runs / "seed0"), str(runs / "seed1"), str(runs / "seed0") + "/", "--json"])
    assert [row["seed"] for row in result["runs"]] == [0, 1] and result["summary"]["top1"]["n"] == 2
    assert "given more than once; it counts once" in capsys.readouterr().err


def test_an_evaluation_of_an_older_best_pt_is_refused_with_the_command_that_renews_it(runs, tmp_path):
    run = shutil.copytree(runs / "seed0", tmp_path / "seed0")
    path = run / "eval_best_test_flip.json"
    evaluation = json.loads(path.read_text())
    evaluation["epoch"] -= 1  # what a best.pt replaced after bcnn.eval ran leaves behind
    path.write_text(json.dumps(evaluation))
    with pytest.raises(UserError, match=r"eval_best_test_flip.json evaluates epoch 0, but .*best.pt now holds epoch "
                                        r"1; run python -m bcnn.eval --checkpoint .*best.pt --split test --tta flip "
                                        r"again\.$"):
        report.main([str(run)])


def test_evaluations_whose_checkpoint_moved_away_are_reported_with_a_note(runs, tmp_path, capsys):
    run = tmp_path / "kept"
    run.mkdir()
    for name in ("eval_best_test.json", "config.yaml"):
        shutil.copy(runs / "seed0" / name, run / name)
    result = report.main([str(run), "--json"])
    assert result["runs"][0]["seed"] == 0
    assert "could not be checked" in capsys.readouterr().err


@pytest.mark.parametrize("name, content, expected", [
    ("eval_best_test.json", b'{"top1": 3', "cannot be read (not JSON"),
    ("eval_best_test.json", b"\xff\xfe{}", "cannot be read (not UTF-8)"),
    ("eval_best_test.json", b"[1, 2]", "is not an evaluation bcnn.eval wrote"),
    ("eval_best_test.json", b'{"top1": 1, "top5": 2, "mean_class_acc": 3, "epoch": 1}', "needs count, epoch"),
    ("config.yaml", b"train: {seed: [", "cannot be read (not valid YAML)"),
    ("config.yaml", b"\xff\xfetrain: 1", "cannot be read (not UTF-8)"),
    ("config.yaml", b"- a list\n", "is not a config bcnn.train wrote"),
    ("config.yaml", b"train: 3\n", "is not a config bcnn.train wrote"),
    ("best.pt", b"PK\x03\x04 truncated", "cannot be read as a bcnn checkpoint"),
])
def test_a_damaged_file_of_a_run_is_one_sentence(runs, tmp_path, name, content, expected):
    run = tmp_path / "run"
    run.mkdir()
    for kept in ("eval_best_test.json", "config.yaml"):
        shutil.copy(runs / "seed0" / kept, run / kept)
    (run / name).write_bytes(content)
    # In-process (the CLI prints a UserError as its one line: tests/test_config.py runs that path).
    with pytest.raises(UserError) as error:
        report.main([str(run)])
    assert expected in str(error.value) and str(name) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("variables", [["SEEDS=0"], ["SEEDS=three"], ["SEEDS=-2"], ["GPUS=0"],
                                       ["GPUS=2", "RESTARTS=x"]])
def test_make_refuses_a_count_that_is_not_a_whole_number_instead_of_training_nothing(variables):
    result = subprocess.run(["make", "-s", "stage1", "stage2", "eval", *variables, "PY=echo"], cwd=REPO,
                            capture_output=True, text=True)
    name = variables[-1].split("=")[0]
    assert result.returncode != 0 and result.stdout == "", result.stdout  # nothing ran
    assert f"{variables[-1]} is not a whole number of at least" in result.stderr and name in result.stderr


def test_report_takes_best_or_last_only(runs, capsys):
    with pytest.raises(SystemExit):
        report.main([str(runs / "seed0"), "--checkpoint", "middle"])
    assert "invalid choice: 'middle'" in capsys.readouterr().err


def copied_run(runs, into, name="run"):
    run = into / name
    run.mkdir()
    for kept in ("eval_best_test.json", "config.yaml"):
        shutil.copy(runs / "seed0" / kept, run / kept)
    return run


@pytest.mark.parametrize("changes, named", [
    ({"top1": -50.0}, "top1 -50.0"), ({"top5": 250.0}, "top5 250.0"), ({"mean_class_acc": float("nan")}, "nan"),
    ({"count": 0}, "count 0"), ({"count": 2.5}, "count 2.5"), ({"top1": True}, "needs count, epoch"),
    ({"retrieval": {"recall@1": 140.0}}, "recall@1 140.0"), ({"knn": {"top1": {"20": "high"}}}, "not numbers")])
def test_impossible_values_in_an_evaluation_are_refused_not_averaged(runs, tmp_path, changes, named):
    run = copied_run(runs, tmp_path)
    evaluation = json.loads((run / "eval_best_test.json").read_text())
    evaluation.update(changes)
    (run / "eval_best_test.json").write_text(json.dumps(evaluation))  # json writes nan as NaN, which it reads back
    with pytest.raises(UserError) as error:  # in-process, as above; the CLI's one line is tested once, below
        report.main([str(runs / "seed0"), str(run)])
    line = str(error.value)
    assert "\n" not in line and named in line and "eval_best_test.json" in line


def test_runs_evaluated_on_different_data_are_named(runs, tmp_path):
    moved = copied_run(runs, tmp_path, "moved")
    evaluation = json.loads((moved / "eval_best_test.json").read_text())
    evaluation["data_root"] = "/elsewhere/CUB_200_2011"
    (moved / "eval_best_test.json").write_text(json.dumps(evaluation))
    completed = run_in_process(report.main, runs / "seed1", moved)
    assert completed.returncode == 0, completed.stderr
    note = completed.stdout.strip().splitlines()[-1]
    assert note.startswith("note: the runs were evaluated on different data: ")
    assert f"{runs / 'seed1'} on {evaluation['data_root']}" not in note  # each run beside its own root
    assert f"{moved} on /elsewhere/CUB_200_2011" in note and str(runs / "seed1") in note
    same = run_in_process(report.main, runs / "seed0", runs / "seed1")
    assert "different data" not in same.stdout  # one root, one count: nothing to say


def test_knn_and_retrieval_scores_are_carried_over_seeds(runs, tmp_path):
    # Two seeds' best.pt evaluated again with --knn --retrieval, in copies: the module's runs stay as they are.
    for seed in (0, 1):
        shutil.copytree(runs / f"seed{seed}", tmp_path / f"seed{seed}")
        eval_cli.main(["--checkpoint", str(tmp_path / f"seed{seed}" / "best.pt"), "--split", "test", "--device", "cpu",
                       "--no-figures", "--knn", "--retrieval"])
    completed = run_in_process(report.main, tmp_path / "seed0", tmp_path / "seed1", "--json")
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    written = [json.loads((tmp_path / f"seed{seed}" / "eval_best_test.json").read_text()) for seed in (0, 1)]
    for key, protocol, name in (("knn_top1@20", "knn", "20"), ("knn_top1@200", "knn", "200"),
                                ("recall@1", "retrieval", "recall@1"), ("recall@8", "retrieval", "recall@8"),
                                ("map@r", "retrieval", "map@r"), ("r_precision", "retrieval", "r_precision")):
        values = np.array([(e[protocol]["top1"] if protocol == "knn" else e[protocol])[name] for e in written])
        stats = result["summary"][key]
        assert stats["n"] == 2 and stats["mean"] == pytest.approx(values.mean(), rel=1e-12), key
        assert stats["std"] == pytest.approx(values.std(ddof=1), rel=1e-12, abs=1e-12), key
    table = run_in_process(report.main, tmp_path / "seed0", tmp_path / "seed1").stdout
    assert "k-NN@20" in table.splitlines()[1] and "MAP@R" in table.splitlines()[1]
    assert "k-NN@20" not in run_in_process(report.main, runs / "seed0").stdout  # no column where nothing scored it

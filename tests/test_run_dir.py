"""A run directory belongs to one run at a time, and no command deletes a checkpoint it was told to read or was not
told to replace, nor overwrites or deletes a file that bcnn did not write (train, eval and `bcnn.data synth`);
--overwrite keeps the run it replaces until the new one has a checkpoint; a full or read-only disk, Ctrl-C and
SIGTERM each end in one sentence that says where the last checkpoint is, with nothing half-written left behind."""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bcnn import checkpoint as checkpoint_module
from bcnn import eval as eval_cli
from bcnn import train as train_cli
from bcnn.checkpoint import save_checkpoint
from bcnn.config import load_config
from bcnn.data import build_dataset
from bcnn.data.__main__ import main as data_cli_main
from bcnn.errors import Interrupted, UserError, sigterm_raises
from bcnn.run_dir import LOCK_FILE, RunDirectory
from helpers.runs import REPO, launch, run_in_process, small_run_args, suite_threads


def fingerprints(folder: Path) -> dict:
    """Every file's path under folder and content hash: equal before and after means nothing was touched. run.lock
    is left out: it says who holds the directory, and reading it here would drop this process's own lock on it."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != LOCK_FILE}


def train(*args):
    """bcnn.train in this process (the command's output and status, not its process, are what these tests check)."""
    return run_in_process(train_cli.main, *args)


def one_error_line(result, *fragments):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


@pytest.fixture
def finished_run(reference_run, tmp_path) -> Path:
    """A copy of a finished 2-epoch run (best.pt, last.pt, metrics, events, config, log)."""
    return Path(shutil.copytree(reference_run, tmp_path / "stage1"))


# ---- no command deletes a checkpoint it was told to read -----------------------------------------------------


# These run bcnn.train in this process (a subprocess costs seconds to start); the CLI prints the same UserError
# as one `error:` line with exit status 2, as test_a_run_directory_held_by_a_running_run_is_refused shows.


def test_stage2_into_stage1s_directory_is_refused_and_keeps_its_best_pt(cub_3x13, finished_run):
    (finished_run / "last.pt").unlink()  # deleted to save space: best.pt alone remains
    before = fingerprints(finished_run)
    with pytest.raises(UserError, match=rf"{finished_run / 'best.pt'} lies in run directory {finished_run}, which "
                                        r"this run would clear as it starts; write this run to a --run-dir of its "
                                        r"own, not the one that checkpoint lies in\.$"):
        train_cli.main(small_run_args(cub_3x13, finished_run, f"--train.init_from={finished_run / 'best.pt'}"))
    assert fingerprints(finished_run) == before


def test_overwrite_with_init_from_or_config_inside_the_directory_is_refused(cub_3x13, finished_run):
    before = fingerprints(finished_run)
    with pytest.raises(UserError, match="lies in run directory"):
        train_cli.main(small_run_args(cub_3x13, finished_run, f"--train.init_from={finished_run / 'best.pt'}",
                                      "--overwrite"))
    config = finished_run / "config.yaml"  # the run's own, which the user edited to start again
    config.write_text(config.read_text().replace("lr: 0.01", "lr: 0.02"))
    before = fingerprints(finished_run)
    with pytest.raises(UserError, match=rf"^--config {config} lies in run directory {finished_run}, which this run "
                                        r"would clear as it starts; copy it out of there and pass the copy as "
                                        r"--config, or write this run to another --run-dir.$"):
        train_cli.main(small_run_args(cub_3x13, finished_run, "--config", str(config), "--overwrite"))
    assert fingerprints(finished_run) == before


@pytest.mark.parametrize("keep_last", [True, False], ids=["overwrite finished run", "best.pt alone, no overwrite"])
def test_a_typo_in_the_data_root_touches_nothing(cub_3x13, finished_run, tmp_path, keep_last):
    if not keep_last:
        (finished_run / "last.pt").unlink()
    before = fingerprints(finished_run)
    args = small_run_args(tmp_path / "CUB_200_201", finished_run, *(["--overwrite"] if keep_last else []))
    with pytest.raises(UserError, match="does not exist"):
        train_cli.main(args)
    assert fingerprints(finished_run) == before


def test_a_directory_with_best_pt_but_no_last_pt_is_not_taken_for_empty(cub_3x13, finished_run):
    (finished_run / "last.pt").unlink()
    before = fingerprints(finished_run)
    with pytest.raises(UserError, match=f"run directory {finished_run} holds an earlier run's best.pt and "
                                        "metrics.jsonl but no last.pt to resume from; pass --overwrite"):
        train_cli.main(small_run_args(cub_3x13, finished_run))
    assert fingerprints(finished_run) == before


def test_overwrite_removes_every_file_of_the_earlier_run_and_its_evaluations(cub_3x13, finished_run):
    eval_cli.main(["--checkpoint", str(finished_run / "best.pt"), "--device=cpu", "--split=val", "--projector"])
    assert {"eval_best_val.json", "eval_best_val_per_class.csv", "eval_best_val_confusion.png",
            "projector_best_val/projector_config.pbtxt"} <= set(fingerprints(finished_run))
    (finished_run / "eval_plan.md").write_text("test split after the last seed only\n")
    before = fingerprints(finished_run)
    with pytest.raises(UserError, match=rf"^run directory {finished_run} holds eval_plan.md, which bcnn did not "
                                        r"write and a new run will not delete; move it elsewhere, or pass another"):
        train_cli.main(small_run_args(cub_3x13, finished_run, "--train.epochs=1", "--overwrite"))
    assert fingerprints(finished_run) == before
    (finished_run / "eval_plan.md").unlink()

    train_cli.main(small_run_args(cub_3x13, finished_run, "--train.epochs=1", "--overwrite"))
    assert not list(finished_run.glob("eval_*")) and not list(finished_run.glob("projector*"))  # folder and all
    assert [json.loads(line)["epoch"] for line in (finished_run / "metrics.jsonl").read_text().splitlines()] == [1]
    # the earlier run waited in previous_run/ until the new run's first last.pt (step 2 of 3), then went
    assert not (finished_run / "previous_run").exists()
    log = (finished_run / "train.log").read_text()
    assert "the run that --overwrite replaces waits in" in log
    assert log.index("removed previous_run/") < log.index("epoch 1 done")


# ---- a new run clears only what a bcnn run wrote --------------------------------------------------------------


def test_a_new_run_refuses_a_folder_holding_the_users_own_files(cub_3x13, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    own_config = run_dir / "config.yaml"  # the user keeps the config beside the run, and trains from it
    own_config.write_text((REPO / "experiments" / "demo_stage1.yaml").read_text() + "# tried lr 0.1: diverged\n")
    (run_dir / "train.log").write_text("12:00:01 my notes on the run\n")
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (run_dir / "eval_best_test.json").write_text('{"top1": 84.1, "note": "from the paper"}\n')
    before = fingerprints(run_dir)
    with pytest.raises(UserError, match=rf"^run directory {run_dir} holds config.yaml, eval_best_test.json, "
                                        r"metrics.jsonl and train.log, which bcnn did not write"):
        train_cli.main(small_run_args(cub_3x13, run_dir, "--config", str(own_config)))
    assert fingerprints(run_dir) == before


def test_evaluations_kept_after_the_checkpoints_moved_away_need_overwrite(cub_3x13, finished_run, tmp_path):
    eval_cli.main(["--checkpoint", str(finished_run / "best.pt"), "--device=cpu", "--split=val", "--no-figures"])
    for name in ("best.pt", "last.pt"):
        (finished_run / name).rename(tmp_path / name)  # archived elsewhere; the evaluations and curves stay
    before = fingerprints(finished_run)
    with pytest.raises(UserError, match=rf"^run directory {finished_run} holds an earlier run's eval_best_val.json, "
                                        r"eval_best_val_per_class.csv and metrics.jsonl but no last.pt to resume "
                                        r"from; pass --overwrite"):
        train_cli.main(small_run_args(cub_3x13, finished_run))
    assert fingerprints(finished_run) == before


@pytest.fixture
def unreadable_cub(writable_cub) -> Path:
    """A mini-CUB whose every image is truncated: the dataset reads, the first batch fails."""
    for image in (writable_cub / "images").rglob("*.jpg"):
        image.write_bytes(image.read_bytes()[:200])
    return writable_cub


def test_overwrite_that_fails_before_its_first_checkpoint_puts_the_earlier_run_back(unreadable_cub, finished_run,
                                                                                   capsys):
    before = fingerprints(finished_run)
    with pytest.raises(UserError, match="truncated"):
        train_cli.main(small_run_args(unreadable_cub, finished_run, "--overwrite"))
    assert fingerprints(finished_run) == before, "the finished run is back, and nothing of the failed one remains"
    assert "the run that --overwrite was replacing is back as it was" in capsys.readouterr().out


def test_a_killed_overwrite_leaves_the_earlier_run_in_previous_run(cub_3x13, unreadable_cub, finished_run):
    original = fingerprints(finished_run)
    previous = finished_run / "previous_run"  # what a SIGKILL before the new run's first last.pt leaves:
    previous.mkdir()
    for path in list(finished_run.iterdir()):
        if path.name not in (LOCK_FILE, "previous_run"):  # files, and the projector's folder
            path.rename(previous / path.name)
    for name in ("config.yaml", "train.log"):  # the killed run's own
        shutil.copy(previous / name, finished_run / name)
    (finished_run / "train.log").write_text(f"12:00:00 run dir {finished_run}\n")
    before = fingerprints(finished_run)
    with pytest.raises(UserError, match=rf"holds previous_run/, the run that an --overwrite stopped before its first "
                                        rf"checkpoint was replacing; move its files back into {finished_run} to keep "
                                        r"that run, or pass --overwrite"):
        train_cli.main(small_run_args(cub_3x13, finished_run))
    assert fingerprints(finished_run) == before
    # --overwrite again: the killed run's files go, previous_run/ still waits, and comes back when this run fails
    with pytest.raises(UserError, match="truncated"):
        train_cli.main(small_run_args(unreadable_cub, finished_run, "--overwrite"))
    assert fingerprints(finished_run) == original


@pytest.mark.parametrize("fmt, dataset_folder", [("cub", "."), ("aircraft", "fgvc-aircraft-2013b")])
def test_synth_into_a_folder_that_is_not_empty_is_refused(tmp_path, fmt, dataset_folder):
    root = tmp_path / "data"
    synth = ["synth", "--format", fmt, "--root", str(root), "--classes", "1", "--per-class", "3", "--image-size", "16"]
    data_cli_main(synth)  # a new folder: written
    before = fingerprints(root)
    with pytest.raises(UserError, match=rf"^{root / dataset_folder if dataset_folder != '.' else root} is not empty "
                                        r"\(it holds .*\), and synth writes a new dataset there; pass"):
        data_cli_main([*synth, "--seed", "1"])
    assert fingerprints(root) == before
    if fmt == "cub":  # any file, not only a dataset's
        notes = tmp_path / "notes"
        notes.mkdir()
        (notes / "todo.txt").write_text("label the new photos\n")
        with pytest.raises(UserError, match=r"it holds todo.txt\), and synth writes a new dataset there; pass --root "
                                            r"a new or empty folder.$"):
            data_cli_main(["synth", "--root", str(notes)])
        assert (notes / "todo.txt").read_text() == "label the new photos\n"


# ---- one run at a time ---------------------------------------------------------------------------------------


def test_a_run_directory_held_by_a_running_run_is_refused_and_eval_is_not(cub_3x13, finished_run):
    running = RunDirectory(finished_run)
    running.hold()  # this test process stands for a run in progress (say, trained on with more epochs)
    try:
        before = fingerprints(finished_run)
        # a process of its own: the lock names this test's process, which a run in this process would hold itself
        result = launch(sys.executable, "-m", "bcnn.train", *small_run_args(cub_3x13, finished_run,
                                                                           "--train.epochs=3"))
        one_error_line(result, f"run directory {finished_run} is in use by another run (host ",
                       f"pid {os.getpid()}", "another --run-dir")
        assert fingerprints(finished_run) == before
        # eval and predict only read a run: never blocked
        evaluated = run_in_process(eval_cli.main, "--checkpoint", finished_run / "best.pt", "--device=cpu",
                                   "--no-figures")
        assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    finally:
        running.release()


def test_two_runs_started_together_cannot_share_a_directory(cub_3x13, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(max(1, suite_threads() // 2))}
    runs = [subprocess.Popen([sys.executable, "-m", "bcnn.train", *small_run_args(cub_3x13, run_dir,
                                                                                 f"--optim.lr={lr}")],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for lr in (0.01, 0.005)]
    outputs = [run.communicate(timeout=600) for run in runs]
    statuses = sorted(run.returncode for run in runs)
    assert statuses == [0, 2], outputs
    loser = next(stderr for run, (_, stderr) in zip(runs, outputs) if run.returncode == 2)
    # started together, the loser finds the directory locked; when it was slow to start, already written by the
    # other (its run under way), or its last.pt already there with the other's lr (that run finished first)
    assert ("is in use by another run" in loser or "was written by another run" in loser
            or "it was trained with optim.lr=" in loser), loser
    winner_lr = next(lr for run, lr in zip(runs, (0.01, 0.005)) if run.returncode == 0)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["lr_classifier"] for row in rows] == [winner_lr, winner_lr], "one run's metrics, not two mixed"


def test_what_a_killed_run_left_is_taken_over_or_removed(cub_3x13, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # A SIGKILL in the middle of save_checkpoint leaves the lock file naming the dead run, and a temporary file.
    (run_dir / "run.lock").write_text(json.dumps({"host": "node7", "pid": 4242, "started": "2026-01-01 00:00:00"}))
    stale = run_dir / ".last.pt.k2j4x9.tmp"
    stale.write_bytes(b"half a checkpoint")
    result = train(*small_run_args(cub_3x13, run_dir, "--train.epochs=1"))
    assert result.returncode == 0, result.stderr[-2000:]
    log = (run_dir / "train.log").read_text()
    assert "took over the lock of host node7, pid 4242, started 2026-01-01 00:00:00, which no longer runs" in log
    assert f"removed {stale}, left by a checkpoint save that was cut short" in log
    assert not list(run_dir.glob(".*.tmp"))


# ---- a full disk, a read-only disk ------------------------------------------------------------------------------


def small_state(value: float) -> dict:
    return {"model": {"weight": torch.full((256, 256), value)}, "epoch": 1}


def test_a_full_disk_is_one_sentence_and_the_previous_checkpoint_stays(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(small_state(1.0), path)
    before = path.read_bytes()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda _: usage._replace(free=100_000))
    with pytest.raises(UserError, match=r"the disk holding .* is full: last.pt needs about [\d.]+ MB and 0.1 MB are "
                                        r"free; the previous last.pt is intact; free some space, then run the same "
                                        r"command again.$"):
        save_checkpoint(small_state(2.0), path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_a_disk_that_fills_during_the_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    usage = shutil.disk_usage(tmp_path)

    def save_until_the_disk_is_full(state, f):
        f.write(b"partial")  # what torch.save had written when the disk filled up
        monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda _: usage._replace(free=0))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 52")

    monkeypatch.setattr(checkpoint_module.torch, "save", save_until_the_disk_is_full)
    with pytest.raises(UserError, match="is full: best.pt needs about .* no best.pt has been written yet"):
        save_checkpoint(small_state(1.0), path)
    assert os.listdir(tmp_path) == []


def test_a_save_that_fails_half_way_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(small_state(1.0), path)
    before = path.read_bytes()

    def failing_save(state, f):
        f.write(b"partial")
        raise RuntimeError("the machine broke")

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="the machine broke"):
        save_checkpoint(small_state(2.0), path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_sigterm_during_a_save_waits_for_the_checkpoint_to_be_written(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(small_state(1.0), path)
    real_save = checkpoint_module.torch.save

    def save_with_a_sigterm_half_way(state, f):
        f.write(b"")
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler pre-empts the job in the middle of the write
        real_save(state, f)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_with_a_sigterm_half_way)
    with sigterm_raises(), pytest.raises(Interrupted, match="SIGTERM"):
        save_checkpoint(small_state(2.0), path)
    assert torch.equal(torch.load(path, weights_only=True)["model"]["weight"], small_state(2.0)["model"]["weight"])
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_training_onto_a_full_disk_says_what_to_do_by_what_is_written(cub_3x13, tmp_path, monkeypatch):
    run_dir, usage = tmp_path / "run", shutil.disk_usage(tmp_path)
    free = {"bytes": usage.free}
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda _: usage._replace(free=free["bytes"]))
    real_save = checkpoint_module.torch.save

    def save_then_fill_the_disk(state, f):
        real_save(state, f)
        free["bytes"] = 1_000_000  # the first checkpoint (last.pt at step 2) fits, then the disk is full

    monkeypatch.setattr(checkpoint_module.torch, "save", save_then_fill_the_disk)
    # best.pt at the end of epoch 1 is the next write
    with pytest.raises(UserError, match=r"is full: best.pt needs about [\d.]+ MB and 1.0 MB are free; no best.pt "
                                        r"has been written yet; free some space, then run the same command again: "
                                        r"it resumes from last.pt.$"):
        train_cli.main(small_run_args(cub_3x13, run_dir))
    assert not list(run_dir.glob(".*.tmp"))
    # Full from the start: nothing to resume, so the way on is --overwrite (the refusal of a best.pt without a
    # last.pt would otherwise stop the re-run the message suggests).
    with pytest.raises(UserError, match=r"no last.pt has been written yet; free some space, then start the run "
                                        r"again with --overwrite"):
        train_cli.main(small_run_args(cub_3x13, tmp_path / "run2"))


def test_a_read_only_disk_is_one_sentence(cub_3x13, tmp_path, monkeypatch):
    real_mkdir = Path.mkdir

    def read_only_mkdir(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "readonly")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    with pytest.raises(UserError, match=r"cannot create run directory .*readonly/run \(read-only file system\); "
                                        r"pass a --run-dir on a disk"):
        train_cli.main(small_run_args(cub_3x13, tmp_path / "readonly" / "run"))


@pytest.mark.parametrize("run_dir, where", [("notes.txt", "is a file"), ("notes.txt/run", "lies under")])
def test_a_run_dir_that_is_a_file_or_lies_under_one_is_one_sentence_and_the_file_is_untouched(
        cub_3x13, tmp_path, run_dir, where):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=rf"^--run-dir .*{run_dir} {where}.*; pass a folder for the run"):
        train_cli.main(small_run_args(cub_3x13, tmp_path / run_dir))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_rerunning_a_finished_run_writes_nothing_so_a_read_only_disk_is_fine(cub_3x13, finished_run):
    before, lock_written = fingerprints(finished_run), (finished_run / LOCK_FILE).stat().st_mtime_ns
    result = train(*small_run_args(cub_3x13, finished_run))
    assert result.returncode == 0 and "already finished 2 epochs" in result.stdout
    assert fingerprints(finished_run) == before
    assert (finished_run / LOCK_FILE).stat().st_mtime_ns == lock_written, "not even the lock is taken"


def test_eval_prints_its_numbers_before_a_write_fails(finished_run, monkeypatch, capsys):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "write_text", read_only)
    with pytest.raises(UserError, match=r"cannot write .*eval_best_test.json \(read-only file system\); the "
                                        r"numbers are printed above; pass --output"):
        eval_cli.main(["--checkpoint", str(finished_run / "best.pt"), "--device=cpu"])
    assert "test: 21 images, top-1" in capsys.readouterr().out


def test_eval_output_that_is_a_folder_is_one_sentence(finished_run, tmp_path):
    result = run_in_process(eval_cli.main, "--checkpoint", finished_run / "best.pt", "--device=cpu",
                            f"--output={tmp_path}")
    one_error_line(result, f"--output {tmp_path} is a folder; give a file name")


def test_evaluating_last_pt_does_not_replace_best_pts_evaluation(finished_run, capsys):
    for name in ("best.pt", "last.pt"):
        eval_cli.main(["--checkpoint", str(finished_run / name), "--device=cpu", "--no-figures"])
    capsys.readouterr()
    best, last = (json.loads((finished_run / f"eval_{stem}_test.json").read_text()) for stem in ("best", "last"))
    assert best["checkpoint"].endswith("best.pt") and last["checkpoint"].endswith("last.pt")
    for stem in ("best", "last"):
        assert (finished_run / f"eval_{stem}_test_per_class.csv").exists()


# ---- Ctrl-C and SIGTERM ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop, status, said", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_a_signal_stops_training_with_where_to_resume_and_the_same_command_resumes(cub_3x13, tmp_path, stop,
                                                                                  status, said):
    run_dir = tmp_path / "run"
    args = small_run_args(cub_3x13, run_dir, "--train.checkpoint_every=1")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "bcnn.train", *args], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "last.pt").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == status, stderr[-2000:]
    assert stderr.startswith(f"{said} stopped training; the last checkpoint is {run_dir / 'last.pt'} ("), stderr
    assert stderr.rstrip().endswith("the same command resumes from it.") and "Traceback" not in stderr
    assert not list(run_dir.glob(".*.tmp"))

    again = train(*args)  # the same command
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-2000:]
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_stop_while_the_final_projector_is_written_is_finished_by_the_same_command(cub_3x13, tmp_path,
                                                                                     monkeypatch):
    """SIGTERM after the last epoch's last.pt, while the projector is written: the same command then writes the
    projector (from last.pt's weights, the weights the run ended with) and removes the cut-short temporary folder,
    rather than saying "already finished" and leaving it unwritten."""
    run_dir = tmp_path / "run"
    args = ["--config", REPO / "experiments" / "demo_stage1.yaml", f"--data-root={cub_3x13}", f"--run-dir={run_dir}",
            "--device=cpu", "--data.resize=40", "--data.crop=32", "--data.num_workers=1", "--train.epochs=1",
            "--model.backbone_weights=none", "--train.log_every=0", "--train.heatmap_images=0"]
    args = [str(arg) for arg in args]
    real_write = train_cli.write_projector_folder

    def stopped_midway(folder, write):
        temporary = folder.with_name(folder.name + ".tmp")
        write(temporary)  # the projector's files are there, and then SIGTERM arrives before the rename
        raise Interrupted("stopped by SIGTERM", 128 + signal.SIGTERM)

    monkeypatch.setattr(train_cli, "write_projector_folder", stopped_midway)
    with pytest.raises(Interrupted) as stop:
        with sigterm_raises():
            train_cli.main(args)
    assert "the same command resumes" in str(stop.value)
    assert (run_dir / "projector.tmp").is_dir() and not (run_dir / "projector").exists()
    checkpoints = {name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest() for name in ("last.pt", "best.pt")}

    monkeypatch.setattr(train_cli, "write_projector_folder", real_write)
    train_cli.main(args)
    assert (run_dir / "projector" / "projector_config.pbtxt").is_file() and not (run_dir / "projector.tmp").exists()
    assert checkpoints == {name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest()
                           for name in ("last.pt", "best.pt")}  # finishing trains nothing and rewrites no checkpoint
    rows = sum(1 for _ in next((run_dir / "projector").rglob("tensors.tsv")).open())
    cfg = load_config(args[1], [f"--data.root={cub_3x13}"])
    assert rows == len(build_dataset(cfg.data, "val", train_transform=False))  # one vector per val image


@pytest.mark.parametrize("command", ["bcnn.train", "bcnn.eval"])
def test_ctrl_c_while_a_command_imports_torch_is_one_line(command):
    """The seconds of `import torch` come before main() catches Ctrl-C; bcnn/__init__.py, imported first, makes
    that Ctrl-C one line too. Python then ends by SIGINT, as it does for any uncaught Ctrl-C (the shell's 130)."""
    process = subprocess.Popen([sys.executable, "-m", command, "--help"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    maps, deadline = Path(f"/proc/{process.pid}/maps"), time.monotonic() + 60
    # Once torch's library is mapped, bcnn/__init__.py has run and torch's Python modules (seconds) are importing.
    while "libtorch" not in maps.read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    # Python ends an uncaught Ctrl-C by SIGINT; where the Ctrl-C left a module half-imported and the next import
    # failed on it, bcnn's hook exits 130: either way the shell's 130, and one line.
    assert process.returncode in (-signal.SIGINT, 130) and stderr == "stopped by Ctrl-C\n" and stdout == "", stderr

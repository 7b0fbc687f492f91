"""Progress: a tqdm bar on a terminal, plain periodic lines in a log file or CI output; train.log gets the lines."""

import io
import logging

from bcnn import train as train_cli
from bcnn.data import write_synthetic_cub
from bcnn.progress import EpochProgress
from bcnn.train import setup_logging
from helpers.runs import STAGE1, run_in_process

STATS = {"loss": 1.25, "top1": 50.0, "images_per_sec": 12.5, "lr": {"backbone": 0.001, "classifier": 0.1}}


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_bar_and_the_log_file_gets_the_lines(tmp_path, capsys):
    setup_logging(tmp_path / "train.log")
    terminal = Terminal()
    progress = EpochProgress(epoch=3, total_steps=4, stream=terminal)
    for step in range(1, 5):
        progress.advance()
        if step % 2 == 0:
            progress.report(step, STATS)
    progress.close()
    drawn = terminal.getvalue()
    assert "epoch 3" in drawn and "\r" in drawn and "loss 1.2500 top1 50.00% lr_backbone 0.001" in drawn
    assert "epoch 3 [" not in capsys.readouterr().out, "the bar shows the numbers; no duplicate lines"
    lines = [line for line in (tmp_path / "train.log").read_text().splitlines() if "epoch 3 [" in line]
    assert len(lines) == 2 and "epoch 3 [4/4] loss 1.2500" in lines[1]
    logging.getLogger("bcnn").handlers.clear()


def test_a_log_that_is_not_a_terminal_gets_periodic_lines_and_no_carriage_returns(tmp_path):
    data = write_synthetic_cub(tmp_path / "cub", classes=3, per_class=6, seed=0)
    # stdout and stderr are files, not terminals, as when the command's output goes to a log or CI
    result = run_in_process(train_cli.main, "--config", STAGE1, f"--data-root={data}", "--device=cpu",
                            f"--run-dir={tmp_path / 'run'}", "--data.crop=32", "--data.resize=40", "--train.epochs=1",
                            "--train.batch_size=2", "--train.log_every=2")
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "\r" not in output
    periodic = [line for line in result.stdout.splitlines() if "epoch 1 [" in line]
    # 6 train images (3 more are val) in steps of 2: 3 steps, a line at step 2 and at the last.
    assert [line.split("[")[1].split("]")[0] for line in periodic] == ["2/3", "3/3"]
    assert all("img/s" in line and "lr_classifier" in line for line in periodic)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "torch 2." in log and "torchvision" in log and "bcnn " in log
    assert "epochs: 1" in log, "the resolved config is at the top of the log"

"""A path the file system refuses (a name over its limit, a folder that is a file, no permission) is one sentence
from any command, wherever the command met it; a named pipe or a folder where a file goes is named as what it is,
and never opened (reading a named pipe waits for a writer forever)."""

import errno
import os

import pytest

from bcnn import eval as eval_cli
from bcnn import predict as predict_cli
from bcnn import train as train_cli
from bcnn.data.__main__ import main as data_cli
from bcnn.errors import describe_path_problem, exit_on_user_error
from helpers.runs import STAGE1

LONG = "x" * 300  # over the 255-byte name limit of ext4, xfs, btrfs and tmpfs


def one_line_error(main, argv, capsys) -> str:
    """Run a command as its CLI does (python -m ...), and return its one line on stderr."""
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(main)(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("where", ["config", "run_dir", "data_root", "checkpoint", "output", "verify"])
def test_a_name_over_the_file_systems_limit_is_one_sentence(where, mini_cub, tmp_path, capsys):
    long_path = str(tmp_path / LONG)
    main, argv = {
        "config": (train_cli.main, ["--config", long_path + ".yaml"]),
        "run_dir": (train_cli.main, ["--config", STAGE1, f"--data-root={mini_cub}", f"--run-dir={long_path}",
                                     "--device=cpu"]),
        "data_root": (train_cli.main, ["--config", STAGE1, f"--data-root={long_path}", "--device=cpu",
                                       f"--run-dir={tmp_path / 'run'}"]),
        "checkpoint": (eval_cli.main, ["--checkpoint", long_path + ".pt", "--device=cpu"]),
        "output": (eval_cli.main, ["--checkpoint", str(tmp_path / "best.pt"), "--output", long_path + ".json"]),
        "verify": (data_cli, ["verify", "--root", long_path]),
    }[where]
    err = one_line_error(main, argv, capsys)
    assert "file name too long" in err and "...xxx" in err and " characters)" in err, err  # its middle left out
    assert not (tmp_path / "run").exists()


def test_predict_names_each_input_it_cannot_use_and_goes_on(tmp_path, capsys):
    """predict answers each input: a too-long name, a named pipe and a folder without images each get their reason
    (its error line), and the other inputs are still predicted."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("named pipes are POSIX")
    pipe = tmp_path / "photo.jpg"
    os.mkfifo(pipe)
    results = list(predict_cli.expand_inputs([str(tmp_path / (LONG + ".jpg")), str(pipe), str(tmp_path)]))
    reasons = dict(results)
    assert "file name too long" in reasons[str(tmp_path / (LONG + ".jpg"))]
    assert reasons[str(pipe)].startswith("it is a named pipe, not an image file")
    assert "no image files" in reasons[str(tmp_path)]


def test_the_sentence_keeps_a_long_path_readable():
    error = OSError(errno.ENAMETOOLONG, "File name too long", "/data/" + LONG)
    sentence = describe_path_problem(error)
    assert sentence.startswith("cannot use /data/xxx") and "(306 characters)" in sentence and len(sentence) < 300

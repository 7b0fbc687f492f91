"""`python -m bcnn.train ARGS`, except that the process SIGKILLs itself right after its N-th write of a checkpoint.

N comes from the environment variable KILL_AFTER_SAVES (default 1), the checkpoint's file name from
KILL_AFTER_FILE (default last.pt). Under torchrun only the first attempt dies
(TORCHELASTIC_RESTART_COUNT 0), so `--max-restarts` brings the job back and it must resume. Nothing in bcnn
knows about this: the kill is a real SIGKILL, as from the OOM killer or a pre-empted node.
"""

import os
import signal
import sys

from bcnn import run_dir, train
from bcnn.errors import exit_on_user_error

if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    real_save, writes = run_dir.save_checkpoint, []

    def save_then_die(state, path, **options):
        real_save(state, path, **options)
        if os.path.basename(path) == os.environ.get("KILL_AFTER_FILE", "last.pt"):
            writes.append(path)
            if len(writes) == int(os.environ.get("KILL_AFTER_SAVES", "1")):
                os.kill(os.getpid(), signal.SIGKILL)

    run_dir.save_checkpoint = save_then_die  # the module that writes the checkpoints of a run

if __name__ == "__main__":
    exit_on_user_error(train.main)(sys.argv[1:])

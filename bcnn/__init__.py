"""bcnn: bilinear CNNs (Lin et al., ICCV 2015) for fine-grained recognition in PyTorch.

Modules: config (typed run configuration), data (CUB-200-2011 and class-per-folder datasets, transforms,
loaders, download, synthetic mini-CUB), models (backbones, pooling heads: bilinear, matrix square root,
iSQRT-COV, compact, average; BilinearCNN), optim (optimizer, schedule), engine (train_one_epoch / evaluate),
checkpoint (atomic save, safe load); entry points train, eval, predict and bench (`python -m bcnn.train`, ...).
"""

import os
import signal
import sys

__version__ = "0.1.0"


def _quiet_ctrl_c_while_a_command_starts() -> None:
    """A command (`python -m bcnn.train`, ...) spends seconds importing torch before its main() catches Ctrl-C: a
    Ctrl-C then ends it with one line, as it would later, instead of a traceback through the imports. Only for bcnn's
    own commands: a program that imports bcnn keeps its own excepthook and SIGINT handler."""
    argv = getattr(sys, "orig_argv", [])  # sys.argv[0] is still "-m" while the package is imported
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""
    if not module.startswith("bcnn."):
        return
    received = []

    def ctrl_c(signum, frame):  # Python's own handler, and a note that it ran
        received.append(signum)
        raise KeyboardInterrupt

    previous = sys.excepthook

    def excepthook(kind, value, traceback):
        if issubclass(kind, KeyboardInterrupt):
            print("stopped by Ctrl-C", file=sys.stderr)  # Python then ends by SIGINT: the shell's 130
        elif received:  # a module the Ctrl-C left half-imported (some catch it) failed in a later import
            print("stopped by Ctrl-C", file=sys.stderr)
            sys.stderr.flush()
            os._exit(128 + signal.SIGINT)
        else:
            previous(kind, value, traceback)

    signal.signal(signal.SIGINT, ctrl_c)
    sys.excepthook = excepthook


_quiet_ctrl_c_while_a_command_starts()

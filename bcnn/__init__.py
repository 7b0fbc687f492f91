"""bcnn: bilinear CNNs (Lin et al., ICCV 2015) for fine-grained recognition in PyTorch.

Modules: config (typed run configuration), data (CUB-200-2011 and class-per-folder datasets, transforms,
loaders, download, synthetic mini-CUB), models (backbones, pooling heads: bilinear, matrix square root,
iSQRT-COV, compact, average; BilinearCNN), optim (optimizer, schedule), engine (train_one_epoch / evaluate),
checkpoint (atomic save, safe load); entry points train, eval, predict and bench (`python -m bcnn.train`, ...).
"""

import sys

__version__ = "0.1.0"


def _quiet_ctrl_c_while_a_command_starts() -> None:
    """A command (`python -m bcnn.train`, ...) spends seconds importing torch before its main() catches Ctrl-C: a
    Ctrl-C then ends it with one line, as it would later, instead of a traceback through the imports. Only for bcnn's
    own commands: a program that imports bcnn keeps its own excepthook."""
    argv = getattr(sys, "orig_argv", [])  # sys.argv[0] is still "-m" while the package is imported
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""
    if not module.startswith("bcnn."):
        return
    previous = sys.excepthook

    def excepthook(kind, value, traceback):
        if issubclass(kind, KeyboardInterrupt):
            print("stopped by Ctrl-C", file=sys.stderr)  # Python still exits with 130, as killed by SIGINT
        else:
            previous(kind, value, traceback)

    sys.excepthook = excepthook


_quiet_ctrl_c_while_a_command_starts()

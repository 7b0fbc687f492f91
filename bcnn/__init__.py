"""bcnn: bilinear CNNs (Lin et al., ICCV 2015) for fine-grained recognition in PyTorch.

Modules: config (typed run configuration), data (CUB-200-2011 and class-per-folder datasets, transforms,
loaders, download, synthetic mini-CUB), models (backbones, pooling heads: bilinear, matrix square root,
iSQRT-COV, compact, average; BilinearCNN), optim (optimizer, schedule), engine (train_one_epoch / evaluate),
checkpoint (atomic save, safe load); entry points train, eval, predict and bench (`python -m bcnn.train`, ...).
"""

__version__ = "0.1.0"

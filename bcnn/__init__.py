"""bcnn: bilinear CNNs (Lin et al., ICCV 2015) for fine-grained recognition in PyTorch.

Modules: config (typed run configuration), data (CUB-200-2011 and class-per-folder datasets, transforms,
loaders, download, synthetic mini-CUB), model (VGG16 bilinear CNN), engine (train_one_epoch / evaluate),
checkpoint (atomic save, safe load); entry points train and eval (`python -m bcnn.train`, `python -m bcnn.eval`).
"""

__version__ = "0.1.0"

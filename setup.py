from setuptools import find_packages, setup

setup(
    name="bcnn",
    version="0.1.0",
    description=("Bilinear CNNs (Lin et al.) for fine-grained recognition (CUB, NABirds, FGVC-Aircraft, Stanford Cars) "
                 "in PyTorch"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["bcnn", "bcnn.*"]),
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy>=1.24",
        "pillow>=9.0",
        "pyyaml>=6.0",
        "tensorboard>=2.14",
        "tqdm>=4.60",
        "matplotlib>=3.7",  # confusion matrix and per-class accuracy figures
        "scipy>=1.9",  # Stanford Cars' .mat annotations (torchvision's StanfordCars reads them with it)
    ],
    extras_require={
        "timm": ["timm>=1.0.15"],  # model.backbone=timm:<name>
        "explain": ["captum>=0.7"],  # heatmaps: bcnn.predict --explain (bcnn/explain.py)
        # data.decode=gpu's JPEG decoder (bcnn/data/jpeg.py); without it, torchvision's deprecated one
        "decode": ["torchcodec>=0.16"],
        "peft": ["peft>=0.13"],  # model.adapt=lora (bcnn/models/adapt.py)
        # bcnn.export --format onnx (torch's dynamo exporter writes through onnxscript) and bcnn.onnx_predict
        "export": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18"],
        # the tests build a timm network too, and check bcnn.protocols against pytorch-metric-learning's AccuracyCalculator
        "dev": ["pytest>=7.0", "pytest-xdist>=3.0", "timm>=1.0.15", "captum>=0.7", "torchcodec>=0.16",
                "pytorch-metric-learning>=2.0", "peft>=0.13", "onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18"],
    },
)

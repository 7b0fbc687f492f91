"""bcnn.models: the bilinear head against a NumPy reference, a public port's checkpoint giving the port's logits bit
for bit, the asymmetric head, float32 pooling, finite gradients at zero, the VGG16 cuts, a frozen backbone that
does not move, loading backbone and model weights. (The other pooling heads: tests/test_pooling.py.)

Small inputs (32-64 px) throughout: a VGG16 forward at 448 px costs seconds on a CPU. No test downloads anything;
the ImageNet path is exercised with a random VGG16 placed in a temporary torch hub cache.
"""

import copy
import os
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from bcnn.config import ModelConfig
from bcnn.errors import UserError
from bcnn.models import BilinearCNN, build_model, load_model_weights
from bcnn.models.backbones import vgg16_features
from bcnn.models.pooling import AveragePooling, BilinearPooling, build_pooling, ported_sqrt, signed_sqrt
from helpers.numerics import summation_rtol

IMAGENET_FILE_NAME = os.path.basename(torchvision.models.VGG16_Weights.IMAGENET1K_V1.url)  # vgg16-397923af.pth


def numpy_bilinear_features(x: np.ndarray, eps: float) -> np.ndarray:
    """The paper's head up to the classifier, written independently in float64."""
    batch, channels, height, width = x.shape
    flat = x.astype(np.float64).reshape(batch, channels, height * width)
    gram = np.einsum("bcn,bdn->bcd", flat, flat) / (height * width)
    vector = gram.reshape(batch, channels * channels)
    # The authors' signed square root (cvl-umass/bilinear-cnn BCNN.py): odd, 0 at 0.
    vector = np.sqrt(np.maximum(vector, 0) + eps) - np.sqrt(np.maximum(-vector, 0) + eps)
    return vector / np.linalg.norm(vector, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def random_vgg16_home(tmp_path_factory):
    """A torch home whose hub cache holds a random torchvision VGG16 under the ImageNet file name."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    checkpoints_dir = torch_home / "hub" / "checkpoints"
    checkpoints_dir.mkdir(parents=True)
    torch.manual_seed(123)
    state = torchvision.models.vgg16().state_dict()
    torch.save(state, checkpoints_dir / IMAGENET_FILE_NAME)
    features = {key[len("features.") :]: value for key, value in state.items() if key.startswith("features.")}
    return torch_home, checkpoints_dir / IMAGENET_FILE_NAME, features


@pytest.fixture(scope="module")
def random_backbone():
    torch.manual_seed(0)
    return vgg16_features("relu5_3", "none")


def assert_backbone_equals(backbone: nn.Sequential, expected: dict) -> None:
    actual = backbone.state_dict()
    assert actual.keys() == expected.keys()
    for key, value in actual.items():
        assert torch.equal(value, expected[key]), key


# ---- the head -------------------------------------------------------------------------------------------------


def head_model(channels: int, num_classes: int, sqrt_eps: float = 1e-5) -> BilinearCNN:
    """The bilinear head and classifier on a feature map given directly (an identity backbone)."""
    return BilinearCNN(nn.Identity(), BilinearPooling(channels, sqrt_eps=sqrt_eps), num_classes)


def test_head_matches_numpy_reference():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 5, 7) * 2 - 0.5  # negative values too, so the signed sqrt sees both signs
    model = head_model(channels=6, num_classes=4)
    with torch.no_grad():
        model.classifier.bias.normal_()
        features = model.embed(x)
        logits = model(x)

    expected = numpy_bilinear_features(x.numpy(), eps=1e-5)
    weight, bias = model.classifier.weight.detach().double().numpy(), model.classifier.bias.detach().double().numpy()
    assert features.shape == (3, 36) and logits.shape == (3, 4)
    # float32 against float64: three sums of at most 36 terms (the Gram matrix over 5x7 positions, the L2 norm,
    # the classifier), each off by at most 36u = 2.1e-6 relative (helpers.numerics.summation_rtol); the square
    # root halves its input's error. The atol only serves entries that are 0.
    rtol = 4 * summation_rtol(36)
    np.testing.assert_allclose(features.numpy(), expected, rtol=rtol, atol=1e-7)
    np.testing.assert_allclose(logits.numpy(), expected @ weight.T + bias, rtol=rtol, atol=1e-6)


def test_signed_sqrt_is_the_authors_odd_continuous_form_and_ported_sqrt_the_ports():
    x = torch.tensor([0.0, -0.0, 1e-12, -1e-12, 0.25, -0.25, 4.0], dtype=torch.float64)
    y = signed_sqrt(x, eps=1e-5)
    root_eps = 1e-5 ** 0.5
    # sqrt(relu(x) + eps) - sqrt(relu(-x) + eps): 0 at 0 and a step of x / (2 sqrt(eps)) next to it, no jump.
    assert y[0] == 0 and y[1] == 0 and abs(float(y[2]) - 1e-12 / (2 * root_eps)) < 1e-15
    assert torch.equal(y, -signed_sqrt(-x, eps=1e-5)), "odd"
    assert float(y[4]) == (0.25 + 1e-5) ** 0.5 - root_eps
    ported = ported_sqrt(x.float(), eps=1e-5)
    non_negative = torch.tensor([0, 2, 4, 6])
    assert torch.equal(ported[non_negative], torch.sqrt(x.float()[non_negative] + 1e-5)), "the ports' bit for bit"


@pytest.mark.parametrize("backbone, backbone_b, ported", [
    ("vgg16", "", True),  # relu5_3
    ("densenet121", "", True),  # the cut adds the ReLU its forward() applies
    ("convnext_tiny", "", False),  # stage 4 ends in a residual sum: negative values
    ("vgg16", "convnext_tiny", False),  # an asymmetric B-CNN over one map that can be negative
])
def test_the_bilinear_head_takes_the_ports_sqrt_only_on_maps_that_are_never_negative(backbone, backbone_b, ported):
    model = build_model(ModelConfig(backbone=backbone, backbone_b=backbone_b, backbone_weights="none",
                                    backbone_b_weights="none"), num_classes=2, input_size=64).eval()
    assert model.pooling.nonnegative_maps is ported
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        maps = [network(images) for network in model.backbones()]
        vectors = model.embed(images)
    assert all((found.min() >= 0) for found in maps) or not ported
    gram = numpy_gram(maps)
    expected = np.sqrt(gram + 1e-5) if ported else np.sqrt(np.maximum(gram, 0) + 1e-5) - np.sqrt(
        np.maximum(-gram, 0) + 1e-5)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    # float32 against float64: the Gram's sums over at most 4 x 4 positions, the L2 over C^2 entries.
    np.testing.assert_allclose(vectors.double().numpy(), expected, rtol=1e-4, atol=1e-7)


def numpy_gram(maps: list[torch.Tensor]) -> np.ndarray:
    """X_a X_bᵀ / (H W), flattened, in float64 (the smaller map first resized to the larger, as the head does)."""
    a, b = maps[0], maps[-1]
    if a.shape[-1] < b.shape[-1]:
        a = nn.functional.interpolate(a, size=b.shape[-2:], mode="bilinear", align_corners=False)
    elif b.shape[-1] < a.shape[-1]:
        b = nn.functional.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)
    a, b = a.flatten(2).double().numpy(), b.flatten(2).double().numpy()  # (B, C, HW)
    return np.einsum("bcn,bdn->bcd", a, b).reshape(len(a), -1) / a.shape[2]


class HaoMoodBCNN(nn.Module):
    """The B-CNN of the most used public PyTorch port (HaoMood/bilinear-cnn, src/bilinear_cnn_all.py), written
    here from its forward pass: VGG16 features without pool5, X Xᵀ / (h w), sqrt(X + 1e-5), L2 normalisation,
    fc. (The port fixes 448 px and 200 classes; the arithmetic is the same at any size.)"""

    def __init__(self, num_classes: int):
        super().__init__()
        self.features = torch.nn.Sequential(*list(torchvision.models.vgg16().features.children())[:-1])
        self.fc = torch.nn.Linear(512**2, num_classes)

    def forward(self, x):
        x = self.features(x)
        n, c, h, w = x.size()
        x = x.view(n, c, h * w)
        x = torch.bmm(x, torch.transpose(x, 1, 2)) / (h * w)
        x = x.view(n, c**2)
        x = torch.sqrt(x + 1e-5)
        x = torch.nn.functional.normalize(x)
        return self.fc(x)


def test_a_public_ports_checkpoint_gives_the_ports_logits_bit_for_bit():
    torch.manual_seed(0)
    port = HaoMoodBCNN(num_classes=5).eval()
    saved = torch.nn.DataParallel(port).state_dict()  # what the port saves: module.features.N.*, module.fc.*
    assert all(key.startswith(("module.features.", "module.fc.")) for key in saved)
    ours = build_model(ModelConfig(backbone_weights="none"), num_classes=5, input_size=48).eval()
    load_model_weights(ours, saved)
    images = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, logits = port(images), ours(images)
        zeros = (ours.backbone(images).flatten(2) == 0).all(dim=2).sum().item()
    assert zeros > 0, "dead ReLU channels: bilinear entries that are exactly 0, where sign(0) = 0 would differ"
    assert torch.equal(logits, expected)


def test_the_asymmetric_head_with_the_same_network_twice_is_the_symmetric_head(random_backbone):
    torch.manual_seed(0)
    symmetric = BilinearCNN(copy.deepcopy(random_backbone), BilinearPooling(512), num_classes=3)
    asymmetric = BilinearCNN(copy.deepcopy(random_backbone), BilinearPooling(512, 512), num_classes=3,
                             backbone_b=copy.deepcopy(random_backbone))
    asymmetric.classifier.load_state_dict(symmetric.classifier.state_dict())
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(asymmetric(images), symmetric(images))
    assert set(asymmetric.state_dict()) == set(symmetric.state_dict()) | {
        "backbone_b." + key for key in random_backbone.state_dict()}


def test_two_maps_of_other_sizes_meet_at_the_larger():
    a, b = torch.rand(2, 3, 4, 4), torch.rand(2, 5, 2, 2)
    pooled = BilinearPooling(3, 5)(a, b)
    upsampled = nn.functional.interpolate(b, size=(4, 4), mode="bilinear", align_corners=False)
    expected = BilinearPooling(3, 5)(a, upsampled)
    assert pooled.shape == (2, 15) and torch.equal(pooled, expected)
    assert torch.equal(BilinearPooling(5, 3)(b, a), BilinearPooling(5, 3)(upsampled, a))


def test_average_pooling_is_the_mean_feature():
    x = torch.rand(2, 6, 3, 5)
    pooling = AveragePooling(6)
    assert pooling.output_dim == 6 and pooling.cacheable
    # A float32 mean of 15 values in [0, 1): 14 additions each rounding by at most 2^-24 of a partial sum below 15,
    # then the division's own rounding: under 15 * 2^-24 in all (x is unseeded, so the bound must hold for any x).
    torch.testing.assert_close(pooling(x), x.double().mean(dim=(2, 3)).float(), rtol=0, atol=15 * 2**-24)


@pytest.mark.parametrize("pooling", ["bilinear", "matrix_sqrt", "isqrt_cov", "compact", "avg"])
def test_every_head_runs_in_float32_for_bfloat16_input(pooling):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6).relu().to(torch.bfloat16)
    head = build_pooling(ModelConfig(pooling=pooling, isqrt_reduce_dim=4, compact_dim=64), channels=8)
    model = BilinearCNN(nn.Identity(), head, num_classes=3).eval()  # eval: isqrt_cov's batch norm is fixed
    pooled = model.embed(x)
    assert pooled.dtype == torch.float32
    # bf16 -> float32 is exact, so both run the same float32 arithmetic on the same values: bit for bit.
    assert torch.equal(pooled, model.pooling(x.float()))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        pooled_under_autocast, logits = model.embed(x), model(x)
    assert pooled_under_autocast.dtype == torch.float32 and logits.dtype == torch.float32
    assert torch.equal(pooled_under_autocast, pooled) and torch.equal(logits, model(x.float()))


@pytest.mark.parametrize("feature_map", ["all_zero", "zeros_mixed_in"])
def test_gradients_are_finite_at_zero(feature_map):
    torch.manual_seed(0)
    if feature_map == "all_zero":
        x = torch.zeros(2, 4, 3, 3)
    else:
        x = torch.randn(2, 4, 3, 3)
        x[:, 1] = 0.0  # a dead channel: whole rows and columns of X Xᵀ are exactly 0
        x[x.abs() < 0.5] = 0.0
    x.requires_grad_(True)
    model = head_model(channels=4, num_classes=3)
    model(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    # What the eps is for: without it the ports' form gives NaN at 0 (0 * inf), and the authors' a slope of
    # 1 / (2 sqrt(x)) that is unbounded next to 0; with it the slope is at most 1 / (2 sqrt(eps)) = 158.
    zero = torch.zeros(3, requires_grad=True)
    ported_sqrt(zero, eps=0.0).sum().backward()
    assert not torch.isfinite(zero.grad).all()
    tiny = torch.full((3,), 1e-30, requires_grad=True)
    signed_sqrt(tiny, eps=0.0).sum().backward()
    assert (tiny.grad > 1e14).all()
    tiny.grad = None
    signed_sqrt(tiny, eps=1e-5).sum().backward()
    assert torch.allclose(tiny.grad, torch.tensor(0.5 / 1e-5 ** 0.5))  # float32 rounding of 158.11


def test_classifier_init_is_kaiming_normal():
    torch.manual_seed(0)
    classifier = head_model(channels=32, num_classes=200).classifier
    fan_in = 32 * 32
    expected_std = (2.0 / fan_in) ** 0.5
    # 204,800 samples: their std and mean are off by about 1/sqrt(2N) = 0.16% and 1/sqrt(N) = 0.22% of the std;
    # 10% leaves room for nothing but a wrong init (uniform kaiming's std is the same, but xavier's is 0.7x).
    assert abs(classifier.weight.std().item() - expected_std) < 0.1 * expected_std
    assert abs(classifier.weight.mean().item()) < 0.1 * expected_std
    assert torch.equal(classifier.bias, torch.zeros(200))


# ---- the backbone ---------------------------------------------------------------------------------------------


def test_vgg16_cuts(random_backbone):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert random_backbone(x).shape == (2, 512, 4, 4)
        assert vgg16_features("pool5", "none")(x).shape == (2, 512, 2, 2)
    assert isinstance(random_backbone[-1], nn.ReLU)
    with pytest.raises(UserError, match="model.cut"):
        vgg16_features("fc7", "none")


def _sgd_steps(model: nn.Module, steps: int = 3) -> None:
    torch.manual_seed(1)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    # Every parameter goes to the optimizer, so weight decay and momentum get their chance to move frozen ones.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()


def test_frozen_backbone_stays_bit_identical(random_backbone):
    model = BilinearCNN(copy.deepcopy(random_backbone), BilinearPooling(512), 3).freeze_backbone()
    backbone_before = copy.deepcopy(model.backbone.state_dict())
    classifier_before = model.classifier.weight.detach().clone()

    _sgd_steps(model)

    assert model.backbone_frozen and model.training and model.backbone.training is False
    assert_backbone_equals(model.backbone, backbone_before)
    assert not torch.equal(model.classifier.weight, classifier_before)
    groups = model.param_groups(backbone_lr=0.1, classifier_lr=1.0)
    assert [group["name"] for group in groups] == ["classifier"]
    assert groups[0]["lr"] == 1.0 and len(groups[0]["params"]) == 2


def test_unfrozen_backbone_trains(random_backbone):
    model = BilinearCNN(copy.deepcopy(random_backbone), BilinearPooling(512), 3)
    conv_before = model.backbone[0].weight.detach().clone()

    _sgd_steps(model)

    assert not model.backbone_frozen and model.backbone.training
    assert not torch.equal(model.backbone[0].weight, conv_before)
    groups = model.param_groups(backbone_lr=0.01, classifier_lr=1.0)
    assert [(group["name"], group["lr"]) for group in groups] == [("backbone", 0.01), ("classifier", 1.0)]
    assert len(groups[0]["params"]) == 26  # 13 convolutions, weight and bias each


def test_build_model_from_config():
    model = build_model(ModelConfig(backbone_weights="none", cut="pool5", sqrt_eps=1e-3), num_classes=7, input_size=64)
    assert model.backbone_frozen and model.pooling.sqrt_eps == 1e-3
    assert isinstance(model.backbone[-1], nn.MaxPool2d)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_backbone_weights_from_a_file(random_vgg16_home, tmp_path):
    _, full_vgg16_file, features = random_vgg16_home
    assert_backbone_equals(vgg16_features("relu5_3", str(full_vgg16_file)), features)

    features_only_file = tmp_path / "features.pth"
    torch.save(features, features_only_file)
    assert_backbone_equals(vgg16_features("relu5_3", str(features_only_file)), features)


def test_backbone_weights_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        vgg16_features("relu5_3", str(tmp_path / "missing.pth"))

    resnet_like = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, resnet_like)
    with pytest.raises(UserError, match="resnet.pth does not fit vgg16's features"):
        vgg16_features("relu5_3", str(resnet_like))


def test_imagenet_weights_come_from_the_hub_cache(random_vgg16_home, monkeypatch):
    torch_home, _, features = random_vgg16_home
    monkeypatch.setenv("TORCH_HOME", str(torch_home))

    def no_download(*args, **kwargs):
        raise AssertionError("the cached file should have been used")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    assert_backbone_equals(vgg16_features("relu5_3", "imagenet"), features)


def test_imagenet_download_failure_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as raised:
        vgg16_features("relu5_3", "imagenet")
    message = str(raised.value)
    assert IMAGENET_FILE_NAME in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "model.backbone_weights=none" in message


# ---- model checkpoints ----------------------------------------------------------------------------------------


def _small_model(num_classes: int) -> BilinearCNN:
    return BilinearCNN(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), BilinearPooling(8), num_classes)


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_load_model_weights_strips_wrapper_prefixes(prefix):
    torch.manual_seed(0)
    trained = _small_model(3)
    state = {prefix + key: value for key, value in trained.state_dict().items()}
    fresh = _small_model(3)
    load_model_weights(fresh, state)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, trained.state_dict()[key]), key


def test_load_model_weights_with_other_classes_is_a_user_error():
    state = {"module." + key: value for key, value in _small_model(3).state_dict().items()}
    with pytest.raises(UserError, match=r"classifier\.weight .*same classes"):
        load_model_weights(_small_model(5), state)


def test_the_crop_is_a_required_part_of_building_a_model():
    """A script on the library gets the model the commands build: without input_size a transformer would be built
    for its native size and refuse the recipe's 448 px, so no default stands in for it."""
    with pytest.raises(TypeError, match="input_size"):
        build_model(ModelConfig(backbone="timm:vit_tiny_patch16_224", backbone_weights="none"), 3)
    model = build_model(ModelConfig(backbone="timm:vit_tiny_patch16_224", backbone_weights="none", pooling="avg"), 3,
                        input_size=448)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 448, 448)).shape == (1, 3)


# iNaturalist 2021's 10,000 classes (built on the meta device: shapes, no memory). The sizes in the sentence are
# those of the formula (vector + bias) x classes, computed here apart from the message's code.
@pytest.mark.parametrize("options, refused, advice", [
    ({}, (512 * 512 + 1) * 10_000, "use model.pooling=compact (model.compact_dim=8,192: 82M) or model.pooling="
                                   "isqrt_cov with model.isqrt_reduce_dim=256 (32,896-d: 329M)."),
    ({"pooling": "compact", "compact_dim": 200_000}, (200_000 + 1) * 10_000, "use model.compact_dim=99,999 or less"),
    ({"pooling": "compact"}, None, None),
    ({"pooling": "isqrt_cov", "isqrt_reduce_dim": 256}, None, None),
])
def test_a_classifier_too_large_for_10_000_classes_names_its_size_and_what_fits(options, refused, advice):
    cfg = ModelConfig(backbone_weights="none", **options)
    with torch.device("meta"):
        if refused is None:
            model = build_model(cfg, 10_000, input_size=448)
            assert sum(p.numel() for p in model.classifier.parameters()) < 1_000_000_000
            return
        with pytest.raises(UserError) as error:
            build_model(cfg, 10_000, input_size=448)
    message = str(error.value)
    assert f"over 10,000 classes a {refused / 1e6:,.0f}M-parameter classifier" in message and advice in message

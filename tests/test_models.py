import copy

import pytest
import torch
import torchvision
from conftest import compose_config
from hydra.utils import instantiate

import backbones
from adapters import LinearAdapter
from heads import IdentityHead
from mnist_extras.errors import user_error
from mnist_extras.layers import CentreTapConv2d, CentreTaps, swap_centre_taps
from models import AdapterMismatch, SimpleModel


@pytest.mark.parametrize("option", ["resnet18", "resnet34", "resnet50"])
def test_every_backbone_builds_from_its_config_and_classifies_digits(option):
    cfg = compose_config(f"task.model.backbone={option}", "task.model.backbone.pretrained=false")
    model = instantiate(cfg.task.model)
    images = torch.randn(2, 1, 28, 28)
    assert model.backbone(images).shape == (2, 512)
    logits = model(images)
    assert logits.shape == (2, 10)
    logits.sum().backward()
    assert model.backbone.net.conv1.weight.grad is not None


def test_adapter_that_does_not_fit_the_backbone_is_named():
    with pytest.raises(AdapterMismatch, match=r"the adapter takes 2048 features but ResNet18 gives 512") as err:
        SimpleModel(backbones.ResNet18(), LinearAdapter(2048, 10), IdentityHead())
    assert user_error(err.value).endswith("; fix: task.model.adapter.in_features=512")  # ready to paste


def test_task_completes_the_partial_optimizer_with_model_parameters():
    cfg = compose_config("task.model.backbone.pretrained=false")
    task = instantiate(cfg.task)
    optimizer = task.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["lr"] == pytest.approx(5e-5)
    assert optimizer.defaults["weight_decay"] == pytest.approx(0.2)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in task.model.parameters()
    )


def test_pretrained_loads_imagenet_weights_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    imagenet = torchvision.models.resnet18()
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(imagenet.state_dict(), cached)

    backbone = backbones.ResNet18(pretrained=True)

    torch.testing.assert_close(backbone.net.conv1.weight, imagenet.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(backbone.net.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)


def test_pretrained_without_weights_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, dst, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(backbones.WeightsUnavailable, match="could not be downloaded") as err:
        backbones.ResNet50(pretrained=True)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in str(err.value)
    assert user_error(err.value).endswith("fix: train from scratch with task.model.backbone.pretrained=false")


@pytest.mark.parametrize("backbone", [backbones.ResNet18, backbones.ResNet50])
def test_centre_tap_convolutions_give_the_plain_convolutions_outputs_and_gradients(backbone):
    torch.manual_seed(0)
    plain = backbone()
    fast = copy.deepcopy(plain)
    assert swap_centre_taps(fast) >= 13  # every 3x3 stride-1 convolution, the 1x1-map ones among them
    assert swap_centre_taps(fast) == 0  # a second swap finds nothing left to do
    assert isinstance(fast.net.layer4[1].conv2, CentreTapConv2d)
    assert list(plain.state_dict()) == list(fast.state_dict())  # checkpoints and ImageNet weights fit either way
    images = torch.randn(4, 1, 28, 28)
    for model in (fast, plain):
        model.eval()
    out_fast, out_plain = fast(images), plain(images)
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-4, atol=1e-5)
    grads_fast = torch.autograd.grad(out_fast.square().sum(), list(fast.parameters()))
    grads_plain = torch.autograd.grad(out_plain.square().sum(), list(plain.parameters()))
    for got, want in zip(grads_fast, grads_plain, strict=True):  # float rounding differs between the two kernels
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()) + 1e-6)


def test_the_centre_taps_callback_swaps_the_tasks_model_in_place_and_leaves_other_models_alone():
    task = instantiate(compose_config("task.model.backbone.pretrained=false").task)
    names = list(task.state_dict())
    weight = task.model.backbone.net.layer4[1].conv2.weight
    CentreTaps().setup(None, task, "fit")
    assert isinstance(task.model.backbone.net.layer4[1].conv2, CentreTapConv2d)
    assert task.model.backbone.net.layer4[1].conv2.weight is weight  # the same parameter, not a copy
    assert list(task.state_dict()) == names
    # A copier's backbone with no 3x3 stride-1 convolution: nothing to swap, nothing changed.
    other = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 5, padding=2), torch.nn.Conv2d(8, 8, 3, stride=2))
    assert swap_centre_taps(other) == 0
    assert [type(m) for m in other] == [torch.nn.Conv2d, torch.nn.Conv2d]


def test_the_digits_stems_feed_the_same_trunk_at_7x7_or_14x14():
    torch.manual_seed(0)
    imagenet, digits = backbones.ResNet18(), backbones.ResNet18(stem="digits")
    digits14 = backbones.ResNet18(stem="digits14")
    images = torch.randn(2, 1, 28, 28)
    assert digits(images).shape == imagenet(images).shape == digits14(images).shape == (2, 512)
    maps = {}
    for name, model in (("imagenet", imagenet), ("digits", digits), ("digits14", digits14)):
        model.net.layer1.register_forward_hook(lambda m, i, o, name=name: maps.__setitem__(name, o.shape))
        model(images)
    assert maps["digits"] == maps["imagenet"] == (2, 64, 7, 7)
    assert maps["digits14"] == (2, 64, 14, 14)
    assert set(digits14.state_dict()) == set(digits.state_dict())  # the max-pool has no weights
    assert isinstance(digits.net.conv1, torch.nn.Sequential)
    trunk = {k for k in imagenet.state_dict() if not k.startswith("net.conv1")}
    assert trunk <= set(digits.state_dict())  # ImageNet weights still fit everything after the stem

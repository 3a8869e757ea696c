import copy

import pytest
import torch
import torchvision
from conftest import compose_config
from hydra.utils import instantiate

import backbones
from adapters import LinearAdapter
from mnist_extras.errors import user_error
from heads import IdentityHead
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
    assert "fix: set task.model.adapter.in_features" in user_error(err.value)


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
    fast = backbone()
    plain = copy.deepcopy(fast)
    swapped = 0
    for module in list(plain.modules()):
        for name, conv in list(module.named_children()):
            if isinstance(conv, backbones.CentreTapConv2d):
                twin = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, bias=False)
                twin.weight = conv.weight
                setattr(module, name, twin)
                swapped += 1
    assert swapped >= 13  # every 3x3 stride-1 convolution, the 1x1-map ones among them
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

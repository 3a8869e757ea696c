import pytest
import torch
import torchvision
from conftest import compose_config
from hydra.utils import instantiate

import backbones
from adapters import LinearAdapter
from cli import user_error
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

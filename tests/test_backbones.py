"""Every registered backbone gives four maps at strides 4, 8, 16, 32 with the channels it declares."""

import pytest
import torch

from train.backbones import BACKBONES, WeightsError, create_backbone


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_feature_shapes(name):
    bb = create_backbone(name, load_weights=False)
    feats = bb(torch.rand(1, 3, 64, 96))
    assert [f.shape[1] for f in feats] == bb.channels
    assert [(f.shape[2], f.shape[3]) for f in feats] == [(64 // s, 96 // s) for s in bb.strides]


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_bundled_imagenet_weights_load(name):
    bb = create_backbone(name)
    assert not any(p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training  # frozen BatchNorm statistics
    # real ImageNet BN statistics, not the defaults of a fresh network
    assert not torch.allclose(bb.net._bn0.running_var, torch.ones(32))


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2"])
def test_resnets_refuse_to_run_without_weights(name):
    with pytest.raises(WeightsError, match="--backbone-weights"):
        create_backbone(name)


def test_resnet_torchvision_and_timm_style_checkpoints(tmp_path):
    """Key mapping: a wrapped, 'module.'-prefixed checkpoint with its classifier (fc) loads; a wrong one is refused."""
    src = create_backbone("resnet18", load_weights=False).net
    torch.manual_seed(0)
    state = {f"module.{k}": torch.randn_like(v) if v.is_floating_point() else v for k, v in src.state_dict().items()}
    state["module.layer4.0.conv1.weight"] = torch.zeros(512, 256, 3, 3)
    state["module.fc.weight"] = torch.zeros(1000, 512)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": state}, path)
    bb = create_backbone("resnet18", path)
    assert torch.equal(bb.net.layer3[1].conv2.weight, state["module.layer3.1.conv2.weight"])
    assert torch.equal(bb.net.layer4[0].conv1.weight, state["module.layer4.0.conv1.weight"])
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="does not fit resnet18"):
        create_backbone("resnet18", tmp_path / "wrong.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="junk.pth"):
        create_backbone("resnet18", tmp_path / "junk.pth")

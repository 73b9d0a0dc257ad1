"""torchvision's pretrained-weights API, offline: a generated checkpoint is written into a
temporary TORCH_HOME under the file name the Weights enum's URL names (the hub cache then
loads it without a download), and the fused model is compared with torchvision's loaded
the same way; plus get_model / list_models / get_model_weights as torchvision's."""
import os
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from torchvision.models import ResNet18_Weights, ResNet50_Weights

import fused_resnet
from conftest import rel_err


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


def _cache(weights, torch_home, seed=0):
    """A random checkpoint of the right architecture where the hub looks for `weights`."""
    torch.manual_seed(seed)
    name = next(n for n, e in fused_resnet.models.registry.WEIGHTS.items()
                if e is type(weights))
    state = getattr(torchvision.models, name)(num_classes=len(weights.meta["categories"]))
    state = state.state_dict()
    path = torch_home / "hub" / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("given", [ResNet50_Weights.IMAGENET1K_V2, "IMAGENET1K_V2", "DEFAULT",
                                   "ResNet50_Weights.IMAGENET1K_V2"])
def test_weights_enum_and_names_load_like_torchvision(torch_home, given):
    state = _cache(ResNet50_Weights.IMAGENET1K_V2, torch_home)
    fused = fused_resnet.resnet50(weights=given, progress=False)
    tv = torchvision.models.resnet50(weights=given, progress=False)
    assert fused.fc.out_features == tv.fc.out_features == 1000
    for (k, a), b in zip(fused.state_dict().items(), tv.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(fused.state_dict()["fc.weight"], state["fc.weight"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(fused.eval()(x), tv.eval()(x)) < 1e-5


def test_wrong_models_weights_raise_torchvisions_error(torch_home):
    with pytest.raises(TypeError) as want:
        torchvision.models.resnet50(weights=ResNet18_Weights.IMAGENET1K_V1)
    with pytest.raises(TypeError) as got:
        fused_resnet.resnet50(weights=ResNet18_Weights.IMAGENET1K_V1)
    assert str(got.value) == str(want.value)
    with pytest.raises(KeyError):
        fused_resnet.resnet50(weights="IMAGENET9K_V9")
    with pytest.raises(ValueError, match="num_classes"):
        fused_resnet.resnet18(weights=ResNet18_Weights.IMAGENET1K_V1, num_classes=10)
    with pytest.raises(ValueError, match="option-B"):
        fused_resnet.resnet18(weights=ResNet18_Weights.IMAGENET1K_V1, shortcut="A")


def test_state_dicts_and_paths_keep_working(tmp_path):
    tv = torchvision.models.resnet18(num_classes=5)
    path = tmp_path / "r18.pth"
    torch.save(tv.state_dict(), path)
    for given in (tv.state_dict(), str(path), path):
        fused = fused_resnet.resnet18(weights=given)
        assert fused.fc.out_features == 5
        assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(),
                                                     tv.state_dict().values()))
    with pytest.raises(FileNotFoundError):
        fused_resnet.resnet18(weights=str(tmp_path / "missing.pth"))


def test_get_model_and_list_models_like_torchvision(torch_home):
    _cache(ResNet18_Weights.IMAGENET1K_V1, torch_home)
    model = fused_resnet.get_model("resnet18", weights="DEFAULT")
    assert isinstance(model, fused_resnet.ResNet)
    ref = torchvision.models.get_model("resnet18", weights="DEFAULT")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 ref.state_dict().values()))
    assert fused_resnet.get_model("cifar_resnet20").depth == 20
    with pytest.raises(ValueError, match="Unknown model alexnet"):
        fused_resnet.get_model("alexnet")
    names = fused_resnet.list_models()
    assert {"resnet50", "wide_resnet101_2", "cifar_resnet56"} <= set(names)
    assert set(fused_resnet.list_models(include="resnet*")) == set(
        torchvision.models.list_models(include="resnet*"))
    assert fused_resnet.list_models(include="cifar*", exclude="*1202") == [
        "cifar_resnet110", "cifar_resnet20", "cifar_resnet32", "cifar_resnet44",
        "cifar_resnet56"]
    assert fused_resnet.get_model_weights("resnet50") is ResNet50_Weights
    with pytest.raises(ValueError):
        fused_resnet.get_model_weights("cifar_resnet20")


def test_readme_pretrained_example(torch_home):
    """The README's quick start, as written there."""
    _cache(ResNet50_Weights.IMAGENET1K_V2, torch_home)
    weights = ResNet50_Weights.IMAGENET1K_V2
    model = fused_resnet.resnet50(weights=weights).eval()
    preprocess = weights.transforms()
    image = torch.randint(0, 256, (3, 240, 320), dtype=torch.uint8)
    with torch.no_grad():
        probs = model(preprocess(image).unsqueeze(0)).softmax(1)
    assert probs.shape == (1, 1000) and abs(probs.sum().item() - 1) < 1e-5
    label = weights.meta["categories"][probs.argmax().item()]
    assert isinstance(label, str)

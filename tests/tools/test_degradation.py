"""The degradation experiment (fused_resnet/tools/degradation.py): a few steps of both
networks, and `train --compare-plain` calling it."""
import json

from fused_resnet.tools import cli, degradation


def test_degradation_experiment_runs(tmp_path):
    result = degradation.run_degradation("cifar_resnet20", steps=2, batch_size=8,
                                         out_dir=tmp_path, progress=False, final_eval_images=32)
    saved = json.loads((tmp_path / "degradation_cifar_resnet20.json").read_text())
    assert set(saved["curves"]) == {"plain", "residual"}
    for name, curve in saved["curves"].items():
        assert len(curve["train_error"]) == len(curve["loss"]) == 2
        assert 0 <= curve["final_train_error"] <= 100
    assert saved["curves"]["plain"]["shortcut"] is None
    assert saved["curves"]["residual"]["shortcut"] == "A"
    assert saved["curves"]["plain"]["parameters"] == saved["curves"]["residual"]["parameters"]
    if result["png"] is not None:
        assert (tmp_path / "degradation_cifar_resnet20.png").stat().st_size > 1000


def test_train_compare_plain_calls_the_experiment(monkeypatch, tmp_path):
    """`python -m fused_resnet train --model M --compare-plain` runs run_degradation."""
    calls = []

    def fake(model_name, **kwargs):
        calls.append((model_name, kwargs))
        return {"fake": True}

    monkeypatch.setattr(degradation, "run_degradation", fake)
    monkeypatch.setattr(degradation, "summary", lambda result: "summary")
    code = cli.main(["train", "--model", "cifar_resnet56", "--compare-plain", "--steps", "5",
                     "--batch", "16", "--out", str(tmp_path), "--quiet", "--device", "cpu"])
    assert code == 0
    assert calls and calls[0][0] == "cifar_resnet56"
    kwargs = calls[0][1]
    assert kwargs["steps"] == 5 and kwargs["batch_size"] == 16
    assert str(kwargs["out_dir"]) == str(tmp_path) and kwargs["device"] == "cpu"

"""`python -m fused_resnet train` on CPU at a tiny size (resnet18 on scikit-learn's digits
upscaled to 16x16): it learns, writes JSON + PNG, its checkpoint loads into torchvision's
model (strict), resuming reproduces the uninterrupted run, --compare trains
torchvision's model from the same initialisation on the same batches with the same
losses, and torchrun with 2 gloo ranks (sync BN) computes what one process computes."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import fused_resnet
from fused_resnet.tools import cli, data

pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
# One thread: the numbers do not depend on the core count, and a busy CI machine does not
# stall OpenMP barriers.
TINY = ["--model", "resnet18", "--image-size", "16", "--batch", "32", "--threads", "1",
        "--quiet"]


def _train(tmp_path, name, *extra):
    code = cli.main(["train", *TINY, "--out", str(tmp_path), "--name", name, *extra])
    assert code == 0
    return json.loads((tmp_path / f"{name}.json").read_text())


def _rel_gaps(a, b):
    return [abs(x - y) / abs(y) for x, y in zip(a, b)]


def test_compare_fp64_same_curves_and_accuracy(tmp_path):
    """fp64: the fused and torchvision models differ only by the rounding order of their
    reductions (~1e-16 per operation), which stays far below 1e-9 over the run, so their
    loss curves coincide and they make the same predictions; and they do learn."""
    res = _train(tmp_path, "cmp64", "--compare", "--dtype", "fp64", "--steps", "40",
                 "--eval-every", "20", "--lr", "0.01", "--no-save")
    assert (tmp_path / "cmp64.png").stat().st_size > 10_000
    assert not (tmp_path / "cmp64.ckpt.pt").exists()
    f, t = res["history"]["fused"], res["history"]["torchvision"]
    assert f["step"] == list(range(40)) and len(t["loss"]) == 40
    assert max(_rel_gaps(f["loss"][:10], t["loss"][:10])) < 1e-12
    assert max(_rel_gaps(f["loss"], t["loss"])) < 1e-9
    assert f["eval"]["step"] == [20, 40]
    assert f["eval"]["acc"] == t["eval"]["acc"]
    assert max(_rel_gaps(f["eval"]["loss"], t["eval"]["loss"])) < 1e-9
    # it learns: 10 classes (chance 10%), 40 steps of 32 images
    assert sum(f["loss"][-8:]) < 0.6 * sum(f["loss"][:8])
    assert f["eval"]["acc"][-1] > 0.5, f["eval"]
    meta = res["meta"]
    assert meta["data"] == "digits" and meta["train_images"] + meta["val_images"] == 1797
    assert res["environment"]["torch"] == torch.__version__
    assert res["summary"]["fused"]["final_val_acc"] == f["eval"]["acc"][-1]


def test_fp32_checkpoint_resume_and_compare(tmp_path):
    """fp32 default: the checkpoint's state_dict loads into torchvision's resnet18
    (strict) and into fused_resnet's (weights=path); resuming from the step-4 checkpoint
    gives the uninterrupted run's weights and curves; the fused and torchvision losses
    agree over the first steps to fp32 rounding: the first forward (same weights, same
    batch) differs by the rounding of ~20 layers of reductions (measured 2e-7, bound 1e-5);
    each update then amplifies the difference (early training at 16 px is chaotic: x5 to
    x200 per step measured, depending on the CPU's kernels), so only the second step is
    held to 1e-4 (measured 1e-6); fp64 (the test above) shows it is rounding only."""
    res = _train(tmp_path, "full", "--compare", "--steps", "8", "--eval-every", "4",
                 "--keep-checkpoints")
    f, t = res["history"]["fused"], res["history"]["torchvision"]
    gaps = _rel_gaps(f["loss"], t["loss"])
    assert gaps[0] < 1e-5 and gaps[1] < 1e-4, gaps
    assert res["meta"]["dtype"] == "fp32" and res["meta"]["batch"] == 32

    ckpt = torch.load(tmp_path / "full.ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 8
    tv = torchvision.models.resnet18(num_classes=10)
    tv.load_state_dict(ckpt["state_dict"], strict=True)
    fr = fused_resnet.resnet18(weights=str(tmp_path / "full.ckpt.pt"))
    for (k, a), b in zip(fr.state_dict().items(), tv.state_dict().values()):
        assert torch.equal(a, b), k
    # the fused model's checkpointed weights evaluate to the logged accuracy
    fr.eval(), tv.eval()
    d = data.load("digits", 16)
    x, y = d.val.tensors
    with torch.no_grad():
        acc = (tv(x).argmax(1) == y).double().mean().item()
    assert abs(acc - f["eval"]["acc"][-1]) < 1e-9

    # resume from step 4 (another directory) and finish: same result as the full run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    code = cli.main(["train", "--resume", str(tmp_path / "full.step4.ckpt.pt"), "--quiet",
                     "--threads", "1", "--out", str(resumed), "--name", "full"])
    assert code == 0
    res2 = json.loads((resumed / "full.json").read_text())
    for label in ("fused", "torchvision"):
        a, b = res["history"][label], res2["history"][label]
        assert a["step"] == b["step"] and a["eval"]["step"] == b["eval"]["step"]
        assert max(_rel_gaps(b["loss"], a["loss"])) < 1e-6, label
        assert max(_rel_gaps(b["eval"]["loss"], a["eval"]["loss"])) < 1e-5, label
    ckpt2 = torch.load(resumed / "full.ckpt.pt", map_location="cpu", weights_only=True)
    for k, v in ckpt["state_dict"].items():
        if v.is_floating_point():
            err = ((ckpt2["state_dict"][k] - v).norm() / v.norm().clamp_min(1e-30)).item()
            assert err < 1e-5, k
        else:
            assert torch.equal(ckpt2["state_dict"][k], v), k


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_gloo_ranks_equal_one_process(tmp_path):
    """torchrun --nproc-per-node 2 -m fused_resnet train: DDP over gloo (loopback) with
    sync BN and an odd global batch (16 + 15 images per rank) computes the one-process
    run's losses, in fp64, to ~1e-12."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or \
        shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    args = ["--model", "resnet18", "--image-size", "16", "--batch", "31", "--steps", "4",
            "--eval-every", "2", "--dtype", "fp64", "--quiet", "--no-save"]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
         str(_free_port()), "-m", "fused_resnet", "train", *args, "--out", str(tmp_path / "ddp"),
         "--name", "r"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "r.json").read_text())
    assert ddp["meta"]["world_size"] == 2 and ddp["meta"]["local_batches"] == [16, 15]
    assert ddp["meta"]["sync_bn"] is True
    assert not (tmp_path / "ddp" / "r.ckpt.pt").exists()
    one = _train(tmp_path / "one", "r", *args[args.index("--batch"):])
    a, b = ddp["history"]["fused"], one["history"]["fused"]
    assert a["step"] == b["step"] == [0, 1, 2, 3]
    assert max(_rel_gaps(a["loss"], b["loss"])) < 1e-10, (a["loss"], b["loss"])
    assert a["eval"]["acc"] == b["eval"]["acc"]
    assert max(_rel_gaps(a["eval"]["loss"], b["eval"]["loss"])) < 1e-10


def test_image_folder(tmp_path):
    """--data PATH: an ImageFolder directory (here PATH/<class>/*.png, split 90/10)."""
    from PIL import Image  # here: only this test writes image files (torchvision's PIL)
    gen = torch.Generator().manual_seed(0)
    for c in ("cat", "dog", "eel"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(10):
            pixels = (torch.rand(20, 24, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "imgs" / c / f"{i}.png")
    res = _train(tmp_path, "folder", "--data", str(tmp_path / "imgs"), "--steps", "2",
                 "--batch", "8", "--workers", "0", "--no-save")
    meta = res["meta"]
    assert meta["num_classes"] == 3 and meta["image_size"] == 16
    assert meta["train_images"] == 27 and meta["val_images"] == 3
    assert len(res["history"]["fused"]["loss"]) == 2
    assert res["history"]["fused"]["eval"]["step"] == [2]

"""What is wrong on the command line is an argparse-style error before any work (exit 2,
the usage and one line saying what): bad numbers, unknown backends, checkpoints and data
directories that are not, output places that cannot be written."""
import os
import subprocess
import sys

import pytest
import torch

from fused_resnet.tools import cli


def _usage_error(argv, capsys) -> str:
    """Run the command line, expect exit 2 with a usage line; the error line."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err, err
    return [line for line in err.splitlines() if "error:" in line][-1]


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "must be >= 2"),
    (["--batch", "-4"], "must be >= 2"),
    (["--batch", "1"], "batch norm"),
    (["--batch", "two"], "expected an integer >= 2"),
    (["--lr", "-1"], "must be a positive number"),
    (["--lr", "nan"], "must be a positive number"),
    (["--momentum", "-0.5"], "must be a number >= 0"),
    (["--backend", "gpu"], "unknown backend 'gpu'"),
    (["--steps", "-1"], "must be a positive integer"),
    (["--epochs", "0"], "must be a positive number"),
    (["--image-size", "0"], "must be a positive integer"),
    (["--warmup", "-2"], "must be >= 0"),
    (["--eval-every", "0"], "must be a positive integer"),
])
def test_train_bad_numbers_and_names(argv, message, capsys):
    assert message in _usage_error(["train", *argv], capsys)


def test_train_resume_missing_or_not_a_checkpoint(tmp_path, capsys):
    line = _usage_error(["train", "--resume", str(tmp_path / "nope.pt")], capsys)
    assert "no such file" in line
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert "is not a checkpoint" in _usage_error(["train", "--resume", str(junk)], capsys)
    state = tmp_path / "state_dict.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, state)
    line = _usage_error(["train", "--resume", str(state)], capsys)
    assert "is not a train checkpoint" in line and "weights=" in line


def _image(path, ok=True):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    if ok:
        Image.new("RGB", (8, 8), (10, 200, 30)).save(path)
    else:
        path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")


def test_train_data_directory_problems(tmp_path, capsys):
    def err(path):
        return _usage_error(["train", "--data", str(path), "--out", str(tmp_path / "o")],
                            capsys)
    assert "no such directory" in err(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no class subdirectories" in err(empty)
    no_images = tmp_path / "no_images"
    (no_images / "cat").mkdir(parents=True)
    (no_images / "cat" / "notes.txt").write_text("hello")
    assert "has no images" in err(no_images)
    broken = tmp_path / "broken"
    _image(broken / "cat" / "a.png")
    _image(broken / "dog" / "b.png", ok=False)
    line = err(broken)
    assert "cannot read the image" in line and "b.png" in line
    assert not (tmp_path / "o").exists()    # nothing was started


def test_outputs_that_cannot_be_written_fail_before_the_run(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    where = str(blocker / "sub")
    assert "cannot write there" in _usage_error(["train", "--out", where], capsys)
    assert "cannot write there" in _usage_error(
        ["bench", "--model", "resnet18", "--device", "cpu", "--out", where + "/x.json"], capsys)
    assert "cannot write there" in _usage_error(
        ["check", "--model", "resnet18", "--device", "cpu", "--json", where + "/c.json"], capsys)


def test_bad_backend_variable_help_works_and_train_names_it(capsys, monkeypatch):
    env = {**os.environ, "FUSED_RESNET_BACKEND": "gpu"}
    proc = subprocess.run([sys.executable, "-m", "fused_resnet", "train", "--help"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--backend" in proc.stdout, proc.stderr
    from fused_resnet.backends import registry
    monkeypatch.setenv("FUSED_RESNET_BACKEND", "gpu")
    monkeypatch.setattr(registry, "_default", None)   # read the variable again
    line = _usage_error(["train", "--steps", "1"], capsys)
    assert "FUSED_RESNET_BACKEND='gpu'" in line

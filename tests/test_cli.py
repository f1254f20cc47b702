"""The crvae console script."""

import subprocess
import sys

import pytest
import torch

from crvae_ext.app import cli


def test_info_self_check_passes(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "self-check PASS" in out
    assert "backend torch" in out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["fly"])
    assert err.value.code == 2
    assert "invalid choice: 'fly'" in capsys.readouterr().err


def test_module_entry_point_runs():
    done = subprocess.run(
        [sys.executable, "-m", "crvae_ext.app.cli", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "crvae_ext" in done.stdout


def _run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _bad_checkpoints(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(range(256)) * 8)
    text = tmp_path / "text.pt"
    text.write_text("epoch 3\n")
    no_model = tmp_path / "no_model.pt"
    torch.save({"format": "crvae_ext-checkpoint-1", "epoch": 1}, no_model)
    module = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), module)
    return [empty, noise, text, no_model, module]


@pytest.mark.parametrize("index", range(5), ids=["empty", "noise", "text", "no_model", "module"])
def test_bad_checkpoint_is_one_line_naming_the_path(index, tmp_path, capsys):
    path = _bad_checkpoints(tmp_path)[index]
    for command in (["certify", path], ["attack", path], ["train", "--resume", path, "--out",
                                                           tmp_path / "o.pt"]):  # fmt: skip
        code, _, err = _run([*command, "--data", "digits"], capsys)
        _assert_one_line_error(code, err, str(path), "crvae_ext checkpoint")


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["certify", "missing.pt", "--json", folder], ["--json", str(folder), "directory"]),
        (["train", "--data", "digits", "--out", folder], ["--out", str(folder), "directory"]),
        (["train", "--data", "digits", "--out", a_file / "m.pt"], ["--out", "is a file"]),
        (["train", "--data", "digits", "--out", "/proc/x.pt"], ["--out", "/proc/x.pt"]),
        (["demo", "--out", a_file], ["--out", str(a_file), "is a file"]),
        (["sweep", "--out", a_file], ["--out", str(a_file), "is a file"]),
    ]
    for argv, needles in cases:
        code, out, err = _run(argv, capsys)
        _assert_one_line_error(code, err, *needles)
        assert "epoch" not in out  # nothing was trained
    assert not list(folder.iterdir()) and not list(tmp_path.glob("**/*.tmp"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "--out", "x.pt", "--seed", "-1"],
            "argument --seed: must be a finite number >= 0",
        ),
        (["train", "--out", "x.pt", "--beta", "inf"], "argument --beta: must be a finite number"),
        (["train", "--out", "x.pt", "--beta", "nan"], "argument --beta: must be a finite number"),
        (["demo", "--seed", "-3"], "argument --seed"),
        (["train", "--out", "x.pt", "--lr", "inf"], "argument --lr"),
    ],
)
def test_bad_numbers_are_refused_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path, capsys):
    path = _bad_checkpoints(tmp_path)[0]
    with pytest.raises(ValueError, match="not a crvae_ext checkpoint"):
        cli.main(["certify", str(path), "--data", "digits", "--debug"])
    with pytest.raises(ValueError, match="not a crvae_ext checkpoint"):
        cli.main(["--debug", "certify", str(path), "--data", "digits"])


def test_an_internal_defect_is_one_line_exit_1(monkeypatch, capsys):
    def broken(args):
        raise KeyError("oops")

    monkeypatch.setattr(cli, "_info", broken)
    code, _, err = _run(["info"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "internal error: KeyError" in err and "--debug" in err


SMALL = ["--data", "digits", "--hidden", "16", "16", "--latent", "3", "--batch-size", "64",
         "--no-progress"]  # fmt: skip


@pytest.mark.parametrize("model", ["lipschitz", "standard"])
def test_every_checkpoint_the_cli_writes_resumes(model, tmp_path, capsys):
    """train 2 epochs, then resume to 3 (the target-mode re-save used to drop the optimizer)."""
    from crvae_ext.checkpoint import load_checkpoint

    first, second = tmp_path / "r2.pt", tmp_path / "r3.pt"
    code, _, err = _run(["train", *SMALL, "--model", model, "--epochs", 2, "--out", first], capsys)
    assert code == 0, err
    saved = load_checkpoint(first)
    assert saved.optimizer is not None and saved.epoch == 2 and len(saved.history) == 2
    if model == "lipschitz":  # the file holds the enforced model, whose check passes
        assert saved.model.verify_target().met
    argv = ["train", "--data", "digits", "--epochs", 3, "--resume", first, "--out", second,
            "--no-progress"]  # fmt: skip
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    resumed = load_checkpoint(second)
    assert resumed.epoch == 3 and resumed.history[:2] == saved.history
    assert resumed.train_config["batch_size"] == 64  # the checkpoint's settings were kept


def test_resume_errors_are_clear(tmp_path, capsys):
    ckpt = tmp_path / "r1.pt"
    assert _run(["train", *SMALL, "--epochs", 1, "--out", ckpt], capsys)[0] == 0
    before = ckpt.read_bytes()
    cases = [
        (["--epochs", 1], ["already trained 1 epochs", "more than 1"]),
        (["--epochs", 3, "--hidden", "8"], ["--hidden cannot be combined with --resume"]),
        (["--epochs", 3, "--lr", "0.5"], ["cannot resume with different settings", "lr"]),
    ]
    for extra, needles in cases:
        argv = ["train", "--data", "digits", "--resume", ckpt, "--out", ckpt, *extra]
        code, _, err = _run(argv, capsys)
        _assert_one_line_error(code, err, *needles)
    assert ckpt.read_bytes() == before  # nothing was overwritten


def test_batch_larger_than_the_data_is_an_error_before_training(tmp_path, capsys):
    out = tmp_path / "m.pt"
    argv = ["train", "--data", "digits", "--batch-size", "5000", "--epochs", 1, "--out", out]
    code, stdout, err = _run(argv, capsys)
    _assert_one_line_error(code, err, "batch_size=5000 is larger than the 1438 training examples")
    assert not out.exists() and "-ELBO" not in stdout


@pytest.mark.slow
def test_certify_a_whole_split_with_two_processes_matches_one(tmp_path, capsys):
    """crvae certify under torchrun: each process certifies its share, rank 0 writes them all,
    in the split's order, equal to a one-process run; CSV and JSON agree."""
    import csv
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    ckpt = tmp_path / "m.pt"
    assert _run(["train", *SMALL, "--epochs", 1, "--out", ckpt], capsys)[0] == 0
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    argv = ["certify", ckpt, "--data", "digits", "--no-progress", "--csv", tmp_path / "one.csv"]
    assert _run([*argv, "--json", one], capsys)[0] == 0
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "crvae_ext.app.cli", "certify", str(ckpt), "--data", "digits", "--no-progress",
           "--json", str(two)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert len(a["radius"]) == len(b["radius"]) == 359 and a["winner"] == b["winner"]
    # the same inputs in other batches and threads: fp32 GEMM rounding only
    assert b["radius"] == pytest.approx(a["radius"], rel=1e-6)
    with (tmp_path / "one.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["radius"]) for r in rows] == a["radius"]
    assert [int(r["index"]) for r in rows] == list(range(359))


def test_train_and_certify_a_conv_vae(tmp_path, capsys):
    from crvae_ext import ConvLipschitzVAE
    from crvae_ext.checkpoint import load_checkpoint

    ckpt = tmp_path / "conv.pt"
    argv = ["train", "--data", "digits", "--arch", "conv", "--channels", 4, 8, "--latent", 3,
            "--batch-size", 64, "--epochs", 1, "--out", ckpt, "--no-progress"]  # fmt: skip
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert "(met)" in out
    saved = load_checkpoint(ckpt)
    assert type(saved.model) is ConvLipschitzVAE and saved.model.verify_target().met
    code, out, err = _run(["certify", ckpt, "--data", "digits", "--n", 32, "--no-progress"],
                          capsys)  # fmt: skip
    assert code == 0, err
    resumed = tmp_path / "conv2.pt"
    argv = ["train", "--data", "digits", "--resume", ckpt, "--epochs", 2, "--out", resumed,
            "--no-progress"]  # fmt: skip
    assert _run(argv, capsys)[0] == 0
    assert load_checkpoint(resumed).epoch == 2


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--arch", "conv", "--hidden", "16"], "--hidden cannot be combined with --arch conv"),
        (["--channels", "4", "8"], "--channels cannot be combined with --arch mlp"),
        (["--arch", "conv", "--model", "standard"], "--model standard cannot be combined"),
        (["--arch", "conv", "--method", "bjorck"], "--method bjorck cannot be combined"),
        (["--arch", "conv", "--channels", "3", "8"], "group_size=2 must divide"),
    ],
)
def test_conv_flags_are_checked(extra, needle, tmp_path, capsys):
    argv = ["train", "--data", "digits", "--epochs", 1, "--out", tmp_path / "m.pt", *extra]
    code, _, err = _run(argv, capsys)
    _assert_one_line_error(code, err, needle)
    assert not (tmp_path / "m.pt").exists()

"""The crvae command line end to end: demo, train -> certify -> attack, and bad arguments."""

import json

import pytest

from crvae_ext import LipLinear, LipschitzVAE, a_priori_radius
from crvae_ext.app import cli
from crvae_ext.checkpoint import load_checkpoint

pytest.importorskip("sklearn")


@pytest.mark.slow
def test_demo_fast_reports_zero_violations(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlxtend")
    pytest.importorskip("matplotlib")
    enforce = LipschitzVAE.enforce_target

    def enforce_and_shrink(model):
        """Make enforcing visible: it rescales the decoder's last layer (still meets the target)."""
        check = enforce(model)
        last = [m for m in model.decoder.modules() if isinstance(m, LipLinear)][-1]
        last.lipschitz = last.lipschitz * 0.9
        return check

    monkeypatch.setattr(LipschitzVAE, "enforce_target", enforce_and_shrink)
    argv = ["demo", "--fast", "--arch", "conv", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "violations (certified radius above the empirical margin): 0" in out
    assert "5,000-image MNIST" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert {m["violations"] for m in report["models"].values()} == {0}
    lip = report["models"]["Lipschitz VAE"]
    assert lip["a_priori_radius"] >= 0.1 and lip["certified_fast_median"] >= lip["a_priori_radius"]
    conv = report["models"]["conv Lipschitz VAE"]  # --arch conv: the conv VAE, same target
    assert conv["a_priori_radius"] >= 0.1
    assert conv["certified_fast_median"] >= conv["a_priori_radius"]
    assert "| conv Lipschitz VAE |" in out
    for name in ("reconstructions", "robustness_vs_attack", "certified_vs_margin"):
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # what is saved is what is reported (it was saved before enforce_target), and resumable
    saved = load_checkpoint(tmp_path / "lipschitz.pt").model
    assert list(saved.lipschitz_constants()) == lip["constants"]
    assert a_priori_radius(saved, 8.0, 0.5) == lip["a_priori_radius"]
    assert saved.verify_target().met
    conv_saved = load_checkpoint(tmp_path / "conv.pt").model
    assert list(conv_saved.lipschitz_constants()) == conv["constants"]
    assert conv_saved.verify_target().met
    for name in ("lipschitz", "conv", "standard"):
        out = tmp_path / f"{name}_3.pt"
        argv = ["train", "--resume", str(tmp_path / f"{name}.pt"), "--epochs", "3", "--out",
                str(out), "--no-progress"]  # fmt: skip
        assert cli.main(argv) == 0, capsys.readouterr().err
        assert load_checkpoint(out).epoch == 3


def test_train_certify_attack_round_trip(tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    args = [
        "train",
        "--data",
        "digits",
        "--epochs",
        "1",
        "--hidden",
        "16",
        "16",
        "--latent",
        "3",
        "--batch-size",
        "64",
        "--out",
        str(ckpt),
        "--no-progress",
    ]
    assert cli.main(args) == 0
    assert "a-priori radius" in capsys.readouterr().out
    radii = tmp_path / "radii.json"
    args = ["certify", str(ckpt), "--data", "digits", "--n", "20", "--json", str(radii)]
    assert cli.main(args) == 0
    saved = json.loads(radii.read_text())
    assert len(saved["radius"]) == 20 and min(saved["radius"]) >= 0.1
    assert (
        cli.main(
            [
                "attack",
                str(ckpt),
                "--data",
                "digits",
                "--n",
                "4",
                "--radius",
                "0.5",
                "--steps",
                "5",
                "--kind",
                "latent",
            ]
        )
        == 0
    )
    assert "latent-space attack" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--data", "cifar", "--out", "x.pt"], "invalid choice: 'cifar'"),
        (["train", "--out", "x.pt", "--p", "1.5"], "must lie in (0, 1)"),
        (["train", "--out", "x.pt", "--lipschitz", "1", "2"], "expected 3 arguments"),
        (["attack", "m.pt", "--radius", "-1"], "must be a finite number > 0"),
        (["certify", "m.pt", "--n", "zero"], "expected a int"),
        (["train", "--data", "digits"], "the following arguments are required: --out"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["certify", str(tmp_path / "none.pt"), "--data", "digits"]) == 2
    assert "crvae certify: error: no checkpoint at" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_fast_writes_the_table(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    pytest.importorskip("matplotlib")
    assert (
        cli.main(["sweep", "--fast", "--lipschitz", "6", "--out", str(tmp_path), "--no-progress"])
        == 0
    )
    text = (tmp_path / "sweep.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 6 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "0.0932"  # the paper's formula at L = 6: certificates.md's worked number
    assert cells[2] == "(1.5, 6, 1.5)"  # exact constants of the paper's architecture
    assert cells[-1] == "0"
    assert "| standard |" in text and (tmp_path / "sweep_radii.png").is_file()

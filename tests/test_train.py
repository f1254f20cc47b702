"""Training: the loss falls, runs are deterministic, checkpoints round-trip, DDP = 1 process."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crvae_ext import StandardVAE
from crvae_ext.checkpoint import load_checkpoint, save_checkpoint
from crvae_ext.data import ImageDataset
from crvae_ext.train import TrainConfig, evaluate_elbo, train

pytest.importorskip("sklearn")
from train_setup import small_data, small_vae

HERE = Path(__file__).resolve().parent


def _config(**kwargs) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 32, "lr": 1e-3, "progress": False, **kwargs})


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor)
    )


def test_training_lowers_the_loss_and_improves_the_elbo():
    model, data = small_vae(), small_data()
    before = evaluate_elbo(model, data)
    history = train(model, data, _config(epochs=4, lr=3e-3))
    assert history[-1] < history[0]
    assert evaluate_elbo(model, data) > before


def test_runs_are_deterministic():
    a, b = small_vae(), small_vae()
    assert train(a, small_data(), _config()) == train(b, small_data(), _config())
    assert _same_state(a, b)


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    whole = small_vae()
    train(whole, small_data(), _config(epochs=2))
    first = small_vae()
    train(first, small_data(), _config(epochs=1, checkpoint=str(tmp_path / "ck.pt")))
    resumed = small_vae()
    train(resumed, small_data(), _config(epochs=2), resume=tmp_path / "ck.pt")
    assert _same_state(whole, resumed)


@pytest.mark.parametrize("kind", ["lipschitz", "standard"])
def test_checkpoint_round_trip(tmp_path, kind):
    model = small_vae() if kind == "lipschitz" else StandardVAE(64, 4, hidden=(16, 16))
    opt = torch.optim.Adam(model.parameters())
    train(model, small_data(), _config(epochs=1))
    save_checkpoint(tmp_path / "m.pt", model, opt, epoch=1, history=[1.5])
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert type(loaded.model) is type(model) and loaded.epoch == 1 and loaded.history == [1.5]
    assert _same_state(model, loaded.model)
    model.eval()
    loaded.model.eval()
    x = small_data().images[:5]
    assert torch.equal(model.encode(x)[0], loaded.model.encode(x)[0])
    assert loaded.model.lipschitz_constants() == model.lipschitz_constants()


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a crvae_ext checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(TypeError, match="cannot checkpoint Linear"):
        save_checkpoint(tmp_path / "x.pt", torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"lr": -1.0}, "lr must be"),
        ({"beta": -0.5}, "beta must be a finite number >= 0"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _config(**kwargs)


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(HERE / "ddp_worker.py"),
        str(tmp_path),
        str(HERE),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    for key, value in ranks[0]["state"].items():
        if isinstance(value, torch.Tensor):  # identical on every rank, power-iteration buffers too
            assert torch.equal(value, ranks[1]["state"][key]), key
    single = small_vae()
    history = train(single, small_data(), _config())
    assert history == pytest.approx(ranks[0]["history"], rel=1e-5)
    for key, value in single.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.allclose(value, ranks[0]["state"][key], atol=1e-5), key


@pytest.mark.parametrize("training", [True, False])
def test_train_restores_the_mode(training):
    model = small_vae()
    model.train(training)
    train(model, small_data(64), _config(epochs=1))
    assert model.training is training


def test_resume_with_other_settings_is_an_error(tmp_path):
    model = small_vae()
    train(model, small_data(64), _config(epochs=1, checkpoint=str(tmp_path / "ck.pt")))
    with pytest.raises(ValueError, match=r"cannot resume with different settings \(lr"):
        train(small_vae(), small_data(64), _config(epochs=2, lr=0.5), resume=tmp_path / "ck.pt")


def test_float64_checkpoint_keeps_its_dtype(tmp_path):
    model = small_vae().double()
    save_checkpoint(tmp_path / "d.pt", model)
    loaded = load_checkpoint(tmp_path / "d.pt").model
    assert next(loaded.parameters()).dtype == torch.float64
    x = small_data(4).images.double()
    model.eval()
    loaded.eval()
    assert torch.equal(model.encode(x)[0], loaded.encode(x)[0])


def test_resuming_another_model_is_a_clear_error(tmp_path):
    standard = StandardVAE(64, 4, hidden=(16, 16))
    train(standard, small_data(64), _config(epochs=1, checkpoint=str(tmp_path / "s.pt")))
    with pytest.raises(ValueError, match=r"holds a StandardVAE .* not this LipschitzVAE") as err:
        train(small_vae(), small_data(64), _config(epochs=2), resume=tmp_path / "s.pt")
    assert "Missing key" not in str(err.value)


def test_resuming_needs_more_epochs_and_an_optimizer(tmp_path):
    model = small_vae()
    train(model, small_data(64), _config(epochs=2, checkpoint=str(tmp_path / "ck.pt")))
    for epochs in (1, 2):
        with pytest.raises(ValueError, match="already trained 2 epochs"):
            train(small_vae(), small_data(64), _config(epochs=epochs), resume=tmp_path / "ck.pt")
    save_checkpoint(tmp_path / "bare.pt", model, epoch=2)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        train(small_vae(), small_data(64), _config(epochs=3), resume=tmp_path / "bare.pt")


def test_batch_larger_than_the_data_trains_nothing(tmp_path):
    model = small_vae()
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match="batch_size=128 is larger than the 100 training"):
        train(model, small_data(100), _config(batch_size=128, checkpoint=str(tmp_path / "c.pt")))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("bad", [2.0, float("nan")])
def test_training_data_is_checked_on_the_host_batch(bad):
    """train() checks each host batch (elbo is then told the data is checked): a pixel
    outside [0, 1] or a NaN stops training with the likelihood's message."""
    data = small_data(64)
    images = data.images.clone()
    images[37, 5] = bad
    model = small_vae()
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    message = "NaN or inf" if bad != bad else r"must lie in \[0, 1\]"
    with pytest.raises(ValueError, match=message):
        train(model, ImageDataset(images, data.labels, data.image_shape, "digits"),
              _config(batch_size=64, epochs=1))  # fmt: skip
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match=message):
        model.elbo(images)


def test_a_changed_model_record_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path / "m.pt", small_vae())
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    state["model"]["config"]["renamed_option"] = 3
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="does not build a LipschitzVAE of this version"):
        load_checkpoint(tmp_path / "m.pt")


def test_the_backend_is_not_part_of_a_checkpoint(tmp_path):
    """A model trained with a forced backend loads anywhere: the backend is the machine's."""
    model = small_vae()
    model.config["backend"] = "torch"
    save_checkpoint(tmp_path / "m.pt", model)
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert "backend" not in state["model"]["config"]
    state["model"]["config"]["backend"] = "triton"  # as an older version saved it on a GPU
    torch.save(state, tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt").model
    assert loaded.config["backend"] is None
    loaded.eval()(small_data(4).images)


def test_a_failed_save_leaves_no_temporary_and_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    model = small_vae()
    save_checkpoint(path, model, epoch=1)
    before = path.read_bytes()

    def interrupted(obj, f, *args, **kwargs):
        with open(f, "wb") if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f) as h:
            h.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, epoch=2)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_a_killed_save_is_cleaned_up_by_the_next(tmp_path):
    """SIGKILL mid-save (nothing runs): the next save replaces the stray temporary."""
    path = tmp_path / "m.pt"
    save_checkpoint(path, small_vae(), epoch=1)
    before = path.read_bytes()
    script = (
        "import os, signal, sys, torch\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from train_setup import small_vae\n"
        "from crvae_ext.checkpoint import save_checkpoint\n"
        "def killed(obj, f, *a, **k):\n"
        "    f = open(f, 'wb') if isinstance(f, (str, os.PathLike)) else f\n"
        "    f.write(b'partial'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = killed\n"
        "save_checkpoint(sys.argv[1], small_vae(), epoch=2)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    done = subprocess.run([sys.executable, "-c", script, str(path), str(HERE)], env=env)
    assert done.returncode == -9
    stray = tmp_path / "m.pt.tmp"
    assert stray.exists() and path.read_bytes() == before
    save_checkpoint(path, small_vae(), epoch=3)
    assert not stray.exists() and load_checkpoint(path).epoch == 3

"""End-to-end pieces: reference model, int8 quantization, the experiment (smoke), the CLI."""

import doctest
import json
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

# TorchScript is deprecated in recent torch but still the format users ship
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
from torch import nn  # noqa: E402

from sigmadecomp.datasets import DatasetNotFoundError, find_fashion_mnist  # noqa: E402
from sigmadecomp_torch import cli, data, models, quantize  # noqa: E402
from sigmadecomp_torch.compress import default_layers  # noqa: E402
from sigmadecomp_torch.models import ResNetSmall, conv3x3_names, count_parameters  # noqa: E402
from _helpers import write_idx  # noqa: E402
from sigmadecomp_torch.quantize import (  # noqa: E402
    load_quantized_state_dict,
    model_size_bytes,
    quantize_weights,
    quantized_state_dict,
)


def _have_fashion():
    try:
        find_fashion_mnist()
        return True
    except DatasetNotFoundError:
        return False


needs_fashion = pytest.mark.skipif(
    not _have_fashion(),
    reason="Fashion-MNIST is not installed: sudo apt-get install dataset-fashion-mnist",
)


@pytest.mark.parametrize("module", [models, data, quantize], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


# --------------------------------------------------------------------- model


def test_reference_model_shape_and_size():
    torch.manual_seed(0)
    model = ResNetSmall().eval()
    assert 200_000 <= count_parameters(model) <= 600_000
    out = model(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    names = conv3x3_names(model, skip_first=False)
    assert names[0] == "stem.0" and len(names) == 7
    assert conv3x3_names(model) == names[1:]
    mods = dict(model.named_modules())
    assert all(mods[n].kernel_size == (3, 3) for n in names)


def test_count_macs_matches_hand_count():
    from sigmadecomp_torch.demo.experiment import count_macs

    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2),
                          nn.Flatten(), nn.Linear(6 * 3 * 3, 5))
    expected = 8 * 8 * 4 * 2 * 9 + 3 * 3 * 6 * 4 * 9 + 54 * 5
    assert count_macs(model, (2, 8, 8)) == expected


# ------------------------------------------------------------------ quantize


def test_quantize_weights_exact_int8_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel, qw = quantize_weights(model, layers=["0", "2"])
    # the input is untouched, the Linear layer was not chosen
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert qw.layers == ["0", "2"]
    assert torch.equal(qmodel[4].weight, model[4].weight)
    for name in ("0", "2"):
        w = dict(model.named_modules())[name].weight.detach()
        wq = dict(qmodel.named_modules())[name].weight.detach()
        codes, scale = qw.int8[name], qw.scales[name]
        assert codes.dtype == torch.int8 and scale.shape == (w.shape[0],)
        # symmetric per-channel: scale = max|w_c| / 127.5, codes use the int8 range
        np.testing.assert_allclose(scale, w.abs().amax(dim=(1, 2, 3)) / 127.5, rtol=1e-6)
        assert torch.equal(wq, codes.float() * scale.view(-1, 1, 1, 1))
        step = scale.view(-1, 1, 1, 1)
        assert bool(((wq - w).abs() <= 0.5 * step + 1e-7).all())
        assert not torch.equal(wq, w)
    # round trip through the compact state dict
    state = quantized_state_dict(qmodel, qw)
    assert state["0.weight"].dtype == torch.int8 and "0.weight_scale" in state
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 2))
    load_quantized_state_dict(fresh, state)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fresh(x), qmodel(x))
    # int8 conv weights take about a quarter of the float bytes
    assert model_size_bytes(state) < model_size_bytes(model)


def test_quantize_weights_tied_weights_once_and_transposed_convs_left_alone():
    torch.manual_seed(0)
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    b.weight = a.weight  # tied
    model = nn.Sequential(a, nn.ReLU(), b, nn.ConvTranspose1d(6, 3, 1))
    qmodel, qw = quantize_weights(model)
    assert qw.layers == ["0", "2"] and qw.int8["2"] is qw.int8["0"]
    assert qmodel[0].weight is qmodel[2].weight  # still tied
    assert torch.equal(qmodel[3].weight, model[3].weight)  # transposed: left in float
    state = quantized_state_dict(qmodel, qw)
    assert state["0.weight"] is state["2.weight"]  # one set of codes, saved once
    twice = dict(state, **{"2.weight": state["2.weight"].clone()})
    assert model_size_bytes(twice) >= model_size_bytes(state) + 6 * 6  # saved once
    fresh = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ConvTranspose1d(6, 3, 1))
    load_quantized_state_dict(fresh, state)
    x = torch.randn(2, 6)
    torch.testing.assert_close(fresh[:3](x), qmodel[:3](x))
    with pytest.raises(TypeError, match="model_or_state of type int"):
        model_size_bytes(3)


def test_quantize_weights_bad_layer():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.raises(ValueError, match="'9'.*not a module"):
        quantize_weights(model, layers=["9"])
    with pytest.raises(ValueError, match="'1'.*no Conv or Linear"):
        quantize_weights(model, layers=["1"])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        quantize_weights("model")


# ---------------------------------------------------------------- experiment


@needs_fashion
def test_committed_weights_and_record():
    from sigmadecomp_torch.demo.reference import (
        INFO_FILE,
        WEIGHTS_FILE,
        load_reference,
        reference_info,
    )

    if not os.path.exists(WEIGHTS_FILE):
        pytest.fail(f"{WEIGHTS_FILE} is missing")

    assert os.path.getsize(WEIGHTS_FILE) < 5 * 2**20
    info = reference_info(INFO_FILE)
    model = load_reference()
    assert info["parameters"] == count_parameters(model)
    assert 0.85 <= info["test_accuracy"] <= 1.0
    assert "settings" in info and info["settings"]["seed"] == 0


@needs_fashion
def test_experiment_smoke(tmp_path):
    from sigmadecomp_torch.demo import experiment, report

    cfg = experiment.make_config(
        "quick", calib_images=64, test_images=200, digits_images=64, rx=(3,),
        transfer_rx=(3,), datafree_rx=(), finetune_rx=(3,), finetune_steps=2,
        quant_rx=(3,), budget_rx=(), tt_rx=(), latency_seconds=0.01,
        layers=["layer1.conv2", "layer2.conv2"], options={"n_iter_max": 3},
        convergence_iter=3,
    )
    res = experiment.run(cfg, progress=False, log=lambda *a: None)
    written = report.write_outputs(res, str(tmp_path))
    assert {os.path.basename(p) for p in written} >= {"results.md", "results.json"}
    rows = res["rows"]
    assert {(r["method"], r["variant"]) for r in rows if r["kind"] == "main"} == {
        (m, v) for m in ("tucker2", "cp") for v in ("frobenius", "sigma", "sigma-centered")}
    assert {r["kind"] for r in rows} == {"main", "finetune", "transfer", "quant", "sequential",
                                         "seqbudget"}
    for r in rows:
        assert isinstance(r["accuracy"], float) and 0.0 <= r["accuracy"] <= 1.0
        assert r["params"] < res["reference"]["params"]
        assert math.isfinite(r["decomposition_seconds"])
    assert 0.0 <= res["reference"]["accuracy"] <= 1.0
    assert res["reference"]["test_images"] == 200
    # shapes: original + one per (method, rX); latency measured, MACs reduced
    assert set(res["shapes"]) == {"original", "tucker2@3", "cp@3"}
    for key, sh in res["shapes"].items():
        assert sh["latency_b1_ms"] > 0 and sh["latency_b64_ms"] > 0
        if key != "original":
            assert sh["macs"] < res["shapes"]["original"]["macs"]
    q = next(r for r in rows if r["kind"] == "quant")
    assert q["size_bytes"] < q["size_bytes_float"]
    # outputs
    md = (tmp_path / "results.md").read_text()
    assert "| method | variant | rX=3 |" in md
    assert "| tucker2 | Sigma |" in md and "| cp | Frobenius + fine-tune |" in md
    for line in md.splitlines():
        if line.startswith("| tucker2 | ") or line.startswith("| cp | "):
            cell = line.split("|")[3].strip()
            assert 0.0 <= float(cell) <= 100.0
    loaded = json.loads((tmp_path / "results.json").read_text())
    assert len(loaded["rows"]) == len(rows) and loaded["findings"]
    # findings: stated with their figures, no pass/fail wording
    assert "## Findings" in md and "MISSED" not in md
    assert "Sigma above Frobenius" in md and "true at " in md
    for name in ("accuracy_vs_rx_tucker2.png", "accuracy_vs_rx_cp.png",
                 "results_als_convergence.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_experiment_config_errors():
    from sigmadecomp_torch.demo import experiment

    with pytest.raises(ValueError, match="mode='huge'"):
        experiment.make_config("huge")
    with pytest.raises(ValueError, match="unknown settings"):
        experiment.make_config("quick", epochs=3)


# ----------------------------------------------------------------------- CLI


def test_cli_help_explains_every_option(capsys):
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(subparsers.choices) == {"demo", "compress"}
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"{name}: option {action.option_strings or action.dest} has no help"
        with pytest.raises(SystemExit) as info:
            cli.main([name, "--help"])
        assert info.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--full", "--data", "--method", "--ratio", "--transfer-stats", "--out",
                "--budget", "--centered"):
        assert opt in out


def test_cli_compress_idx_data(tmp_path, small_model_file, capsys):
    path, model = small_model_file
    rng = np.random.default_rng(0)
    ddir = tmp_path / "data"
    ddir.mkdir()
    write_idx(ddir / "train-images-idx3-ubyte", rng.integers(0, 256, (24, 28, 28)))
    out = tmp_path / "out" / "small.pt"
    stats_file = tmp_path / "stats.pt"
    code = cli.main(["compress", str(path), "--data", str(ddir), "--method", "tucker2",
                     "--ratio", "2", "--out", str(out), "--calib-images", "16", "--no-progress",
                     "--n-iter", "3", "--save-stats", str(stats_file), "--centered",
                     "--torchscript"])
    assert code == 0
    text = capsys.readouterr().out
    assert "calibration: 16 images of shape (1, 28, 28)" in text and "rX" in text
    small = torch.load(out, weights_only=False)
    report = json.loads((tmp_path / "out" / "small.report.json").read_text())
    assert [r["name"] for r in report["layers"]] == default_layers(model)  # the library default
    assert report["weighted"] and report["centered"]
    assert report["totals"]["params_after"] < report["totals"]["params_before"]
    assert (tmp_path / "out" / "small.report.txt").read_text().startswith("--method tucker2 (Sigma")
    assert (tmp_path / "out" / "small.report.png").read_bytes()[:4] == b"\x89PNG"
    x = torch.rand(2, 1, 28, 28)
    assert small(x).shape == (2, 10)
    scripted = torch.jit.load(str(tmp_path / "out" / "small.torchscript.pt"))
    torch.testing.assert_close(scripted(x), small(x))
    # reuse the saved statistics (the transfer path), CP this time
    out2 = tmp_path / "cp.pt"
    assert cli.main(["compress", str(path), "--transfer-stats", str(stats_file), "--method", "cp",
                     "--ratio", "2", "--out", str(out2), "--no-progress", "--n-iter", "2"]) == 0
    assert json.loads((tmp_path / "cp.report.json").read_text())["method"] == "cp"
    # and Tensor-Train from the same statistics
    out3 = tmp_path / "tt.pt"
    assert cli.main(["compress", str(path), "--transfer-stats", str(stats_file), "--method", "tt",
                     "--ratio", "2", "--out", str(out3), "--no-progress", "--n-iter", "2"]) == 0
    tt_report = json.loads((tmp_path / "tt.report.json").read_text())
    assert tt_report["method"] == "tt"
    assert tt_report["totals"]["params_after"] < tt_report["totals"]["params_before"]


def test_cli_compress_image_folder_frobenius(tmp_path, small_model_file):
    from _helpers import write_png_folder

    path, _ = small_model_file
    folder = write_png_folder(tmp_path / "imgs", 4, (32, 30, 3), seed=1)
    out = tmp_path / "svd.pt"
    assert cli.main(["compress", str(path), "--data", str(folder), "--method", "svd",
                     "--ratio", "2", "--out", str(out), "--image-size", "28",
                     "--no-progress", "--layers", "layer3.conv2"]) == 0
    report = json.loads((tmp_path / "svd.report.json").read_text())
    assert [r["name"] for r in report["layers"]] == ["layer3.conv2"] and report["weighted"]
    assert cli.main(["compress", str(path), "--method", "tucker2", "--ratio", "2", "--frobenius",
                     "--out", str(out), "--no-progress", "--n-iter", "2"]) == 0
    assert not json.loads((tmp_path / "svd.report.json").read_text())["weighted"]


def test_cli_compress_errors(tmp_path, small_model_file):
    path, model = small_model_file
    out = str(tmp_path / "o.pt")
    with pytest.raises(SystemExit, match="--data DIR"):
        cli.main(["compress", str(path), "--method", "tucker2", "--ratio", "2", "--out", out])
    sd = tmp_path / "sd.pt"
    torch.save(model.state_dict(), sd)
    with pytest.raises(SystemExit, match="state_dict"):
        cli.main(["compress", str(sd), "--method", "tucker2", "--frobenius", "--ratio", "2",
                  "--out", out])
    ts = tmp_path / "ts.pt"
    torch.jit.script(model).save(str(ts))
    with pytest.raises(SystemExit, match="TorchScript"):
        cli.main(["compress", str(ts), "--method", "tucker2", "--frobenius", "--ratio", "2",
                  "--out", out])
    with pytest.raises(SystemExit, match="ratio"):
        cli.main(["compress", str(path), "--method", "tucker2", "--frobenius", "--ratio", "0.5",
                  "--out", out])
    with pytest.raises(SystemExit) as info:
        cli.main(["compress", str(path), "--method", "qr", "--out", out])
    assert info.value.code == 2  # argparse: invalid choice


def test_cli_demo_without_dataset_prints_install_command(monkeypatch, capsys):
    import sigmadecomp.datasets as ds
    import sigmadecomp_torch.demo as demo

    def missing(directory=None):
        raise DatasetNotFoundError("not here")

    monkeypatch.setattr(ds, "find_fashion_mnist", missing)
    # no subprocess may run: the library never installs anything itself
    import subprocess

    def no_subprocess(*a, **k):
        raise AssertionError("the demo must not run a command")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    assert cli.main(["demo", "--quick"]) == demo.EXIT_NO_DATA == 3
    err = capsys.readouterr().err
    assert "    sudo apt-get install dataset-fashion-mnist\n" in err

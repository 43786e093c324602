"""The ``sigmadecomp`` command: help, user errors as one line, choices said out loud."""

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_without_torch(code):
    """Run ``code`` in a fresh interpreter where ``import torch`` fails, as in a core-only install."""
    shim = "import sys; sys.modules['torch'] = None\n"
    return subprocess.run([sys.executable, "-c", shim + code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


# --------------------------------------------------------- without torch


def test_help_works_without_torch_and_does_not_import_it():
    proc = _run_without_torch("from sigmadecomp_torch.cli import main\nmain(['--help'])")
    assert proc.returncode == 0, proc.stderr
    assert "usage: sigmadecomp" in proc.stdout and "Tensor-Train" in proc.stdout
    proc = _run_without_torch("from sigmadecomp_torch.cli import main\nmain(['compress', '--help'])")
    assert proc.returncode == 0, proc.stderr
    assert "--method" in proc.stdout


def test_compress_without_torch_is_one_line_with_the_fix():
    proc = _run_without_torch(
        "from sigmadecomp_torch.cli import main\n"
        "main(['compress', 'm.pt', '--method', 'cp', '--frobenius', '--out', 'o.pt'])")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "sigmadecomp compress: error: the sigmadecomp command needs PyTorch: pip install "
        "'sigmadecomp[torch]' (or pip install torch first, e.g. the CPU build)"]


def test_demo_without_torch_is_one_line(tmp_path):
    # the data check passes (an empty fake directory), then the experiment needs torch
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(b"")
    proc = _run_without_torch(
        f"import os; os.environ['SIGMADECOMP_FASHION_MNIST'] = {str(tmp_path)!r}\n"
        "from sigmadecomp_torch.cli import main\n"
        f"main(['demo', '--quick', '--out-dir', {str(tmp_path / 'out')!r}])")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "pip install 'sigmadecomp[torch]'" in proc.stderr


# ------------------------------------------------------------- help text

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sigmadecomp_torch import cli  # noqa: E402
from _helpers import write_idx  # noqa: E402
from _torch_models import WithUnusedConv  # noqa: E402


def _help(*argv):
    with pytest.raises(SystemExit) as info:
        cli.main(list(argv) + ["--help"])
    assert info.value.code == 0


def test_help_states_defaults_once_and_methods(capsys):
    _help()
    top = capsys.readouterr().out
    assert "Tensor-Train" in top
    _help("demo")
    demo = capsys.readouterr().out
    assert "Tensor-Train" in demo and "new" in demo and "minute" in demo
    # both ways to provide the data: the Debian package and the directory variable
    flat = " ".join(demo.split()).replace("- ", "-")
    assert "dataset-fashion-mnist" in flat and "SIGMADECOMP_FASHION_MNIST" in flat
    _help("compress")
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and ") (default:" not in text
    opts = text[text.index("options:"):]
    method_help = opts[opts.index("--method {"):opts.index("--ratio RX")]
    assert "required" in method_help and "default" not in method_help
    assert "EVBMF" in text and "weights_only=False" in text


def test_package_exports_stay_functions_after_submodule_import():
    import sigmadecomp_torch
    import sigmadecomp_torch.compress  # noqa: F401  (the submodule of the same name)

    from sigmadecomp_torch import compress

    assert inspect.isfunction(compress) and inspect.isfunction(sigmadecomp_torch.compress)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sigmadecomp_torch.nope  # noqa: B018


# ------------------------------------------------------------ user errors


@pytest.fixture
def model_file(small_model_file):
    return str(small_model_file[0])


@pytest.fixture
def idx_dir(tmp_path):
    d = tmp_path / "idx"
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte",
               np.random.default_rng(0).integers(0, 256, (12, 28, 28)))
    return str(d)


@pytest.fixture
def shown_warnings():
    """Warnings shown as by a plain ``python``, whatever ``-W`` pytest runs with."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        yield


def _error(argv, status=2):
    """The one-line message of the SystemExit a command raises, whose exit status must be
    ``status``: 2 for a refused command line (as argparse's usage errors), 1 for a run
    that failed (a missing file, a model that fails, an error of the compression)."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    code = info.value.code  # (a message as the code: Python prints it, exit status 1)
    assert (1 if isinstance(code, str) else code) == status, code
    msg = str(info.value)
    assert msg.startswith("sigmadecomp ") and "\n" not in msg.strip()
    return msg


def _compress(model_file, tmp_path, *extra):
    return ["compress", model_file, "--method", "tucker2", "--out", str(tmp_path / "o.pt"),
            "--no-progress", "--n-iter", "2", *extra]


def test_wrong_data_path(model_file, tmp_path):
    msg = _error(_compress(model_file, tmp_path, "--ratio", "2", "--data", str(tmp_path / "nope")),
                 status=1)  # (a missing file: the run fails)
    assert msg.startswith("sigmadecomp compress: error: --data=")
    assert "does not exist" in msg and "folder of images" in msg


def test_folder_without_images(model_file, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    msg = _error(_compress(model_file, tmp_path, "--ratio", "2", "--data", str(empty)), status=1)
    assert "no image files" in msg and "--data=" in msg


def test_channels_that_do_not_match_the_model(model_file, tmp_path, idx_dir):
    msg = _error(_compress(model_file, tmp_path, "--ratio", "2", "--data", idx_dir,
                           "--channels", "3"))
    assert "--channels 3 does not match" in msg and "takes 1 channel;" in msg
    assert "--channels 1" in msg


def test_images_the_model_cannot_take(tmp_path, idx_dir):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(),
                          nn.Linear(4 * 10 * 10, 3))  # made for 14 x 14 inputs
    path = tmp_path / "fixed.pt"
    torch.save(model, path)
    msg = _error(_compress(str(path), tmp_path, "--ratio", "2", "--data", idx_dir,
                           "--include-first"), status=1)
    assert "failed on the calibration images of shape (1, 28, 28)" in msg
    assert "--image-size" in msg


def test_model_class_from_main_gets_the_hint(tmp_path):
    main_module = sys.modules["__main__"]

    class MyNet(nn.Sequential):
        pass

    MyNet.__module__, MyNet.__qualname__ = "__main__", "MyNet"
    main_module.MyNet = MyNet  # as if defined in the script that saved it
    try:
        torch.save(MyNet(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3)), tmp_path / "mine.pt")
    finally:
        del main_module.MyNet
    msg = _error(_compress(str(tmp_path / "mine.pt"), tmp_path, "--frobenius", "--ratio", "2"),
                 status=1)
    assert "Can't get attribute 'MyNet'" in msg
    assert "move the class into a module" in msg and "PYTHONPATH" in msg


def test_model_class_from_a_missing_module_gets_the_hint(tmp_path, monkeypatch):
    (tmp_path / "netmod_for_cli_test.py").write_text(
        "from torch import nn\nclass Net(nn.Sequential):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import netmod_for_cli_test

    torch.save(netmod_for_cli_test.Net(nn.Conv2d(1, 2, 3)), tmp_path / "net.pt")
    monkeypatch.delitem(sys.modules, "netmod_for_cli_test")
    sys.path.remove(str(tmp_path))
    msg = _error(_compress(str(tmp_path / "net.pt"), tmp_path, "--frobenius", "--ratio", "2"),
                 status=1)
    assert "No module named 'netmod_for_cli_test'" in msg and "PYTHONPATH" in msg


def test_model_path_that_is_not_a_file(tmp_path):
    msg = _error(_compress(str(tmp_path / "missing.pt"), tmp_path, "--frobenius", "--ratio", "2"),
                 status=1)
    assert "MODEL=" in msg and "is not a file" in msg


# ---------------------------------------------------------- said out loud


def test_budget_that_is_neither_count_nor_fraction(model_file, tmp_path):
    msg = _error(_compress(model_file, tmp_path, "--frobenius", "--budget", "1.5"))
    assert "--budget=1.5 is not allowed" in msg and "whole count of weight parameters" in msg


def test_ratio_not_above_one(model_file, tmp_path):
    msg = _error(_compress(model_file, tmp_path, "--frobenius", "--ratio", "1"))
    assert "--ratio=1 is not allowed" in msg and "> 1" in msg


def test_unreachable_ratio_warns_and_reachable_one_does_not(model_file, tmp_path, capsys):
    assert cli.main(_compress(model_file, tmp_path, "--frobenius", "--ratio", "1000")) == 0
    out, err = capsys.readouterr()
    assert "ranks: per-layer ratio rX = 1000 (--ratio)" in out
    assert "warning: --ratio 1000 cannot be met by 9 of 9 layers" in err
    reached = json.loads((tmp_path / "o.report.json").read_text())["totals"]["layer_ratio"]
    assert f"reach rX = {reached:.1f}" in err and reached < 1000
    assert cli.main(_compress(model_file, tmp_path, "--frobenius", "--ratio", "2")) == 0
    out, err = capsys.readouterr()
    assert "cannot be met" not in err


def test_default_ranks_and_layers_are_announced(model_file, tmp_path, capsys):
    assert cli.main(_compress(model_file, tmp_path, "--frobenius")) == 0
    out = capsys.readouterr().out
    assert "ranks: EVBMF" in out and "--ratio" in out
    assert "Conv2d/Linear layers (layer1.conv1," in out
    assert "the first and the last layer left alone" in out
    assert "weights_only=False" in out


def test_normalize_takes_one_mean_and_std_or_one_per_channel():
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(cli._normalize(x, "0.5,0.25"), (x - 0.5) / 0.25)
    mean, std = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 1.0, 2.0])
    torch.testing.assert_close(cli._normalize(x, "0.1,0.2,0.3,0.5,1,2"),
                               (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    with pytest.raises(cli.UserError, match=r"3 channels, so 2 or 6 values"):
        cli._normalize(x, "0.1,0.2,0.5,1")
    with pytest.raises(cli.UserError, match="must be > 0"):
        cli._normalize(x, "0.5,0")


def test_tt_needs_a_size_before_any_image_is_read(model_file, tmp_path):
    msg = _error(["compress", model_file, "--method", "tt", "--out", str(tmp_path / "o.pt"),
                  "--data", str(tmp_path / "not-read")])
    assert "--method tt needs --ratio:" in msg
    msg = _error(["compress", model_file, "--method", "tt", "--budget", "0.5", "--out",
                  str(tmp_path / "o.pt"), "--data", str(tmp_path / "not-read")])
    assert "--budget is not available with --method tt" in msg and "--ratio RX" in msg


@pytest.mark.parametrize("option,value", [("--batch-size", "0"), ("--threads", "-1"),
                                          ("--threads", "0"), ("--calib-images", "0"),
                                          ("--image-size", "0"), ("--batch-size", "x"),
                                          ("--n-iter", "-1"), ("--n-iter", "0"),
                                          ("--seed", "-1"),
                                          ("--latency-batch", "0")])
def test_counts_must_be_positive_integers(model_file, tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as info:
        cli.main(_compress(model_file, tmp_path, "--frobenius", "--ratio", "2", option, value))
    assert info.value.code == 2  # argparse's usage error: one line naming the option
    err = capsys.readouterr().err
    assert f"argument {option}: " in err and "Traceback" not in err


def test_demo_threads_must_be_positive(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--quick", "--threads", "-1"])
    assert info.value.code == 2 and "argument --threads: -1 is not allowed" in capsys.readouterr().err


def test_image_size_on_idx_data_is_refused_before_reading_them(model_file, tmp_path, idx_dir,
                                                               monkeypatch):
    import importlib

    def unread(*args, **kw):
        raise AssertionError("the images were read")

    monkeypatch.setattr(importlib.import_module("sigmadecomp_torch.data"), "load_images", unread)
    for data in (idx_dir, os.path.join(idx_dir, "train-images-idx3-ubyte")):  # a folder, a file
        msg = _error(_compress(model_file, tmp_path, "--ratio", "2", "--data", data,
                               "--image-size", "32", "--calib-images", "8"))
        assert f"--image-size resizes the images of a folder; --data={data!r} holds IDX data" in msg
        assert "leave --image-size out" in msg


def test_normalize_on_one_channel_names_the_two_values():
    with pytest.raises(cli.UserError, match=r"MEAN,STD \(2 values\) for these 1-channel"):
        cli._normalize(torch.rand(2, 1, 4, 4), "0.1,0.2,0.5,1")


def test_budget_fraction_is_announced(model_file, tmp_path, capsys):
    assert cli.main(_compress(model_file, tmp_path, "--frobenius", "--budget", "0.5")) == 0
    assert "keep 0.5 of their weight parameters (--budget)" in capsys.readouterr().out


def test_unknown_layer_name(model_file, tmp_path):
    msg = _error(_compress(model_file, tmp_path, "--frobenius", "--ratio", "2",
                           "--layers", "layer1.conv1,nope"))
    assert "--layers=" in msg and "nope not in the model" in msg
    msg = _error(_compress(model_file, tmp_path, "--frobenius", "--ratio", "2", "--layers", ","))
    assert "--layers=',' names no module; give comma-separated module names" in msg


def test_sequential_and_refit(model_file, tmp_path, idx_dir, capsys, shown_warnings):
    argv = _compress(model_file, tmp_path, "--ratio", "2", "--data", idx_dir, "--sequential",
                     "--refit", "all")
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert [r["name"] for r in report["refitted"]] == ["fc"]  # every other layer compressed
    assert all(r["output_error"] is not None for r in report["layers"])  # sequential rows
    out, err = capsys.readouterr()
    assert "refitted fc (Linear, dense)" in out
    # 12 images: few rows for the refitted classifier, too
    assert "warning: layer 'fc' is refitted from " in err and "out of --refit)" in err
    # one-shot compression, then the refit of the named layer
    assert cli.main(_compress(model_file, tmp_path, "--ratio", "2", "--data", idx_dir,
                              "--refit", "fc")) == 0
    assert "warning: layer 'fc' is refitted from " in capsys.readouterr().err
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert [r["name"] for r in report["refitted"]] == ["fc"]
    assert all("output_error" not in r for r in report["layers"])


def test_sequential_and_refit_errors(model_file, tmp_path, idx_dir):
    msg = _error(_compress(model_file, tmp_path, "--ratio", "2", "--refit", "all",
                           "--frobenius"))
    assert "--refit needs calibration images" in msg
    msg = _error(_compress(model_file, tmp_path, "--ratio", "2", "--sequential", "--data",
                           idx_dir, "--save-stats", str(tmp_path / "s.pt")))
    assert "--sequential cannot be combined with --save-stats" in msg
    msg = _error(_compress(model_file, tmp_path, "--ratio", "2", "--data", idx_dir,
                           "--refit", "nope"))
    assert "refit contains 'nope'" in msg
    msg = _error(_compress(model_file, tmp_path, "--ratio", "2", "--data", idx_dir,
                           "--refit", ","))
    assert "--refit=',' names no layer" in msg


# ------------------------------------------------------------------ demo


def test_demo_writes_to_a_fresh_folder_by_default(tmp_path, monkeypatch, capsys):
    import sigmadecomp.datasets as ds
    from sigmadecomp_torch.demo import experiment, report

    seen = {}
    monkeypatch.setattr(ds, "find_fashion_mnist", lambda directory=None: tmp_path)
    monkeypatch.setattr(experiment, "run", lambda cfg, progress=True: {"seconds": 0.0,
                                                                      "mode": cfg["mode"]})
    monkeypatch.setattr(report, "write_outputs",
                        lambda results, out_dir: seen.setdefault("out", out_dir) and [out_dir])
    monkeypatch.setattr(report, "print_summary", lambda results: None)
    monkeypatch.chdir(tmp_path)
    os.mkdir("notes")
    assert cli.main(["demo", "--quick", "--no-progress"]) == 0
    out = seen["out"]
    assert os.path.dirname(out) == "." and os.path.basename(out).startswith("sigmadecomp-demo-")
    assert not os.path.exists(out)  # write_outputs (stubbed here) creates it
    assert os.listdir("notes") == []
    assert f"results go to {os.path.abspath(out)}" in capsys.readouterr().out


def test_accuracy_plot_labels_every_rx_and_tells_variants_apart():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sigmadecomp_torch.demo.report import accuracy_figure

    rows = [{"method": "cp", "variant": v, "rx_target": rx, "accuracy": 0.8}
            for v in ("frobenius", "frobenius+ft", "sigma") for rx in (2, 3, 4, 6, 8)]
    fig = accuracy_figure({"rows": rows, "reference": {"accuracy": 0.9}}, "cp")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "3", "4", "6", "8"]
    markers = {line.get_label(): line.get_marker() for line in ax.get_lines()}
    assert markers["Frobenius"] != markers["Frobenius + fine-tune"]
    assert len({markers[k] for k in ("Frobenius", "Frobenius + fine-tune", "Sigma")}) == 3
    plt.close(fig)


def test_findings_state_each_comparison_with_its_figures():
    from sigmadecomp_torch.demo.experiment import findings
    from sigmadecomp_torch.demo.report import findings_text

    acc = {("main", "frobenius"): 0.80, ("main", "sigma"): 0.90, ("main", "sigma-centered"): 0.89,
           ("finetune", "frobenius+ft"): 0.88, ("transfer", "transfer:sigma"): 0.84}
    rows = [{"kind": k, "method": "cp", "variant": v, "rx_target": 3, "accuracy": a}
            for (k, v), a in acc.items()]
    results = {"rows": rows, "reference": {"accuracy": 0.905},
               "config": {"methods": ["cp"], "rx": [3]}}
    found = {f["question"]: f for f in findings(results)}
    assert set(found) == {"sigma_vs_frobenius", "sigma_vs_original", "sigma_vs_finetuned",
                          "centered_vs_sigma", "transfer_keeps_gain"}
    assert found["sigma_vs_frobenius"]["holds"] and found["sigma_vs_original"]["holds"]
    assert not found["centered_vs_sigma"]["holds"]
    assert found["centered_vs_sigma"]["difference"] == pytest.approx(-0.01)
    assert not found["transfer_keeps_gain"]["holds"]  # 0.04 of a 0.10 gain: 40% kept
    assert found["transfer_keeps_gain"]["note"] == "40% of the gain kept"
    text = findings_text(dict(results, findings=list(found.values())))
    assert "MISSED" not in text
    assert "- cp rX=3: Sigma centered 89.00, Sigma 90.00 (-1.00)" in text
    assert "**Centered Sigma + bias correction at least plain Sigma**: true at 0 of 1" in text
    assert "never raises it at the optimum" in text


class _HeadRegisteredFirst(nn.Module):
    """Registered head, stem, body; run stem, body, head."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 3)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.head(torch.relu(self.body(torch.relu(self.stem(x)))).mean((2, 3)))


@pytest.mark.parametrize("build, expected", [
    (_HeadRegisteredFirst, ["layers: 1 Conv2d/Linear layers (body)"]),
    (lambda: WithUnusedConv(1, 4, 3),
     ["left alone: unused (never ran in the forward pass",
      "layers: 2 Conv2d/Linear layers (body, tail)"]),
])
def test_default_layers_follow_the_order_the_model_runs(tmp_path, idx_dir, capsys, build,
                                                        expected):
    """First and last as the model runs them; a layer it never runs is left out."""
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save(build().eval(), path)
    argv = ["compress", str(path), "--method", "tucker2", "--out", str(tmp_path / "o.pt"),
            "--no-progress", "--n-iter", "2", "--data", idx_dir, "--ratio", "1.5"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert all(line in out for line in expected)


def test_cp_inner_adaptive_reaches_compress(model_file, tmp_path, idx_dir, monkeypatch):
    import importlib

    seen = []
    mod = importlib.import_module("sigmadecomp_torch.compress")
    real = mod.compress

    def spy(model, method, **kw):
        seen.append((method, kw.get("options")))
        return real(model, method, **kw)

    monkeypatch.setattr(mod, "compress", spy)
    argv = ["compress", model_file, "--method", "cp", "--out", str(tmp_path / "o.pt"),
            "--no-progress", "--n-iter", "2", "--data", idx_dir, "--ratio", "2",
            "--cp-inner", "adaptive"]
    assert cli.main(argv) == 0
    assert seen == [("cp", {"n_iter_max": 2, "inner": {"maxiter": "adaptive"}})]
    msg = _error(["compress", model_file, "--method", "tucker2", "--out", str(tmp_path / "p.pt"),
                  "--ratio", "2", "--data", idx_dir, "--cp-inner", "adaptive"])
    assert "--cp-inner adaptive applies to --method cp, not tucker2" in msg


def test_outputs_are_checked_before_any_work(model_file, tmp_path):
    (tmp_path / "adir").mkdir()
    msg = _error(_compress(model_file, tmp_path, "--frobenius", "--ratio", "2", "--out",
                           str(tmp_path / "adir")))
    assert "--out=" in msg and "is a directory" in msg
    (tmp_path / "afile").write_text("x")
    msg = _error(_compress(model_file, tmp_path, "--frobenius", "--ratio", "2", "--out",
                           str(tmp_path / "afile" / "m.pt")), status=1)
    assert "cannot create its directory" in msg
    msg = _error(_compress(model_file, tmp_path, "--frobenius", "--ratio", "2", "--save-stats",
                           str(tmp_path / "s.pt")))
    assert "--save-stats saves statistics collected from --data; with --frobenius" in msg


class _NeedsKwargs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x, *, scale):
        return self.fc(self.c2(self.c1(x * scale)).mean((2, 3)))


def test_a_model_failing_with_any_error_is_one_line(tmp_path, idx_dir):
    path = tmp_path / "kw.pt"  # (its class unpickles from this test module)
    torch.save(_NeedsKwargs(), path)
    msg = _error(_compress(str(path), tmp_path, "--ratio", "2", "--data", idx_dir), status=1)
    assert "failed on the calibration images" in msg and "keyword-only argument" in msg


def test_layers_that_are_not_conv_or_linear_with_data(model_file, tmp_path, idx_dir):
    msg = _error(_compress(model_file, tmp_path, "--ratio", "2", "--data", idx_dir,
                           "--layers", "layer1"))
    assert "--layers contains 'layer1', a BasicBlock" in msg
    assert "only nn.Conv2d and nn.Linear" in msg


def test_transferred_statistics_of_other_layers_say_so(model_file, tmp_path, idx_dir):
    stats = str(tmp_path / "s.pt")
    assert cli.main(_compress(model_file, tmp_path, "--ratio", "2", "--data", idx_dir,
                              "--layers", "layer1.conv1", "--save-stats", stats)) == 0
    msg = _error(_compress(model_file, tmp_path, "--ratio", "2", "--transfer-stats", stats,
                           "--layers", "layer1.conv2"), status=1)
    assert "--transfer-stats=" in msg and "has no statistics for it" in msg


def test_transformer_layers_that_cannot_be_replaced_are_named(tmp_path, capsys):
    from sigmadecomp_torch.vit import TorchViT

    torch.manual_seed(0)
    path = tmp_path / "vit.pt"
    torch.save(TorchViT(depth=1, dim=16, heads=2).eval(), path)
    d = tmp_path / "idx"
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte", np.random.default_rng(0).integers(0, 256, (4, 28, 28)))
    msg = _error(["compress", str(path), "--method", "svd", "--ratio", "2", "--out",
                  str(tmp_path / "o.pt"), "--no-progress", "--data", str(d)])
    assert "no layer to compress" in msg and "MultiheadAttention" in msg


def test_include_first_next_to_named_layers_is_refused(model_file, tmp_path):
    msg = _error(_compress(model_file, tmp_path, "--frobenius", "--ratio", "2", "--layers",
                           "layer1.conv1", "--include-first"))
    assert "--include-first applies to --layers auto" in msg


def test_report_total_counts_one_layer_in_the_singular(model_file, tmp_path, capsys):
    assert cli.main(_compress(model_file, tmp_path, "--frobenius", "--ratio", "2", "--layers",
                              "layer1.conv1")) == 0
    out = capsys.readouterr().out
    assert "total (1 layer)" in out and "(1 layers)" not in out
    # the table's title in the command's words
    assert "\n--method tucker2 (Frobenius)\n" in out and "compress(method=" not in out


class _GreyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Flatten()
        self.a, self.b, self.c = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(self.f(x))))))


def test_a_model_without_conv_says_the_channel_count_was_guessed(tmp_path):
    from _helpers import write_png_folder

    d = write_png_folder(tmp_path / "imgs", 3, (8, 8, 3))
    path = tmp_path / "mlp.pt"
    torch.save(_GreyMLP(), path)
    msg = _error(["compress", str(path), "--method", "svd", "--ratio", "2", "--out",
                  str(tmp_path / "o.pt"), "--no-progress", "--data", str(d)], status=1)
    assert "read with 3 channels: give --channels 1" in msg


# ------------------------------------- every option checked, in the CLI's words


@pytest.fixture
def stats_file(small_model_file, tmp_path):
    """Statistics of the small model's layer1.conv1, as --save-stats writes them."""
    from sigmadecomp_torch import collect_covariances, save_covariances

    stats = collect_covariances(small_model_file[1], torch.rand(4, 1, 28, 28),
                                layers=["layer1.conv1"], progress=False)
    save_covariances(stats, tmp_path / "s.pt")
    return str(tmp_path / "s.pt")


@pytest.mark.parametrize("option,value", [("--normalize", "0.5,0.25"), ("--image-size", "32"),
                                          ("--channels", "1"), ("--calib-images", "8"),
                                          ("--seed", "3"), ("--batch-size", "8")])
@pytest.mark.parametrize("source", ["--transfer-stats", "--frobenius"])
def test_image_options_without_data_are_refused(model_file, stats_file, tmp_path, option,
                                                value, source):
    src = ["--transfer-stats", stats_file] if source == "--transfer-stats" else [source]
    msg = _error(_compress(model_file, tmp_path, "--ratio", "2", "--layers", "layer1.conv1",
                           *src, option, value))
    assert f"{option} applies to the calibration images of --data" in msg
    assert f"with {source} and no --data no image is read" in msg
    assert f"leave {option} out" in msg


@pytest.mark.parametrize("value,allowed", [("abc", "give comma-separated numbers"),
                                           ("0.5,0", "the standard deviations must be > 0"),
                                           ("0.1,0.2,0.3", "MEAN,STD (2 values) or")])
@pytest.mark.parametrize("source", ["--transfer-stats", "--data"])
def test_normalize_value_is_checked_whatever_path_runs(model_file, stats_file, tmp_path, value,
                                                       allowed, source):
    # checked before any image is read (a --data that does not exist is not reached)
    src = ([source, stats_file] if source == "--transfer-stats" else
           [source, str(tmp_path / "not-read")])
    msg = _error(_compress(model_file, tmp_path, "--ratio", "2", "--layers", "layer1.conv1",
                           *src, "--normalize", value))
    assert f"--normalize={value!r}" in msg and allowed in msg


def test_without_statistics_one_image_of_data_is_read(model_file, stats_file, tmp_path,
                                                        idx_dir, monkeypatch, capsys):
    import importlib

    data = importlib.import_module("sigmadecomp_torch.data")
    limits = []
    real = data.load_images

    def spy(*args, limit=None, **kw):
        limits.append(limit)
        return real(*args, limit=limit, **kw)

    monkeypatch.setattr(data, "load_images", spy)
    for src in (["--transfer-stats", stats_file], ["--frobenius"]):
        assert cli.main(_compress(model_file, tmp_path, "--ratio", "2", "--data", idx_dir,
                                  "--layers", "layer1.conv1", *src)) == 0
    assert limits == [1, 1]
    assert "calibration: 1 image" in capsys.readouterr().out


def test_options_without_effect_next_to_transfer_stats_or_frobenius_are_refused(
        model_file, stats_file, tmp_path, idx_dir):
    msg = _error(_compress(model_file, tmp_path, "--ratio", "2", "--frobenius",
                           "--transfer-stats", stats_file))
    assert "--transfer-stats cannot be combined with --frobenius" in msg
    for src in (["--transfer-stats", stats_file], ["--frobenius"]):
        msg = _error(_compress(model_file, tmp_path, "--ratio", "2", "--layers",
                               "layer1.conv1", "--data", idx_dir, "--batch-size", "8", *src))
        assert "--batch-size sets the batches of the statistics collected from --data" in msg
        assert f"with {src[0]} none are collected" in msg
        msg = _error(_compress(model_file, tmp_path, "--ratio", "2", "--data", idx_dir,
                               "--calib-images", "8", *src))
        assert "--calib-images sets how many images" in msg
        assert f"with {src[0]} none are collected" in msg
    msg = _error(["compress", model_file, "--method", "svd", "--frobenius", "--ratio", "2",
                  "--n-iter", "3", "--out", str(tmp_path / "o.pt")])
    assert "--n-iter applies to tucker2, cp and tt" in msg and "--method svd" in msg
    msg = _error(["compress", model_file, "--method", "cp", "--frobenius", "--ratio", "2",
                  "--cp-inner", "adaptive", "--out", str(tmp_path / "o.pt")])
    assert "--cp-inner adaptive" in msg and "--frobenius" in msg


_LIBRARY_WORD = r"(?<![\w-])(ratio|budget|layers|refit|data|n_iter_max|options|covariances)="


def _in_cli_words(msg):
    import re

    assert not re.search(_LIBRARY_WORD, msg), msg
    assert "options[" not in msg and "covariances[" not in msg and "in covariances" not in msg
    return msg


def test_library_errors_name_the_cli_options(model_file, tmp_path, idx_dir):
    msg = _in_cli_words(_error(_compress(model_file, tmp_path, "--frobenius", "--ratio", "inf")))
    assert "--ratio=inf is not allowed" in msg and "finite" in msg
    msg = _in_cli_words(_error(_compress(model_file, tmp_path, "--frobenius", "--budget", "inf")))
    assert "--budget=inf is not allowed" in msg
    msg = _in_cli_words(_error(_compress(model_file, tmp_path, "--frobenius", "--budget", "1")))
    assert msg.startswith("sigmadecomp compress: error: --budget=1 is not allowed for these "
                          "layers; the smallest ranks already cost")
    msg = _in_cli_words(_error(_compress(model_file, tmp_path, "--frobenius", "--ratio", "2",
                                         "--layers", "layer1")))
    assert "--layers contains 'layer1', a BasicBlock" in msg
    msg = _in_cli_words(_error(_compress(model_file, tmp_path, "--data", idx_dir, "--ratio", "2",
                                         "--layers", "layer1")))
    assert "--layers contains 'layer1', a BasicBlock" in msg
    msg = _in_cli_words(_error(_compress(model_file, tmp_path, "--data", idx_dir, "--ratio", "2",
                                         "--refit", "layer1")))
    assert "--refit contains 'layer1', a BasicBlock" in msg
    msg = _in_cli_words(_error(_compress(model_file, tmp_path, "--data", idx_dir, "--ratio", "2",
                                         "--layers", "layer1.conv1", "--refit", "layer1.conv1")))
    assert "--refit contains 'layer1.conv1'" in msg and "leave it out of --layers to refit" in msg


def test_image_errors_name_the_cli_options(tmp_path):
    from _helpers import write_png_folder

    path = tmp_path / "mlp.pt"
    torch.save(_GreyMLP(), path)  # no conv: the channel count is not checked beforehand
    argv = ["compress", str(path), "--method", "svd", "--ratio", "2", "--out",
            str(tmp_path / "o.pt"), "--no-progress"]
    rgb = tmp_path / "rgb-idx"
    rgb.mkdir()
    write_idx(rgb / "train-images-idx3-ubyte",
              np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8)))
    msg = _in_cli_words(_error(argv + ["--data", str(rgb), "--channels", "1"], status=1))
    assert "--channels=1 is not allowed for 3-channel IDX images" in msg
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_png_folder(mixed / "a", 1, (8, 8, 3))
    write_png_folder(mixed / "b", 1, (9, 9, 3))
    msg = _in_cli_words(_error(argv + ["--data", str(mixed)], status=1))
    assert "have different sizes" in msg and "pass size" not in msg
    assert msg.endswith("(resize them with --image-size SIZE)")


def test_transferred_statistics_of_another_model_say_so(model_file, tmp_path, capsys):
    from sigmadecomp_torch import collect_covariances, save_covariances
    from sigmadecomp_torch.models import ResNetSmall

    narrow = ResNetSmall(width=4).eval()  # same layer names, other shapes
    save_covariances(collect_covariances(narrow, torch.rand(2, 1, 28, 28),
                                         layers=["layer1.conv1"], progress=False),
                     tmp_path / "narrow.pt")
    msg = _in_cli_words(_error(_compress(model_file, tmp_path, "--ratio", "2", "--layers",
                                         "layer1.conv1", "--transfer-stats",
                                         str(tmp_path / "narrow.pt")), status=1))
    assert f"--transfer-stats={str(tmp_path / 'narrow.pt')!r}: the statistics of " \
           "'layer1.conv1' were collected on a Conv2d with weight 4x4x3x3" in msg
    assert "statistics of 1 layer from" in capsys.readouterr().out


class _SpareConv(nn.Module):
    """A conv registered but never called."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.spare = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.c2(self.c1(x)).mean((2, 3)))


def test_a_chosen_layer_that_never_runs_is_named_in_cli_words(tmp_path, idx_dir):
    path = tmp_path / "spare.pt"
    torch.save(_SpareConv(), path)
    for extra in ([], ["--sequential"]):
        msg = _in_cli_words(_error(_compress(str(path), tmp_path, "--ratio", "2", "--data",
                                             idx_dir, "--layers", "c2,spare", *extra),
                                   status=1))
        assert "'spare'" in msg and "never ran in the forward pass" in msg
        assert "chosen in --layers" in msg


def test_warnings_are_plain_lines_in_the_cli_words(model_file, tmp_path, idx_dir, capsys,
                                                    shown_warnings):
    import warnings

    show, filters = warnings.showwarning, list(warnings.filters)
    # 2 sweeps (not converged) at rX 2 on 12 images: a large Sigma-error
    assert cli.main(_compress(model_file, tmp_path, "--ratio", "2", "--data", idx_dir,
                              "--layers", "layer1.conv1")) == 0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("warning: layer 'layer1.conv1': ")
                                   for line in lines), err
    assert "cli.py" not in err and "Warning:" not in err and "compress(" not in err
    assert "(raise --n-iter)" in err and "leave it out of --layers)" in err
    _in_cli_words(err)
    # the library's own warnings machinery is left as it was
    assert warnings.showwarning is show and warnings.filters == filters
    with pytest.warns(UserWarning, match="still recorded"):
        warnings.warn("still recorded", UserWarning)


def test_cp_cost_warning_names_cli_options(model_file, tmp_path, idx_dir, capsys, monkeypatch,
                                           shown_warnings):
    import importlib

    monkeypatch.setattr(importlib.import_module("sigmadecomp_torch.compress"),
                        "CP_COST_WARN_FLOP", 0)
    assert cli.main(["compress", model_file, "--method", "cp", "--out", str(tmp_path / "o.pt"),
                     "--no-progress", "--n-iter", "2", "--data", idx_dir, "--ratio", "2",
                     "--layers", "layer1.conv1"]) == 0
    err = _in_cli_words(capsys.readouterr().err)
    assert "choose a smaller rank (a larger --ratio) or a smaller --n-iter" in err
    assert "with --cp-inner adaptive --n-iter 10 every conv" in err
    assert "n_iter_max" not in err


def test_report_says_what_rx_counts_when_layers_have_biases(model_file, tmp_path,
                                                             capsys):
    path = tmp_path / "mlp.pt"
    torch.save(_GreyMLP(), path)  # Linear 64->16 and 16->16 with biases
    argv = ["compress", str(path), "--method", "svd", "--frobenius", "--out",
            str(tmp_path / "o.pt"), "--no-progress", "--layers", "a,b"]
    # ranks 3 and 2: weights 1024 -> 240 and 256 -> 64 (rX 4.27 and 4.00); the biases (16
    # each) are kept, so the table's rX (all parameters) is 4.06 and 3.40
    assert cli.main(argv + ["--ratio", "4"]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err  # b meets --ratio 4 on its weights
    note = ("params and rX above count biases too (the factorized layers keep them); --ratio "
            "4 counts weights only: the compressed layers' weights go 1280 -> 304, rX 4.21")
    assert note in out and note in (tmp_path / "o.report.txt").read_text()
    assert cli.main(argv + ["--budget", "304"]) == 0
    out = capsys.readouterr().out
    assert "keep 304 weight parameters (--budget)" in out
    assert ("params and rX above count biases too (the factorized layers keep them); --budget "
            "304 counts weights only: the compressed layers' weights go 1280 -> 304") in out
    # layers without biases: the table's rX is the weights' one, no note
    assert cli.main(_compress(model_file, tmp_path, "--frobenius", "--ratio", "2", "--layers",
                              "layer1.conv1")) == 0
    assert "counts weights only" not in capsys.readouterr().out


def test_min_speedup_times_the_layers_at_images_of_data(model_file, stats_file, tmp_path,
                                                        idx_dir, capsys, monkeypatch):
    import importlib

    lat = importlib.import_module("sigmadecomp_torch.latency")
    shapes = []
    real = lat.input_shapes

    def spy(model, example_input, names=None):
        shapes.append(tuple(example_input.shape))
        return real(model, example_input, names)

    monkeypatch.setattr(lat, "input_shapes", spy)
    out = tmp_path / "o.pt"
    assert cli.main(_compress(model_file, tmp_path, "--ratio", "2", "--data", idx_dir,
                              "--min-speedup", "1000")) == 0
    text = capsys.readouterr().out
    assert "timing each layer at batch 1 (--min-speedup 1000)" in text
    assert "--min-speedup=1000: kept dense" in text
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["layers"] == [] and all(s["latency_dense_ms"] > 0 for s in report["skipped"]
                                          if "kept dense" in s["reason"])
    # Frobenius with a batch of 3 images: three images are read for it
    assert cli.main(_compress(model_file, tmp_path, "--ratio", "2", "--data", idx_dir,
                              "--frobenius", "--min-speedup", "0", "--latency-batch",
                              "3")) == 0
    assert shapes[-1][0] == 3
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["layers"] and all(r["latency_dense_ms"] > 0 for r in report["layers"])
    assert out.exists()


@pytest.mark.parametrize("extra, words", [
    (["--latency-batch", "4"], "give --min-speedup X"),
    (["--min-speedup", "1"], "give --data DIR"),
    (["--data", "DATA", "--min-speedup", "-1"], "--min-speedup=-1 is not allowed"),
    (["--data", "DATA", "--min-speedup", "inf"], "--min-speedup=inf is not allowed"),
])
def test_min_speedup_options_are_checked(model_file, tmp_path, idx_dir, extra, words):
    extra = [idx_dir if e == "DATA" else e for e in extra]
    msg = _error(_compress(model_file, tmp_path, "--ratio", "2", "--frobenius", *extra))
    assert words in msg


# ------------------------------------------- inputs kept, outputs named, refusals


def test_outputs_that_would_overwrite_an_input_are_refused(model_file, stats_file, tmp_path,
                                                           idx_dir, monkeypatch):
    before = open(model_file, "rb").read()
    monkeypatch.chdir(tmp_path)  # (the same file under another name: model.pt)
    base = ["compress", model_file, "--method", "tucker2", "--ratio", "2", "--no-progress"]
    for out in (model_file, "model.pt", os.path.join("new", "..", "model.pt")):
        msg = _error(base + ["--frobenius", "--out", out])
        assert f"--out={out!r} is the file of MODEL={model_file!r}, which would be " \
               "overwritten; give another --out" in msg
    msg = _error(base + ["--data", idx_dir, "--save-stats", model_file, "--out", "o.pt"])
    assert f"--save-stats={model_file!r} is the file of MODEL=" in msg
    msg = _error(base + ["--transfer-stats", stats_file, "--out", stats_file])
    assert f"is the file of --transfer-stats={stats_file!r}" in msg
    # two outputs that do not exist yet: their normalized paths
    msg = _error(base + ["--data", idx_dir, "--save-stats", "s.pt", "--out",
                         os.path.join("sub", "..", "s.pt")])
    assert "is the file of --save-stats='s.pt'" in msg
    # the files written next to --out count too
    os.rename(model_file, "m.torchscript.pt")
    msg = _error(["compress", "m.torchscript.pt", "--method", "tucker2", "--ratio", "2",
                  "--frobenius", "--out", "m.pt", "--torchscript"])
    assert "--out='m.pt' (it writes 'm.torchscript.pt') is the file of MODEL=" in msg
    assert open("m.torchscript.pt", "rb").read() == before


def test_out_or_save_stats_naming_a_directory_is_refused(model_file, tmp_path, idx_dir):
    new = str(tmp_path / "newdir") + os.sep
    msg = _error(_compress(model_file, tmp_path, "--frobenius", "--ratio", "2", "--out", new))
    assert f"--out={new!r} names a directory (it ends in a path separator); give a file " \
           "name" in msg
    msg = _error(_compress(model_file, tmp_path, "--ratio", "2", "--data", idx_dir,
                           "--save-stats", new))
    assert f"--save-stats={new!r} names a directory" in msg
    assert not os.path.exists(new)


def test_save_stats_needs_a_name_of_a_statistics_format(model_file, tmp_path, idx_dir, capsys):
    from sigmadecomp_torch import load_covariances

    msg = _error(_compress(model_file, tmp_path, "--ratio", "2", "--data", idx_dir,
                           "--save-stats", str(tmp_path / "st.npz")))
    assert f"--save-stats={str(tmp_path / 'st.npz')!r}: a .npz name is not allowed; give a " \
           "name ending in .safetensors (safetensors) or in .pt or .pth (a torch.save file; " \
           "so is a name without suffix)" in msg
    assert not (tmp_path / "st.npz").exists()
    # a name without suffix is a torch.save file, as save_covariances documents
    assert cli.main(_compress(model_file, tmp_path, "--ratio", "2", "--data", idx_dir,
                              "--layers", "layer1.conv1", "--calib-images", "4",
                              "--save-stats", str(tmp_path / "stats"))) == 0
    assert list(load_covariances(tmp_path / "stats")) == ["layer1.conv1"]
    _help("compress")
    assert ".pth or without suffix" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("option,value", [("--seed", "3"), ("--normalize", "0.5,0.5")])
@pytest.mark.parametrize("source", ["--transfer-stats", "--frobenius"])
def test_options_of_the_statistics_images_are_refused_when_none_are_collected(
        model_file, stats_file, tmp_path, idx_dir, option, value, source):
    # (with --frobenius or --transfer-stats the one image read chooses the layers by the
    # model's call order, whichever image it is and however normalised)
    src = ["--transfer-stats", stats_file] if source == "--transfer-stats" else [source]
    msg = _error(_compress(model_file, tmp_path, "--ratio", "2", "--layers", "layer1.conv1",
                           "--data", idx_dir, *src, option, value))
    assert f"{option} " in msg and "the statistics are collected from" in msg
    assert f"with {source} none are collected" in msg and f"leave {option} out" in msg


def test_cp_inner_exact_is_refused_where_it_has_no_effect(model_file, tmp_path):
    msg = _error(_compress(model_file, tmp_path, "--frobenius", "--ratio", "2",
                           "--cp-inner", "exact"))
    assert "--cp-inner exact applies to --method cp, not tucker2" in msg
    msg = _error(["compress", model_file, "--method", "cp", "--frobenius", "--ratio", "2",
                  "--cp-inner", "exact", "--out", str(tmp_path / "o.pt")])
    assert "--cp-inner exact sets the inner solves of Sigma-weighted CP" in msg
    assert "--frobenius" in msg and "leave --cp-inner out" in msg


def test_budget_at_or_above_the_layers_size_warns(model_file, tmp_path, capsys):
    # layer1.conv1: 8 x 8 x 3 x 3 = 576 weights
    assert cli.main(_compress(model_file, tmp_path, "--frobenius", "--layers", "layer1.conv1",
                              "--budget", "1000")) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("warning: --budget")] == [
        "warning: --budget 1000 is at least the 576 weight parameters of the 1 layer to "
        "compress (biases not counted): they need no compression to fit it; give a smaller "
        "count, or a fraction in (0, 1)"]
    assert cli.main(_compress(model_file, tmp_path, "--frobenius", "--layers", "layer1.conv1",
                              "--budget", "300")) == 0
    assert "warning: --budget" not in capsys.readouterr().err


def test_min_speedup_that_keeps_every_layer_dense_says_so(model_file, tmp_path, idx_dir,
                                                         capsys):
    assert cli.main(_compress(model_file, tmp_path, "--frobenius", "--ratio", "2", "--data",
                              idx_dir, "--layers", "layer1.conv1",
                              "--min-speedup", "1000")) == 0
    out, err = capsys.readouterr()
    assert "warning: no layer was compressed (each ran less than --min-speedup 1000 times " \
           "faster factorized at batch 1); the model written is the original one" in err
    total = next(line for line in out.splitlines() if line.startswith("total ("))
    assert total.split()[3:6] == ["0", "0", "-"], total  # (rX 0/0: undefined)
    assert total in (tmp_path / "o.report.txt").read_text()


def test_a_file_not_written_by_torch_save_says_so(tmp_path):
    np.savez(tmp_path / "weights.npz", w=np.zeros(3))
    (tmp_path / "notes.pt").write_text("hello")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("notes.pt", "weights.npz", "empty.pt"):
        path = str(tmp_path / name)
        msg = _error(_compress(path, tmp_path, "--frobenius", "--ratio", "2"), status=1)
        assert msg == (f"sigmadecomp compress: error: MODEL={path!r} is not a file written by "
                       "torch.save; MODEL must be a model saved with torch.save(model, path) (a "
                       "pickled torch.nn.Module)")


def test_calibration_counts_images_in_words(model_file, stats_file, tmp_path, idx_dir, capsys):
    assert cli.main(_compress(model_file, tmp_path, "--ratio", "2", "--data", idx_dir,
                              "--layers", "layer1.conv1", "--frobenius")) == 0
    out = capsys.readouterr().out
    assert f"calibration: 1 image of shape (1, 28, 28) from {idx_dir}" in out
    assert "note:" not in out
    # more images asked for than --data holds (12): all are used, and said so
    assert cli.main(_compress(model_file, tmp_path, "--ratio", "2", "--data", idx_dir,
                              "--layers", "layer1.conv1", "--calib-images", "500")) == 0
    out = capsys.readouterr().out
    assert f"calibration: 12 images of shape (1, 28, 28) from {idx_dir}\n" \
           "note: --calib-images 500: --data holds only 12 images, all used\n" in out


@pytest.mark.parametrize("extra, words, status", [
    (["--layers", "layer1.conv1", "--refit", "layer1.conv1"],
     "--refit contains 'layer1.conv1', which is also a layer to compress", 2),
    (["--refit", "nope"], "--refit contains 'nope', which is not a module of the model", 2),
    (["--refit", "layer1.bn1"], "--refit contains 'layer1.bn1', a BatchNorm2d", 2),
    (["--layers", "layer1.bn1,layer1.conv1"], "--layers contains 'layer1.bn1', a BatchNorm2d", 2),
    (["--layers", "layer1.conv1,layer1.conv2", "--budget", "1"],
     "--budget=1 is not allowed for these layers; the smallest ranks already cost 50 weight "
     "parameters, so the budget must be at least 50", 2),
    (["--layers", "all", "--budget", "0.001"], "--budget=0.001 (a fraction: ", 2),
    (["--transfer-stats", "STATS"], "--transfer-stats=", 1),
])
def test_checks_of_layers_and_statistics_come_before_the_images(model_file, tmp_path, extra,
                                                                words, status):
    # a --data that does not exist is not reached
    extra = [str(tmp_path / "missing.pt") if e == "STATS" else e for e in extra]
    ratio = [] if "--budget" in extra else ["--ratio", "2"]
    msg = _error(_compress(model_file, tmp_path, *ratio, "--data", str(tmp_path / "not-read"),
                           *extra), status=status)
    assert words in msg and "not-read" not in msg


def test_checks_of_default_layers_come_before_the_statistics(model_file, tmp_path, idx_dir,
                                                             monkeypatch):
    import importlib

    def no_pass(*args, **kw):
        raise AssertionError("the statistics were collected")

    monkeypatch.setattr(importlib.import_module("sigmadecomp_torch.covariance"),
                        "collect_covariances", no_pass)
    # --layers auto: the layers follow the call order on an image, then they are checked
    msg = _error(_compress(model_file, tmp_path, "--data", idx_dir, "--budget", "1"))
    assert "--budget=1 is not allowed for these layers; the smallest ranks already cost 342 " \
           "weight parameters" in msg
    msg = _error(_compress(model_file, tmp_path, "--data", idx_dir, "--ratio", "2", "--refit",
                           "layer2.conv1"))
    assert "--refit contains 'layer2.conv1', which is also a layer to compress" in msg


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sigmadecomp {version('sigmadecomp')}"
    proc = _run_without_torch("from sigmadecomp_torch.cli import main\nmain(['--version'])")
    assert proc.returncode == 0 and proc.stdout.startswith("sigmadecomp "), proc.stderr


def test_exit_status_tells_a_refused_command_line_from_a_failed_run(model_file, tmp_path,
                                                                    capsys):
    _help()
    assert "exit status: 0 done; 2 the command line is refused" in " ".join(
        capsys.readouterr().out.split())
    _help("compress")
    text = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0 done; 2 the command line is refused" in text
    assert "1 the run failed (a file missing or unreadable" in text
    # in a real process: the refusal printed once, on one line, and exit status 2
    argv = ["compress", model_file, "--method", "tucker2", "--frobenius", "--ratio", "1",
            "--out", str(tmp_path / "o.pt")]
    proc = subprocess.run([sys.executable, "-m", "sigmadecomp_torch.cli", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "sigmadecomp compress: error: --ratio=1 is not allowed; the per-layer ratio rX must be "
        "a finite number > 1"]
    argv[1] = str(tmp_path / "missing.pt")
    argv[argv.index("1")] = "2"
    proc = subprocess.run([sys.executable, "-m", "sigmadecomp_torch.cli", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
    assert "MODEL=" in proc.stderr and "is not a file" in proc.stderr


def test_budget_fraction_precheck_keeps_the_allocators_rounding_slack():
    # 0.29 of a 4x25 Linear's 100 weights is 29, the cost of rank 1 (4 + 25), although
    # 0.29 * 100 is 28.999999999999996 in floating point: accepted, as allocate accepts it
    import argparse

    model = nn.Sequential(nn.Linear(25, 4))
    args = argparse.Namespace(budget=0.29, method="svd")
    cli._check_budget_size(args, model, ["0"], None)  # no UserError
    args.budget = 0.28
    with pytest.raises(cli.UserError, match="at least 29"):
        cli._check_budget_size(args, model, ["0"], None)

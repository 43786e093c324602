"""A new user's first hour: what the README, the demo's help and its log say is what happens."""

import json
import os
import re
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sigmadecomp.exceptions import CompressionWarning  # noqa: E402
from sigmadecomp_torch import collect_covariances, compress  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTES = os.path.join(ROOT, "notes")


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def _flat(text):
    """``text`` with its line breaks and indentation folded into single spaces."""
    return re.sub(r"\s+", " ", text)


def _toy(c_mid=16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, c_mid, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(c_mid, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 8, 8, generator=gen) for _ in range(2)]


# ------------------------------------------------------------ the reference model's docstring


def test_reference_model_training_time_is_the_recorded_one():
    """The module said the reference CNN "trains in a few minutes on two CPU cores"; its
    weights' record says 2465.7 s (41 min)."""
    import sigmadecomp_torch.models as models
    from sigmadecomp_torch.demo.reference import reference_info

    info = reference_info()
    m = re.search(r"(\d+) epochs, about (\d+) minutes", _flat(models.__doc__))
    assert m, "the module docstring must state the recorded training time"
    assert int(m.group(1)) == len(info["history"]) == info["settings"]["epochs"]
    assert abs(int(m.group(2)) - info["train_seconds"] / 60) <= 1


# ------------------------------------------------------------ the demo


def test_demo_logs_the_reference_accuracy_in_percent(monkeypatch):
    """The first line of figures the demo prints gave the accuracy as a fraction (0.9170)
    while every table and the README give percent (92.30%)."""
    from sigmadecomp_torch.demo import experiment
    from sigmadecomp_torch.demo.reference import evaluate, load_reference

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(12, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (12,), generator=gen)
    y[:5] = load_reference()(x[:5]).argmax(1)        # an accuracy that is neither 0 nor 1
    monkeypatch.setattr(experiment, "fashion_mnist", lambda split, **kw: (x, y))
    monkeypatch.setattr(experiment, "digits", lambda **kw: (x, y))

    class Seen(Exception):
        pass

    lines = []

    def log(text):
        lines.append(text)
        if text.startswith("reference model"):
            raise Seen

    cfg = experiment.make_config("quick", calib_images=4, test_images=12)
    with pytest.raises(Seen):
        experiment.run(cfg, progress=False, log=log)
    acc = 100 * evaluate(load_reference(), x, y)
    assert 0 < acc < 100
    assert f"test accuracy {acc:.2f}% on 12 test images" in lines[-1]


def test_cp_schedule_docstring_quotes_its_note():
    """The demo's CP schedule quoted "about 10x" from notes/sweeps.md; the current figure
    is 7.9-9.0x per sweep in notes/cp_exact.md (as the README says)."""
    from sigmadecomp_torch.demo import experiment

    doc = _flat(experiment._solver_options.__doc__)
    cited = re.findall(r"notes/(\w+\.md)", doc)
    assert cited
    text = "".join(open(os.path.join(NOTES, name)).read() for name in cited)
    figures = re.findall(r"(?<!about )\b\d+(?:\.\d+)?-\d+(?:\.\d+)?x", doc)  # not roundings
    assert figures
    for fig in figures:
        assert fig in text, f"{fig} is not in {cited}"
    assert "about 8-9x" in doc and "about 8-9x per" in _flat(_readme())


def test_quick_help_says_what_quick_runs():
    """``--quick``'s help said "one rX, 1000 test images" but not which rX, that it has no
    Tensor-Train rows, or how many calibration images; the figures are the config's."""
    import argparse

    from sigmadecomp_torch.demo import add_demo_options
    from sigmadecomp_torch.demo.experiment import CONFIGS

    parser = add_demo_options(argparse.ArgumentParser())
    (action,) = [a for a in parser._actions if "--quick" in a.option_strings]
    quick = CONFIGS["quick"]
    text = action.help
    assert quick["tt_rx"] == () and "no Tensor-Train" in text
    (rx,) = quick["rx"]
    assert f"rX = {rx:g} only" in text
    assert f"{quick['calib_images']} calibration" in text
    assert f"{quick['test_images']} test images" in text


# ------------------------------------------------------------ README: data location


def test_readme_data_directory_variable_is_honoured(tmp_path, monkeypatch):
    """The README named only the Debian package; the loader also reads a directory named by
    SIGMADECOMP_FASHION_MNIST holding the four IDX files the README lists."""
    from sigmadecomp.datasets import find_fashion_mnist

    text = _flat(_readme())
    assert "SIGMADECOMP_FASHION_MNIST" in text
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]
    for stem in stems:
        assert f"`{stem}`" in text
        (tmp_path / (stem + ".gz")).write_bytes(b"")
    monkeypatch.setenv("SIGMADECOMP_FASHION_MNIST", str(tmp_path))
    assert os.path.samefile(find_fashion_mnist(), tmp_path)


# ------------------------------------------------------------ README: which method when


def _results_rows():
    with open(os.path.join(NOTES, "results.md")) as f:
        lines = [ln.strip() for ln in f if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_readme_method_table_matches_the_committed_run():
    """Every figure of the README's "Which method when" table recomputed from
    notes/results.md: accuracy (Sigma row, rX 3 and 6), Sigma fit seconds and speed-ups of
    method@3."""
    rows = _results_rows()
    acc = {r[0]: r for r in rows if len(r) == 7 and r[1] == "Sigma"}
    shapes = {r[0]: r for r in rows if len(r) == 10}
    readme = _readme()
    table = {}
    for line in readme.splitlines():
        m = re.match(r"\| `'(\w+)'` \|", line)
        if m:
            table[m.group(1)] = [c.strip() for c in line.strip().strip("|").split("|")]
    assert set(table) == {"tucker2", "cp", "svd", "tt"}
    for method in ("tucker2", "cp", "tt"):
        cells = table[method]
        a = acc[method]
        assert cells[2] == f"{a[3]} / {a[5]}%"                   # rX 3 and rX 6
        s = shapes[f"{method}@3"]
        sigma_seconds = s[9].split("/")[1].strip()
        assert cells[3] == f"{sigma_seconds} s"
        if method != "tt":  # (TT's speed: its evaluation benchmark, below)
            assert f"{s[6]} / {s[8]}" in cells[4]                # speed-up batch 1 / 64
    assert "svd" in table and table["svd"][2] == "-"
    # TT in inference (the kernels kept), from notes/tt_evaluation.json
    with open(os.path.join(ROOT, "notes", "tt_evaluation.json")) as f:
        bench = json.load(f)
    speed = {r["batch"]: r["ms"]["dense"] / r["ms"]["auto"] for r in bench["model"]}
    assert f"{speed[1]:.2f}x / {speed[64]:.2f}x the original's speed" in table["tt"][4]


# ------------------------------------------------------------ README: troubleshooting


def _message(fn, exc_type):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc_type) as info:
            fn()
    return str(info.value)


def _in_readme(fragment):
    assert fragment in _flat(_readme()), f"the README does not show {fragment!r}"


def test_readme_troubleshooting_quotes_the_real_messages():
    """Each message the Troubleshooting section quotes is what the library says."""
    model, data = _toy(), _batches()
    stats = collect_covariances(model, data, progress=False)

    msg = _message(lambda: compress(model, "tucker", covariances=stats, ratio=3,
                                    progress=False), ValueError)
    _in_readme(msg.split(";")[0])                                # method='tucker' is not allowed
    msg = _message(lambda: compress(model, "tucker2", covariances=stats, ratio=0.5,
                                    progress=False), ValueError)
    _in_readme(msg.split(";")[0])                                # ratio=0.5 is not allowed
    msg = _message(lambda: collect_covariances(model, [(x, x[:, 0], 0) for x in data],
                                               progress=False), TypeError)
    _in_readme(msg.split(" (")[0] + " ...")                      # batch 0 is a tuple of 3 items
    other = collect_covariances(_toy(8), data, progress=False)
    msg = _message(lambda: compress(model, "tucker2", covariances=other, ratio=3,
                                    progress=False), ValueError)
    assert msg.startswith("covariances['2'] were collected on a Conv2d with weight 32x8x3x3")
    _in_readme("covariances['2'] were collected on a Conv2d with weight ...")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _toy()

        def forward(self, x):
            return self.body(x)

    dict_batches = [{"image": x, "label": torch.zeros(len(x))} for x in data]
    msg = _message(lambda: collect_covariances(Net(), dict_batches, progress=False), TypeError)
    assert msg.startswith("batch 0 is a mapping with keys ['image', 'label'], which runs as "
                          "model(**batch), but Net.forward() does not take it")
    assert "forward=" in msg
    _in_readme(msg.split(" does not take it")[0])
    fixed = collect_covariances(Net(), dict_batches, progress=False,
                                forward=lambda m, b: m(b["image"]))
    assert sorted(fixed) == ["body.0", "body.2", "body.6"]

    # a layer without statistics is skipped with the reason the README quotes
    model3 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                           nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    stats3 = collect_covariances(model3, data, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = compress(model3, "tucker2", ratio=2, progress=False,
                             covariances={k: v for k, v in stats3.items() if k != "4"})
    reasons = [r["reason"] for r in report.skipped]
    assert any("no statistics for this layer in covariances" in r for r in reasons), reasons
    _in_readme('"no statistics for this layer in covariances"')

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compress(model, "tucker2", covariances=stats, ratio=3, progress=False)
    texts = [str(w.message) for w in caught if issubclass(w.category, CompressionWarning)]
    assert any(re.match(r"layer '2': relative Sigma-error [0-9.]+ > 0\.2", t) for t in texts)
    _in_readme("CompressionWarning: layer '2': relative Sigma-error ... > 0.2")


def test_readme_troubleshooting_ratio_advice_is_right():
    """'keeping half of them is ratio=2 or budget=0.5': both give about half the weights."""
    model, data = _toy(), _batches()
    stats = collect_covariances(model, data, progress=False)
    _in_readme("keeping half of them is `ratio=2` (every layer) or `budget=0.5`")
    weights = model[2].weight.numel()
    for kw in ({"ratio": 2}, {"budget": 0.5}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small, _ = compress(model, "tucker2", covariances=stats, layers=["2"],
                                progress=False, **kw)
        kept = sum(m.weight.numel() for m in small[2].modules() if isinstance(m, nn.Conv2d))
        assert 0.4 * weights <= kept <= 0.5 * weights, (kw, kept, weights)


# ------------------------------------------------------------ helpers a first script calls


@pytest.mark.parametrize("shape", [28, (1, 28.7, 28), (1, True, 4), (28, 28), "1x28x28"])
def test_synthetic_images_refuses_a_bad_shape_by_name(shape):
    """``shape=28`` raised "'int' object is not iterable" and ``(1, 28.7, 28)`` was cut to
    28 without a word."""
    from sigmadecomp_torch.data import synthetic_images

    with pytest.raises(ValueError, match=r"shape=.* is not allowed; shape must be \(C, H, W\) "
                                         r"with positive integer sizes"):
        synthetic_images(2, shape)


@pytest.mark.parametrize("seed", ["a", -1, 1.5, True])
def test_synthetic_images_refuses_a_bad_seed_by_name(seed):
    """A seed NumPy refuses gave NumPy's message, without the argument's name."""
    from sigmadecomp_torch.data import synthetic_images

    with pytest.raises(ValueError, match=r"seed=.* is not allowed; seed must be a "
                                         r"non-negative integer"):
        synthetic_images(2, (1, 4, 4), seed=seed)


def test_synthetic_images_valid_shapes_and_seeds_still_work():
    import numpy as np

    from sigmadecomp_torch.data import synthetic_images

    a = synthetic_images(2, torch.Size([1, 4, 4]), seed=np.int64(3))
    b = synthetic_images(2, [1, 4, 4], seed=3)
    assert a.shape == (2, 1, 4, 4) and torch.equal(a, b)
    assert synthetic_images(1, (1, 4, 4), seed=None).shape == (1, 1, 4, 4)


def test_mix_sigma_weight_error_says_what_weight_is():
    """``mix_sigma(..., weight=2)`` said weight 1 "gives the Frobenius metric"; it gives
    the prior (that is alpha's meaning)."""
    import numpy as np

    from sigmadecomp.shrinkage import mix_sigma

    S, P = np.diag([3.0, 1.0]), np.diag([0.0, 10.0])
    with pytest.raises(ValueError) as info:
        mix_sigma(S, P, 0.2, 2)
    msg = str(info.value)
    assert msg.startswith("weight=2 is not allowed; weight must be in [0, 1]")
    assert "1 gives the prior" in msg and "Frobenius" not in msg
    with pytest.raises(ValueError, match="1 gives the Frobenius metric"):
        mix_sigma(S, P, 2, 0.5)                           # alpha keeps its own meaning
    assert np.allclose(mix_sigma(S, P, 0.0, 1.0), np.diag([0.0, 4.0]))   # weight 1: the prior


def test_readme_sequential_advice_holds_in_the_committed_run():
    """'sequential=True: it won back most of the accuracy lost at rX 6 and 8': recomputed
    from notes/results.md for Tucker-2 and CP."""
    _in_readme("it won back most of the accuracy lost at rX 6 and 8, `notes/results.md`")
    rows = _results_rows()
    header = next(r for r in rows if r[:2] == ["method", "variant"])
    original = float(re.search(r"original accuracy on them: \*\*([\d.]+)%",
                               open(os.path.join(NOTES, "results.md")).read()).group(1))
    for method in ("tucker2", "cp"):
        one_shot = next(r for r in rows if r[:2] == [method, "Sigma"])
        seq = next(r for r in rows if r[:2] == [method, "Sigma, sequential (error-compensating)"])
        for rx in ("6", "8"):
            col = header.index(f"rX={rx}")
            lost = original - float(one_shot[col])
            won = float(seq[col]) - float(one_shot[col])
            assert lost > 0 and won > lost / 2, (method, rx, lost, won)


# ------------------------------------------------------------ demo --out-dir


def test_demo_out_dir_where_no_directory_can_be_made_is_refused_up_front(tmp_path, monkeypatch):
    """``sigmadecomp demo --out-dir /proc/x`` (as root: the permission bits say writable)
    passed the check, ran the whole experiment and then died in ``os.makedirs`` with a
    traceback. The check now makes (and removes) a scratch directory."""
    import errno

    import sigmadecomp_torch.demo as demo

    demo.check_out_dir(str(tmp_path / "new" / "sub"))
    assert os.listdir(tmp_path) == []                        # nothing left behind

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    import tempfile

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(ValueError) as info:
        demo.check_out_dir(str(tmp_path / "new"))
    assert str(info.value) == (f"--out-dir={str(tmp_path / 'new')!r}: no directory can be "
                               f"created in {str(tmp_path)!r} (Read-only file system); "
                               "choose another location")
    if os.path.isdir("/proc/self"):                          # the case as it was met
        monkeypatch.undo()
        with pytest.raises(ValueError, match="no directory can be created in '/proc'"):
            demo.check_out_dir("/proc/x")


def test_demo_prints_its_tables_before_writing_and_fails_in_one_line(tmp_path, monkeypatch,
                                                                      capsys):
    """A write error after the run (disk full, a folder removed meanwhile) gave a traceback
    and lost the tables, which were printed only after the files were written."""
    import sigmadecomp.datasets as ds
    import sigmadecomp_torch.demo as demo
    from sigmadecomp_torch.demo import experiment, report

    monkeypatch.setattr(ds, "find_fashion_mnist", lambda directory=None: tmp_path)
    monkeypatch.setattr(experiment, "run", lambda cfg, progress=True: {"seconds": 1.0})
    monkeypatch.setattr(report, "print_summary", lambda results: print("THE TABLES"))

    def full(results, out_dir):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_outputs", full)
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as info:
        demo.main(["--quick", "--no-progress", "--out-dir", out])
    msg = info.value.code
    assert isinstance(msg, str) and "\n" not in msg
    assert msg.startswith(f"sigmadecomp demo: error: --out-dir={out!r}: the results could not "
                          "be written ([Errno 28] No space left on device)")
    assert "THE TABLES" in capsys.readouterr().out


def test_results_md_mentions_tensor_train_only_when_it_has_tt_rows():
    """``demo --quick`` has no Tensor-Train rows, yet its results.md said "the Tensor-Train
    (`tt`) rows also tensorize the final Linear layer" and how their multiply-adds are
    counted."""
    from sigmadecomp_torch.demo.report import markdown

    with open(os.path.join(NOTES, "results.json")) as f:
        results = json.load(f)
    assert any(r["method"] == "tt" for r in results["rows"])
    header = markdown(results).split("## Test accuracy")[0]
    assert "the Tensor-Train (`tt`) rows also tensorize the final Linear layer" in header
    assert "except for TT, the classifier" in header and "FlopCounterMode" in header
    with open(os.path.join(NOTES, "results.md")) as f:          # the committed text as it is
        assert f.read().split("## Test accuracy")[0] == header

    results["rows"] = [r for r in results["rows"] if r["method"] != "tt"]
    results["shapes"] = {k: v for k, v in results["shapes"].items() if not k.startswith("tt")}
    header = markdown(results).split("## Test accuracy")[0]
    assert "Tensor-Train" not in header and "TT" not in header
    assert "(all 3x3 convs but the first)." in header
    assert "BatchNorm and the classifier stay dense" in header


def test_demo_counters_leave_the_model_mode_alone():
    """``count_macs`` and the demo's ``measure_latency`` switched the model they were given
    to eval mode for good, and ``count_macs`` fed float32 zeros to a float64 model."""
    from sigmadecomp import tt_linear
    from sigmadecomp_torch.demo.experiment import count_macs, measure_latency
    from sigmadecomp_torch.tt_layers import TTLinear

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).train()
    assert count_macs(model, (1, 6, 6)) == 4 * 16 * 9 + 3 * 64
    assert all(m.training for m in model.modules())
    measure_latency(model, 1, min_run_time=0.001, shape=(1, 6, 6))
    assert all(m.training for m in model.modules())
    wide = model.double()
    assert count_macs(wide, (1, 6, 6)) == 4 * 16 * 9 + 3 * 64    # float64 weights
    lin = nn.Linear(8, 6).double()
    tt = nn.Sequential(TTLinear.from_result(lin, tt_linear(lin.weight.detach(), 2,
                                                           in_modes=(2, 4), out_modes=(2, 3))))
    tt.train()
    assert count_macs(tt, (8,)) > 0                               # FlopCounterMode path
    assert all(m.training for m in tt.modules())

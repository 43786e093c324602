"""``sigmadecomp demo``: its output folder, plots, latency table and findings (nothing heavy runs)."""

import os

import pytest

torch = pytest.importorskip("torch")

import sigmadecomp_torch.demo as demo  # noqa: E402
from sigmadecomp_torch import cli  # noqa: E402


# ------------------------------------------------------------ --out-dir


def _no_experiment(monkeypatch, tmp_path):
    """The data check passes and any start of the experiment fails the test."""
    import sigmadecomp.datasets as ds
    from sigmadecomp_torch.demo import experiment

    def run(cfg, progress=True):
        raise AssertionError("the experiment ran before --out-dir was checked")

    monkeypatch.setattr(ds, "find_fashion_mnist", lambda directory=None: tmp_path)
    monkeypatch.setattr(experiment, "run", run)


@pytest.mark.parametrize("sub", [("sub",), ("sub", "deeper"), ()])
def test_out_dir_under_a_file_is_refused_before_the_experiment(tmp_path, monkeypatch, sub):
    _no_experiment(monkeypatch, tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = os.path.join(str(afile), *sub)
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--quick", "--no-progress", "--out-dir", out])
    msg = info.value.code
    # a one-line message: exit status 1, as the command's other mistakes of the user
    assert isinstance(msg, str) and "\n" not in msg.strip()
    assert msg.startswith("sigmadecomp demo: error: --out-dir=")
    assert f"{str(afile)!r} exists and is not a directory" in msg
    assert afile.read_text() == "x"
    # the benchmark script's entry names its own program
    with pytest.raises(SystemExit) as info:
        demo.main(["--quick", "--out-dir", out], prog="python -m benchmarks.experiment")
    assert info.value.code.startswith("python -m benchmarks.experiment: error: --out-dir=")


def test_out_dir_check_creates_nothing_and_refuses_an_unwritable_parent(tmp_path):
    new = tmp_path / "a" / "b"
    demo.check_out_dir(str(new))
    demo.check_out_dir(str(tmp_path))  # an existing directory
    assert not (tmp_path / "a").exists()  # write_outputs creates it, with the results
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who may write anywhere")
        with pytest.raises(ValueError, match=r"--out-dir=.*'locked' is not writable"):
            demo.check_out_dir(str(locked / "out"))
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------- plots


def _every_variant_row():
    """One row per (method, variant, rX) the full grid produces (TT and budget included)."""
    from sigmadecomp_torch.demo.experiment import _task_list, make_config

    tasks = _task_list(make_config("full"), have_tt=True, have_budget=True)
    return [{"kind": kind, "method": method, "variant": variant, "rx_target": rx,
             "accuracy": 0.8} for kind, method, variant, rx in tasks]


def test_every_variant_of_the_table_is_plotted():
    from sigmadecomp_torch.demo.experiment import LABELS
    from sigmadecomp_torch.demo.report import STYLES, VARIANT_ORDER

    produced = {r["variant"] for r in _every_variant_row()}
    assert produced <= set(VARIANT_ORDER)  # every variant is a row of the accuracy table
    assert set(VARIANT_ORDER) <= set(STYLES) and set(STYLES) <= set(LABELS)
    markers = [style.rstrip("-:") for _, style in STYLES.values()]
    assert len(set(markers)) == len(markers)  # each variant has its own marker


def test_accuracy_figure_draws_a_line_per_variant():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sigmadecomp_torch.demo.experiment import LABELS
    from sigmadecomp_torch.demo.report import accuracy_figure

    rows = _every_variant_row()
    results = {"rows": rows, "reference": {"accuracy": 0.9}}
    legends = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        fig = accuracy_figure(results, method)
        ax = fig.axes[0]
        drawn = [line.get_label() for line in ax.get_lines()]
        legends[method] = [t.get_text() for t in ax.get_legend().get_texts()]
        want = {LABELS[r["variant"]] for r in rows if r["method"] == method}
        assert set(drawn) == set(legends[method]) == want | {"original"}, method
        assert len(drawn) == len(want) + 1
        plt.close(fig)
    assert set(legends) == {"tucker2", "cp", "tt"}
    for method in ("tucker2", "cp"):
        assert "Sigma from digits, shrunk (transfer)" in legends[method]
        assert "Sigma from BatchNorm statistics (data-free)" in legends[method]


# -------------------------------------------------------------- latency


def test_speedup_is_the_median_of_per_round_ratios():
    from sigmadecomp_torch.demo.experiment import latency_figures

    # two rounds under a drifting load: per-round ratios 1.25 and 0.909 (median = mean
    # 1.08) although the model is slower in median ms (2.6 against 2.5)
    times = {"original": {1: [1.0, 4.0], 64: [10.0, 12.0]},
             "tucker2@3": {1: [0.8, 4.4], 64: [8.0, 9.0]}}
    figs = latency_figures(times)
    m, o = figs["tucker2@3"], figs["original"]
    assert m["latency_b1_ms"] == pytest.approx(2.6) and o["latency_b1_ms"] == pytest.approx(2.5)
    assert m["speedup_b1"] == pytest.approx((1.0 / 0.8 + 4.0 / 4.4) / 2)
    assert m["speedup_b64"] == pytest.approx((10.0 / 8.0 + 12.0 / 9.0) / 2)
    assert o["speedup_b1"] == o["speedup_b64"] == 1.0
    assert m["latency_b1_runs_ms"] == [0.8, 4.4]


def _latency_results(mode, rounds):
    shapes = {"original": {"method": "original", "rx": None, "params": 100, "params_ratio": 1.0,
                           "macs": 1000, "macs_ratio": 1.0, "latency_b1_ms": 2.5,
                           "speedup_b1": 1.0, "latency_b64_ms": 11.0, "speedup_b64": 1.0}}
    return {"shapes": shapes, "rows": [],
            "config": {"mode": mode, "latency": True, "latency_rounds": rounds,
                       "latency_seconds": 0.05}}


def test_latency_note_under_the_table():
    from sigmadecomp_torch.demo.report import latency_note

    quick = latency_note(_latency_results("quick", 2))
    assert "Latency rounds: 2" in quick and "rough" in quick and "without --quick" in quick
    default = latency_note(_latency_results("default", 3))
    assert "Latency rounds: 3" in default and "rough" not in default
    assert latency_note(dict(_latency_results("quick", 2),
                             config={"mode": "quick", "latency": False})) == ""
    printed = []
    from sigmadecomp_torch.demo import report

    report.print_summary(dict(_latency_results("quick", 2), findings=[],
                              size={}, reference={"accuracy": 0.9}), out=printed.append)
    table = printed.index(next(p for p in printed if p.startswith("| model | params")))
    assert printed[table + 1].startswith("Latency rounds: 2")


# ------------------------------------------------------------- findings


def test_bias_correction_sentence_quotes_no_fixed_size():
    from sigmadecomp_torch.demo.experiment import findings
    from sigmadecomp_torch.demo.report import findings_text

    acc = {("main", "frobenius"): 0.80, ("main", "sigma"): 0.90,
           ("main", "sigma-centered"): 0.8807}
    rows = [{"kind": k, "method": "tucker2", "variant": v, "rx_target": 8, "accuracy": a}
            for (k, v), a in acc.items()]
    results = {"rows": rows, "reference": {"accuracy": 0.91},
               "config": {"methods": ["tucker2"], "rx": [8]}}
    text = findings_text(dict(results, findings=findings(results)))
    line = next(t for t in text.splitlines() if t.startswith("**Centered Sigma"))
    assert "(difference -1.93 to -1.93 points)" in line
    assert "few tenths" not in line and "may move either way" in line

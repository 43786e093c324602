"""The benchmark scripts as a researcher runs them: options, outputs and speed figures."""

import csv
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _error(capsys, module, argv):
    """``module.main(argv)`` must stop at argument parsing: exit status 2, message on stderr."""
    import importlib

    mod = importlib.import_module(f"benchmarks.{module}")
    entry = getattr(mod, "parse_args", None) if module in ("transfer", "output_weighting") \
        else mod.main
    with pytest.raises(SystemExit) as exc:
        entry(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    return err


# ---------------------------------------------------------------------------
# bad arguments: an argparse error before any work, naming the option and value
# ---------------------------------------------------------------------------

BAD_ARGUMENTS = [
    ("als_convergence", ["--runs", "0"], "--runs"),
    ("als_convergence", ["--baseline-runs", "-1"], "--baseline-runs"),
    ("als_convergence", ["--threads", "0"], "--threads"),
    ("budget_vs_uniform", ["--methods", "tt"], "--methods"),
    ("budget_vs_uniform", ["--n-test", "-5"], "--n-test"),
    ("collect_cost", ["--threads", "0"], "--threads"),
    ("collect_cost", ["--fractions", "0.25,2"], "--fractions"),
    ("collect_cost", ["--repeats", "0"], "--repeats"),
    ("cp_exact", ["--configs", "nope"], "--configs"),
    ("cp_exact", ["--max-sweeps", "0"], "--max-sweeps"),
    ("cp_scale", ["--configs", "exact,nope"], "--configs"),
    ("datafree", ["--rx", "-2"], "--rx"),
    ("latency", ["--rounds", "0"], "--rounds"),
    ("latency", ["--min-run-time", "-1"], "--min-run-time"),
    ("latency", ["--min-speedup", "-1"], "--min-speedup"),
    ("latency", ["--min-speedup", "inf"], "--min-speedup"),
    ("output_weighting", ["--calib", "0"], "--calib"),
    ("parallel", ["--workers", "0"], "--workers"),
    ("prepared_sigma", ["--repeats", "-1"], "--repeats"),
    ("psd_check", ["--n", "7"], "--n"),
    ("ridge", ["--methods", "nope"], "--methods"),
    ("ridge", ["--layers", "nope"], "--layers"),
    ("ridge_pareto", ["--layers", "r19"], "--layers"),
    ("ridge_pareto", ["--rules", "nope"], "--rules"),
    ("scale", ["--settings", "2:many"], "P:T"),
    ("scale", ["--settings", "1:0"], "P:T"),
    ("scale", ["--methods", "tucker2,nope"], "--methods"),
    ("scale", ["--images", "0"], "--images"),
    ("sequential", ["--methods", "nope"], "--methods"),
    ("sequential", ["--ratios", "0"], "--ratios"),
    ("sequential_scale", ["--images", "-1"], "--images"),
    ("sigma_error_threshold", ["--methods", "tucker2,nope"], "--methods"),
    ("sigma_error_threshold", ["--method", "nope"], "--method"),
    ("sweeps", ["--configs", "nope"], "--configs"),
    ("sweeps", ["--max-sweeps", "0"], "--max-sweeps"),
    ("threads", ["--solvers", "tucker2,nope"], "--solvers"),
    ("threads", ["--libs", "jax"], "--libs"),
    ("threads", ["--all-reps", "0"], "--all-reps"),
    ("threads", ["--channels", "64,-8"], "--channels"),
    ("train_reference", ["--epochs", "0"], "--epochs"),
    ("train_vit", ["--batch-size", "0"], "--batch-size"),
    ("transfer", ["--rules", "a=x"], "a=x"),
    ("transfer", ["--rules", "a=2"], "a=2"),
    ("transfer", ["--iters", "0"], "--iters"),
    ("vit_compress", ["--test", "0"], "--test"),
]


@pytest.mark.parametrize("module,argv,fragment", BAD_ARGUMENTS,
                         ids=[f"{m}{'_'.join(a)}" for m, a, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_refused_before_any_work(capsys, module, argv, fragment):
    err = _error(capsys, module, argv)
    assert fragment in err


def test_missing_inputs_and_output_folders_are_refused(capsys, tmp_path):
    missing = str(tmp_path / "nowhere" / "out.json")
    absent = str(tmp_path / "absent.csv")
    cases = [
        ("compress_memory", ["--json", missing], "does not exist"),
        ("sigma_error_threshold", ["--json", missing], "does not exist"),
        ("latency", ["--out", missing], "does not exist"),
        ("prepared_sigma", ["--out", missing], "does not exist"),
        ("output_weighting", ["--out", missing], "does not exist"),
        ("scale", ["--json", missing], "does not exist"),
        ("cp_exact", ["--report", absent], "no such file"),
        ("ridge_pareto", ["--table", absent], "no such file"),
        ("ridge_pareto", ["--plot", absent], "no such file"),
        ("threads", ["--table", absent], "no such file"),
        ("sequential", ["--combine", absent], "no such file"),
        ("transfer", ["--merge", absent], "no such file"),
        ("vit_compress", ["--weights", absent], "no such file"),
        ("latency", ["--out", str(tmp_path)], "is a folder"),
    ]
    for module, argv, fragment in cases:
        err = _error(capsys, module, argv)
        assert fragment in err and argv[0] in err, (module, err)


def test_an_output_that_is_an_input_of_the_same_run_is_refused(capsys, tmp_path):
    rows = tmp_path / "rows.json"
    rows.write_text("[]")
    before = rows.read_text()
    for module, argv in [("sequential", ["--combine", str(rows), "--out", str(rows)]),
                         ("transfer", ["--merge", str(rows), "--out", str(rows)]),
                         ("cp_exact", ["--report", str(rows), "--out", str(rows)]),
                         ("threads", ["--table", str(rows), "--out", str(rows)])]:
        err = _error(capsys, module, argv)
        assert "would overwrite an input" in err, module
    assert rows.read_text() == before


def test_a_bad_argument_exits_with_usage_and_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cp_exact", "--configs", "nope"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and "--configs" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_argument_types_name_the_value_and_what_is_allowed():
    import argparse

    from benchmarks.common import (nonnegative_float, positive_float, positive_int,
                                   threads_setting)

    assert positive_int("3") == 3 and positive_float("0.5") == 0.5
    assert nonnegative_float("0") == 0.0
    assert threads_setting("default") == "default" and threads_setting("2") == 2
    for parse, text, words in [(positive_int, "0", "integer >= 1"),
                               (positive_int, "x", "not an integer"),
                               (positive_float, "nan", "finite number > 0"),
                               (positive_float, "-1", "finite number > 0"),
                               (nonnegative_float, "-0.5", "finite number >= 0"),
                               (threads_setting, "all", "'default' or a positive integer")]:
        with pytest.raises(argparse.ArgumentTypeError, match=words) as exc:
            parse(text)
        assert repr(text) in str(exc.value) or text in str(exc.value)


# ---------------------------------------------------------------------------
# nothing in notes/ is written unless asked, and nothing depends on the cwd
# ---------------------------------------------------------------------------

def _fake_datafree(monkeypatch, datafree):
    res = {"rows": []}
    monkeypatch.setattr(datafree, "run", lambda **kw: res)
    monkeypatch.setattr(datafree, "table", lambda r: "table")
    monkeypatch.setattr(datafree, "plot", lambda r, path: open(path, "wb").close())
    return res


def test_datafree_quick_writes_nothing_into_notes(monkeypatch, tmp_path):
    from benchmarks import datafree

    _fake_datafree(monkeypatch, datafree)
    (tmp_path / "notes").mkdir()
    notes = tmp_path / "repo_notes"
    notes.mkdir()
    monkeypatch.setattr(datafree, "NOTES_DIR", str(notes))
    monkeypatch.chdir(tmp_path)
    datafree.main(["--quick"])
    assert list((tmp_path / "notes").iterdir()) == [] and list(notes.iterdir()) == []
    # asked explicitly: written where asked
    datafree.main(["--quick", "--out", str(tmp_path / "q")])
    assert json.loads((tmp_path / "q.json").read_text()) == {"rows": []}
    assert (tmp_path / "q.png").exists()


def test_datafree_full_run_writes_the_repository_notes_whatever_the_cwd(monkeypatch, tmp_path):
    from benchmarks import datafree

    _fake_datafree(monkeypatch, datafree)
    notes = tmp_path / "repo_notes"
    notes.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setattr(datafree, "NOTES_DIR", str(notes))
    monkeypatch.chdir(elsewhere)
    datafree.main([])
    assert sorted(p.name for p in notes.iterdir()) == ["datafree.json", "datafree.png"]
    assert list(elsewhere.iterdir()) == []


def test_latency_default_output_is_the_repository_notes_whatever_the_cwd(monkeypatch, tmp_path):
    from benchmarks import latency

    notes = tmp_path / "repo_notes"
    notes.mkdir()
    monkeypatch.setattr(latency, "NOTES_DIR", str(notes))
    monkeypatch.setattr(latency, "whole_model", lambda *a: ([], {}, [], None, 0.0))
    monkeypatch.setattr(latency, "per_layer", lambda *a: [])
    monkeypatch.setattr(latency, "render", lambda *a: "figures\n")
    monkeypatch.chdir(tmp_path)
    latency.main(["--layer-shapes", "0"])
    assert (notes / "latency.md").read_text() == "figures\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo_notes"]


def test_ridge_pareto_png_default_is_the_repository_notes(monkeypatch, tmp_path):
    from benchmarks import common, ridge_pareto

    lines = tmp_path / "rows.jsonl"
    lines.write_text("")
    seen = []
    monkeypatch.setattr(ridge_pareto, "load", lambda path: [])
    monkeypatch.setattr(ridge_pareto, "plot", lambda rows, png: seen.append(png))
    monkeypatch.chdir(tmp_path)
    ridge_pareto.main(["--plot", str(lines)])
    assert seen == [os.path.join(common.NOTES_DIR, "ridge.png")]


def test_vit_compress_quick_without_out_dir_leaves_notes_alone(monkeypatch, tmp_path):
    from benchmarks import vit_compress

    notes = tmp_path / "repo_notes"
    notes.mkdir()
    monkeypatch.setattr(vit_compress, "NOTES", str(notes))
    def stop(path):  # the first thing after the output folder is chosen
        raise KeyboardInterrupt

    monkeypatch.setattr(vit_compress, "load_vit", stop)
    made = []
    real_makedirs = os.makedirs
    monkeypatch.setattr(vit_compress.os, "makedirs",
                        lambda p, **kw: (made.append(p), real_makedirs(p, **kw)))
    with pytest.raises(KeyboardInterrupt):
        vit_compress.main(["--quick"])
    assert made and os.path.abspath(made[0]) != str(notes)
    assert list(notes.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):
        vit_compress.main([])  # a full run still defaults to notes/
    assert made[-1] == str(notes)


def test_cp_exact_load_average_needs_no_external_program(monkeypatch):
    from benchmarks import cp_exact

    monkeypatch.setenv("PATH", "")  # no `uptime` to run
    text = cp_exact._load_average()
    assert text.startswith("load average")


# ---------------------------------------------------------------------------
# speed figures: the default-thread figure first, then the pinned one
# ---------------------------------------------------------------------------

def test_collect_cost_times_default_threads_first_then_one(capsys):
    from benchmarks import collect_cost

    before = torch.get_num_threads()
    results = collect_cost.main(["--quick", "--images", "4", "--batch", "4", "--width", "4",
                                 "--fractions", "0.5"])
    assert torch.get_num_threads() == before  # restored
    assert [setting for setting, _, _ in results] == ["default", 1]
    out = capsys.readouterr().out
    assert out.index("threads: default") < out.index("threads: 1\n")
    for _, times, med in results:
        assert all(len(v) == 2 for v in times.values())  # --quick: two repeats, median
        # the printed ratio is the one of the stored medians
        ratio = med["collect (all)"] / med["forward"]
        assert f"| collect (all) | {med['collect (all)']:.3f} | {ratio:.2f} |" in out


def test_als_convergence_defaults_to_unpinned_threads(monkeypatch, tmp_path, capsys):
    import numpy as np
    import threadpoolctl

    from benchmarks import als_convergence

    def covariance(channels, k):  # a cheap full-rank second moment in place of the real one
        X = np.random.default_rng(0).standard_normal((2 * channels * k * k, channels * k * k))
        return X.T @ X / X.shape[0], "random"

    calls = []
    monkeypatch.setattr(threadpoolctl, "threadpool_limits", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(als_convergence, "realistic_covariance", covariance)
    monkeypatch.setattr(als_convergence, "plot", lambda *a: False)  # matplotlib: seconds
    summary = als_convergence.main(["--quick", "--runs", "1", "--baseline-runs", "1",
                                    "--baseline-sweeps", "2", "--sweeps", "3",
                                    "--out", str(tmp_path)])
    assert calls == []  # nothing pinned at the default settings
    assert "threads default" in summary and "medians of 1 runs" in summary
    with open(tmp_path / "als_tucker2.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["method"] for r in rows} == {"published", "ours", "hooi"}
    als_convergence.main(["--quick", "--runs", "1", "--baseline-runs", "1",
                          "--baseline-sweeps", "2", "--sweeps", "3", "--threads", "1",
                          "--out", str(tmp_path)])
    assert calls == [(1,)]


def test_als_convergence_medians_the_published_method_over_several_runs(monkeypatch):
    import numpy as np

    from benchmarks import als_convergence

    seen = {}
    real = als_convergence.argparse.ArgumentParser.parse_args

    def spy(self, argv=None, namespace=None):
        ns = real(self, argv, namespace)
        seen.update(vars(ns))
        return ns

    def stop(*args):  # the first timed run: the settings are known by then
        raise KeyboardInterrupt

    monkeypatch.setattr(als_convergence.argparse.ArgumentParser, "parse_args", spy)
    monkeypatch.setattr(als_convergence, "run_published", stop)
    monkeypatch.setattr(als_convergence, "realistic_covariance",
                        lambda channels, k: (np.eye(channels * k * k), "identity"))
    with pytest.raises(KeyboardInterrupt):
        als_convergence.main([])
    assert seen["baseline_runs"] >= 3 and seen["runs"] >= 3
    assert seen["threads"] == "default"


def test_prepared_sigma_defaults_to_torch_default_threads(monkeypatch, capsys):
    from benchmarks import prepared_sigma

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    monkeypatch.setattr(prepared_sigma, "reference_layers",
                        lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepared_sigma.main(["--quick"])
    assert calls == []
    assert "torch threads: default" in capsys.readouterr().out
    with pytest.raises(KeyboardInterrupt):
        prepared_sigma.main(["--quick", "--threads", "1"])
    assert calls == [1]


# ---------------------------------------------------------------------------
# outputs: written where asked, loadable, equal to what is printed
# ---------------------------------------------------------------------------

def test_cp_exact_quick_csv_matches_what_it_prints(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = tmp_path / "new" / "curves.csv"  # the folder is made
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cp_exact", "--quick",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    printed = [line for line in proc.stdout.splitlines() if line.startswith("random/")]
    configs = sorted({r["config"] for r in rows})
    assert len(printed) == len(configs) >= 1
    for line in printed:
        config = line.split()[1].rstrip(":")
        last = [r for r in rows if r["config"] == config][-1]
        assert f"{last['sweep']} sweeps" in line
        assert f"error {float(last['error']):.6f}" in line


def test_sequential_quick_runs_only_the_two_main_variants(monkeypatch, capsys):
    from types import SimpleNamespace

    from benchmarks import sequential

    calls = []

    def run_one(model, method, rx, variant, loader, **kw):
        calls.append((method, rx, variant))
        return None, SimpleNamespace(ratio=rx, layer_ratio=rx, layers=[], refitted=None), 1.0

    monkeypatch.setattr(sequential, "reference_setup", lambda *a: (None, None, None, None))
    monkeypatch.setattr(sequential, "make_loader", lambda *a, **k: None)
    monkeypatch.setattr(sequential, "evaluate", lambda *a, **k: 0.5)
    monkeypatch.setattr(sequential, "run_one", run_one)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    result = sequential.main(["--quick"])
    assert calls == [(m, 4.0, v) for m in ("tucker2", "cp") for v in ("oneshot", "sequential")]
    assert [r["variant"] for r in result["rows"]] == [c[2] for c in calls]
    calls.clear()
    sequential.main(["--quick", "--variants", "budget"])  # given: as given
    assert [c[2] for c in calls] == ["budget", "budget"]


def test_datafree_quick_is_a_small_subset_unless_told_otherwise(monkeypatch, tmp_path):
    from benchmarks import datafree

    seen = []
    monkeypatch.setattr(datafree, "run", lambda **kw: seen.append(kw) or {"rows": []})
    monkeypatch.setattr(datafree, "table", lambda r: "table")
    monkeypatch.setattr(datafree, "plot", lambda r, path: None)
    monkeypatch.setattr(datafree, "NOTES_DIR", str(tmp_path))
    datafree.main(["--quick"])
    assert seen[-1]["methods"] == ["tucker2"]
    assert seen[-1]["variants"] == ["frobenius", "bn-prop-fit", "real"]
    datafree.main(["--quick", "--methods", "cp", "--variants", "synthetic"])
    assert seen[-1]["methods"] == ["cp"] and seen[-1]["variants"] == ["synthetic"]
    datafree.main([])  # a full run: both methods, the script's default variants
    assert seen[-1]["methods"] == ["tucker2", "cp"] and seen[-1]["variants"] is None


def test_als_cp_quick_caps_the_run_to_convergence_and_times_default_threads_first(monkeypatch):
    import contextlib

    import numpy as np
    import threadpoolctl

    from benchmarks import als_cp

    pinned, runs = [], []

    @contextlib.contextmanager
    def record(limits=None, **kw):
        pinned.append(limits)
        yield

    def run_all(K, S, ranks, n_fro, n_sig, reps, conv_sweeps=None):
        runs.append((ranks, reps, conv_sweeps))
        return [], {"threads": pinned[-1]}

    monkeypatch.setattr(threadpoolctl, "threadpool_limits", record)
    monkeypatch.setattr(als_cp, "_run_all", run_all)
    monkeypatch.setattr(als_cp, "realistic_covariance", lambda **kw: (np.eye(1152), "identity"))
    sums = als_cp.main(["--quick"])
    assert pinned == [None, 1]  # the libraries' defaults first, then pinned
    assert [threads for threads, _ in sums] == ["default", 1]
    assert runs == [((32,), 2, 10)] * 2


@pytest.mark.filterwarnings("ignore:'benchmarks.training' found in sys.modules:RuntimeWarning")
def test_the_shared_training_module_says_which_scripts_to_run():
    import runpy

    with pytest.raises(SystemExit) as exc:
        runpy.run_module("benchmarks.training", run_name="__main__")
    assert "benchmarks.train_reference" in str(exc.value.code)
    assert "benchmarks.train_vit" in str(exc.value.code)

"""The README's Python examples are executed (doctest), so they stay true."""

import doctest
import os

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_examples():
    pytest.importorskip("torch")
    failures, tried = doctest.testfile(README, module_relative=False, optionflags=doctest.ELLIPSIS)
    assert tried > 5
    assert failures == 0


def _readme_text():
    with open(README) as f:
        return f.read()


def test_readme_references_exist():
    """Every note, example and ``python -m`` module the README points to is there."""
    import re

    root = os.path.dirname(README)
    text = _readme_text()
    paths = set(re.findall(r"(?:notes|examples)/[\w./-]+\.(?:md|py|json)", text))
    assert len(paths) > 10
    for path in sorted(paths):
        assert os.path.isfile(os.path.join(root, path)), path
    modules = set(re.findall(r"python -m (benchmarks\.\w+)", text))
    assert modules
    for module in sorted(modules):
        assert os.path.isfile(os.path.join(root, *module.split(".")) + ".py"), module


def test_readme_public_names_exist():
    """Every dotted ``sigmadecomp...`` name and every bare adapter function the README
    names can be imported."""
    import importlib
    import re

    pytest.importorskip("torch")
    text = _readme_text()
    dotted = set(re.findall(r"`(sigmadecomp(?:_torch)?(?:\.[A-Za-z_]\w*)+)", text))
    assert len(dotted) > 5
    for name in sorted(dotted):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):  # longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for attr in parts[i:]:
                obj = getattr(obj, attr)
            break
    import sigmadecomp_torch

    bare = ["collect_covariances", "compress", "default_layers", "load_compressed",
            "covariances_from_batchnorm", "shrink_covariances", "quantized_state_dict",
            "measure_latency", "TTConv2d", "CompressionReport"]
    for name in bare:
        assert f"`{name}" in text or f"{name}(" in text, name
        assert hasattr(sigmadecomp_torch, name), name
    assert sigmadecomp_torch.TTConv2d.max_chunk_elements > 0
    assert callable(sigmadecomp_torch.CompressionReport.from_json)


def test_readme_solver_call_shape():
    """The one call shape the README gives for every solver."""
    import inspect

    import sigmadecomp as sd

    text = " ".join(_readme_text().split())
    assert ("`solver(weight, rank_or_ranks, sigma=None, *, init, n_iter_max, tol, rng, "
            "callback, rtol, ridge, inner)`") in text
    shared = {"init", "n_iter_max", "tol", "rng", "callback", "rtol", "ridge", "inner"}
    for solver in (sd.sigma_svd, sd.tucker2, sd.cp, sd.tt_conv, sd.tt_linear):
        params = list(inspect.signature(solver).parameters.values())
        assert [p.kind for p in params[:3]] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 3
        assert params[2].name == "sigma" and params[2].default is None
        keyword_only = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert shared <= keyword_only, (solver.__name__, shared - keyword_only)


def test_readme_command_line_options_exist():
    """Every ``--option`` the README names belongs to the ``sigmadecomp`` command (or to
    the other tools it shows: pip, torchrun, pytest, the benchmark scripts)."""
    import argparse
    import re

    pytest.importorskip("torch")
    from sigmadecomp_torch.cli import build_parser

    others = {"--index-url", "--nproc_per_node", "--runslow", "--methods", "--arch"}
    known = set()
    parsers = [build_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            known.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", _readme_text()))
    assert len(named) > 15
    assert not named - known - others, sorted(named - known - others)

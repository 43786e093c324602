"""The TT evaluation benchmark (benchmarks/tt_evaluation.py) in its quick mode."""

import json

import pytest

torch = pytest.importorskip("torch")


def test_quick_run_writes_every_figure_it_prints(tmp_path, capsys):
    from benchmarks import tt_evaluation

    out = tmp_path / "tt.json"
    assert tt_evaluation.main(["--quick", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["rounds"] == 1 and len(data["layers"]) == 4 and len(data["model"]) == 1
    for row in data["layers"]:
        assert set(row["ms"]) == {"dense", "chain", "kernel, rebuilt", "auto"}
        assert all(v > 0 for v in row["ms"].values())
        assert tt_evaluation._layer_line(row) in text  # the printed row is the stored one
    row = data["model"][0]
    assert tt_evaluation._model_line(row) in text
    macs = row["macs_per_image"]
    # in inference auto runs the kept dense kernels: the original's multiply-adds for the
    # TT layers' share; the chain costs more
    assert macs["auto"] == macs["original"] < macs["chain"]


def test_bad_arguments_are_refused_by_name(tmp_path):
    from benchmarks import tt_evaluation

    for argv, text in ((["--rounds", "0"], "--rounds"), (["--min-run-time", "-1"], "--min-run-time"),
                       (["--json", str(tmp_path / "no" / "such" / "dir" / "x.json")], "--json")):
        with pytest.raises(SystemExit) as info:
            tt_evaluation.main(argv)
        assert info.value.code == 2, argv

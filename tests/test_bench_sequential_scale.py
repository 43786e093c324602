"""The ResNet-18 sequential/refit scale benchmark runs end to end in its quick mode."""

import pytest

pytest.importorskip("torch")


def test_sequential_scale_quick_runs():
    from benchmarks import sequential_scale

    rows = sequential_scale.main(["--quick"])
    assert [r["run"] for r in rows] == list(sequential_scale.RUNS)
    assert all(r["seconds"] > 0 and r["peak_rss_mib"] > 0 and r["layers"] == 2 for r in rows)
    assert [r["refitted"] for r in rows] == [[], ["fc"], ["fc"]]
    assert rows[2]["groups"] == 2  # conv1 then conv2 (it reads conv1's output)


def test_sequential_scale_quick_runs_on_resnet50():
    from benchmarks import sequential_scale

    rows = sequential_scale.main(["--quick", "--arch", "resnet50"])
    # Bottleneck blocks: layer1.0.conv1 (1x1, SVD) feeds layer1.0.conv2 (3x3, Tucker-2)
    assert all(r["layers"] == 2 for r in rows)
    assert [r["refitted"] for r in rows] == [[], ["fc"], ["fc"]]
    assert rows[2]["groups"] == 2

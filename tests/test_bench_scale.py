"""The ResNet-18 scale benchmark runs end to end in its quick mode."""

import pytest

pytest.importorskip("torch")


@pytest.mark.slow  # a minute on a loaded 2-core machine (a whole ResNet-18 forward and latency)
def test_scale_quick_runs_and_writes_notes(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import scale

    out = scale.main(["--quick", "--methods", "tucker2"])
    assert out["forward_s"] > 0 and out["statistics_s"] > 0
    assert out["statistics_mib"] > 0
    runs = out["runs"]
    assert [(r["method"], r["threads"]) for r in runs] == [("tucker2", "default"), ("tucker2", "1")]
    for r in runs:
        assert [n for n, _ in r["layers"]] == ["layer1.0.conv1", "layer1.0.conv2"]
        assert r["seconds"] >= sum(s for _, s in r["layers"])
        assert r["compression"] > 1
    assert set(runs[0]["latency_s"]) == {1} and runs[0]["latency_s"][1] > 0
    md, png = tmp_path / "scale.md", tmp_path / "scale.png"
    scale.write_notes(out, str(md), str(png))
    text = md.read_text()
    assert "| tucker2 | default |" in text and "| tucker2 | 1 |" in text
    assert png.stat().st_size > 1000

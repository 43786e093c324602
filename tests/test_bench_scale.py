"""The ResNet-18 scale benchmark runs end to end in its quick mode."""

import pytest

pytest.importorskip("torch")


@pytest.mark.slow  # about a minute on a loaded 2-core machine (spawns 2 gloo processes)
def test_scale_quick_runs_and_writes_notes(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import scale

    out = scale.main(["--quick", "--methods", "tucker2", "--settings", "1:default,1:1,2:1"])
    assert out["forward_s"] > 0 and out["statistics_s"] > 0
    assert out["statistics_mib"] > 0
    runs = out["runs"]
    assert [(r["method"], r["processes"], r["threads"]) for r in runs] == [
        ("tucker2", 1, "default"), ("tucker2", 1, "1"), ("tucker2", 2, "1")]
    for r in runs:
        assert [row["name"] for row in r["report"]] == ["layer1.0.conv1", "layer1.0.conv2"]
        assert all(0 <= row["sigma_error"] < 1 for row in r["report"])
        assert r["peak_rss_mib"] > 0
    for r in runs[:2]:  # one process: the whole call includes every layer's time
        assert r["seconds"] >= sum(row["seconds"] for row in r["report"])
    # two processes, one thread each: the same model as one process with one thread
    assert runs[2]["identical_to_1_process"] is True
    lat = out["latency"]
    assert list(lat) == [name for name, _ in scale.LATENCY_VARIANTS]
    for per in lat.values():
        # the original and the one-process default-thread model, one round at batch 1
        assert set(per) == {"original", "tucker2"}
        assert all(set(v) == {1} and len(v[1]) == 1 and v[1][0] > 0 for v in per.values())
    md, png = tmp_path / "scale.md", tmp_path / "scale.png"
    scale.write_notes(out, str(md), str(png))
    text = md.read_text()
    assert "| tucker2 | 2 | 1 | default |" in text and "| tucker2 | 2 | 2 | 1 |" in text
    assert "| layer1.0.conv2 |" in text
    assert "| default threads | 1 |" in text and "speed-up tucker2" in text
    assert png.stat().st_size > 1000


def test_scale_settings_are_checked():
    from benchmarks import scale

    assert scale._parse_settings("1:default,2:1") == [(1, "default"), (2, "1")]
    with pytest.raises(ValueError, match="P:T"):
        scale._parse_settings("2:many")

"""The compress-memory benchmark runs end to end in its quick mode."""

import pytest

pytest.importorskip("torch")


def test_compress_memory_quick_measures_every_configuration(tmp_path):
    import json

    from benchmarks import compress_memory

    path = tmp_path / "rows.json"
    rows = compress_memory.main(["--quick", "--json", str(path)])
    assert [r["config"] for r in rows] == [c[0] for c in compress_memory.CONFIGS]
    assert json.loads(path.read_text()) == rows
    n_in = {"layer1.0.conv1": 64 * 9, "layer1.0.conv2": 64 * 9}  # ResNet-18, 3x3 convs
    for r, (_, dtype, _, _) in zip(rows, compress_memory.CONFIGS):
        assert r["layers"] == 2
        size = 8 if dtype == "float64" else 4
        assert r["statistics_mib"] == sum(size * n * n for n in n_in.values()) / 2**20
        assert r["peak_rss_mib"] >= r["rss_after_statistics_mib"] > 0
        assert r["compress_s"] > 0

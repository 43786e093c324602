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
    # --quick leaves the torch.compile settings out
    assert list(lat) == [name for name, kw in scale.LATENCY_VARIANTS if not kw.get("compile")]
    assert out["latency_failed"] == {}
    for per in lat.values():
        # the original and the one-process default-thread model, one round at batch 1
        assert set(per) == {"original", "tucker2"}
        assert all(set(v) == {1} and len(v[1]) == 1 and v[1][0] > 0 for v in per.values())
    md, png = tmp_path / "new" / "scale.md", tmp_path / "new" / "scale.png"  # folder made
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


def _tiny():
    import torch

    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                               torch.nn.ReLU()).eval()


def test_latency_rounds_prepare_each_model_once_and_record_failures(monkeypatch):
    import argparse

    from benchmarks import scale

    prepared = []
    real_prepare = scale.prepare

    def prepare(model, batch, size, **kw):
        if kw.get("fold_bn"):
            raise RuntimeError("no fuse here")
        prepared.append((id(model), batch, tuple(sorted(kw.items()))))
        return real_prepare(model, batch, size, **kw)

    monkeypatch.setattr(scale, "prepare", prepare)
    models = {"original": _tiny(), "small": _tiny()}
    args = argparse.Namespace(size=8, min_run_time=0.001, latency_rounds=3, compile=False)
    lat, failed = scale.latency_rounds(models, [1, 2], args)
    timed = [n for n, kw in scale.LATENCY_VARIANTS if not kw.get("compile")]
    assert list(lat) == [n for n in timed if n != "channels_last, BatchNorm folded"]
    assert failed == {"channels_last, BatchNorm folded": "RuntimeError: no fuse here"}
    # every (variant, model, batch) prepared once, timed in each of the 3 rounds
    assert len(prepared) == 2 * 2 * len(lat)
    for per in lat.values():
        assert all(len(v) == 3 and min(v) > 0 for by_b in per.values() for v in by_b.values())


@pytest.mark.slow  # compiling takes seconds even for a tiny model
def test_prepare_compiles_once_to_the_same_function():
    import shutil

    import torch

    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        pytest.skip("torch.compile needs a C++ compiler on CPU")
    from benchmarks import scale

    model = _tiny()
    compiled, x = scale.prepare(model, 2, 8, compile=True, channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert scale.time_model(compiled, x, 0.01) > 0


def test_scale_quick_resnet50_counts_multiply_adds_and_names_its_notes(tmp_path):
    pytest.importorskip("matplotlib")
    import argparse

    from benchmarks import scale
    from benchmarks.latency import count_macs

    out = scale.main(["--quick", "--arch", "resnet50", "--methods", "tucker2",
                      "--settings", "1:default", "--stats-dtype", "float32"])
    assert out["arch"] == "resnet50" and out["stats_dtype"] == "float32"
    # float32 statistics: 4 bytes per entry of every layer's (n, n) Sigma
    model = scale._model("resnet50")
    n_in = {n: m.weight[0].numel() for n, m in model.named_modules()
            if n in ("layer1.0.conv1", "layer1.0.conv2")}
    assert out["statistics_mib"] == sum(4 * n * n for n in n_in.values()) / 2**20
    # Bottleneck blocks: layer1.0.conv1 is a 1x1 conv (SVD), conv2 the 3x3 (Tucker-2)
    rows = out["runs"][0]["report"]
    assert [(r["name"], r["method"]) for r in rows] == [
        ("layer1.0.conv1", "svd"), ("layer1.0.conv2", "tucker2")]
    macs = out["macs"]
    # an independent count of the original: ResNet-50 at 32x32
    x = __import__("torch").rand(1, 3, 32, 32)
    assert macs["original"] == count_macs(model, x)
    assert 0 < macs["tucker2"] < macs["original"]
    args = argparse.Namespace(arch="resnet50", notes=str(tmp_path))
    md, png = scale._notes_paths(args)
    assert md.endswith("scale_resnet50.md") and png.endswith("scale_resnet50.png")
    scale.write_notes(out, md, png)
    text = open(md).read()
    assert text.startswith("# ResNet-50 at scale")
    assert "`python -m benchmarks.scale --arch resnet50 --stats-dtype float32 --methods tucker2`" in text
    assert "stored in float32" in text
    red = macs["original"] / macs["tucker2"]
    assert f"reduction **{red:.2f}x**" in text


def test_scale_passes_the_cp_inner_choice_to_compress(monkeypatch):
    from benchmarks import scale

    seen = []
    real = scale.compress

    def spy(model, method, **kw):
        seen.append((method, kw["options"]))
        return real(model, method, **kw)

    monkeypatch.setattr(scale, "compress", spy)
    out = scale.main(["--quick", "--methods", "cp,tucker2", "--settings", "1:1",
                      "--cp-inner", "adaptive", "--layers", "layer1.0.conv1"])
    assert out["cp_inner"] == "adaptive"
    assert seen == [("cp", {"n_iter_max": 1, "inner": {"maxiter": "adaptive"}}),
                    ("tucker2", {"n_iter_max": 1, "init_iter_max": 1})]
    assert [r["method"] for r in out["runs"]] == ["cp", "tucker2"]
    assert scale._options("cp", None) == {}  # exact: cp's own default

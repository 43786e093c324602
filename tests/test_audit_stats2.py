"""Audit of the statistics collection: token masks on flattened inputs, files, merges."""

import re
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from _helpers import assert_row_stats  # noqa: E402
from sigmadecomp_torch import collect_covariances  # noqa: E402

F64 = torch.float64


class FlattenLM(nn.Module):
    """A token model that flattens (batch, seq, d) to (batch*seq, d) before ``out``."""

    def __init__(self, d=4, seq_first=False, heads=False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, d)
        self.proj = nn.Linear(d, d)
        self.out = nn.Linear(d // 2 if heads else d, 3)
        self.seq_first, self.heads = seq_first, heads

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        if self.seq_first:
            h = h.transpose(0, 1)  # (seq, batch, d)
        h = self.proj(h)
        if self.heads:  # (batch, seq, 2, d/2): per-head rows
            return self.out(h.reshape(*h.shape[:2], 2, -1))
        return self.out(h.reshape(-1, h.shape[-1]))


def _token_batch():
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return {"input_ids": ids, "attention_mask": mask}


def test_flattened_tokens_are_masked_by_default():
    model, batch = FlattenLM(), _token_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = collect_covariances(model, [batch], progress=False)
    with torch.no_grad():
        h = model.proj(model.emb(batch["input_ids"]))
    real = batch["attention_mask"].bool()
    assert_row_stats(stats["out"], h[real])
    assert_row_stats(stats["proj"], model.emb(batch["input_ids"]).detach()[real])


def test_flattened_tokens_masked_without_any_3d_layer():
    model, batch = FlattenLM(), _token_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = collect_covariances(model, [batch], layers=["out"], progress=False)
    with torch.no_grad():
        h = model.proj(model.emb(batch["input_ids"]))
    assert_row_stats(stats["out"], h[batch["attention_mask"].bool()])


def test_per_head_4d_input_is_masked():
    model, batch = FlattenLM(heads=True), _token_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = collect_covariances(model, [batch], layers=["out"], progress=False)
    with torch.no_grad():
        h = model.proj(model.emb(batch["input_ids"]))
    rows = h[batch["attention_mask"].bool()].reshape(-1, 2)
    assert stats["out"].count == 5 * 2
    assert_row_stats(stats["out"], rows)


def test_sequence_first_flattened_tokens_warn():
    model, batch = FlattenLM(seq_first=True), _token_batch()
    with pytest.warns(RuntimeWarning, match=r"mask=lambda b: <mask>\.T"):
        collect_covariances(model, [batch], progress=False)
    # the way out the warning names: a mask in the model's (seq, batch) layout
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = collect_covariances(model, [batch], progress=False,
                                    mask=lambda b: b["attention_mask"].T)
    with torch.no_grad():
        h = model.proj(model.emb(batch["input_ids"]).transpose(0, 1))
    assert_row_stats(stats["out"], h[batch["attention_mask"].T.bool()])


def test_additive_attention_mask_is_refused_with_the_way_out():
    model, batch = FlattenLM(), _token_batch()
    additive = dict(batch, attention_mask=(1 - batch["attention_mask"]) * -10000.0)
    with pytest.raises(ValueError, match=r"holds the value -10000\.0; a token mask holds 0/1"
                                         r".*mask=lambda b: b\['attention_mask'\] == 0"):
        collect_covariances(model, [additive], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = collect_covariances(model, [additive], progress=False,
                                    mask=lambda b: b["attention_mask"] == 0)
    with torch.no_grad():
        h = model.proj(model.emb(batch["input_ids"]))
    assert_row_stats(stats["out"], h[batch["attention_mask"].bool()])
    # a float 0/1 mask is a token mask
    floats = dict(batch, attention_mask=batch["attention_mask"].double())
    assert collect_covariances(model, [floats], progress=False)["out"].count == 5


def test_only_a_2d_mask_is_matched_to_flattened_tokens():
    model, batch = FlattenLM(), _token_batch()
    # an extended (batch, 1, 1, seq) mask is not matched to the (batch*seq, d) rows
    extended = dict(batch, attention_mask=batch["attention_mask"][:, None, None, :])
    with pytest.warns(RuntimeWarning, match="no chosen Linear layer had an input of the "
                                            "mask's shape"):
        stats = collect_covariances(model, [extended], layers=["out"], progress=False)
    assert stats["out"].count == 6


# ------------------------------------------------------------------ statistics files


def _conv_stats(dtype=F64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, groups=2),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
    return collect_covariances(model, [torch.randn(2, 2, 5, 5)], progress=False, dtype=dtype)


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_damaged_tensor_bytes_are_refused(tmp_path, ext):
    from sigmadecomp_torch import load_covariances, save_covariances

    stats = _conv_stats(torch.float32)
    path = str(tmp_path / ("stats" + ext))
    save_covariances(stats, path)
    back = load_covariances(path)
    for k in stats:  # the round trip is exact, dtype included
        assert back[k].sigma.dtype == torch.float32
        assert torch.equal(back[k].sigma, stats[k].sigma)
        assert torch.equal(back[k].mean, stats[k].mean)
    raw = bytearray(open(path, "rb").read())
    # damage the bytes of the first layer's sigma (found by its float32 values)
    needle = stats["0"].sigma.reshape(-1)[5:9].numpy().tobytes()
    at = bytes(raw).find(needle)
    assert at > 0
    raw[at:at + 4] = bytes(b ^ 0xFF for b in raw[at:at + 4])
    bad = str(tmp_path / ("bad" + ext))
    with open(bad, "wb") as f:
        f.write(bytes(raw))
    with pytest.raises(ValueError, match=r"bad.*layer '0'.*checksum.*corrupt"):
        load_covariances(bad)


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_unusable_map_location_is_named_not_blamed_on_the_file(tmp_path, ext):
    from sigmadecomp_torch import load_covariances, save_covariances

    stats = _conv_stats()
    path = str(tmp_path / ("stats" + ext))
    save_covariances(stats, path)
    with pytest.raises(ValueError, match=r"map_location='nowhere' is not allowed: that "
                                         r"device is not available"):
        load_covariances(path, map_location="nowhere")
    with pytest.raises(TypeError, match=r"map_location=2\.5 is not allowed"):
        load_covariances(path, map_location=2.5)
    back = load_covariances(path, map_location=torch.device("cpu"))
    assert back["0"].sigma.device.type == "cpu"
    assert torch.equal(back["0"].sigma, stats["0"].sigma)


def test_records_that_do_not_fit_sigma_are_refused(tmp_path):
    from sigmadecomp_torch import LayerStats, load_covariances

    eye, zero = torch.eye(3, dtype=F64), torch.zeros(3, dtype=F64)
    with pytest.raises(ValueError, match=r"weight_shape=\(4, 5\).*Linear.*n=3"):
        LayerStats(eye, zero, 3, kind="Linear", weight_shape=(4, 5))
    with pytest.raises(ValueError, match=r"weight_shape=\(4, 3\).*Conv2d.*n=3"):
        LayerStats(eye, zero, 3, kind="Conv2d", weight_shape=(4, 3))
    LayerStats(eye, zero, 3, kind="Conv2d", weight_shape=(4, 3, 1, 1))  # fits
    path = str(tmp_path / "edited.pt")
    torch.save({"format": "sigmadecomp.covariances/2",
                "layers": {"fc": {"sigma": eye, "mean": zero, "count": 3, "layer": "",
                                  "groups": 1, "kind": "Linear", "weight_shape": [4, 5],
                                  "geometry": "null"}}}, path)
    with pytest.raises(ValueError, match=r"edited\.pt.*layer 'fc' are damaged.*weight_shape"):
        load_covariances(path)


# ------------------------------------------------------------ two processes (gloo)


def _lm_batches():
    g = torch.Generator().manual_seed(3)
    out = []
    for b, L in ((2, 4), (3, 2), (1, 5)):
        ids = torch.randint(1, 10, (b, L), generator=g)
        mask = torch.ones(b, L, dtype=torch.long)
        mask[0, -1] = 0  # one padded token per batch
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _stats_worker(rank, init_file, out_dir):
    import os

    import torch.distributed as dist

    from sigmadecomp_torch import save_covariances

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank,
                            world_size=2)
    try:
        # uneven shares: process 0 reads every batch, process 1 none
        shard = _lm_batches() if rank == 0 else []
        stats = collect_covariances(FlattenLM(), shard, progress=False)
        save_covariances(stats, os.path.join(out_dir, f"rank{rank}.pt"))
        shard = _lm_batches()[rank::2]  # and 2 / 1 batches
        stats = collect_covariances(FlattenLM(), shard, progress=False)
        save_covariances(stats, os.path.join(out_dir, f"split{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_with_masks_and_an_idle_process(tmp_path):
    import torch.distributed as dist

    from _helpers import spawn_workers
    from sigmadecomp_torch import load_covariances

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    spawn_workers(_stats_worker, (str(tmp_path / "init"), str(tmp_path)), 2, 60.0,
                  "two-process statistics")
    single = collect_covariances(FlattenLM(), _lm_batches(), progress=False)
    assert single["out"].count == sum(int(b["attention_mask"].sum()) for b in _lm_batches())
    for name in ("rank0", "rank1", "split0", "split1"):
        got = load_covariances(tmp_path / f"{name}.pt")
        assert list(got) == list(single)
        for k, s in single.items():
            assert got[k].count == s.count
            torch.testing.assert_close(got[k].sigma, s.sigma, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got[k].mean, s.mean, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------ data helpers


def test_synthetic_images_name_the_bad_argument():
    from sigmadecomp_torch.data import synthetic_images

    for bad in (0, None, True, 2.5):
        with pytest.raises(ValueError, match=rf"n={bad!r} is not allowed; n must be a positive"):
            synthetic_images(bad, (1, 4, 4))
    for kw, name in ((dict(mean=float("nan")), "mean"), (dict(std=float("inf")), "std"),
                     (dict(std=0.0), "std"), (dict(smoothness=float("inf")), "smoothness")):
        with pytest.raises(ValueError, match=rf"{name}=.* is not allowed"):
            synthetic_images(2, (1, 4, 4), **kw)
    x = synthetic_images(2, (1, 4, 4), mean=0.5, std=1, smoothness=0)
    assert bool(torch.isfinite(x).all()) and x.shape == (2, 1, 4, 4)


def test_subset_refuses_labels_of_another_length():
    from sigmadecomp_torch.data import subset

    with pytest.raises(ValueError, match="labels has 3 entries but images has 5"):
        subset(torch.zeros(5, 2), torch.arange(3), 2)
    with pytest.raises(ValueError, match="labels has 7 entries but images has 5"):
        subset(torch.zeros(5, 2), torch.arange(7))  # (no limit: it used to pass silently)
    x, y = subset(torch.arange(5.0)[:, None], torch.arange(5), 3, seed=1)
    assert torch.equal(x[:, 0].long(), y)  # images and labels stay paired


def test_make_loader_names_a_bad_seed():
    from sigmadecomp_torch.data import make_loader

    with pytest.raises(TypeError, match="seed=None is not allowed; seed must be an integer"):
        make_loader(torch.zeros(5, 2), batch_size=2, shuffle=True, seed=None)


# ------------------------------------------------------------------ argument checks


def test_device_and_seed_are_checked_by_name():
    lin, data = nn.Linear(2, 2), [torch.randn(3, 2)]
    with pytest.raises(ValueError, match=r"device='nowhere' is not allowed: that device is "
                                         "not available"):
        collect_covariances(lin, data, progress=False, device="nowhere")
    with pytest.raises(TypeError, match=r"device=2\.5 is not allowed"):
        collect_covariances(lin, data, progress=False, device=2.5)
    for bad in (1.5, True):  # (1.5 used to be truncated to 1 without a word)
        with pytest.raises(TypeError, match=rf"seed={bad!r} is not allowed; seed must be an "
                                            "integer"):
            collect_covariances(lin, data, progress=False, seed=bad, position_fraction=0.5)
    s = collect_covariances(lin, data, progress=False, device=torch.device("cpu"), seed=3)[""]
    assert_row_stats(s, data[0])


def test_image_folder_size_is_checked_by_name(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    import numpy as np

    from sigmadecomp_torch.data import ImageFolder

    Image.fromarray(np.zeros((6, 5, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    for bad in (True, 0, (4, 0), (4,), "8"):
        with pytest.raises(ValueError, match=re.escape(f"size={bad!r} is not allowed; size "
                                                       "must be")):
            ImageFolder(tmp_path, size=bad)
    x, label = ImageFolder(tmp_path, size=(3, 4))[0]
    assert tuple(x.shape) == (3, 3, 4) and label == -1
    assert tuple(ImageFolder(tmp_path, size=np.int64(2))[0][0].shape) == (3, 2, 2)


def test_second_name_of_a_shared_module_is_explained():
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.ReLU(), lin)  # one module, names '0' and '2'
    data = [torch.randn(2, 3)]
    with pytest.raises(ValueError, match="layers contains '2', a second name of the module "
                                         "'0'.*name it '0'"):
        collect_covariances(model, data, layers=["2"], progress=False)
    with pytest.raises(ValueError, match="'5', which is not a module of the model"):
        collect_covariances(model, data, layers=["5"], progress=False)
    s = collect_covariances(model, data, layers=["0"], progress=False)["0"]
    with torch.no_grad():
        rows = torch.cat([data[0], torch.relu(lin(data[0]))])
    assert_row_stats(s, rows)  # both calls of the shared module


def test_numpy_batches_count_as_tensors():
    import numpy as np

    conv = nn.Conv2d(3, 2, 3).double()
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 5))
    want = collect_covariances(conv, [torch.from_numpy(x)], progress=False)[""]
    for data in (x, [x[:1], x[1:]], [(x, np.arange(2))], [{"input": x}]):
        got = collect_covariances(conv, data, progress=False)[""]
        assert got.count == want.count == 2 * 3 * 3
        torch.testing.assert_close(got.sigma, want.sigma, rtol=1e-13, atol=1e-13)
    with pytest.raises(TypeError, match=r"tuple of 3 items \(float64 NumPy array"):
        collect_covariances(conv, [(x, x, x)], progress=False)
    # a NumPy token mask
    model, batch = FlattenLM(), _token_batch()
    np_batch = dict(batch, attention_mask=batch["attention_mask"].numpy())
    assert collect_covariances(model, [np_batch], progress=False)["out"].count == 5


def test_layer_called_with_a_keyword_input():
    class KeywordCall(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(input=x)

    x = torch.randn(4, 3)
    s = collect_covariances(KeywordCall(), [x], progress=False)["fc"]
    assert_row_stats(s, x)


def test_safetensors_file_of_an_unknown_format_is_refused(tmp_path):
    from safetensors.torch import save_file

    from sigmadecomp_torch import load_covariances

    meta = '{"fc": {"count": 3, "layer": "", "groups": 1}}'
    tensors = {"fc.sigma": torch.eye(2, dtype=F64), "fc.mean": torch.zeros(2, dtype=F64)}
    path = str(tmp_path / "future.safetensors")
    save_file(tensors, path, metadata={"sigmadecomp.layers": meta,
                                       "format": "sigmadecomp.covariances/9"})
    with pytest.raises(ValueError, match=r"future\.safetensors.*unknown format "
                                         r"'sigmadecomp\.covariances/9'"):
        load_covariances(path)
    old = str(tmp_path / "old.safetensors")  # the first format wrote no "format" entry
    save_file(tensors, old, metadata={"sigmadecomp.layers": meta})
    assert load_covariances(old)["fc"].count == 3

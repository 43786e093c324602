"""Statistics files: foreign or corrupt files are refused clearly; layer records."""

import os
import pickle
import shutil

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sigmadecomp_torch import (  # noqa: E402
    LayerStats,
    collect_covariances,
    load_covariances,
    save_covariances,
)

F64 = torch.float64


class QKVNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
        self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x).mean(dim=(2, 3))
        return self.q(h).sum() + self.k(h).sum()


def _stats():
    x = torch.randn(3, 2, 6, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    return collect_covariances(QKVNet().double(), [x], progress=False)


@pytest.fixture(params=[".pt", ".safetensors"])
def saved(request, tmp_path):
    stats = _stats()
    path = os.path.join(tmp_path, "stats" + request.param)
    save_covariances(stats, path)
    return stats, path


def test_round_trip_keeps_layer_records_and_sharing(saved):
    stats, path = saved
    back = load_covariances(path)
    assert list(back) == ["conv", "q", "k"]
    assert back["q"] is back["k"]  # stored once, shared again
    conv = back["conv"]
    assert conv.kind == "Conv2d" and conv.weight_shape == (4, 2, 3, 3)
    assert conv.geometry == {"kernel_size": [3, 3], "stride": [2, 1], "padding": [1, 2],
                             "dilation": [1, 2], "padding_mode": "zeros"}
    assert back["q"].kind == "Linear" and back["q"].geometry is None
    for k in stats:
        assert torch.equal(back[k].sigma, stats[k].sigma)
        assert back[k].weight_shape == stats[k].weight_shape


def test_renamed_files_are_read_by_content(saved, tmp_path):
    stats, path = saved
    other = ".safetensors" if path.endswith(".pt") else ".pt"
    renamed = os.path.join(tmp_path, "renamed" + other)
    shutil.copy(path, renamed)
    back = load_covariances(renamed)
    assert torch.equal(back["conv"].sigma, stats["conv"].sigma)


def test_truncated_files_raise_value_error_naming_the_file(saved, tmp_path):
    _, path = saved
    data = open(path, "rb").read()
    for cut in (len(data) // 2, 40, 9):
        bad = os.path.join(tmp_path, f"cut{cut}" + os.path.splitext(path)[1])
        with open(bad, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(ValueError, match=f"'{bad}'.*(truncated|corrupt|neither)"):
            load_covariances(bad)


def test_safetensors_files_are_recognised_whatever_their_first_byte(tmp_path):
    # a safetensors file starts with its header length (8 bytes, little-endian): one
    # length in 256 starts with 0x80, the first byte of a pickle
    path = os.path.join(tmp_path, "stats.safetensors")
    first_bytes = set()
    for n in range(1, 200):  # header lengths over all residues mod 256
        name = "fc" + "_" * n
        stats = {name: LayerStats(torch.eye(3, dtype=F64), torch.arange(3, dtype=F64), 7,
                                  "Linear")}
        save_covariances(stats, path)
        data = open(path, "rb").read()
        first_bytes.add(data[0])
        back = load_covariances(path)
        assert list(back) == [name] and back[name].count == 7
        assert torch.equal(back[name].sigma, stats[name].sigma)
        assert torch.equal(back[name].mean, stats[name].mean)
        if data[0] == 0x80:  # truncated, it is still reported as a damaged safetensors file
            bad = os.path.join(tmp_path, "cut.pt")
            with open(bad, "wb") as f:
                f.write(data[:40])
            with pytest.raises(ValueError, match="'.*cut.pt' could not be read as a "
                                                 "safetensors file.*truncated"):
                load_covariances(bad)
    assert 0x80 in first_bytes and len(first_bytes) >= 32
    # a legacy (pre-zip) torch.save file, a pickle starting with 0x80, is still one
    legacy = os.path.join(tmp_path, "legacy.pt")
    torch.save({"a": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert open(legacy, "rb").read(1) == b"\x80"
    with pytest.raises(ValueError, match=r"legacy.pt' is a torch.save file of a dict with "
                                         r"keys \['a'\]"):
        load_covariances(legacy)


def test_foreign_files_raise_value_error(tmp_path):
    from safetensors.torch import save_file

    weights = nn.Linear(3, 2).state_dict()
    st = os.path.join(tmp_path, "model.safetensors")
    save_file(weights, st)
    with pytest.raises(ValueError, match=r"model.safetensors' is a safetensors file of 2 "
                                         "tensors.*not written by save_covariances"):
        load_covariances(st)
    pt = os.path.join(tmp_path, "model.pt")
    torch.save(weights, pt)
    with pytest.raises(ValueError, match=r"model.pt' is a torch.save file of a dict with "
                                         r"keys \['bias', 'weight'\]"):
        load_covariances(pt)
    listing = os.path.join(tmp_path, "list.pt")
    torch.save([1, 2], listing)
    with pytest.raises(ValueError, match="list.pt' is a torch.save file of a list"):
        load_covariances(listing)
    pickled = os.path.join(tmp_path, "obj.pt")
    with open(pickled, "wb") as f:
        pickle.dump({"a": {1, 2}}, f, protocol=2)
    with pytest.raises(ValueError, match="obj.pt' could not be read"):
        load_covariances(pickled)
    for name, content in (("empty.pt", b""), ("notes.safetensors", b"hello world\n" * 3)):
        p = os.path.join(tmp_path, name)
        with open(p, "wb") as f:
            f.write(content)
        with pytest.raises(ValueError, match=f"{name}' .*neither a safetensors nor"):
            load_covariances(p)
    with pytest.raises(FileNotFoundError):
        load_covariances(os.path.join(tmp_path, "missing.pt"))


def test_damaged_records_raise_value_error(tmp_path):
    p = os.path.join(tmp_path, "bad.pt")
    torch.save({"format": "sigmadecomp.covariances/2",
                "layers": {"fc": {"sigma": torch.eye(2), "count": 3}}}, p)
    with pytest.raises(ValueError, match="layer 'fc' lack"):
        load_covariances(p)
    torch.save({"format": "sigmadecomp.covariances/2",
                "layers": {"fc": {"sigma": torch.eye(2), "mean": torch.zeros(3),
                                  "count": 3, "layer": "", "groups": 1}}}, p)
    with pytest.raises(ValueError, match="layer 'fc' are damaged.*mean has shape"):
        load_covariances(p)
    torch.save({"format": "sigmadecomp.covariances/2",
                "layers": {"fc": {"same_as": "nope"}}}, p)
    with pytest.raises(ValueError, match="shares the statistics of 'nope'"):
        load_covariances(p)


def test_files_of_the_first_format_still_load(tmp_path):
    p = os.path.join(tmp_path, "v1.pt")
    torch.save({"format": "sigmadecomp.covariances/1",
                "layers": {"fc": {"sigma": torch.eye(2, dtype=F64), "mean": torch.zeros(2, dtype=F64),
                                  "count": 3, "layer": "Linear", "groups": 1}}}, p)
    s = load_covariances(p)["fc"]
    assert s.count == 3 and s.kind is None


def test_check_compatible_refuses_another_layer_of_the_same_size():
    x = torch.randn(2, 2, 8, 8, dtype=F64)
    conv = nn.Conv2d(2, 4, 3, padding=1).double()
    s = collect_covariances(conv, [x], progress=False)[""]
    s.check_compatible(conv, "a")
    s.check_compatible(nn.Conv2d(2, 7, 3, padding=1), "a")  # the output size does not matter
    same_n = [
        nn.Conv2d(2, 4, 3, padding=1, stride=2),        # other stride
        nn.Conv2d(2, 4, 3, padding=0),                  # other padding
        nn.Conv2d(2, 4, 3, padding=2, dilation=2),      # other dilation
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(18, 4, 1),                            # n = 18 as a 1x1 conv
        nn.Conv2d(2, 4, (1, 9)),                        # n = 18 with another kernel
        nn.Linear(18, 4),                               # n = 18 as a Linear layer
    ]
    for other in same_n:
        with pytest.raises(ValueError, match=r"covariances\['a'\] were collected on a Conv2d "
                                             "with weight 4x2x3x3.*the layer is a"):
            s.check_compatible(other, "a")
    with pytest.raises(ValueError, match="Conv2d with weight 4x2x3x3.*groups=2; the layer .*groups=1"):
        collect_covariances(nn.Conv2d(4, 4, 3, groups=2).double(), [torch.randn(1, 4, 5, 5,
                            dtype=F64)], progress=False)[""].check_compatible(
                                nn.Conv2d(4, 4, 3, groups=1))
    with pytest.raises(TypeError, match="BatchNorm2d"):
        s.check_compatible(nn.BatchNorm2d(2))
    # statistics built by hand carry no record: only the size is checked
    hand = LayerStats(torch.eye(18, dtype=F64), torch.zeros(18, dtype=F64), 5)
    hand.check_compatible(nn.Linear(18, 3))
    with pytest.raises(ValueError, match=r"sigma of shape \(18, 18\).*needs \(5, 5\)"):
        hand.check_compatible(nn.Linear(5, 3), "fc")
    # merging statistics of different geometry is refused too
    s2 = collect_covariances(same_n[0].double(), [x], progress=False)[""]
    with pytest.raises(ValueError, match="cannot merge"):
        s + s2


def test_float32_statistics_option():
    x = torch.randn(4, 2, 6, 6, dtype=F64)
    conv = nn.Conv2d(2, 3, 3).double()
    s64 = collect_covariances(conv, [x], progress=False)[""]
    s32 = collect_covariances(conv, [x], progress=False, dtype=torch.float32)[""]
    assert s32.sigma.dtype == torch.float32 and s32.mean.dtype == torch.float32
    torch.testing.assert_close(s32.sigma.double(), s64.sigma, rtol=1e-7, atol=1e-7)
    with pytest.raises(ValueError, match="dtype=torch.float16"):
        collect_covariances(conv, [x], progress=False, dtype=torch.float16)

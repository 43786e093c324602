"""Audit of the scale-out workflow: sequential compression of token models fed with dict
batches, Linear layers on channels-last maps, and the command line's usage errors."""

import copy
import math
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sigmadecomp_torch import compress  # noqa: E402


class _Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, mask):
        b, n, d = x.shape

        def split(t):
            return t.view(b, n, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~mask.bool()[:, None, None, :], -1e9)
        return self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))


class _TokenNet(nn.Module):
    """Embedding, one pre-norm attention + MLP block, masked mean pooling, a head;
    ``forward(input_ids, attention_mask)`` as Hugging Face models take dict batches."""

    def __init__(self, vocab=30, d=8, heads=2, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _Attention(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, input_ids, attention_mask):
        x = self.emb(input_ids)
        x = x + self.attn(self.n1(x), attention_mask)
        x = x + self.fc2(torch.relu(self.fc1(self.n2(x))))
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        return self.head((x * m).sum(1) / m.sum(1))


def _token_batches(n=3, batch=5, seq=6, vocab=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        lengths = torch.randint(2, seq, (batch,), generator=g)  # every sequence padded
        mask = (torch.arange(seq)[None] < lengths[:, None]).long()
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _outputs(model, name, data):
    """The outputs of ``model``'s module ``name`` on every batch of ``data``."""
    seen = []
    h = model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        with torch.no_grad():
            for b in data:
                model(**b) if isinstance(b, dict) else model(b)
    finally:
        h.remove()
    return seen


def _relative_output_error(original, small, name, data, keep=None):
    """sqrt(E||y_o - y_c||^2 / E||y_o - b||^2) over the rows ``keep(batch)`` selects."""
    bias = original.get_submodule(name).bias.detach()
    diff = energy = 0.0
    for yo, yc, b in zip(_outputs(original, name, data), _outputs(small, name, data), data):
        if keep is not None:
            yo, yc = yo[keep(b)], yc[keep(b)]
        diff += float(((yo - yc) ** 2).sum())
        energy += float(((yo - bias) ** 2).sum())
    return math.sqrt(diff / energy)


def _sequential_svd_of_token_net(**extra):
    """``(model, data, compressed model, report)`` of sequential Sigma-SVD of the token net."""
    torch.manual_seed(0)
    model = _TokenNet().double().eval()
    data = _token_batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, report = compress(model, "svd", data=data, sequential=True, ratio=2,
                                 layers=["attn.o", "fc1", "fc2"], progress=False, **extra)
    return model, data, small, report


def test_output_error_of_a_token_model_counts_only_real_tokens():
    model, data, small, report = _sequential_svd_of_token_net()
    rows = {r["name"]: r for r in report.layers}
    real = lambda b: b["attention_mask"].bool()  # noqa: E731
    for name in ("attn.o", "fc1", "fc2"):
        want = _relative_output_error(model, small, name, data, keep=real)
        # (the padded tokens, which the statistics leave out, changed the figure)
        assert rows[name]["output_error"] == pytest.approx(want, rel=1e-9), name
    assert abs(_relative_output_error(model, small, "fc1", data)
               - rows["fc1"]["output_error"]) > 1e-6


class _ChannelsLastMLP(nn.Module):
    """A conv stem, then Linear layers on (N, H, W, C) maps (a ConvNeXt-style block)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.p1, self.p2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        x = x + self.p2(torch.relu(self.p1(x)))
        return self.head(x.mean((1, 2)))


@pytest.mark.parametrize("side", [5, 16])  # (16: the map's height equals p1's outputs)
def test_output_error_of_linear_layers_on_channels_last_maps(side):
    torch.manual_seed(0)
    model = _ChannelsLastMLP().double().eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(3, 3, side, side, generator=g, dtype=torch.float64) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, report = compress(model, "svd", data=data, sequential=True, ratio=2,
                                 layers=["p1", "p2"], refit="all", progress=False)
    for row in list(report.layers) + list(report.refitted):
        want = _relative_output_error(model, small, row["name"], data)
        assert row["output_error"] == pytest.approx(want, rel=1e-9), row["name"]
    assert [r["name"] for r in report.refitted] == ["head"]


def _mask_warnings(caught):
    return [w for w in caught if "token mask was given" in str(w.message)]


def test_sequential_warns_about_an_unused_token_mask_only_when_no_pass_used_it():
    torch.manual_seed(0)
    model = _TokenNet().double().eval()
    data = _token_batches()
    before = copy.deepcopy(model.state_dict())
    # the head's pass (pooled features) does not use the mask; the other passes do
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = compress(model, "svd", data=data, sequential=True, ratio=2,
                             layers=["fc1", "fc2"], refit="all", progress=False)
    assert [r["name"] for r in report.refitted] == ["head"]
    assert _mask_warnings(caught) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    class Images(nn.Module):  # dict batches with a mask, but no layer reads tokens
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.c = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, pixels, attention_mask):
            return self.c(torch.relu(self.b(torch.relu(self.a(pixels)))))

    g = torch.Generator().manual_seed(2)
    images = [{"pixels": torch.randn(3, 2, 5, 5, generator=g),
               "attention_mask": torch.ones(3, 4, dtype=torch.long)} for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compress(Images().eval(), "tucker2", data=images, sequential=True, ratio=2,
                 layers=["b", "c"], progress=False)
    assert len(_mask_warnings(caught)) == 1


@pytest.mark.parametrize("argv", [
    ["compress", "m.pt", "--method", "tucker3", "--out", "o.pt"],
    ["compress", "m.pt", "--method", "svd", "--calib-images", "0", "--out", "o.pt"],
    ["compress", "m.pt", "--method", "svd", "--ratio", "2", "--budget", "0.5", "--out", "o.pt"],
    ["compress", "m.pt", "--out", "o.pt"],
    ["bogus"],
    ["demo", "--no-such-option"],
])
def test_usage_errors_of_the_command_line_are_one_line(argv, capsys, tmp_path, monkeypatch):
    from sigmadecomp_torch import cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "--help" in lines[0], err
    assert "usage:" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def _sequential_token_run(data):
    torch.manual_seed(0)
    model = _TokenNet().double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, report = compress(model, "svd", data=data, sequential=True, budget=0.6,
                                 centered=True, refit="all", progress=False)
    return small.state_dict(), report.to_dict()


def _token_worker(rank, port, out_dir):
    import os

    import torch.distributed as dist

    from _helpers import gloo_group

    with gloo_group(rank, port, 2, timeout=20):
        batches = _token_batches(n=3)
        share = batches[:2] if rank == 0 else batches[2:]  # unequal shares
        torch.save(_sequential_token_run(share), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()


def test_two_processes_with_unequal_dict_batch_shares_return_the_one_process_model(tmp_path):
    import os

    import torch.distributed as dist

    from _helpers import free_port, spawn_workers

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    spawn_workers(_token_worker, (free_port(), str(tmp_path)), 2, 60.0,
                  "sequential compression of a token model on two processes")
    want_state, want_report = _sequential_token_run(_token_batches(n=3))
    got = [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=False)
           for r in range(2)]
    for state, report in got:
        assert state.keys() == want_state.keys()
        for k, v in want_state.items():
            torch.testing.assert_close(state[k], v, rtol=1e-9, atol=1e-12)
        rows = {r["name"]: r for r in report["layers"] + report["refitted"]}
        for r in want_report["layers"] + want_report["refitted"]:
            assert rows[r["name"]]["output_error"] == pytest.approx(r["output_error"],
                                                                    rel=1e-8)
    assert all(torch.equal(got[0][0][k], got[1][0][k]) for k in want_state)


@pytest.mark.parametrize("where", [["--out", "{data}/0.png"],             # over an image
                                   ["--out", "{data}/sub/small.pt"],        # beside them
                                   ["--out", "{tmp}/small.pt", "--save-stats",
                                    "{data}/../images/stats.pt"]])
def test_compress_refuses_to_write_into_the_calibration_image_folder(where, tmp_path, capsys):
    from _helpers import write_png_folder

    from sigmadecomp_torch import cli

    write_png_folder(tmp_path / "images", 3, (6, 6, 3))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    torch.save(model, tmp_path / "model.pt")
    before = {p: p.read_bytes() for p in (tmp_path / "images").iterdir()}
    argv = ["compress", str(tmp_path / "model.pt"), "--data", str(tmp_path / "images"),
            "--method", "tucker2", "--ratio", "2", "--no-progress"]
    argv += [a.format(data=tmp_path / "images", tmp=tmp_path) for a in where]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "is inside --data=" in err and len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in (tmp_path / "images").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "model.pt"]


@pytest.mark.parametrize("centered", [False, True])
def test_sequential_layer_is_the_best_fit_to_its_corrected_target(centered):
    """One layer of a sequential run, recomputed with hooks: its inputs in the original
    model and in one whose earlier groups are compressed (real tokens only), the target
    K C_oc (C_cc + ridge)^-1, the best rank-r fit in C_cc, and the bias."""
    import sigmadecomp as sd
    from sigmadecomp.sigma import DEFAULT_RIDGE

    model, data, small, report = _sequential_svd_of_token_net(centered=centered)
    rows = {r["name"]: r for r in report.layers}
    name = "fc2"
    hybrid = copy.deepcopy(model)  # the layers of earlier groups compressed
    for other, r in rows.items():
        if r["group"] < rows[name]["group"]:
            parent, _, leaf = other.rpartition(".")
            owner = hybrid.get_submodule(parent) if parent else hybrid
            setattr(owner, leaf, copy.deepcopy(small.get_submodule(other)))
    assert any(r["group"] < rows[name]["group"] for r in rows.values())

    def inputs(net):
        seen = []
        h = net.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        with torch.no_grad():
            for b in data:
                net(**b)
        h.remove()
        return torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen, data)])

    Xo, Xc = inputs(model), inputs(hybrid)
    N, n = Xo.shape
    mo, mc = Xo.mean(0), Xc.mean(0)
    Scc, Soc = Xc.T @ Xc / N, Xo.T @ Xc / N
    if centered:
        Scc, Soc = Scc - torch.outer(mc, mc), Soc - torch.outer(mo, mc)
    K = model.get_submodule(name).weight.detach()
    ridged = Scc + DEFAULT_RIDGE * torch.trace(Scc) / n * torch.eye(n, dtype=Scc.dtype)
    target = K @ Soc @ torch.linalg.inv(ridged)
    layer = small.get_submodule(name)
    W = (layer[1].weight @ layer[0].weight).detach()
    best = sd.sigma_svd(target, rows[name]["ranks"], sigma=Scc).to_tensor()
    torch.testing.assert_close(W, best, rtol=1e-8, atol=1e-10)
    want = rows[name]["target_change"]
    assert want == pytest.approx(float(torch.linalg.norm(target - K) / torch.linalg.norm(K)),
                                 rel=1e-8)
    bias = model.get_submodule(name).bias.detach()
    if centered:
        bias = bias + K @ mo - W @ mc
    torch.testing.assert_close(layer[1].bias.detach(), bias, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("device,error", [("cuda:99", ValueError), ("meta", ValueError),
                                          (2.5, TypeError), ("nodevice", ValueError)])
def test_cross_statistics_refuse_an_unusable_device_by_name(device, error):
    from sigmadecomp_torch.sequential import collect_cross_covariances

    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(error, match="device="):
        collect_cross_covariances(net, net, torch.randn(8, 4), layers=["2"], device=device)


@pytest.mark.parametrize("conv", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), padding_mode="circular"),
    dict(kernel_size=3, dilation=2, padding="same", padding_mode="reflect"),
])
def test_cross_statistics_keep_to_chunk_bytes_on_large_feature_maps(conv, monkeypatch):
    """One sample's patches above chunk_bytes are taken in blocks of output rows (as
    collect_covariances does), with the same statistics."""
    import sigmadecomp_torch.sequential as seq
    from sigmadecomp_torch import collect_covariances

    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, **conv).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    cap = 20000  # bytes; one sample's patches take 35-111 kB here
    chunks = []
    rows = seq._CrossAccumulator._rows

    def spy(self, Xo, Xc):
        chunks.append(2 * 8 * Xo.shape[0] * Xo.shape[1])  # the two float64 patch matrices
        return rows(self, Xo, Xc)

    monkeypatch.setattr(seq._CrossAccumulator, "_rows", spy)
    got = seq.collect_cross_covariances(layer, layer, x, layers=[""], chunk_bytes=cap)[""]
    want = collect_covariances(layer, x, progress=False)[""]
    assert len(chunks) > 2 and max(chunks) <= cap  # (more chunks than samples)
    assert got.count == want.count
    torch.testing.assert_close(got.sigma_cc, want.sigma, rtol=0, atol=1e-13)
    torch.testing.assert_close(got.sigma_oc, want.sigma, rtol=0, atol=1e-13)
    torch.testing.assert_close(got.mean_c, want.mean, rtol=0, atol=1e-14)


def test_a_dict_batch_the_forward_does_not_take_is_refused_before_running():
    # model(**batch) with keys the forward does not take: one message that says how the
    # batch ran and names forward=, raised before the model runs
    from sigmadecomp_torch import collect_covariances

    calls = []

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            calls.append(1)
            return self.c(x)

    batch = {"image": torch.randn(2, 3, 6, 6), "label": torch.zeros(2)}
    with pytest.raises(TypeError, match=r"batch 0 is a mapping with keys \['image', 'label'\], "
                                        r"which runs as model\(\*\*batch\).*forward="):
        collect_covariances(Net(), [batch], progress=False)
    assert calls == []
    # keys the forward takes (also through **kwargs) run as before
    stats = collect_covariances(Net(), [{"x": batch["image"]}], progress=False)
    assert sorted(stats) == ["c"]

    class Kw(Net):
        def forward(self, **kw):
            return self.c(kw["image"])

    assert sorted(collect_covariances(Kw(), [batch], progress=False)) == ["c"]
    # a pre-hook may rewrite the keywords: the call decides then
    net = Net()
    net.register_forward_pre_hook(lambda m, a, kw: ((), {"x": kw["image"]}), with_kwargs=True)
    assert sorted(collect_covariances(net, [batch], progress=False)) == ["c"]


def test_progress_bars_show_in_a_terminal_or_a_notebook_never_in_a_log(monkeypatch):
    import io
    import sys
    import types

    from sigmadecomp_torch import _batches

    class Stream(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    class Shell:
        def __init__(self, config):
            self.config = config

    items = [1, 2, 3]
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    monkeypatch.setattr(sys, "stderr", Stream(False))  # a log file or a pipe
    assert _batches.progress_bar(items, total=3, enabled=True, desc="x") is items
    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: Shell({"IPKernelApp": {}})  # a Jupyter kernel
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert _batches._visible()
    bar = _batches.progress_bar(items, total=3, enabled=True, desc="x")
    assert bar is not items and list(bar) == items
    assert _batches.progress_bar(items, total=3, enabled=False, desc="x") is items
    fake.get_ipython = lambda: Shell({})  # a terminal IPython shell on a pipe: no bar
    assert not _batches._visible()
    fake.get_ipython = lambda: None  # IPython imported, not running
    assert not _batches._visible()
    monkeypatch.setattr(sys, "stderr", Stream(True))  # a terminal
    assert _batches._visible()

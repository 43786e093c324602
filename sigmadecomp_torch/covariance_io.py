"""Saving and loading input statistics (``.pt`` or safetensors files).

:func:`save_covariances` writes a mapping of :class:`LayerStats` (layers that
share one statistic stored once) with the metadata that
:meth:`LayerStats.check_compatible` needs; :func:`load_covariances` reads it
back and refuses foreign, truncated or corrupt files with an error naming the
file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

from ._batches import check_device
from .layer_stats import LayerStats

__all__ = ["save_covariances", "load_covariances"]


_FORMAT = "sigmadecomp.covariances/2"
_FORMATS = ("sigmadecomp.covariances/1", _FORMAT)
_META_KEY = "sigmadecomp.layers"


def _digest(sigma, mean):
    """A checksum of the bytes, dtypes and shapes of a statistic's two tensors (hex).

    Stored with each statistic, so that damaged tensor bytes (which neither file
    format detects by itself) are refused on loading.
    """
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for t in (sigma, mean):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _entry_meta(v, same_as=None):
    meta = {"count": int(v.count), "layer": str(v.layer), "groups": int(v.groups),
            "kind": v.kind, "geometry": v.geometry,
            "weight_shape": None if v.weight_shape is None else list(v.weight_shape)}
    if same_as is not None:
        meta["same_as"] = same_as
    else:
        meta["digest"] = _digest(v.sigma, v.mean)
    return meta


def save_covariances(stats, path):
    """Save a mapping ``name -> LayerStats`` as plain tensors.

    Parameters
    ----------
    stats : dict of str to LayerStats
    path : str or os.PathLike
        A name ending in ``.safetensors`` uses the safetensors format
        (tensors ``<name>.sigma``, ``<name>.mean``, metadata for counts, layer
        kinds, weight shapes and conv geometry); anything else is a
        ``torch.save`` file holding a dict of plain tensors, ints and strings
        (loadable with ``weights_only=True``). A statistic shared by several
        layers (the same ``LayerStats`` object) is stored once and shared again
        by :func:`load_covariances`.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from sigmadecomp_torch import LayerStats, save_covariances, load_covariances
    >>> s = {"fc": LayerStats(torch.eye(3, dtype=torch.float64),
    ...                       torch.zeros(3, dtype=torch.float64), 7, "Linear")}
    >>> path = os.path.join(tempfile.mkdtemp(), "stats.pt")
    >>> save_covariances(s, path)
    >>> load_covariances(path)["fc"]
    LayerStats(sigma=3x3, count=7, groups=1, layer='Linear')
    """
    path = os.fspath(path)
    if not isinstance(stats, Mapping):
        raise TypeError(f"stats of type {type(stats).__name__} is not allowed; "
                        "save_covariances needs a mapping of name -> LayerStats")
    first = {}
    for k, v in stats.items():
        if not isinstance(v, LayerStats):
            raise TypeError(f"stats[{k!r}] is a {type(v).__name__}; save_covariances "
                            "needs a mapping of name -> LayerStats")
        if not isinstance(k, str):
            raise TypeError(f"stats has the key {k!r}; layer names must be strings")
        first.setdefault(id(v), k)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        tensors, meta = {}, {}
        for k, v in stats.items():
            src = first[id(v)]
            if src == k:
                tensors[f"{k}.sigma"] = v.sigma.detach().cpu().contiguous()
                tensors[f"{k}.mean"] = v.mean.detach().cpu().contiguous()
            meta[k] = _entry_meta(v, None if src == k else src)
        save_file(tensors, path, metadata={_META_KEY: json.dumps(meta),
                                           "format": _FORMAT})
        return
    payload = {}
    for k, v in stats.items():
        src = first[id(v)]
        entry = _entry_meta(v, None if src == k else src)
        entry["geometry"] = json.dumps(entry["geometry"])
        if src == k:
            entry["sigma"], entry["mean"] = v.sigma.detach().cpu(), v.mean.detach().cpu()
        payload[k] = entry
    torch.save({"format": _FORMAT, "layers": payload}, path)


def _build(path, name, info, sigma, mean, map_location):
    digest = info.get("digest")
    if digest is not None and digest != _digest(sigma, mean):
        raise ValueError(f"{path!r}: the sigma/mean tensors of layer {name!r} do not match "
                         "the checksum saved with them; the file is corrupt (save the "
                         "statistics again)")
    try:
        geometry = info.get("geometry")
        if isinstance(geometry, str):
            geometry = json.loads(geometry)
        shape = info.get("weight_shape")
        return LayerStats(sigma.to(map_location), mean.to(map_location), int(info["count"]),
                          str(info["layer"]), int(info["groups"]), kind=info.get("kind"),
                          weight_shape=None if shape is None else tuple(shape),
                          geometry=geometry)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path!r}: the statistics of layer {name!r} are damaged "
                         f"({type(e).__name__}: {e})") from None


def _resolve_shared(path, entries, build):
    """Build the LayerStats of every entry; ``same_as`` entries share their source's."""
    out = {}
    for k, info in entries.items():
        if not isinstance(info, Mapping):
            raise ValueError(f"{path!r}: the entry of layer {k!r} is a "
                             f"{type(info).__name__}, not a statistics record")
        if "same_as" not in info:
            out[k] = build(k, info)
    for k, info in entries.items():
        if "same_as" in info:
            src = info["same_as"]
            if src not in out:
                raise ValueError(f"{path!r}: layer {k!r} shares the statistics of "
                                 f"{src!r}, which the file does not hold")
            out[k] = out[src]
    return {k: out[k] for k in entries}


def load_covariances(path, *, map_location="cpu"):
    """Load statistics written by :func:`save_covariances`.

    The format is recognised from the file's content (a renamed file is read
    correctly or refused), not from its name.

    Parameters
    ----------
    path : str or os.PathLike
    map_location : str, int or torch.device, optional
        Device of the loaded tensors (default CPU); a device that is not
        available is refused (``ValueError``) before the file is read.

    Returns
    -------
    dict of str to LayerStats

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ValueError
        When the file is not a statistics file of this package (another
        safetensors or ``torch.save`` file, a truncated or corrupt one, or an
        unknown format), or when a statistic's tensors do not match the
        checksum saved with them; the message names the file and what is
        wrong.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> from sigmadecomp_torch import collect_covariances, load_covariances, save_covariances
    >>> model = nn.Sequential(nn.Linear(6, 4))
    >>> stats = collect_covariances(model, [torch.randn(32, 6)], progress=False)
    >>> path = os.path.join(tempfile.mkdtemp(), "stats.safetensors")
    >>> save_covariances(stats, path)
    >>> back = load_covariances(path)
    >>> torch.equal(back["0"].sigma, stats["0"].sigma), back["0"].count
    (True, 32)
    """
    path = os.fspath(path)
    map_location = (torch.device("cpu") if map_location is None
                    else check_device(map_location, "map_location"))
    with open(path, "rb") as f:
        head = f.read(16)
    size = os.path.getsize(path)
    fmt = _sniff(head, size)
    if fmt == "torch":
        return _load_torch(path, map_location)
    if fmt == "safetensors":
        return _load_safetensors(path, map_location)
    raise ValueError(
        f"{path!r} ({size} bytes, starting {head[:8]!r}) is neither a safetensors nor a "
        "torch.save file; it is not a statistics file written by save_covariances"
    )


#: The first bytes of a zip archive: ``torch.save`` files (since torch 1.6).
_ZIP_MAGIC = b"PK\x03\x04"


def _sniff(head, size):
    r"""``"safetensors"``, ``"torch"`` or None: the format of a file from its structure.

    ``head`` holds the file's first bytes (at least 9 when the file has them),
    ``size`` its length in bytes. A safetensors file starts with the 8-byte
    little-endian length ``N`` of its JSON header, which follows at byte 8 and
    opens with ``{``, so the file holds at least ``8 + N`` bytes. That
    structure is tested first, since the first byte is ``N``'s lowest
    (``0x80`` for one header length in 256, as a pickle starts). A
    ``torch.save`` file is a zip archive (``PK\x03\x04``). A file with ``{``
    at byte 8 but shorter than ``8 + N`` is a truncated safetensors file (its
    reader reports the damage; a legacy ``torch.save`` file has the byte
    ``0xf9`` of its magic number there). Last, a legacy (pre-zip)
    ``torch.save`` file is a pickle: ``0x80`` and the protocol, 2 to 5.

    Examples
    --------
    >>> from sigmadecomp_torch.covariance_io import _sniff
    >>> _sniff((128).to_bytes(8, "little") + b'{"a"', 8 + 128)
    'safetensors'
    >>> _sniff(b"PK\x03\x04" + bytes(12), 500), _sniff(b"\x80\x02\x8a\x0a" + bytes(12), 500)
    ('torch', 'torch')
    >>> _sniff(b"hello world\n" * 3, 36) is None
    True
    """
    header_at_8 = len(head) >= 9 and head[8:9] == b"{"
    if header_at_8 and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"
    if head[:4] == _ZIP_MAGIC:
        return "torch"
    if header_at_8:
        return "safetensors"  # its header runs past the end of the file
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "torch"
    return None


def _load_torch(path, map_location):
    try:
        with open(path, "rb") as f:  # a file object: the reader must not guess by name
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure of the reader means a bad file
        raise ValueError(
            f"{path!r} could not be read as a torch.save file of statistics: it is "
            f"truncated, corrupt or holds other objects ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt not in _FORMATS or not isinstance(obj.get("layers"), dict):
        what = (f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict)
                else f"a {type(obj).__name__}")
        raise ValueError(f"{path!r} is a torch.save file of {what}, not statistics written "
                         f"by save_covariances (format {_FORMAT!r})")

    def build(k, v):
        if not isinstance(v.get("sigma"), torch.Tensor) or not isinstance(
                v.get("mean"), torch.Tensor):
            raise ValueError(f"{path!r}: the statistics of layer {k!r} lack their "
                             "sigma/mean tensors")
        return _build(path, k, v, v["sigma"], v["mean"], map_location)

    return _resolve_shared(path, obj["layers"], build)


def _load_safetensors(path, map_location):
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
            if _META_KEY not in meta:
                raise ValueError(
                    f"{path!r} is a safetensors file of {len(names)} tensors (e.g. "
                    f"{names[:3]}) without statistics metadata; it was not written by "
                    "save_covariances"
                )
            fmt = meta.get("format")
            if fmt is not None and fmt not in _FORMATS:  # (the first format wrote none)
                raise ValueError(f"{path!r} holds statistics of the unknown format {fmt!r}; "
                                 f"this version reads {', '.join(map(repr, _FORMATS))}")
            try:
                entries = json.loads(meta[_META_KEY])
            except json.JSONDecodeError as e:
                raise ValueError(f"{path!r}: its statistics metadata is not valid JSON "
                                 f"({e})") from None
            if not isinstance(entries, dict):
                raise ValueError(f"{path!r}: its statistics metadata is a "
                                 f"{type(entries).__name__}, not a mapping of layers")

            def build(k, info):
                pair = []
                for part in ("sigma", "mean"):
                    if f"{k}.{part}" not in names:
                        raise ValueError(f"{path!r}: the tensor {k}.{part} of layer {k!r} "
                                         "is missing")
                    pair.append(f.get_tensor(f"{k}.{part}"))
                return _build(path, k, info, pair[0], pair[1], map_location)

            return _resolve_shared(path, entries, build)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - the reader's own errors mean a bad file
        raise ValueError(
            f"{path!r} could not be read as a safetensors file of statistics: it is "
            f"truncated or corrupt ({type(e).__name__}: {e})"
        ) from None

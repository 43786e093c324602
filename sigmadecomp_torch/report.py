"""The report of :func:`sigmadecomp_torch.compress`: one row per layer, totals, warnings.

The last step of the pipeline. A row holds what was done to one layer and
how far its output moved (relative Sigma- and Frobenius errors); the
warnings about a layer (not converged, large Sigma-error) are raised from
its row, once every layer is done.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import List

from sigmadecomp.exceptions import CompressionWarning, ConvergenceWarning

from ._batches import user_stacklevel

__all__ = ["CompressionReport", "SIGMA_ERROR_WARN", "warn_layer"]

#: A layer whose relative Sigma-error (the relative change of its output on
#: the calibration data) exceeds this gets a :class:`CompressionWarning`.
#: Chosen from single-layer measurements on the reference network (see
#: ``benchmarks/sigma_error_threshold.py`` and the docstring of :func:`compress`).
SIGMA_ERROR_WARN = 0.2

def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


@dataclass(repr=False)
class CompressionReport:
    """What :func:`compress` did, per layer and in total.

    Attributes
    ----------
    method : str
    weighted : bool
        Whether Sigma statistics were used.
    centered : bool
        Whether the centered covariance and the bias correction were used.
    layers : list of dict
        One row per compressed layer: ``name``, ``kind``, ``method`` (the
        format used), ``ranks``, ``params_before``, ``params_after`` (of the
        module, bias included), ``sigma_error`` (relative expected squared
        output change ``sqrt(tr(D M D^T) / tr(K Sigma K^T))`` with ``M`` the
        Sigma, or the centered covariance with bias correction; None without
        statistics), ``frobenius_error`` (``||K - K~|| / ||K||``), ``n_iter``,
        ``converged`` (False when an iterative method stopped at
        ``n_iter_max``; None for the closed-form SVD), ``seconds`` and
        ``aliases`` (the module's other names when it is registered under
        several; the one factorized module stands under all of them); with
        ``min_speedup`` also ``latency_dense_ms`` and ``latency_factorized_ms``
        (median milliseconds at the layer's input size) for the timed layers.
    skipped : list of dict
        ``name``, ``kind`` and ``reason`` of each candidate left as it was
        (with both latencies for a layer kept dense by ``min_speedup``).
    params_before, params_after : int
        Parameters of the whole model before and after.
    seconds : float
    refitted : list of dict
        Dense layers refitted by ``compress(..., refit=...)``:
        ``name``, ``kind``, ``params_before``, ``params_after``,
        ``target_change`` (``||K' - K|| / ||K||``), ``group`` and
        ``output_error`` (empty otherwise).
    """

    method: str
    weighted: bool
    centered: bool
    layers: List[dict] = field(default_factory=list)
    skipped: List[dict] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0
    refitted: List[dict] = field(default_factory=list)

    @property
    def ratio(self):
        """Overall rX of the model: ``params_before / params_after``."""
        return self.params_before / max(self.params_after, 1)

    @property
    def layer_params_before(self):
        return int(sum(r["params_before"] for r in self.layers))

    @property
    def layer_params_after(self):
        return int(sum(r["params_after"] for r in self.layers))

    @property
    def layer_ratio(self):
        """rX over the compressed layers only."""
        return self.layer_params_before / max(self.layer_params_after, 1)

    def to_dict(self):
        """A JSON-serialisable dict (rows, skipped layers and totals)."""
        rows = []
        for r in self.layers:
            r = dict(r)
            if isinstance(r["ranks"], tuple):
                r["ranks"] = list(r["ranks"])
            rows.append(r)
        return {
            "method": self.method,
            "weighted": self.weighted,
            "centered": self.centered,
            "layers": rows,
            "skipped": [dict(s) for s in self.skipped],
            "refitted": [dict(r) for r in self.refitted],
            "totals": {
                "params_before": self.params_before,
                "params_after": self.params_after,
                "ratio": self.ratio,
                "layer_params_before": self.layer_params_before,
                "layer_params_after": self.layer_params_after,
                "layer_ratio": self.layer_ratio,
                "seconds": self.seconds,
            },
        }

    def to_json(self, path=None, *, indent=2):
        """The :meth:`to_dict` content as JSON text; also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data):
        """The report that :meth:`to_dict` described (e.g. read back from JSON to plot it).

        Examples
        --------
        >>> from sigmadecomp_torch import CompressionReport
        >>> r = CompressionReport(method="svd", weighted=False, centered=False,
        ...                       params_before=10, params_after=6)
        >>> CompressionReport.from_dict(r.to_dict()) == r
        True
        """
        if not isinstance(data, Mapping) or not {"method", "layers", "totals"} <= set(data):
            raise ValueError("data must be a dict written by CompressionReport.to_dict (keys "
                             f"'method', 'layers', 'totals', ...); got {type(data).__name__}"
                             + (f" with keys {sorted(data)[:6]}" if isinstance(data, Mapping)
                                else ""))
        layers = []
        for row in data["layers"]:
            row = dict(row)
            if isinstance(row.get("ranks"), list):
                row["ranks"] = tuple(row["ranks"])
            layers.append(row)
        totals = data["totals"]
        return cls(method=data["method"], weighted=bool(data.get("weighted", False)),
                   centered=bool(data.get("centered", False)), layers=layers,
                   skipped=[dict(r) for r in data.get("skipped", [])],
                   params_before=int(totals["params_before"]),
                   params_after=int(totals["params_after"]),
                   seconds=float(totals.get("seconds", 0.0)),
                   refitted=[dict(r) for r in data.get("refitted", [])])

    @classmethod
    def from_json(cls, path):
        """The report of a JSON file written by :meth:`to_json` (or the CLI's
        ``<out>.report.json``)."""
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path!r} is not a JSON file: {exc}") from None
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path!r}: {exc}") from None

    def table(self):
        """The report as a plain-text table."""
        head = ["layer", "kind", "method", "ranks", "params", "->", "rX",
                "sigma_err", "frob_err", "iters", "conv", "sec"]
        rows = []
        for r in self.layers:
            ranks = r["ranks"]
            if isinstance(ranks, (tuple, list)):
                ranks = "x".join(str(v) for v in ranks)
            conv = r.get("converged")
            label = r["name"] if r["name"] else "(model)"
            if r.get("aliases"):
                label += " = " + " = ".join(r["aliases"])
            rows.append([label, r["kind"], r["method"], str(ranks), str(r["params_before"]),
                         str(r["params_after"]),
                         f"{r['params_before'] / max(r['params_after'], 1):.2f}",
                         _fmt(r["sigma_error"], ".4f"), _fmt(r["frobenius_error"], ".4f"),
                         _fmt(r["n_iter"], "d"), "-" if conv is None else ("yes" if conv else "NO"),
                         f"{r['seconds']:.2f}"])
        n = len(self.layers)
        rows.append([f"total ({n} layer{'' if n == 1 else 's'})", "", "", "",
                     str(self.layer_params_before), str(self.layer_params_after),
                     f"{self.layer_ratio:.2f}", "", "", "", "", f"{self.seconds:.2f}"])
        width = [max(len(head[i]), *(len(row[i]) for row in rows)) for i in range(len(head))]
        left = {0, 1, 2, 3}

        def line(cells):
            return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, width))).rstrip()

        norm = "Sigma" if self.weighted else "Frobenius"
        if self.centered:
            norm += ", centered + bias correction"
        out = [f"compress(method={self.method!r}, {norm})", line(head),
               line(["-" * w for w in width])]
        out += [line(r) for r in rows[:-1]]
        out += [line(["-" * w for w in width]), line(rows[-1])]
        out.append(f"model: {self.params_before} -> {self.params_after} parameters, "
                   f"rX = {self.ratio:.2f}")
        for r in self.layers:
            if r.get("latency_dense_ms") is not None:
                out.append(f"latency {r['name']}: {r['latency_dense_ms']:.3f} ms dense -> "
                           f"{r['latency_factorized_ms']:.3f} ms factorized")
        for r in self.refitted:
            err = r.get("output_error")
            out.append(f"refitted {r['name']} ({r['kind']}, dense): weight change "
                       f"{r['target_change']:.4f}"
                       + ("" if err is None else f", output error {err:.4f}"))
        for s in self.skipped:
            out.append(f"skipped {s['name']} ({s['kind']}): {s['reason']}")
        return "\n".join(out)

    def plot(self, path=None):
        """A figure of the layers: rX (left) and relative errors (right), one row each.

        The left panel shows each layer's parameters ratio ``rX`` with a line at
        the ratio over the compressed layers; the right panel the relative
        Sigma-error (when statistics were used) and the Frobenius error, with
        a line at :data:`SIGMA_ERROR_WARN`. Layers that were refitted or
        skipped are not drawn (the table lists them); a report without
        factorized layers says so in both panels. Needs matplotlib.

        Parameters
        ----------
        path : str or path-like, optional
            Also write the figure there (the format from the suffix, e.g.
            ``.png`` or ``.pdf``).

        Returns
        -------
        matplotlib.figure.Figure

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> from sigmadecomp_torch import compress
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 3))
        >>> _, report = compress(model, "tucker2", ratio=2, layers=["0", "1", "2"],
        ...                      progress=False)
        >>> fig = report.plot()
        >>> [ax.get_xlabel() for ax in fig.axes]
        ['rX (parameters before / after)', 'relative error']
        """
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("CompressionReport.plot needs matplotlib: pip install matplotlib "
                              "(or the package's [bench] extra)") from None
        rows = self.layers
        names = [r["name"] or "(model)" for r in rows]
        y = list(range(len(rows)))
        fig = Figure(figsize=(10, 1.2 + 0.32 * max(len(rows), 1)), layout="constrained")
        left, right = fig.subplots(1, 2, sharey=True)
        rx = [r["params_before"] / max(r["params_after"], 1) for r in rows]
        left.barh(y, rx, color="tab:blue")
        if rows:
            left.axvline(self.layer_ratio, color="k", lw=1, ls="--",
                         label=f"compressed layers: rX = {self.layer_ratio:.2f}")
            left.legend(loc="lower left", bbox_to_anchor=(0, 1), fontsize="small",
                        frameon=False)
        left.set_xlabel("rX (parameters before / after)")
        left.set_yticks(y, names, fontsize="small")
        left.invert_yaxis()  # the first layer on top, as in the table
        h = 0.4
        frob = [r["frobenius_error"] or 0.0 for r in rows]
        if not rows:  # (no bars: their legend would show swatches of the default colour)
            for ax in (left, right):
                ax.text(0.5, 0.5, "no layer was factorized (see the report's table)",
                        ha="center", va="center", transform=ax.transAxes, fontsize="small")
                ax.set_xticks([])
        elif self.weighted:
            sig = [r["sigma_error"] if r["sigma_error"] is not None else 0.0 for r in rows]
            right.barh([v - h / 2 for v in y], sig, height=h, color="tab:orange",
                       label="Sigma-error (output change)")
            right.barh([v + h / 2 for v in y], frob, height=h, color="tab:gray",
                       label="Frobenius error (weights)")
            right.axvline(SIGMA_ERROR_WARN, color="tab:red", lw=1, ls=":",
                          label=f"warning above {SIGMA_ERROR_WARN:g}")
        else:
            right.barh(y, frob, color="tab:gray", label="Frobenius error (weights)")
        right.set_xlabel("relative error")
        if rows:
            right.legend(loc="lower left", bbox_to_anchor=(0, 1), ncol=2, fontsize="small",
                         frameon=False)
        norm = "Sigma" if self.weighted else "Frobenius"
        fig.suptitle(f"{self.method} ({norm}{', centered' if self.centered else ''}): "
                     f"model {self.params_before} -> {self.params_after} parameters, "
                     f"rX = {self.ratio:.2f}", fontsize="medium")
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig

    def __str__(self):
        return self.table()

    def __repr__(self):
        return (f"CompressionReport(method={self.method!r}, layers={len(self.layers)}, "
                f"skipped={len(self.skipped)}, params {self.params_before} -> "
                f"{self.params_after}, rX={self.ratio:.3g})")


def warn_layer(row):
    """The warnings of one report row (after every layer is done, on every process)."""
    name, ranks, sig_err = row["name"], row["ranks"], row["sigma_error"]
    if row["converged"] is False:
        warnings.warn(
            f"layer {name!r}: the {row['method']} decomposition stopped after {row['n_iter']} "
            "iterations without meeting its tolerance (raise options['n_iter_max'] or "
            "options['tol'])", ConvergenceWarning, stacklevel=user_stacklevel())
    if sig_err is not None and sig_err > SIGMA_ERROR_WARN:
        warnings.warn(
            f"layer {name!r}: relative Sigma-error {sig_err:.3f} > {SIGMA_ERROR_WARN} "
            f"at ranks {ranks}; its output changes enough to cost accuracy (use "
            "higher ranks for it, or leave it out of layers=)", CompressionWarning,
            stacklevel=user_stacklevel())

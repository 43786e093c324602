"""The report of :func:`sigmadecomp_torch.compress`: one row per layer, totals, warnings.

The last step of the pipeline. A row holds what was done to one layer and
how far its output moved (relative Sigma- and Frobenius errors); the
warnings about a layer (not converged, large Sigma-error) are raised from
its row, once every layer is done.
"""

from __future__ import annotations

import copy
import json
import numbers
import os
import reprlib
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


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


# What the report's methods (table, to_dict, plot, the properties) read of a field: a
# check and the words for what is allowed.
_STR = (lambda v: isinstance(v, str), "a str")
_BOOL = (lambda v: isinstance(v, bool), "a bool")
_BOOL_OR_NONE = (lambda v: v is None or isinstance(v, bool), "a bool or None")
_INT = (_is_int, "an int")
_INT_OR_NONE = (lambda v: v is None or _is_int(v), "an int or None")
_NUMBER = (_is_number, "a number")
_NUMBER_OR_NONE = (lambda v: v is None or _is_number(v), "a number or None")
_DICT = (lambda v: isinstance(v, Mapping), "a dict")
_LIST = (lambda v: isinstance(v, (list, tuple)), "a list of dicts")
_RANKS = (lambda v: _is_int(v) or (isinstance(v, (list, tuple)) and all(map(_is_int, v))),
          "an int or a list of ints")
_STRS = (lambda v: isinstance(v, (list, tuple)) and all(isinstance(a, str) for a in v),
         "a list of str")

#: Fields of the report dict and of its rows: required ones, and optional ones with the
#: default a missing one gets.
_REPORT = {"method": _STR, "layers": _LIST, "totals": _DICT}
_REPORT_OPTIONAL = {"weighted": (False, _BOOL), "centered": (False, _BOOL),
                    "skipped": ([], _LIST), "refitted": ([], _LIST)}
_TOTALS = {"params_before": _INT, "params_after": _INT}
_TOTALS_OPTIONAL = {"seconds": (0.0, _NUMBER)}
_LAYER = {"name": _STR, "kind": _STR, "method": _STR, "ranks": _RANKS, "params_before": _INT,
          "params_after": _INT, "sigma_error": _NUMBER_OR_NONE,
          "frobenius_error": _NUMBER_OR_NONE, "n_iter": _INT_OR_NONE, "seconds": _NUMBER}
_LAYER_OPTIONAL = {"converged": (None, _BOOL_OR_NONE), "aliases": ([], _STRS)}
_SKIPPED = {"name": _STR, "kind": _STR, "reason": _STR}
_REFITTED = {"name": _STR, "kind": _STR, "target_change": _NUMBER}
_REFITTED_OPTIONAL = {"output_error": (None, _NUMBER_OR_NONE)}


def _fields(row, where, required, optional=None):
    """The dict ``row`` (named ``where`` in errors) as a dict, its ``required``
    fields checked and its ``optional`` ones checked or set to their defaults."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where} must be a dict; got {reprlib.repr(row)}")
    row = dict(row)
    for key, (ok, allowed) in required.items():
        if key not in row:
            raise ValueError(f"{where} lacks {key!r} (CompressionReport.to_dict writes "
                             f"{', '.join(map(repr, required))} there)")
        if not ok(row[key]):
            raise ValueError(f"{where}[{key!r}] must be {allowed}; got {reprlib.repr(row[key])}")
    for key, (default, (ok, allowed)) in (optional or {}).items():
        row.setdefault(key, copy.deepcopy(default))
        if not ok(row[key]):
            raise ValueError(f"{where}[{key!r}] must be {allowed} (or left out); "
                             f"got {reprlib.repr(row[key])}")
    return row


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
        module, bias included), ``sigma_error`` (relative change of the
        layer's output on the calibration data, ``sqrt(tr(D M D^T) /
        tr(K Sigma K^T))``, ``D = K - K~``: ``M`` is the statistic the layer
        was fitted in, the Sigma, or with ``centered=True`` the centered
        covariance ``Sigma - mu mu^T`` (the error left once the bias is
        corrected), without the solvers' ``ridge``; the denominator is
        always the uncentered Sigma (the output energy without the bias);
        None without statistics),
        ``frobenius_error`` (``||K - K~|| / ||K||``). Both are measured on
        the layer as built: ``K~`` is the product of its own factors in the
        layer's dtype (:func:`sigmadecomp_torch.layers.equivalent_weight`),
        multiplied out in float64, and each quadratic form follows the
        policy of :func:`sigmadecomp.sigma_norm` (taken as it is; measured
        in the nearest PSD matrix when it comes out negative beyond
        rounding). With statistics stored in float32 or singular, a
        recomputation that drops the statistic's (rounding-sized) negative
        eigenvalues agrees to within ``NEG_RTOL * lambda_max * ||D||^2`` in
        the squared numerator. Rows of sequential compression measure the
        fit to the corrected target ``K'`` instead (in the second moment of
        the layer's inputs in the compressed model, resp. relative to
        ``||K'||``) and add ``output_error``, the measured relative change of
        the layer's output, ``target_change`` and ``group``
        (:func:`sigmadecomp_torch.sequential.sequential_compress`). ``n_iter``,
        ``converged`` (False when an iterative method stopped at
        ``n_iter_max``; None for the closed-form SVD), ``seconds`` and
        ``aliases`` (the module's other names when it is registered under
        several; the one factorized module stands under all of them); with
        ``min_speedup`` also ``latency_dense_ms`` and ``latency_factorized_ms``
        (median milliseconds at the layer's input size) for the timed layers.
    skipped : list of dict
        ``name``, ``kind`` and ``reason`` of each candidate that was not
        factorized (with both latencies for a layer kept dense by
        ``min_speedup``). It keeps its weights unless it is also listed in
        ``refitted`` (``refit='all'`` or a predicate also refits the chosen
        layers left dense); the table says so on its line.
    params_before, params_after : int
        Parameters of the whole model before and after (biases included;
        layers kept dense count as dense).
    seconds : float
        Wall time of the whole call (statistics, planning, decompositions,
        timing), not the sum of the rows' ``seconds``.
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
        """rX over the compressed layers only; 1.0 when no layer was compressed (nothing
        changed; the table shows ``-`` there, as ``0 / 0`` has no value)."""
        if not self.layers:
            return 1.0
        return self.layer_params_before / max(self.layer_params_after, 1)

    def to_dict(self):
        """A JSON-serialisable dict (rows, skipped layers and totals).

        A deep copy: changing it leaves the report as it was, and the other way round.
        """
        rows = []
        for r in self.layers:
            r = copy.deepcopy(dict(r))
            if isinstance(r["ranks"], tuple):
                r["ranks"] = list(r["ranks"])
            rows.append(r)
        return {
            "method": self.method,
            "weighted": self.weighted,
            "centered": self.centered,
            "layers": rows,
            "skipped": [copy.deepcopy(dict(s)) for s in self.skipped],
            "refitted": [copy.deepcopy(dict(r)) for r in self.refitted],
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

        Parameters
        ----------
        data : dict
            As written by :meth:`to_dict`: ``method``, ``layers``, ``totals``
            (``params_before``, ``params_after``; the ratios in it are not read)
            and optionally ``weighted``, ``centered`` (False when left out),
            ``skipped``, ``refitted`` (empty) and ``totals['seconds']`` (0).
            Each layer row needs the fields the table and the figure show
            (``name``, ``kind``, ``method``, ``ranks``, ``params_before``,
            ``params_after``, ``sigma_error``, ``frobenius_error``, ``n_iter``,
            ``seconds``; ``converged`` and ``aliases`` are None and empty when
            left out); a skipped row ``name``, ``kind`` and ``reason``; a
            refitted row ``name``, ``kind`` and ``target_change``. The report
            holds a copy: changing ``data`` afterwards leaves it as it was.

        Raises
        ------
        ValueError
            If ``data`` is not such a dict: the message names the first field
            that is missing or of the wrong type (e.g. ``data['layers'][0] lacks
            'ranks'``).

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
        data = _fields(copy.deepcopy(data), "data", _REPORT, _REPORT_OPTIONAL)
        totals = _fields(data["totals"], "data['totals']", _TOTALS, _TOTALS_OPTIONAL)
        layers = []
        for i, row in enumerate(data["layers"]):
            where = f"data['layers'][{i}]"
            row = _fields(row, where, _LAYER, _LAYER_OPTIONAL)
            if row.get("latency_dense_ms") is not None:  # (the table shows both latencies)
                _fields(row, where, {"latency_dense_ms": _NUMBER,
                                     "latency_factorized_ms": _NUMBER})
            if isinstance(row["ranks"], list):
                row["ranks"] = tuple(row["ranks"])
            layers.append(row)
        skipped = [_fields(r, f"data['skipped'][{i}]", _SKIPPED)
                   for i, r in enumerate(data["skipped"])]
        refitted = [_fields(r, f"data['refitted'][{i}]", _REFITTED, _REFITTED_OPTIONAL)
                    for i, r in enumerate(data["refitted"])]
        return cls(method=data["method"], weighted=data["weighted"],
                   centered=data["centered"], layers=layers, skipped=skipped,
                   params_before=int(totals["params_before"]),
                   params_after=int(totals["params_after"]),
                   seconds=float(totals["seconds"]), refitted=refitted)

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
        # rows of sequential compression also carry the measured change of the output
        measured = any("output_error" in r for r in self.layers)
        head = ["layer", "kind", "method", "ranks", "params", "->", "rX",
                "sigma_err", "frob_err"] + (["out_err"] if measured else []) + [
                "iters", "conv", "sec"]
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
                         _fmt(r["sigma_error"], ".4f"), _fmt(r["frobenius_error"], ".4f")]
                        + ([_fmt(r.get("output_error"), ".4f")] if measured else [])
                        + [_fmt(r["n_iter"], "d"),
                           "-" if conv is None else ("yes" if conv else "NO"),
                           f"{r['seconds']:.2f}"])
        n = len(self.layers)
        rows.append([f"total ({n} layer{'' if n == 1 else 's'})", "", "", "",
                     str(self.layer_params_before), str(self.layer_params_after),
                     f"{self.layer_ratio:.2f}" if n else "-", "", ""]
                    + ([""] if measured else []) + ["", "", f"{self.seconds:.2f}"])
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
        if any("target_change" in r for r in self.layers):
            out.append("sequential: sigma_err and frob_err are the fit to each layer's "
                       "corrected target K' (in the second moment of its inputs in the "
                       "compressed model); out_err is the measured relative change of its "
                       "output on the data")
        for r in self.layers:
            if r.get("latency_dense_ms") is not None:
                out.append(f"latency {r['name']}: {r['latency_dense_ms']:.3f} ms dense -> "
                           f"{r['latency_factorized_ms']:.3f} ms factorized")
        for r in self.refitted:
            err = r.get("output_error")
            out.append(f"refitted {r['name']} ({r['kind']}, dense): weight change "
                       f"{r['target_change']:.4f}"
                       + ("" if err is None else f", output error {err:.4f}"))
        refitted = {r["name"] for r in self.refitted}
        for s in self.skipped:  # (a layer left dense may have been refitted all the same)
            out.append(f"skipped {s['name']} ({s['kind']}): {s['reason']}"
                       + ("; refitted (dense), see above" if s["name"] in refitted else ""))
        return "\n".join(out)

    def plot(self, path=None):
        """A figure of the layers: rX (left) and relative errors (right), one row each.

        The left panel shows each layer's parameters ratio ``rX`` with a line at
        the ratio over the compressed layers; the right panel the relative
        Sigma-error (when statistics were used) and the Frobenius error, with
        a line at :data:`SIGMA_ERROR_WARN`. An error that was not computed
        (None in the row, e.g. the Sigma-error of a layer without statistics)
        gets no bar but an "n/a" on its row, and the legend says so. Layers
        that were refitted or skipped are not drawn (the table lists them); a
        report without factorized layers says so in both panels. Needs
        matplotlib.

        Parameters
        ----------
        path : str or path-like, optional
            Also write the figure to exactly this file, in the format of its
            suffix (e.g. ``.png`` or ``.pdf``), or as PNG when it has none
            (``"report"`` writes ``report``, not ``report.png``).

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

        def bars(key, shift, height, color, label):
            # an error that was not computed (None) gets "n/a" on its row, not a bar of 0
            done = [(v + shift, r[key]) for v, r in zip(y, rows) if r[key] is not None]
            missing = [v + shift for v, r in zip(y, rows) if r[key] is None]
            if missing:
                label += " (n/a: not computed)"
            right.barh([v for v, _ in done], [e for _, e in done], height=height,
                       color=color, label=label)
            for v in missing:  # (x in axes coordinates, y at the row)
                right.text(0.01, v, "n/a", color=color, ha="left", va="center",
                           fontsize="x-small", transform=right.get_yaxis_transform())

        if not rows:  # (no bars: their legend would show swatches of the default colour)
            for ax in (left, right):
                ax.text(0.5, 0.5, "no layer was factorized (see the report's table)",
                        ha="center", va="center", transform=ax.transAxes, fontsize="small")
                ax.set_xticks([])
        elif self.weighted:
            bars("sigma_error", -h / 2, h, "tab:orange", "Sigma-error (output change)")
            bars("frobenius_error", h / 2, h, "tab:gray", "Frobenius error (weights)")
            right.axvline(SIGMA_ERROR_WARN, color="tab:red", lw=1, ls=":",
                          label=f"warning above {SIGMA_ERROR_WARN:g}")
        else:
            bars("frobenius_error", 0.0, 0.8, "tab:gray", "Frobenius error (weights)")
        right.set_xlabel("relative error")
        if rows:
            right.legend(loc="lower left", bbox_to_anchor=(0, 1), ncol=2, fontsize="small",
                         frameon=False)
        norm = "Sigma" if self.weighted else "Frobenius"
        fig.suptitle(f"{self.method} ({norm}{', centered' if self.centered else ''}): "
                     f"model {self.params_before} -> {self.params_after} parameters, "
                     f"rX = {self.ratio:.2f}", fontsize="medium")
        if path is not None:
            # matplotlib would write a name without suffix to name + ".png"
            plain = (isinstance(path, (str, os.PathLike))
                     and not os.path.splitext(os.fspath(path))[1][1:])
            fig.savefig(path, dpi=120, format="png" if plain else None)
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

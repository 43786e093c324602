"""Rank selection: cost counts, ratio targets, EVBMF and a global budget (façade).

Three ways to choose the ranks of a factorized layer:

* **a compression ratio per layer** -- :func:`ratio_to_ranks` returns the
  ranks whose parameter count is the largest not exceeding
  ``params(dense) / ratio``; :func:`layer_params` and :func:`layer_macs`
  count the weights and the multiply-adds of a factorized layer
  (:mod:`sigmadecomp.costs`);
* **EVBMF** (Nakajima et al., JMLR 2013) -- :func:`evbmf` estimates the rank
  of a noisy matrix from its singular values alone; :func:`evbmf_ranks`
  applies it to the (Sigma-whitened) unfoldings of a weight
  (:mod:`sigmadecomp.evbmf`);
* **a global budget** -- :func:`allocate_ranks` distributes a total parameter
  (or multiply-add) budget over several layers so that the summed (or the
  largest) relative Sigma-error is as small as possible, using each layer's
  error-versus-rank curve (:func:`error_curve`; :mod:`sigmadecomp.allocation`).

This module re-exports the public names of those three modules.
"""

from .allocation import Allocation, LayerSpec, RankCurve, allocate, allocate_ranks, error_curve
from .costs import METHODS, MethodSpec, layer_macs, layer_params, ratio_to_ranks, register_method
from .evbmf import EVBMFResult, evbmf, evbmf_ranks

__all__ = [
    "METHODS",
    "MethodSpec",
    "register_method",
    "layer_params",
    "layer_macs",
    "ratio_to_ranks",
    "EVBMFResult",
    "evbmf",
    "evbmf_ranks",
    "RankCurve",
    "error_curve",
    "LayerSpec",
    "Allocation",
    "allocate",
    "allocate_ranks",
]

"""sigmadecomp: distribution-aware low-rank compression of convolutional networks.

Decompositions chosen to preserve what each layer computes on real data: the
error is measured in the Sigma-norm ``||(W - W~) Sigma^{1/2}||_F``, with
``Sigma`` the second moment of the layer's input patches (Kalle et al.,
NeurIPS 2025). With ``sigma=None`` every method is its classical Frobenius
version.

The core works on NumPy arrays and torch tensors alike; results follow the
input's library, dtype and device. Every decomposition has the same call shape
and options and returns a :class:`DecompositionResult` (the solver contract,
:mod:`sigmadecomp.contract`).
"""

from .exceptions import CompressionWarning, ConvergenceWarning
from .contract import InnerSolver
from .results import CPResult, DecompositionResult, SVDResult, Tucker2Result
from .sigma import PSDRoot, psd_root, relative_sigma_error, sigma_norm
from .svd import sigma_svd
from .tenalg import fold, khatri_rao, unfold
from .tt import TTResult, tt_conv, tt_linear, tt_svd
from .tucker2 import tucker2
from .cp import cp
from ._threads import threads
from . import ranks
from .ranks import allocate_ranks, evbmf, ratio_to_ranks

__version__ = "0.1.0"

__all__ = [
    "unfold",
    "fold",
    "khatri_rao",
    "sigma_norm",
    "relative_sigma_error",
    "psd_root",
    "PSDRoot",
    "sigma_svd",
    "InnerSolver",
    "DecompositionResult",
    "SVDResult",
    "Tucker2Result",
    "tucker2",
    "CPResult",
    "cp",
    "ranks",
    "evbmf",
    "ratio_to_ranks",
    "allocate_ranks",
    "tt_svd",
    "tt_conv",
    "tt_linear",
    "TTResult",
    "ConvergenceWarning",
    "CompressionWarning",
    "threads",
]

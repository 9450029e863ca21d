"""Low-rank training: layers ``W = U S Vᵀ`` and the DLRT integrator that trains them.

* :mod:`~lowlearn.lowrank.layers`: low-rank Linear and Conv2d layers, conversion
  from and to dense layers (truncated SVD), parameter counts.
* :mod:`~lowlearn.lowrank.dlrt`: dynamical low-rank training with an adaptive rank
  (Schotthöfer et al. 2022).
"""

from .dlrt import DLRT
from .layers import (LowRankConv2d, LowRankLayer, LowRankLinear, compression, count_low_rank_parameters,
                     dense_parameter_count, dense_parameters, integrator_factors, low_rank_layers, to_dense,
                     to_low_rank, truncation_rank)

__all__ = [
    "DLRT", "LowRankConv2d", "LowRankLayer", "LowRankLinear", "compression", "count_low_rank_parameters",
    "dense_parameter_count", "dense_parameters", "integrator_factors", "low_rank_layers", "to_dense", "to_low_rank",
    "truncation_rank",
]

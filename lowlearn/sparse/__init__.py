"""Sparsity: masks, layer-wise densities, saliency scores, pruning and lottery tickets.

* :mod:`~lowlearn.sparse.mask`: masks as parametrizations (attach, set, read, squash).
* :mod:`~lowlearn.sparse.allocation`: how a global density is shared among layers
  (uniform, Erdős–Rényi, ERK).
* :mod:`~lowlearn.sparse.scores`: which weights matter (magnitude, random, SNIP,
  GraSP, SynFlow, movement, Optimal Brain Damage).
* :mod:`~lowlearn.sparse.prune`: keep the best-scoring weights (layer-wise or global).
* :mod:`~lowlearn.sparse.schedule`: iterative and gradual pruning.
* :mod:`~lowlearn.sparse.structured`: N:M and channel (neuron) pruning.
* :mod:`~lowlearn.sparse.lottery`: lottery tickets, their controls, early-bird tickets.
* :mod:`~lowlearn.sparse.update`: drop and grow, the mask update of dynamic sparse training.
* :mod:`~lowlearn.sparse.dst`: dynamic sparse training (static, SET, RigL, SNFS).
* :mod:`~lowlearn.sparse.topkast`: Top-KAST.
* :mod:`~lowlearn.sparse.packnet`: continual learning, each task owning a sparse subset of the weights.
* :mod:`~lowlearn.sparse.flops`: the FLOPs of sparse models.
* :mod:`~lowlearn.sparse.export`: sparse execution for inference (CSR, 2:4, compacted channels).

The submodules are the public interface; the most used names are re-exported here.
"""

from . import allocation
from . import scores
from .dst import SET, SNFS, RigL, StaticSparse
from .flops import dst_training_flops, model_sparse_flops, sparse_inference_flops, sparse_training_flops
from .lottery import EarlyBird, iterative_magnitude_pruning, train_control
from .mask import (Mask, attach_masks, density, kept_weights, layer_densities, masked_layers, masks_of,
                   prunable_layers, set_masks, squash)
from .prune import prune
from .schedule import GradualPruning, UpdateSchedule, cubic_density, geometric_densities, iterative_pruning
from .structured import nm_mask, prune_channels, prune_nm
from .topkast import TopKAST
from .update import drop_and_grow

__all__ = [
    "EarlyBird", "GradualPruning", "Mask", "RigL", "SET", "SNFS", "StaticSparse", "TopKAST", "UpdateSchedule",
    "allocation", "attach_masks", "cubic_density", "density", "drop_and_grow", "dst_training_flops",
    "geometric_densities", "iterative_magnitude_pruning", "iterative_pruning", "kept_weights", "layer_densities",
    "masked_layers", "masks_of", "model_sparse_flops", "nm_mask", "prunable_layers", "prune", "prune_channels",
    "prune_nm", "scores", "set_masks", "sparse_inference_flops", "sparse_training_flops", "squash", "train_control",
]

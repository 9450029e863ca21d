"""Meta-learning: learning to learn from little data.

* :mod:`~lowlearn.meta.functional`: parameters as dicts and differentiable inner loops.
* :mod:`~lowlearn.meta.maml`: MAML, first-order MAML, ANIL, Meta-SGD and Reptile.
"""

from .functional import inner_loop, parameters_of, run
from .maml import ANIL, MAML, MetaSGD, Reptile, head_names

__all__ = ["ANIL", "MAML", "MetaSGD", "Reptile", "head_names", "inner_loop", "parameters_of", "run"]

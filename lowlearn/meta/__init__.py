"""Meta-learning: learning to learn from little data.

* :mod:`~lowlearn.meta.functional`: parameters as dicts and differentiable inner loops.
* :mod:`~lowlearn.meta.maml`: MAML, first-order MAML, ANIL, Meta-SGD and Reptile.
* :mod:`~lowlearn.meta.learned_optimizer`: the coordinate-wise LSTM optimiser
  ("learning to learn by gradient descent by gradient descent").
"""

from .functional import inner_loop, parameters_of, run
from .learned_optimizer import LSTMOptimizer
from .maml import ANIL, MAML, MetaSGD, Reptile, adapt_and_evaluate, head_names

__all__ = ["ANIL", "LSTMOptimizer", "MAML", "MetaSGD", "Reptile", "adapt_and_evaluate", "head_names", "inner_loop",
           "parameters_of", "run"]

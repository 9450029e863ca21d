"""Meta-learning: learning to learn from little data.

* :mod:`~lowlearn.meta.functional`: parameters as dicts and differentiable inner loops.
* :mod:`~lowlearn.meta.maml`: MAML, first-order MAML, ANIL, Meta-SGD and Reptile.
* :mod:`~lowlearn.meta.batched`: many tasks' networks run as one (MAML's ``tasks_at_once``).
* :mod:`~lowlearn.meta.learned_optimizer`: the coordinate-wise LSTM optimiser
  ("learning to learn by gradient descent by gradient descent").
* :mod:`~lowlearn.meta.metric`: Prototypical Networks and Matching Networks.
* :mod:`~lowlearn.meta.cnp`: Conditional Neural Processes.
* :mod:`~lowlearn.meta.episodic`: meta-training loops and per-episode evaluation.
"""

from .cnp import CNP, fit_cnp
from .functional import inner_loop, parameters_of, run
from .learned_optimizer import LSTMOptimizer
from .maml import ANIL, MAML, MetaSGD, Reptile, adapt_and_evaluate, head_names
from .metric import MatchingNet, ProtoNet

__all__ = ["ANIL", "CNP", "LSTMOptimizer", "MAML", "MatchingNet", "MetaSGD", "ProtoNet", "Reptile",
           "adapt_and_evaluate", "fit_cnp", "head_names", "inner_loop", "parameters_of", "run"]

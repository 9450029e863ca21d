"""lowlearn: deep learning with low resources.

The companion library of the course "Deep Learning with Low Resources": learning
from little data (meta-learning) and training with little compute and memory
(pruning, sparse and low-rank training). Every chapter of the course calls it.
"""

__version__ = "0.1.0"

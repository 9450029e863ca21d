"""Performance comparisons against peers, run as ``python -m lowlearn.bench NAME``.

Every benchmark measures lowlearn and its peer in the same run, interleaved, and
prints ratios, so that numbers from different machines stay comparable. Unit tests
never time anything; claims about speed live here.

On a CPU with glibc, ``python -m lowlearn.bench`` first makes the process keep the
memory it frees (:func:`lowlearn.allocator.retain_freed_memory`; the environment line
of every report says so). Interleaving puts all the cases in one process, and glibc
decides when to hand freed memory back to the system from the blocks the process
freed before: one case's allocations would decide another's page faults. Training
LeNet-300-100 with Powerprop and SGD took 0 page faults per step alone, 886 after
every step of the dense network, and 212 among the four cases of ``powerprop``, and
its time followed. With the memory kept, each case pays for its own computation
only; what the page faults cost a process that trains one model with glibc's
defaults is measured by ``allocator``, one model per process.

Benchmarks:

``masks``
    One training step of a masked LeNet-300-100 (:mod:`lowlearn.sparse.mask`), of
    the same model pruned with ``torch.nn.utils.prune`` and of one whose gradient
    alone is masked, each as a ratio to the dense model (on a GPU also with each step
    captured in a CUDA graph).

``dst``
    One training step (amortised over the mask updates) of static sparse training,
    SET, RigL, SNFS and Top-KAST (:mod:`lowlearn.sparse.dst`,
    :mod:`lowlearn.sparse.topkast`), each as a ratio to the dense model and to the
    static mask.

``powerprop``
    One training step with Powerpropagation (:mod:`lowlearn.powerprop`), with SGD and
    with the optimiser-aware Adam, each as a ratio to the same network and optimizer
    without it (on a GPU also with each step captured in a CUDA graph).

``allocator``
    One training step of the dense, masked and Powerprop LeNet-300-100, each model in
    a process of its own, with glibc's default allocator settings and with freed memory
    retained (:mod:`lowlearn.allocator`): the cost of the page faults that a
    parametrization's extra tensors can cause on a CPU.

``lowrank``
    One training step of a network whose hidden layers DLRT holds at a fixed rank
    (:mod:`lowlearn.lowrank`), against the dense network: time and memory, as the
    width grows.

``maml``
    Meta-training throughput and peak memory of :class:`lowlearn.meta.maml.MAML` against
    ``higher`` on the Omniglot workload of the MAML paper.

``sparse``
    Inference time of a large Linear layer exported to CSR, compacted after channel
    pruning, and factored at low rank (2:4 on capable GPUs), against the dense layer,
    with the ideal speed-up beside the measured one (:mod:`lowlearn.sparse.export`).

``all``
    Every benchmark above in one run, reduced to one table of ratios with their goals,
    written as JSON and Markdown with the device and versions (:mod:`lowlearn.bench.report`).
"""

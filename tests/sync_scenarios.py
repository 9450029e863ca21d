"""The training steps whose host synchronisations ``test_host_syncs.py`` counts, on tiny models on the CPU.

Every scenario builds a tiny model, takes warm-up steps unrecorded, then records each
further step in its own window of :class:`syncprobe.SyncProbe`, labelled ``ordinary`` or
``update`` (a step that changes masks, prunes, grows or logs). The report lists, per
scenario and kind of step, the syncs per step and where they come from.

In the fit and meta_train scenarios the label moves to step k when step k's callbacks (or
meta_step k) start, so the window of step k holds the rest of step k (its log read) and the
body of step k+1; "update" there marks the log steps (and the method's update steps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from syncprobe import SyncProbe, as_on_an_accelerator

from lowlearn.models import MLP

STEPS, WARM = 8, 2


def batches(n: int = STEPS + WARM, features: int = 12, classes: int = 4, size: int = 16):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(size, features, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n)]


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP(12, (16, 16), 4)


def run_loop(probe: SyncProbe, name: str, model, optimizer, *, after: Callable[[int], None] | None = None,
             is_update: Callable[[int], bool] = lambda step: False,
             extra_loss: Callable[[], torch.Tensor] | None = None, closure_step: bool = False) -> None:
    """An ordinary training loop; steps ``WARM + 1 ..`` are recorded one window each."""
    for step, (x, y) in enumerate(batches(), start=1):
        window = probe.window(f"{name}|{'update' if is_update(step) else 'ordinary'}|{step}") if step > WARM \
            else contextlib.nullcontext()
        with window:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if extra_loss is not None:
                loss = loss + 1e-4 * extra_loss()
            loss.backward()
            if closure_step:
                optimizer.step(lambda: F.cross_entropy(model(x), y))
            else:
                optimizer.step()
            if after is not None:
                after(step)


# ---------------------------------------------------------------------------------- scenarios
def plain(probe):
    model = mlp()
    run_loop(probe, "plain MLP + SGD (baseline)", model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))


def masked(probe):
    from lowlearn.sparse import prune
    from lowlearn.sparse.scores import magnitude
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    prune(model, magnitude(model), 0.5, optimizer=optimizer)
    run_loop(probe, "masked model (Mask parametrization) fwd/bwd + SGD", model, optimizer)


def _dst(cls, label, **kwargs):
    def scenario(probe):
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sparsifier = cls(model, optimizer, 0.3, **kwargs)
        schedule = getattr(sparsifier, "schedule", None)
        run_loop(probe, label, model, optimizer, after=lambda step: sparsifier.step(),
                 is_update=lambda step: schedule is not None and schedule.updates_at(step))
    return scenario


def topkast(probe):
    from lowlearn.sparse import TopKAST
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = TopKAST(model, optimizer, 0.3, 0.5, every=4)
    run_loop(probe, "TopKAST (every=4, penalty in loss)", model, optimizer, after=lambda step: sparsifier.step(),
             is_update=lambda s: s % 4 == 0, extra_loss=sparsifier.penalty)


def gradual(probe):
    from lowlearn.sparse import GradualPruning
    from lowlearn.train import TrainState
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    callback = GradualPruning(0.3, begin=4, end=8, every=2)
    run_loop(probe, "GradualPruning callback (prunes at 4, 6, 8)", model, optimizer,
             after=lambda step: callback(TrainState(step, 0, torch.zeros(()), model, optimizer)),
             is_update=callback.prunes_at)


def _powerprop(alpha, masked_after=False):
    def scenario(probe):
        from lowlearn.powerprop import PowerPropOptimizer, powerprop
        model = powerprop(mlp(), alpha)
        extra = ""
        if masked_after:
            from lowlearn.sparse import prune
            from lowlearn.sparse.scores import magnitude
            prune(model, magnitude(model), 0.5)
            extra = " + masks"
        optimizer = PowerPropOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model)
        run_loop(probe, f"Powerprop alpha={alpha}{extra} fwd/bwd + PowerPropOptimizer(Adam)", model, optimizer)
    return scenario


def _dlrt(tol):
    def scenario(probe):
        from lowlearn.lowrank import DLRT, to_low_rank
        model = to_low_rank(mlp(), ["1", "3"], rank=6)
        optimizer = DLRT(model, lr=0.05, tol=tol)
        run_loop(probe, f"DLRT.step tol={tol} (2 low-rank layers)", model, optimizer, closure_step=True)
    return scenario


def _episodes(tasks=2, seed=0):
    from lowlearn.data.episodes import random_episodes
    return random_episodes(tasks, 3, 2, 2, image_size=6, seed=seed)


def _meta(label, make):
    def scenario(probe):
        learner, optimizer = make()
        with as_on_an_accelerator():
            for step in range(1, STEPS + WARM + 1):
                tasks = _episodes(seed=step)
                window = probe.window(f"{label}|ordinary|{step}") if step > WARM else contextlib.nullcontext()
                with window:
                    learner.meta_step(tasks, optimizer)
    return scenario


def _maml(cls_name, **kwargs):
    def make():
        from lowlearn.meta import maml
        torch.manual_seed(0)
        model = MLP(36, (16,), 3)
        learner = getattr(maml, cls_name)(model, 0.1, **kwargs)
        params = learner.parameters() if isinstance(learner, torch.nn.Module) else model.parameters()
        return learner, torch.optim.Adam(params, lr=1e-3)
    return make


def _reptile():
    from lowlearn.meta.maml import Reptile
    torch.manual_seed(0)
    model = MLP(36, (16,), 3)
    return Reptile(model, 0.1, 2, 0.5), torch.optim.SGD(model.parameters(), lr=0.5)


def _metric(cls_name, **kwargs):
    def make():
        from lowlearn.meta import metric
        torch.manual_seed(0)
        learner = getattr(metric, cls_name)(MLP(36, (16,), 8), **kwargs)
        return learner, torch.optim.Adam(learner.parameters(), lr=1e-3)
    return make


def _maml_regression():
    from lowlearn.meta.maml import MAML
    torch.manual_seed(0)
    model = MLP(1, (16,), 1)
    return MAML(model, 0.01, 1, loss_fn=F.mse_loss), torch.optim.Adam(model.parameters(), lr=1e-3)


def maml_regression(probe):
    from types import SimpleNamespace
    learner, optimizer = _maml_regression()
    g = torch.Generator().manual_seed(0)
    for step in range(1, STEPS + WARM + 1):
        support_x, support_y, query_x, query_y = (torch.randn(2, 5, 1, generator=g) for _ in range(4))
        tasks = SimpleNamespace(support_x=support_x, support_y=support_y, query_x=query_x, query_y=query_y)
        window = probe.window(f"MAML regression (mse) meta_step|ordinary|{step}") if step > WARM \
            else contextlib.nullcontext()
        with window:
            learner.meta_step(tasks, optimizer)


def meta_train_loop(probe):
    """meta_train with an EpisodeSampler and ProtoNet; log_every=4: steps 4 and 8 (and the last) read."""
    from lowlearn.data.episodes import EpisodeSampler
    from lowlearn.meta.episodic import meta_train
    from lowlearn.meta.metric import ProtoNet
    torch.manual_seed(0)
    learner = ProtoNet(MLP(36, (16,), 8))
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    data = torch.randn(10, 6, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    sampler = EpisodeSampler(data, ways=3, shots=2, queries=2)
    meta_train(learner, sampler, optimizer, 2, batch=2)            # warm-up
    label = "meta_train(ProtoNet, EpisodeSampler), 8 steps, log_every=4"
    steps = {"n": 0}
    real_step = learner.meta_step

    def counted(tasks, optimizer):             # window boundaries at the meta-steps
        steps["n"] += 1
        probe.label = f"{label}|{'update' if steps['n'] in (4, 8) else 'ordinary'}|{steps['n']}"
        return real_step(tasks, optimizer)

    learner.meta_step = counted
    with as_on_an_accelerator(), probe.window(f"{label}|ordinary|0"):
        meta_train(learner, sampler, optimizer, 8, batch=2, log_every=4)
    # the read of step k's statistics happens after meta_step k, inside the window labelled k


def fit_loop(probe, name="fit(MLP, SGD), 12 steps, log_every=4", method=None, optimizer_of=None, every=None):
    """fit() with a first callback that moves the probe's label to the next step."""
    from lowlearn.train import fit
    model = mlp()
    optimizer = (optimizer_of or (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)))(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 12, generator=g), torch.randint(0, 4, (64,), generator=g)
    # warm-up run (optimizer state, lazy inits), then the measured run continuing the same objects; the method
    # is built after it, so that its step count is the measured run's
    fit(model, (x, y), optimizer, steps=2, batch_size=16, progress=False, device="cpu")
    callbacks = [] if method is None else [method(model, optimizer)]
    log_every = 4

    def kind(step):
        logs = step % log_every == 0 or step == 12
        updates = every is not None and step % every == 0
        return "update" if (logs or updates) else "ordinary"

    def marker(state):                    # runs first after optimizer step k: what follows belongs to step k+1
        # fit's log() for step k runs after the callbacks: it is attributed to the window of step k, so move the
        # label only at the start of the next batch; approximate by labelling from here on as step k's tail.
        probe.label = f"{name}|{kind(state.step)}|{state.step}"

    with probe.window(f"{name}|setup|0"):
        fit(model, (x, y), optimizer, steps=12, batch_size=16, progress=False, log_every=log_every,
            callbacks=[marker, *callbacks], device="cpu")


def fit_rigl(probe):
    from lowlearn.sparse import RigL
    fit_loop(probe, "fit + RigL callback (every=4)", method=lambda m, o: RigL(m, o, 0.3, end=10, every=4), every=4)


def growth(probe):
    from lowlearn.growth import GrowthSchedule
    fit_loop(probe, "fit + GrowthSchedule(random, every=4)",
             method=lambda m, o: GrowthSchedule(0, 2, 4, 24, "random"), every=4)


def movement(probe):
    from lowlearn.sparse import attach_masks
    from lowlearn.sparse.scores import MovementScores
    model = mlp()
    attach_masks(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scores = MovementScores(model)
    run_loop(probe, "MovementScores callback", model, optimizer, after=lambda step: scores(None))


def scenarios() -> dict[str, Callable[[SyncProbe], None]]:
    from lowlearn.sparse import SET, SNFS, RigL, StaticSparse
    return {
        "plain": plain,
        "masked": masked,
        "static": _dst(StaticSparse, "StaticSparse.step"),
        "set": _dst(SET, "SET.step (end=10, every=4)", end=10, every=4),
        "rigl": _dst(RigL, "RigL.step (end=10, every=4)", end=10, every=4),
        "snfs": _dst(SNFS, "SNFS.step (end=10, every=4)", end=10, every=4),
        "topkast": topkast,
        "gradual": gradual,
        "powerprop2": _powerprop(2.0),
        "powerprop3": _powerprop(3.0),
        "powerprop1.5_masked": _powerprop(1.5, masked_after=True),
        "dlrt": _dlrt(0.1),
        "dlrt_fixed": _dlrt(None),
        "maml": _meta("MAML meta_step (2nd order, tasks_at_once=1)", _maml("MAML", inner_steps=2)),
        "maml_batched": _meta("MAML meta_step (first_order, tasks_at_once=2)",
                              _maml("MAML", inner_steps=2, first_order=True, tasks_at_once=2)),
        "metasgd": _meta("MetaSGD meta_step", _maml("MetaSGD")),
        "anil": _meta("ANIL meta_step", _maml("ANIL")),
        "reptile": _meta("Reptile meta_step (with optimizer)", _reptile),
        "maml_regression": maml_regression,
        "protonet": _meta("ProtoNet meta_step", _metric("ProtoNet")),
        "protonet_refine": _meta("ProtoNet(refine_steps=2) meta_step", _metric("ProtoNet", refine_steps=2)),
        "matchingnet": _meta("MatchingNet meta_step", _metric("MatchingNet")),
        "meta_train": meta_train_loop,
        "fit": fit_loop,
        "fit_rigl": fit_rigl,
        "growth": growth,
        "movement": movement,
    }


def per_step(probe: SyncProbe) -> dict[str, dict[int, int]]:
    """``{kind of step: {step: syncs}}`` over every label the probe recorded under (steps without syncs too)."""
    steps: dict[str, dict[int, int]] = {}
    for label in probe.labels:
        _, kind, step = label.split("|")
        steps.setdefault(kind, {})[int(step)] = probe.count(label)
    return steps

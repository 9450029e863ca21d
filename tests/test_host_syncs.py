"""Host synchronisations per training step, counted on the CPU (``syncprobe.py`` says what counts as one).

The reference is the operator semantics of CUDA PyTorch: ``.item()``/``bool()``/``tolist()``,
data-dependent output sizes (``nonzero``, boolean-mask indexing, ``unique``), and linear
algebra documented to synchronise ("When inputs are on a CUDA device, this function
synchronizes that device with the CPU", torch.linalg.svd). The label checks that
lowlearn makes on the CPU only are switched to their accelerator path
(``syncprobe.as_on_an_accelerator``). The first steps are warm-up; every later ordinary
step must not make the host wait. Update steps may, as their docstrings say: RigL's
finiteness check and SNFS's redistribution read one transfer each, DLRT reads its ranks
once (plus one wait per SVD, which PyTorch documents).
"""

import pytest
import sync_scenarios
from syncprobe import SyncProbe

ZERO_ON_ORDINARY_STEPS = ["plain", "masked", "static", "set", "rigl", "snfs", "topkast", "gradual", "powerprop2",
                          "powerprop3", "powerprop1.5_masked", "dlrt_fixed", "maml", "maml_batched", "metasgd", "anil",
                          "reptile", "maml_regression", "protonet", "protonet_refine", "matchingnet", "meta_train",
                          "fit", "fit_rigl", "growth", "movement"]


def steps_of(key):
    probe = SyncProbe()
    sync_scenarios.scenarios()[key](probe)
    return probe, sync_scenarios.per_step(probe)


@pytest.mark.parametrize("key", ZERO_ON_ORDINARY_STEPS)
def test_ordinary_steps_make_the_host_wait_for_nothing(key):
    """Every recorded ordinary step (after warm-up) has no operation that would sync a CUDA device."""
    probe, steps = steps_of(key)
    assert steps.get("ordinary"), "no ordinary step was recorded"
    ordinary = {label for label in probe.labels if label.split("|")[1] == "ordinary"}
    found = [f"{e.kind} at {e.where}" for e in probe.events if e.label in ordinary]
    assert found == []


@pytest.mark.parametrize("key, per_update", [("set", 0), ("topkast", 0), ("rigl", 1), ("snfs", 1), ("gradual", 3)])
def test_mask_updates_read_the_device_at_most_as_documented(key, per_update):
    """SET and Top-KAST update their masks on the device; RigL (finite-gradient check) and SNFS
    (growth shared among layers on the host) read it once per update, in one transfer.
    Gradual pruning reads the layers' kept counts (twice: the schedule's cap, prune's
    check) and whether any scores are NaN, each one transfer for all three layers."""
    _, steps = steps_of(key)
    assert steps["update"] and set(steps["update"].values()) == {per_update}


@pytest.mark.parametrize("key", ["fit", "meta_train"])
def test_the_training_loops_read_the_loss_once_per_log_interval(key):
    """fit and meta_train read their running statistics in one transfer every log_every steps (4 here)."""
    probe, steps = steps_of(key)
    assert set(steps["update"].values()) == {1}
    logs = [e for e in probe.events if "update" in e.label]
    assert {e.kind for e in logs} == {"tolist (device-to-host copy)"}


def test_rank_adaptive_dlrt_waits_once_per_layer_svd_and_once_for_the_ranks():
    """DLRT(tol) per step: one wait per layer's SVD of its core (PyTorch documents the sync of
    torch.linalg.svd on CUDA) and one read of all the ranks (truncation_ranks), nothing else."""
    probe, steps = steps_of("dlrt")
    layers = 2
    assert set(steps["ordinary"].values()) == {layers + 1}
    kinds = {(e.kind, e.where.split(":")[0], e.where.split()[-1]) for e in probe.events}
    assert kinds == {("linalg _linalg_svd (syncs on CUDA)", "lowlearn/lowrank/dlrt.py", "_galerkin_and_truncate"),
                     ("tolist (device-to-host copy)", "lowlearn/lowrank/layers.py", "truncation_ranks")}

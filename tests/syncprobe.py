"""Count the operations that would make the host wait for a CUDA device, on the CPU.

A host synchronisation is a property of the *operator*, not of the device it runs on,
so it can be seen on a CPU-only machine: a ``TorchDispatchMode`` sees every ATen
operator call (also those in backward passes and in autograd hooks), and a few
Python-level conversions that never reach the dispatcher on the CPU are wrapped.

What is counted as a sync (``SyncProbe.syncs``):

* ``aten._local_scalar_dense``: ``.item()``, ``bool(t)`` (``if t.any():``), ``int(t)``,
  ``float(t)``, ``t.__index__``, f-string formatting of a tensor;
* ``Tensor.tolist`` / ``Tensor.numpy`` / ``Tensor.cpu`` (a device-to-host copy on CUDA);
* data-dependent output sizes: ``aten.nonzero`` (not ``nonzero_static``),
  ``aten.masked_select``, ``aten._unique*`` / ``unique_dim`` / ``unique_consecutive``,
  ``aten.repeat_interleave.Tensor`` without ``output_size``, ``aten.bincount``,
  boolean-mask reads ``x[mask]`` (``aten.index.Tensor`` with a bool index), and
  boolean-mask writes ``x[mask] = v`` unless ``v`` is a one-element CPU value
  (ATen's ``canDispatchToMaskedFill`` path, ``x[mask] = 0.0``, does not sync);
* ops returning a Python bool: ``aten.equal``, ``aten.allclose``;
* linear algebra that PyTorch documents as synchronising on CUDA (info checks):
  ``_linalg_svd``, ``_linalg_eigh``, ``linalg_eig``, ``linalg_inv_ex`` / ``cholesky_ex``
  / ``lu_factor_ex`` / ``solve_ex`` with ``check_errors``, ``linalg_lstsq``;
* ``torch.cuda.synchronize``.

Not counted, because CUDA PyTorch does not wait there: ``.item()`` of torch.optim's CPU
step counts (Adam's ``state["step"]`` stays on the CPU unless capturable/fused), and the
two range checks ATen's ``one_hot`` makes on the CPU only when ``num_classes`` is given
(on CUDA it relies on scatter's device assert). Without ``num_classes`` one_hot reads the
maximum on CUDA too; the probe then counts both CPU reads (one too many).

Recorded but not counted (``SyncProbe.notes``), to be judged by reading the code:
``aten.linalg_qr`` (not documented to sync), ``torch.tensor``/``as_tensor`` data made
inside the window (a host-to-device copy if it then goes to a GPU), and
``Tensor.to(device)`` calls.

Usage::

    probe = SyncProbe()
    with probe.window("rigl step 3"):
        sparsifier.step()
    probe.count("rigl step 3")

Each event keeps the innermost frames of ``lowlearn`` on the Python stack
(``file:line function``), so it points at the line that asks for the value.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lowlearn

LIBRARY = str(Path(lowlearn.__file__).parent) + os.sep
aten = torch.ops.aten

_SCALAR = {aten._local_scalar_dense.default}
_DYNAMIC = {
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique.default: "unique",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.bincount.default: "bincount",
}
_BOOL_RESULT = {aten.equal.default: "torch.equal", aten.allclose.default: "allclose"}
_LINALG_SYNC = {"_linalg_svd", "_linalg_eigh", "linalg_eig", "linalg_lstsq", "_linalg_eigvals", "linalg_eigvals"}
_LINALG_CHECKED = {"linalg_inv_ex", "linalg_cholesky_ex", "linalg_lu_factor_ex", "linalg_solve_ex",
                   "_linalg_solve_ex", "linalg_ldl_factor_ex", "linalg_lu"}


@dataclass
class Event:
    kind: str                 # what forces the sync
    where: str                # innermost lowlearn frame, "path:line function"
    stack: tuple[str, ...]    # lowlearn frames, innermost first
    label: str                # the window it happened in


@dataclass
class SyncProbe:
    events: list[Event] = field(default_factory=list)   # counted syncs
    notes: list[Event] = field(default_factory=list)    # worth a look, not counted
    labels: list[str] = field(default_factory=list)     # every label recorded under, in order
    _label: str | None = None
    _one_hot_classes: int | None = None                  # set while F.one_hot runs

    @property
    def label(self) -> str | None:
        return self._label

    @label.setter
    def label(self, value: str | None) -> None:
        self._label = value
        if value is not None and value not in self.labels:
            self.labels.append(value)

    # ------------------------------------------------------------------ recording
    def _frames(self) -> tuple[str, ...]:
        frames, f = [], sys._getframe(2)
        while f is not None:
            name = f.f_code.co_filename
            if name.startswith(LIBRARY):
                frames.append(f"{name[len(LIBRARY) - len('lowlearn/'):]}:{f.f_lineno} {f.f_code.co_name}")
            f = f.f_back
        return tuple(frames)

    def _record(self, kind: str, counted: bool = True) -> None:
        stack = self._frames()
        origin = _origin()
        if kind.startswith("scalar read") and self._one_hot_classes not in (None, -1):
            # ATen's one_hot checks the labels' range with two .item() calls on the CPU only; on CUDA, given
            # num_classes, it relies on scatter's device-side assert instead (aten/src/ATen/native/Onehot.cpp).
            kind, counted = "scalar read inside F.one_hot(num_classes=N): CPU-only check, none on CUDA", False
        elif kind.startswith("scalar read") and "/torch/optim/" in origin:
            # torch's optimizers keep their step counts on the CPU (unless capturable or fused) and read them
            # with .item(): a host value, not a wait for the device.
            kind, counted = f"scalar read of a CPU step count in torch.optim ({origin.rsplit('/', 1)[-1]})", False
        event = Event(kind, stack[0] if stack else "<outside lowlearn>", stack, self.label or "")
        (self.events if counted else self.notes).append(event)

    @contextlib.contextmanager
    def window(self, label: str):
        """Record everything that runs inside the block under ``label``."""
        previous, self.label = self.label, label
        with _Mode(self), _patched(self):
            try:
                yield self
            finally:
                self.label = previous

    # ------------------------------------------------------------------ reading
    def syncs(self, label: str | None = None) -> list[Event]:
        return [e for e in self.events if label is None or e.label == label]

    def count(self, label: str | None = None) -> int:
        return len(self.syncs(label))

    def summary(self, label: str | None = None, notes: bool = False) -> Counter:
        source = self.notes if notes else self.events
        return Counter((e.kind, e.where) for e in source if label is None or e.label == label)

    def clear(self) -> None:
        self.events.clear()
        self.notes.clear()


_MACHINERY = ("torch/utils/_python_dispatch", "torch/_tensor.py", "torch/_compile.py", "torch/_dynamo/")


def _origin() -> str:
    """The innermost frame outside this module and torch's dispatch machinery: who asked for the value."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if not (name == __file__ or any(part in name for part in _MACHINERY)):
            return f"{name}:{f.f_lineno}"
        f = f.f_back
    return "?"


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class _Mode(TorchDispatchMode):
    def __init__(self, probe: SyncProbe):
        super().__init__()
        self.probe = probe

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        probe = self.probe
        if func in _SCALAR:
            probe._record("scalar read (.item/bool/int/float)")
        elif func in _DYNAMIC:
            probe._record(_DYNAMIC[func])
        elif func in _BOOL_RESULT:
            probe._record(_BOOL_RESULT[func])
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None and len(args) < 2:
            probe._record("repeat_interleave without output_size")
        elif func is aten.index.Tensor and _has_bool_index(args[1]):
            probe._record("boolean-mask read x[mask]")
        elif name in ("index_put_", "index_put", "_index_put_impl_") and _has_bool_index(args[1]):
            value = args[2]
            if not (value.numel() == 1 and value.dim() == 0):      # x[mask] = scalar becomes masked_fill_
                probe._record("boolean-mask write x[mask] = tensor")
        elif name in _LINALG_SYNC:
            probe._record(f"linalg {name} (syncs on CUDA)")
        elif name in _LINALG_CHECKED and kwargs.get("check_errors", True):
            probe._record(f"linalg {name} with error checks (syncs on CUDA)")
        elif name == "linalg_qr":
            probe._record("linalg_qr (not documented to sync)", counted=False)
        elif name == "lift_fresh":
            probe._record("tensor from Python data (torch.tensor)", counted=False)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _patched(probe: SyncProbe):
    """Wrap conversions that on the CPU never reach the dispatcher."""
    T = torch.Tensor
    originals = {"tolist": T.tolist, "numpy": T.numpy, "cpu": T.cpu, "to": T.to}
    sync_original = torch.cuda.synchronize
    one_hot_original = torch.nn.functional.one_hot

    def one_hot(tensor, num_classes=-1):
        probe._one_hot_classes = num_classes
        try:
            return one_hot_original(tensor, num_classes)
        finally:
            probe._one_hot_classes = None

    def tolist(self, *a, **k):
        probe._record("tolist (device-to-host copy)")
        return originals["tolist"](self, *a, **k)

    def numpy(self, *a, **k):
        probe._record("numpy (device-to-host copy)")
        return originals["numpy"](self, *a, **k)

    def cpu(self, *a, **k):
        probe._record(".cpu() (device-to-host copy)")
        return originals["cpu"](self, *a, **k)

    def to(self, *a, **k):
        target = k.get("device", a[0] if a and isinstance(a[0], (str, torch.device)) else None)
        if target is not None:
            probe._record(f".to({target}) (a transfer if the devices differ)", counted=False)
        return originals["to"](self, *a, **k)

    def synchronize(*a, **k):
        probe._record("torch.cuda.synchronize")

    T.tolist, T.numpy, T.cpu, T.to = tolist, numpy, cpu, to
    torch.cuda.synchronize = synchronize
    torch.nn.functional.one_hot = one_hot
    try:
        yield
    finally:
        T.tolist, T.numpy, T.cpu, T.to = originals["tolist"], originals["numpy"], originals["cpu"], originals["to"]
        torch.cuda.synchronize = sync_original
        torch.nn.functional.one_hot = one_hot_original


@contextlib.contextmanager
def as_on_an_accelerator():
    """Take the code paths lowlearn takes on a GPU where it tests the device type.

    lowlearn reads label values to check them only where that is free, on the CPU
    (``lowlearn.meta.functional.values_are_free_to_read``); on CUDA it skips those reads.
    Inside this block that function says False, as it would for CUDA tensors.
    """
    import lowlearn.meta.functional as functional
    import lowlearn.meta.maml as maml
    import lowlearn.meta.metric as metric
    saved = functional.values_are_free_to_read
    never = lambda tensor: False  # noqa: E731
    functional.values_are_free_to_read = maml.values_are_free_to_read = metric.values_are_free_to_read = never
    try:
        yield
    finally:
        functional.values_are_free_to_read = maml.values_are_free_to_read = metric.values_are_free_to_read = saved

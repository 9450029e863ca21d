"""``Function``: a ``torch.autograd.Function`` whose ``apply`` does not read ``forward``'s signature anew each call.

When ``setup_context`` is defined apart from ``forward`` (as :mod:`torch.func`'s
transforms require), ``torch.autograd.Function.apply`` binds its arguments to
``inspect.signature(cls.forward)`` on every call: about 10 µs each time on a CPU, paid per
layer and pass by the low-rank layers, the Powerprop weights and the split masks of
Top-KAST and PackNet. ``inspect.signature`` returns a function's ``__signature__`` as it
is, so a subclass of :class:`Function` computes it once, when the subclass is defined.
"""

from __future__ import annotations

import inspect

import torch


class Function(torch.autograd.Function):
    """``torch.autograd.Function`` with ``forward``'s signature computed once, at the subclass's definition."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            cls.forward.__signature__ = inspect.signature(cls.forward)

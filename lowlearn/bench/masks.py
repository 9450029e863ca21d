"""Training-step time of masked layers against dense and against ``torch.nn.utils.prune``.

All the models are LeNet-300-100 with identical weights; the two sparse ones keep
the same random ``density`` of every layer's weights. A second copy of the dense
model, timed like the others, shows how far apart the measurement puts two equal
models: the ratios below mean little within that distance of 1. lowlearn's masks are
parametrizations (:mod:`lowlearn.sparse.mask`); ``torch.nn.utils.prune`` recomputes
``weight = weight_orig * weight_mask`` in a forward pre-hook. A training step is
forward, cross-entropy, backward and an SGD-with-momentum step on a fixed batch.

A fifth model, ``masked gradient``, masks the way much sparse-training code does: the
layer computes with its raw weight, zero where pruned, and a hook zeroes the pruned
entries of each accumulated gradient in place, so no weight-sized product is made in
either pass. It is the same computation only while nothing else moves those zeros,
and it shows what that shortcut would save. lowlearn's masks stay exact where it does
not: gradients taken by ``torch.autograd.grad`` or :mod:`torch.func` (a MAML inner
loop, per-example gradients) pass no hook and are not masked, ``copy.deepcopy``
drops the hook, and optimizers that mix weights move the zeros
(:mod:`lowlearn.sparse.mask`).

On a CUDA device every model is timed a second time with its training step captured
in a CUDA graph (``"<model>, CUDA graph"``, against the dense model's graph;
:func:`~lowlearn.bench.timing.cuda_graphed`). Eager, a LeNet-300-100 step there is
mostly the host launching kernels, and the ratios compare Python overheads; a replay
launches the whole step at once, so its ratios compare the work on the GPU. The goals
are judged for both.

The page faults per step are printed beside the times. A parametrization's extra
weight-sized tensors can make the allocator hand memory back to the system and fault
it in again (:mod:`lowlearn.allocator`); ``python -m lowlearn.bench`` keeps freed
memory, so there they stay near zero, and ``python -m lowlearn.bench allocator``
measures their cost with glibc's defaults, one model per process.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch.nn.utils import prune as torch_prune

from lowlearn import cli
from lowlearn.models import MLP
from lowlearn.sparse.mask import attach_masks, prunable_layers, set_masks

from .timing import (GRAPH, add_device_argument, cuda_graphed, departures, environment, fixed_batch, held_at, judged,
                     paired_ratio, print_steps, resolve_device, timed_steps, variants)

GOALS = {"dense": 1.10, "torch.nn.utils.prune": 1.0}
"""The most time per step that lowlearn's masks are held to, as a multiple of each reference's, at the
default :data:`BATCH_SIZE` and :data:`DENSITY`."""
BATCH_SIZE = 60
"""The default number of training examples per step, and the batch the goals are held at."""
DENSITY = 0.1
"""The default fraction of each layer's weights kept, and the density the goals are held at."""


def goal_settings(sizes: Mapping[str, object]) -> dict[str, tuple[float, float]]:
    """``{setting: (the value in ``sizes``, the goals')}`` for :func:`~lowlearn.bench.timing.departures`: the goals
    are held at :data:`BATCH_SIZE` and :data:`DENSITY` (``sizes`` as :func:`run` takes them; missing: the defaults)."""
    return {"batch": (sizes.get("batch_size", BATCH_SIZE), BATCH_SIZE),
            "density": (sizes.get("density", DENSITY), DENSITY)}


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """The training-step function of ``model`` on the batch ``(x, y)``, with its own SGD-with-momentum optimizer."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


MODELS = ("dense", "dense (copy)", "lowlearn masks", "torch.nn.utils.prune", "masked gradient")
"""The models timed, in the order they are built and printed."""


def build_model(name: str, density: float, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """Model ``name`` of :data:`MODELS`: LeNet-300-100 initialised from ``seed``, the same for every name.

    The three sparse ones keep the same random ``density`` of every layer's weights
    (drawn from ``seed`` too): lowlearn's masks, ``torch.nn.utils.prune``, and the raw
    weight zeroed where pruned with a hook that masks its gradient (``masked gradient``).

    Raises:
        ValueError: a name not in :data:`MODELS`.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; the models are: {', '.join(MODELS)}")
    torch.manual_seed(seed)
    model = MLP().to(device)
    if name in ("dense", "dense (copy)"):
        return model
    generator = torch.Generator().manual_seed(seed)
    keep = {layer_name: (torch.rand(layer.weight.shape, generator=generator, device="cpu") < density).to(device)
            for layer_name, layer in prunable_layers(model).items()}
    if name == "lowlearn masks":
        attach_masks(model)
        set_masks(model, keep)
    elif name == "torch.nn.utils.prune":
        for layer_name, layer in prunable_layers(model).items():
            torch_prune.custom_from_mask(layer, "weight", keep[layer_name])
    else:
        for layer_name, layer in prunable_layers(model).items():
            zeros_kept = keep[layer_name].to(layer.weight.dtype)
            with torch.no_grad():
                layer.weight.mul_(zeros_kept)
            layer.weight.register_post_accumulate_grad_hook(functools.partial(_mask_gradient, mask=zeros_kept))
    return model


def build_models(density: float, device: torch.device, seed: int = 0) -> dict[str, torch.nn.Module]:
    """``{name: model}`` for every name of :data:`MODELS` (:func:`build_model`): dense (twice), masked by lowlearn,
    by ``torch.nn.utils.prune``, by gradient."""
    return {name: build_model(name, density, device, seed) for name in MODELS}


def _mask_gradient(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero the pruned entries of ``weight``'s accumulated gradient, in place (the ``masked gradient`` model)."""
    weight.grad.mul_(mask)


def build_steps(density: float, batch_size: int, device: torch.device) -> dict[str, Callable[[], None]]:
    """``{model name: its training-step function}`` on one fixed batch.

    On a CUDA device, each model's twin too, its step captured in a CUDA graph
    (``"<name>, CUDA graph"``, :func:`~lowlearn.bench.timing.cuda_graphed`).
    """
    x, y = fixed_batch(batch_size, 784, device)
    steps = {name: train_step(model, x, y) for name, model in build_models(density, device).items()}
    if device.type == "cuda":
        steps |= {name + GRAPH: cuda_graphed(lambda name=name: train_step(build_model(name, density, device), x, y),
                                             device) for name in steps}
    return steps


def reference(name: str) -> str:
    """The model that ``name`` is measured against: dense, captured in a CUDA graph if ``name`` is."""
    return "dense" + (GRAPH if name.endswith(GRAPH) else "")


def run(density: float = DENSITY, batch_size: int = BATCH_SIZE, iterations: int = 20, repeats: int = 70,
        warmup: int = 20, device: str | None = None) -> dict[str, dict]:
    """Time the models, then count their page faults over one more block of steps.

    Returns:
        :func:`~lowlearn.bench.timing.timed_steps`' result.
    """
    device = resolve_device(device)
    steps = build_steps(density, batch_size, device)
    return timed_steps(steps, device=device, iterations=iterations, repeats=repeats, warmup=warmup)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lowlearn.bench masks", description=__doc__)
    parser.add_argument("--density", type=cli.fraction, default=DENSITY,
                        help=f"fraction of weights kept (default {DENSITY})")
    parser.add_argument("--batch-size", type=cli.positive_int, default=BATCH_SIZE)
    parser.add_argument("--iterations", type=cli.positive_int, default=20, help="training steps per timed block")
    parser.add_argument("--repeats", type=cli.positive_int, default=70, help="interleaved timed blocks per model")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    result = run(args.density, args.batch_size, args.iterations, args.repeats, device=device)
    print(f"LeNet-300-100 training step, batch {args.batch_size}, density {args.density}, {environment(device)}")
    print(f"median of {args.repeats} interleaved blocks of {args.iterations} steps, in shuffled order; the ratio to "
          "dense is the median of the blocks' ratios, beside their middle half")
    print_steps(result, reference, "model", "vs dense")
    settings = goal_settings(vars(args))
    for suffix in variants(result["rounds"], "lowlearn masks"):
        for peer, goal in GOALS.items():
            ratio = paired_ratio(result["rounds"], "lowlearn masks" + suffix, peer + suffix)
            print(f"goal: lowlearn masks{suffix} / {peer}{suffix} <= {goal:.2f} at {held_at(settings)}: "
                  f"{judged(ratio, goal, not_held=departures(settings))}")

"""task_batched against a per-task loop of torch.func.functional_call: outputs, first and second derivatives.

The reference runs the unchanged model once per task with that task's parameters (``p[t]`` for a per-task
parameter, ``p`` itself for a shared one) and stacks the results; the batched run packs the tasks into the channel
dimension. Everything is float64 so that agreement is to round-off.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lowlearn.meta.batched import pack, task_batched, unpack


def odd_convnet(batch_norm_1d=True):
    """Non-square kernel, stride, padding, dilation and pooling; affine and non-affine batch norm; a bias-free conv."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
              nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(), nn.MaxPool2d((2, 3), stride=(1, 2)),
              nn.Conv2d(3, 4, (1, 2), bias=False), nn.BatchNorm2d(4, affine=False, track_running_stats=False),
              nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 4, 5)]
    if batch_norm_1d:
        layers += [nn.BatchNorm1d(5, track_running_stats=False), nn.ReLU()]
    layers += [nn.Linear(5, 3)]
    return nn.Sequential(*layers).double()                                    # input (B, 2, 7, 10): non-square


def stacked_params(model, tasks, shared=(), seed=1):
    """Per-task parameters (``p + noise``, leading task dimension) except those named in ``shared``; all leaves."""
    generator = torch.Generator().manual_seed(seed)
    params = {}
    for name, p in model.named_parameters():
        if name in shared:
            value = p.detach() + 0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype)
        else:
            value = p.detach() + 0.3 * torch.randn(tasks, *p.shape, generator=generator, dtype=p.dtype)
        params[name] = value.requires_grad_()
    return params


def loop(model, params, x, shared=()):
    """The reference: the model run once per task with that task's parameters, outputs stacked."""
    return torch.stack([functional_call(model, {n: p if n in shared else p[t] for n, p in params.items()}, (x[t],))
                        for t in range(x.shape[0])])


def losses(out, y):
    """Sum over tasks of each task's mean cross-entropy (what MAML's inner loop differentiates)."""
    return sum(F.cross_entropy(out[t], y[t]) for t in range(out.shape[0]))


ANIL_BODY = ("0.weight", "0.bias", "1.weight", "1.bias", "4.weight")
CASES = {                                    # (tasks, batch, shared parameter names, batch norm 1d)
    "all per task": (3, 4, (), True),
    "one task": (1, 4, (), True),
    "batch of one": (3, 1, (), False),       # BatchNorm1d refuses one example per channel, in the loop too
    "one task, batch of one": (1, 1, (), False),
    "ANIL: shared body": (3, 4, ANIL_BODY, True),
    "shared weight, per-task bias": (2, 3, ("0.weight", "1.bias", "8.weight"), True),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", list(CASES))
def test_task_batched_outputs_and_first_and_second_derivatives_equal_the_per_task_loop(case, mode):
    """Outputs, gradients (parameters and inputs) and Hessian-vector products of the summed per-task loss.

    Batch norm without running statistics uses the batch's statistics in evaluation mode too, so ``eval`` must
    agree with the loop as well.
    """
    tasks, batch, shared, bn1d = CASES[case]
    model = odd_convnet(bn1d)
    getattr(model, mode)()
    batched = task_batched(model)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(tasks, batch, 2, 7, 10, generator=generator, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (tasks, batch), generator=generator)
    params = stacked_params(model, tasks, shared)
    names = list(params)
    vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params.values()]

    results = []
    for forward in (lambda: loop(model, params, x, shared), lambda: functional_call(batched, params, (x,))):
        out = forward()
        grads = torch.autograd.grad(losses(out, y), [params[n] for n in names] + [x], create_graph=True)
        hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vector)), [params[n] for n in names])
        results.append((out, grads, hvp))
    (out_ref, grads_ref, hvp_ref), (out, grads, hvp) = results
    assert out.shape == out_ref.shape == (tasks, batch, 3)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for name, g, g_ref in zip(names + ["input"], grads, grads_ref):
        assert g.shape == g_ref.shape, name
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12, msg=name)
    for name, h, h_ref in zip(names, hvp, hvp_ref):
        torch.testing.assert_close(h, h_ref, rtol=1e-9, atol=1e-11, msg=name)
        assert h_ref.abs().sum() > 0, name                        # second derivatives that actually exist


@pytest.mark.parametrize("first_order", [False, True])
def test_a_two_step_inner_loop_through_task_batched_gives_the_per_task_loops_meta_gradient(first_order):
    """MAML on the odd convnet with a shared initialisation expanded to T tasks: the batched inner loop (one loss
    over the packed tasks, summed over tasks) and T separate functional inner loops give the same meta-gradient of
    the query loss with respect to the shared θ₀, second order and first order (detached inner gradients)."""
    tasks, alpha = 3, 0.3
    model = odd_convnet()
    batched = task_batched(model)
    generator = torch.Generator().manual_seed(3)
    support = torch.randn(tasks, 4, 2, 7, 10, generator=generator, dtype=torch.float64)
    query = torch.randn(tasks, 5, 2, 7, 10, generator=generator, dtype=torch.float64)
    support_y, query_y = torch.randint(0, 3, (tasks, 4), generator=generator), torch.randint(0, 3, (tasks, 5),
                                                                                            generator=generator)
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}

    def adapt(run, params, x, y):
        for _ in range(2):
            grads = torch.autograd.grad(run(params, x, y), list(params.values()), create_graph=not first_order)
            params = {n: p - alpha * g for (n, p), g in zip(params.items(), grads)}
        return params

    def per_task(params, x, y):
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    reference = 0
    for t in range(tasks):
        adapted = adapt(per_task, dict(theta), support[t], support_y[t])
        reference = reference + per_task(adapted, query[t], query_y[t])
    expected = torch.autograd.grad(reference, list(theta.values()))

    def all_tasks(params, x, y):
        return losses(functional_call(batched, params, (x,)), y)

    adapted = adapt(all_tasks, {n: p.expand(tasks, *p.shape) for n, p in theta.items()}, support, support_y)
    got = torch.autograd.grad(all_tasks(adapted, query, query_y), list(theta.values()))
    for name, g, e in zip(theta, got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)


def test_pack_puts_channel_c_of_task_t_at_t_times_c_plus_c_and_unpack_inverts_it():
    """The documented packing ``(T, B, C, ...) → (B, T·C, ...)``, channel ``t·C + c``, written out element by
    element."""
    tasks, batch, channels = 3, 2, 4
    x = torch.randn(tasks, batch, channels, 5, 6)
    packed = pack(x)
    assert packed.shape == (batch, tasks * channels, 5, 6)
    for t in range(tasks):
        for b in range(batch):
            for c in range(channels):
                assert torch.equal(packed[b, t * channels + c], x[t, b, c])
    assert torch.equal(unpack(packed, tasks), x)


def test_a_grouped_convolution_on_packed_tasks_is_each_tasks_convolution():
    """A slow reference for TaskConv2d: a direct sum over the kernel window, per task, written with unfold."""
    tasks, batch = 2, 3
    conv = nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=(1, 0)).double()
    params = stacked_params(conv, tasks)
    x = torch.randn(tasks, batch, 2, 5, 8, dtype=torch.float64)
    out = functional_call(task_batched(conv), params, (x,))
    for t in range(tasks):
        cols = F.unfold(x[t], (2, 3), stride=(1, 2), padding=(1, 0))                     # (B, 2·2·3, L)
        expected = torch.einsum("ok,bkl->bol", params["weight"][t].flatten(1), cols) + params["bias"][t][:, None]
        torch.testing.assert_close(out[t].flatten(2), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer, problem_text", [
    (nn.Conv2d(1, 2, 3, padding="same"), "numeric zero padding"),
    (nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), "numeric zero padding"),
    (nn.Conv1d(1, 2, 3), "Conv1d holds"),
    (nn.Conv3d(1, 2, 3), "Conv3d holds"),
    (nn.PReLU(), "PReLU holds"),
    (nn.BatchNorm1d(4), "running statistics"),
    (nn.Softmax(dim=1), "Softmax"),
    (nn.Unflatten(1, (2, 2)), "Unflatten"),
])
def test_layers_without_a_task_batched_form_are_refused_by_name(layer, problem_text):
    """Layers that would mix or misread the packed tasks are refused when the batched copy is made."""
    with pytest.raises(ValueError, match=problem_text):
        task_batched(nn.Sequential(layer))


def test_task_batched_batch_norm_uses_the_layers_own_eps():
    """Reference: the unchanged model run once per task with that task's parameters (functional_call), stacked.

    With ``eps=0.5`` on inputs of variance about 1 the epsilon changes the normalisation by tens of percent, so a
    task-batched batch norm that used the default 1e-5 would disagree with the loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, eps=0.5, track_running_stats=False), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 4 * 4, 6), nn.BatchNorm1d(6, eps=0.5, track_running_stats=False),
                          nn.Linear(6, 2)).double()
    tasks = 2
    g = torch.Generator().manual_seed(1)
    params = {name: p.detach() + 0.3 * torch.randn(tasks, *p.shape, generator=g, dtype=p.dtype)
              for name, p in model.named_parameters()}
    x = torch.randn(tasks, 5, 1, 6, 6, generator=g, dtype=torch.float64)
    expected = torch.stack([functional_call(model, {n: p[t] for n, p in params.items()}, (x[t],))
                            for t in range(tasks)])
    torch.testing.assert_close(functional_call(task_batched(model), params, (x,)), expected, rtol=1e-10, atol=1e-12)

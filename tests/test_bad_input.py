"""Bad input that torch alone would meet with a raw or misleading error, or with none (silently wrong results): each
gets an error that names the argument and the fix, and NumPy integers work as the ints they hold."""

import copy
import math
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from torch.utils.data import TensorDataset

from lowlearn.atomic import atomic_file
from lowlearn.cost import count_flops, count_parameters, training_memory
from lowlearn.data import (Curves, EpisodeSampler, GPCurves, Resource, context_target_split, fetch, group_by_class,
                           load_cifar10, load_mnist, load_omniglot, load_omniglot_runs, random_episodes)
from lowlearn.data.cache import fetch_all
from lowlearn.growth import GrowthSchedule, gradmax_directions
from lowlearn.lowrank import DLRT, LowRankLinear, to_low_rank
from lowlearn.meta import CNP, MAML, LSTMOptimizer, MatchingNet, MetaSGD, ProtoNet, Reptile, adapt_and_evaluate
from lowlearn.meta import inner_loop, parameters_of
from lowlearn.models import MLP, Bottleneck, Conv4, DepthwiseSeparableConv2d, LeNet5
from lowlearn.plot import density_axis, errorbar_curve
from lowlearn.powerprop import PowerPropOptimizer, powerprop
from lowlearn.sparse import (SET, SNFS, GradualPruning, RigL, StaticSparse, TopKAST, allocation, attach_masks,
                             drop_and_grow, dst_training_flops, iterative_pruning, masks_of, model_sparse_flops, prune,
                             sparse_inference_flops, sparse_training_flops)
from lowlearn.sparse.flops import pruning_training_flops
from lowlearn.sparse.lottery import EarlyBird, iterative_magnitude_pruning, train_control
from lowlearn.sparse.scores import magnitude, snip
from lowlearn.train import evaluate, fit, save_checkpoint


def per_example(out, target):
    return F.cross_entropy(out, target, reduction="none")


def tiny_tasks(tasks=2, ways=3, shots=2, queries=2, dim=4):
    g = torch.Generator().manual_seed(0)
    labels = lambda k: torch.arange(ways).repeat_interleave(k).repeat(tasks, 1)   # noqa: E731
    return (torch.randn(tasks, ways * shots, dim, generator=g), labels(shots),
            torch.randn(tasks, ways * queries, dim, generator=g), labels(queries))


def episode(tasks=2):
    from lowlearn.data import Episode
    sx, sy, qx, qy = tiny_tasks(tasks)
    return Episode(sx, sy, qx, qy, torch.arange(3).repeat(tasks, 1))


# A loss per example (reduction="none"), which torch meets with "grad can be implicitly created only for scalar
# outputs" or "stack expects each tensor to be equal size".

def test_fit_refuses_a_loss_per_example_clearly():
    model = MLP(4, (8,), 3)
    data = (torch.randn(20, 4), torch.randint(0, 3, (20,)))
    with pytest.raises(ValueError, match=r"loss_fn must return the mean loss, one number.*shape \(20,\)"):
        fit(model, data, torch.optim.SGD(model.parameters(), 0.1), steps=1, loss_fn=per_example, device="cpu",
            progress=False)


def test_fit_refuses_a_loss_that_is_not_a_tensor_clearly():
    # torch's own message was "'float' object has no attribute 'dim'".
    model = MLP(4, (8,), 3)
    data = (torch.randn(20, 4), torch.randint(0, 3, (20,)))
    with pytest.raises(TypeError, match=r"loss_fn must return the mean loss as a tensor.*returned a float"):
        fit(model, data, torch.optim.SGD(model.parameters(), 0.1), steps=1, device="cpu", progress=False,
            loss_fn=lambda output, y: torch.nn.functional.cross_entropy(output, y).item())


@pytest.mark.parametrize("tasks_at_once", [1, 2])
def test_maml_refuses_a_loss_per_example_clearly(tasks_at_once):
    maml = MAML(MLP(4, (8,), 3), 0.1, 1, loss_fn=per_example, tasks_at_once=tasks_at_once)
    with pytest.raises(ValueError, match=r"loss_fn must return the mean loss, one number.*reduction='none'"):
        maml.meta_backward(episode())


def test_reptile_and_inner_loop_refuse_a_loss_per_example_clearly():
    model = MLP(4, (8,), 3)
    with pytest.raises(ValueError, match=r"loss_fn must return the mean loss, one number.*reduction='none'"):
        Reptile(model, 0.1, 1, 1.0, loss_fn=per_example).meta_step(episode())
    sx, sy, _, _ = tiny_tasks()
    with pytest.raises(ValueError, match=r"loss_fn must return the mean loss, one number.*reduction='none'"):
        inner_loop(model, parameters_of(model), sx[0], sy[0], per_example, 1, 0.1)


# NumPy integers count as numbers (lowlearn.checks), also where torch takes Python ints only.

def test_numpy_batch_sizes_train_and_evaluate_like_the_ints_they_hold():
    data = (torch.randn(20, 4), torch.randint(0, 3, (20,)))
    histories = []
    for batch_size in (5, np.int64(5)):
        torch.manual_seed(0)
        model = MLP(4, (8,), 3)
        histories.append(fit(model, data, torch.optim.SGD(model.parameters(), 0.1), steps=3, batch_size=batch_size,
                             device="cpu", progress=False).loss)
        histories.append(evaluate(model, data, batch_size=batch_size // 2)["loss"])
    assert histories[:2] == histories[2:]


def test_a_numpy_eval_batch_size_embeds_like_the_int_it_holds():
    sx, sy, qx, _ = tiny_tasks(tasks=1)
    logits = [ProtoNet(nn.Flatten(), eval_batch_size=size).eval()(sx[0], sy[0], qx[0]) for size in (2, np.int64(2))]
    torch.testing.assert_close(logits[0], logits[1])


def test_a_numpy_y_dim_builds_a_working_cnp():
    out = CNP(y_dim=np.int64(1), hidden=8)(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1), torch.zeros(2, 4, 1))
    assert out.mean.shape == (2, 4, 1)


def test_numpy_seeds_give_the_episodes_of_the_ints_they_hold():
    """As fit() and seed_everything() do: `for seed in np.arange(5)` is a natural loop."""
    data = torch.randn(5, 4, 2)
    a = EpisodeSampler(data, 2, 1, 1, seed=3).sample(4)
    b = EpisodeSampler(data, 2, 1, 1, seed=np.int64(3)).sample(4)
    assert torch.equal(a.classes, b.classes) and torch.equal(a.support_x, b.support_x)
    assert torch.equal(random_episodes(1, 2, 1, 1, seed=1).support_x,
                       random_episodes(1, 2, 1, 1, seed=np.int64(1)).support_x)


# Other inputs whose natural error would mislead.

@pytest.mark.parametrize("model", [Conv4(), LeNet5()])
def test_flat_inputs_to_a_cnn_are_not_blamed_on_image_size(model):
    """Not "built for 28×28 inputs, got 2×784: build it with the image_size of your images" (the batch size read
    as the height): no image_size would fix that."""
    with pytest.raises(ValueError, match=r"takes images \(B, C, H, W\), got inputs of shape \(2, 784\): reshape "
                                         r"flat ones, e.g. x.view\(-1, 1, 28, 28\)"):
        model(torch.zeros(2, 784))


@pytest.mark.parametrize("lr", [float("nan"), 0.0, -0.5, True, float("inf")])
def test_adapt_and_evaluate_refuses_a_learning_rate_that_is_not_a_positive_step(lr):
    """Unchecked, nan gives NaN losses, 0 no adaptation, a negative rate gradient ascent; MAML and Reptile refuse
    the same values."""
    with pytest.raises(ValueError, match="lr must be a positive, finite step size"):
        adapt_and_evaluate(MLP(4, (8,), 3), episode(), F.cross_entropy, 2, lr)


@pytest.mark.parametrize("tasks_at_once", [0, -1, 2.0])
def test_adapt_and_evaluate_refuses_a_bad_tasks_at_once_by_name(tasks_at_once):
    with pytest.raises(ValueError, match="tasks_at_once must be an int >= 1"):
        adapt_and_evaluate(MLP(4, (8,), 3), episode(), F.cross_entropy, 1, 0.1, tasks_at_once=tasks_at_once)


def test_context_target_split_refuses_a_curve_without_its_batch_dimension():
    """Unchecked, a (P, 1) curve is read as P curves of one point: num_context=1 returns the whole curve as the
    context."""
    curves = GPCurves().sample(1, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"curves of shape \(B, P, 1\); got x \(6, 1\).*x.unsqueeze\(0\)"):
        context_target_split(Curves(curves.x[0], curves.y[0]), 1)


def test_non_finite_gp_inputs_are_named_not_blamed_on_the_noise():
    """Not "noise=1 is too small ...; raise noise", which cannot help."""
    with pytest.raises(ValueError, match="the inputs hold NaN or infinite values"):
        GPCurves(noise=1.0).sample(1, x=torch.tensor([[0.0], [math.nan]]))


def test_group_by_class_refuses_a_label_beyond_the_examples_without_counting_to_it():
    """Labels 0..C-1, every class present, are all below n: a stray label of 2**62 would make torch.bincount
    allocate 2**65 bytes, one of 100,000 list 99,998 missing classes."""
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="the largest label is 4611686018427387904, but there are only 4 examples"):
        group_by_class(x, torch.tensor([0, 1, 1, 2**62]))
    with pytest.raises(ValueError) as error:
        group_by_class(x, torch.tensor([0, 1, 1, 100_000]))
    assert len(str(error.value)) < 1000


@pytest.mark.parametrize("scale", [float("inf"), True, 10**400, "2"])
def test_matching_net_refuses_a_scale_that_is_not_a_positive_finite_number(scale):
    """Unchecked, inf gives all-NaN logits, True is taken as 1, 10**400 overflows at forward."""
    with pytest.raises(ValueError, match="scale must be a positive, finite number"):
        MatchingNet(nn.Flatten(), scale=scale)


@pytest.mark.parametrize("kwargs", [dict(layers=0), dict(hidden=0), dict(output_scale=float("nan"))])
def test_lstm_optimizer_refuses_sizes_and_scales_that_cannot_optimise(kwargs):
    """Unchecked, layers=0 fails at forward with "start from initial_state(...)", which the caller did; hidden=0
    gives zero updates and output_scale=nan NaN updates."""
    with pytest.raises(ValueError, match="layers must be an int >= 1|hidden must be an int >= 1|output_scale must"):
        LSTMOptimizer(**kwargs)


# Sparsity, Powerprop, low rank and growth.

def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_powerprop_optimizer_with_the_model_and_the_optimizer_swapped_says_so():
    """Every other method takes (model, optimizer); swapped, torch says "'SGD' object has no attribute
    'named_modules'"."""
    model = powerprop(mlp(), 2.0)
    with pytest.raises(TypeError, match=r"PowerPropOptimizer\(optimizer, model\) takes the optimizer first"):
        PowerPropOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_a_score_function_where_scores_are_expected_and_scores_where_a_function_is_are_refused_by_name():
    """prune takes magnitude(model), GradualPruning and EarlyBird take magnitude; mixed up, the error would come
    from deep inside, or only at step `begin` of training."""
    model = mlp()
    with pytest.raises(TypeError, match="pass scores by layer name, .* not magnitude"):
        prune(model, magnitude, 0.5)
    with pytest.raises(TypeError, match="pass scores by layer name, .* not Tensor"):
        prune(model, model[0].weight.abs(), 0.5)
    with pytest.raises(TypeError, match="score must be a function score\\(model\\)"):
        GradualPruning(0.5, 1, 3, 1, score=magnitude(model))
    with pytest.raises(TypeError, match="score must be a function score\\(model\\)"):
        iterative_pruning(model, 0.5, 2, lambda model, r: None, score=magnitude(model))
    assert not masks_of(model)                                  # refused before the first round pruned
    with pytest.raises(TypeError, match="scores must be a function scores\\(model\\)"):
        EarlyBird(0.5, every=1, scores=magnitude(model))


def test_snip_given_a_dataset_or_the_inputs_alone_names_the_batch():
    x, y = batch()
    for wrong in (TensorDataset(x, y), x):
        with pytest.raises(TypeError, match="batch must be one batch, a pair \\(inputs, targets\\) of tensors"):
            snip(mlp(), wrong)


def test_numpy_integers_index_a_lottery_round_and_seed_a_sparsifier():
    """np.argmax over the rounds' accuracies picks a round; `for seed in np.arange(3)` seeds a run."""
    x, y = batch(8)

    def train(model, callbacks):
        return fit(model, (x, y), torch.optim.SGD(model.parameters(), lr=0.1), steps=1, batch_size=8,
                   callbacks=callbacks, progress=False)

    lottery = iterative_magnitude_pruning(mlp(), train, 2, 0.5)
    assert train_control(mlp(), lottery, np.argmax([0.1, 0.9, 0.2]), train).index == 1
    a, b = mlp(), mlp()
    RigL(a, None, 0.25, end=10, every=2, seed=np.int64(3))
    RigL(b, None, 0.25, end=10, every=2, seed=3)
    assert all(torch.equal(masks_of(a)[name], masks_of(b)[name]) for name in masks_of(b))


def test_a_density_given_as_a_tensor_is_refused_with_the_fix():
    """Not "must be in (0, 1] ... got tensor(0.5000); for a sparsity s pass 1 - s": 0.5 is in range."""
    model = mlp()
    with pytest.raises(ValueError, match=r"density of '0' must be a number, got a tensor .*: pass float\(t\)"):
        prune(model, magnitude(model), torch.tensor(0.5))


def test_dlrt_refuses_an_optimizer_built_before_to_low_rank():
    """It holds the converted layers' old biases, which would then never train."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    to_low_rank(model, ["0"], 3)
    with pytest.raises(ValueError, match="the optimizer lacks 1 of the model's other parameters"):
        DLRT(model, 0.1, optimizer=optimizer)


def test_snfs_at_density_one_advises_a_fix_that_works():
    """Not "lower drop_fraction to at most (1 - density) / density", which is 0 there and refused."""
    with pytest.raises(ValueError, match="at density 1 nothing is inactive: pass regrow_dropped=True, or end=None"):
        SNFS(mlp(), None, 1.0, end=10, every=2)
    SNFS(mlp(), None, 1.0, end=10, every=2, regrow_dropped=True)
    SNFS(mlp(), None, 1.0)


@pytest.mark.parametrize("flag", ["cosine", "regrow_dropped"])
@pytest.mark.parametrize("method", [SET, RigL, SNFS])
def test_dynamic_sparse_training_switches_refuse_a_value_other_than_true_or_false(method, flag):
    """A string is true to Python: cosine="no" would keep the cosine, regrow_dropped="no" would regrow."""
    model = mlp()
    with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'no'"):
        method(model, None, 0.5, end=10, every=2, **{flag: "no"})
    assert masks_of(model) == {}                                     # refused before the model changed
    method(model, None, 0.5, end=10, every=2, **{flag: np.False_})


def test_drop_and_grow_and_early_bird_switches_refuse_a_value_other_than_true_or_false():
    mask = torch.tensor([True, False, True, False])
    with pytest.raises(TypeError, match="regrow_dropped must be True or False, got 'no'"):
        drop_and_grow(mask, torch.rand(4), torch.rand(4), 1, regrow_dropped="no")
    with pytest.raises(TypeError, match="stop must be True or False, got 1"):
        EarlyBird(0.5, every=10, stop=1)


def _file_resource():
    return Resource("payload.bin", ("https://example.invalid/payload.bin",), "0" * 64, "sub")


def _flops(model):
    return count_flops(model, batch()[0])


def _write(path, overwrite):
    with atomic_file(path, overwrite=overwrite) as handle:
        handle.write(b"new")


# call(value, model, folder) passes ``value`` to the switch; the calls that need no download take np.False_ too.
OFFLINE = [
    pytest.param("overwrite", lambda v, m, d: _write(d / "f", v), id="atomic_file"),
    pytest.param("overwrite", lambda v, m, d: save_checkpoint(d / "c.pt", m, overwrite=v), id="save_checkpoint"),
    pytest.param("drop_last", lambda v, m, d: fit(m, batch(), torch.optim.SGD(m.parameters(), 0.1), steps=1,
                                                  batch_size=4, drop_last=v, device="cpu", progress=False),
                 id="fit-drop_last"),
    pytest.param("bf16", lambda v, m, d: fit(m, batch(), torch.optim.SGD(m.parameters(), 0.1), steps=1, bf16=v,
                                             device="cpu", progress=False), id="fit-bf16"),
    pytest.param("bf16", lambda v, m, d: evaluate(m, batch(), bf16=v), id="evaluate"),
    pytest.param("first_order", lambda v, m, d: MAML(m, 0.1, first_order=v), id="MAML-first_order"),
    pytest.param("learn_lr", lambda v, m, d: MAML(m, 0.1, learn_lr=v), id="MAML-learn_lr"),
    pytest.param("first_order", lambda v, m, d: MetaSGD(m, 0.1, first_order=v), id="MetaSGD"),
    pytest.param("first_order", lambda v, m, d: MAML(m, 0.1).adapt(*batch(), first_order=v), id="MAML.adapt"),
    pytest.param("first_order", lambda v, m, d: inner_loop(m, parameters_of(m), *batch(), F.cross_entropy, 1, 0.1,
                                                           first_order=v), id="inner_loop"),
    pytest.param("test_rotations", lambda v, m, d: ProtoNet(m, test_rotations=v), id="ProtoNet"),
    pytest.param("test_rotations", lambda v, m, d: MatchingNet(m, test_rotations=v), id="MatchingNet"),
    pytest.param("preprocess", lambda v, m, d: LSTMOptimizer(preprocess=v), id="LSTMOptimizer"),
    pytest.param("dense_first", lambda v, m, d: allocation.uniform(m, 0.5, dense_first=v), id="uniform"),
    pytest.param("relative_to_dense", lambda v, m, d: sparse_inference_flops(_flops(m), 0.5, relative_to_dense=v),
                 id="sparse_inference_flops"),
    pytest.param("relative_to_dense", lambda v, m, d: sparse_training_flops(_flops(m), 0.5, relative_to_dense=v),
                 id="sparse_training_flops"),
    pytest.param("relative_to_dense", lambda v, m, d: pruning_training_flops(_flops(m), [0.5], relative_to_dense=v),
                 id="pruning_training_flops"),
    pytest.param("relative_to_dense", lambda v, m, d: model_sparse_flops(m, batch()[0], relative_to_dense=v),
                 id="model_sparse_flops"),
    pytest.param("relative_to_dense", lambda v, m, d: dst_training_flops(_flops(m), 0.5, "set", relative_to_dense=v),
                 id="dst_training_flops"),
    pytest.param("trainable_only", lambda v, m, d: count_parameters(m, trainable_only=v), id="count_parameters"),
    pytest.param("measure_cuda", lambda v, m, d: training_memory(m, torch.optim.SGD(m.parameters(), 0.1), batch(),
                                                                 F.cross_entropy, measure_cuda=v),
                 id="training_memory"),
    pytest.param("closed_form", lambda v, m, d: gradmax_directions(m, 0, 2, batch(), closed_form=v),
                 id="gradmax_directions"),
    pytest.param("running_stats", lambda v, m, d: Conv4(running_stats=v), id="Conv4"),
    pytest.param("norm", lambda v, m, d: DepthwiseSeparableConv2d(2, 4, norm=v), id="DepthwiseSeparable-norm"),
    pytest.param("bias", lambda v, m, d: DepthwiseSeparableConv2d(2, 4, norm=False, bias=v),
                 id="DepthwiseSeparable-bias"),
    pytest.param("residual", lambda v, m, d: Bottleneck(4, 4, residual=v), id="Bottleneck"),
    pytest.param("bias", lambda v, m, d: LowRankLinear(8, 4, 2, bias=v), id="LowRankLinear"),
    pytest.param("logx", lambda v, m, d: errorbar_curve([1, 2], [[1.0, 2.0]], logx=v, ax=Figure().add_subplot()),
                 id="errorbar_curve"),
    pytest.param("percent", lambda v, m, d: density_axis(Figure().add_subplot(), [0.5], percent=v),
                 id="density_axis"),
]
DOWNLOADS = [
    pytest.param("download", lambda v, m, d: fetch(_file_resource(), d, download=v), id="fetch"),
    pytest.param("download", lambda v, m, d: fetch_all([_file_resource()], d, download=v), id="fetch_all"),
    pytest.param("download", lambda v, m, d: load_mnist(d, download=v), id="load_mnist"),
    pytest.param("download", lambda v, m, d: load_cifar10(d, download=v), id="load_cifar10"),
    pytest.param("download", lambda v, m, d: load_omniglot("small1", d, download=v), id="load_omniglot"),
    pytest.param("download", lambda v, m, d: load_omniglot_runs(d, download=v), id="load_omniglot_runs"),
]


@pytest.mark.parametrize("name, call", OFFLINE + DOWNLOADS)
def test_public_switches_refuse_a_value_other_than_true_or_false(name, call, tmp_path, monkeypatch):
    """A string is true to Python: overwrite="no" would replace a saved file, download="no" download, bf16="no" run
    under autocast, first_order="no" drop the second derivatives, and so on. Refused before anything changes:
    the model, the files, the network."""
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: pytest.fail("tried the network"))
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=f"{name} must be True or False, got 'no'"):
        call("no", model, tmp_path)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, call", OFFLINE)
def test_public_switches_take_a_numpy_bool(name, call, tmp_path):
    """As a value read from an array or a configuration file may be."""
    call(np.False_, mlp(), tmp_path)


def test_overwrite_other_than_true_or_false_leaves_a_saved_file_as_it_is(tmp_path):
    path = tmp_path / "saved.pt"
    path.write_bytes(b"the user's work")
    for save in (lambda: _write(path, "no"),
                 lambda: save_checkpoint(path, mlp(), overwrite="no")):
        with pytest.raises(TypeError, match="overwrite must be True or False, got 'no'"):
            save()
        assert path.read_bytes() == b"the user's work"
        assert list(tmp_path.iterdir()) == [path]                  # no temporary file left beside it


def test_density_one_is_dense_training_for_every_sparse_trainer():
    """The boundary d = 1 of (0, 1]: every mask all True, a SET update (dropping at most the inactive count, 0)
    changes nothing, and the model computes as the unmasked one."""
    x, _ = batch()
    dense = mlp()(x)
    for build in (lambda m: StaticSparse(m, None, 1.0), lambda m: RigL(m, None, 1.0, end=10, every=2),
                  lambda m: SET(m, None, 1.0, end=10, every=2), lambda m: TopKAST(m, None, 1.0, 1.0)):
        model = mlp()
        sparsifier = build(model)
        if isinstance(sparsifier, SET):
            sparsifier.update(0.3)
        assert all(bool(mask.all()) for mask in masks_of(model).values())
        torch.testing.assert_close(model(x), dense)


def test_sparse_flops_given_a_model_instead_of_a_flop_count_names_count_flops():
    with pytest.raises(TypeError, match="flop_count must be the dense costs lowlearn.cost.count_flops"):
        sparse_inference_flops(mlp(), 0.5)
    with pytest.raises(TypeError, match="flop_count must be the dense costs lowlearn.cost.count_flops"):
        dst_training_flops(mlp(), 0.5, "rigl")
    assert sparse_inference_flops(count_flops(mlp(), batch()[0]), 0.5) > 0


def tied():
    torch.manual_seed(0)
    first, second = nn.Linear(8, 8), nn.Linear(8, 8)
    second.weight = first.weight                              # two modules, one weight tensor
    return nn.Sequential(first, nn.Tanh(), second)


@pytest.mark.parametrize("method", [lambda model: powerprop(model, 2.0),
                                    lambda model: prune(model, magnitude(model), 0.5),
                                    lambda model: RigL(model, None, 0.5, end=10, every=2),
                                    lambda model: to_low_rank(model, ["0", "2"], 3)],
                         ids=["powerprop", "prune", "rigl", "to_low_rank"])
def test_tied_weights_are_refused(method):
    """Unchecked, Powerprop's φ = sign(θ)|θ|^(1/α) is applied twice to the one tensor (the function changes), each
    layer of a layer-wise pruning computes with the union of both masks' zeros (23% kept where 50% is reported),
    and to_low_rank unties them."""
    with pytest.raises(ValueError, match="layers '0' and '2' share one weight"):
        method(tied())


class TiedLanguageModel(nn.Module):
    """An embedding and an output layer that share one weight (Press & Wolf 2017); only the output layer is
    Linear, so only it is prunable."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(10, 8), nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1))


@pytest.mark.parametrize("method", [lambda model: powerprop(model, 2.0),
                                    lambda model: prune(model, magnitude(model), 0.5),
                                    lambda model: attach_masks(model),
                                    lambda model: RigL(model, None, 0.5, end=10, every=2),
                                    lambda model: TopKAST(model, None, 0.5, 0.75)],
                         ids=["powerprop", "prune", "attach_masks", "rigl", "topkast"])
def test_a_weight_tied_to_a_module_left_unmasked_is_refused_and_nothing_changes(method):
    """Unchecked, pruning the output layer zeroed the embedding's rows too (set_masks writes the shared tensor),
    and the embedding's gradients then moved the pruned weights and their optimizer state again."""
    model = TiedLanguageModel()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer 'head' shares its weight with 'embed.weight' \\(tied weights\\).*"
                                         "untie them"):
        method(model)
    assert not masks_of(model) and before.keys() == model.state_dict().keys()
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in before.items())


def test_a_model_that_is_one_layer_is_not_tied_to_itself():
    """The root module's weight is named 'weight' (and 'parametrizations.weight.original' once masked)."""
    model = nn.Linear(6, 4)
    prune(model, magnitude(model), 0.5)
    prune(model, magnitude(model), 0.25)
    assert masks_of(model)[""].sum() == 6


def test_growth_schedule_checks_its_layer_when_built():
    """Not at the first growth, `every` steps into training."""
    for layer in (-1, True, "0", 1.5):
        with pytest.raises(ValueError, match="layer \\(counting the Linear/Conv2d layers from 0\\) must be an int"):
            GrowthSchedule(layer, 2, 10, 32, "random")


@pytest.mark.parametrize("wrap", [attach_masks, lambda model: powerprop(model, 2.0)], ids=["masks", "powerprop"])
def test_to_low_rank_of_a_parametrized_layer_says_to_convert_first(wrap):
    """Not "'0' is a ParametrizedLinear; to_low_rank converts nn.Linear ... (not their subclasses ...)"."""
    model = mlp()
    wrap(model)
    with pytest.raises(KeyError, match="carries parametrizations .* convert before masking or Powerprop"):
        to_low_rank(model, ["0"], 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device, message", [("cuda", "CUDA is not available here; use cpu"),
                                             ("gpu", "unknown device 'gpu'; e.g. cpu or cuda")])
def test_fit_and_evaluate_name_a_device_the_machine_lacks(device, message):
    """Not torch's "AssertionError: Torch not compiled with CUDA enabled", or its list of 20 device types."""
    model, data = MLP(4, (8,), 3), (torch.randn(10, 4), torch.randint(0, 3, (10,)))
    with pytest.raises(ValueError, match=message):
        fit(model, data, torch.optim.SGD(model.parameters(), 0.1), steps=1, device=device, progress=False)
    with pytest.raises(ValueError, match=message):
        evaluate(model, data, device=device)


def test_augmentations_name_a_generator_on_another_device_than_the_images():
    """Images on another device (here meta, standing in for a GPU) than a CPU generator: not torch's raw error."""
    from lowlearn.data.augment import random_affine
    from lowlearn.data.cifar import augment_cifar
    images = torch.zeros(2, 3, 8, 8, device="meta")
    for augment in (random_affine, augment_cifar):
        with pytest.raises(ValueError, match=r"the generator is on cpu but the images are on meta; create it with "
                                             r"torch.Generator\(device='meta'\)"):
            augment(images, torch.Generator())

import contextlib
import copy
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lowlearn.train as lowlearn_train
from lowlearn.train import (CheckpointError, History, NonFiniteLossError, StopTraining, evaluate, fit,
                            load_checkpoint, restore_generator, save_checkpoint, seed_everything,
                            seeded_generator, state_to_parameters, stream_seed)


def toy_data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return x, y


def make(seed=0):
    seed_everything(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_fit_learns_and_records_history():
    model, opt = make()
    data = toy_data()
    hist = fit(model, data, opt, epochs=5, batch_size=32, eval_data=data, log_every=4, device="cpu")
    assert isinstance(hist, History)
    assert hist.steps == list(range(4, 41, 4))       # 5 epochs x 8 batches, logged every 4
    assert hist.eval_steps == [8, 16, 24, 32, 40]    # once per epoch by default
    assert hist.metric("accuracy")[-1] > 0.9
    assert hist.loss[-1] < hist.loss[0]
    assert 0 < hist.train_seconds <= hist.seconds


def test_fit_steps_counts_optimizer_steps_and_last_partial_batch():
    model, opt = make()
    calls = []
    fit(model, toy_data(n=100), opt, steps=7, batch_size=30, device="cpu",
        callbacks=[lambda s: calls.append((s.step, s.epoch))])
    # 100 examples in batches of 30: 4 batches per epoch (the last one has 10).
    assert calls == [(1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (6, 1), (7, 1)]


def test_same_seed_same_history_on_cpu():
    runs = []
    for _ in range(2):
        model, opt = make(seed=3)
        hist = fit(model, toy_data(), opt, epochs=2, batch_size=16, log_every=1, seed=5, device="cpu")
        runs.append((hist.loss, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)
    model, opt = make(seed=3)
    other = fit(model, toy_data(), opt, epochs=2, batch_size=16, log_every=1, seed=6, device="cpu")
    assert other.loss != runs[0][0]  # the seed changes the batch order


def test_nonfinite_loss_names_the_step():
    model, opt = make()
    x, y = toy_data(n=64)
    x[40] = float("nan")  # lands in some batch of the first epoch
    perm = torch.randperm(64, generator=seeded_generator(0, "batch order"))
    bad_step = (perm == 40).nonzero().item() // 8 + 1
    with pytest.raises(NonFiniteLossError, match=f"at step {bad_step} "):
        fit(model, (x, y), opt, epochs=3, batch_size=8, log_every=100, device="cpu")


def test_a_non_finite_loss_past_step_2_to_the_24_is_named_exactly():
    # The step is read back with the loss, as float32, which holds integers exactly only up to 2**24.
    model, opt = make()
    x, y = toy_data(n=4096)
    x[:] = float("nan")                          # whichever example the step draws; 4096 epochs to skip, not 2**24
    with pytest.raises(NonFiniteLossError, match=r"at step 16777217 \(epoch 4096\)"):
        fit(model, (x, y), opt, steps=2**24 + 1, batch_size=1, start_step=2**24, device="cpu", progress=False)


def test_fit_checks_everything_before_it_seeds_the_generators_or_moves_the_model():
    model, opt = make()
    before = [p.clone() for p in model.parameters()]
    state = torch.get_rng_state()
    x, y = toy_data()
    for data, error, message in (((x, y[:3]), ValueError, "differ in length"),
                                 ((torch.tensor(1.0), torch.tensor(0)), ValueError, "one entry per example"),
                                 ((x, torch.tensor(0)), ValueError, "one entry per example")):
        with pytest.raises(error, match=message):
            fit(model, data, opt, epochs=1, seed=123, device="cpu")
    with pytest.raises(TypeError, match=r"callbacks must be a list of functions callback\(state\)"):
        fit(model, (x, y), opt, epochs=1, seed=123, callbacks=[print, None], device="cpu")
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    calls = []
    fit(model, (x, y), opt, steps=2, callbacks=lambda state: calls.append(state.step), device="cpu", progress=False)
    assert calls == [1, 2]                                               # one callback, not in a list: fine


def test_buffers_restored_gives_back_a_buffer_the_block_replaced():
    from lowlearn.train import buffers_restored

    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("count", torch.zeros(()))
            self.inner = nn.BatchNorm1d(2)

        def forward(self, x):
            self.count = self.count + 1                                  # a new tensor, not an in-place update
            return self.inner(x)

    model = Counter()
    count = model.count
    with buffers_restored(model):
        model(torch.randn(4, 2))
        assert model.count == 1 and model.inner.num_batches_tracked == 1
    assert model.count is count and model.count == 0 and model.inner.num_batches_tracked == 0


@pytest.mark.parametrize("training", [True, False])
def test_a_graph_made_in_buffers_restored_can_be_differentiated_after_it(training):
    from lowlearn.train import buffers_restored
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(3).train(training)
    norm(torch.randn(8, 3) * 2 + 1)                                      # running statistics away from (0, 1)
    x = torch.randn(5, 3, requires_grad=True)
    (expected,) = torch.autograd.grad(norm(x).pow(2).sum(), x)
    mean, var = norm.running_mean.clone(), norm.running_var.clone()
    with buffers_restored(norm):
        loss = norm(x).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, x)                               # no "modified by an inplace operation"
    torch.testing.assert_close(grad, expected)
    assert torch.equal(norm.running_mean, mean) and torch.equal(norm.running_var, var)


def test_stop_training_from_a_callback_keeps_history():
    model, opt = make()

    def stop_at_3(state):
        if state.step == 3:
            raise StopTraining

    hist = fit(model, toy_data(), opt, epochs=10, batch_size=32, callbacks=[stop_at_3],
               eval_data=toy_data(64, seed=1), device="cpu")
    assert hist.steps == [3] and hist.eval_steps == [3]
    # The callbacks after the one that stops still see the last step (a sparsifier's step count).
    seen = []
    model, opt = make()
    fit(model, toy_data(), opt, epochs=10, batch_size=32, callbacks=[stop_at_3, lambda state: seen.append(state.step)],
        device="cpu")
    assert seen == [1, 2, 3]


def test_bad_arguments():
    model, opt = make()
    with pytest.raises(ValueError, match="exactly one"):
        fit(model, toy_data(), opt, device="cpu")
    with pytest.raises(ValueError, match="exactly one"):
        fit(model, toy_data(), opt, epochs=1, steps=1, device="cpu")
    with pytest.raises(ValueError, match="differ in length"):
        fit(model, (torch.zeros(3, 8), torch.zeros(2).long()), opt, epochs=1, device="cpu")
    with pytest.raises(ValueError, match="a TensorDataset of two tensors, not a TensorDataset of 3: Tensor, Tensor"):
        fit(model, TensorDataset(torch.zeros(3, 8), torch.zeros(3).long(), torch.zeros(3)), opt, epochs=1,
            device="cpu")
    x, y = toy_data()
    with pytest.raises(ValueError, match="not a tuple of 2: Tensor, list"):                 # targets as a list
        fit(model, (x, y.tolist()), opt, epochs=1, device="cpu")
    loader = torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=len(x) // 2 + 1)   # two batches
    with pytest.raises(ValueError, match="not a DataLoader; e.g. stack the examples"):
        fit(model, loader, opt, epochs=1, device="cpu")
    with pytest.raises(ValueError, match="not a Subset; e.g. stack"):
        evaluate(model, torch.utils.data.Subset(TensorDataset(x, y), [0, 1]))
    for seed in (None, 1.5, -1):
        with pytest.raises(ValueError, match="seed must be an int >= 0"):
            fit(model, toy_data(), opt, epochs=1, seed=seed, device="cpu")
    with pytest.raises(ValueError, match="CUDA only"):
        fit(model, toy_data(), opt, epochs=1, bf16=True, device="cpu")
    for name, bad in (("epochs", 1.5), ("steps", 2.5), ("steps", True), ("batch_size", 0), ("log_every", 2.0),
                      ("eval_every", 0)):
        kwargs = {"epochs": 1, name: bad} if name not in ("epochs", "steps") else {name: bad}
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
            fit(model, toy_data(), opt, device="cpu", **kwargs)
    with pytest.raises(ValueError, match="eval_every needs eval_data"):
        fit(model, toy_data(), opt, epochs=1, eval_every=5, device="cpu")
    with pytest.raises(ValueError, match="start_step must be an int >= 0"):
        fit(model, toy_data(), opt, steps=5, start_step=-1, device="cpu")
    with pytest.raises(TypeError, match="callbacks must be a list of functions"):
        fit(model, toy_data(), opt, steps=5, callbacks=5, device="cpu")
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="differ in length"):               # checked before the first step
        fit(model, toy_data(), opt, steps=5, eval_data=(torch.zeros(3, 8), torch.zeros(2).long()), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_an_optimizer_built_on_a_copy_of_the_model_is_refused_before_anything_moves():
    """An optimizer of a deep copy (a second run from the same initialisation) steps the copy: the model trained not
    at all, silently (constant loss, chance accuracy). Refused before the first step, the model unchanged; an
    optimizer of part of the model (a frozen body) still trains that part."""
    model, _ = make()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="the optimizer holds none of the model's parameters"):
        fit(model, toy_data(), torch.optim.SGD(copy.deepcopy(model).parameters(), lr=0.1), steps=3, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    head = list(model.parameters())[-2:]
    fit(model, toy_data(), torch.optim.SGD(head, lr=0.1), steps=3, device="cpu", progress=False)
    assert not torch.equal(head[0], before[-2])


def test_bf16_off_cuda_and_a_start_step_past_the_end_are_refused_before_the_generators_are_seeded_or_the_model_moves():
    """fit's docstring: these errors come before the generators are seeded or the model moves. Reference: the
    global generator's state, and a model that records every call of its ``to``."""
    moves = []

    class Recorded(nn.Linear):
        def to(self, *args, **kwargs):
            moves.append(args)
            return super().to(*args, **kwargs)

    model = Recorded(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    with pytest.raises(ValueError, match="CUDA only"):
        fit(model, toy_data(), opt, epochs=1, seed=0, bf16=True, device="cpu")
    with pytest.raises(ValueError, match="start_step=5, but the run ends after step 5"):
        fit(model, toy_data(), opt, steps=5, start_step=5, device="cpu")
    with pytest.raises(ValueError, match="start_step=4, but the run ends after step 4"):   # one epoch of 256 / 64
        fit(model, toy_data(), opt, epochs=1, batch_size=64, start_step=4, device="cpu")
    assert torch.equal(torch.random.get_rng_state(), state) and moves == []


def test_accuracy_counts_every_target_entry_in_either_class_layout():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5)                                          # 4 sequences of 3 positions, 5 classes

    class PerPosition(nn.Module):                                     # logits (N, T, C), or (N, C, T)
        def __init__(self, classes_first):
            super().__init__()
            self.classes_first = classes_first

        def forward(self, inputs):
            return inputs.transpose(1, 2) if self.classes_first else inputs

    y = x.argmax(-1)
    y[0, 0] = (y[0, 0] + 1) % 5                                       # one of the 12 entries wrong
    flat = lambda out, target: nn.functional.cross_entropy(out.flatten(0, 1), target.flatten())   # noqa: E731
    assert evaluate(PerPosition(False), (x, y), loss_fn=flat, device="cpu")["accuracy"] == 11 / 12
    assert evaluate(PerPosition(True), (x, y), device="cpu")["accuracy"] == 11 / 12     # cross_entropy's (N, C, T)


def test_accuracy_leaves_out_the_padding_that_the_loss_ignores():
    """By hand: 2 sequences of 4 tokens, the last 2 of each padded with cross_entropy's ignore_index -100, and one of
    the 4 real tokens predicted wrong: accuracy 3/4 (it was 3/8, every padded entry counted as a miss). The loss is
    cross_entropy's own over the real tokens. With only padding there is no accuracy to give: NaN."""
    x = torch.eye(5)[torch.tensor([[1, 2, 3, 4], [0, 1, 2, 3]])]      # one-hot logits (N, T, C)
    y = torch.tensor([[1, 2, -100, -100], [0, 4, -100, -100]])
    per_token = lambda out, target: nn.functional.cross_entropy(out.flatten(0, 1), target.flatten())   # noqa: E731
    metrics = evaluate(nn.Identity(), (x, y), loss_fn=per_token, device="cpu")
    assert metrics["accuracy"] == 3 / 4
    assert metrics["loss"] == pytest.approx(per_token(x, y).item())
    assert math.isnan(evaluate(nn.Identity(), (x, torch.full_like(y, -100)), loss_fn=lambda out, target:
                               out.sum() * 0, device="cpu")["accuracy"])


def test_a_binary_classifier_with_one_logit_per_target_predicts_class_1_where_it_is_positive():
    # (N, 1) logits were scored by an argmax over one column (always class 0), and (N,) logits failed.
    x = torch.tensor([[-2.0], [-1.0], [0.5], [3.0]])
    y = torch.tensor([0, 1, 1, 1])                                     # the second one wrong
    binary = lambda out, target: nn.functional.binary_cross_entropy_with_logits(                  # noqa: E731
        out.reshape(target.shape), target.float())
    for model in (nn.Identity(), nn.Flatten(0)):                       # (N, 1) and (N,) logits
        assert evaluate(model, (x, y), loss_fn=binary, device="cpu")["accuracy"] == 3 / 4


def test_seeds_outside_numpys_range_fix_the_draws():
    """A negative seed and one above 2**32 still make Python's, NumPy's and torch's draws repeat."""
    import random

    import numpy as np

    from lowlearn.train import seed_everything

    def draws(seed):
        seed_everything(seed)
        return random.random(), np.random.rand(), torch.rand(()).item()

    for seed in (-1, 2**32 + 5):
        assert draws(seed) == draws(seed)
    assert draws(-1) != draws(1)


def noisy_model(seed=0):
    """A model whose outputs depend on its mode: batch norm and dropout."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))


def test_evaluate_restores_mode_and_matches_manual():
    model = noisy_model()
    x, y = toy_data()
    model.train()
    metrics = evaluate(model, (x, y), batch_size=50, device="cpu")
    assert model.training
    with torch.no_grad():
        model.eval()
        out = model(x)                                                     # the running statistics, no dropout
        model.train()
        assert not torch.equal(model(x), out)                              # which training mode would not use
    assert metrics["accuracy"] == pytest.approx((out.argmax(1) == y).float().mean().item())
    assert metrics["loss"] == pytest.approx(nn.functional.cross_entropy(out, y).item(), rel=1e-5)
    reg = evaluate(nn.Linear(8, 1), (x, torch.zeros(len(x), 1)), loss_fn=nn.functional.mse_loss, device="cpu")
    assert set(reg) == {"loss"}


def test_history_to_dict_is_a_copy():
    history = History(steps=[1], loss=[0.5], eval_steps=[1], eval=[{"accuracy": 0.9}])
    saved = history.to_dict()
    saved["loss"].append(0.1)
    saved["eval"][0]["accuracy"] = 0.0
    saved["steps"].append(2)
    saved["eval_steps"].append(2)
    assert history.loss == [0.5] and history.eval == [{"accuracy": 0.9}]
    assert history.steps == [1] and history.eval_steps == [1]


def test_a_checkpoint_saved_before_the_optimizer_class_was_recorded_still_loads(tmp_path):
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 2)).sum().backward()
    opt.step()
    torch.save({"model": model.state_dict(), "extra": {}, "optimizer": opt.state_dict()}, tmp_path / "old.pt")
    fresh = nn.Linear(2, 2)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    assert load_checkpoint(tmp_path / "old.pt", fresh, fresh_opt) == {}
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_opt.state[fresh.weight]["momentum_buffer"], opt.state[model.weight]["momentum_buffer"])


def test_a_wrapped_optimizer_is_checked_with_the_optimizer_it_wraps(tmp_path):
    # DLRT and PowerPropOptimizer carry a torch optimizer's state: Adam's must not land in a wrapped SGD.
    from lowlearn.lowrank import DLRT, dense_parameters, to_low_rank
    from lowlearn.powerprop import PowerPropOptimizer, powerprop

    def dlrt(inner):
        model = to_low_rank(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)), ["0"], rank=2)
        return model, DLRT(model, lr=0.1, tol=0.1, optimizer=inner(dense_parameters(model)))

    def aware(inner):
        model = powerprop(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)), 2.0)
        return model, PowerPropOptimizer(inner(model.parameters()), model)

    adam = lambda params: torch.optim.Adam(params, lr=1e-3)                       # noqa: E731
    sgd = lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)            # noqa: E731
    for build in (dlrt, aware):
        model, optimizer = build(adam)
        path = save_checkpoint(tmp_path / f"{build.__name__}.pt", model, optimizer)
        other, wrapped_sgd = build(sgd)
        with pytest.raises(ValueError, match=r"around torch.optim.adam.Adam, which does not fit a .* around "
                                             r"torch.optim.sgd.SGD"):
            load_checkpoint(path, other, wrapped_sgd)
        assert wrapped_sgd.optimizer.param_groups[0]["momentum"] == 0.9
        load_checkpoint(path, *build(adam))
        # A checkpoint of an earlier version recorded the wrapper's class alone.
        payload = torch.load(path, weights_only=True)
        payload["optimizer_class"] = payload["optimizer_class"].split()[0]
        torch.save(payload, tmp_path / "older.pt")
        load_checkpoint(tmp_path / "older.pt", *build(adam))


def test_a_refused_dlrt_state_changes_nothing():
    from lowlearn.lowrank import DLRT, to_low_rank

    model = to_low_rank(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)), ["0"], rank=2)
    state = DLRT(model, lr=0.001, tol=0.1, betas=(0.9, 0.99)).state_dict()
    state["state"] = {"2": {"step": 1}}                         # moments of a layer this model does not have
    dlrt = DLRT(model, lr=0.1, tol=0.1, betas=(0.9, 0.99))
    with pytest.raises(ValueError, match=r"moments of low-rank layers \['2'\], which the model lacks"):
        dlrt.load_state_dict(state)
    assert dlrt.lr == 0.1


def test_checkpoint_round_trip_resumes_identically(tmp_path):
    data = toy_data()
    model, opt = make()
    fit(model, data, opt, epochs=1, batch_size=32, device="cpu")
    hist = History(steps=[1], loss=[0.5])
    path = save_checkpoint(tmp_path / "ck.pt", model, opt, history=hist.to_dict(), note="run 1")

    model2, opt2 = make(seed=99)
    extra = load_checkpoint(path, model2, opt2)
    assert extra == {"history": hist.to_dict(), "note": "run 1"}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    # Momentum buffers came back too: continuing gives the same weights.
    fit(model, data, opt, epochs=1, batch_size=32, seed=1, device="cpu")
    fit(model2, data, opt2, epochs=1, batch_size=32, seed=1, device="cpu")
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_an_interrupted_run_resumes_exactly_from_its_checkpoint(tmp_path):
    data = toy_data()                                   # 256 examples, batches of 48: 6 per epoch

    def make_with_dropout():
        seed_everything(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def stop_after(k):
        def callback(state):
            if state.step == k:
                raise StopTraining
        return callback

    straight, opt = make_with_dropout()
    whole = fit(straight, data, opt, steps=14, batch_size=48, log_every=1, device="cpu")
    first, opt1 = make_with_dropout()
    fit(first, data, opt1, steps=14, batch_size=48, log_every=1, device="cpu", callbacks=[stop_after(8)])
    path = save_checkpoint(tmp_path / "ck.pt", first, opt1, step=8, rng=torch.get_rng_state())
    resumed, opt2 = make_with_dropout()
    extra = load_checkpoint(path, resumed, opt2)
    torch.set_rng_state(extra["rng"])
    rest = fit(resumed, data, opt2, steps=14, batch_size=48, log_every=1, device="cpu", start_step=extra["step"])
    assert rest.steps == list(range(9, 15)) and rest.loss == whole.loss[8:]    # the same batches and dropout
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))
    with pytest.raises(ValueError, match="nothing is left to train"):
        fit(resumed, data, opt2, steps=14, batch_size=48, device="cpu", start_step=14)


def test_checkpoint_never_overwrites_and_is_weights_only(tmp_path):
    model, opt = make()
    path = save_checkpoint(tmp_path / "ck.pt", model)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(path, model)
    assert path.read_bytes() == before
    save_checkpoint(path, model, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
    other, _ = make(seed=99)
    before = [p.clone() for p in other.parameters()]
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(path, other, opt)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a checkpoint written by lowlearn.train.save_checkpoint"):
        load_checkpoint(tmp_path / "plain.pt", other)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))     # refused before loading

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    class Shell:                                     # torch words its refusal of os's functions differently
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"model": model.state_dict(), "extra": {"x": Evil()}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"refuses what it holds .*Unsupported global: GLOBAL (builtins\.)?print"):
        load_checkpoint(tmp_path / "evil.pt", model)
    torch.save({"model": model.state_dict(), "extra": {"x": Shell()}}, tmp_path / "shell.pt")
    with pytest.raises(CheckpointError, match=r"refuses what it holds \(Trying to load unsupported GLOBAL \w+\.system"):
        load_checkpoint(tmp_path / "shell.pt", model)
    torch.save({"model": model.state_dict(), "extra": ["not", "a", "dict"]}, tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="its 'extra' is a list, not a dict"):
        load_checkpoint(tmp_path / "list.pt", model, expect={"method": "x"})
    torch.save({"model": list(model.state_dict().values()), "extra": {}}, tmp_path / "tensors.pt")
    with pytest.raises(CheckpointError, match="its 'model' is a list, not a dict of the model's state_dict"):
        load_checkpoint(tmp_path / "tensors.pt", model)


def test_a_damaged_checkpoint_is_a_checkpoint_error_and_changes_nothing(tmp_path):
    model, opt = make()
    fit(model, toy_data(), opt, steps=2, batch_size=32, device="cpu")
    whole = save_checkpoint(tmp_path / "ck.pt", model, opt).read_bytes()
    other, other_opt = make(seed=99)
    before = [p.clone() for p in other.parameters()]
    cut = tmp_path / "cut.pt"
    for fraction in (0.0, 0.05, 0.3, 0.6, 0.95):                 # torch reports these in three different ways
        cut.write_bytes(whole[: int(len(whole) * fraction)])
        with pytest.raises(CheckpointError, match="cut.pt is damaged or cut off"):
            load_checkpoint(cut, other, other_opt)
    (tmp_path / "notes.txt").write_text("hello world\n")
    with pytest.raises(CheckpointError, match="is damaged or cut off, or is not a file that torch.save wrote"):
        load_checkpoint(tmp_path / "notes.txt", other)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters())) and not other_opt.state
    # A path that leads to no file keeps the error of opening it: the file is not damaged, the path is wrong.
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt", other)
    with pytest.raises(NotADirectoryError):
        load_checkpoint(tmp_path / "notes.txt" / "ck.pt", other)
    with pytest.raises(OSError, match="File name too long"):
        load_checkpoint(tmp_path / ("x" * 300 + ".pt"), other)


def test_an_extra_value_that_cannot_be_pickled_is_a_type_error_and_nothing_is_written(tmp_path):
    model, _ = make()
    with pytest.raises(TypeError, match="the extra value hook=.* cannot be saved"):
        save_checkpoint(tmp_path / "ck.pt", model, hook=lambda: None)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("make_optimizer", [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                                            lambda ps: torch.optim.Adam(ps, lr=0.1)], ids=["sgd", "adam"])
def test_an_optimizer_state_follows_its_parameters_to_another_device(make_optimizer):
    # Module.to moves a parameter in place, and its state stays behind, to another device as to another
    # dtype. A CPU has no second device for parameters moved in place (to "meta" they are replaced), so
    # the dtype shows it here; tests/test_cuda.py resumes a checkpoint on a GPU.
    model = nn.Linear(4, 3)
    optimizer = make_optimizer(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    model.double()
    assert all(value.dtype == torch.float32 for state in optimizer.state.values() for value in state.values())
    state_to_parameters(optimizer)
    for state in optimizer.state.values():
        for key, value in state.items():
            assert value.dtype == (torch.float32 if key == "step" else torch.float64)   # Adam's step count stays
    empty = make_optimizer(nn.Linear(4, 3).parameters())
    state_to_parameters(empty)
    assert not empty.state


def test_a_checkpoint_that_does_not_fit_leaves_the_model_and_optimizer_as_they_were(tmp_path):
    model, opt = make()
    path = save_checkpoint(tmp_path / "ck.pt", model, opt)
    wider = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))     # the last layer differs
    before = [p.detach().clone() for p in wider.parameters()]
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_checkpoint(path, wider)
    assert all(torch.equal(a, b) for a, b in zip(before, wider.parameters()))   # the first layer too
    other, _ = make(seed=99)
    fewer = torch.optim.SGD(list(other.parameters())[:2], lr=0.1)               # other parameter groups
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(ValueError, match="doesn't match the size"):
        load_checkpoint(path, other, fewer)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))
    adam = torch.optim.Adam(other.parameters(), lr=0.1)                         # another optimizer class
    with pytest.raises(ValueError, match=r"state of a torch.optim.sgd.SGD, which does not fit a "
                                         r"torch.optim.adam.Adam"):
        load_checkpoint(path, other, adam)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters())) and not adam.state
    assert adam.param_groups[0]["betas"] == (0.9, 0.999)


def test_a_checkpoint_is_tried_on_a_copy_without_memory_then_loaded(tmp_path, monkeypatch):
    import lowlearn.train as train
    from lowlearn.lowrank import LowRankLinear

    tried, shape_only_copy = [], train._shape_only_copy

    def kept_copy(model):
        tried.append(shape_only_copy(model))
        return tried[-1]

    monkeypatch.setattr(train, "_shape_only_copy", kept_copy)
    tied = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    tied[2].weight.requires_grad_(False)
    load_checkpoint(save_checkpoint(tmp_path / "tied.pt", tied), tied)
    shadow = tried[-1]
    assert all(t.is_meta for t in [*shadow.parameters(), *shadow.buffers()])
    assert shadow[2].weight is shadow[0].weight and not shadow[0].weight.requires_grad
    assert all(not t.is_meta for t in [*tied.parameters(), *tied.buffers()])      # the model keeps its own
    # A low-rank layer takes the checkpoint's rank: the copy runs the layer's own loading code.
    torch.manual_seed(0)
    saved = nn.Sequential(LowRankLinear(8, 6, rank=2, r_max=4))
    resumed = nn.Sequential(LowRankLinear(8, 6, rank=4, r_max=4))
    load_checkpoint(save_checkpoint(tmp_path / "rank.pt", saved), resumed)
    assert resumed[0].rank == 2 and torch.equal(resumed[0].matrix(), saved[0].matrix())


def test_train_seconds_leave_out_the_evaluations(monkeypatch):
    import time

    import lowlearn.train as train_module

    evaluate = train_module.evaluate

    def slow_evaluate(*args, **kwargs):
        time.sleep(0.1)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", slow_evaluate)
    model, opt = make()
    hist = fit(model, toy_data(), opt, steps=4, batch_size=32, eval_data=toy_data(), eval_every=1, device="cpu")
    assert len(hist.eval) == 4 and hist.seconds - hist.train_seconds >= 0.4      # four evaluations of 0.1 s or more


def test_the_logged_loss_is_the_mean_over_each_logging_interval():
    model, opt = make()
    losses = []
    hist = fit(model, toy_data(), opt, steps=10, batch_size=32, log_every=4, device="cpu",
               callbacks=[lambda state: losses.append(state.loss.item())])
    expected = [sum(losses[0:4]) / 4, sum(losses[4:8]) / 4, sum(losses[8:10]) / 2]      # the last interval: 2 steps
    assert hist.steps == [4, 8, 10] and hist.loss == pytest.approx(expected, rel=1e-6)


def test_fit_trains_in_training_mode_also_after_each_evaluation():
    model = noisy_model()
    model.eval()                                                    # fit puts it in training mode itself
    modes = []
    fit(model, toy_data(64), torch.optim.SGD(model.parameters(), lr=0.1), steps=4, batch_size=16, eval_every=1,
        eval_data=toy_data(32, seed=1), device="cpu", callbacks=[lambda state: modes.append(model[3].training)])
    assert modes == [True] * 4


def test_fit_seed_fixes_the_random_draws_whatever_the_generators_held_before():
    runs = []
    for before in (1, 2):
        model = noisy_model()
        torch.manual_seed(before)
        fit(model, toy_data(64), torch.optim.SGD(model.parameters(), lr=0.1), steps=4, batch_size=16, device="cpu",
            seed=7, batch_transform=lambda xb: xb + 0.1 * torch.randn_like(xb))
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])


def test_evaluate_keeps_a_float64_models_precision():
    # Losses near 1e8 in float32 keep 7 digits: the float64 model's mean loss must keep its 16.
    torch.manual_seed(0)
    model = nn.Linear(8, 1).double()
    x, y = torch.randn(300, 8, dtype=torch.float64) * 1e4, torch.randn(300, 1, dtype=torch.float64)
    with torch.no_grad():
        expected = nn.functional.mse_loss(model(x), y).item()
    got = evaluate(model, (x, y), batch_size=70, loss_fn=nn.functional.mse_loss, device="cpu")["loss"]
    assert got == pytest.approx(expected, rel=1e-13)


def test_fit_logs_a_float64_models_loss_in_float64():
    # Rounded to float32, the logged loss lost 9 of its digits, and a finite loss above 3.4e38 read as infinite.
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()
    x = torch.randn(64, 4, dtype=torch.float64)
    seen = []
    for scale in (1.0, 1e20):
        y = x.sum(1, keepdim=True) * scale
        with torch.no_grad():
            expected = nn.functional.mse_loss(model(x), y).item()
        history = fit(model, (x, y), torch.optim.SGD(model.parameters(), lr=0.0), steps=2, batch_size=64,
                      loss_fn=nn.functional.mse_loss, log_every=1, device="cpu",
                      callbacks=[lambda state: seen.append(state.loss.dtype)])
        assert history.loss == pytest.approx([expected, expected], rel=1e-13)     # (the batch is shuffled)
    assert seen == [torch.float64] * 4


def test_evaluate_refuses_a_batch_size_below_one():
    model, _ = make()
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            evaluate(model, toy_data(16), batch_size=bad, device="cpu")


def test_a_model_that_keeps_computed_tensors_as_attributes_loads_its_checkpoint(tmp_path):
    # The storage-free copy deep-copied them, and a tensor computed in a graph cannot be deep-copied.
    from torch.nn.utils import prune

    class KeepsItsOutput(nn.Linear):
        def forward(self, x):
            self.last = super().forward(x)
            return self.last

    class KeepsActivations(nn.Linear):              # in a dictionary and a list, as feature extraction does
        def forward(self, x):
            out = super().forward(x)
            self.activations = {"out": out, "history": [(x, out)]}
            return out

    pruned = prune.l1_unstructured(nn.Linear(4, 2), "weight", 0.5)    # weight = weight_orig * mask
    for i, model in enumerate((KeepsItsOutput(4, 2), KeepsActivations(4, 2), pruned)):
        model(torch.randn(3, 4))
        path = save_checkpoint(tmp_path / f"{i}.pt", model)
        with torch.no_grad():
            before = [t.clone() for t in model.state_dict().values()]
            for t in model.state_dict().values():
                t.add_(1)
        load_checkpoint(path, model)
        assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))


def test_a_lazy_model_loads_its_checkpoint_as_load_state_dict_would_and_a_wrong_one_changes_nothing(tmp_path):
    """Reference: torch's own load_state_dict, which initialises a fresh lazy module from the state. A state of
    another width is refused with the lazy layer left uninitialised, as the storage-free trial promises."""
    torch.manual_seed(0)
    trained = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))
    trained(torch.randn(2, 5))
    path = save_checkpoint(tmp_path / "lazy.pt", trained)
    fresh = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))
    load_checkpoint(path, fresh)
    for a, b in zip(trained.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    wider = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_checkpoint(path, wider)
    assert isinstance(wider[0].weight, nn.parameter.UninitializedParameter)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_checkpoint_mapped_to_a_device_that_is_not_here_is_not_called_damaged(tmp_path):
    model, _ = make()
    path = save_checkpoint(tmp_path / "good.pt", model)
    with pytest.raises(RuntimeError, match="device this machine does not have.*map_location='cpu'") as error:
        load_checkpoint(path, make()[0], map_location="cuda")
    assert not isinstance(error.value, CheckpointError) and path.exists()


def test_evaluate_runs_on_the_models_device_by_default(monkeypatch):
    import lowlearn.train as train

    monkeypatch.setattr(train, "default_device", lambda: torch.device("meta"))   # as if a GPU were the default
    model, _ = make()
    x, y = toy_data(64)
    assert evaluate(model, (x, y)) == evaluate(model, (x, y), device="cpu")


def test_evaluate_restores_each_module_mode():
    model, _ = make()
    model.train()
    model[1].eval()  # a frozen submodule stays frozen
    evaluate(model, toy_data(), device="cpu")
    assert model.training and not model[1].training and model[2].training


def test_evaluate_gives_the_modes_back_through_train_so_that_a_module_that_overrides_it_is_told():
    class MergesForEval(nn.Module):
        """W + B A, with B A merged into W in eval mode and taken out again in training mode (as loralib's Linear)."""

        def __init__(self):
            super().__init__()
            self.W, self.A, self.B = nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.ones(1, 3)), nn.Parameter(
                torch.ones(2, 1))
            self.merged = False

        def train(self, mode=True):
            super().train(mode)
            if mode == self.merged:
                with torch.no_grad():
                    self.W += (-1 if mode else 1) * self.B @ self.A
                self.merged = not mode
            return self

        def forward(self, x):
            return x @ (self.W if self.merged else self.W + self.B @ self.A).T

    model = nn.Sequential(MergesForEval(), nn.Sequential(nn.Identity(), nn.Sequential(nn.Identity())))
    model.train()
    model[1].eval()
    model[1][1].train()                                 # mixed modes, at three depths
    evaluate(model, (torch.ones(4, 3), torch.zeros(4, dtype=torch.long)), device="cpu")
    assert [m.training for m in model.modules()] == [True, True, False, False, True, True]
    assert not model[0].merged and torch.equal(model[0].W, torch.zeros(2, 3))
    model(torch.ones(4, 3)).sum().backward()
    assert torch.equal(model[0].A.grad, torch.full((1, 3), 8.0))      # the factors train on (None while merged)


def test_checkpoint_expectations_are_checked_before_anything_is_loaded(tmp_path):
    model, _ = make()
    path = save_checkpoint(tmp_path / "ck.pt", model, method="protonet", profile="cpu")
    other, _ = make(seed=99)
    before = [p.clone() for p in other.parameters()]
    for expect in ({"method": "matching"}, {"method": "protonet", "profile": "gpu"}, {"seed": 0}):
        with pytest.raises(ValueError, match="was saved with"):
            load_checkpoint(path, other, expect=expect)
        assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))
    assert load_checkpoint(path, other, expect={"method": "protonet"}) == {"method": "protonet", "profile": "cpu"}
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


def test_checkpoint_expectations_compare_tensors_by_value(tmp_path):
    model, _ = make()
    path = save_checkpoint(tmp_path / "ck.pt", model, classes=torch.tensor([3, 1, 4]))
    assert torch.equal(load_checkpoint(path, model, expect={"classes": torch.tensor([3, 1, 4])})["classes"],
                       torch.tensor([3, 1, 4]))
    for expect in (torch.tensor([3, 1, 5]), torch.tensor([3, 1]), torch.tensor([3.0, 1.0, 4.0]), [3, 1, 4], None):
        with pytest.raises(ValueError, match="was saved with"):
            load_checkpoint(path, model, expect={"classes": expect})


def test_checkpoint_expectations_compare_tensors_inside_lists_and_dicts_by_value(tmp_path):
    """An extra value may be a list or dict of tensors; expecting it compares them by value, not by truth value."""
    model, _ = make()
    config = {"classes": torch.tensor([3, 1, 4]), "sizes": [torch.tensor(2.0), 5], "name": "a"}
    path = save_checkpoint(tmp_path / "ck.pt", model, config=config)
    assert load_checkpoint(path, model, expect={"config": {"name": "a", "sizes": [torch.tensor(2.0), 5],
                                                           "classes": torch.tensor([3, 1, 4])}})
    for other in ({**config, "classes": torch.tensor([3, 1, 5])}, {**config, "sizes": [torch.tensor(2.0)]},
                  {**config, "sizes": (torch.tensor(2.0), 5)}, {**config, "extra": 1}, [config]):
        with pytest.raises(ValueError, match="was saved with"):
            load_checkpoint(path, model, expect={"config": other})


def test_a_state_that_weights_only_cannot_read_back_is_refused_before_writing(tmp_path):
    import numpy as np

    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=np.float64(0.01))      # a NumPy number in the state
    with pytest.raises(TypeError, match="optimizer's state_dict could not be loaded back.*numpy"):
        save_checkpoint(tmp_path / "ck.pt", model, optimizer)
    with pytest.raises(TypeError, match="the extra value note="):
        save_checkpoint(tmp_path / "ck.pt", model, note=np.float64(1.0))
    assert not list(tmp_path.iterdir())


def test_a_checkpoint_is_read_to_the_cpu_by_default(tmp_path, monkeypatch):
    model, opt = make()
    path = save_checkpoint(tmp_path / "ck.pt", model, opt)
    seen = {}
    real_load = torch.load

    def load(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    load_checkpoint(path, model, opt)
    assert seen["map_location"] == "cpu" and seen["weights_only"] is True


def test_generator_on_keeps_a_generator_that_draws_on_the_device():
    from types import SimpleNamespace

    from lowlearn.train import generator_on

    cpu = torch.Generator().manual_seed(0)
    assert generator_on(cpu, "cpu") is cpu and generator_on(cpu, torch.device("cpu")) is cpu
    assert generator_on(None, "cpu") is None                    # PyTorch's default generator stays the default
    # A CUDA generator reports its index; a device named without one is any device of its type.
    first_gpu = SimpleNamespace(device=torch.device("cuda", 0))
    assert generator_on(first_gpu, "cuda") is first_gpu and generator_on(first_gpu, "cuda:0") is first_gpu


def test_draws_on_takes_a_device_without_an_index_as_any_device_of_its_type():
    from types import SimpleNamespace

    from lowlearn.train import draws_on

    # torch.Generator(device="cuda") reports the device "cuda", with no index; tensors report "cuda:0".
    any_gpu, second_gpu = SimpleNamespace(device=torch.device("cuda")), SimpleNamespace(device=torch.device("cuda", 1))
    assert draws_on(any_gpu, "cuda:0") and draws_on(any_gpu, torch.device("cuda", 1)) and draws_on(second_gpu, "cuda")
    assert not draws_on(second_gpu, "cuda:0") and not draws_on(any_gpu, "cpu")
    assert draws_on(torch.Generator(), "cpu") and not draws_on(torch.Generator(), "cuda")


def test_draw_with_draws_on_the_generators_device_and_moves_the_numbers():
    from lowlearn.train import draw_with

    calls = []

    def draw(shape, generator, device, dtype):
        calls.append((generator, device))
        return torch.zeros(shape, device=device, dtype=dtype)

    cpu = torch.Generator()
    moved = draw_with(draw, (2, 3), cpu, "meta", torch.float64)     # meta: a device besides the CPU here
    assert calls[-1] == (cpu, torch.device("cpu")) and moved.device.type == "meta" and moved.dtype == torch.float64
    assert draw_with(draw, (2,), cpu, None).device.type == "cpu" and calls[-1] == (cpu, torch.device("cpu"))
    assert draw_with(draw, (2,), None, "meta").device.type == "meta" and calls[-1] == (None, "meta")


def test_restore_generator_continues_a_state_of_its_kind_and_seeds_from_another(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the machine without a GPU (test_cuda: with)
    source = torch.Generator().manual_seed(5)
    torch.rand(3, generator=source)
    state, expected = source.get_state(), torch.rand(4, generator=source)
    for device in (None, "cpu"):
        target = torch.Generator()
        assert restore_generator(target, state, device) is target and torch.equal(torch.rand(4, generator=target),
                                                                                  expected)
    cuda_state = torch.arange(16, dtype=torch.uint8)                   # the size of a CUDA generator's state
    seeded = [torch.rand(2, generator=restore_generator(torch.Generator(), state, device))
              for state, device in ((cuda_state, None), (cuda_state, "cuda"), (cuda_state.flip(0), "cuda"))]
    assert torch.equal(seeded[0], seeded[1])                  # no GPU to continue it on: seeded, reproducibly,
    assert not torch.equal(seeded[0], seeded[2])              # from the state's bytes,
    assert not torch.equal(seeded[0], torch.rand(2, generator=torch.Generator()))   # not left as it was


def test_a_cpu_state_for_a_gpu_generator_continues_on_a_new_cpu_generator():
    source = torch.Generator().manual_seed(11)
    torch.rand(5, generator=source)
    state, expected = source.get_state(), torch.rand(6, generator=source)
    gpu_generator = SimpleNamespace(device=torch.device("cuda", 0))     # a stand-in: only its device is read
    restored = restore_generator(gpu_generator, state, "cpu")
    assert isinstance(restored, torch.Generator) and restored.device.type == "cpu"
    assert torch.equal(torch.rand(6, generator=restored), expected)


def test_default_device_is_cuda_exactly_when_cuda_is_available(monkeypatch):
    from lowlearn.train import default_device

    for available, device in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        assert default_device() == torch.device(device)


def test_available_device_takes_the_devices_this_machine_has(monkeypatch):
    from lowlearn.train import available_device

    assert available_device("cpu") == torch.device("cpu") and available_device("cpu:0") == torch.device("cpu:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)                  # as on a machine with two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert available_device("cuda:1") == torch.device("cuda", 1) and available_device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"'cuda:2' was asked for, but this machine's GPUs are cuda:0 to cuda:1$"):
        available_device("cuda:2")


def test_seed_everything_fixes_pythons_numpys_and_torchs_draws():
    import random

    import numpy as np

    def draws(seed):
        seed_everything(seed)
        return random.random(), np.random.rand(), torch.rand(()).item()

    for seed in (7, 2**32 + 7, 2**63 - 1):                           # as seeding each library directly
        random.seed(seed), np.random.seed(seed % 2**32), torch.manual_seed(seed)
        expected = random.random(), np.random.rand(), torch.rand(()).item()
        assert draws(seed) == expected
    assert draws(2**32 + 7)[1] == draws(7)[1]                       # NumPy takes the seed modulo 2**32,
    assert draws(2**32 + 7)[0] != draws(7)[0]                       # Python the whole seed
    assert draws(2**31 + 7)[1] != draws(7)[1]


def test_a_generator_made_on_another_device_is_seeded_by_the_given_generator_alone(monkeypatch):
    import lowlearn.train as train

    monkeypatch.setattr(train, "draws_on", lambda generator, device: False)     # as for a CPU generator and a GPU
    made = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        given = torch.Generator().manual_seed(3)
        made.append(torch.rand(4, generator=train.generator_on(given, torch.device("cpu"))))
    assert torch.equal(made[0], made[1])


def test_history_round_trips_through_to_dict_and_metric_keeps_every_evaluation():
    history = History(steps=[2, 4], loss=[0.7, 0.5], eval_steps=[2, 4], eval=[{"accuracy": 0.6}, {"accuracy": 0.8}],
                      seconds=3.0, train_seconds=2.5)
    assert History(**history.to_dict()) == history
    assert history.metric("accuracy") == [0.6, 0.8]


def test_empty_data_are_refused_clearly():
    model, opt = make()
    empty = (torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="the data are empty"):
        fit(model, empty, opt, steps=1, device="cpu")
    with pytest.raises(ValueError, match="the data are empty"):
        evaluate(model, empty, device="cpu")
    # An error in eval_data names it, not the training data, which are fine.
    for eval_data, message in ((empty, "are empty"), ((torch.zeros(3, 8), torch.zeros(2)), "differ in length"),
                               ([torch.zeros(3, 8)], "must be a pair")):
        with pytest.raises(ValueError, match=rf"^the (inputs and targets of the )?evaluation data \(eval_data\) "
                                             rf"{message}"):
            fit(model, toy_data(), opt, steps=1, device="cpu", eval_data=eval_data)


def test_any_seed_of_at_least_zero_is_accepted_also_beyond_what_torch_takes():
    """fit hashes its seed into its streams, so a seed of 2**64 or more (torch refuses it) is fine."""
    for seed in (2**64 - 1, 2**64, 10**30):
        model, opt = make()
        fit(model, toy_data(16), opt, steps=1, seed=seed, device="cpu", progress=False)


def test_a_non_finite_loss_names_its_epoch():
    model, opt = make()
    x, y = toy_data(n=16)
    x[:] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"at step 1 \(epoch 0\)"):       # one batch per epoch
        fit(model, (x, y), opt, steps=3, batch_size=16, device="cpu")


def test_a_run_interrupted_in_its_first_epoch_resumes_with_the_next_batches():
    data = toy_data()                                   # 256 examples, batches of 48: 6 per epoch

    def stop_at_3(state):
        if state.step == 3:
            raise StopTraining

    model, opt = make()
    whole = fit(model, data, opt, steps=10, batch_size=48, log_every=1, device="cpu")
    model, opt = make()
    fit(model, data, opt, steps=10, batch_size=48, log_every=1, device="cpu", callbacks=[stop_at_3])
    rest = fit(model, data, opt, steps=10, batch_size=48, log_every=1, device="cpu", start_step=3)
    assert rest.steps == list(range(4, 11)) and rest.loss == whole.loss[3:]


def test_an_optimizer_that_needs_a_closure_gets_one_that_recomputes_the_batch_loss():
    class ClosureSGD(torch.optim.SGD):
        needs_closure = True

        def step(self, closure=None):
            self.recomputed.append(closure().item())
            return super().step()

    model, _ = make()
    optimizer = ClosureSGD(model.parameters(), lr=0.1)
    optimizer.recomputed, losses = [], []
    fit(model, toy_data(64), optimizer, steps=3, batch_size=16, device="cpu",
        callbacks=[lambda state: losses.append(state.loss.item())])
    assert optimizer.recomputed == pytest.approx(losses, rel=1e-6)        # the same batch, before the step


def test_batch_transform_feeds_the_model_the_transformed_batch():
    model, opt = make()
    x, y = toy_data(64)
    given, fed = [], []
    model.register_forward_pre_hook(lambda module, inputs: fed.append(inputs[0]))

    def transform(xb):
        given.append(xb)
        return xb.flip(1)

    fit(model, (x, y), opt, steps=3, batch_size=16, device="cpu", batch_transform=transform)
    assert len(given) == len(fed) == 3
    for before, after in zip(given, fed):
        assert torch.equal(after, before.flip(1))
        assert all((row == x).all(1).any() for row in before)                     # rows of the training inputs


def test_a_binary_classifier_with_a_zero_logit_predicts_class_0():
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([0, 1])
    binary = lambda out, target: nn.functional.binary_cross_entropy_with_logits(out, target[:, None].float())  # noqa: E731
    assert evaluate(nn.Identity(), (x, y), loss_fn=binary, device="cpu")["accuracy"] == 1.0


def test_evaluate_builds_no_autograd_graph():
    model, _ = make()
    enabled = []
    model.register_forward_hook(lambda module, inputs, output: enabled.append(torch.is_grad_enabled()))
    evaluate(model, toy_data(64), batch_size=16, device="cpu")
    assert enabled == [False] * 4


def test_accuracy_is_reported_for_integer_targets_of_any_integer_dtype():
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    y = torch.tensor([0, 1, 1], dtype=torch.int32)
    as_long = lambda out, target: nn.functional.cross_entropy(out, target.long())       # noqa: E731
    assert evaluate(nn.Identity(), (x, y), loss_fn=as_long, device="cpu")["accuracy"] == 2 / 3


def test_evaluations_during_fit_use_its_loss_function():
    model, opt = make()
    data = toy_data(64)
    doubled = lambda out, target: 2 * nn.functional.cross_entropy(out, target)           # noqa: E731
    hist = fit(model, data, opt, steps=2, batch_size=32, loss_fn=doubled, eval_data=data, device="cpu")
    assert hist.eval[-1]["loss"] == pytest.approx(2 * evaluate(model, data, device="cpu")["loss"], rel=1e-6)


def test_fit_shows_a_progress_bar_only_when_asked(capsys):
    for progress in (True, False):
        model, opt = make()
        fit(model, toy_data(64), opt, steps=2, batch_size=32, device="cpu", progress=progress)
        assert bool(capsys.readouterr().err) == progress


def test_an_expected_value_of_none_is_not_met_by_a_value_never_saved(tmp_path):
    model, _ = make()
    path = save_checkpoint(tmp_path / "ck.pt", model, method="protonet")
    with pytest.raises(ValueError, match=r"was saved with \{'note': '\(not saved\)'\}"):
        load_checkpoint(path, model, expect={"note": None})


def test_running_out_of_memory_while_loading_is_not_called_a_damaged_file(tmp_path, monkeypatch):
    model, _ = make()
    path = save_checkpoint(tmp_path / "ck.pt", model)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch, "load", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        load_checkpoint(path, model)


def test_an_extra_value_that_pickle_refuses_with_a_type_error_names_itself(tmp_path):
    import threading

    model, _ = make()
    with pytest.raises(TypeError, match="the extra value lock=.* cannot be saved"):
        save_checkpoint(tmp_path / "ck.pt", model, lock=threading.Lock())
    assert not list(tmp_path.iterdir())


class Fails(nn.Module):
    """A model whose forward pass raises, after a batch norm in training mode has updated its statistics."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(8)

    def forward(self, x):
        self.norm(x)
        raise RuntimeError("the forward pass failed")


def test_a_forward_pass_that_raises_leaves_modes_and_buffers_as_they_were():
    from lowlearn.train import buffers_restored

    model = Fails()
    with pytest.raises(RuntimeError, match="the forward pass failed"):
        evaluate(model, toy_data(16), device="cpu")
    assert model.training and model.norm.training
    with pytest.raises(RuntimeError, match="the forward pass failed"):
        with buffers_restored(model):
            model(toy_data(16)[0])
    assert torch.equal(model.norm.running_mean, torch.zeros(8)) and model.norm.num_batches_tracked == 0


def test_save_checkpoint_returns_the_path_as_a_path(tmp_path):
    model, _ = make()
    path = save_checkpoint(str(tmp_path / "ck.pt"), model)
    assert isinstance(path, type(tmp_path)) and path == tmp_path / "ck.pt"


def test_a_checkpoint_is_not_saved_under_a_file(tmp_path):
    model, _ = make()
    (tmp_path / "runs").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        save_checkpoint(tmp_path / "runs" / "ck.pt", model)


def test_a_file_with_a_model_but_no_extra_is_not_a_checkpoint(tmp_path):
    model, _ = make()
    torch.save({"model": model.state_dict()}, tmp_path / "ck.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint written by lowlearn.train.save_checkpoint"):
        load_checkpoint(tmp_path / "ck.pt", model)


def test_loading_a_checkpoint_raises_no_warnings(tmp_path):
    import warnings

    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))
    path = save_checkpoint(tmp_path / "ck.pt", model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(path, model)


def test_fit_trains_on_the_device_it_is_given(monkeypatch):
    import lowlearn.train as train

    monkeypatch.setattr(train, "default_device", lambda: torch.device("meta"))   # as if a GPU were the default
    model, opt = make()
    fit(model, toy_data(32), opt, steps=1, batch_size=16, device="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_fit_keeps_a_model_that_is_off_the_cpu_where_it_is(monkeypatch):
    import lowlearn.train as train

    monkeypatch.setattr(train, "default_device", lambda: torch.device("cpu"))
    model = make()[0].to("meta")     # the one device besides the CPU here: fit neither moves it nor copies it out
    with pytest.raises(ValueError, match="'meta' is not a device lowlearn runs on here"):
        fit(model, toy_data(32), torch.optim.SGD(model.parameters(), lr=0.1), steps=1, batch_size=16)
    cpu_model, cpu_opt = make()
    fit(cpu_model, toy_data(32), cpu_opt, steps=1, batch_size=16)       # a CPU model goes to default_device()
    assert all(p.device.type == "cpu" for p in cpu_model.parameters())


def test_numpy_integer_seeds_are_the_seeds_they_hold():
    import random

    import numpy as np

    runs = []
    for seed in (5, np.int64(5)):
        model, opt = make()
        runs.append(fit(model, toy_data(64), opt, steps=4, batch_size=16, log_every=1, seed=seed, device="cpu").loss)
        seed_everything(seed)
        runs.append((random.random(), np.random.rand(), torch.rand(()).item()))
    assert runs[0] == runs[2] and runs[1] == runs[3]
    model, opt = make()
    fit(model, toy_data(16), opt, steps=1, seed=np.uint64(2**64 - 1), device="cpu", progress=False)


def test_evaluate_refuses_a_loss_function_that_returns_a_loss_per_example():
    model, _ = make()
    per_example = lambda out, target: nn.functional.cross_entropy(out, target, reduction="none")   # noqa: E731
    with pytest.raises(ValueError, match=r"loss_fn must return the mean loss, one number.*shape \(16,\)"):
        evaluate(model, toy_data(16), loss_fn=per_example, device="cpu")


def test_fit_evaluates_under_the_same_bf16_flag_it_trains_with(monkeypatch):
    """fit's docstring: bf16 runs the forward passes under bfloat16 autocast, and the evaluations during training
    are evaluate(..., bf16=bf16). bf16 is CUDA-only, so on the CPU a recording stand-in replaces train._autocast;
    every forward pass, training and evaluation, must ask for the flag fit was given."""
    import lowlearn.train as train

    asked = []

    def recording_autocast(device, bf16):
        asked.append(bf16)
        return contextlib.nullcontext()

    monkeypatch.setattr(train, "_autocast", recording_autocast)
    monkeypatch.setattr(train, "_check_bf16", lambda device, bf16: None)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = fit(model, (x, y), opt, steps=2, batch_size=10, eval_data=(x, y), eval_every=1, bf16=True,
                  device="cpu", progress=False)
    assert history.eval_steps == [1, 2]
    assert len(asked) == 2 + 2 and all(asked)     # two training steps, two evaluations of one batch each


def test_the_last_partial_batch_takes_a_full_step_on_its_own_mean_loss():
    """Reference: a hand-written SGD loop over the batches of torch.randperm(n, generator seeded with ``seed``)
    split into batches of batch_size, each step on the mean loss of its batch. With 10 examples in batches of 4
    the last batch holds 2 examples, and its step must be a full step on those 2 examples' mean loss."""
    torch.manual_seed(0)
    x, y = torch.randn(10, 3), torch.randn(10, 2)
    start = nn.Linear(3, 2)
    model = nn.Linear(3, 2)
    model.load_state_dict(start.state_dict())
    history = fit(model, (x, y), torch.optim.SGD(model.parameters(), lr=0.3), epochs=1, batch_size=4,
                  loss_fn=nn.functional.mse_loss, log_every=1, seed=5, device="cpu", progress=False)
    w, b = start.weight.detach().clone(), start.bias.detach().clone()
    losses = []
    for idx in torch.randperm(10, generator=seeded_generator(5, "batch order")).split(4):
        w.requires_grad_(True), b.requires_grad_(True)
        loss = ((x[idx] @ w.T + b - y[idx]) ** 2).mean()
        gw, gb = torch.autograd.grad(loss, (w, b))
        w, b = (w - 0.3 * gw).detach(), (b - 0.3 * gb).detach()
        losses.append(loss.item())
    assert history.steps == [1, 2, 3]
    assert len(history.loss) == 3 and all(abs(a - r) < 1e-5 for a, r in zip(history.loss, losses))
    torch.testing.assert_close(model.weight.detach(), w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.bias.detach(), b, rtol=1e-6, atol=1e-6)


def test_fit_draws_from_streams_of_its_own_not_from_the_numbers_that_made_the_weights():
    """fit seeds the global generators with seed_everything(stream_seed(seed, "training draws")) and orders the
    batches with seeded_generator(seed, "batch order"). A model built under seed_everything(seed) and trained with
    the same seed then draws its dropout and batch order from numbers other than those of its initial weights
    (with seed_everything(seed) and torch.Generator().manual_seed(seed) they were the very same numbers)."""
    import random

    import numpy as np

    draws = []

    def record(xb):                                     # the first draws after fit seeded the generators
        if not draws:
            draws.append((random.random(), np.random.rand(), torch.rand(()).item()))
        return xb

    for seed in (3, 8):
        model, opt = make(seed)
        draws.clear()
        x, y = toy_data(32)
        fit(model, (x, y), opt, steps=1, batch_size=32, seed=seed, batch_transform=record, device="cpu",
            progress=False)
        seed_everything(stream_seed(seed, "training draws"))
        assert draws == [(random.random(), np.random.rand(), torch.rand(()).item())]
        seed_everything(seed)
        assert draws != [(random.random(), np.random.rand(), torch.rand(()).item())]

    order = []
    x, y = torch.arange(32.0).unsqueeze(1), torch.zeros(32, dtype=torch.long)
    model = nn.Linear(1, 2)
    fit(model, (x, y), torch.optim.SGD(model.parameters(), lr=0.0), epochs=1, batch_size=8, seed=3, device="cpu",
        progress=False, batch_transform=lambda xb: order.append(xb[:, 0].long()) or xb)
    assert torch.equal(torch.cat(order), torch.randperm(32, generator=seeded_generator(3, "batch order")))
    assert not torch.equal(torch.cat(order), torch.randperm(32, generator=torch.Generator().manual_seed(3)))


def test_evaluate_takes_the_loss_of_a_bfloat16_model_in_float32():
    model, _ = make()
    model.to(torch.bfloat16)
    x, y = toy_data(300)
    x = x.to(torch.bfloat16)
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(x).float(), y).item()   # the bfloat16 outputs, in float32
    got = evaluate(model, (x, y), batch_size=100, device="cpu")["loss"]
    assert got == pytest.approx(expected, rel=1e-5)                         # a bfloat16 loss is off by ~1e-3


def test_drop_last_leaves_out_each_epochs_short_batch_as_a_reference_loop_does():
    """Reference: the same loop as above with the short last batch of every epoch left out. Batch norm in
    training mode cannot normalise the batch of one example that 9 examples in batches of 4 leave."""
    torch.manual_seed(0)
    x, y = torch.randn(9, 3), torch.randint(0, 2, (9,))
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    start = copy.deepcopy(model)
    twin = copy.deepcopy(model)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fit(twin, (x, y), torch.optim.SGD(twin.parameters(), lr=0.3), epochs=1, batch_size=4, device="cpu",
            progress=False)
    epochs = []
    history = fit(model, (x, y), torch.optim.SGD(model.parameters(), lr=0.3), epochs=3, batch_size=4,
                  drop_last=True, log_every=1, seed=5, device="cpu", progress=False,
                  callbacks=[lambda state: epochs.append(state.epoch)])
    assert history.steps == list(range(1, 7)) and epochs == [0, 0, 1, 1, 2, 2]      # two full batches an epoch
    reference, optimizer, losses = start, torch.optim.SGD(start.parameters(), lr=0.3), []
    order = seeded_generator(5, "batch order")
    for _ in range(3):
        for idx in torch.randperm(9, generator=order).split(4)[:2]:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(reference(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert history.loss == pytest.approx(losses, rel=1e-6)
    for ours, theirs in zip(model.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(ours, theirs)


def test_drop_last_resumes_with_the_batches_the_interrupted_run_would_have_drawn():
    data = toy_data(100)                                # batches of 30: 3 full ones an epoch, 10 examples left out

    def stop_at_4(state):
        if state.step == 4:
            raise StopTraining

    model, opt = make()
    whole = fit(model, data, opt, epochs=3, batch_size=30, drop_last=True, log_every=1, device="cpu")
    model, opt = make()
    fit(model, data, opt, epochs=3, batch_size=30, drop_last=True, log_every=1, device="cpu", callbacks=[stop_at_4])
    rest = fit(model, data, opt, epochs=3, batch_size=30, drop_last=True, log_every=1, device="cpu", start_step=4)
    assert whole.steps == list(range(1, 10)) and rest.steps == list(range(5, 10)) and rest.loss == whole.loss[4:]


def test_drop_last_with_fewer_examples_than_a_batch_is_a_clear_error():
    model, opt = make()
    with pytest.raises(ValueError, match=r"drop_last=True with 20 examples, fewer than batch_size=32, leaves no batch"):
        fit(model, toy_data(20), opt, epochs=1, batch_size=32, drop_last=True, device="cpu")


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux (in bytes on macOS)")
def test_saving_a_checkpoint_reads_it_back_without_a_second_copy_of_the_state(tmp_path):
    # Reading the file back onto the CPU to check it made a copy of every tensor: a peak of the serialised bytes
    # plus the state again, beside the model (measured: 489 MB for a 256 MB layer, 245 MB now).
    script = (
        "import resource, sys, torch\n"
        "from lowlearn.train import save_checkpoint\n"
        "layer = torch.nn.Linear(4096, 4096, bias=False)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "save_checkpoint(sys.argv[1], layer)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / layer.weight.nbytes)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big.pt")], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                          "PYTHONPATH": os.path.dirname(os.path.dirname(lowlearn_train.__file__))})
    assert float(out.stdout) < 1.5, out.stdout          # the serialised bytes, about once the state


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor", "ignore:TypedStorage is deprecated")
def test_a_state_with_a_tensor_kind_that_has_no_meta_form_is_still_checked_and_saved(tmp_path):
    model = nn.Linear(2, 2)
    model.register_buffer("scale", torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8))
    path = save_checkpoint(tmp_path / "quantized.pt", model)
    assert torch.equal(torch.load(path, weights_only=True)["model"]["scale"].int_repr(), model.scale.int_repr())
    with pytest.raises(TypeError, match="could not be loaded back with weights_only=True"):
        save_checkpoint(tmp_path / "bad.pt", model, rate=np.float64(0.1))
    assert not (tmp_path / "bad.pt").exists()

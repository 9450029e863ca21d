import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.ticker import NullFormatter

from lowlearn import plot
from lowlearn.train import History


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_mean_and_spread_uses_the_sample_std():
    mean, std = plot.mean_and_spread([[1.0, 2.0], [3.0, 2.0]])
    assert mean.tolist() == [2.0, 2.0]
    assert std == pytest.approx([np.sqrt(2.0), 0.0])
    _, single = plot.mean_and_spread([[5.0, 6.0]])
    assert single.tolist() == [0.0, 0.0]


def test_figures_draw_their_data():
    ax = plot.errorbar_curve([1, 10, 100], [[0.5, 0.6, 0.7], [0.7, 0.6, 0.5]], logx=True)
    assert ax.get_xscale() == "log"
    assert ax.lines[0].get_xdata().tolist() == [1, 10, 100]
    assert ax.lines[0].get_ydata() == pytest.approx([0.6, 0.6, 0.6])                  # the mean over runs
    bars = ax.containers[0].lines[2][0].get_segments()                                # the error bars: ± std
    assert [segment[1, 1] - segment[0, 1] for segment in bars] == pytest.approx([2 * 0.02 ** 0.5, 0.0, 2 * 0.02 ** 0.5])
    hist = History(steps=[1, 2], loss=[1.0, 0.5], eval_steps=[2], eval=[{"accuracy": 0.9}])
    loss_ax, acc_ax = plot.plot_history(hist)
    assert loss_ax.lines[0].get_ydata().tolist() == [1.0, 0.5]
    assert acc_ax.lines[0].get_ydata().tolist() == [0.9]


def test_one_run_has_no_error_bars():
    ax = plot.errorbar_curve([1, 2], [[0.5, 0.6]])
    assert ax.lines[0].get_ydata().tolist() == [0.5, 0.6]
    assert not ax.containers[0].has_yerr


def test_density_axis_runs_from_dense_to_sparse():
    ax = plot.density_axis(plot.errorbar_curve([0.5, 0.1, 0.01], [[0.9, 0.8, 0.5]]), [0.5, 0.1, 0.01])
    assert ax.get_xscale() == "log"
    left, right = ax.get_xlim()
    assert left == pytest.approx(0.5 * 1.3) and right == pytest.approx(0.01 / 1.3)        # sparse on the right
    assert [t.get_text() for t in ax.get_xticklabels()] == ["50%", "10%", "1%"]
    assert ax.get_xlabel() == "weights kept (log scale; sparsity grows →)"
    percent = plot.density_axis(plot.errorbar_curve([100, 4.5], [[0.9, 0.8]]), [100, 4.5], percent=True,
                                label="weights remaining")
    assert [t.get_text() for t in percent.get_xticklabels()] == ["100%", "4.5%"]


def test_a_metric_the_evaluations_lack_is_refused_before_drawing():
    regression = History(steps=[1], loss=[1.0], eval_steps=[1], eval=[{"loss": 0.4}])
    with pytest.raises(ValueError, match=r"hold \['loss'\], not 'accuracy'"):
        plot.plot_history(regression)
    loss_ax, metric_ax = plot.plot_history(regression, metric="loss")
    assert metric_ax.lines[0].get_ydata().tolist() == [0.4]


def test_runs_that_do_not_fit_are_refused_before_a_figure_is_made():
    before = plt.get_fignums()
    for x, runs, message in (([1, 2], [[1.0, 2.0], [3.0]], "equally long"),     # a run is short
                             ([1, 2], [], "no runs"),
                             ([1, 2, 3], [[1.0, 2.0], [3.0, 4.0]], r"aligned with the 3 values of x.*\(2, 2\)"),
                             ([1, 2, 3], [0.9, 0.8, 0.5], r"\(3,\).*\[run\]")):   # one run, not in a list
        with pytest.raises(ValueError, match=message):
            plot.errorbar_curve(x, runs)
    assert plt.get_fignums() == before                                       # no empty figure left behind
    with pytest.raises(ValueError, match="no runs"):
        plot.mean_and_spread([])                                             # not a silent NaN


def test_a_log_axis_refuses_x_it_cannot_show():
    for x in ([0, 10, 100], [-1, 10, 100], [float("nan"), 10, 100]):
        with pytest.raises(ValueError, match="logx=True needs positive x values"):
            plot.errorbar_curve(x, [[0.5, 0.6, 0.7]], logx=True)
    assert plot.errorbar_curve([0, 10, 100], [[0.5, 0.6, 0.7]]).lines[0].get_xdata().tolist() == [0, 10, 100]


def test_the_default_marker_and_caps_can_be_replaced():
    ax = plot.errorbar_curve([1, 2], [[0.5, 0.6], [0.7, 0.8]], marker="s", capsize=0)
    assert ax.lines[0].get_marker() == "s"
    assert not ax.containers[0].lines[1]                                     # no caps drawn


def test_density_axis_refuses_densities_it_cannot_place():
    for kept, percent in (([], False), ([0.5, 0.0], False), ([50, 10], False), ([100, 0], True), ([150, 10], True)):
        _, ax = plt.subplots()
        with pytest.raises(ValueError, match="kept must be densities"):
            plot.density_axis(ax, kept, percent=percent)
        assert ax.get_xscale() == "linear"                                   # the axes are left as they were


def test_a_loss_that_is_not_positive_is_plotted_on_a_linear_axis():
    nll = History(steps=[1, 2, 3], loss=[0.5, -0.2, -1.0], eval_steps=[3], eval=[{"loss": -1.0}])
    loss_ax, _ = plot.plot_history(nll, metric="loss")
    assert loss_ax.get_yscale() == "linear"
    bottom, top = loss_ax.get_ylim()
    assert bottom < -1.0 and top > 0.5                                       # every loss is in view
    positive = History(steps=[1, 2], loss=[1.0, 0.5], eval_steps=[2], eval=[{"accuracy": 0.9}])
    assert plot.plot_history(positive)[0].get_yscale() == "log"


def test_a_single_number_is_not_a_list_of_runs():
    with pytest.raises(ValueError, match="no runs"):
        plot.mean_and_spread(0.5)


def test_errorbar_curve_draws_on_the_given_axes_with_its_label_and_default_style():
    _, given = plt.subplots()
    ax = plot.errorbar_curve([1, 2], [[0.5, 0.6], [0.7, 0.8]], label="pruned", ax=given)
    assert ax is given
    assert ax.get_legend_handles_labels()[1] == ["pruned"]
    assert ax.lines[0].get_marker() == "o" and ax.containers[0].lines[1]        # caps drawn by default
    assert ax.get_xscale() == "linear"                                          # a log axis only when asked
    log = plot.errorbar_curve([1, 10, 1000], [[0.5, 0.6, 0.7]], logx=True)
    assert isinstance(log.xaxis.get_minor_formatter(), NullFormatter)     # powers of ten labelled only


def test_density_axis_spans_unsorted_densities_and_takes_its_label():
    _, ax = plt.subplots()
    plot.density_axis(ax, [0.1, 0.5, 0.01], label="weights remaining")
    assert ax.get_xlim() == pytest.approx((0.5 * 1.3, 0.01 / 1.3))
    assert ax.get_xlabel() == "weights remaining (log scale; sparsity grows →)"
    assert isinstance(ax.xaxis.get_minor_formatter(), NullFormatter)      # only the given densities labelled
    for kept in (0.5, [[0.5, 0.1]]):
        with pytest.raises(ValueError, match="kept must be densities"):
            plot.density_axis(ax, kept)


def test_plot_history_puts_loss_left_and_metric_right_against_their_steps():
    hist = History(steps=[1, 2, 3, 4], loss=[1.0, 0.8, 0.6, 0.5], eval_steps=[2, 4],
                   eval=[{"accuracy": 0.8}, {"accuracy": 0.9}])
    loss_ax, acc_ax = plot.plot_history(hist, label="dense")
    assert loss_ax.get_position().x0 < acc_ax.get_position().x0
    assert abs(loss_ax.get_position().y0 - acc_ax.get_position().y0) < 1e-9
    assert acc_ax.lines[0].get_xdata().tolist() == [2, 4]
    assert loss_ax.get_xlabel() == acc_ax.get_xlabel() == "optimizer step"
    assert loss_ax.get_ylabel() == "training loss" and acc_ax.get_ylabel() == "test accuracy"
    assert loss_ax.get_legend_handles_labels()[1] == acc_ax.get_legend_handles_labels()[1] == ["dense"]


def test_a_loss_of_zero_is_plotted_on_a_linear_axis():
    zero = History(steps=[1, 2], loss=[1.0, 0.0], eval_steps=[], eval=[])
    assert plot.plot_history(zero)[0].get_yscale() == "linear"


def test_a_history_without_evaluations_leaves_the_metric_axes_empty():
    loss_ax, metric_ax = plot.plot_history(History(steps=[1, 2], loss=[1.0, 0.5], eval_steps=[], eval=[]))
    assert len(loss_ax.lines) == 1 and not metric_ax.lines and metric_ax.get_ylabel() == ""


def test_results_that_are_text_are_refused_even_when_they_read_as_numbers():
    with pytest.raises(ValueError, match="lists of numbers"):
        plot.mean_and_spread([["0.9", "0.8"], ["0.7", "0.6"]])


def test_the_metric_axis_is_labelled_with_the_metric_plotted():
    """Reference: the docstring, the right panel shows the evaluation ``metric``; a regression
    plotted with metric="loss" must not be labelled "test accuracy"."""
    regression = History(steps=[1, 2], loss=[1.0, 0.5], eval_steps=[2], eval=[{"loss": 0.4, "accuracy": 0.9}])
    loss_ax, metric_ax = plot.plot_history(regression, metric="loss")
    assert metric_ax.get_ylabel() == "test loss"
    assert loss_ax.get_ylabel() == "training loss" and loss_ax.get_xlabel() == "optimizer step"
    plt.close("all")


def test_results_that_are_tensors_count_as_their_values_whatever_their_device_or_gradient():
    # Tensors that require grad failed with torch's "Can't call numpy() on Tensor that requires grad", and CUDA
    # tensors with "can't convert cuda:0 device type tensor to numpy"; both are now copied to the CPU (CUDA is
    # not run here). A meta tensor, which holds no values, is refused.
    accuracies = [torch.tensor(0.5, requires_grad=True) * 1, torch.tensor(0.7, requires_grad=True)]
    expected = plot.mean_and_spread([0.5, 0.7])
    for runs in (accuracies, torch.tensor([0.5, 0.7], requires_grad=True), [[a] for a in accuracies]):
        mean, std = plot.mean_and_spread(runs)
        np.testing.assert_allclose(mean, np.squeeze(expected[0]), rtol=1e-6)
        np.testing.assert_allclose(std, np.squeeze(expected[1]), rtol=1e-6)
    ax = plot.errorbar_curve(torch.tensor([1.0, 2.0], requires_grad=True), [accuracies, accuracies])
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.5, 0.7], rtol=1e-6)
    plot.density_axis(ax, torch.tensor([0.5, 0.1], requires_grad=True))
    assert [label.get_text() for label in ax.get_xticklabels()] == ["50%", "10%"]
    with pytest.raises(ValueError, match="a tensor on the meta device holds no values"):
        plot.mean_and_spread([torch.tensor(0.5, device="meta")])
    mean, _ = plot.mean_and_spread([torch.tensor([0.5, 0.25], dtype=torch.bfloat16)])     # NumPy has no bfloat16
    np.testing.assert_array_equal(mean, [0.5, 0.25])


def test_kept_per_input_counts_each_inputs_kept_weights_laid_out_like_the_input():
    """Reference: by hand on a 3-unit layer over a 2x2 input: input (0, 1) is kept by units 0 and 2, and so on."""
    mask = torch.tensor([[1, 1, 0, 0],
                         [0, 0, 0, 1],
                         [1, 1, 0, 1]], dtype=torch.bool)
    image = plot.kept_per_input(mask, (2, 2))
    assert image.dtype == torch.float32 and image.device.type == "cpu"
    assert torch.equal(image, torch.tensor([[2.0, 2.0], [0.0, 2.0]]))
    for bad, shape in ((mask, (3, 3)), (mask[0], (2, 2)), (mask[:, :, None], (2, 2))):
        with pytest.raises(ValueError, match="one column per input"):
            plot.kept_per_input(bad, shape)


def test_kept_per_input_counts_exactly_for_a_bfloat16_mask_buffer():
    """Reference: counts by hand, 301 and 257. A Mask's buffer has its weight's dtype; bfloat16 holds the integers
    above 256 in steps of 2, so the buffer's own column sums would round both (to 300 or 302, and to 256 or 258)."""
    keep = torch.ones(301, 2, dtype=torch.bool)
    keep[:44, 1] = False                                                    # 301 and 257 kept
    image = plot.kept_per_input(keep.to(torch.bfloat16), (1, 2))
    assert image.tolist() == [[301.0, 257.0]]

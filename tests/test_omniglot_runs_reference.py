"""omniglot_runs.run_errors against Lake et al.'s own one-shot classification demo and against counted errors.

Lake et al.'s ``demo_classification.py`` (github.com/brendenlake/omniglot, python/one-shot-classification) scores
the 20 runs with the Modified Hausdorff Distance of Dubuisson & Jain (1994),
``MHD(A, B) = max(mean_{a∈A} min_{b∈B} ‖a−b‖, mean_{b∈B} min_{a∈A} ‖a−b‖)`` on the centred coordinates of the inked
pixels, each test image assigned to the training image of least cost, and states: "Running this demo should lead to
a result of 38.8 percent errors". ``REFERENCE_ERRORS`` are the per-run errors of an independent transcription of that
demo (zipfile + Pillow, test files sorted, answers taken from the lines of ``class_labels.txt``), whose mean
is 38.75 %.
"""


import pytest
import torch
from torch import nn

from lowlearn.data.cache import data_root
from lowlearn.data.omniglot import OneShotRun, load_omniglot_runs
from lowlearn.eval import omniglot_runs
from lowlearn.profiles import get_profile
from lowlearn.stats import mean_and_ci

REFERENCE_ERRORS = [45, 35, 40, 25, 30, 15, 60, 35, 40, 55, 15, 70, 65, 35, 15, 25, 30, 40, 70, 30]

ROOT = data_root()                     # $LOWLEARN_DATA, else lowlearn's download folder
needs_runs = pytest.mark.skipif(not (ROOT / "omniglot" / "all_runs.zip").is_file(),
                                reason="Lake et al.'s all_runs.zip is not in the data folder")


class ModifiedHausdorff(nn.Module):
    """A 'learner' scoring each query against each support image by −MHD (Dubuisson & Jain 1994, eq. for d6/f2)."""

    def forward(self, support, support_labels, query):
        def points(image):                       # centred (row, col) of the inked pixels, as LoadImgAsPoints
            p = (image[0] > 0.5).nonzero().double()
            return p - p.mean(0)

        train = [points(s) for s in support]
        cost = [[max(d.min(1).values.mean(), d.min(0).values.mean()) for d in (torch.cdist(points(q), b)
                                                                           for b in train)] for q in query]
        return -torch.tensor(cost)


def test_the_reference_errors_average_to_the_demos_published_38_8_percent():
    assert sum(REFERENCE_ERRORS) / 20 == 38.75 and round(sum(REFERENCE_ERRORS) / 20, 1) == 38.8


@needs_runs
@pytest.mark.parametrize("run", [6, 18])
def test_run_errors_of_the_modified_hausdorff_baseline_equal_lake_et_als_demo(run):
    """The library's loader (original 105×105 images, class_labels.txt pairing) and run_errors, with an MHD
    learner, give the per-run error of the transcription of the official demo (whose 20 runs average 38.8 %)."""
    runs = load_omniglot_runs(root=ROOT, image_size=None, download=False)
    assert len(runs) == 20
    errors = omniglot_runs.run_errors(ModifiedHausdorff(), runs[run - 1:run], get_profile("smoke").black_box,
                                      torch.device("cpu"))
    assert errors.tolist() == pytest.approx([REFERENCE_ERRORS[run - 1]], abs=1e-4)


class Answers(nn.Module):
    """A learner answering fixed labels for each call: scores that are one-hot on the answer."""

    def __init__(self, answers):
        super().__init__()
        self.answers = list(answers)

    def forward(self, support, support_labels, query):
        return torch.nn.functional.one_hot(self.answers.pop(0), 20).float()


def test_each_runs_error_is_the_percentage_of_its_20_queries_answered_wrong_and_the_mean_is_over_all_400():
    """Run r answered right on exactly r of its queries (in a shuffled order of classes): error 100 − 5r %, and the
    reported mean is the percentage of all 20·20 trials answered wrong, as in Lake et al."""
    generator = torch.Generator().manual_seed(0)
    runs, answers = [], []
    for r in range(20):
        labels = torch.randperm(20, generator=generator)
        images = torch.rand(20, 1, 8, 8, generator=generator)
        runs.append(OneShotRun(images, torch.arange(20), images[labels], labels))
        wrong = torch.randperm(20, generator=generator)[: 20 - r]
        answer = labels.clone()
        answer[wrong] = (labels[wrong] + 1 + torch.randint(0, 19, (len(wrong),), generator=generator)) % 20
        answers.append(answer)
    errors = omniglot_runs.run_errors(Answers(answers), runs, get_profile("smoke").black_box, torch.device("cpu"))
    assert errors.tolist() == pytest.approx([100 - 5 * r for r in range(20)], abs=1e-4)
    wrong_trials = sum(int((a != run.query_labels).sum()) for a, run in zip(answers, runs))
    assert mean_and_ci(errors)[0] == pytest.approx(100 * wrong_trials / 400, abs=1e-4)

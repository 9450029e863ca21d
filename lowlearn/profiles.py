"""Experiment profiles: one place that holds every experiment size of the course.

Every chapter runs in three sizes, chosen by the environment variable
``LOWLEARN_PROFILE``:

``smoke``
    Seconds per chapter. Continuous integration uses it (``.ci/run`` sets
    ``LOWLEARN_PROFILE=smoke`` for ``pytest --nbval-lax``): the same code path as the
    real experiments, on tiny sizes.
``cpu``
    Minutes per chapter on a laptop CPU, with small data: MNIST-5k and MNIST-1D
    (shipped in Python packages) and Omniglot's small background sets (downloaded
    once, a few MB).
    The default when no CUDA device is present.
``gpu``
    The full experiments (MNIST, CIFAR-10, Omniglot at paper scale), minutes per
    chapter on one modern GPU. The default when CUDA is available.

Chapters never hard-code a size: they read it from :func:`get_profile`, so the
printed results always say which profile made them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .checks import check_count
from .train import available_device, default_device

ENV_VAR = "LOWLEARN_PROFILE"


@dataclass(frozen=True)
class BudgetSizes:
    """Sizes for the chapter "Training on a budget" (LeNet-300-100 on MNIST).

    Attributes:
        dataset: ``"mnist5k"`` (embedded, offline) or ``"mnist"`` (downloaded).
        train_limit: keep only this many training examples (``None``: all).
        epochs: passes over the training set (the data-size sweep trains for the
            same number of steps).
        batch_size: examples per optimizer step.
        lr: SGD learning rate.
        momentum: SGD momentum.
        widths: multipliers of the hidden widths (300, 100) for the size sweep.
        data_sizes: training-set sizes for the data sweep.
        seeds: independent runs per configuration (for error bars).
        min_accuracy: the test accuracy the chapter asserts LeNet-300-100 reaches.
    """

    dataset: str
    train_limit: int | None
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    widths: tuple[float, ...]
    data_sizes: tuple[int, ...]
    seeds: int
    min_accuracy: float


@dataclass(frozen=True)
class PruningSizes:
    """Sizes for the chapter "Pruning" (LeNet-300-100 and LeNet5 on MNIST, Conv-2/4 on CIFAR-10).

    Attributes:
        dataset: ``"mnist5k"`` or ``"mnist"``.
        train_limit: keep only this many training examples (``None``: all).
        epochs: dense training before pruning (and training after pruning at init).
        finetune_epochs: retraining after each pruning step.
        batch_size: examples per optimizer step.
        lr: SGD learning rate.
        momentum: SGD momentum.
        sparsities: fractions of weights removed, for the accuracy-vs-sparsity curves.
        seeds: independent runs per point (for error bars).
        iterative_rounds: pruning rounds of iterative pruning.
        score_batch: examples in the batch that SNIP, GraSP and OBD score on.
        obd_samples: Hutchinson samples of the OBD Hessian-diagonal estimate.
        init_sparsities: the extreme sparsities of pruning at initialisation (layer collapse, SynFlow).
        synflow_rounds: pruning rounds of SynFlow (Tanaka et al. 2020 use 100).
        init_epochs: training of the networks pruned at those sparsities.
        cifar_epochs: training of Conv-2/4 on CIFAR-10 (0: skip, as offline profiles do).
    """

    dataset: str
    train_limit: int | None
    epochs: int
    finetune_epochs: int
    batch_size: int
    lr: float
    momentum: float
    sparsities: tuple[float, ...]
    seeds: int
    iterative_rounds: int
    score_batch: int
    obd_samples: int
    init_sparsities: tuple[float, ...]
    synflow_rounds: int
    init_epochs: int
    cifar_epochs: int


@dataclass(frozen=True)
class LotterySizes:
    """Sizes for the chapter "The lottery ticket hypothesis" (LeNet-300-100, MNIST-1D).

    Attributes:
        dataset: ``"mnist5k"`` or ``"mnist"``.
        train_limit: keep only this many training examples (``None``: all).
        steps: optimizer steps per training run (the paper: 50,000).
        eval_every: steps between test evaluations (for the early-stopping iteration).
        batch_size: examples per step (the paper: 60).
        lr: Adam learning rate (the paper: 1.2e-3).
        rounds: IMP rounds; LeNet-300-100 keeps 0.8**rounds of its hidden weights.
        seeds: independent IMP runs (for error bars).
        controls: the controls trained at every round's density.
        mnist1d_samples: size of the generated MNIST-1D dataset.
        mnist1d_steps: optimizer steps per MNIST-1D training run.
        mnist1d_rounds: IMP rounds on MNIST-1D.
    """

    dataset: str
    train_limit: int | None
    steps: int
    eval_every: int
    batch_size: int
    lr: float
    rounds: int
    seeds: int
    controls: tuple[str, ...]
    mnist1d_samples: int
    mnist1d_steps: int
    mnist1d_rounds: int


@dataclass(frozen=True)
class DSTSizes:
    """Sizes for the chapter "Dynamic sparse training" (LeNet-300-100 on MNIST, ResNet-20 on CIFAR-10).

    Attributes:
        dataset: ``"mnist5k"`` or ``"mnist"``.
        train_limit: keep only this many training examples (``None``: all).
        epochs: training epochs of every run (dense and sparse alike).
        batch_size: examples per optimizer step.
        lr: SGD learning rate.
        momentum: SGD momentum.
        sparsities: fractions of weights removed (the RigL tables: 0.8, 0.9, 0.95).
        seeds: independent runs per configuration (for error bars).
        every: ``ΔT``, steps between mask updates (RigL: 100).
        drop_fraction: ``α``, the initial fraction replaced per update (RigL: 0.3).
        end_fraction: ``T_end`` as a fraction of training (RigL: 0.75).
        topkast_backward: Top-KAST's backward density as a multiple of its forward density.
        topkast_penalty: coefficient of Top-KAST's exploration penalty in the loss.
        widths: width multipliers of the "bigger sparse network" experiment.
        cifar_epochs: ResNet-20 training on CIFAR-10 (0: skip, as the offline profiles do).
        cifar_seeds: independent CIFAR-10 runs per configuration.
    """

    dataset: str
    train_limit: int | None
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    sparsities: tuple[float, ...]
    seeds: int
    every: int
    drop_fraction: float
    end_fraction: float
    topkast_backward: float
    topkast_penalty: float
    widths: tuple[float, ...]
    cifar_epochs: int
    cifar_seeds: int


@dataclass(frozen=True)
class PowerpropSizes:
    """Sizes for the chapter "Powerpropagation" (LeNet-300-100 on MNIST, continual learning).

    Attributes:
        dataset: ``"mnist5k"`` or ``"mnist"``.
        train_limit: keep only this many training examples (``None``: all).
        epochs: training epochs of every run (SGD, as in the paper's MNIST notebook).
        batch_size: examples per optimizer step (the notebook: 60).
        lr: SGD learning rate (the notebook: 0.1, no momentum).
        alphas: the exponents ``α`` compared (1 = no Powerprop).
        seeds: independent runs per configuration (for error bars).
        prune_points: geometric densities from 1% to 100% in the one-shot pruning curves.
        adam_lr: learning rate of the plain-Adam vs optimiser-aware-Adam experiment.
        sparsities: sparsities of the iterative-pruning and Top-KAST comparisons.
        iterative_rounds: pruning rounds of iterative pruning.
        finetune_epochs: retraining after each pruning round.
        topkast_backward: Top-KAST's backward density as a multiple of its forward density.
        topkast_penalty: coefficient of Top-KAST's exploration penalty.
        cl_tasks: permuted-MNIST tasks of the continual-learning experiment.
        cl_fraction: fraction of each layer's weights a task keeps.
        cl_epochs: training epochs per task.
        cl_retrain_epochs: retraining of a task's own weights after they are assigned.
        cl_alpha: the Powerprop exponent of the continual-learning experiment.
    """

    dataset: str
    train_limit: int | None
    epochs: int
    batch_size: int
    lr: float
    alphas: tuple[float, ...]
    seeds: int
    prune_points: int
    adam_lr: float
    sparsities: tuple[float, ...]
    iterative_rounds: int
    finetune_epochs: int
    topkast_backward: float
    topkast_penalty: float
    cl_tasks: int
    cl_fraction: float
    cl_epochs: int
    cl_retrain_epochs: int
    cl_alpha: float


@dataclass(frozen=True)
class LowRankSizes:
    """Sizes for the chapter "Low-rank training" (DLRT on an MLP and on LeNet5, MNIST).

    Attributes:
        dataset: ``"mnist5k"`` or ``"mnist"``.
        train_limit: keep only this many training examples (``None``: all).
        epochs: training epochs of every LeNet5 run from scratch (dense and DLRT alike).
        batch_size: examples per optimizer step.
        lr: ``λ``, the step size of SGD (dense runs) and of DLRT's K-, L- and S-steps.
        init_rank: the rank at which DLRT's LeNet5 layers start (capped at each layer's
            ``min(n, m)``); the tolerance ``ϑ`` adapts it from there.
        tols: the tolerances ``ϑ`` of the LeNet5 table (the paper: 0.09 to 0.45; must hold 0.2).
        seeds: independent LeNet5 runs per configuration (for error bars).
        mlp_hidden: hidden widths of the fully connected network (all hidden layers low rank).
        mlp_epochs: training epochs of every fully connected run.
        mlp_init_rank: the rank at which the fully connected network's DLRT layers start.
        mlp_low_start: a small initial rank, to see whether DLRT's rank grows from below.
        mlp_tols: the tolerances ``ϑ`` of the fully connected experiment.
        mlp_seeds: independent fully connected runs per configuration (for error bars).
        baseline_tols: the ``ϑ`` whose DLRT ranks the baselines (SVD truncation of the dense
            LeNet5, with and without fine-tuning; fixed rank from scratch) use.
        finetune_epochs: fixed-rank DLRT fine-tuning after SVD truncation.
        finetune_lr: the step size of that fine-tuning (smaller than ``lr``: the truncated network
            is already trained).
        bench_widths: widths of ``python -m lowlearn.bench lowrank`` shown in the chapter
            (``()``: skip it).
    """

    dataset: str
    train_limit: int | None
    epochs: int
    batch_size: int
    lr: float
    init_rank: int
    tols: tuple[float, ...]
    seeds: int
    mlp_hidden: tuple[int, ...]
    mlp_epochs: int
    mlp_init_rank: int
    mlp_low_start: int
    mlp_tols: tuple[float, ...]
    mlp_seeds: int
    baseline_tols: tuple[float, ...]
    finetune_epochs: int
    finetune_lr: float
    bench_widths: tuple[int, ...]


@dataclass(frozen=True)
class MetaSizes:
    """Sizes for the chapter "Learning to learn" (MAML on the sinusoid regression tasks).

    Attributes:
        sinusoid_meta_steps: meta-training steps of MAML (Finn et al. 2017: 70,000).
        sinusoid_meta_batch: tasks per meta-step (the paper: 25).
        sinusoid_shots: ``K``, support points per task, in meta-training and meta-test (the paper: 5 and 10).
        sinusoid_queries: query points per task during meta-training.
        inner_lr: ``α``, the step size of the inner SGD steps, in meta-training and when
            adapting at meta-test (the paper: 0.01).
        inner_steps: inner steps during meta-training (the paper: 1).
        meta_lr: ``β``, the Adam learning rate of the meta-update (and of the pre-training baseline).
        eval_steps: the numbers of adaptation steps at which the test tasks are scored.
        test_tasks: meta-test tasks (never seen in training), scored for every method.
        test_queries: query points per test task.
        pretrain_steps: Adam steps of the "pre-trained on all tasks" baseline, on
            batches of ``sinusoid_meta_batch * (sinusoid_shots + sinusoid_queries)`` pooled points.
        seeds: independent meta-training runs (and pre-training runs), for error bars across seeds.

    The chapter "Optimisation-based meta-learning" (Omniglot, learned optimisers, costs):

    Attributes:
        omniglot_split: ``"small"``: meta-train on ``small1`` with rotations, meta-test on
            ``small2`` without the alphabets it shares with ``small1`` (offline); ``"standard"``:
            Finn et al.'s split of all 1,623 characters (``omniglot_train_characters`` for
            meta-training, with rotations, the rest for meta-test).
        omniglot_train_characters: characters of the standard split's meta-training set (the paper: 1,200).
        omniglot_hidden: channels of every Conv4 layer (the paper: 64).
        omniglot_settings: ``(N, K)`` pairs meta-trained with second-order MAML (the paper:
            5-way and 20-way, 1- and 5-shot).
        omniglot_meta_steps: meta-steps for each of ``omniglot_settings`` (the paper: 60,000).
        omniglot_meta_batch: tasks per meta-step for 5-way and for 20-way (the paper: 32 and 16).
        omniglot_inner_lr: ``α`` for 5-way and 20-way (the paper: 0.4 and 0.1).
        omniglot_inner_steps: inner steps in meta-training for 5-way and 20-way (the paper: 1 and 5).
        omniglot_test_steps: adaptation steps at meta-test (Finn et al.'s code: 10; their appendix
            gives 3 for 5-way and 5 for 20-way).
        omniglot_queries: query examples per class in meta-training (the paper: ``K``; the cost of
            a meta-step grows with it).
        omniglot_test_queries: query examples per class of a meta-test episode.
        omniglot_test_episodes: meta-test episodes of 5-way 1-shot, for the 95% intervals (the paper:
            600); an N-way K-shot setting uses ``5 / (N K)`` times as many (at least 10, see
            :meth:`test_episodes`): adapting to its larger support set costs that much more.
        omniglot_meta_lr: ``β``, the Adam rate of the meta-update (the paper: 0.001).
        omniglot_tasks_at_once: tasks that MAML, its variants and Reptile adapt together
            (:class:`lowlearn.meta.maml.MAML`'s ``tasks_at_once``): the same results, fewer and
            larger kernels (for a GPU), memory for that many tasks.
        variant_meta_steps: meta-steps of first-order MAML, ANIL, Meta-SGD and Reptile on
            5-way 1-shot (best equal to MAML's 5-way 1-shot steps, whose run is then reused).
        reptile_inner_steps: Reptile's SGD steps per task (Nichol et al.'s Omniglot runs take Adam
            steps: 5 for 5-way 5-shot, 12 for 5-way 1-shot and 20-way, 3 transductive).
        reptile_outer_lr: Reptile's ``ε`` at the start, annealed linearly to 0 (the paper: 1).
        pretrain_epochs: epochs of the "no meta-learning" baseline, a Conv4 trained by ordinary
            supervised learning on all meta-training characters.
        sweep_inner_lrs: the inner learning rates ``α`` of the sensitivity sweep (5-way 1-shot).
        sweep_meta_steps: meta-steps of each run of the sweep.
        cost_inner_steps: inner-step counts at which the time and memory of a meta-step are measured.
        cost_repeats: meta-steps timed per point (the median is shown).
        l2l_quadratic_problems: random 10-dimensional quadratics the LSTM optimiser is meta-trained
            on (Andrychowicz et al. 2016 train until the validation loss stops improving).
        l2l_mnist_problems: MNIST networks (one hidden layer of 20 sigmoid units) it is
            meta-trained on.
        l2l_horizon: optimisation steps per problem (the paper: 100).
        l2l_truncation: steps between meta-updates, truncated backpropagation (the paper: 20).
        l2l_test_problems: test problems of each kind, for the error bands.
        l2l_lrs: the learning rates tried for the hand-designed optimisers (the best one is shown).
    """

    sinusoid_meta_steps: int
    sinusoid_meta_batch: int
    sinusoid_shots: int
    sinusoid_queries: int
    inner_lr: float
    inner_steps: int
    meta_lr: float
    eval_steps: tuple[int, ...]
    test_tasks: int
    test_queries: int
    pretrain_steps: int
    seeds: int
    omniglot_split: str
    omniglot_train_characters: int
    omniglot_hidden: int
    omniglot_settings: tuple[tuple[int, int], ...]
    omniglot_meta_steps: tuple[int, ...]
    omniglot_meta_batch: tuple[int, int]
    omniglot_inner_lr: tuple[float, float]
    omniglot_inner_steps: tuple[int, int]
    omniglot_test_steps: int
    omniglot_queries: int
    omniglot_test_queries: int
    omniglot_test_episodes: int
    omniglot_meta_lr: float
    omniglot_tasks_at_once: int
    variant_meta_steps: int
    reptile_inner_steps: int
    reptile_outer_lr: float
    pretrain_epochs: int
    sweep_inner_lrs: tuple[float, ...]
    sweep_meta_steps: int
    cost_inner_steps: tuple[int, ...]
    cost_repeats: int
    l2l_quadratic_problems: int
    l2l_mnist_problems: int
    l2l_horizon: int
    l2l_truncation: int
    l2l_test_problems: int
    l2l_lrs: tuple[float, ...]

    def test_episodes(self, ways: int, shots: int) -> int:
        """Meta-test episodes of an N-way K-shot setting: ``5 / (N K)`` times ``omniglot_test_episodes``, at least 10.

        (All of ``omniglot_test_episodes`` where that is fewer than 10.)

        Raises:
            ValueError: ``ways`` or ``shots`` is not an int of at least 1.
        """
        check_count("ways", ways, 1)
        check_count("shots", shots, 1)
        base = self.omniglot_test_episodes
        return max(min(10, base), base * 5 // (ways * shots))


@dataclass(frozen=True)
class BlackBoxSizes:
    """Sizes for the chapter "Black-box and metric-based meta-learning" and ``python -m lowlearn.eval``.

    Attributes:
        image_size: side of the Omniglot images (Snell et al. and Vinyals et al.: 28).
        hidden: channels of every Conv4 layer (the papers: 64).
        rotations: add each training character rotated by 90, 180 and 270 degrees as new classes.
        within_alphabet: draw every training episode's classes from one alphabet.
        train_ways: classes per training episode (Snell et al.: 60 on Omniglot).
        train_shots: support examples per class in training episodes (Snell et al.: as at test).
        train_queries: query examples per class in training episodes (Snell et al.: 5).
        meta_steps: meta-training steps (one episode each) of ProtoNet and Matching Networks.
        lr: Adam's initial learning rate, annealed to zero over the meta-steps by a cosine (Snell et al.:
            0.001, halved every 2,000 episodes).
        augment: random affine distortion of every training image (:func:`lowlearn.data.augment.random_affine`).
        refine_steps: ProtoNet's transductive soft k-means steps (Ren et al. 2018), in every forward pass,
            training included.
        test_shift: pixels of the shifted copies averaged at test time (0: none; see
            :class:`lowlearn.meta.metric.EpisodicLearner`).
        test_rotations: also compare the images in their four 90° rotations at test time, an ensemble
            of four comparisons (see :class:`lowlearn.meta.metric.EpisodicLearner`).
        eval_batch_size: images per pass of the metric learners' embedding at test time (``None``:
            all of an evaluation batch at once, best on a GPU; on a CPU, 64 runs several times faster).
        channels_last: store the metric learners' Conv4 weights in the channels-last memory layout, in
            which a CPU's convolutions run faster (with two threads, about 1.4 times for training and
            evaluation); the same function, up to rounding.
        matching_scale: Matching Networks' multiplier of the cosine similarities.
        test_episodes: meta-test episodes per setting (for the 95% intervals).
        maml_inner_lr: MAML's inner learning rate on 20-way episodes (Finn et al.: 0.1).
        maml_inner_steps: MAML's inner steps in meta-training (Finn et al.: 5 for 20-way).
        maml_first_order: first-order MAML instead of second order (Finn et al.: second order).
        maml_meta_batch: tasks per MAML meta-step (the paper: 16 for 20-way).
        maml_tasks_at_once: tasks MAML adapts together (``MAML(tasks_at_once=...)``: the
            same meta-gradient, fewer and larger kernels, memory for that many tasks).
        maml_queries: query examples per class in MAML's training episodes.
        maml_steps: MAML meta-steps.
        maml_test_steps: MAML's adaptation steps at test time (Finn et al.'s code: 10; their appendix
            gives 5 for 20-way).
        maml_test_episodes: MAML's meta-test episodes per setting (it adapts by gradient steps on each,
            so it gets fewer than ``test_episodes``; the papers: 600 or more).
        cnp_hidden: width of the CNP's layers and of its representation ``r`` (Garnelo et al.: 128).
        cnp_lr: Adam's learning rate for the CNPs (the authors' code: 1e-4).
        cnp_steps: training steps of the CNP on GP curves (the authors' code: 200,000).
        cnp_batch: GP curves per training step (the authors' code: 64).
        cnp_points: points per training curve, all of them targets.
        cnp_context: ``(low, high)`` range of the number of context points of a training curve, drawn
            uniformly per step (the authors' code: 3 to 9, and 2 to 9 more points as targets only).
        cnp_test_curves: GP curves per evaluation (for the 95% intervals).
        cnp_seeds: CNPs trained with different seeds in the length-scale experiment.
        image_steps: training steps of the image-completion CNP on MNIST digits.
        image_batch: digits per image-completion step.
        image_context: the largest number of observed pixels of a training digit (at least 1, drawn
            uniformly; Garnelo et al. show 1 to all 784).
        image_targets: target pixels per training digit (a random subset; the paper: all 784).
    """

    image_size: int
    hidden: int
    rotations: bool
    within_alphabet: bool
    train_ways: int
    train_shots: int
    train_queries: int
    meta_steps: int
    lr: float
    augment: bool
    refine_steps: int
    test_shift: int
    test_rotations: bool
    eval_batch_size: int | None
    channels_last: bool
    matching_scale: float
    test_episodes: int
    maml_inner_lr: float
    maml_inner_steps: int
    maml_first_order: bool
    maml_meta_batch: int
    maml_tasks_at_once: int
    maml_queries: int
    maml_steps: int
    maml_test_steps: int
    maml_test_episodes: int
    cnp_hidden: int
    cnp_lr: float
    cnp_steps: int
    cnp_batch: int
    cnp_points: int
    cnp_context: tuple[int, int]
    cnp_test_curves: int
    cnp_seeds: int
    image_steps: int
    image_batch: int
    image_context: int
    image_targets: int


@dataclass(frozen=True)
class FastSparseSizes:
    """Sizes for the chapter "From FLOPs to wall-clock" (:mod:`lowlearn.sparse.export` and its benchmark).

    Attributes:
        features: side of the square Linear layer timed at every density (the goal: 4096).
        batch_size: inputs per call in the density sweep (the goal: 64).
        densities: fractions of weights kept in the density sweep.
        batch_sweep: batch sizes of the CSR sweep at 95% sparsity.
        iterations: calls per timed block.
        repeats: interleaved timed blocks per variant (the median is shown).
        mnist_epochs: epochs of the dense LeNet-300-100 on MNIST-5k that is pruned and exported.
        mnist_densities: weight densities of its unstructured (global magnitude) pruning.
        neuron_densities: fractions of hidden neurons kept by its structured pruning.
        finetune_epochs: epochs of fine-tuning after each pruning.
    """

    features: int
    batch_size: int
    densities: tuple[float, ...]
    batch_sweep: tuple[int, ...]
    iterations: int
    repeats: int
    mnist_epochs: int
    mnist_densities: tuple[float, ...]
    neuron_densities: tuple[float, ...]
    finetune_epochs: int


@dataclass(frozen=True)
class GrowingSizes:
    """Sizes for the chapter "Growing networks" (GradMax's student–teacher MLP, MNIST).

    The student–teacher values follow the GradMax authors' notebook (Evci et al.,
    2022, "GradMax: growing neural networks using gradient information", ICLR;
    google-research/growneuron, ``Student_Teacher.ipynb``).

    Attributes:
        teacher_inputs: inputs of the random teacher MLP (the notebook: 10).
        teacher_hidden: the teacher's hidden width, which the student grows to (the notebook: 10).
        teacher_outputs: outputs of the teacher (the notebook: 10).
        student_hidden: the student's starting width (the notebook: 5, half the teacher's).
        teacher_samples: the fixed training inputs, ``x ~ N(0, I)`` (the notebook: 1,000).
        st_lr: full-batch SGD learning rate of the students (the notebook: 0.1).
        st_every: steps between growths of one unit each; the first is at this step
            (the notebook: 200).
        st_final_steps: training steps after the last growth (the notebook: 500).
        st_seeds: students per strategy (the paper: 10; its notebook: 3).
        dataset: ``"mnist5k"`` or ``"mnist"``.
        train_limit: keep only this many training examples (``None``: all).
        mnist_start: hidden width the grown one-hidden-layer MLP starts with (and the small baseline's).
        mnist_target: its final width (and the big baseline's).
        mnist_k: units per growth (GradMax adds at most 9 useful ones: the 10 classes' cross-entropy errors sum to 0).
        mnist_every: optimizer steps between growths; the first is at this step.
        epochs: training epochs of every MNIST run.
        batch_size: examples per optimizer step.
        lr: SGD learning rate.
        momentum: SGD momentum.
        gradmax_batch: examples in the batch GradMax measures the gradient on.
        seeds: independent MNIST runs per configuration (for error bars).
    """

    teacher_inputs: int
    teacher_hidden: int
    teacher_outputs: int
    student_hidden: int
    teacher_samples: int
    st_lr: float
    st_every: int
    st_final_steps: int
    st_seeds: int
    dataset: str
    train_limit: int | None
    mnist_start: int
    mnist_target: int
    mnist_k: int
    mnist_every: int
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    gradmax_batch: int
    seeds: int


@dataclass(frozen=True)
class LookingForwardSizes:
    """Sizes for the chapter "Looking forward" (hand-designed efficient CNNs against learned sparsity, MNIST).

    Every network is a :class:`lowlearn.models.SmallCNN`; the sparse ones are its
    standard version at the parameter count of the depthwise separable one.

    Attributes:
        dataset: ``"mnist5k"`` or ``"mnist"``.
        train_limit: keep only this many training examples (``None``: all).
        channels: channels of the stem and of each block of :class:`~lowlearn.models.SmallCNN`.
        blocks: the hand-designed blocks compared with the standard 3×3 convolution
            (``"separable"``: MobileNet v1, required; ``"bottleneck"``: ResNet; ``"inverted"``: MobileNetV2).
        expansion: ``t`` of the inverted residual blocks (MobileNetV2: 6).
        reduction: channel reduction of the bottleneck blocks (ResNet: 4).
        epochs: training epochs of every run (dense, sparse and hand-designed alike).
        batch_size: examples per optimizer step.
        lr: SGD learning rate at the start, annealed to 0 with a cosine over the run.
        momentum: SGD momentum (Nesterov).
        seeds: independent runs per network (for the 95% intervals).
        every: ``ΔT`` of RigL, steps between mask updates.
        drop_fraction: ``α`` of RigL, the fraction replaced at the first update.
        end_fraction: the last mask update of RigL, and the last pruning of gradual
            magnitude pruning, as a fraction of training.
        prune_begin_fraction: gradual magnitude pruning starts at this fraction of training.
        prune_every: steps between two prunings of gradual magnitude pruning.
        timing_batch: test images per timed forward pass.
        timing_repeats: interleaved timing rounds (the median is shown).
        min_accuracy: the test accuracy the chapter asserts the standard CNN reaches.
    """

    dataset: str
    train_limit: int | None
    channels: tuple[int, ...]
    blocks: tuple[str, ...]
    expansion: int
    reduction: int
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    seeds: int
    every: int
    drop_fraction: float
    end_fraction: float
    prune_begin_fraction: float
    prune_every: int
    timing_batch: int
    timing_repeats: int
    min_accuracy: float


@dataclass(frozen=True)
class Profile:
    """All experiment sizes of one profile, one field per chapter."""

    name: str
    budget: BudgetSizes
    pruning: PruningSizes
    lottery: LotterySizes
    dst: DSTSizes
    powerprop: PowerpropSizes
    lowrank: LowRankSizes
    fast_sparse: FastSparseSizes
    meta: MetaSizes
    black_box: BlackBoxSizes
    growing: GrowingSizes
    looking_forward: LookingForwardSizes


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        budget=BudgetSizes(dataset="mnist5k", train_limit=1000, epochs=3, batch_size=60, lr=0.05, momentum=0.9,
                           widths=(0.25, 1.0), data_sizes=(250, 1000), seeds=2, min_accuracy=0.6),
        pruning=PruningSizes(dataset="mnist5k", train_limit=1000, epochs=2, finetune_epochs=1, batch_size=60,
                             lr=0.05, momentum=0.9, sparsities=(0.5, 0.95), seeds=1, iterative_rounds=2,
                             score_batch=100, obd_samples=4, init_sparsities=(0.99, 0.999),
                             synflow_rounds=10, init_epochs=2, cifar_epochs=0),
        lottery=LotterySizes(dataset="mnist5k", train_limit=1000, steps=60, eval_every=20, batch_size=60,
                             lr=1.2e-3, rounds=2, seeds=1, controls=("reinit",), mnist1d_samples=1000,
                             mnist1d_steps=60, mnist1d_rounds=2),
        dst=DSTSizes(dataset="mnist5k", train_limit=1000, epochs=2, batch_size=60, lr=0.05, momentum=0.9,
                     sparsities=(0.8, 0.9), seeds=1, every=5, drop_fraction=0.3, end_fraction=0.75,
                     topkast_backward=2.0, topkast_penalty=1e-5, widths=(1.0, 2.0), cifar_epochs=0,
                     cifar_seeds=1),
        powerprop=PowerpropSizes(dataset="mnist5k", train_limit=1000, epochs=2, batch_size=60, lr=0.1,
                                 alphas=(1.0, 3.0), seeds=1, prune_points=5, adam_lr=1e-3, sparsities=(0.9,),
                                 iterative_rounds=2, finetune_epochs=1, topkast_backward=2.0,
                                 topkast_penalty=1e-5, cl_tasks=2, cl_fraction=0.1, cl_epochs=1,
                                 cl_retrain_epochs=1, cl_alpha=3.0),
        lowrank=LowRankSizes(dataset="mnist5k", train_limit=500, epochs=1, batch_size=64, lr=0.2, init_rank=8,
                             tols=(0.2, 0.45), seeds=1, mlp_hidden=(500, 500), mlp_epochs=1, mlp_init_rank=16,
                             mlp_low_start=4, mlp_tols=(0.2,), mlp_seeds=1, baseline_tols=(0.2,), finetune_epochs=1,
                             finetune_lr=0.05, bench_widths=()),
        fast_sparse=FastSparseSizes(features=256, batch_size=16, densities=(0.5, 0.05), batch_sweep=(1, 16),
                                    iterations=1, repeats=1, mnist_epochs=1, mnist_densities=(0.1,),
                                    neuron_densities=(0.5,), finetune_epochs=1),
        meta=MetaSizes(sinusoid_meta_steps=30, sinusoid_meta_batch=5, sinusoid_shots=5, sinusoid_queries=5,
                       inner_lr=0.01, inner_steps=1, meta_lr=1e-3, eval_steps=(0, 1, 5, 10), test_tasks=10,
                       test_queries=20, pretrain_steps=30, seeds=1,
                       omniglot_split="small", omniglot_train_characters=1200, omniglot_hidden=8,
                       omniglot_settings=((5, 1), (5, 5), (20, 1), (20, 5)), omniglot_meta_steps=(3, 2, 2, 2),
                       omniglot_meta_batch=(2, 2), omniglot_inner_lr=(0.4, 0.1), omniglot_inner_steps=(1, 2),
                       omniglot_test_steps=3, omniglot_queries=2, omniglot_test_queries=2, omniglot_test_episodes=6,
                       omniglot_meta_lr=1e-3, omniglot_tasks_at_once=2, variant_meta_steps=3, reptile_inner_steps=2,
                       reptile_outer_lr=1.0,
                       pretrain_epochs=1, sweep_inner_lrs=(0.1, 0.4), sweep_meta_steps=2, cost_inner_steps=(1, 2),
                       cost_repeats=1, l2l_quadratic_problems=4, l2l_mnist_problems=1, l2l_horizon=20,
                       l2l_truncation=10, l2l_test_problems=2, l2l_lrs=(0.01, 0.1)),
        black_box=BlackBoxSizes(image_size=28, hidden=16, rotations=True, within_alphabet=True, train_ways=10,
                                train_shots=1, train_queries=2, meta_steps=10, lr=1e-3, augment=True, refine_steps=1,
                                test_shift=1, test_rotations=True, eval_batch_size=16, channels_last=True,
                                matching_scale=10.0, test_episodes=20, maml_inner_lr=0.1, maml_inner_steps=1,
                                maml_first_order=True, maml_meta_batch=2, maml_tasks_at_once=2, maml_queries=1,
                                maml_steps=5, maml_test_steps=2, maml_test_episodes=10, cnp_hidden=16, cnp_lr=1e-3,
                                cnp_steps=20, cnp_batch=4, cnp_points=20, cnp_context=(1, 10), cnp_test_curves=8,
                                cnp_seeds=1, image_steps=10, image_batch=4, image_context=50, image_targets=50),
        growing=GrowingSizes(teacher_inputs=10, teacher_hidden=10, teacher_outputs=10, student_hidden=5,
                             teacher_samples=200, st_lr=0.1, st_every=10, st_final_steps=20, st_seeds=2,
                             dataset="mnist5k", train_limit=500, mnist_start=4, mnist_target=12, mnist_k=4,
                             mnist_every=5, epochs=2, batch_size=60, lr=0.05, momentum=0.9, gradmax_batch=100,
                             seeds=1),
        looking_forward=LookingForwardSizes(dataset="mnist5k", train_limit=1000, channels=(8, 16, 32, 64),
                                            blocks=("separable", "bottleneck", "inverted"), expansion=2,
                                            reduction=4, epochs=2, batch_size=32, lr=0.05, momentum=0.9, seeds=2,
                                            every=2, drop_fraction=0.3, end_fraction=0.75,
                                            prune_begin_fraction=0.1, prune_every=1, timing_batch=32,
                                            timing_repeats=2, min_accuracy=0.5),
    ),
    "cpu": Profile(
        name="cpu",
        budget=BudgetSizes(dataset="mnist5k", train_limit=None, epochs=30, batch_size=60, lr=0.05, momentum=0.9,
                           widths=(1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0),
                           data_sizes=(125, 250, 500, 1000, 2000, 4000), seeds=5, min_accuracy=0.92),
        pruning=PruningSizes(dataset="mnist5k", train_limit=None, epochs=20, finetune_epochs=10, batch_size=60,
                             lr=0.05, momentum=0.9, sparsities=(0.5, 0.8, 0.9, 0.95, 0.98, 0.99), seeds=3,
                             iterative_rounds=5, score_batch=500, obd_samples=32,
                             init_sparsities=(0.99, 0.997, 0.999), synflow_rounds=100, init_epochs=20,
                             cifar_epochs=0),
        lottery=LotterySizes(dataset="mnist5k", train_limit=None, steps=600, eval_every=50, batch_size=60,
                             lr=1.2e-3, rounds=14, seeds=2, controls=("reinit", "reshuffle", "constant", "random_mask"),
                             mnist1d_samples=5000, mnist1d_steps=1000, mnist1d_rounds=12),
        dst=DSTSizes(dataset="mnist5k", train_limit=None, epochs=20, batch_size=60, lr=0.05, momentum=0.9,
                     sparsities=(0.8, 0.9, 0.95), seeds=3, every=50, drop_fraction=0.3, end_fraction=0.75,
                     topkast_backward=2.0, topkast_penalty=1e-5, widths=(1.0, 2.0, 4.0), cifar_epochs=0,
                     cifar_seeds=1),
        powerprop=PowerpropSizes(dataset="mnist5k", train_limit=None, epochs=20, batch_size=60, lr=0.1,
                                 alphas=(1.0, 2.0, 3.0, 4.0, 5.0), seeds=3, prune_points=20, adam_lr=1e-3,
                                 sparsities=(0.8, 0.9, 0.95), iterative_rounds=3, finetune_epochs=3,
                                 topkast_backward=2.0, topkast_penalty=1e-5, cl_tasks=5, cl_fraction=0.02,
                                 cl_epochs=5, cl_retrain_epochs=1, cl_alpha=3.0),
        lowrank=LowRankSizes(dataset="mnist5k", train_limit=None, epochs=8, batch_size=64, lr=0.2, init_rank=32,
                             tols=(0.09, 0.15, 0.2, 0.3, 0.4, 0.45), seeds=1, mlp_hidden=(500, 500), mlp_epochs=12,
                             mlp_init_rank=64, mlp_low_start=8, mlp_tols=(0.1, 0.2), mlp_seeds=2,
                             baseline_tols=(0.2, 0.45), finetune_epochs=2, finetune_lr=0.05,
                             bench_widths=(256, 512, 1024, 2048)),
        fast_sparse=FastSparseSizes(features=4096, batch_size=64, densities=(0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01),
                                    batch_sweep=(1, 8, 64, 256, 1024), iterations=5, repeats=5, mnist_epochs=10,
                                    mnist_densities=(0.1, 0.05, 0.02), neuron_densities=(0.5, 0.25),
                                    finetune_epochs=3),
        meta=MetaSizes(sinusoid_meta_steps=6000, sinusoid_meta_batch=25, sinusoid_shots=5, sinusoid_queries=5,
                       inner_lr=0.01, inner_steps=1, meta_lr=1e-3, eval_steps=(0, 1, 2, 3, 4, 5, 7, 10),
                       test_tasks=200, test_queries=50, pretrain_steps=6000, seeds=1,
                       omniglot_split="small", omniglot_train_characters=1200, omniglot_hidden=32,
                       omniglot_settings=((5, 1), (5, 5), (20, 1), (20, 5)), omniglot_meta_steps=(300, 150, 100, 50),
                       omniglot_meta_batch=(8, 4), omniglot_inner_lr=(0.4, 0.1), omniglot_inner_steps=(1, 1),
                       omniglot_test_steps=10, omniglot_queries=5, omniglot_test_queries=10,
                       omniglot_test_episodes=100, omniglot_meta_lr=1e-3, omniglot_tasks_at_once=1,
                       variant_meta_steps=300,
                       reptile_inner_steps=5, reptile_outer_lr=1.0, pretrain_epochs=3,
                       sweep_inner_lrs=(0.04, 0.4, 2.0), sweep_meta_steps=40, cost_inner_steps=(1, 2, 5, 10),
                       cost_repeats=3, l2l_quadratic_problems=200, l2l_mnist_problems=10, l2l_horizon=100,
                       l2l_truncation=20, l2l_test_problems=10, l2l_lrs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)),
        black_box=BlackBoxSizes(image_size=28, hidden=64, rotations=True, within_alphabet=False, train_ways=20,
                                train_shots=1, train_queries=5, meta_steps=2500, lr=1e-3, augment=False,
                                refine_steps=2, test_shift=0, test_rotations=True, eval_batch_size=64,
                                channels_last=True,
                                matching_scale=10.0, test_episodes=200, maml_inner_lr=0.1,
                                maml_inner_steps=5, maml_first_order=False, maml_meta_batch=4, maml_tasks_at_once=1,
                                maml_queries=1,
                                maml_steps=100, maml_test_steps=10,
                                maml_test_episodes=40, cnp_hidden=128, cnp_lr=1e-3, cnp_steps=7000, cnp_batch=32,
                                cnp_points=50, cnp_context=(1, 30), cnp_test_curves=200, cnp_seeds=2, image_steps=10000,
                                image_batch=16, image_context=200, image_targets=200),
        growing=GrowingSizes(teacher_inputs=10, teacher_hidden=10, teacher_outputs=10, student_hidden=5,
                             teacher_samples=1000, st_lr=0.1, st_every=200, st_final_steps=500, st_seeds=10,
                             dataset="mnist5k", train_limit=None, mnist_start=8, mnist_target=64, mnist_k=8,
                             mnist_every=60, epochs=20, batch_size=60, lr=0.05, momentum=0.9, gradmax_batch=500,
                             seeds=3),
        looking_forward=LookingForwardSizes(dataset="mnist5k", train_limit=None, channels=(16, 32, 64, 128),
                                            blocks=("separable", "bottleneck", "inverted"), expansion=2,
                                            reduction=4, epochs=6, batch_size=64, lr=0.1, momentum=0.9, seeds=3,
                                            every=50, drop_fraction=0.3, end_fraction=0.75,
                                            prune_begin_fraction=0.1, prune_every=10, timing_batch=256,
                                            timing_repeats=5, min_accuracy=0.95),
    ),
    "gpu": Profile(
        name="gpu",
        budget=BudgetSizes(dataset="mnist", train_limit=None, epochs=20, batch_size=60, lr=0.05, momentum=0.9,
                           widths=(1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0),
                           data_sizes=(250, 1000, 4000, 15000, 60000), seeds=5, min_accuracy=0.975),
        pruning=PruningSizes(dataset="mnist", train_limit=None, epochs=20, finetune_epochs=5, batch_size=60,
                             lr=0.05, momentum=0.9, sparsities=(0.5, 0.8, 0.9, 0.95, 0.98, 0.99), seeds=3,
                             iterative_rounds=5, score_batch=1000, obd_samples=64,
                             init_sparsities=(0.99, 0.997, 0.999), synflow_rounds=100, init_epochs=5,
                             cifar_epochs=20),
        lottery=LotterySizes(dataset="mnist", train_limit=None, steps=5000, eval_every=250, batch_size=60,
                             lr=1.2e-3, rounds=15, seeds=2, controls=("reinit", "reshuffle", "constant", "random_mask"),
                             mnist1d_samples=10000, mnist1d_steps=5000, mnist1d_rounds=15),
        dst=DSTSizes(dataset="mnist", train_limit=None, epochs=10, batch_size=60, lr=0.05, momentum=0.9,
                     sparsities=(0.8, 0.9, 0.95), seeds=3, every=100, drop_fraction=0.3, end_fraction=0.75,
                     topkast_backward=2.0, topkast_penalty=1e-5, widths=(1.0, 2.0, 4.0), cifar_epochs=10,
                     cifar_seeds=2),
        powerprop=PowerpropSizes(dataset="mnist", train_limit=None, epochs=10, batch_size=60, lr=0.1,
                                 alphas=(1.0, 2.0, 3.0, 4.0, 5.0), seeds=3, prune_points=20, adam_lr=1e-3,
                                 sparsities=(0.8, 0.9, 0.95), iterative_rounds=3, finetune_epochs=2,
                                 topkast_backward=2.0, topkast_penalty=1e-5, cl_tasks=10, cl_fraction=0.02,
                                 cl_epochs=3, cl_retrain_epochs=1, cl_alpha=3.0),
        lowrank=LowRankSizes(dataset="mnist", train_limit=None, epochs=10, batch_size=64, lr=0.2, init_rank=64,
                             tols=(0.09, 0.11, 0.13, 0.15, 0.2, 0.3, 0.4, 0.45), seeds=1,
                             mlp_hidden=(500, 500), mlp_epochs=10,
                             mlp_init_rank=64, mlp_low_start=8, mlp_tols=(0.1, 0.2), mlp_seeds=2,
                             baseline_tols=(0.2, 0.45), finetune_epochs=2, finetune_lr=0.05,
                             bench_widths=(512, 1024, 2048, 4096)),
        fast_sparse=FastSparseSizes(features=8192, batch_size=256, densities=(0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01),
                                    batch_sweep=(1, 8, 64, 256, 1024, 4096), iterations=20, repeats=7,
                                    mnist_epochs=10, mnist_densities=(0.1, 0.05, 0.02),
                                    neuron_densities=(0.5, 0.25), finetune_epochs=3),
        meta=MetaSizes(sinusoid_meta_steps=15000, sinusoid_meta_batch=25, sinusoid_shots=5, sinusoid_queries=5,
                       inner_lr=0.01, inner_steps=1, meta_lr=1e-3, eval_steps=(0, 1, 2, 3, 4, 5, 7, 10),
                       test_tasks=600, test_queries=50, pretrain_steps=15000, seeds=2,
                       omniglot_split="standard", omniglot_train_characters=1200, omniglot_hidden=64,
                       omniglot_settings=((5, 1), (5, 5), (20, 1), (20, 5)),
                       omniglot_meta_steps=(2000, 1500, 1000, 800),
                       omniglot_meta_batch=(32, 16), omniglot_inner_lr=(0.4, 0.1), omniglot_inner_steps=(1, 5),
                       omniglot_test_steps=10, omniglot_queries=5, omniglot_test_queries=10,
                       omniglot_test_episodes=600, omniglot_meta_lr=1e-3, omniglot_tasks_at_once=32,
                       variant_meta_steps=2000,
                       reptile_inner_steps=5, reptile_outer_lr=1.0, pretrain_epochs=10,
                       sweep_inner_lrs=(0.04, 0.1, 0.4, 1.0, 2.0), sweep_meta_steps=500,
                       cost_inner_steps=(1, 2, 5, 10, 20), cost_repeats=5, l2l_quadratic_problems=1000,
                       l2l_mnist_problems=100, l2l_horizon=100, l2l_truncation=20, l2l_test_problems=20,
                       l2l_lrs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)),
        black_box=BlackBoxSizes(image_size=28, hidden=64, rotations=True, within_alphabet=False, train_ways=60,
                                train_shots=1, train_queries=5, meta_steps=20000, lr=1e-3, augment=False,
                                refine_steps=1, test_shift=1, test_rotations=False, eval_batch_size=None,
                                channels_last=False,
                                matching_scale=10.0, test_episodes=2000, maml_inner_lr=0.1,
                                maml_inner_steps=5, maml_first_order=False, maml_meta_batch=16, maml_tasks_at_once=16,
                                maml_queries=1,
                                maml_steps=10000, maml_test_steps=10,
                                maml_test_episodes=600, cnp_hidden=128, cnp_lr=1e-4, cnp_steps=100000, cnp_batch=64,
                                cnp_points=100, cnp_context=(1, 50), cnp_test_curves=1000, cnp_seeds=5,
                                image_steps=50000, image_batch=64, image_context=400, image_targets=400),
        growing=GrowingSizes(teacher_inputs=10, teacher_hidden=10, teacher_outputs=10, student_hidden=5,
                             teacher_samples=1000, st_lr=0.1, st_every=200, st_final_steps=500, st_seeds=10,
                             dataset="mnist", train_limit=None, mnist_start=8, mnist_target=128, mnist_k=8,
                             mnist_every=300, epochs=10, batch_size=60, lr=0.05, momentum=0.9,
                             gradmax_batch=1000, seeds=3),
        looking_forward=LookingForwardSizes(dataset="mnist", train_limit=None, channels=(32, 64, 128, 256),
                                            blocks=("separable", "bottleneck", "inverted"), expansion=2,
                                            reduction=4, epochs=10, batch_size=128, lr=0.1, momentum=0.9, seeds=3,
                                            every=100, drop_fraction=0.3, end_fraction=0.75,
                                            prune_begin_fraction=0.1, prune_every=50, timing_batch=256,
                                            timing_repeats=7, min_accuracy=0.98),
    ),
}


def default_profile_name() -> str:
    """``"gpu"`` when a CUDA device is available, else ``"cpu"``."""
    return "gpu" if torch.cuda.is_available() else "cpu"


def get_profile(name: str | None = None) -> Profile:
    """Return the experiment sizes of a profile.

    Args:
        name: ``"smoke"``, ``"cpu"`` or ``"gpu"``. ``None`` reads the environment
            variable ``LOWLEARN_PROFILE`` and falls back to
            :func:`default_profile_name`.

    Raises:
        ValueError: the name (or ``LOWLEARN_PROFILE``) is not a known profile; the
            message says where the name came from.
        TypeError: ``name`` is neither a string nor ``None``.
    """
    known = ", ".join(sorted(PROFILES))
    from_env = name is None
    if from_env:
        name = os.environ.get(ENV_VAR, "").strip() or default_profile_name()
    elif not isinstance(name, str):
        raise TypeError(f"a profile is chosen by its name ({known}), not a {type(name).__name__}")
    key = name.strip().lower()
    if key not in PROFILES:
        if from_env:
            raise ValueError(f"unknown experiment profile {name!r} in {ENV_VAR}; set it to one of {known}, "
                             f"or unset it for the default ({default_profile_name()} on this machine)")
        raise ValueError(f"unknown experiment profile {name!r}; choose one of {known}")
    return PROFILES[key]


def device_description(device: torch.device | str | None = None) -> str:
    """The device that makes the results: ``"cuda (<GPU name>)"`` or ``"cpu (<n> threads)"``.

    ``device`` defaults to the machine's default device (:func:`lowlearn.train.default_device`).

    Raises:
        ValueError: a device this machine lacks (:func:`lowlearn.train.available_device`).
    """
    device = available_device(device) if device is not None else default_device()
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type != "cpu":
        return device.type
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'' if threads == 1 else 's'})"


def banner(profile: Profile | None = None, device: torch.device | str | None = None) -> str:
    """One line that says which profile and device make a chapter's results.

    Chapters print it first, so every printed number can be traced to its setting.
    ``device`` is the one the chapter computes on (default: the machine's default
    device); a chapter that keeps to the CPU on a machine with a GPU passes it.
    """
    profile = profile or get_profile()
    return f"profile: {profile.name} | device: {device_description(device)} | torch {torch.__version__}"

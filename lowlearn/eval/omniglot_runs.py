"""The Omniglot one-shot classification runs of Lake et al. (2015), for a meta-trained learner.

``python -m lowlearn.eval omniglot-runs --method protonet --background small1,small2``
meta-trains a few-shot learner on an Omniglot background set (or loads it from a
checkpoint), classifies the 20 official runs (each 20-way one-shot within one
alphabet of the evaluation set, :func:`lowlearn.data.omniglot.load_omniglot_runs`)
and prints its error rate beside the published table (:data:`PUBLISHED`).

``--test heldout`` evaluates instead on episodes built like the runs (20-way,
one shot, one query per class, all classes of one alphabet) from the ``small2``
alphabets that the background set lacks: a development protocol that needs no
download. Only ``--background small1`` lacks any of them (Greek and Latin are in both
small sets, and both are parts of the full one); any other is a usage error.

The sizes (episode design, steps, learning rate, augmentation) are the
``black_box`` sizes of the experiment profile (:mod:`lowlearn.profiles`); the
options override the most common ones. ``--test-shift`` and ``--test-rotations``
choose a metric learner's test-time views (:class:`~lowlearn.meta.metric.EpisodicLearner`),
``--refine-steps`` ProtoNet's soft k-means steps (taken in training too); they apply to a
loaded checkpoint as well, since they change no weight.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from lowlearn import cli
from lowlearn.data.augment import random_affine
from lowlearn.data.episodes import Episode, EpisodeSampler
from lowlearn.data.cache import DataError
from lowlearn.data.omniglot import RUN_WAYS, Omniglot, OneShotRun, load_omniglot, load_omniglot_runs
from lowlearn.meta import MAML, MatchingNet, ProtoNet
from lowlearn.meta.episodic import episode_accuracies, meta_train
from lowlearn.models import Conv4
from lowlearn.profiles import BlackBoxSizes, banner, get_profile
from lowlearn.stats import mean_and_ci
from lowlearn.train import (CheckpointError, default_device, load_checkpoint, save_checkpoint, seed_everything,
                            seeded_generator, stream_seed)

METHODS = ("protonet", "matching", "maml")

BACKGROUNDS = {"small1": ("small1",), "small2": ("small2",), "small1,small2": ("small1", "small2"),
               "full": ("background",)}

PUBLISHED = {
    "full": [("People", 4.5), ("Bayesian Program Learning (BPL)", 3.3), ("Siamese convnet (Koch et al. 2015)", 8.0),
             ("Deep convnet", 13.5), ("Hierarchical deep", 34.8)],
    "small1": [("Bayesian Program Learning (BPL)", 4.3), ("Deep convnet", 24.0)],
    "small2": [("Bayesian Program Learning (BPL)", 4.0), ("Deep convnet", 22.3)],
}
"""Error rates (%) on the 20 runs, Lake, Salakhutdinov & Tenenbaum (2015), Science, the one-shot
classification results in the paper's main text: with the full background set, and with each
small background set alone (people have none). The paper does not name the two small sets; its
first and second numbers are paired with ``small1`` and ``small2`` in the dataset's order."""


def background(name: str, image_size: int, root: str | None = None) -> Omniglot:
    """The characters of a background choice: ``small1``, ``small2``, ``small1,small2`` or ``full``."""
    if name not in BACKGROUNDS:
        raise ValueError(f"unknown background {name!r}; choose one of {', '.join(BACKGROUNDS)}")
    return load_omniglot(BACKGROUNDS[name], root=root, image_size=image_size)


def make_learner(method: str, sizes: BlackBoxSizes) -> nn.Module:
    """A fresh learner: a Conv4 embedding for the metric learners, a 20-way Conv4 classifier for MAML.

    The metric learners' embedding is stored channels-last if ``sizes.channels_last``.
    """
    if method in ("protonet", "matching"):
        embedding = Conv4(num_classes=None, hidden=sizes.hidden, image_size=sizes.image_size)
        if sizes.channels_last:
            embedding = embedding.to(memory_format=torch.channels_last)
        views = dict(test_shift=sizes.test_shift, test_rotations=sizes.test_rotations,
                     eval_batch_size=sizes.eval_batch_size)
        if method == "protonet":
            return ProtoNet(embedding, refine_steps=sizes.refine_steps, **views)
        return MatchingNet(embedding, scale=sizes.matching_scale, **views)
    if method == "maml":
        model = Conv4(num_classes=RUN_WAYS, hidden=sizes.hidden, image_size=sizes.image_size, running_stats=False)
        return MAML(model, sizes.maml_inner_lr, sizes.maml_inner_steps, first_order=sizes.maml_first_order,
                    tasks_at_once=sizes.maml_tasks_at_once)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def meta_steps(method: str, sizes: BlackBoxSizes) -> int:
    """The meta-training steps of ``method`` in ``sizes``: ``maml_steps`` for MAML, ``meta_steps`` for the others."""
    return sizes.maml_steps if method == "maml" else sizes.meta_steps


def save_learner(path: Path, learner: nn.Module, **extra) -> Path:
    """Save ``learner`` (and ``extra``) to ``path``; returns where it went.

    If a file appeared at ``path`` meanwhile (a second run with the same ``--save``), that
    file is kept and the learner goes to the first free ``<stem>-<n><suffix>`` beside it.
    """
    candidate = path
    for n in itertools.count(1):
        try:
            return save_checkpoint(candidate, learner, **extra)
        except FileExistsError:
            candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")


def train(learner: nn.Module, method: str, data: Omniglot, sizes: BlackBoxSizes, device: torch.device,
          seed: int = 0) -> list[float]:
    """Meta-train ``learner`` on ``data`` with the profile's recipe; returns the logged losses.

    Adam's learning rate starts at ``sizes.lr`` and follows a cosine to zero over the meta-steps.
    """
    seed_everything(stream_seed(seed, "meta-training"))   # not the draws that made the learner's weights
    learner.to(device).train()
    if sizes.rotations:
        data = data.with_rotations()
    groups = data.alphabet_index.to(device) if sizes.within_alphabet else None
    if method == "maml":
        ways, shots, queries, batch = RUN_WAYS, 1, sizes.maml_queries, sizes.maml_meta_batch
    else:
        ways, shots, queries, batch = sizes.train_ways, sizes.train_shots, sizes.train_queries, 1
    steps = meta_steps(method, sizes)
    sampler = EpisodeSampler(data.images.to(device), ways, shots, queries, seed=seed, groups=groups)
    optimizer = torch.optim.Adam(learner.parameters(), lr=sizes.lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    transform = None
    if sizes.augment:
        generator = seeded_generator(seed, "augmentation", device)   # not the episodes' numbers again
        transform = lambda images: random_affine(images, generator)   # noqa: E731
    return meta_train(learner, sampler, optimizer, steps, batch=batch, transform=transform, scheduler=cosine)


def predict(learner: nn.Module, support: Tensor, support_labels: Tensor, query: Tensor,
            sizes: BlackBoxSizes) -> Tensor:
    """Predicted labels of one episode's queries (the learner in evaluation mode).

    MAML's network has a 20-way head (:data:`~lowlearn.data.omniglot.RUN_WAYS`); on an episode
    with fewer classes, its prediction is the best of the episode's classes ``0 .. N−1`` only
    (Finn et al. give each N-way setting its own N-way head, which also cannot answer another class).
    """
    if isinstance(learner, MAML):
        with torch.enable_grad():
            params = learner.adapt(support, support_labels, steps=sizes.maml_test_steps, first_order=True)
        with torch.no_grad():
            logits = learner(query, {name: p.detach() for name, p in params.items()})
            return logits[..., :int(support_labels.max()) + 1].argmax(-1)
    with torch.no_grad():
        return learner(support, support_labels, query).argmax(-1)


def run_errors(learner: nn.Module, runs: list[OneShotRun], sizes: BlackBoxSizes, device: torch.device) -> Tensor:
    """Error rate (%) on each run (:func:`lowlearn.data.omniglot.load_omniglot_runs`), the learner in eval mode."""
    learner.eval()
    errors = []
    for run in runs:
        predicted = predict(learner, run.support.to(device), run.support_labels.to(device), run.query.to(device),
                            sizes)
        errors.append(100 * (predicted != run.query_labels.to(device)).float().mean())
    return torch.stack(errors).cpu()


def held_out(trained_on: Omniglot, image_size: int, root: str | None = None) -> Omniglot:
    """The ``small2`` alphabets that ``trained_on`` lacks.

    Raises:
        ValueError: the background set holds every ``small2`` alphabet.
        DataError: the ``small2`` archive is missing or damaged (:func:`~lowlearn.data.omniglot.load_omniglot`).
    """
    small2 = load_omniglot("small2", root=root, image_size=image_size)
    unseen = sorted(set(small2.alphabets) - set(trained_on.alphabets))
    if not unseen:
        raise ValueError("the background set holds every small2 alphabet, so none is held out: use --background "
                         "small1 with --test heldout")
    return small2.subset(unseen)


def heldout_errors(learner: nn.Module, trained_on: Omniglot, sizes: BlackBoxSizes, device: torch.device,
                   episodes: int, root: str | None = None) -> Tensor:
    """Error rate (%) on run-like episodes from the ``small2`` alphabets that ``trained_on`` lacks.

    The episodes come from those of them that hold a 20-way episode (:func:`run_alphabets`):
    with ``small1`` as background, Japanese (katakana) and Sanskrit, not Tagalog (17 characters).

    Raises:
        ValueError: the background set holds every ``small2`` alphabet.
    """
    return episode_errors(learner, held_out(trained_on, sizes.image_size, root), sizes, device, episodes)


def task_accuracies(learner: nn.Module, tasks: Episode, sizes: BlackBoxSizes) -> Tensor:
    """Query accuracy ``(B,)`` of each of a batch of episodes, by :func:`predict` (one episode at a time)."""
    return torch.stack([(predict(learner, sx, sy, qx, sizes) == qy).float().mean()
                        for sx, sy, qx, qy in zip(tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)])


def run_alphabets(test: Omniglot) -> list[str]:
    """The alphabets of ``test`` that hold a run-like episode (at least 20 characters), as the sampler chooses them."""
    eligible = EpisodeSampler(test, RUN_WAYS, 1, 1, groups=test.alphabet_index).eligible
    return [test.alphabets[i] for i in eligible.tolist()]


def episode_errors(learner: nn.Module, test: Omniglot, sizes: BlackBoxSizes, device: torch.device,
                   episodes: int) -> Tensor:
    """Error rate (%) on ``episodes`` run-like episodes of ``test``: 20-way one-shot, within one alphabet.

    Only the alphabets with at least 20 characters can give an episode (:func:`run_alphabets`).
    """
    sampler = EpisodeSampler(test.images.to(device), RUN_WAYS, 1, 1, seed=1234,
                             groups=test.alphabet_index.to(device))
    learner.eval()
    return 100 * (1 - episode_accuracies(lambda tasks: task_accuracies(learner, tasks, sizes), sampler,
                                         episodes)).cpu()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lowlearn.eval omniglot-runs", description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=METHODS, default="protonet")
    parser.add_argument("--background", choices=list(BACKGROUNDS), default="small1,small2", metavar="SET",
                        help=f"the characters to meta-train on: {' | '.join(BACKGROUNDS)} (default: small1,small2)")
    parser.add_argument("--test", choices=("runs", "heldout"), default="runs",
                        help="the 20 official runs (downloaded when online), or run-like episodes from the small2 "
                             "alphabets the background lacks")
    parser.add_argument("--checkpoint", type=Path, help="load the meta-trained learner from this file and skip "
                        "training (it must have been saved with the same method, background and profile)")
    parser.add_argument("--save", type=Path, help="save the meta-trained learner here (an existing file is never "
                        "replaced)")
    parser.add_argument("--profile", help="experiment profile for the sizes: smoke, cpu or gpu (default: "
                        "$LOWLEARN_PROFILE, else gpu where CUDA is available and cpu elsewhere, whatever --device)")
    parser.add_argument("--steps", type=cli.natural_int, help="override the profile's meta-training steps (0 scores "
                        "the untrained learner)")
    parser.add_argument("--test-shift", type=cli.natural_int,
                        help="override the profile's test-time shift in pixels (0: none)")
    parser.add_argument("--refine-steps", type=cli.natural_int,
                        help="protonet: override the profile's soft k-means steps, taken in training and at test "
                             "time (0: none)")
    parser.add_argument("--test-rotations", action=argparse.BooleanOptionalAction,
                        help="protonet and matching: also compare the images in their four 90° rotations at test "
                             "time, an ensemble of four comparisons (four times the cost of one view; default: "
                             "the profile's)")
    parser.add_argument("--episodes", type=cli.int_at_least(2),
                        help="held-out episodes (with --test heldout; default 400; at least 2, for an interval)")
    parser.add_argument("--seed", type=cli.seed, default=0)
    parser.add_argument("--device", type=cli.device, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--data", help="data root (default: $LOWLEARN_DATA or ~/.cache/lowlearn)")
    args = parser.parse_args(argv)
    if args.save is not None:
        if args.checkpoint is not None:
            parser.error("--save is for a learner trained here; with --checkpoint nothing is trained")
        if args.save.exists() or args.save.is_symlink():
            parser.error(f"{args.save} exists; choose another --save path (a saved learner is never overwritten)")
        folder = next(p for p in args.save.parents if p.exists())      # found out now, creating nothing yet
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            parser.error(f"cannot save to {args.save}: {folder} is " + ("not writable" if folder.is_dir() else
                                                                         "a file, not a folder"))
    if args.checkpoint is not None:
        if args.steps is not None:
            parser.error("--steps sets the meta-training; with --checkpoint nothing is trained")
        if not args.checkpoint.is_file():
            parser.error(f"--checkpoint {args.checkpoint} is not a file")
    try:
        profile = get_profile(args.profile)
    except ValueError as error:
        parser.error(str(error))
    sizes = profile.black_box
    if args.steps is not None:
        sizes = dataclasses.replace(sizes, meta_steps=args.steps, maml_steps=args.steps)
    if args.test_shift is not None:
        if args.method == "maml":
            parser.error("--test-shift is for the metric learners (protonet, matching), not maml")
        if args.test_shift >= sizes.image_size:      # found now, not by the evaluation after the training
            parser.error(f"--test-shift {args.test_shift} is not below the {sizes.image_size}-pixel images of "
                         f"profile {profile.name}: shift by 0 .. {sizes.image_size - 1} pixels")
        sizes = dataclasses.replace(sizes, test_shift=args.test_shift)
    if args.test == "runs" and args.episodes is not None:
        parser.error("--episodes counts held-out episodes: use it with --test heldout (the runs are 20)")
    if args.test == "heldout" and args.background != "small1":   # small1 and small2 are parts of the full set
        parser.error(f"--test heldout evaluates on the small2 alphabets that the background set lacks, and "
                     f"--background {args.background} holds every one of them, so none is held out: use "
                     "--background small1")
    episodes = 400 if args.episodes is None else args.episodes
    if args.refine_steps is not None:
        if args.method != "protonet":
            parser.error("--refine-steps is for protonet, the learner that refines its prototypes")
        sizes = dataclasses.replace(sizes, refine_steps=args.refine_steps)
    if args.test_rotations is not None:
        if args.method == "maml":
            parser.error("--test-rotations is for the metric learners (protonet, matching), not maml")
        sizes = dataclasses.replace(sizes, test_rotations=args.test_rotations)
    device = args.device or default_device()
    print(banner(profile, device))
    seed_everything(args.seed)                   # --seed fixes the initialisation as well as the episodes
    learner = make_learner(args.method, sizes).to(device)
    data = runs = test = not_saved = None
    if args.checkpoint is None or args.test == "heldout":      # to train on, or to tell what is held out
        try:
            data = background(args.background, sizes.image_size, args.data)
        except DataError as error:                      # missing offline, or damaged
            sys.exit(str(error))
    if args.test == "heldout":
        try:
            test = held_out(data, sizes.image_size, args.data)   # before any training: is anything held out?
        except ValueError as error:
            parser.error(str(error))
        except DataError as error:
            sys.exit(str(error))
    if args.test == "runs":
        try:
            runs = load_omniglot_runs(root=args.data, image_size=sizes.image_size)
        except DataError as error:
            sys.exit(f"{error}\nWithout the runs, evaluate on held-out alphabets instead: --background small1 "
                     "--test heldout")
    if args.checkpoint is not None:
        try:
            extra = load_checkpoint(args.checkpoint, learner, map_location=device,
                                    expect={"method": args.method, "background": args.background,
                                            "profile": profile.name})
        except CheckpointError as error:
            sys.exit(f"--checkpoint: {error}. To train anew, leave out --checkpoint (and keep the learner with --save)")
        except ValueError as error:
            sys.exit(f"{error}: run with the --method, --background and --profile it was saved with, or train "
                     "anew (a held-out or published-table comparison is only fair for the background it learned)")
        except RuntimeError as error:
            sys.exit(f"--checkpoint {args.checkpoint} does not fit the {args.method} learner built here ({error}): "
                     "run with the options it was saved with, or train anew with --save")
        trained = f" ({extra['steps']} training steps)" if "steps" in extra else ""
        print(f"loaded {args.method} from {args.checkpoint}{trained}")
    else:
        if args.save is not None:                        # before the training, not after it
            try:
                args.save.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                parser.error(f"cannot save to {args.save}: {error}")
        start = time.perf_counter()
        losses = train(learner, args.method, data, sizes, device, args.seed)
        final = f"final loss {losses[-1]:.3f}" if losses else "no training steps"
        print(f"meta-trained {args.method} on {args.background} ({data.num_characters} characters): "
              f"{final}, {time.perf_counter() - start:.0f} s")
        if args.save is not None:
            try:
                saved = save_learner(args.save, learner, method=args.method, background=args.background,
                                     profile=profile.name, steps=meta_steps(args.method, sizes))
                kept = "" if saved == args.save else f" ({args.save} appeared during the training and is kept)"
                print(f"saved to {saved}{kept}")
            except OSError as error:
                not_saved = f"the learner was not saved: {error}"
                print(f"{not_saved}; the evaluation goes on", file=sys.stderr)

    if runs is not None:
        errors = run_errors(learner, runs, sizes, device)
        mean, ci = mean_and_ci(errors)
        print(f"\n20 one-shot runs of Lake et al. (2015), error rate (%), {args.method} on {args.background}: "
              f"{mean:.1f} ± {ci:.1f} (95% interval over the 20 runs)")
        print("  per run: " + " ".join(f"{e:.0f}" for e in errors.tolist()))
        print("\npublished error rates (%) on the same runs, Lake et al. (2015):")
        for key in ("full", "small1", "small2"):
            for name, error in PUBLISHED[key]:
                trained_on = "" if name == "People" else key + " background"
                print(f"  {name:38s} {trained_on:20s} {error:5.1f}")
    else:
        errors = episode_errors(learner, test, sizes, device, episodes)
        mean, ci = mean_and_ci(errors)
        used = run_alphabets(test)
        fewer = [name for name in test.alphabets if name not in used]
        print(f"\nheld-out small2 alphabets, 20-way one-shot within one alphabet, {episodes} episodes: "
              f"error {mean:.1f} ± {ci:.1f}% (95% interval over the episodes; accuracy {100 - mean:.1f}%)")
        verb = "has" if len(fewer) == 1 else "have"
        print(f"  episodes from {', '.join(used)}" + (f"; {', '.join(fewer)} {verb} fewer than {RUN_WAYS} characters"
                                                     if fewer else ""))
    if not_saved is not None:
        sys.exit(f"{not_saved} (the evaluation above ran)")

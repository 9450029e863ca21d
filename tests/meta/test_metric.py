import math

import numpy as np
import pytest
import torch
from torch import nn

from lowlearn.data.episodes import Episode, EpisodeSampler, random_episodes
from lowlearn.meta import LSTMOptimizer, MatchingNet, ProtoNet
from lowlearn.meta.episodic import episode_accuracies
from lowlearn.meta.metric import check_episode_labels, class_means, squared_distances
from lowlearn.models import Conv4


def image_episodes(tasks=2, ways=3, shots=2, queries=2, size=16):
    return random_episodes(tasks, ways, shots, queries, image_size=size, dtype=torch.float64)


def conv_embedding(seed=0):
    torch.manual_seed(seed)
    return Conv4(num_classes=None, hidden=8, image_size=16).double()


def test_protonet_logits_equal_a_hand_computation():
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    # prototypes: class 0 = mean of (0,0) and (2,0) = (1,0); class 1 = (0,3)
    # query (1,1): squared distances 0 + 1 = 1 and 1 + 4 = 5
    logits = ProtoNet(nn.Identity())(support, torch.tensor([0, 0, 1]), torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(logits, torch.tensor([[-1.0, -5.0]]))


def test_prototypes_are_class_means():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(4, 9, 5, generator=generator, dtype=torch.float64)
    labels = torch.stack([torch.randperm(9, generator=generator) % 3 for _ in range(4)])
    means = class_means(embeddings, labels, 3)
    for task in range(4):
        for k in range(3):
            torch.testing.assert_close(means[task, k], embeddings[task][labels[task] == k].mean(0))


def test_squared_distances_equal_cdist():
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 7, 4, generator=generator, dtype=torch.float64), torch.randn(3, 5, 4, generator=generator,
                                                                                       dtype=torch.float64)
    torch.testing.assert_close(squared_distances(a, b), torch.cdist(a, b) ** 2)
    assert squared_distances(a, a).diagonal(dim1=-2, dim2=-1).abs().max() < 1e-12


def test_squared_distances_keep_their_precision_when_the_embeddings_share_an_offset():
    # Embeddings 0.05 apart around an offset of 100: ‖a‖² ≈ 6.4·10⁵ would swamp distances ≈ 0.01 in float32.
    generator = torch.Generator().manual_seed(0)
    b = 100 + 0.05 * torch.randn(5, 64, generator=generator, dtype=torch.float64)
    a = b.repeat(3, 1) + 0.01 * torch.randn(15, 64, generator=generator, dtype=torch.float64)
    exact = torch.cdist(a, b) ** 2
    torch.testing.assert_close(squared_distances(a.float(), b.float()).double(), exact, rtol=1e-3, atol=1e-4)
    assert torch.equal(squared_distances(a.float(), b.float()).argmin(-1), exact.argmin(-1))


def test_matching_net_logits_are_the_log_of_the_attention_weighted_labels():
    generator = torch.Generator().manual_seed(2)
    support, query = torch.randn(5, 3, generator=generator), torch.randn(4, 3, generator=generator)
    labels = torch.tensor([0, 1, 1, 2, 0])
    logits = MatchingNet(nn.Identity(), scale=3.0)(support, labels, query)
    for q in range(4):
        cosine = torch.stack([torch.dot(query[q], s) / (query[q].norm() * s.norm()) for s in support])
        attention = torch.softmax(3.0 * cosine, dim=0)
        expected = torch.stack([attention[labels == k].sum() for k in range(3)]).log()
        torch.testing.assert_close(logits[q], expected)
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(4))


@pytest.mark.parametrize("learner", [ProtoNet, MatchingNet])
@pytest.mark.parametrize("train", [True, False])
def test_predictions_are_invariant_to_the_order_of_the_support_set(learner, train):
    model = learner(conv_embedding()).train(train)
    episode = image_episodes(tasks=1, ways=4, shots=3, queries=2)
    support_x, support_y, query_x = episode.support_x[0], episode.support_y[0], episode.query_x[0]
    order = torch.randperm(support_y.shape[0], generator=torch.Generator().manual_seed(3))
    assert not torch.equal(order, torch.arange(order.shape[0]))
    torch.testing.assert_close(model(support_x[order], support_y[order], query_x), model(support_x, support_y, query_x),
                               rtol=1e-10, atol=1e-10)


def test_a_recurrent_learner_depends_on_the_order_of_its_examples():
    """The LSTM optimiser reads one example's gradient after another: its result depends on their order."""
    torch.manual_seed(0)
    learner = LSTMOptimizer(hidden=8).double()
    generator = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 3, generator=generator, dtype=torch.float64), torch.randn(6, generator=generator,
                                                                                     dtype=torch.float64)

    def learn(order):
        theta = torch.zeros(3, dtype=torch.float64)
        state = learner.initial_state(3, theta)
        for i in order.tolist():
            grad = 2 * (x[i] @ theta - y[i]) * x[i]
            update, state = learner(grad, state)
            theta = theta + update
        return theta.detach()

    forward, backward = learn(torch.arange(6)), learn(torch.arange(6).flip(0))
    assert (forward - backward).abs().max() > 1e-4


@pytest.mark.parametrize("learner", [ProtoNet, MatchingNet])
def test_a_batch_of_episodes_equals_each_episode_alone(learner):
    model = learner(nn.Flatten())
    episodes = image_episodes(tasks=3)
    batched = model(episodes.support_x, episodes.support_y, episodes.query_x)
    for j in range(3):
        torch.testing.assert_close(batched[j], model(episodes.support_x[j], episodes.support_y[j], episodes.query_x[j]))


@pytest.mark.parametrize("tasks", [2, 3])
@pytest.mark.parametrize("learner", [ProtoNet, MatchingNet])
def test_evaluation_with_batch_statistics_never_mixes_episodes(learner, tasks):
    torch.manual_seed(0)
    model = learner(Conv4(num_classes=None, hidden=8, image_size=16, running_stats=False).double()).eval()
    episodes = image_episodes(tasks=tasks)
    with torch.no_grad():
        batched = model(episodes.support_x, episodes.support_y, episodes.query_x)
        for j in range(tasks):
            alone = model(episodes.support_x[j], episodes.support_y[j], episodes.query_x[j])
            torch.testing.assert_close(batched[j], alone)
        mixed = model.embed(torch.cat([episodes.support_x.flatten(0, 1), episodes.query_x.flatten(0, 1)]))
    assert not torch.allclose(mixed[:6], model.embed_episodes(episodes.support_x, episodes.query_x)[0][0])


def test_embedded_episodes_are_each_image_embedded_alone_and_score_like_forward():
    model = ProtoNet(conv_embedding(), test_shift=1).eval()
    episodes = image_episodes(tasks=2)
    with torch.no_grad():
        support, query = model.embed_episodes(episodes.support_x, episodes.query_x)
        assert support.shape == (2, 6, 8) and query.shape == (2, 6, 8)
        torch.testing.assert_close(support[1, 4], model.embed(episodes.support_x[1, 4:5])[0])
        torch.testing.assert_close(query[0, 2], model.embed(episodes.query_x[0, 2:3])[0])
        torch.testing.assert_close(model.scores(support, episodes.support_y, query, 3),
                                   model(episodes.support_x, episodes.support_y, episodes.query_x))


def test_meta_training_learns_an_embedding_that_separates_unseen_classes():
    """Classes are Gaussian clusters along 2 informative of 20 noisy dimensions; the embedding must find them."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(5)

    def episodes(batch, ways=5, shots=1, queries=5):
        centres = torch.zeros(batch, ways, 20)
        centres[..., :2] = 3 * torch.randn(batch, ways, 2, generator=generator)

        def draw(k):
            noise = torch.randn(batch, ways, k, 20, generator=generator)
            noise[..., 2:] *= 3.0
            return (centres.unsqueeze(2) + noise).flatten(1, 2)
        labels = lambda k: torch.arange(ways).repeat_interleave(k).repeat(batch, 1)   # noqa: E731
        return Episode(draw(shots), labels(shots), draw(queries), labels(queries), torch.zeros(batch, ways))

    model = ProtoNet(nn.Linear(20, 4))
    test = episodes(200)
    before = model.evaluate(test)["accuracy"]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        model.meta_step(episodes(16), optimizer)
    after = model.evaluate(test)["accuracy"]
    assert after > before + 0.15, (before, after)


def test_loss_accepts_a_single_episode_and_gives_gradients():
    model = ProtoNet(conv_embedding())
    episode = image_episodes(tasks=1)
    single = Episode(*(field[0] for field in episode))
    stats = model.loss(single)
    stats["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    torch.testing.assert_close(stats["loss"].detach(), model.loss(episode)["loss"].detach())


@pytest.mark.parametrize("learner", [ProtoNet, MatchingNet])
def test_bad_episodes_are_clear_errors(learner):
    model = learner(nn.Flatten())
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="class 1 of episode 0 has no support example"):
        model(x, torch.tensor([0, 0, 2]), x)
    with pytest.raises(ValueError, match="not in the support set"):
        model.loss(Episode(x, torch.tensor([0, 1, 2]), x, torch.tensor([0, 1, 3]), torch.zeros(3)))
    with pytest.raises(ValueError, match="support set is empty"):
        model(x[:0], torch.tensor([], dtype=torch.long), x)
    with pytest.raises(ValueError, match="does not fit"):
        model(x, torch.tensor([0, 1, 2]), torch.randn(3, 5))
    with pytest.raises(ValueError, match="integer class labels"):
        model(x, torch.tensor([0.0, 1.0, 2.0]), x)
    with pytest.raises(ValueError, match="no query examples"):
        model.loss(Episode(x, torch.tensor([0, 1, 2]), x[:0], torch.tensor([], dtype=torch.long), torch.zeros(3)))
    with pytest.raises(ValueError, match="integer class labels, got torch.bool"):
        model(x, torch.tensor([True, False, True]), x)
    with pytest.raises(ValueError, match="ways must be an int >= 1"):
        model(x, torch.tensor([0, 1, 2]), x, ways=0)
    with pytest.raises(ValueError, match="support labels must be in 0 .. 0 for 1 ways, got labels from -2 to -1"):
        model(x[:2], torch.tensor([-2, -1]), x)                 # the ways taken from the labels: not "ways ... 0"


@pytest.mark.parametrize("ways", [None, 20_000_000, 2**40])
def test_more_ways_than_support_examples_is_refused_before_counting_per_class(ways):
    # A count per class would take memory per class: 2**40 ways could not be counted at all.
    model = ProtoNet(nn.Flatten())
    x = torch.randn(3, 2)
    support_y = torch.tensor([0, 1, 2]) if ways else torch.tensor([0, 1, 20_000_000])
    with pytest.raises(ValueError, match="ways but 3 support examples per episode: some class has none"):
        model(x, support_y, x, ways=ways)


def test_label_values_are_read_only_on_the_cpu():
    # On an accelerator, reading labels would make every meta-step wait for the device. Tensors on the meta
    # device have no values: reading them raises.
    support_y, query_y = torch.tensor([[0, 0, 2]]), torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError, match="has no support example"):
        check_episode_labels(support_y, query_y, 3)
    check_episode_labels(support_y.to("meta"), query_y.to("meta"), 3)
    with pytest.raises(ValueError, match="integer class labels"):                        # dtypes are still checked
        check_episode_labels(support_y.float().to("meta"), None, 3)


@pytest.mark.parametrize("learner", [ProtoNet, MatchingNet])
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_labels_of_any_integer_type_give_the_int64_results(learner, dtype):
    model = learner(nn.Identity())
    episode = Episode(torch.randn(2, 4, 3), torch.tensor([[0, 1, 2, 1], [2, 0, 1, 0]]), torch.randn(2, 5, 3),
                      torch.tensor([[0, 1, 2, 0, 1], [2, 2, 1, 0, 0]]), torch.zeros(2, 3))
    narrow = episode._replace(support_y=episode.support_y.to(dtype), query_y=episode.query_y.to(dtype))
    torch.testing.assert_close(model(narrow.support_x, narrow.support_y, narrow.query_x),
                               model(episode.support_x, episode.support_y, episode.query_x))
    torch.testing.assert_close(model.loss(narrow)["loss"], model.loss(episode)["loss"])


@pytest.mark.parametrize("options", [{"test_shift": 1}, {"test_rotations": True}])
def test_test_time_views_refuse_inputs_that_are_not_images(options):
    # Shifting the last two dimensions of (n, D) inputs would mix one example's features into its neighbour's.
    model = ProtoNet(nn.Identity(), **options).eval()
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="not images|shift and rotate images"):
        model(x, torch.tensor([0, 1, 2, 3]), x)


def test_soft_k_means_refinement_equals_ren_et_al_eq_4():
    generator = torch.Generator().manual_seed(6)
    support, query = torch.randn(5, 3, generator=generator, dtype=torch.float64), torch.randn(
        4, 3, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 2, 0])
    logits = ProtoNet(nn.Identity(), refine_steps=2)(support, labels, query)
    prototypes = torch.stack([support[labels == k].mean(0) for k in range(3)])
    for _ in range(2):
        z = torch.softmax(-torch.cdist(query, prototypes) ** 2, dim=1)
        prototypes = torch.stack([(support[labels == k].sum(0) + (z[:, k:k + 1] * query).sum(0))
                                  / ((labels == k).sum() + z[:, k].sum()) for k in range(3)])
    torch.testing.assert_close(logits, -torch.cdist(query, prototypes) ** 2)
    for bad in (-1, True, 1.0):
        with pytest.raises(ValueError, match="refine_steps must be an int >= 0"):
            ProtoNet(nn.Identity(), refine_steps=bad)
        with pytest.raises(ValueError, match=r"test_shift \(pixels\) must be an int >= 0"):
            ProtoNet(nn.Identity(), test_shift=bad)
    numpy_counts = ProtoNet(nn.Flatten(), refine_steps=np.int64(2), test_shift=np.int64(1))
    assert numpy_counts.refine_steps == 2 and type(numpy_counts.refine_steps) is int   # it kept the NumPy int
    x = torch.randn(4, 1, 5, 5)
    numpy_counts.eval()(x, torch.tensor([0, 1, 2, 3]), x)      # evaluation shifts by a NumPy count too


def test_test_time_shifts_average_the_embeddings_of_shifted_copies_in_evaluation_only():
    from lowlearn.data.augment import shifted_copies

    episode = image_episodes(tasks=1, ways=2, shots=1, queries=1, size=6)
    sx, sy, qx = episode.support_x[0], episode.support_y[0], episode.query_x[0]
    model = ProtoNet(nn.Flatten(), test_shift=1)
    averaged = lambda x: shifted_copies(x, 1).flatten(2).mean(0)          # noqa: E731
    expected = -torch.cdist(averaged(qx), averaged(sx)) ** 2
    torch.testing.assert_close(model.eval()(sx, sy, qx), expected)
    torch.testing.assert_close(model.train()(sx, sy, qx), -torch.cdist(qx.flatten(1), sx.flatten(1)) ** 2)
    with pytest.raises(ValueError, match="test_shift"):
        MatchingNet(nn.Flatten(), test_shift=-1)


@pytest.mark.parametrize("learner", [ProtoNet, MatchingNet])
@pytest.mark.parametrize("options", [{}, {"test_shift": 1}, {"test_shift": 1, "test_rotations": True}])
def test_eval_batch_size_embeds_in_passes_of_that_many_images_with_the_same_results(learner, options):
    episodes = image_episodes(tasks=2, ways=3, shots=2, queries=2)          # 24 images
    whole = learner(conv_embedding(), **options).eval()
    in_passes = learner(conv_embedding(), **options, eval_batch_size=7).eval()
    sizes = []
    in_passes.embedding.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    with torch.no_grad():
        expected = whole(episodes.support_x, episodes.support_y, episodes.query_x)
        torch.testing.assert_close(in_passes(episodes.support_x, episodes.support_y, episodes.query_x), expected)
    views = 24 * (5 if options.get("test_shift") else 1)
    per_frame = [7] * (views // 7) + ([views % 7] if views % 7 else [])
    assert sizes == per_frame * (4 if options.get("test_rotations") else 1)

    sizes.clear()
    in_passes.train()(episodes.support_x, episodes.support_y, episodes.query_x)
    assert sizes == [24]                           # training: one pass, its batch norm sees the whole batch


def test_eval_batch_size_is_refused_where_it_would_change_the_embeddings():
    with pytest.raises(ValueError, match="eval_batch_size"):
        ProtoNet(nn.Flatten(), eval_batch_size=0)
    with pytest.raises(ValueError, match=r"batch norm 'features.1' .*track_running_stats=False"):
        MatchingNet(Conv4(num_classes=None, hidden=4, image_size=16, running_stats=False), eval_batch_size=8)
    ProtoNet(Conv4(num_classes=None, hidden=4, image_size=16, running_stats=False))     # one pass: allowed


@pytest.mark.parametrize("shift", [0, 1])
def test_test_time_rotations_average_the_squared_distances_of_the_four_rotated_frames(shift):
    from lowlearn.data.augment import shifted_copies

    torch.manual_seed(0)
    episode = image_episodes(tasks=1, ways=3, shots=1, queries=2, size=6)
    sx, sy, qx = episode.support_x[0], episode.support_y[0], episode.query_x[0]
    embedding = nn.Sequential(nn.Flatten(), nn.Linear(36, 5)).double()     # not equivariant to rotations
    model = ProtoNet(embedding, test_shift=shift, test_rotations=True)

    def f(x):                                                     # the embedding, averaged over the shifts
        return embedding(shifted_copies(x, shift).flatten(0, 1)).unflatten(0, (5, len(x))).mean(0) if shift \
            else embedding(x)

    frames = [torch.cdist(f(torch.rot90(qx, r, dims=(-2, -1))), f(torch.rot90(sx, r, dims=(-2, -1)))) ** 2
              for r in range(4)]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(sx, sy, qx), -torch.stack(frames).mean(0))
        torch.testing.assert_close(model.train()(sx, sy, qx), -torch.cdist(embedding(qx), embedding(sx)) ** 2)
    with pytest.raises(ValueError, match="square images, got 6x5"):
        model.eval().embed(torch.zeros(2, 1, 6, 5))


def test_episode_accuracies_scores_every_episode_in_batches_and_checks_its_counts():
    sampler = lambda: EpisodeSampler(torch.randn(6, 4, 2), 3, 1, 1, seed=0)       # noqa: E731
    sizes = []

    def evaluate(tasks):
        sizes.append(tasks.support_x.shape[0])
        return torch.arange(tasks.support_x.shape[0], dtype=torch.float32)

    assert episode_accuracies(evaluate, sampler(), 7, batch=3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert sizes == [3, 3, 1]
    for episodes, batch in ((0, 3), (-2, 3), (5, 0)):
        with pytest.raises(ValueError, match="episodes|batch"):
            episode_accuracies(evaluate, sampler(), episodes, batch=batch)


def test_protonet_loss_and_accuracies_equal_a_hand_computation_from_the_support_prototypes():
    # Two 2-way episodes of 2-D points, identity embedding: prototypes from the support set only (Snell et al. eq. 1).
    support_x = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 2.0]],        # prototypes (1, 0), (0, 3)
                              [[1.0, 1.0], [1.0, 1.0], [5.0, 5.0], [3.0, 3.0]]],       # prototypes (1, 1), (4, 4)
                             dtype=torch.float64)
    query_x = torch.tensor([[[1.0, 1.0], [0.0, 3.0]], [[2.0, 2.0], [4.0, 3.0]]], dtype=torch.float64)
    episode = Episode(support_x, torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]]), query_x, torch.tensor([[0, 1], [1, 1]]),
                      torch.zeros(2, 2))
    # squared distances of each query to the two prototypes, and its true class
    queries = [([1, 5], 0), ([10, 0], 1), ([2, 8], 1), ([13, 1], 1)]
    # −log softmax(−d)_y = d_y + log Σ_k exp(−d_k); episode 0 gets both right, episode 1 one of two (2,2 is nearer 0)
    expected = sum(d[y] + math.log(sum(math.exp(-dk) for dk in d)) for d, y in queries) / 4
    stats = ProtoNet(nn.Identity()).loss(episode)
    assert stats["loss"].item() == pytest.approx(expected, rel=1e-12)
    assert stats["per_task_accuracy"].tolist() == [1.0, 0.5]
    assert stats["accuracy"].item() == pytest.approx(0.75)


@pytest.mark.parametrize("learner", [ProtoNet, MatchingNet])
def test_a_support_label_equal_to_the_number_of_ways_is_refused(learner):
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"support labels must be in 0 .. 2 for 3 ways, got labels from 0 to 3"):
        learner(nn.Flatten())(x, torch.tensor([0, 1, 3]), x, ways=3)


def test_metric_learners_name_the_shapes_that_do_not_fit():
    model = ProtoNet(nn.Linear(4, 3))
    support_x, support_y, query_x = torch.randn(2, 6, 4), torch.arange(3).repeat(2, 2), torch.randn(2, 5, 4)
    model(support_x, support_y, query_x)                                          # two episodes at once fit
    with pytest.raises(ValueError, match=r"support_x \(2, 6, 4\) and support_y \(2, 5\) must be \(S, \.\.\.\)"):
        model(support_x, support_y[:, :5], query_x)
    with pytest.raises(ValueError, match=r"query_x \(1, 5, 4\) does not fit support_x \(2, 6, 4\)"):
        model(support_x, support_y, query_x[:1])
    with pytest.raises(ValueError, match=r"query_x \(2, 5, 5\) does not fit support_x \(2, 6, 4\)"):
        model(support_x, support_y, torch.randn(2, 5, 5))
    with pytest.raises(ValueError, match=r"query_y \(2, 4\) must have one label per query input \(2, 5\)"):
        model.loss(Episode(support_x, support_y, query_x, torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3)))

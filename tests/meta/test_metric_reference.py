"""lowlearn.meta.metric and lowlearn.meta.episodic against slow, independent float64 references.

The references are written per example with Python loops over plain numbers (NumPy for the image views), from the
papers' equations: Snell et al. (2017) eq. 1–2, Ren et al. (2018)'s soft k-means refinement (support weight 1,
here with the query set as the unlabelled set, which the docstring calls transductive), Vinyals et al. (2016) eq.
1–2 (cosine of both embeddings), and the test-time views as EpisodicLearner documents them.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowlearn.data.episodes import Episode, EpisodeSampler, random_episodes
from lowlearn.meta import MatchingNet, ProtoNet
from lowlearn.meta.episodic import episode_accuracies
from lowlearn.models import Conv4


# ---------------------------------------------------------------------------------------------------------------
# Slow references.
# ---------------------------------------------------------------------------------------------------------------

def sqdist(a, b):
    return sum((ai - bi) ** 2 for ai, bi in zip(a, b))


def mean_rows(rows, weights):
    total = sum(weights)
    return [sum(w * r[d] for r, w in zip(rows, weights)) / total for d in range(len(rows[0]))]


def ref_protonet_logits(frames_s, y, frames_q, ways, refine_steps):
    """Logits (Q, N) as nested lists. ``frames_s``/``frames_q``: a list of frames (one, or four rotations), each a
    list of embedding rows. The distance is the mean of the frames' squared distances; soft k-means (Ren et al.)
    assigns every query by it, and refines each frame's prototypes with the same weights, the support weighing 1."""
    n_frames, y = len(frames_s), [int(v) for v in y]
    protos = [[mean_rows([s for s, c in zip(fs, y) if c == k], [1.0] * y.count(k)) for k in range(ways)]
              for fs in frames_s]

    def dist(j, k):
        return sum(sqdist(frames_q[f][j], protos[f][k]) for f in range(n_frames)) / n_frames

    queries = len(frames_q[0])
    for _ in range(refine_steps):
        z = []
        for j in range(queries):
            e = [math.exp(-dist(j, k)) for k in range(ways)]
            z.append([v / sum(e) for v in e])
        protos = [[mean_rows([s for s, c in zip(fs, y) if c == k] + list(fq),
                             [1.0] * y.count(k) + [z[j][k] for j in range(queries)])
                   for k in range(ways)] for fs, fq in zip(frames_s, frames_q)]
    return [[-dist(j, k) for k in range(ways)] for j in range(queries)]


def ref_matching_logits(support, y, query, ways, scale):
    """log Σ_{i: y_i = k} a(x̂, x_i), a = softmax_i(scale · cos(f(x̂), f(x_i))): cosines of both embeddings, logs
    computed from the largest term (the stable form of the paper's log of the attention-weighted labels)."""
    def cos(a, b):
        return sum(u * v for u, v in zip(a, b)) / math.sqrt(sum(u * u for u in a) * sum(v * v for v in b))

    out = []
    for q in query:
        c = [scale * cos(q, s) for s in support]
        top = max(c)
        log_total = top + math.log(sum(math.exp(v - top) for v in c))
        row = []
        for k in range(ways):
            ck = [v for v, label in zip(c, y) if int(label) == k]
            tk = max(ck)
            row.append(tk + math.log(sum(math.exp(v - tk) for v in ck)) - log_total)
        out.append(row)
    return out


def shifted_views(image, p):
    """The image and its four copies moved by ``p`` pixels along each axis, zero-filled (NumPy, written out)."""
    h, w = image.shape[-2:]
    views = [image.copy()]
    for dy, dx in ((0, p), (0, -p), (p, 0), (-p, 0)):
        v = np.zeros_like(image)
        for i in range(h):
            for j in range(w):
                si, sj = i - dy, j - dx
                if 0 <= si < h and 0 <= sj < w:
                    v[..., i, j] = image[..., si, sj]
        views.append(v)
    return views


def ref_frames(f, images, shift, rotations):
    """Per frame (one, or the four 90° rotations), per image: the embedding, averaged over the shifted views."""
    frames = []
    for r in (range(4) if rotations else [0]):
        rows = []
        for image in images:
            rotated = np.rot90(image, r, axes=(-2, -1)).copy()
            views = shifted_views(rotated, shift) if shift else [rotated]
            embs = [f(torch.from_numpy(v)[None])[0].tolist() for v in views]
            rows.append(mean_rows(embs, [1.0] * len(embs)))
        frames.append(rows)
    return frames


def tanh_embedding(size=6, dim=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(size * size, dim), nn.Tanh(), nn.Linear(dim, dim)).double()


# ---------------------------------------------------------------------------------------------------------------
# ProtoNet, refinement and the test-time views.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("refine", [0, 2])
@pytest.mark.parametrize("shift, rotations", [(0, False), (1, False), (0, True), (1, True)])
def test_protonet_logits_equal_a_slow_reference_with_refinement_and_test_time_views(refine, shift, rotations):
    """Snell et al. eq. 1–2 with Ren et al.'s soft k-means on the queries, per query in float64 loops; the views as
    documented: each image's embedding averaged over its shifted copies, the squared distance averaged over the four
    rotated frames (and soft k-means then refines every frame's prototypes with the same query weights)."""
    embedding = tanh_embedding()
    model = ProtoNet(embedding, refine_steps=refine, test_shift=shift, test_rotations=rotations).eval()
    episodes = random_episodes(2, 3, 2, 2, image_size=6, dtype=torch.float64, seed=3)
    with torch.no_grad():
        got = model(episodes.support_x, episodes.support_y, episodes.query_x)
        for b in range(2):
            fs = ref_frames(embedding, episodes.support_x[b].numpy(), shift, rotations)
            fq = ref_frames(embedding, episodes.query_x[b].numpy(), shift, rotations)
            expected = ref_protonet_logits(fs, episodes.support_y[b].tolist(), fq, 3, refine)
            torch.testing.assert_close(got[b], torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-10)


def test_refinement_with_unequal_shots_weighs_each_support_example_once():
    """Ren et al.: the support examples weigh 1 each, so a class of 3 shots resists the queries more than one of 1."""
    generator = torch.Generator().manual_seed(11)
    support, query = (torch.randn(n, 3, generator=generator, dtype=torch.float64) for n in (5, 6))
    labels = torch.tensor([0, 0, 0, 1, 2])
    got = ProtoNet(nn.Identity(), refine_steps=3)(support, labels, query)
    expected = ref_protonet_logits([support.tolist()], labels.tolist(), [query.tolist()], 3, 3)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_protonet_refined_loss_gradient_equals_the_slow_reference():
    """The refinement is differentiable end to end (Ren et al. train through it): loss and gradient in the
    embedding's weights equal those of the loop reference rebuilt with autograd-carrying scalars."""
    torch.manual_seed(0)
    embedding = nn.Linear(4, 3).double()
    generator = torch.Generator().manual_seed(2)
    sx, qx = torch.randn(2, 6, 4, generator=generator, dtype=torch.float64), torch.randn(2, 4, 4, generator=generator,
                                                                                         dtype=torch.float64)
    sy = torch.tensor([[0, 0, 1, 1, 2, 2], [2, 1, 0, 0, 1, 2]])
    qy = torch.tensor([[0, 1, 2, 2], [1, 1, 0, 2]])
    tasks = Episode(sx, sy, qx, qy, torch.zeros(2, 3))
    model = ProtoNet(embedding, refine_steps=2)
    loss = model.loss(tasks)["loss"]
    got = torch.autograd.grad(loss, list(embedding.parameters()))

    terms = []
    for b in range(2):
        s, q = embedding(sx[b]), embedding(qx[b])
        protos = [torch.stack([s[i] for i in range(6) if sy[b, i] == k]).mean(0) for k in range(3)]
        for _ in range(2):
            d = torch.stack([torch.stack([((q[j] - protos[k]) ** 2).sum() for k in range(3)]) for j in range(4)])
            z = torch.softmax(-d, dim=1)
            protos = [(sum(s[i] for i in range(6) if sy[b, i] == k) + sum(z[j, k] * q[j] for j in range(4)))
                      / (int((sy[b] == k).sum()) + z[:, k].sum()) for k in range(3)]
        for j in range(4):
            d = torch.stack([((q[j] - protos[k]) ** 2).sum() for k in range(3)])
            terms.append(d[qy[b, j]] + torch.logsumexp(-d, 0))
    expected_loss = torch.stack(terms).mean()
    expected = torch.autograd.grad(expected_loss, list(embedding.parameters()))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Matching networks.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rotations", [False, True])
def test_matching_net_logits_equal_a_slow_reference_with_test_time_views(rotations):
    """Vinyals et al. eq. 1–2 per query, with the documented views: shifted copies averaged into one embedding, and
    the four rotated frames side by side (one cosine of the concatenations, not a mean of four cosines)."""
    embedding = tanh_embedding(seed=1)
    model = MatchingNet(embedding, scale=4.0, test_shift=1, test_rotations=rotations).eval()
    episodes = random_episodes(1, 3, 2, 2, image_size=6, dtype=torch.float64, seed=4)
    with torch.no_grad():
        got = model(episodes.support_x[0], episodes.support_y[0], episodes.query_x[0])
    fs = ref_frames(embedding, episodes.support_x[0].numpy(), 1, rotations)
    fq = ref_frames(embedding, episodes.query_x[0].numpy(), 1, rotations)
    support = [sum((frame[i] for frame in fs), []) for i in range(6)]          # concatenated frames
    query = [sum((frame[j] for frame in fq), []) for j in range(6)]
    expected = ref_matching_logits(support, episodes.support_y[0].tolist(), query, 3, 4.0)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-10)


def test_matching_net_normalises_both_the_query_and_the_support_embeddings():
    """c is the cosine (Vinyals et al. eq. 2), not a dot product with the normalised support only: rescaling any
    query or support embedding by a positive factor changes nothing."""
    generator = torch.Generator().manual_seed(7)
    support, query = torch.randn(6, 4, generator=generator, dtype=torch.float64), torch.randn(
        3, 4, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    model = MatchingNet(nn.Identity(), scale=5.0)
    base = model(support, labels, query)
    stretch_s = torch.tensor([0.1, 3.0, 7.0, 1.0, 0.5, 20.0], dtype=torch.float64)[:, None]
    stretch_q = torch.tensor([0.01, 9.0, 2.0], dtype=torch.float64)[:, None]
    torch.testing.assert_close(model(support * stretch_s, labels, query * stretch_q), base, rtol=1e-12, atol=1e-12)
    expected = ref_matching_logits(support.tolist(), labels.tolist(), query.tolist(), 3, 5.0)
    torch.testing.assert_close(base, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_matching_net_log_probabilities_stay_finite_and_exact_in_float32_at_a_large_scale():
    """log Σ a y is computed by logsumexp: at scale 500 in float32 a class 2 cosine units away has log-probability
    near −1000, where the log of the summed softmax would be −inf (and its gradient NaN)."""
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.9, 0.1]])
    query = torch.tensor([[1.0, 0.05], [-1.0, 0.2]])
    labels = torch.tensor([0, 1, 2, 0])
    model = MatchingNet(nn.Identity(), scale=500.0)
    logits = model(support, labels, query)
    expected = torch.tensor(ref_matching_logits(support.double().tolist(), labels.tolist(), query.double().tolist(),
                                                3, 500.0), dtype=torch.float64)
    assert torch.isfinite(logits).all() and logits.min() < -900
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-2)
    naive = torch.softmax(500.0 * F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).T, -1) @ F.one_hot(
        labels, 3).float()
    assert torch.isinf(naive.log()).any()                    # the test's point: the naive form would fail here
    s, q = support.clone().requires_grad_(), query.clone().requires_grad_()
    loss = model.loss(Episode(s, labels, q, torch.tensor([2, 0]), torch.zeros(3)))["loss"]
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and torch.isfinite(q.grad).all()


# ---------------------------------------------------------------------------------------------------------------
# Symmetries: class labels, query order, transduction, batches.
# ---------------------------------------------------------------------------------------------------------------

def learners():
    return [ProtoNet(tanh_embedding(), refine_steps=2, test_shift=1, test_rotations=True),
            MatchingNet(tanh_embedding(), scale=3.0, test_shift=1, test_rotations=True)]


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("train", [True, False])
def test_renaming_the_classes_permutes_the_logit_columns(index, train):
    """Equivariance to the labels: with support labels π(y), column π(k) of the logits is the old column k (also with
    refinement and the test-time views, whose averages treat every class alike)."""
    model = learners()[index].train(train)
    episode = random_episodes(1, 4, 2, 2, image_size=6, dtype=torch.float64, seed=5)
    sx, sy, qx = episode.support_x[0], episode.support_y[0], episode.query_x[0]
    pi = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        before, after = model(sx, sy, qx), model(sx, pi[sy], qx)
    torch.testing.assert_close(after[:, pi], before, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("refine", [0, 1])
def test_soft_k_means_is_transductive_but_equivariant_to_the_order_of_the_queries(refine):
    """Permuting the queries permutes the logit rows; changing one query changes another query's logits exactly
    when the prototypes are refined on the queries (the docstring's "transductive")."""
    generator = torch.Generator().manual_seed(8)
    support, query = torch.randn(6, 3, generator=generator, dtype=torch.float64), torch.randn(
        5, 3, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    model = ProtoNet(nn.Identity(), refine_steps=refine)
    base = model(support, labels, query)
    order = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(model(support, labels, query[order]), base[order], rtol=1e-12, atol=1e-12)
    moved = query.clone()
    moved[4] += 2.0
    change = (model(support, labels, moved)[:4] - base[:4]).abs().max().item()
    assert (change > 1e-6) if refine else (change == 0.0)


@pytest.mark.parametrize("index", [0, 1])
def test_a_batch_of_episodes_equals_each_episode_alone_with_refinement_and_views(index):
    """Soft k-means weights and the views are per episode: no query of one episode reaches another's prototypes."""
    model = learners()[index].eval()
    episodes = random_episodes(3, 3, 2, 2, image_size=6, dtype=torch.float64, seed=6)
    with torch.no_grad():
        batched = model(episodes.support_x, episodes.support_y, episodes.query_x)
        for j in range(3):
            alone = model(episodes.support_x[j], episodes.support_y[j], episodes.query_x[j])
            torch.testing.assert_close(batched[j], alone, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: per-episode accuracies, evaluation mode, no graph.
# ---------------------------------------------------------------------------------------------------------------

def test_episode_accuracies_of_evaluate_equal_nearest_prototype_accuracies_counted_by_hand():
    """Each episode's accuracy is the fraction of its queries whose nearest prototype (Euclidean) is their class,
    counted per query in a loop on the same seeded episodes; evaluate builds no graph."""
    data = torch.randn(8, 6, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    model = ProtoNet(nn.Linear(3, 2).double())
    scores = episode_accuracies(lambda t: model.evaluate(t)["per_task_accuracy"],
                                EpisodeSampler(data, 3, 2, 3, seed=1), 5, batch=2)
    again = EpisodeSampler(data, 3, 2, 3, seed=1)
    expected = []
    for size in (2, 2, 1):                                       # the same draws as episode_accuracies' chunks
        tasks = again.sample(size)
        for b in range(size):
            with torch.no_grad():
                s, q = model.embedding(tasks.support_x[b]).tolist(), model.embedding(tasks.query_x[b]).tolist()
            y = tasks.support_y[b].tolist()
            protos = [mean_rows([r for r, c in zip(s, y) if c == k], [1.0] * y.count(k)) for k in range(3)]
            hits = [min(range(3), key=lambda k: sqdist(qj, protos[k])) == int(t) for qj, t in zip(q, tasks.query_y[b])]
            expected.append(sum(hits) / len(hits))
    assert scores.shape == (5,) and not scores.requires_grad
    assert scores.tolist() == pytest.approx(expected, abs=1e-6)       # float32 accuracies


def test_evaluate_in_evaluation_mode_leaves_batch_norm_statistics_alone():
    """evaluate() is no_grad and, with the learner in eval mode, uses and keeps the running statistics."""
    torch.manual_seed(0)
    model = ProtoNet(Conv4(num_classes=None, hidden=4, image_size=16).double()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = model.evaluate(random_episodes(2, 3, 1, 1, image_size=16, dtype=torch.float64))
    assert not stats["loss"].requires_grad
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# Bad episodes.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("learner", [ProtoNet, MatchingNet])
def test_labels_that_are_not_0_to_n_minus_1_are_clear_errors(learner):
    model = learner(nn.Identity())
    x = torch.randn(8, 2)
    with pytest.raises(ValueError, match="class 0 of episode 0 has no support example"):
        model(x, torch.tensor([1, 1, 2, 2, 3, 3, 4, 4]), x)                   # labels 1 .. N
    with pytest.raises(ValueError, match="class 2 of episode 1 has no support example"):
        model(x.view(2, 4, 2), torch.tensor([[0, 1, 2, 3], [0, 1, 3, 3]]), x.view(2, 4, 2))   # a gap in one episode
    with pytest.raises(ValueError, match="4 ways but 3 support examples"):
        model(x[:3], torch.tensor([0, 1, 3]), x)
    with pytest.raises(ValueError, match="query labels from -100 to 3"):              # ignore_index is no escape
        model.loss(Episode(x[:4], torch.tensor([0, 1, 2, 3]), x[:2], torch.tensor([3, -100]), torch.zeros(4)))


def test_a_count_that_is_a_multiple_of_batch_scores_the_first_episodes_of_a_larger_count():
    """The same seed and batch give the same episodes: 4 episodes in chunks of 2 are the first 4 of 7 (what lets the
    black-box chapter score MAML on the first of the metric learners' episodes)."""
    data = torch.randn(8, 6, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    model = ProtoNet(nn.Linear(3, 2).double())

    def scores(episodes):
        return episode_accuracies(lambda t: model(t.support_x, t.support_y, t.query_x).sum((-2, -1)),
                                  EpisodeSampler(data, 3, 2, 3, seed=1), episodes, batch=2)

    assert torch.equal(scores(4), scores(7)[:4])


def test_a_test_shift_as_large_as_the_images_is_an_error_that_names_test_shift():
    model = ProtoNet(nn.Flatten(), test_shift=6).eval()
    episode = random_episodes(1, 2, 1, 1, image_size=6)
    with pytest.raises(ValueError, match="test_shift=6 pixels would shift 6x6 images out of view: use a shift below 6"):
        model(episode.support_x, episode.support_y, episode.query_x)


def test_squared_distances_are_never_negative_even_where_rounding_would_make_them_so():
    """‖a − b‖² ≥ 0 for every pair, as the docstring's clamp at zero promises: float32 embeddings with coinciding
    rows, where ‖a‖² − 2a·b + ‖b‖² rounds below zero. Reference: float64 cdist², within float32 rounding."""
    from lowlearn.meta.metric import squared_distances
    generator = torch.Generator().manual_seed(0)
    b = 3 + torch.randn(2, 5, 64, generator=generator)          # prototypes with a shared offset (ReLU-like)
    a = torch.cat([b, b + 1e-3 * torch.randn(2, 5, 64, generator=generator)], dim=1)   # queries on and near them
    d = squared_distances(a, b)
    assert (d >= 0).all()
    torch.testing.assert_close(d.double(), torch.cdist(a.double(), b.double()) ** 2, rtol=1e-4, atol=1e-4)

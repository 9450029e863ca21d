import copy
import warnings

import pytest
import torch
from torch import nn

from lowlearn.lowrank import LowRankConv2d, LowRankLinear
from lowlearn.models import MLP
from lowlearn.sparse import prune, prune_channels, prune_nm, scores
from lowlearn.sparse.export import CSRConv2d, CSRLinear, compact, export


def pruned_mlp(density=0.1, seed=0):
    torch.manual_seed(seed)
    model = MLP(in_features=20, hidden=(30, 16), out_features=5)
    prune(model, scores.magnitude(model), density)
    return model


def small_cnn(seed=0, padding=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=padding), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Sequential(nn.Conv2d(8, 6, 3, padding=padding, stride=2), nn.ReLU()),
                         nn.Flatten(), nn.LazyLinear(4))


def test_csr_export_matches_the_masked_model_and_stores_only_the_kept_weights():
    model = pruned_mlp()
    x = torch.randn(7, 20)
    exported = export(model, "csr")
    assert isinstance(exported[1], CSRLinear) and isinstance(exported[5], CSRLinear)
    torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-6)
    nnz = sum(layer.weight._nnz() for layer in exported.modules() if isinstance(layer, CSRLinear))
    assert nnz == sum(int(layer.weight.count_nonzero()) for layer in model.modules() if isinstance(layer, nn.Linear))
    assert hasattr(model[1], "parametrizations")              # the original keeps its masks
    assert not any(p.requires_grad for p in exported.parameters())


@pytest.mark.parametrize("padding", [0, 1])
def test_csr_convolution_matches_the_dense_one(padding):
    model = small_cnn(padding=padding)
    x = torch.randn(2, 3, 12, 12)
    model(x)                                                  # materialise the lazy layer
    prune(model, scores.magnitude(model), 0.3)
    model.eval()
    exported = export(model, "csr")
    assert isinstance(exported[0], CSRConv2d)
    torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)


def test_csr_export_survives_a_state_dict_round_trip(tmp_path):
    exported = export(pruned_mlp(), "csr")
    torch.save(exported.state_dict(), tmp_path / "sparse.pt")
    state = torch.load(tmp_path / "sparse.pt", weights_only=True)
    fresh = export(pruned_mlp(seed=1), "csr")
    fresh.load_state_dict(state)
    x = torch.randn(3, 20)
    torch.testing.assert_close(fresh(x), exported(x))


def test_min_sparsity_keeps_dense_layers_dense():
    model = MLP(in_features=20, hidden=(30,), out_features=5)
    prune(model, scores.magnitude(model), {"1": 0.1, "3": 1.0})
    exported = export(model, "csr", min_sparsity=0.5)
    assert isinstance(exported[1], CSRLinear) and isinstance(exported[3], nn.Linear)


def test_two_four_export_falls_back_with_a_clear_warning_off_the_gpu():
    torch.manual_seed(0)
    model = MLP(in_features=16, hidden=(8,), out_features=4)
    prune_nm(model, 2, 4)
    with pytest.warns(UserWarning, match="need a CUDA device"):
        exported = export(model, "2:4")
    assert isinstance(exported[1], nn.Linear)
    x = torch.randn(3, 16)
    torch.testing.assert_close(exported(x), model(x))


def test_low_rank_layers_become_two_thin_layers():
    torch.manual_seed(0)
    model = nn.Sequential(LowRankConv2d(nn.Conv2d(3, 8, 3, padding=1, stride=2), rank=2), nn.ReLU(), nn.Flatten(),
                          LowRankLinear.from_linear(nn.Linear(8 * 4 * 4, 5), rank=3))
    x = torch.randn(2, 3, 8, 8)
    exported = export(model, "dense")
    first, second = exported[3]
    assert (first.weight.shape, second.weight.shape) == ((3, 128), (5, 3))
    assert exported[0][0].weight.shape == (2, 3, 3, 3) and exported[0][1].weight.shape == (8, 2, 1, 1)
    torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in exported.parameters())          # for inference


def test_low_rank_layers_with_a_full_core_export_to_the_same_function():
    # During training S stops being diagonal: the thin layers must compute (U S)(Vᵀ x), not (U Sᵀ)(Vᵀ x).
    torch.manual_seed(0)
    model = nn.Sequential(LowRankConv2d(nn.Conv2d(3, 6, 3, padding=1), rank=3), nn.ReLU(), nn.Flatten(),
                          LowRankLinear.from_linear(nn.Linear(6 * 4 * 4, 5), rank=3))
    for layer in (model[0], model[3]):
        layer.set_factors(layer.U, torch.randn(3, 3), layer.V)
    x = torch.randn(2, 3, 4, 4)
    dense = nn.Sequential(model[0].to_dense(), nn.ReLU(), nn.Flatten(), model[3].to_dense())
    torch.testing.assert_close(export(model, "dense")(x), dense(x), rtol=1e-5, atol=1e-5)


def test_compact_cuts_pruned_neurons_out_and_keeps_the_outputs():
    torch.manual_seed(0)
    model = MLP(in_features=20, hidden=(30, 16), out_features=5, activation=nn.Sigmoid)
    prune_channels(model, 0.5)                      # sigmoid(0) = 0.5: removed units feed a constant onwards
    x = torch.randn(6, 20)
    small = compact(model)
    assert [layer.weight.shape for layer in small if isinstance(layer, nn.Linear)] == [(15, 20), (8, 15), (5, 8)]
    assert [(layer.in_features, layer.out_features) for layer in small if isinstance(layer, nn.Linear)] == [
        (20, 15), (15, 8), (8, 5)]
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)


def test_compact_handles_batch_norm_pooling_and_flatten():
    model = small_cnn(padding=0)
    x = torch.randn(4, 3, 14, 14)
    model(x)
    model.train()
    for _ in range(3):                              # non-trivial running statistics
        model(torch.randn(8, 3, 14, 14))
    model.eval()
    prune_channels(model, 0.5)
    small = compact(model)
    assert small[0].weight.shape[0] == 4 and small[1].num_features == 4 and small[4][0].weight.shape[:2] == (3, 4)
    assert small[6].weight.shape[1] == 3 * 2 * 2
    assert (small[0].in_channels, small[0].out_channels, small[4][0].in_channels, small[4][0].out_channels) == (
        3, 4, 4, 3)
    assert small[6].in_features == 3 * 2 * 2 and small[1].running_mean.shape == small[1].running_var.shape == (4,)
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
    assert hasattr(model[0], "parametrizations") and model[0].weight.shape == (8, 3, 3, 3)   # the original unchanged


def test_compact_refuses_what_it_cannot_fold_exactly():
    model = small_cnn(padding=1)
    model(torch.randn(2, 3, 12, 12))
    with torch.no_grad():
        model[1].bias.fill_(0.5)                    # relu(β) > 0 flows from removed channels into a padded conv
    prune_channels(model, 0.5)
    with pytest.raises(ValueError, match="padded convolution"):
        compact(model)
    with pytest.raises(ValueError, match="nn.Sequential"):
        compact(nn.Linear(2, 2))
    # A grouped convolution: cutting filters out would move the kept ones into other groups.
    grouped = nn.Sequential(nn.Conv2d(4, 8, 1, groups=2), nn.ReLU(), nn.Conv2d(8, 2, 1))
    with torch.no_grad():
        grouped[0].weight[1:5] = 0
    with pytest.raises(ValueError, match="groups=1"):
        compact(grouped)


class Residual(nn.Sequential):
    """``x + body(x)``: a Sequential whose own forward does not apply its layers one after another."""

    def forward(self, x):
        return x + super().forward(x)


def test_compact_takes_a_sequential_with_its_own_forward_as_one_layer_and_refuses_to_cut_through_it():
    # It was opened as a chain: units cut out of the block's last layer broke the skip connection's sum.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), Residual(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), nn.ReLU(),
                          nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight[:4] *= 1e-3
        model[1][2].weight[4:] *= 1e-3
    prune_channels(model, 0.5, layers=["0", "1.2"])
    with pytest.raises(ValueError, match="cannot see through a Residual"):
        compact(model)
    with pytest.raises(ValueError, match="whose own forward may not apply its layers in order"):
        compact(Residual(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)))


def test_compact_refuses_a_batch_norm_after_a_flatten_of_feature_maps():
    # It failed inside torch ("running_mean should contain 4 elements not 144").
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(8 * 36), nn.Linear(8 * 36, 2))
    model(torch.randn(4, 3, 8, 8))
    prune_channels(model, 0.5, layers=["0"])
    with pytest.raises(ValueError, match="cannot cut removed channels out of a BatchNorm1d after a Flatten"):
        compact(model)


def test_compact_refuses_a_padded_average_pooling_that_counts_the_padding():
    def cnn(count_include_pad):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.AvgPool2d(3, 1, padding=1, count_include_pad=count_include_pad), nn.Conv2d(8, 4, 3))
        with torch.no_grad():
            model[1].bias.fill_(0.5)                # removed channels then output relu(β): a constant to fold
        return model.eval()

    x = torch.randn(2, 3, 10, 10)
    for count_include_pad in (True, False):
        model = cnn(count_include_pad)
        prune_channels(model, 0.5)
        if count_include_pad:
            with pytest.raises(ValueError, match="count_include_pad"):
                compact(model)
        else:
            torch.testing.assert_close(compact(model)(x), model(x), rtol=1e-5, atol=1e-5)


def test_compact_refuses_an_average_pooling_with_a_divisor_override():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2, divisor_override=1),
                          nn.Conv2d(8, 4, 3)).eval()
    with torch.no_grad():
        model[1].bias.fill_(0.5)                    # a removed channel passes 4 · relu(β) on, not relu(β)
    prune_channels(model, 0.5)
    with pytest.raises(ValueError, match="divisor_override"):
        compact(model)


@pytest.mark.parametrize("affine", [True, False])
def test_compact_folds_a_removed_channel_through_a_batch_norm_with_batch_statistics(affine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=affine, track_running_stats=False), nn.ReLU(),
                          nn.Conv2d(8, 4, 3))
    if affine:
        with torch.no_grad():
            model[1].bias.uniform_(0.2, 0.8)        # a constant channel normalises to 0 and comes out as β
    prune_channels(model, 0.5)
    x = torch.randn(4, 3, 10, 10)
    small = compact(model)
    assert small[0].weight.shape[0] == 4 and small[1].num_features == 4
    torch.testing.assert_close(small(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_compact_keeps_the_parameters_as_trainable_as_they_were():
    torch.manual_seed(0)
    model = MLP(in_features=20, hidden=(30, 16), out_features=5)
    prune_channels(model, 0.5)
    small = compact(model)
    assert all(p.requires_grad for p in small.parameters())          # ready to fine-tune
    model.requires_grad_(False)
    assert not any(p.requires_grad for p in compact(model).parameters())


def test_csr_convolution_takes_an_unbatched_image_as_nn_conv2d_does():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3, padding=1)
    prune(conv, {"": conv.weight.detach().abs()}, 0.3)
    exported = export(conv, "csr")
    x = torch.randn(4, 5, 5)
    torch.testing.assert_close(exported(x), conv(x), rtol=1e-5, atol=1e-6)


def test_export_keeps_a_module_used_at_two_places_shared():
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    prune(model, scores.magnitude(model), 0.2)
    exported = export(model, "csr")
    assert isinstance(exported[0], CSRLinear) and exported[2] is exported[0]
    x = torch.randn(3, 8)
    torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-6)


def test_csr_models_deep_copy_and_move_like_any_module():
    exported = export(pruned_mlp(), "csr")
    twin = copy.deepcopy(exported)
    x = torch.randn(3, 20)
    torch.testing.assert_close(twin(x), exported(x))
    assert twin[1].values.data_ptr() != exported[1].values.data_ptr()
    torch.testing.assert_close(exported.double()(x.double()), twin(x).double(), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")     # torch's, on the 2×2 'same'
def test_export_keeps_what_a_format_cannot_take_dense_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 2, padding="same"))   # pads right more
    prune(model, scores.magnitude(model), 0.3)
    with pytest.warns(UserWarning) as caught:
        exported = export(model, "csr")
    assert [str(w.message)[:45] for w in caught] == ["layer '0' stays dense: CSRConv2d supports con",
                                                     "layer '1' stays dense: CSRConv2d pads both si"]
    assert isinstance(exported[0], nn.Conv2d) and isinstance(exported[1], nn.Conv2d)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(exported(x), model(x))
    with pytest.raises(ValueError, match="groups=2"):
        CSRConv2d(model[0])
    # 2:4 off the GPU, whatever the shape: a warning, not a crash (a reduction dimension of 10 is not in fours)
    odd = nn.Linear(10, 5)
    with pytest.warns(UserWarning, match="stays dense"):
        export(nn.Sequential(odd), "2:4")
    # a convolution with 2:4, on a GPU too: torch's semi-structured kernels take Linear layers only
    with pytest.warns(UserWarning) as caught:
        exported = export(nn.Sequential(nn.Conv2d(4, 8, 1)), "2:4")
    assert [str(w.message) for w in caught] == ["layer '0' stays dense: torch's 2:4 kernels take nn.Linear layers "
                                                "only (export it as 'csr')"]
    assert type(exported[0]) is nn.Conv2d


def test_a_model_that_is_one_layer_is_exported_whole():
    torch.manual_seed(0)
    layer = nn.Linear(20, 8)
    prune(layer, {"": layer.weight.detach().abs()}, 0.2)
    exported = export(layer, "csr")
    assert isinstance(exported, CSRLinear) and not exported.training
    x = torch.randn(3, 20)
    torch.testing.assert_close(exported(x), layer(x))


def test_unknown_format_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown format"):
        export(pruned_mlp(), "coo")
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"min_sparsity must be in \[0, 1\]"):
            export(pruned_mlp(), "csr", min_sparsity=bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export(pruned_mlp(), "csr")                 # no beta-state warning leaks out


def test_an_exported_model_counts_the_macs_of_its_stored_weights():
    from lowlearn.cost import count_flops
    from lowlearn.sparse.flops import model_sparse_flops

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    prune(model, scores.magnitude(model), 0.2)
    x = torch.randn(2, 3, 6, 6)
    exported = export(model, "csr")
    assert isinstance(exported[0], CSRConv2d) and isinstance(exported[3], CSRLinear)
    kept = {name: int(layer.weight.count_nonzero()) for name, layer in (("0", model[0]), ("3", model[3]))}
    count = count_flops(exported, x)
    assert count.per_layer == {"0": kept["0"] * 6 * 6, "3": kept["3"]}
    assert count.total == model_sparse_flops(model, x) == model_sparse_flops(exported, x)


def test_layers_whose_weights_go_to_fused_attention_kernels_stay_dense():
    # MultiheadAttention passes out_proj.weight to its kernel, and TransformerEncoderLayer's fast path passes
    # every weight: a CSR weight there made the exported model fail.
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), nn.Linear(16, 4))
    prune(model, scores.magnitude(model), 0.2)
    x = torch.randn(2, 5, 16)
    with pytest.warns(UserWarning, match="part of a TransformerEncoderLayer, which passes its weights to fused"):
        exported = export(model, "csr")
    assert isinstance(exported[1], CSRLinear) and type(exported[0].linear1) is nn.Linear
    with torch.no_grad():
        assert torch.allclose(exported(x), model.eval()(x), atol=1e-5)


def test_a_transformer_decoder_layer_exports_its_feed_forward_layers():
    # A TransformerDecoderLayer calls linear1 and linear2 (it has no fused path): they stayed dense, with a warning
    # that blamed fused kernels. Only its attention modules' output projections stay dense.
    torch.manual_seed(0)
    model = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    prune(model, scores.magnitude(model), 0.2)
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exported = export(model, "csr")
    assert sorted(str(w.message).split("'")[1] for w in caught) == ["multihead_attn.out_proj", "self_attn.out_proj"]
    assert isinstance(exported.linear1, CSRLinear) and isinstance(exported.linear2, CSRLinear)
    with torch.no_grad():
        torch.testing.assert_close(exported(x, memory), model.eval()(x, memory), rtol=1e-5, atol=1e-5)


def test_multihead_attention_keeps_its_output_projection_dense():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention, self.head = nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.attention(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    model, x = Attention().eval(), torch.randn(2, 5, 16)
    with torch.no_grad():
        for layer in (model.attention.out_proj, model.head):
            layer.weight.mul_(torch.rand_like(layer.weight) > 0.8)
    with pytest.warns(UserWarning, match="'attention.out_proj' stays dense: it is part of a MultiheadAttention"):
        exported = export(model, "csr")
    assert isinstance(exported.head, CSRLinear)
    with torch.no_grad():
        assert torch.allclose(exported(x), model(x), atol=1e-5)


def test_a_model_that_is_itself_an_attention_module_stays_dense():
    torch.manual_seed(0)
    for model, call in ((nn.MultiheadAttention(16, 2, batch_first=True), lambda m, x: m(x, x, x)[0]),
                        (nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), lambda m, x: m(x))):
        prune(model, scores.magnitude(model), 0.2)
        x = torch.randn(2, 5, 16)
        with pytest.warns(UserWarning, match="stays dense"):
            exported = export(model, "csr")
        assert not any(isinstance(layer, CSRLinear) for layer in exported.modules())
        with torch.no_grad():
            assert torch.allclose(call(exported, x), call(model.eval(), x), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers_stay_dense_in_csr_on_the_cpu(dtype):
    model = pruned_mlp().to(dtype)
    with pytest.warns(UserWarning, match=f"no {dtype} kernel on the CPU"):
        exported = export(model, "csr")
    assert not any(isinstance(layer, CSRLinear) for layer in exported.modules())
    exported(torch.randn(2, 20, dtype=dtype))


def test_low_rank_layers_export_in_their_own_precision():
    torch.manual_seed(0)
    model = nn.Sequential(LowRankConv2d(nn.Conv2d(3, 8, 3, padding=1, dtype=torch.float64), rank=4), nn.Flatten(),
                          LowRankLinear.from_linear(nn.Linear(8 * 25, 6, dtype=torch.float64), rank=3))
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert (export(model, "dense")(x) - model(x)).abs().max() < 1e-12             # was 1e-8: through float32


def test_csr_convolution_with_stride_dilation_and_a_rectangular_kernel_matches_the_dense_one():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 3))
    prune(conv, {"": conv.weight.detach().abs()}, 0.4)
    exported = export(conv, "csr")
    assert isinstance(exported, CSRConv2d)
    x = torch.randn(2, 3, 11, 10)
    # (11 + 2·2 − 2·(3 − 1) − 1) // 2 + 1 = 6 rows, (10 + 2·1 − 3·(2 − 1) − 1) // 1 + 1 = 9 columns
    assert exported(x).shape == (2, 5, 6, 9)
    torch.testing.assert_close(exported(x), conv(x), rtol=1e-5, atol=1e-6)


def test_convolutions_that_do_not_pad_with_zeros_stay_dense_in_csr():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    prune(conv, {"": conv.weight.detach().abs()}, 0.3)
    with pytest.warns(UserWarning, match="padding_mode='reflect'"):
        exported = export(nn.Sequential(conv), "csr")
    assert type(exported[0]) is nn.Conv2d
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(exported(x), conv(x))
    with pytest.raises(ValueError, match="zero padding"):
        CSRConv2d(exported[0])


def test_dense_format_only_squashes_the_masks():
    model = pruned_mlp()
    x = torch.randn(4, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exported = export(model, "dense")
    linears = [layer for layer in exported if isinstance(layer, nn.Linear)]
    assert len(linears) == 3 and all(type(layer) is nn.Linear for layer in linears)
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(linears, (model[1], model[3], model[5])))
    torch.testing.assert_close(exported(x), model(x))


def test_a_layer_whose_name_only_starts_like_an_attention_module_is_exported():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention, self.attention_head = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

        def forward(self, x):
            return self.attention_head(self.attention(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    model, x = Attention().eval(), torch.randn(2, 4, 8)
    with torch.no_grad():
        model.attention_head.weight.mul_(torch.rand_like(model.attention_head.weight) > 0.5)
    with pytest.warns(UserWarning) as caught:
        exported = export(model, "csr")
    assert [str(w.message).split(":")[0] for w in caught] == ["layer 'attention.out_proj' stays dense"]
    assert isinstance(exported.attention_head, CSRLinear)
    with torch.no_grad():
        assert torch.allclose(exported(x), model(x), atol=1e-5)


def test_a_two_four_layer_that_torch_refuses_stays_dense_with_a_warning(monkeypatch):
    import lowlearn.sparse.export as export_module

    torch.manual_seed(0)
    model = MLP(in_features=16, hidden=(8,), out_features=4)
    prune_nm(model, 2, 4)
    monkeypatch.setattr(export_module, "semi_structured_unavailable", lambda layer: None)   # as if on a GPU
    with pytest.warns(UserWarning) as caught:
        exported = export(model, "2:4")
    assert [str(w.message).split(":")[0] for w in caught] == ["layer '1' stays dense", "layer '3' stays dense"]
    assert all("torch's 2:4 kernels refuse it" in str(w.message) for w in caught)
    assert type(exported[1]) is nn.Linear and type(exported[3]) is nn.Linear
    x = torch.randn(3, 16)
    torch.testing.assert_close(exported(x), model(x))


def test_two_four_kernels_take_only_fp16_or_bf16_two_four_weights_on_an_ampere_gpu(monkeypatch):
    from types import SimpleNamespace

    from lowlearn.sparse.export import semi_structured_unavailable

    def on_gpu(weight):                               # a weight as a CUDA layer would show it
        return SimpleNamespace(weight=SimpleNamespace(device=torch.device("cuda", 0), dtype=weight.dtype,
                                                      shape=weight.shape, detach=lambda: weight))

    capability = [(8, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    two_four = torch.tensor([[1.0, 0.0, -2.0, 0.0, 0.0, 0.0, 3.0, 4.0]] * 2, dtype=torch.float16)
    assert semi_structured_unavailable(on_gpu(two_four)) is None
    assert semi_structured_unavailable(on_gpu(two_four.bfloat16())) is None
    assert "fp16 or bf16" in semi_structured_unavailable(on_gpu(two_four.float()))
    three = two_four.clone()
    three[1, 1] = 5.0                                 # three of the first four weights of row 1
    assert "not 2:4 sparse" in semi_structured_unavailable(on_gpu(three))
    assert "not 2:4 sparse" in semi_structured_unavailable(on_gpu(two_four[:, :6]))
    capability[0] = (7, 5)
    assert "compute capability 8.0" in semi_structured_unavailable(on_gpu(two_four))


def test_compact_cuts_only_units_with_no_weight_left():
    torch.manual_seed(0)
    model = MLP(in_features=20, hidden=(30, 16), out_features=5)
    units = prune_channels(model, 0.5)
    prune(model, scores.magnitude(model), 0.4)        # unstructured zeros inside the kept units
    alive = [int(layer.weight.ne(0).any(dim=1).sum()) for layer in (model[1], model[3])]
    assert alive == [int(units["1"].sum()), int(units["3"].sum())] == [15, 8]
    assert all(bool(layer.weight[units[name]].eq(0).any()) for name, layer in (("1", model[1]), ("3", model[3])))
    small = compact(model)
    assert [layer.weight.shape for layer in small if isinstance(layer, nn.Linear)] == [(15, 20), (8, 15), (5, 8)]
    x = torch.randn(6, 20)
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)


def test_compact_folds_the_bias_of_a_unit_without_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight[2] = 0                        # the unit outputs tanh(b₂), whatever the input
        model[0].bias[2] = 0.7
    small = compact(model)
    assert small[0].weight.shape == (5, 4) and small[2].weight.shape == (3, 5)
    x = torch.randn(5, 4)
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)


def test_compact_passes_over_a_block_it_cannot_see_through_where_no_unit_is_removed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), Residual(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), nn.ReLU(),
                          nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    prune_channels(model, 0.5, layers=["3"])
    small = compact(model)
    assert small[0].weight.shape == (8, 6) and small[3].weight.shape == (4, 8) and small[5].weight.shape == (3, 4)
    x = torch.randn(4, 6)
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_bias_compact_adds_to_fold_a_constant_is_as_trainable_as_the_weight():
    torch.manual_seed(0)
    for trainable in (True, False):
        model = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3, bias=False))
        prune_channels(model, 0.5, layers=["0"])      # removed units pass sigmoid(0) = 0.5 on
        model.requires_grad_(trainable)
        small = compact(model)
        assert small[2].bias is not None and small[2].bias.requires_grad == trainable
        x = torch.randn(5, 4)
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)


def test_compact_cuts_through_dropout_adaptive_pooling_and_a_later_batch_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sigmoid(), nn.Dropout(0.3), nn.BatchNorm2d(8),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * 4, 3))
    model.train()
    model(torch.randn(8, 3, 7, 7))                   # non-trivial running statistics
    model.eval()
    prune_channels(model, 0.5)                       # removed channels pass bn(sigmoid(0)) on: a constant
    small = compact(model)
    assert small[0].weight.shape == (4, 3, 3, 3) and small[3].num_features == 4 and small[6].weight.shape == (3, 16)
    assert small[3].running_mean.shape == (4,)
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation, dropout", [(nn.ReLU6, nn.Dropout2d), (nn.Hardswish, nn.AlphaDropout),
                                                 (nn.SELU, nn.FeatureAlphaDropout), (nn.Mish, nn.Dropout)])
def test_compact_cuts_through_channel_dropout_and_other_elementwise_activations(activation, dropout):
    # Only nn.Dropout and a few activations were let through: a CNN with Dropout2d or ReLU6 was refused.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), activation(), dropout(0.3), nn.MaxPool2d(2), nn.Conv2d(8, 6, 3),
                          activation(), nn.Flatten(), nn.Linear(24, 3)).eval()
    with torch.no_grad():
        model[0].weight[[1, 5]] = 0                  # removed; their biases pass on activation(b): a constant
    small = compact(model)
    assert small[0].weight.shape == (6, 3, 3, 3) and small[4].weight.shape == (6, 6, 3, 3)
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


def test_compact_cuts_channels_feeding_a_padded_convolution_a_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1, bias=False))
    prune_channels(model, 0.5)                       # removed channels output relu(0) = 0: nothing to fold
    small = compact(model)
    assert small[0].weight.shape == (4, 3, 3, 3) and small[2].weight.shape == (4, 4, 3, 3) and small[2].bias is None
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)


def test_compact_folds_a_constant_into_a_convolution_with_valid_padding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sigmoid(), nn.Conv2d(8, 4, 3, padding="valid"))
    prune_channels(model, 0.5)                       # removed channels output sigmoid(0) = 0.5 everywhere
    small = compact(model)
    assert small[2].weight.shape == (4, 4, 3, 3)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_two_four_layer_counts_half_the_macs_of_the_dense_one(monkeypatch):
    import lowlearn.sparse.export as export_module
    from lowlearn.cost import count_flops
    from lowlearn.sparse.export import SemiStructuredLinear
    from lowlearn.sparse.flops import model_sparse_flops

    torch.manual_seed(0)
    model = MLP(in_features=16, hidden=(8,), out_features=4)
    prune_nm(model, 2, 4)
    monkeypatch.setattr(export_module, "semi_structured_unavailable", lambda layer: None)   # as if on a GPU,
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda weight: weight)  # with a dense stand-in
    exported = export(model, "2:4")
    assert isinstance(exported[1], SemiStructuredLinear) and isinstance(exported[3], SemiStructuredLinear)
    x = torch.randn(3, 16)
    assert count_flops(exported, x).per_layer == {"1": 16 * 8 // 2, "3": 8 * 4 // 2}
    assert model_sparse_flops(exported, x) == model_sparse_flops(model, x) == (16 * 8 + 8 * 4) // 2
    torch.testing.assert_close(exported(x), model(x))


class TwoFourStandIn(torch.Tensor):
    """A dense CPU weight that sends ``aten.linear`` to torch's own 2:4 handler, as a 2:4 sparse weight does."""

    @staticmethod
    def __new__(cls, dense):
        return torch.Tensor._make_wrapper_subclass(cls, dense.shape, dtype=dense.dtype, device=dense.device)

    def __init__(self, dense):
        self.dense = dense

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from torch.sparse._semi_structured_ops import semi_sparse_linear

        args = [a.dense if isinstance(a, TwoFourStandIn) else a for a in args]
        return semi_sparse_linear(func, types, args) if func is torch.ops.aten.linear.default else func(*args)


def test_a_two_four_layer_takes_a_non_contiguous_input_under_inference_mode(monkeypatch):
    # under inference_mode F.linear reaches torch's 2:4 handler whole, which folds the input with view: a transposed
    # batch of sequences failed with "view size is not compatible with input tensor's size and stride"
    import lowlearn.sparse.export as export_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8, bias=False))     # with a bias the handler asserts a 2:4 tensor's type
    prune_nm(model, 2, 4)
    monkeypatch.setattr(export_module, "semi_structured_unavailable", lambda layer: None)   # as if on a GPU
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", TwoFourStandIn)
    exported = export(model, "2:4")
    x = torch.randn(2, 3, 16).transpose(0, 1)
    with torch.inference_mode():
        torch.testing.assert_close(exported(x), model(x))


def test_compact_cuts_the_inputs_of_a_linear_applied_to_sequences_then_flattened():
    """A Linear acts on the last dimension, so after a Flatten its unit c sits at t·C + c (fastest), not at c·T + t
    as a Conv2d's channel does; the removed units pass sigmoid(0) = 0.5 on, folded into the next layer's bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Flatten(), nn.Linear(3 * 6, 2)).double()
    prune_channels(model, 0.5, layers=["0"])
    x = torch.randn(5, 3, 4, dtype=torch.float64)                       # 3 positions of 4 features
    small = compact(model)
    assert small[3].in_features == 3 * 3
    torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-12)


def test_compact_keeps_one_unit_of_a_layer_whose_units_are_all_removed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).double().eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[1].bias.fill_(0.3)                          # every channel outputs relu(bn(b)), a constant
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    small = compact(model)
    assert small[0].out_channels == 1 and small[1].num_features == 1 and small[4].in_features == 16
    torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-12)


def test_compact_refuses_a_shared_layer_another_batch_norm_and_a_partial_flatten():
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    model = nn.Sequential(nn.Linear(6, 6), nn.Sigmoid(), shared, nn.Sigmoid(), shared)
    prune_channels(model, 0.5, layers=["0"])
    with pytest.raises(ValueError, match="uses a Linear/Conv2d layer at several places"):
        compact(model)
    model = nn.Sequential(nn.Linear(6, 6), nn.SyncBatchNorm(6, track_running_stats=False), nn.Linear(6, 2))
    prune_channels(model, 0.5, layers=["0"])
    with pytest.raises(ValueError, match="cannot see through a SyncBatchNorm"):
        compact(model)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(2), nn.Linear(16, 2))
    prune_channels(model, 0.5, layers=["0"])
    with pytest.raises(ValueError, match=r"Flatten\(\) of all but the batch dimension only"):
        compact(model)


def test_compact_folds_no_constant_through_a_batch_norm_with_batch_statistics_and_no_affine_shift():
    # compact's docstring: a unit whose weights are all zero is removed and its constant output folded into the next
    # bias. Here the constant is the bias 0.5; a batch norm with batch statistics normalises a channel constant over
    # the batch to 0 and, without affine parameters, adds no shift, so nothing may be folded (not 0.5 passed on).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False, track_running_stats=False), nn.ReLU(),
                          nn.Conv2d(8, 4, 3))
    with torch.no_grad():
        model[0].weight[:4] = 0
        model[0].bias[:4] = 0.5
    x = torch.randn(4, 3, 10, 10)
    small = compact(model)
    assert small[0].weight.shape[0] == 4 and small[3].weight.shape[1] == 4
    torch.testing.assert_close(small(x), model.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 5, 3, padding="same"), nn.Conv2d(3, 5, (3, 5), padding="same",
                                                                                 dilation=2),
                                  nn.Conv2d(3, 5, 3, padding="valid", stride=2)])
def test_a_csr_convolution_takes_same_and_valid_padding(conv):
    torch.manual_seed(0)
    model = nn.Sequential(conv)
    prune(model, scores.magnitude(model), 0.3)
    exported = export(model, "csr")
    assert isinstance(exported[0], CSRConv2d)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_printed_csr_layer_shows_its_shape_and_stored_weights():
    linear = nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 2, 0, 3], [0, 0, 0, 0]]))
    assert repr(CSRLinear(linear)) == "CSRLinear(in_features=4, out_features=3, nnz=3)"
    conv = nn.Conv2d(3, 8, (3, 5), stride=2, padding=1)
    with torch.no_grad():
        conv.weight[:, :, 0] = 0                                       # 8 · 3 · 5 of the 360 weights
    assert repr(CSRConv2d(conv)) == ("CSRConv2d(3, 8, kernel_size=(3, 5), stride=(2, 2), padding=(1, 1), "
                                     "dilation=(1, 1), nnz=240)")


def test_a_layer_with_its_own_forward_stays_dense_with_a_warning():
    # The CNP decoder's first layer is an nn.Linear that takes (r, x_T): a CSRLinear in its place took one input.
    from lowlearn.meta.cnp import CNP

    torch.manual_seed(0)
    model = CNP(1, 1, hidden=16)
    prune(model, scores.magnitude(model), 0.3)
    with pytest.warns(UserWarning) as caught:
        exported = export(model, "csr")
    assert [str(w.message) for w in caught] == ["layer 'decoder.0' stays dense: it is a _ConditionedLinear, whose own "
                                                "forward a sparse layer would not reproduce (it computes nn.Linear's)"]
    assert type(exported.decoder[0]).__name__ == "_ConditionedLinear" and isinstance(exported.decoder[2], CSRLinear)
    context_x, context_y, target_x = torch.randn(2, 5, 1), torch.randn(2, 5, 1), torch.randn(2, 7, 1)
    expected, got = model(context_x, context_y, target_x), exported(context_x, context_y, target_x)
    torch.testing.assert_close(got.mean, expected.mean)
    torch.testing.assert_close(got.stddev, expected.stddev)

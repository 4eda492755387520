"""model/'s networks and kinds: shapes, parameter count and groups, the cluster head's reset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster_train.model.baselines import Decoder
from cluster_train.model.blocks import ClusterHead, Encoder, ModelConfig, conv_sizes, count_parameters
from cluster_train.model.kinds import MODEL_KINDS, LossWeights, Stage, build_model, get_kind
from data_prep.config import ConfigError, load_config

B = 3
EXPECTED_KEYS = {
    "deepemocluster": {"features", "cluster_logits", "prediction"},
    "cnn_regressor": {"features", "prediction"},
    "cnn_ae": {"features", "prediction", "reconstruction"},
    "cnn_vae": {"features", "prediction", "reconstruction", "mu", "logvar"},
}


@pytest.fixture(scope="module")
def chunks() -> torch.Tensor:
    return torch.randn(B, 62, 128, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_forward_shapes(kind: str, chunks: torch.Tensor) -> None:
    model = build_model(kind, ModelConfig())
    outputs = model(chunks)
    assert set(outputs) == EXPECTED_KEYS[kind]
    assert outputs["features"].shape == (B, 256)
    assert outputs["prediction"].shape == (B, 3)
    if "cluster_logits" in outputs:
        assert outputs["cluster_logits"].shape == (B, 10)
    if "reconstruction" in outputs:
        assert outputs["reconstruction"].shape == chunks.shape
        image = chunks.unsqueeze(1)  # a (B, 1, F, M) input gets a (B, 1, F, M) reconstruction
        assert model(image)["reconstruction"].shape == image.shape
    assert model.embed(chunks).shape == (B, 256)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_param_groups_are_disjoint_and_cover_every_parameter(kind: str) -> None:
    model = build_model(kind, ModelConfig())
    grouped = [id(p) for params in model.param_groups().values() for p in params]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}


def test_deepemocluster_groups_keep_top_layer_apart() -> None:
    model = build_model("deepemocluster", ModelConfig())
    groups = model.param_groups()
    assert set(groups) == {"encoder", "cluster_top", "regressor"}
    assert {id(p) for p in groups["cluster_top"]} == {id(p) for p in model.cluster_head.top.parameters()}
    model.cluster_head.reset_top(7)  # still disjoint and complete after a new K
    grouped = [id(p) for params in model.param_groups().values() for p in params]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())


def test_parameter_count_about_one_million() -> None:
    count = count_parameters(build_model("deepemocluster", ModelConfig()))
    assert 0.8e6 <= count <= 1.3e6, count


def test_encoder_shapes_follow_the_config() -> None:
    config = ModelConfig()
    assert conv_sizes(config)[-1] == (2, 4)
    encoder = Encoder(config)
    assert encoder.flat_dim == 1024
    assert encoder.conv(torch.zeros(2, 1, 62, 128)).shape == (2, 128, 2, 4)
    small = ModelConfig(channels=[8, 16], strides=[2, 2], chunk_frames=30, n_mels=40, feature_dim=32)
    assert Encoder(small).flat_dim == 16 * 8 * 10
    assert Decoder(small)(torch.zeros(2, 32)).shape == (2, 1, 30, 40)


def test_embed_is_pre_relu_and_forward_is_post_relu(chunks: torch.Tensor) -> None:
    encoder = Encoder(ModelConfig()).eval()
    features = encoder.embed(chunks)
    assert (features < 0).any()
    assert torch.equal(encoder(chunks), features.relu())  # dropout is off in eval mode


def test_wrong_input_shape_is_an_error() -> None:
    model = build_model("cnn_regressor", ModelConfig())
    with pytest.raises(ValueError, match=r"\(B, 62, 128\)"):
        model(torch.zeros(2, 64, 128))


def test_reset_top_changes_weights_and_output_size(chunks: torch.Tensor) -> None:
    head = ClusterHead(256, 10)
    before = head.top.weight.detach().clone()
    same = head.reset_top(10, generator=torch.Generator().manual_seed(1))
    assert same is head.top and same.out_features == 10
    assert not torch.equal(before, head.top.weight)
    assert torch.all(head.top.bias == 0)
    again = ClusterHead(256, 10)
    again.reset_top(10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.top.weight, head.top.weight)  # same seed, same layer (every DDP rank)
    bigger = head.reset_top(20)
    assert bigger is head.top and head(torch.randn(B, 256)).shape == (B, 20)


def test_per_attribute_mode_has_one_output(chunks: torch.Tensor) -> None:
    model = build_model("deepemocluster", ModelConfig(attributes=("arousal",), num_clusters=30))
    outputs = model(chunks)
    assert outputs["prediction"].shape == (B, 1)
    assert outputs["cluster_logits"].shape == (B, 30)


def test_vae_samples_in_training_and_uses_mu_in_eval(chunks: torch.Tensor) -> None:
    model = build_model("cnn_vae", ModelConfig())
    model.eval()
    assert torch.equal(model(chunks)["reconstruction"], model(chunks)["reconstruction"])
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(chunks)["reconstruction"], model(chunks)["reconstruction"])


def test_unknown_kind_names_the_field_and_choices() -> None:
    with pytest.raises(ValueError, match="kind.*'resnet'.*deepemocluster.*cnn_vae"):
        build_model("resnet", ModelConfig())


def test_config_validation_and_loading() -> None:
    with pytest.raises(ConfigError, match="model.strides"):
        ModelConfig(channels=[32, 64], strides=[1])
    with pytest.raises(ConfigError, match="model.dropout"):
        ModelConfig(dropout=1.0)
    config = load_config(ModelConfig, overrides=["attributes=[valence]", "num_clusters=20"])
    assert config.attributes == ("valence",) and config.num_clusters == 20


@pytest.mark.parametrize("name", MODEL_KINDS)
def test_a_kind_steps_every_parameter_group_of_its_network_in_its_stages(name: str) -> None:
    kind = get_kind(name)
    groups = set(kind.build(ModelConfig()).param_groups())
    assert {group for stage in kind.stages for group in stage.groups} == groups
    assert [stage.number for stage in kind.stages] == ([2] if name == "cnn_regressor" else [1, 2])
    assert kind.clusters == (name == "deepemocluster")
    # DDP searches for unused parameters only where a stage leaves some out
    assert kind.skips_parameters(kind.build(ModelConfig())) == (name != "cnn_regressor")


def test_each_kind_computes_its_own_losses(chunks: torch.Tensor) -> None:
    """DeepEmoCluster: CE in stage 1, (1 - CCC) + lambda CE in stage 2; CNN-AE: reconstruction (+ CCC);
    CNN-VAE: the AE's + the weighted KL. Checked against the loss functions called directly."""
    from cluster_train.model.losses import ccc_loss, cluster_ce, reconstruction_loss, sentence_mean, vae_kl

    torch.manual_seed(0)
    targets, labels = torch.randn(1, 3), torch.tensor([0, 1, 2])
    weights = LossWeights(cluster=0.5, reconstruction=2.0, kl=3.0)
    stage1, stage2 = Stage(1, "unlabeled", ()), Stage(2, "labeled", ())
    for name in MODEL_KINDS:
        kind = get_kind(name, weights)
        outputs = kind.build(ModelConfig()).eval()(chunks)
        regression = ccc_loss(sentence_mean(outputs["prediction"], 3), targets)
        if name == "deepemocluster":
            cross_entropy = cluster_ce(outputs["cluster_logits"], labels)
            expected = (cross_entropy, regression + 0.5 * cross_entropy)
        elif name == "cnn_regressor":
            expected = (None, regression)
        else:
            reconstruction = 2.0 * reconstruction_loss(outputs["reconstruction"], chunks)
            kl = 3.0 * vae_kl(outputs["mu"], outputs["logvar"], elements=chunks[0].numel()) if name == "cnn_vae" else 0
            expected = (reconstruction + kl, reconstruction + regression + kl)
        for stage, value in zip((stage1, stage2), expected):
            if value is not None:
                got = kind.loss(stage, outputs, chunks, targets, 3, labels)
                assert torch.allclose(got, value), (name, stage.number)


def test_the_training_loop_never_asks_which_kind_it_runs() -> None:
    loop = (Path(__file__).resolve().parents[1] / "cluster_train/train/loop.py").read_text()
    assert not [name for name in MODEL_KINDS if f'"{name}"' in loop or f"'{name}'" in loop]

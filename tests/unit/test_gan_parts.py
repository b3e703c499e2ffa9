"""GAN building blocks without workers: DCGAN nets, the Frechet distance and the Inception FID network."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from distdl.errors import ConfigError
from distdl.models.dcgan import Discriminator, Generator
from distdl.workloads.frechet import feature_statistics, frechet_distance, inception_features, load_inception
from tests.helpers.payloads import plant
from tests.helpers.shared import REPO


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32), (3, 64)])
@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_generator_and_discriminator_shapes(channels, size, norm):
    generator, discriminator = Generator(100, channels, size, width=16), Discriminator(channels, size, 16, norm)
    images = generator(torch.randn(4, 100))
    assert images.shape == (4, channels, size, size)
    assert discriminator(images).shape == (4,)
    # A tanh output, as the data are scaled to [-1, 1]: even a last layer 1000 times too large stays inside.
    last = [m for m in generator.modules() if isinstance(m, torch.nn.ConvTranspose2d)][-1]
    with torch.no_grad():
        last.weight.mul_(1000)
    saturated = generator(torch.randn(4, 100)).abs().max()
    assert 0.99 < saturated <= 1.0


def test_dcgan_initialization_draws_from_n_0_002():
    weights = torch.cat([m.weight.detach().flatten() for m in Generator(100, 3, 64).modules()
                         if isinstance(m, torch.nn.ConvTranspose2d)])
    assert abs(float(weights.mean())) < 1e-3 and float(weights.std()) == pytest.approx(0.02, rel=0.02)


def test_checkpointed_dcgan_blocks_change_no_gradient_statistic_or_name_and_recompute_every_block_but_the_output():
    import copy

    from distdl.flops import counted_flops
    from distdl.models.activation_checkpointing import checkpoint_conv_blocks

    torch.manual_seed(0)
    plain = [Generator(16, 1, 28, width=8), Discriminator(1, 28, 8, "batch")]
    checkpointed = copy.deepcopy(plain)
    for net in checkpointed:
        net.net = checkpoint_conv_blocks(net.net)
    # Blocks end at each activation but the output's: (ConvT, BN, ReLU) x 2 | ConvT, Tanh; (Conv, LReLU),
    # (Conv, BN, LReLU) | Conv.
    assert [net.net.segments for net in checkpointed] == [[(0, 3), (3, 6)], [(0, 2), (2, 5)]]
    noise = torch.randn(4, 16)
    counts = []
    for generator, discriminator in (plain, checkpointed):
        with counted_flops() as count:
            discriminator(generator(noise)).mean().backward()
        counts.append(count)
    for ours, theirs in zip(plain, checkpointed):
        assert list(ours.state_dict()) == list(theirs.state_dict())
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name  # batch norm's statistics were updated once, not twice
        for a, b in zip(ours.parameters(), theirs.parameters()):
            assert torch.equal(a.grad, b.grad)
    assert counts[1].model == counts[0].model and counts[0].recomputed == 0 < counts[1].recomputed


def test_a_checkpointed_critic_gives_wgan_gps_gradient_penalty_unchanged():
    """The penalty differentiates the critic twice (create_graph), through the recomputation."""
    import copy

    from distdl.models.activation_checkpointing import checkpoint_conv_blocks

    torch.manual_seed(0)
    plain = Discriminator(1, 28, 8, "layer")
    checkpointed = copy.deepcopy(plain)
    checkpointed.net = checkpoint_conv_blocks(checkpointed.net)
    between = torch.rand(4, 1, 28, 28)
    penalties = []
    for critic in (plain, checkpointed):
        images = between.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(critic(images).sum(), images, create_graph=True)
        penalty = ((gradient.flatten(1).norm(dim=1) - 1) ** 2).mean()
        penalty.backward()
        penalties.append(penalty.detach())
    assert torch.equal(*penalties)
    for a, b in zip(plain.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)


def test_unsupported_image_sizes_are_named():
    with pytest.raises(ConfigError, match="not 30"):
        Generator(100, 3, 30)


def test_frechet_distance_of_diagonal_gaussians_has_its_closed_form():
    mean_a, mean_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = ((mean_a - mean_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    statistics_a, statistics_b = {"mu": mean_a, "sigma": np.diag(var_a)}, {"mu": mean_b, "sigma": np.diag(var_b)}
    assert frechet_distance(statistics_a, statistics_b) == pytest.approx(expected)


def test_frechet_distance_of_samples_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(8, 8))
    a, b = rng.normal(size=(20000, 8)) @ mix, rng.normal(size=(20000, 8)) @ mix
    same = frechet_distance(feature_statistics(a), feature_statistics(b))
    shifted = frechet_distance(feature_statistics(a), feature_statistics(b + 0.5))
    assert same < 0.05 and shifted == pytest.approx(same + 8 * 0.25, abs=0.1)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    from tests.helpers.vision_fixtures import write_random_inception_weights

    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "inception.pth")


def test_inception_features_take_gan_pixels_in_grayscale_and_colour(inception_weights):
    inception = load_inception(inception_weights)
    gray = torch.rand(2, 1, 28, 28) * 2 - 1
    features = inception_features(inception, gray)
    assert features.shape == (2, 2048) and np.isfinite(features).all()
    # Gray digits are the same picture as their three-channel copy.
    np.testing.assert_allclose(features, inception_features(inception, gray.repeat(1, 3, 1, 1)), rtol=1e-5)
    assert not np.allclose(features[0], features[1])


def test_inception_weights_that_are_missing_foreign_or_pickled_code_are_refused(tmp_path, inception_weights):
    with pytest.raises(ConfigError, match="is not a file; download https://"):
        load_inception(tmp_path / "absent.pth")
    partial = {k: v for k, v in torch.load(inception_weights, weights_only=True).items() if "Mixed_7c" not in k}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match="partial.pth is not the FID InceptionV3.*Missing key"):
        load_inception(tmp_path / "partial.pth")
    torch.save(Path("not weights"), tmp_path / "pickled.pth")  # unpickling it would build an object
    with pytest.raises(ConfigError, match="pickled.pth is not a PyTorch weights file that loads safely"):
        load_inception(tmp_path / "pickled.pth")
    # The real weights with a payload planted: refused naming what it asked for, and it never runs.
    shutil.copyfile(inception_weights, tmp_path / "planted.pth")
    plant(tmp_path / "planted.pth", tmp_path / "payload-ran")
    with pytest.raises(ConfigError, match=r"planted.pth is not a PyTorch weights file .* asks for posix\.system"):
        load_inception(tmp_path / "planted.pth")
    assert not (tmp_path / "payload-ran").exists()
    (tmp_path / "truncated.pth").write_bytes(inception_weights.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="truncated.pth is not a PyTorch weights file"):
        load_inception(tmp_path / "truncated.pth")


# ----------------------------------------------------------------------------- config checks



def gan_config_error(*overrides: str) -> str:
    from distdl.config import load_config

    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs/gan/dcgan_mnist.yaml", list(overrides))
    return str(info.value)


@pytest.mark.parametrize("overrides, expected", [
    (["objective.name=wgan_gp"], "discriminator_norm=layer or none"),
    (["objective.name=lsgan"], "dcgan, wgan_gp"),
    (["engine.zero_stage=3"], "stages 0-2"),
    (["trainer.global_batch_size=256"], "no accumulation"),
    (["model.discriminator_norm=instance"], "batch, layer, none"),
])
def test_gan_settings_that_cannot_work_are_refused(overrides, expected):
    assert expected in gan_config_error(*overrides)


def test_a_classifier_from_other_data_is_refused(tmp_path):
    import yaml

    from distdl.config import load_config
    from distdl.workloads.gan import Gan

    run = tmp_path / "cifar-classifier"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"workload": "resnet", "data": {"dataset": "cifar10"}}))
    config = load_config(REPO / "configs/gan/dcgan_mnist.yaml", ["data.dataset=synthetic", "data.image_size=32",
                                                                  f"eval.classifier_run={run}"])
    with pytest.raises(ConfigError, match="trained on cifar10"):
        Gan.prepare(config)
    (run / "config.yaml").write_text(yaml.safe_dump({"workload": "glue"}))
    with pytest.raises(ConfigError, match="eval.classifier_run: .* 'glue' run, not a resnet run"):
        Gan.prepare(config)


def test_the_cli_refuses_a_bad_inception_file_before_any_worker_starts(tmp_path, capsys):
    from distdl import cli

    (tmp_path / "inception.pth").write_text("not a checkpoint")
    code = cli.main(["train", str(REPO / "configs/gan/dcgan_mnist.yaml"), "data.dataset=synthetic",
                     f"run.storage_path={tmp_path / 'runs'}", f"eval.inception_weights={tmp_path / 'inception.pth'}"])
    assert code != 0
    assert "eval.inception_weights:" in capsys.readouterr().err
    assert not any((tmp_path / "runs").iterdir()), "the run directory it began is removed again"

"""immiscible_pipeline.training.unet_presets: presets, loading a config, the resolution and channel checks."""

import pytest
from diffusers import UNet2DModel

from immiscible_pipeline.training.unet_presets import (CIFAR10_UNET, MNIST_DEMO_UNET, MNIST_UNET, check_unet_config,
                                                       load_unet_config)


def test_presets_are_valid_and_sized_as_documented():
    small = UNet2DModel(**MNIST_UNET)
    assert 1.0e6 < sum(p.numel() for p in small.parameters()) < 1.2e6
    demo = UNet2DModel(**MNIST_DEMO_UNET)
    assert 0.6e6 < sum(p.numel() for p in demo.parameters()) < 0.7e6
    assert not any("Attn" in block for block in MNIST_DEMO_UNET["down_block_types"] + MNIST_DEMO_UNET["up_block_types"])
    check_unet_config(MNIST_UNET)
    check_unet_config(MNIST_DEMO_UNET)
    check_unet_config(CIFAR10_UNET)
    assert (MNIST_UNET["sample_size"], MNIST_UNET["in_channels"]) == (16, 1)
    assert (CIFAR10_UNET["sample_size"], CIFAR10_UNET["in_channels"]) == (32, 3)


def test_load_config_from_a_folder_with_a_resolution(tiny_unet_config_path):
    config = load_unet_config(str(tiny_unet_config_path), MNIST_UNET, resolution=12)
    assert config["sample_size"] == 12 and config["block_out_channels"] == [8, 16]
    assert load_unet_config(None, MNIST_UNET)["sample_size"] == 16
    assert MNIST_UNET["sample_size"] == 16  # the preset itself is not modified


def test_bad_configs_name_the_flag(tmp_path, tiny_unet_config):
    with pytest.raises(ValueError, match=r"--resolution 7 does not fit the UNet: its 2 down blocks shrink the image "
                                         r"2x, so the resolution must be a multiple of 2"):
        load_unet_config(None, tiny_unet_config, resolution=7)
    with pytest.raises(ValueError, match="multiple of 4"):
        load_unet_config(None, MNIST_UNET, resolution=18)
    with pytest.raises(ValueError, match="in_channels=4 and out_channels=4"):
        check_unet_config({**tiny_unet_config, "in_channels": 4, "out_channels": 4})
    with pytest.raises(ValueError, match=r"--model_config_name_or_path .*nowhere: cannot read a UNet config"):
        load_unet_config(str(tmp_path / "nowhere"), MNIST_UNET)

"""`UNet2DModel` configurations for pixel-space training, and the checks a config must pass.

Three built-in presets:
- `MNIST_UNET`: 16 px grey, channels (32, 64, 64), one layer per block, attention at 8 x 8, about 1.1M
  parameters. A CPU trains it to recognisable digits in minutes (the consistency-model demo and the
  convergence benchmark).
- `MNIST_DEMO_UNET`: the same without attention in the down and up blocks and with channels (16, 32, 64),
  about 0.64M parameters (the DDIM demo). A step costs about half as much on a CPU, so the demo trains in
  about 5 minutes to samples as good as the larger UNet's in 8 (the sweep is in docs/tuning-log.md).
- `CIFAR10_UNET`: 32 px RGB, the DDPM CIFAR-10 architecture the Immiscible Diffusion DDIM experiments build
  on (channels 128-256-256-256, two layers per block, attention at 16 x 16, dropout 0.1; about 36M parameters).
- `DIFFUSERS_UNCONDITIONAL_UNET`: the UNet diffusers' train_unconditional.py builds (64 px RGB, channels
  128-128-256-256-512-512, two layers per block, attention at 4 x 4 on the way down and up): what its command
  lines train with the DDIM trainer's "diffusers" recipe.
Any other architecture: a diffusers config (a folder with config.json, a json file, or a Hub model id).
"""

from __future__ import annotations

MNIST_UNET = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
}

MNIST_DEMO_UNET = {
    **MNIST_UNET,
    "block_out_channels": (16, 32, 64),
    "norm_num_groups": 16,  # GroupNorm's groups must divide the narrowest block
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
}

CIFAR10_UNET = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": (128, 256, 256, 256),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "dropout": 0.1,
}

DIFFUSERS_UNCONDITIONAL_UNET = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": (128, 128, 256, 256, 512, 512),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
}


def load_unet_config(model_config_name_or_path: str | None, default: dict, resolution: int | None = None) -> dict:
    """The UNet config to train: `default` if no name or path is given, else the config found there; with
    `resolution` its sample_size is set to it (the pipeline samples at sample_size). Checked by `check_unet_config`."""
    if model_config_name_or_path is None:
        config = dict(default)
    else:
        from diffusers import UNet2DModel

        try:
            config = dict(UNet2DModel.load_config(model_config_name_or_path))
        except (OSError, ValueError) as error:
            raise ValueError(f"--model_config_name_or_path {model_config_name_or_path}: cannot read a UNet "
                             f"config there ({error})") from error
    if resolution is not None:
        config["sample_size"] = resolution
    check_unet_config(config)
    return config


def downsampling_factor(config: dict) -> int:
    """How much the UNet shrinks an image: every down block but the last halves it."""
    return 2 ** (len(config.get("down_block_types", ())) - 1)


def check_unet_config(config: dict) -> None:
    """Raises a ValueError naming the flag at fault if the config cannot train on its own sample_size."""
    resolution = config.get("sample_size")
    if isinstance(resolution, (list, tuple)):
        raise ValueError(f"the UNet config has a non-square sample_size {resolution}; pass --resolution")
    factor = downsampling_factor(config)
    if not isinstance(resolution, int) or resolution < factor or resolution % factor:
        raise ValueError(f"--resolution {resolution} does not fit the UNet: its "
                         f"{len(config.get('down_block_types', ()))} down blocks shrink the image {factor}x, so the "
                         f"resolution must be a multiple of {factor}")
    channels = config.get("in_channels"), config.get("out_channels")
    if channels[0] != channels[1] or channels[0] not in (1, 3):
        raise ValueError(f"the UNet config has in_channels={channels[0]} and out_channels={channels[1]}; a pixel "
                         f"model needs both equal to 1 (grey) or 3 (RGB)")

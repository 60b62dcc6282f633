"""immiscible_pipeline.training (arguments, accelerator_setup, step_bookkeeping, pixel_trainers): the pieces
that do not need a training run."""

import copy
from types import SimpleNamespace

import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel

from immiscible_pipeline.training.accelerator_setup import cpu_thread_advice, make_adamw, make_ema

OPTIMIZER_FLAGS = SimpleNamespace(learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.99, adam_weight_decay=1e-2,
                                  adam_epsilon=1e-8, use_ema=True, ema_max_decay=0.999, ema_inv_gamma=1.0,
                                  ema_power=0.75)
TINY_UNET = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                 norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)


def train_a_few_steps(optimizer_of, ema_of=None, steps=3):
    """A tiny UNet after `steps` AdamW steps on a fixed batch, and its EMA weights if `ema_of` is given."""
    torch.manual_seed(0)
    model = UNet2DModel(**TINY_UNET)
    optimizer, ema = optimizer_of(model), ema_of(model) if ema_of else None
    inputs, targets = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs, 10).sample, targets).backward()
        optimizer.step()
        if ema:
            ema.step(model.parameters())
    averaged = copy.deepcopy(model)
    if ema:
        ema.copy_to(averaged.parameters())
    return model, averaged


def adamw_steps(optimizer_of, steps=3):
    """A linear layer's weights after `steps` AdamW steps of least squares (gradients well away from zero, where
    every AdamW implementation rounds alike)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    optimizer = optimizer_of(layer.parameters())
    inputs, targets = torch.randn(16, 8), torch.randn(16, 4)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(layer(inputs), targets).backward()
        optimizer.step()
    return optimizer, torch.cat([layer.weight.detach().flatten(), layer.bias.detach()])


def test_make_adamw_is_fused_on_the_cpu_and_takes_the_plain_adamw_steps_with_the_flags():
    fused, ours = adamw_steps(lambda parameters: make_adamw(parameters, OPTIMIZER_FLAGS, "cpu"))
    _, plain = adamw_steps(lambda parameters: torch.optim.AdamW(
        parameters, lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-8, foreach=False))
    _, other_flags = adamw_steps(lambda parameters: torch.optim.AdamW(parameters, foreach=False))
    assert fused.defaults["fused"] is True
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ours, other_flags)  # the flags, not torch's defaults, made those steps
    assert make_adamw(torch.nn.Linear(2, 2).parameters(), OPTIMIZER_FLAGS, "cpu", learning_rate=0.0).defaults["lr"] == 0
    assert make_adamw(torch.nn.Linear(2, 2).parameters(), OPTIMIZER_FLAGS, "meta").defaults["fused"] is False


def test_make_ema_averages_like_the_per_tensor_ema_of_diffusers():
    adam = lambda model: torch.optim.AdamW(model.parameters(), lr=1e-2)  # noqa: E731
    _, ours = train_a_few_steps(adam, lambda model: make_ema(model, OPTIMIZER_FLAGS, "cpu"))
    _, reference = train_a_few_steps(adam, lambda model: EMAModel(
        model.parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=0.75, foreach=False))
    final, _ = train_a_few_steps(adam)
    for a, b in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours.conv_in.weight, final.conv_in.weight)  # an average, not the last weights


def test_cpu_training_with_idle_cores_gets_the_launch_flag_that_uses_them():
    advice = cpu_thread_advice("cpu", threads=1, cores=8, processes=2)
    assert "--num_cpu_threads_per_process 4" in advice and "OMP_NUM_THREADS=4" in advice
    assert cpu_thread_advice("cpu", threads=4, cores=8, processes=2) is None  # already uses its share
    assert cpu_thread_advice("cpu", threads=1, cores=2, processes=2) is None  # one core each: nothing idle
    assert cpu_thread_advice("cuda", threads=1, cores=8, processes=1) is None  # the GPU does the work

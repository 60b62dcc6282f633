"""immiscible_pipeline.training (arguments, accelerator_setup): the pieces that do not need a training run."""

import copy
import math
from types import SimpleNamespace

import pytest
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


@pytest.mark.parametrize("processes", [1, 2])
def test_the_lr_schedule_spans_the_run_whatever_the_process_count(processes):
    # Accelerate's prepared scheduler steps once per process for each optimisation step
    from immiscible_pipeline.training.accelerator_setup import make_lr_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    flags = SimpleNamespace(max_train_steps=None, gradient_accumulation_steps=2, lr_scheduler="linear",
                            lr_warmup_steps=3)
    scheduler, max_train_steps = make_lr_scheduler(flags, optimizer, num_batches=20,
                                                   accelerator=SimpleNamespace(num_processes=processes), num_epochs=4)
    assert max_train_steps == 4 * math.ceil(20 / processes / 2)  # 40 or 20 optimisation steps
    rates = []
    for _ in range(max_train_steps):
        for _ in range(processes):
            scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    assert rates[2] == pytest.approx(1.0) and rates[1] < 1.0  # the peak after the 3 warm-up steps
    assert rates[-1] == pytest.approx(0.0) and min(rates[:-1]) > 0.0  # and zero at the last step, not before


def test_common_checks_name_the_flag_at_fault(tmp_path):
    from immiscible_pipeline.training.arguments import check_common_args

    def flags(**changes):
        base = dict(dataset_name=None, train_data_dir=None, immiscible_k=8, train_batch_size=4,
                    gradient_accumulation_steps=1, checkpointing_steps=10, max_train_steps=None,
                    checkpoints_total_limit=None, num_epochs=1, enable_xformers_memory_efficient_attention=False,
                    report_to="none", hub_token=None)
        return SimpleNamespace(**{**base, **changes})

    check_common_args(flags(train_data_dir=str(tmp_path)), ("num_epochs",))
    for changes, message in [({"train_data_dir": str(tmp_path / "missing")}, "--train_data_dir .* is not a directory"),
                             ({"dataset_name": "x", "train_data_dir": str(tmp_path)}, "either --dataset_name or"),
                             ({"gradient_accumulation_steps": 0}, "--gradient_accumulation_steps must be at least 1"),
                             ({"num_epochs": 0}, "--num_epochs must be at least 1, got 0")]:
        with pytest.raises(ValueError, match=message):
            check_common_args(flags(**changes), ("num_epochs",))

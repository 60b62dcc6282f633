"""Every process draws its own noise, with or without --seed; a run without --seed records the seed it drew,
and `--seed <it>` repeats it; a resumed run continues with its checkpoint's seed."""

import json
import types
from pathlib import Path

import pytest
import torch

from launching import launch_command, launch_environment, run_launched
from trainer_runs import summary

from immiscible_pipeline.training.accelerator_setup import record_seed, run_seed, SEED_FILE

WORKER = Path(__file__).parent / "scripts" / "seeding_worker.py"


def launch_recording(output, tiny_imagefolder, tiny_unet_config_path, *extra):
    """Two processes train 2 steps of the DDIM trainer (generators started alike, as on CUDA); each process's
    noises and seed."""
    argv = ["--train_data_dir", tiny_imagefolder, "--model_config_name_or_path", tiny_unet_config_path,
            "--output_dir", output, "--cache_dir", output.parent / "datasets-cache", "--train_batch_size", 3,
            "--max_train_steps", 2, "--immiscible", "none", "--num_validation_images", 1,
            "--ddim_num_inference_steps", 1, "--validation_steps", 100, "--checkpointing_steps", 2,
            "--report_to", "none", *extra]
    prefix = output.parent / f"{output.name}-rank"
    proc = run_launched(launch_command(2, WORKER, prefix, *argv), env=launch_environment(), timeout=300)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-5000:]}"
    return [torch.load(f"{prefix}{rank}.pt") for rank in range(2)]


@pytest.mark.slow
def test_two_processes_without_seed_draw_different_noise_and_the_recorded_seed_repeats_the_run(
        tmp_path, tiny_imagefolder, tiny_unet_config_path):
    first = launch_recording(tmp_path / "unseeded", tiny_imagefolder, tiny_unet_config_path)
    assert [len(rank["noises"]) for rank in first] == [2, 2]
    for step in range(2):
        assert not torch.equal(first[0]["noises"][step], first[1]["noises"][step]), "both processes drew the same noise"
    seed = summary(tmp_path / "unseeded")["seed"]
    assert isinstance(seed, int) and first[0]["seed"] == first[1]["seed"] == seed  # one seed, shared
    # ... and kept in the checkpoint, for a resume without --seed
    assert json.loads((tmp_path / "unseeded" / "checkpoint-2" / SEED_FILE).read_text()) == {"seed": seed}

    again = launch_recording(tmp_path / "seeded", tiny_imagefolder, tiny_unet_config_path, "--seed", seed)
    for rank in range(2):
        for step in range(2):
            assert torch.equal(again[rank]["noises"][step], first[rank]["noises"][step])


def one_process():
    return types.SimpleNamespace(is_main_process=True, num_processes=1)


def test_run_seed_is_the_given_one_or_drawn_and_a_checkpoint_keeps_it(tmp_path):
    assert run_seed(7, None, tmp_path, one_process()) == 7
    drawn = {run_seed(None, None, tmp_path, one_process()) for _ in range(4)}
    assert len(drawn) > 1 and all(0 <= seed < 2**31 for seed in drawn)  # a fresh seed per run

    checkpoint = tmp_path / "checkpoint-4"
    record_seed(123, checkpoint, is_main_process=True)
    assert json.loads((checkpoint / SEED_FILE).read_text()) == {"seed": 123}
    assert run_seed(None, "latest", tmp_path, one_process()) == 123  # resumed without --seed: the run's own seed
    assert run_seed(None, "checkpoint-4", tmp_path, one_process()) == 123
    assert run_seed(5, "latest", tmp_path, one_process()) == 5  # an explicit --seed wins
    record_seed(999, tmp_path / "checkpoint-6", is_main_process=False)  # only the main process writes
    assert not (tmp_path / "checkpoint-6" / SEED_FILE).exists()


def test_a_checkpoint_without_a_recorded_seed_resumes_with_the_old_data_seed(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    assert run_seed(None, "latest", tmp_path, one_process()) == 0  # what runs without --seed used before


def test_a_bad_checkpoint_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no such checkpoint folder"):
        run_seed(None, "checkpoint-9", tmp_path, one_process())

"""train_immiscible_sd3_flux.py on tiny SD3 and Flux pipelines built from configs (offline).

Launched (`accelerate launch`): a Flux LoRA run (4 steps, validation images at the end); an SD3 run stopped by
Ctrl-C and resumed from its checkpoint; a 2-process Flux run with linear assignment over the global batch and
the text encoder's LoRA. The LoRAs load in plain diffusers and change its output.
In this process (seconds each): diffusers' own example-test command lines for train_dreambooth_lora_sd3.py and
train_dreambooth_lora_flux.py (flags verbatim), exact resume, whole-transformer fine-tuning, the assignment's
place in the loop (Flux: before packing; the loss built from the assigned noise), captions, the page's GPU
commands, and bad input.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import write_images
from launching import interrupt_after_first_step, launch_command, launch_environment
from sd_fixtures import captioned_folder, one_thread, scalars, tiny_sd  # noqa: F401 - fixtures
from trainer_runs import launch, load_script, refused_flags, run_with_warnings as run, summary

import immiscible_pipeline.training.hub_publishing as hub
from immiscible_pipeline import TrainingCoupling
from immiscible_pipeline.training.diffusers_example_flags import (Alias, DREAMBOOTH_FLOW_FLAGS, EveryEpochs,
                                                                  Unsupported)
from immiscible_pipeline.training.flow_matching import (FLOW_FAMILIES, flow_family, flow_matching_loss, interpolate,
                                                        sample_timesteps)
from immiscible_pipeline.training.lora import LORA_WEIGHTS_NAME
from immiscible_pipeline.training.prompt_embeddings import known_prompts, PromptEmbeddings
from immiscible_pipeline.training.sample_grids import image_grid
from immiscible_pipeline.training.tiny_flow_models import build_tiny_flux, build_tiny_sd3
from immiscible_pipeline.training.tiny_stable_diffusion import build_tiny_sdxl
from immiscible_pipeline.training.transformer_lora import lora_target_modules

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "train_immiscible_sd3_flux.py"
PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
PROMPT = "photo"  # diffusers' tests' instance prompt
BATCH_WARNING = "the assignment does nothing"


@pytest.fixture(scope="module")
def trainer():
    return load_script(SCRIPT)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_flow")
    return {"sd3": build_tiny_sd3(root / "sd3"), "flux": build_tiny_flux(root / "flux")}


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "model")


@pytest.fixture(scope="session")
def instance_images(tmp_path_factory):
    """A flat folder of 4 images, as diffusers' tests' docs/source/en/imgs."""
    folder = tmp_path_factory.mktemp("instance")
    for path in write_images(folder, count=4, seed=3):
        path.rename(folder / path.name)
    return folder


def checkpoints(output_dir) -> set:
    return {path.name for path in Path(output_dir).iterdir() if "checkpoint" in path.name}


def lora_keys(output_dir) -> list:
    keys = list(load_file(Path(output_dir) / LORA_WEIGHTS_NAME))
    assert keys and all("lora" in key for key in keys)
    return keys


def generate(pipeline, prompt=PROMPT, **kwargs):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(prompt, num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                    generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


# --- diffusers' test_dreambooth_lora_sd3.py and test_dreambooth_lora_flux.py, flags verbatim ------------------

def diffusers_command(model, images, output_dir, *extra):
    """The command of diffusers' test_dreambooth_lora(_sd3|_flux) (`--x value` form)."""
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", images, "--instance_prompt", PROMPT,
            "--resolution", 64, "--train_batch_size", 1, "--gradient_accumulation_steps", 1, "--max_train_steps", 2,
            "--learning_rate", "5.0e-04", "--scale_lr", "--lr_scheduler", "constant", "--lr_warmup_steps", 0,
            "--output_dir", output_dir, *extra]


def checkpointing_command(model, images, output_dir, max_train_steps, *extra):
    """The checkpointing tests' command (`--x=value` form)."""
    return [f"--pretrained_model_name_or_path={model}", f"--instance_data_dir={images}", f"--output_dir={output_dir}",
            f"--instance_prompt={PROMPT}", "--resolution=64", "--train_batch_size=1", "--gradient_accumulation_steps=1",
            f"--max_train_steps={max_train_steps}", *extra]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_diffusers_lora_test_commands_run_unchanged(family, trainer, tiny_models, instance_images, tmp_path):
    model = tiny_models[family]
    warnings = run(trainer, diffusers_command(model, instance_images, tmp_path / "plain"))
    assert all(key.startswith("transformer") for key in lora_keys(tmp_path / "plain"))
    assert summary(tmp_path / "plain")["immiscible"] == "knn"  # the default for these families: fine at batch 1
    assert BATCH_WARNING not in warnings
    warnings = run(trainer, diffusers_command(model, instance_images, tmp_path / "linear", "--immiscible", "linear"))
    assert BATCH_WARNING in warnings and "--immiscible knn" in warnings  # linear at batch 1 re-pairs nothing

    run(trainer, diffusers_command(model, instance_images, tmp_path / "cached", "--cache_latents"))
    assert (tmp_path / "cached" / "latent_cache" / "meta.json").is_file()
    assert all(key.startswith("transformer") for key in lora_keys(tmp_path / "cached"))

    if family == "sd3":  # test_dreambooth_lora_block, test_dreambooth_lora_layer
        run(trainer, diffusers_command(model, instance_images, tmp_path / "block", "--lora_blocks", 0))
        assert all(key.startswith("transformer.transformer_blocks.0") for key in lora_keys(tmp_path / "block"))
        run(trainer, diffusers_command(model, instance_images, tmp_path / "layer", "--lora_layers", "attn.to_k"))
        assert all("attn.to_k" in key for key in lora_keys(tmp_path / "layer"))
    else:  # test_dreambooth_lora_layers, test_dreambooth_lora_with_metadata
        layer = "single_transformer_blocks.0.attn.to_k"
        run(trainer, diffusers_command(model, instance_images, tmp_path / "layer", "--cache_latents", "--lora_layers",
                                       layer))
        assert all(key.startswith(f"transformer.{layer}") for key in lora_keys(tmp_path / "layer"))
        run(trainer, diffusers_command(model, instance_images, tmp_path / "meta", "--lora_alpha=8", "--rank=4"))
        with safe_open(str(tmp_path / "meta" / LORA_WEIGHTS_NAME), framework="pt") as handle:
            metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
        assert (metadata["transformer.lora_alpha"], metadata["transformer.r"]) == (8, 4)

    limit = tmp_path / "limit"
    run(trainer, checkpointing_command(model, instance_images, limit, 6, "--checkpoints_total_limit=2",
                                       "--checkpointing_steps=2"))
    assert checkpoints(limit) == {"checkpoint-4", "checkpoint-6"}
    multiple = tmp_path / "multiple"
    run(trainer, checkpointing_command(model, instance_images, multiple, 4, "--checkpointing_steps=2"))
    assert checkpoints(multiple) == {"checkpoint-2", "checkpoint-4"}
    run(trainer, checkpointing_command(model, instance_images, multiple, 8, "--checkpointing_steps=2",
                                       "--resume_from_checkpoint=checkpoint-4", "--checkpoints_total_limit=2"))
    assert checkpoints(multiple) == {"checkpoint-6", "checkpoint-8"}
    assert len(scalars(multiple)["loss"]) == 4  # the resumed run trained steps 5 to 8 only

    # test_dreambooth_lora_text_encoder_*: a LoRA on the CLIP encoder(s) too (T5 stays frozen)
    run(trainer, diffusers_command(model, instance_images, tmp_path / "te", "--train_text_encoder"))
    prefixes = {key.split(".")[0] for key in lora_keys(tmp_path / "te")}
    assert prefixes == ({"transformer", "text_encoder", "text_encoder_2"} if family == "sd3" else
                        {"transformer", "text_encoder"})
    assert summary(tmp_path / "te")["prompts_encoded"] == 2  # trained encoders: every sample (batch 1) of 2 steps


# --- launched runs -----------------------------------------------------------------------------------------------

def lora_run_command(model, images, output_dir, max_train_steps=4, *extra):
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", images, "--instance_prompt", PROMPT,
            "--resolution", 32, "--train_batch_size", 2, "--max_train_steps", max_train_steps,
            "--checkpointing_steps", 2, "--learning_rate", "1e-3", "--lr_warmup_steps", 0, "--seed", 0,
            "--output_dir", output_dir, "--max_sequence_length", 16, *extra]


VALIDATION = ["--validation_prompt", PROMPT, "--num_validation_images", 1, "--validation_inference_steps", 2]


def assert_the_lora_loads_and_changes_the_output(family, model, output_dir):
    """Plain diffusers: the base pipeline with `load_lora_weights(output_dir)` generates something else, and the
    run's final validation grid (`samples.png`) is exactly what it generates."""
    pipeline = PIPELINES[family].from_pretrained(model)
    base = generate(pipeline)
    pipeline.load_lora_weights(output_dir)
    assert abs(generate(pipeline) - base).max() > 1e-3
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(PROMPT, num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                      generator=torch.Generator().manual_seed(0)).images
    assert Image.open(output_dir / "samples.png").tobytes() == image_grid(images).tobytes()


@pytest.mark.slow
def test_launched_flux_lora_loads_in_plain_diffusers_and_changes_the_output(tiny_models, instance_images, tmp_path):
    launch(SCRIPT, lora_run_command(tiny_models["flux"], instance_images, tmp_path, 4, *VALIDATION))
    assert summary(tmp_path)["num_processes"] == 1 and summary(tmp_path)["family"] == "flux"
    assert not (tmp_path / "model_index.json").exists()  # the LoRA file only
    assert_the_lora_loads_and_changes_the_output("flux", tiny_models["flux"], tmp_path)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_the_resumed_sd3_lora_loads_in_plain_diffusers(tiny_models, instance_images,
                                                                                       tmp_path):
    flags = lora_run_command(tiny_models["sd3"], instance_images, tmp_path, 100000, "--checkpointing_steps", 100000)
    result = interrupt_after_first_step(launch_command(1, SCRIPT, *flags), timeout=300, env=launch_environment())
    assert "SIGINT received" in result.stdout and result.returncode != 0, result.stdout[-4000:]
    (saved,) = tmp_path.glob("checkpoint-*")
    assert f"Interrupted at step {saved.name.removeprefix('checkpoint-')}:" in result.stdout
    assert (saved / LORA_WEIGHTS_NAME).is_file() and not (tmp_path / LORA_WEIGHTS_NAME).exists()
    step = int(saved.name.removeprefix("checkpoint-"))
    launch(SCRIPT, lora_run_command(tiny_models["sd3"], instance_images, tmp_path, step + 2,
                                    "--resume_from_checkpoint", "latest", *VALIDATION))
    assert summary(tmp_path)["global_step"] == step + 2 and summary(tmp_path)["family"] == "sd3"
    assert_the_lora_loads_and_changes_the_output("sd3", tiny_models["sd3"], tmp_path)


@pytest.mark.slow
def test_two_processes_assign_the_global_batch_and_train_alike(tiny_models, instance_images, tmp_path):
    """Flux with linear assignment over both processes' samples, per-prompt groups, and the text encoder's LoRA
    (trained outside DDP, its gradients averaged by the script): both processes end with the same weights."""
    launch(REPO / "tests" / "scripts" / "flow_trainer_ranks.py", lora_run_command(
        tiny_models["flux"], instance_images, tmp_path, 2, "--immiscible", "linear", "--assignment_scope", "global",
        "--immiscible_groups", "label", "--train_batch_size", 1, "--train_text_encoder", "--text_encoder_lr", "1e-2",
        "--caption_dropout", "0.5"), processes=2)
    assert summary(tmp_path)["num_processes"] == 2  # really two processes, not two unsynchronised single ones
    logged = scalars(tmp_path)
    assert logged["immiscible/num_processes"] == [2.0, 2.0]
    assert logged["immiscible/batch_size"] == [2.0, 2.0]  # one sample per process, assigned together
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert any(key.startswith("text_encoder.") for key in ranks[0]) and ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][key], ranks[1][key]) for key in ranks[0])  # other samples, the same update


# --- in this process ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, text_encoder", [("sd3", False), ("flux", False), ("flux", True)])
def test_lora_resumes_exactly_with_validation_and_writes_a_lora_card(family, text_encoder, trainer, tiny_models,
                                                                    instance_images, tmp_path, monkeypatch):
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    extra = ["--train_text_encoder", "--text_encoder_lr", "1e-3"] if text_encoder else []
    monkeypatch.setattr(hub, "create_repo", lambda **kwargs: type("Repo", (), {"repo_id": "me/tiny-lora"})())
    monkeypatch.setattr(hub, "upload_folder", lambda **kwargs: None)
    run(trainer, lora_run_command(tiny_models[family], instance_images, first, 4, "--push_to_hub", *extra))
    resumed.mkdir()
    shutil.copytree(first / "checkpoint-2", resumed / "checkpoint-2")
    run(trainer, lora_run_command(tiny_models[family], instance_images, resumed, 4, "--resume_from_checkpoint",
                                  "latest", *VALIDATION, "--validation_steps", 3, *extra))
    final, again = load_file(first / LORA_WEIGHTS_NAME), load_file(resumed / LORA_WEIGHTS_NAME)
    assert final.keys() == again.keys() and all(torch.equal(final[key], again[key]) for key in final)
    assert any(key.startswith("text_encoder.") for key in final) == text_encoder
    assert (resumed / "samples" / "step-000003.png").is_file()
    assert sorted(path.name for path in (first / "checkpoint-2").iterdir() if path.suffix != ".json") == [
        "optimizer.bin", LORA_WEIGHTS_NAME, "random_states_0.pkl", "scheduler.bin"]  # no copy of the frozen base
    # One prompt: frozen encoders run once for the whole run, trained ones on every sample of every step.
    assert summary(first)["prompts_encoded"] == (4 * 2 if text_encoder else 1)
    # Frozen encoders go to the CPU once the run's prompts (here the validation prompt too) are encoded.
    assert summary(resumed)["text_encoders_offloaded"] == (not text_encoder)
    card = (first / "README.md").read_text()
    for text in ("- lora", "- immiscible-knn", f"- {family}", f"base_model: {tiny_models[family]}",
                 f"Trigger prompt: `{PROMPT}`", "| transformer | LoRA rank 4, alpha 4",
                 'load_lora_weights("me/tiny-lora")'):
        assert text in card, text


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_rank_0_fine_tunes_the_whole_transformer_into_a_stock_pipeline(family, trainer, tiny_models,
                                                                       instance_images, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "create_repo", lambda **kwargs: type("Repo", (), {"repo_id": "me/tiny-full"})())
    monkeypatch.setattr(hub, "upload_folder", lambda **kwargs: None)
    run(trainer, lora_run_command(tiny_models[family], instance_images, tmp_path, 2, "--rank", 0,
                                  "--checkpointing_steps", 1, "--push_to_hub"))
    pipeline = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(pipeline, PIPELINES[family])
    assert (tmp_path / "checkpoint-1" / "transformer" / "config.json").is_file()
    base = PIPELINES[family].from_pretrained(tiny_models[family])
    assert abs(generate(pipeline) - generate(base)).max() > 1e-3
    card = (tmp_path / "README.md").read_text()
    assert "| transformer | fine-tuned (whole) |" in card
    assert 'DiffusionPipeline.from_pretrained("me/tiny-full")' in card
    assert "- lora" not in card


def test_lora_layers_that_match_nothing_are_named(trainer, tiny_models, instance_images, tmp_path):
    with pytest.raises(ValueError,
                       match="--lora_layers / --lora_blocks: attn.to_kk match no module of the SD3Transformer2DModel"):
        run(trainer, diffusers_command(tiny_models["sd3"], instance_images, tmp_path, "--lora_layers", "attn.to_kk"))


def test_captions_win_over_the_instance_prompt_and_group_the_assignment(trainer, tiny_models, captioned_folder,
                                                                       tmp_path):
    """diffusers' scripts: with --caption_column the captions are the prompts (the instance prompt only names the
    LoRA); per-prompt groups of distinct captions leave linear assignment nothing to re-pair."""
    run(trainer, ["--pretrained_model_name_or_path", tiny_models["flux"], "--instance_data_dir", captioned_folder,
                  "--caption_column", "text", "--instance_prompt", PROMPT, "--resolution", 16, "--train_batch_size", 4,
                  "--max_train_steps", 2, "--max_sequence_length", 16, "--immiscible", "linear",
                  "--immiscible_groups", "label", "--seed", 0, "--output_dir", tmp_path])
    config = summary(tmp_path)
    assert config["caption_column"] == "text" and config["prompts_encoded"] > 2  # captions, not the one prompt
    assert scalars(tmp_path)["immiscible/relative_reduction"] == [0.0, 0.0]  # every caption its own group
    coupling = TrainingCoupling.load(str(tmp_path))  # free-text groups are not modelled: the batch is recorded
    assert (coupling.method, coupling.group_size, coupling.per_class) == ("linear", 4, False)


def spy_on_the_loop(trainer, monkeypatch) -> dict:
    """Records the assignment's input and output, the sigmas, the transformer's input and the loss's arguments."""
    seen = {"assigned": [], "x0": [], "sigmas": [], "hidden_states": [], "loss_noise": [], "loss_latents": []}
    real_build, real_sample, real_loss, real_load = (trainer.build_immiscible, trainer.sample_timesteps,
                                                     trainer.flow_matching_loss, trainer.load_transformer)

    def build(*args, **kwargs):
        imm = real_build(*args, **kwargs)

        class Spy:
            last_stats = property(lambda self: imm.last_stats)

            def __call__(self, x0, **kw):
                seen["x0"].append(x0.clone())
                seen["assigned"].append(imm(x0, **kw))
                return seen["assigned"][-1]
        return Spy()

    def sample(*args, **kwargs):
        timesteps, sigmas = real_sample(*args, **kwargs)
        seen["sigmas"].append(sigmas)
        return timesteps, sigmas

    def loss(model_pred, latents, noise, *args, **kwargs):
        seen["loss_noise"].append(noise)
        seen["loss_latents"].append(latents)
        return real_loss(model_pred, latents, noise, *args, **kwargs)

    def load(*args, **kwargs):
        transformer = real_load(*args, **kwargs)
        transformer.register_forward_pre_hook(
            lambda module, args, kwargs: seen["hidden_states"].append(kwargs["hidden_states"].detach().clone()),
            with_kwargs=True)
        return transformer

    for name, spy in (("build_immiscible", build), ("sample_timesteps", sample), ("flow_matching_loss", loss),
                      ("load_transformer", load)):
        monkeypatch.setattr(trainer, name, spy)
    return seen


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_noise_is_assigned_to_the_unpacked_latents_and_is_the_loss_target(family, trainer, tiny_models,
                                                                        instance_images, tmp_path, monkeypatch):
    seen = spy_on_the_loop(trainer, monkeypatch)
    run(trainer, lora_run_command(tiny_models[family], instance_images, tmp_path, 2, "--resolution", 16))
    assert len(seen["assigned"]) == len(seen["hidden_states"]) == 2
    for x0, noise, sigmas, hidden, loss_noise, loss_latents in zip(*(seen[key] for key in (
            "x0", "assigned", "sigmas", "hidden_states", "loss_noise", "loss_latents"))):
        assert x0.shape == (2, 4, 8, 8)  # VAE latents [B, C, H, W]: assigned before any packing
        assert loss_noise is noise and torch.equal(loss_latents, x0)  # the target is built from the assigned noise
        noisy = interpolate(x0, noise, sigmas)
        if family == "flux":  # the transformer sees the assigned noise's interpolation, packed into 2x2 tokens
            assert hidden.shape == (2, 16, 16)
            assert torch.equal(hidden, FluxPipeline._pack_latents(noisy, 2, 4, 8, 8))
        else:
            assert torch.equal(hidden, noisy)


def reproduce_commands() -> list:
    """(script, arguments) of the SD3 / Flux / SDXL commands of docs/reproduce-on-gpus.md (its `shell` block)."""
    import re
    import shlex

    page = (REPO / "docs" / "reproduce-on-gpus.md").read_text()
    section = page.split("\n## SD3, Flux and SDXL")[1].split("\n## ")[0]
    (block,) = re.findall(r"```shell\n(.*?)```", section, re.S)
    commands = [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert all(command[:2] == ["accelerate", "launch"] for command in commands)
    return [(command[2], command[3:]) for command in commands]


def test_the_gpu_page_commands_run_one_step_on_the_tiny_models(trainer, tiny_models, tiny_sdxl, instance_images,
                                                               tmp_path):
    """Model, data and budget replaced (the tiny models, 32 px SD3 / Flux, 16 px SDXL, one step, SDXL's own VAE
    for the fp16-fix one); every other flag as written, bf16 included."""
    commands = reproduce_commands()
    assert [script for script, _ in commands] == [SCRIPT.name] * 4 + ["train_immiscible_sd.py"] * 2
    sd_trainer = load_script(REPO / "train_immiscible_sd.py")
    for script, argv in commands:
        flags = dict(zip(argv, argv[1:]))
        family = next(name for key, name in (("FLUX", "flux"), ("stable-diffusion-3", "sd3"), ("xl", "sdxl"))
                      if key in flags["--pretrained_model_name_or_path"])
        output = tmp_path / flags["--output_dir"]
        changes = {"--pretrained_model_name_or_path": {**tiny_models, "sdxl": tiny_sdxl}[family],
                   "--instance_data_dir": instance_images, "--train_data_dir": instance_images,
                   "--resolution": 16 if family == "sdxl" else 32, "--max_train_steps": 1,
                   "--gradient_accumulation_steps": 1, "--output_dir": output, "--num_validation_images": 1,
                   "--pretrained_vae_model_name_or_path": Path(tiny_sdxl) / "vae"}
        argv = [str(changes.get(previous, word)) for previous, word in zip(["", *argv], argv)]
        extra = ["--validation_inference_steps", 1] + (["--max_sequence_length", 16] if family != "sdxl" else [])
        run(sd_trainer if family == "sdxl" else trainer, argv + extra)
        assert summary(output)["mixed_precision"] == "bf16" and summary(output)["rank"] == 16
        assert (output / LORA_WEIGHTS_NAME).is_file() and (output / "samples.png").is_file()


# --- bad input and flags ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--precondition_outputs", "1"], "--precondition_outputs is a flag of diffusers' SD3 script"),
    (["--with_prior_preservation"], "--with_prior_preservation .* is not supported: prior preservation"),
    (["--resolution", "40"], "--resolution must be a multiple of 16"),
    (["--optimizer", "prodigy"], "--optimizer prodigy is not supported"),
    (["--rank", "0", "--lora_layers", "attn.to_k"], "--lora_alpha, --lora_layers, .* configure a LoRA"),
    (["--rank", "0", "--train_text_encoder"], "--train_text_encoder trains a LoRA of the text encoders"),
    (["--lr_power", "2"], "--lr_power is not supported"),
    (["--weighting_scheme", "uniform"], None),  # argparse's own choice error
])
def test_bad_flags_are_refused_by_name(extra, message, trainer, tiny_models, instance_images):
    argv = ["--pretrained_model_name_or_path", tiny_models["flux"], "--instance_data_dir", str(instance_images),
            "--instance_prompt", PROMPT, *extra]
    if message is None:
        with pytest.raises(SystemExit):
            trainer.parse_args(argv)
        return
    with pytest.raises(ValueError, match=message):
        trainer.parse_args(argv)


def test_models_and_data_are_checked_before_anything_loads(trainer, tiny_models, tiny_sd, instance_images, tmp_path):
    with pytest.raises(ValueError, match="is a StableDiffusionPipeline; .* use train_immiscible_sd.py"):
        trainer.parse_args(["--pretrained_model_name_or_path", tiny_sd, "--instance_data_dir", str(instance_images)])
    with pytest.raises(ValueError, match="is a folder without model_index.json"):
        trainer.parse_args(["--pretrained_model_name_or_path", str(tmp_path), "--instance_data_dir",
                            str(instance_images)])
    with pytest.raises(ValueError, match="--guidance_scale is a flag of diffusers' Flux script"):
        trainer.parse_args(["--pretrained_model_name_or_path", tiny_models["sd3"], "--instance_data_dir",
                            str(instance_images), "--guidance_scale", "3.5"])
    with pytest.raises(ValueError, match="pass the training images: --instance_data_dir"):
        trainer.parse_args(["--pretrained_model_name_or_path", tiny_models["sd3"], "--instance_prompt", PROMPT])
    args = trainer.parse_args(["--pretrained_model_name_or_path", tiny_models["sd3"], "--instance_data_dir",
                               str(instance_images), "--validation_prompt", "a dog", "--class_prompt", "a dog",
                               "--prodigy_decouple", "True", "--local_rank", "0"])
    assert (args.weighting_scheme, args.precondition_outputs, args.max_sequence_length) == ("logit_normal", 1, 77)
    assert args.train_data_dir == str(instance_images) and args.validation_prompts == ["a dog"]
    flux = trainer.parse_args(["--pretrained_model_name_or_path", tiny_models["flux"], "--instance_data_dir",
                               str(instance_images)])
    assert (flux.weighting_scheme, flux.guidance_scale, flux.max_sequence_length) == ("none", 3.5, 512)
    assert (flux.immiscible, flux.immiscible_k, flux.rank) == ("knn", 4, 4)


SWITCH = None
# Every flag of diffusers' train_dreambooth_lora_sd3.py and train_dreambooth_lora_flux.py (their newest and
# older versions), with a value for those that take one.
DREAMBOOTH_LORA_FLOW = {
    "--pretrained_model_name_or_path": "MODEL", "--revision": "main", "--variant": "fp16", "--dataset_name": "me/data",
    "--dataset_config_name": "plain", "--instance_data_dir": "DIR", "--cache_dir": "cache", "--image_column": "image",
    "--caption_column": "text", "--repeats": "2", "--class_data_dir": "DIR", "--instance_prompt": "a photo of sks dog",
    "--class_prompt": "a photo of a dog", "--max_sequence_length": "77", "--validation_prompt": "a sks dog",
    "--num_validation_images": "4", "--validation_epochs": "50", "--rank": "4", "--lora_alpha": "4",
    "--lora_dropout": "0.0", "--with_prior_preservation": SWITCH, "--prior_loss_weight": "1.0",
    "--num_class_images": "100", "--output_dir": "out", "--seed": "0", "--resolution": "512",
    "--center_crop": SWITCH, "--random_flip": SWITCH, "--train_text_encoder": SWITCH, "--train_batch_size": "4",
    "--sample_batch_size": "4", "--num_train_epochs": "1", "--max_train_steps": "10", "--checkpointing_steps": "500",
    "--checkpoints_total_limit": "2", "--resume_from_checkpoint": "latest", "--gradient_accumulation_steps": "1",
    "--gradient_checkpointing": SWITCH, "--learning_rate": "1e-4", "--guidance_scale": "3.5",
    "--text_encoder_lr": "5e-6", "--scale_lr": SWITCH, "--lr_scheduler": "constant", "--lr_warmup_steps": "500",
    "--lr_num_cycles": "1", "--lr_power": "1.0", "--dataloader_num_workers": "0", "--weighting_scheme": "logit_normal",
    "--logit_mean": "0.0", "--logit_std": "1.0", "--mode_scale": "1.29", "--precondition_outputs": "1",
    "--optimizer": "AdamW", "--use_8bit_adam": SWITCH, "--adam_beta1": "0.9", "--adam_beta2": "0.999",
    "--prodigy_beta3": "0.9", "--prodigy_decouple": "True", "--adam_weight_decay": "1e-04",
    "--adam_weight_decay_text_encoder": "1e-03", "--lora_layers": "attn.to_k,attn.to_q", "--lora_blocks": "0",
    "--adam_epsilon": "1e-08", "--prodigy_use_bias_correction": "True", "--prodigy_safeguard_warmup": "True",
    "--max_grad_norm": "1.0", "--push_to_hub": SWITCH, "--hub_token": "tok", "--hub_model_id": "me/model",
    "--logging_dir": "logs", "--allow_tf32": SWITCH, "--cache_latents": SWITCH, "--report_to": "tensorboard",
    "--mixed_precision": "bf16", "--upcast_before_saving": SWITCH, "--prior_generation_precision": "fp16",
    "--local_rank": "0", "--enable_npu_flash_attention": SWITCH, "--image_interpolation_mode": "lanczos",
}
OTHER_FAMILYS = {"sd3": "--guidance_scale", "flux": "--precondition_outputs"}  # refused by name, with the reason


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_every_diffusers_flag_is_accepted_or_refused_by_name(family, trainer, tiny_models, tmp_path):
    flags = {flag: {"DIR": tmp_path, "MODEL": tiny_models[family]}.get(value, value)
             for flag, value in DREAMBOOTH_LORA_FLOW.items()}
    refused = refused_flags(trainer, flags, lambda flag: ["--pretrained_model_name_or_path", tiny_models[family]] + (
        ["--instance_data_dir", tmp_path] if flag != "--dataset_name" else []))
    # What is refused is refused on purpose (or for lack of an optional package), never by accident.
    unsupported = {entry.flag for entry in DREAMBOOTH_FLOW_FLAGS if isinstance(entry, Unsupported)}
    assert refused - {"--use_8bit_adam"} == unsupported | {OTHER_FAMILYS[family]}


def test_the_page_lists_every_alias_and_refused_flag():
    page = (REPO / "docs" / "train-sd3-flux.md").read_text()
    for entry in DREAMBOOTH_FLOW_FLAGS:
        if isinstance(entry, (Alias, EveryEpochs, Unsupported)):
            assert f"`{entry.flag}`" in page, entry.flag


# --- library pieces ---------------------------------------------------------------------------------------------

def test_flow_matching_loss_targets_the_noise_that_was_mixed_in():
    torch.manual_seed(0)
    latents, noise, pred = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    noisy = interpolate(latents, noise, sigmas)
    assert torch.allclose(noisy[1], 0.5 * latents[1] + 0.5 * noise[1])
    velocity = flow_matching_loss(pred, latents, noise, noisy, sigmas, "none")
    assert torch.allclose(velocity, ((pred - (noise - latents)) ** 2).mean())
    assert flow_matching_loss(noise - latents, latents, noise, noisy, sigmas, "none") == 0  # the exact velocity
    # SD3's preconditioning: x0 estimate noisy - sigma * v against the latents; the exact velocity gives x0.
    assert flow_matching_loss(noise - latents, latents, noise, noisy, sigmas, "none", True) < 1e-10
    weighted = flow_matching_loss(pred, latents, noise, noisy, sigmas, "sigma_sqrt")
    per_sample = ((pred - (noise - latents)) ** 2).flatten(1).mean(1)
    assert torch.allclose(weighted, (per_sample / sigmas ** 2).mean())


def test_timesteps_come_from_the_training_schedulers_levels():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    torch.manual_seed(0)
    timesteps, sigmas = sample_timesteps(scheduler, 512, "logit_normal")
    assert torch.allclose(timesteps, sigmas * 1000) and ((sigmas > 0) & (sigmas <= 1)).all()
    assert set(timesteps.tolist()) <= set(scheduler.timesteps.tolist())
    assert sigmas.median() > 0.6  # shift 3 moves the logit-normal's median 0.5 to 0.75
    with pytest.raises(ValueError, match="--weighting_scheme must be one of"):
        sample_timesteps(scheduler, 2, "uniform")


def test_lora_target_modules_follow_diffusers_flags():
    default = FLOW_FAMILIES["sd3"].lora_target_modules
    assert lora_target_modules(default) == list(default)
    assert lora_target_modules(default, "attn.to_k, attn.to_q") == ["attn.to_k", "attn.to_q"]
    assert lora_target_modules(default, "attn.to_k", "0,12") == ["transformer_blocks.0.attn.to_k",
                                                                  "transformer_blocks.12.attn.to_k"]
    with pytest.raises(ValueError, match="--lora_blocks must be comma-separated block numbers"):
        lora_target_modules(default, None, "first")


def test_prompt_embeddings_are_the_pipelines_and_computed_once_per_prompt(tiny_models):
    pipeline = FluxPipeline.from_pretrained(tiny_models["flux"], transformer=None, vae=None)
    embeddings = PromptEmbeddings(pipeline, max_sequence_length=16, cache_size=2)
    batch = embeddings(["a", "b", "a"])
    assert embeddings.encoded == 2 and batch["prompt_embeds"].shape == (3, 16, 32)
    assert torch.equal(batch["prompt_embeds"][0], batch["prompt_embeds"][2])
    with torch.no_grad():  # as the class encodes (attention may take another kernel with gradients)
        direct, pooled, _ = pipeline.encode_prompt(["b"], None, max_sequence_length=16)
    # Encoded alone, whatever it was asked with: bit-equal to the pipeline's own encoding of the prompt alone.
    assert torch.equal(batch["prompt_embeds"][1], direct[0])
    assert torch.equal(batch["pooled_prompt_embeds"][1], pooled[0])
    embeddings(["c"])  # evicts the least recently used ("b")
    embeddings(["a", "b"])
    assert embeddings.encoded == 4


def test_known_prompts_are_a_fixed_small_set_or_none():
    import datasets

    from immiscible_pipeline.training.captions import Captioner

    labelled = datasets.Dataset.from_dict({"label": [0, 1, 1]}).cast_column(
        "label", datasets.ClassLabel(names=["tench, Tinca tinca", "goldfish"]))
    assert known_prompts(Captioner.for_dataset(labelled, "label"), labelled) == ["a photo of a goldfish",
                                                                                 "a photo of a tench"]
    assert known_prompts(Captioner.for_dataset(labelled, "label", synonyms="random"), labelled) is None
    captioned = datasets.Dataset.from_dict({"text": [["a cat"], ["a dog", "a cat"]] * 2})  # lists of captions
    assert known_prompts(Captioner.for_dataset(captioned, "text", caption_dropout=0.1), captioned) == [
        "a cat", "a dog", ""]
    many = datasets.Dataset.from_dict({"text": [f"caption {i}" for i in range(300)]})
    assert known_prompts(Captioner.for_dataset(many, "text"), many) is None  # more than are kept


def test_flow_family_reads_model_index(tiny_models, tmp_path):
    assert flow_family(tiny_models["sd3"]).name == "sd3" and flow_family(tiny_models["flux"]).name == "flux"
    with pytest.raises(ValueError, match="no such folder"):
        flow_family(str(tmp_path / "missing" / "model"))


def test_the_memory_table_is_the_benchmarks_output(capsys):
    """benchmarks/flow_memory.py counts the real models' sizes from their configs (on the meta device): its
    transformer totals are the published ones, and the page shows its rows as printed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("flow_memory", REPO / "benchmarks" / "flow_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| SD3.5") or
            line.startswith("| FLUX")]
    assert rows[0].startswith("| SD3.5 medium | 2.47B |") and rows[1].startswith("| FLUX.1 [dev] | 11.90B |")
    page = (REPO / "docs" / "train-sd3-flux.md").read_text()
    assert all(row in page for row in rows)

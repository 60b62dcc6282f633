"""Model cards and uploads to the Hugging Face Hub, for any trainer.

    check_hub_token(args.report_to, args.hub_token)            # before training: refuse a token leak
    repo_id = create_hub_repo(args.output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo)
    ...                                                        # train, save the pipeline to output_dir
    description = card_description(title, summary, settings, usage=..., image="samples.png")
    write_model_card(args.output_dir, repo_id, description, tags, hub_token=args.hub_token)
    upload_output_folder(args.output_dir, repo_id, args.hub_token)   # everything but the checkpoints

The card comes from diffusers' `load_or_create_model_card` / `populate_model_card`, so it keeps a card
already on the Hub and has the usual diffusers metadata.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import create_repo, upload_folder

CHECKPOINT_PATTERNS = ("checkpoint-*",)  # accelerate states: large, and of no use for inference


def check_hub_token(report_to: str | None, hub_token: str | None) -> None:
    """Refuses `--hub_token` with `--report_to wandb`: the token would be logged with the run's settings."""
    if hub_token is not None and report_to in ("wandb", "all"):
        raise ValueError("You cannot use both --report_to=wandb and --hub_token due to a security risk of exposing "
                         "your token: the run's settings are logged. Log in with `huggingface-cli login` instead.")


def create_hub_repo(output_dir: str | os.PathLike, hub_model_id: str | None = None, hub_token: str | None = None,
                    private: bool = False) -> str:
    """Creates the model repo (if needed) at the start of training, so a bad token fails early. Default
    name: the output folder's name. Returns the full repo id."""
    name = hub_model_id or Path(output_dir).resolve().name
    return create_repo(repo_id=name, exist_ok=True, token=hub_token, private=private).repo_id


def immiscible_tags(method: str) -> list[str]:
    """Tags every card of this project carries, plus the assignment method."""
    return ["diffusers", "diffusers-training", "immiscible-diffusion", f"immiscible-{method}"]


def lora_usage(base_model: str, repo_id: str, prompt: str) -> str:
    """The usage snippet of a LoRA card: the base pipeline with the repo's LoRA loaded, as plain diffusers."""
    return (f'from diffusers import DiffusionPipeline\n\npipeline = DiffusionPipeline.from_pretrained("{base_model}")\n'
            f'pipeline.load_lora_weights("{repo_id}")\nimage = pipeline({prompt!r}, num_inference_steps=50).images[0]')


def settings_table(settings: dict) -> str:
    """A two-column markdown table of the training settings."""
    rows = [f"| {key} | {value} |" for key, value in settings.items()]
    return "\n".join(["| setting | value |", "| --- | --- |", *rows])


def card_description(title: str, summary: str, settings: dict, usage: str | None = None,
                     image: str | None = None) -> str:
    """The markdown body of a model card: title, summary, an image (path relative to the repo), the settings
    table and a usage snippet."""
    parts = [f"# {title}", summary]
    if image is not None:
        parts.append(f"![samples]({image})")
    parts += ["## Training settings", settings_table(settings)]
    if usage is not None:
        parts += ["## Usage", f"```python\n{usage.strip()}\n```"]
    return "\n\n".join(parts) + "\n"


def write_model_card(output_dir: str | os.PathLike, repo_id: str, description: str, tags: list[str],
                     hub_token: str | None = None, base_model: str | None = None,
                     license: str | None = None) -> Path:  # noqa: A002 - the Hub's field name
    """Writes `output_dir/README.md` (diffusers' card template filled with `description` and `tags`)."""
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card

    card = load_or_create_model_card(repo_id_or_path=repo_id, token=hub_token, from_training=True,
                                     model_description=description, base_model=base_model, license=license)
    card = populate_model_card(card, tags=tags)
    path = Path(output_dir) / "README.md"
    card.save(path)
    return path


def upload_output_folder(output_dir: str | os.PathLike, repo_id: str, hub_token: str | None = None,
                         commit_message: str = "End of training",
                         ignore_patterns: tuple[str, ...] = CHECKPOINT_PATTERNS):
    """Uploads the output folder (pipeline, card, sample grids, logs) without the checkpoints."""
    return upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message=commit_message,
                         ignore_patterns=list(ignore_patterns), token=hub_token)

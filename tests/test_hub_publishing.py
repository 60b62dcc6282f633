"""immiscible_pipeline.training.hub_publishing: token safety, repo creation, model card, upload (Hub client
substituted)."""

from types import SimpleNamespace

import pytest
from huggingface_hub.utils import filter_repo_objects

from immiscible_pipeline.training import hub_publishing as hub


def test_hub_token_is_refused_with_wandb():
    hub.check_hub_token("tensorboard", "hf_secret")
    hub.check_hub_token("wandb", None)
    for report_to in ("wandb", "all"):
        with pytest.raises(ValueError, match="--report_to=wandb and --hub_token"):
            hub.check_hub_token(report_to, "hf_secret")


def test_repo_is_named_after_the_output_folder(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(hub, "create_repo",
                        lambda **kw: calls.append(kw) or SimpleNamespace(repo_id=f"me/{kw['repo_id']}"))
    assert hub.create_hub_repo(tmp_path / "my-model", None, "tok", private=True) == "me/my-model"
    assert hub.create_hub_repo(tmp_path / "my-model", "org/other") == "me/org/other"
    assert calls == [{"repo_id": "my-model", "exist_ok": True, "token": "tok", "private": True},
                     {"repo_id": "org/other", "exist_ok": True, "token": None, "private": False}]


def test_model_card_has_description_settings_usage_and_tags(tmp_path):
    description = hub.card_description("Title here", "What it is.", {"assignment": "linear", "batch size": 128},
                                       usage="print('hi')", image="samples.png")
    path = hub.write_model_card(tmp_path, "me/model", description, hub.immiscible_tags("linear") + ["ddim"])
    card = path.read_text()
    assert path == tmp_path / "README.md"
    for text in ("# Title here", "What it is.", "![samples](samples.png)", "| assignment | linear |",
                 "| batch size | 128 |", "```python\nprint('hi')\n```", "library_name: diffusers",
                 "- immiscible-diffusion", "- immiscible-linear", "- diffusers-training", "- ddim"):
        assert text in card


def test_upload_sends_the_output_folder_without_checkpoints(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(hub, "upload_folder", lambda **kw: calls.append(kw))
    hub.upload_output_folder(tmp_path, "me/model", "tok")
    (call,) = calls
    assert call["repo_id"] == "me/model" and call["folder_path"] == str(tmp_path) and call["token"] == "tok"
    files = ["unet/diffusion_pytorch_model.safetensors", "model_index.json", "samples.png", "logs/run/events",
             "checkpoint-500/unet/diffusion_pytorch_model.safetensors", "checkpoint-500/random_states_0.pkl"]
    kept = list(filter_repo_objects(files, ignore_patterns=call["ignore_patterns"]))
    assert kept == files[:4]

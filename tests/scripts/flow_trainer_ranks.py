"""Run by tests/test_train_sd3_flux.py under `accelerate launch` (2 CPU processes): train_immiscible_sd3_flux.py
with its arguments, and then every process writes the LoRA weights it ended with (transformer and, with
--train_text_encoder, the CLIP text encoder, which trains outside DDP) to <output_dir>/rank<r>.pt, so that the
test can check that the processes stayed identical."""

import importlib.util
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def main():
    spec = importlib.util.spec_from_file_location("train_immiscible_sd3_flux", REPO / "train_immiscible_sd3_flux.py")
    trainer = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = trainer
    spec.loader.exec_module(trainer)
    made = {}
    real_embeddings, real_load, real_end = trainer.PromptEmbeddings, trainer.load_transformer, trainer.end_training

    def embeddings(*args, **kwargs):
        made["text"] = real_embeddings(*args, **kwargs)
        return made["text"]

    def load(*args, **kwargs):
        made["transformer"] = real_load(*args, **kwargs)
        return made["transformer"]

    def end(accelerator):
        modules = {"transformer": made["transformer"], "text_encoder": made["text"].pipeline.text_encoder}
        weights = {f"{name}.{key}": value.detach().cpu().clone() for name, module in modules.items()
                   for key, value in module.named_parameters() if "lora" in key}
        torch.save(weights, Path(args.output_dir) / f"rank{accelerator.process_index}.pt")
        real_end(accelerator)

    trainer.PromptEmbeddings, trainer.load_transformer, trainer.end_training = embeddings, load, end
    args = trainer.parse_args()
    trainer.main(args)


if __name__ == "__main__":
    main()

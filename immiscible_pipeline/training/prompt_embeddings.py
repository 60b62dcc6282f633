"""Prompts for the SD3 / Flux trainer: samples that carry the prompt text, and the text encoders' embeddings,
computed once per distinct prompt and kept while the encoders are frozen.

    samples = PromptTexts(images_or_cached_latents, captioner, caption_key)    # {"prompt": str, "group": int}
    text = PromptEmbeddings(text_pipeline, max_sequence_length=77)
    text(known_prompts(captioner, dataset)); text.offload()          # where the prompts are a known, small set
    embeddings = text(batch["prompt"])     # {"prompt_embeds", "pooled_prompt_embeds"[, "text_ids"]}
    pipeline(**text.pipeline_inputs(["a validation prompt"]))          # sampling without the encoders

Frozen encoders (without --train_text_encoder) encode a prompt always to the same tensors: a DreamBooth run with
one instance prompt runs its three encoders (SD3) or two (Flux) once, not every step. The pipeline's own
`encode_prompt` does the encoding, so the embeddings are exactly those the pipeline computes at sampling time.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .captions import PromptedSamples, PROMPT_STREAM
from ..data import sample_seed

PROMPT_CACHE_SIZE = 256  # distinct prompts kept (Flux, 512 T5 tokens, bf16: 4 MB each)


class PromptTexts(PromptedSamples):
    """`captions.PromptedSamples` that keeps the prompt as text (`prompt`) instead of one tokenizer's ids: SD3
    and Flux encode it with several tokenizers. Same prompt choices, dropout and groups."""

    def __init__(self, samples, captioner, caption_key: str):
        super().__init__(samples, captioner, tokenizer=None, caption_key=caption_key)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.samples[index])
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index, PROMPT_STREAM))
        item["prompt"], item["group"] = self.captioner.sample(item.pop(self.caption_key), generator)
        return item


class PromptEmbeddings:
    """The text embeddings of a batch of prompts from a pipeline's text encoders (`pipeline.encode_prompt` of a
    StableDiffusion3Pipeline, FluxPipeline or StableDiffusionXLPipeline loaded without transformer / UNet and VAE;
    `max_sequence_length` is T5's and SDXL ignores it), on the device the encoders were
    on at the start. Frozen encoders: kept for the last PROMPT_CACHE_SIZE distinct prompts, and once every
    prompt a run needs is kept, `offload()` moves the encoders to the CPU (T5-XXL alone is 9.5 GB in bf16).
    `trained=True` (a LoRA on the CLIP encoders): computed every call, with gradients."""

    def __init__(self, pipeline, max_sequence_length: int, cache_size: int = PROMPT_CACHE_SIZE,
                 trained: bool = False):
        self.pipeline, self.max_sequence_length, self.cache_size = pipeline, max_sequence_length, cache_size
        self.trained = trained
        self.cache: OrderedDict[str, dict] = OrderedDict()
        self.encoded = 0  # prompts run through the encoders (for tests and logs)
        self.output_device = self.device  # where the embeddings go, wherever the encoders are
        self.offloaded = False

    @property
    def device(self) -> torch.device:
        return self.pipeline.text_encoder.device

    def offload(self) -> None:
        """Moves the text encoders to the CPU; prompts not kept yet are then encoded there (slowly)."""
        if self.trained:
            raise ValueError("trained text encoders cannot be offloaded: they encode every step")
        self.pipeline.to("cpu")
        self.offloaded = True

    def encode(self, prompts: list[str]) -> dict:
        """Runs the encoders on `prompts`: {"prompt_embeds": [B, tokens, width], "pooled_prompt_embeds": [B, width]
        and, for Flux, "text_ids": [tokens, 3]}; with gradients only if the encoders train."""
        self.encoded += len(prompts)
        with torch.set_grad_enabled(self.trained and torch.is_grad_enabled()):
            encoded = self._encode(prompts)
        return {key: value.to(self.output_device) for key, value in encoded.items()}

    def _encode(self, prompts: list[str]) -> dict:
        if type(self.pipeline).__name__.startswith("StableDiffusionXL"):  # two CLIPs, no T5
            embeds, _, pooled, _ = self.pipeline.encode_prompt(prompts, device=self.device,
                                                               do_classifier_free_guidance=False)
            return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if type(self.pipeline).__name__.startswith("StableDiffusion3"):
            embeds, _, pooled, _ = self.pipeline.encode_prompt(prompts, None, None, device=self.device,
                                                               do_classifier_free_guidance=False,
                                                               max_sequence_length=self.max_sequence_length)
            return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        embeds, pooled, text_ids = self.pipeline.encode_prompt(prompts, None, device=self.device,
                                                               max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "text_ids": text_ids}

    def pipeline_inputs(self, prompts: list[str], negative: bool = False) -> dict:
        """The prompt arguments of a pipeline call from these embeddings (with `negative`, the empty prompt's as
        the negative, which is SD3's default for guidance), so that a pipeline whose encoders were offloaded
        samples without running them."""
        with torch.no_grad():
            text = self(prompts)
            inputs = {"prompt_embeds": text["prompt_embeds"], "pooled_prompt_embeds": text["pooled_prompt_embeds"]}
            if negative:
                empty = self([""] * len(prompts))
                inputs.update(negative_prompt_embeds=empty["prompt_embeds"],
                              negative_pooled_prompt_embeds=empty["pooled_prompt_embeds"])
        return inputs

    def __call__(self, prompts) -> dict:
        prompts = list(prompts)
        if self.trained:
            return self.encode(prompts)
        # One prompt at a time: a prompt's embedding must not depend on what it was batched with (matrix products
        # of other sizes round differently), or a run that also encodes validation prompts would train on other
        # bits than one that does not, and resuming would not be exact.
        for prompt in dict.fromkeys(prompt for prompt in prompts if prompt not in self.cache):
            self.cache[prompt] = {key: value if key == "text_ids" else value[0]
                                  for key, value in self.encode([prompt]).items()}
        rows = [self.cache[prompt] for prompt in prompts]
        for prompt in prompts:
            self.cache.move_to_end(prompt)
        batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0] if key != "text_ids"}
        if "text_ids" in rows[0]:
            batch["text_ids"] = rows[0]["text_ids"]  # the same (zeros) for every prompt
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return batch


def known_prompts(captioner, dataset) -> list[str] | None:
    """Every prompt `captioner` can make from `dataset`'s caption column (with "" where captions are dropped), if
    that is a fixed set of at most PROMPT_CACHE_SIZE prompts: an instance prompt, class names (not random
    synonyms), or a text column's captions. None otherwise."""
    values = set()
    if captioner.is_class_label:
        if captioner.synonyms == "random":
            return None
        prompts = {captioner.class_prompt(label) for label in range(len(captioner.class_names))}
    else:
        for value in dataset[captioner.column]:
            if not isinstance(value, (str, list, tuple)):
                return None  # not captions: training will name the column at fault
            values.update([value] if isinstance(value, str) else value)
            if len(values) > PROMPT_CACHE_SIZE:
                return None
        prompts = values
    prompts = sorted(prompts) + ([""] if captioner.caption_dropout > 0 else [])
    return prompts if len(prompts) <= PROMPT_CACHE_SIZE else None

"""Prompts from class names and captions: templates, synonyms, dropped rows, dropout, groups, clear errors."""

import datasets
import pytest
import torch

from immiscible_pipeline.training.captions import NO_LABEL, Captioner, prompt_id, PromptedSamples, tokenize_prompts
from immiscible_pipeline.training.tiny_stable_diffusion import tiny_clip_tokenizer

NAMES = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark, white shark, man-eater"]


def class_dataset(labels=(0, 1, 2, 1)):
    features = datasets.Features({"label": datasets.ClassLabel(names=NAMES), "other": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"label": list(labels), "other": [0] * len(labels)}, features=features)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_class_prompt_uses_the_datasets_own_names_first_synonym_by_default():
    captioner = Captioner.for_dataset(class_dataset(), "label")
    assert captioner.is_class_label and captioner.class_names == NAMES
    assert [captioner.prompt(label) for label in range(3)] == [
        "a photo of a tench", "a photo of a goldfish", "a photo of a great white shark"]
    custom = Captioner.for_dataset(class_dataset(), "label", prompt_template="{}, a fish", synonyms="all")
    assert custom.prompt(0) == "tench, Tinca tinca, a fish"


def test_random_synonym_covers_all_synonyms_and_is_fixed_by_the_generator():
    captioner = Captioner.for_dataset(class_dataset(), "label", prompt_template="{}", synonyms="random")
    drawn = {captioner.prompt(2, gen(seed)) for seed in range(60)}
    assert drawn == {"great white shark", "white shark", "man-eater"}
    assert captioner.prompt(2, gen(5)) == captioner.prompt(2, gen(5))


def test_rows_labelled_minus_one_are_dropped():
    captioner = Captioner.for_dataset(class_dataset((0, -1, 2, -1, 1)), "label")
    assert captioner.labelled_rows(class_dataset((0, -1, 2, -1, 1))) == [0, 2, 4]
    assert captioner.labelled_rows(class_dataset((0, 1))) is None  # nothing to drop: no copy of the dataset


def test_text_column_string_or_list_used_as_is():
    data = datasets.Dataset.from_dict({"text": [["first caption", "second caption"]]})
    captioner = Captioner.for_dataset(data, "text")
    assert not captioner.is_class_label
    assert {captioner.prompt(["first caption", "second caption"], gen(s)) for s in range(30)} == {
        "first caption", "second caption"}
    assert captioner.prompt("just this one") == "just this one"
    assert captioner.labelled_rows(data) is None
    with pytest.raises(ValueError, match="strings or non-empty lists of strings"):
        captioner.prompt(None)


def test_caption_dropout_rate_and_groups():
    captioner = Captioner.for_dataset(class_dataset(), "label", caption_dropout=0.3)
    results = [captioner.sample(1, gen(seed)) for seed in range(2000)]
    dropped = [prompt == "" for prompt, _ in results]
    assert 0.25 < sum(dropped) / len(dropped) < 0.35
    assert all(group == (NO_LABEL if prompt == "" else 1) for prompt, group in results)
    never = Captioner.for_dataset(class_dataset(), "label")
    assert never.sample(2, gen(0)) == ("a photo of a great white shark", 2)


def test_text_groups_are_stable_prompt_hashes():
    captioner = Captioner(column="text")
    assert captioner.sample("a cat", gen(0))[1] == captioner.sample("a cat", gen(1))[1] == prompt_id("a cat")
    assert prompt_id("a cat") != prompt_id("a dog")
    assert 0 <= prompt_id("anything") < 2**63
    assert prompt_id("a cat") == 5867787368591784627  # the same in every process and run (not the salted hash())


def test_clear_errors():
    with pytest.raises(ValueError, match=r"--caption_column 'caption' is not a column.*columns are: label, other"):
        Captioner.for_dataset(class_dataset(), "caption")
    with pytest.raises(ValueError, match=r"integer labels without class names.*ClassLabel"):
        Captioner.for_dataset(class_dataset(), "other")
    with pytest.raises(ValueError, match=r"must contain '\{\}'"):
        Captioner.for_dataset(class_dataset(), "label", prompt_template="a photo")
    with pytest.raises(ValueError, match="caption_dropout"):
        Captioner.for_dataset(class_dataset(), "label", caption_dropout=1.5)
    with pytest.raises(ValueError, match="not one of its 3 classes"):
        Captioner.for_dataset(class_dataset(), "label").prompt(7)


class Rows(torch.utils.data.Dataset):
    """A stand-in for TrainImages: seed, epoch, start_epoch, and rows holding a raw caption value."""

    def __init__(self, labels, seed=0):
        self.labels, self.seed, self.epoch = labels, seed, 0

    def start_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": torch.zeros(1), "label": self.labels[index]}


def test_prompted_samples_tokenize_and_fix_choices_by_seed_epoch_row():
    tokenizer = tiny_clip_tokenizer()
    captioner = Captioner(column="label", class_names=NAMES, prompt_template="{}", synonyms="random",
                          caption_dropout=0.2)
    samples = PromptedSamples(Rows([2] * 40), captioner, tokenizer, caption_key="label")
    first = [samples[i] for i in range(40)]
    assert set(first[0]) == {"pixel_values", "input_ids", "group"}
    assert first[0]["input_ids"].shape == (tokenizer.model_max_length,)
    again = [samples[i] for i in range(40)]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    expected = {tuple(ids.tolist()): prompt for prompt, ids in
                zip(["great white shark", "white shark", "man-eater", ""],
                    tokenize_prompts(tokenizer, ["great white shark", "white shark", "man-eater", ""]))}
    drawn = [expected[tuple(item["input_ids"].tolist())] for item in first]  # KeyError: another prompt
    assert set(drawn) == set(expected.values())
    samples.start_epoch(1)
    assert samples.epoch == 1 and samples.samples.epoch == 1
    later = [samples[i] for i in range(40)]
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, later))


def test_tokenize_prompts_pads_to_model_max_length():
    tokenizer = tiny_clip_tokenizer()
    ids = tokenize_prompts(tokenizer, ["a", "a much longer prompt than thirty-two bytes of text"])
    assert ids.shape == (2, tokenizer.model_max_length)

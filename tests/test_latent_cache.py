"""The latent cache: stored distributions, stochastic sampling, resuming, stale caches, and the same training
batches as encoding the images on the fly."""

import pytest
import torch
from diffusers import AutoencoderKL
from sd_fixtures import captioned_folder, labelled_folder, one_thread, tiny_sd  # noqa: F401 - fixtures

from immiscible_pipeline.training.captions import Captioner, PromptedSamples
from immiscible_pipeline.data import load_image_dataset, train_dataloader, TrainImages
from immiscible_pipeline.training.latent_cache import (batch_latents, build_latent_cache, CachedLatents, chunk_path,
                                                       LatentCache, sample_latents)
from immiscible_pipeline.training.stable_diffusion import FilteredImageTransform
from immiscible_pipeline.training.tiny_stable_diffusion import tiny_clip_tokenizer

RESOLUTION = 16
pytestmark = pytest.mark.usefixtures("one_thread")


class CountingVAE(torch.nn.Module):
    """Wraps a VAE and counts the images it encodes."""

    def __init__(self, vae):
        super().__init__()
        self.vae, self.encoded = vae, 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.vae, name)

    def encode(self, pixels):
        self.encoded += pixels.shape[0]
        return self.vae.encode(pixels)


@pytest.fixture(scope="module")
def vae(tiny_sd):
    return AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae").eval()


@pytest.fixture(scope="module")
def dataset(labelled_folder):
    return load_image_dataset(train_data_dir=str(labelled_folder))


def images(dataset, flip=False, seed=3):
    transform = FilteredImageTransform(RESOLUTION, 3, center_crop=True, random_flip=flip, interpolation="lanczos")
    return TrainImages(dataset, "image", transform, seed, keep_columns=["label"])


def build(directory, dataset, vae, flip=True, **kwargs):
    options = dict(settings={"model": "tiny"}, batch_size=4, chunk_size=5, flip=flip, caption_key="label")
    options.update(kwargs)
    return build_latent_cache(directory, images(dataset), vae, **options)


@pytest.fixture(scope="module")
def flipped_cache(tmp_path_factory, dataset, vae):
    """A cache of the labelled images and their mirrors, 3 chunks of 5 rows. Read-only."""
    return build(tmp_path_factory.mktemp("latents") / "cache", dataset, vae, flip=True)


def test_cache_stores_the_vae_distribution_of_each_image_and_its_mirror(flipped_cache, dataset, vae):
    cache = flipped_cache
    assert len(cache) == len(dataset) == 12 and cache.num_chunks == 3
    assert sorted(p.name for p in cache.directory.iterdir()) == [
        "chunk-000000.pt", "chunk-000001.pt", "chunk-000002.pt", "meta.json"]
    source = images(dataset)
    for row in (0, 7, 11):
        pixels = source[row]["pixel_values"][None]
        with torch.no_grad():
            plain, mirrored = vae.encode(pixels).latent_dist, vae.encode(pixels.flip(-1)).latent_dist
        item = cache[row]
        torch.testing.assert_close(item["latent_mean"], plain.mean[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(item["latent_std"], plain.std[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(item["latent_mean_flipped"], mirrored.mean[0], atol=1e-5, rtol=1e-4)
        assert item["caption"] == dataset[row]["label"]
    assert not torch.allclose(cache[0]["latent_mean"], cache[0]["latent_mean_flipped"])


def test_sampling_from_the_cache_stays_stochastic(flipped_cache, vae):
    mean, std = flipped_cache[0]["latent_mean"], flipped_cache[0]["latent_std"]
    draws = torch.stack([sample_latents(mean, std) for _ in range(400)])
    assert not torch.equal(draws[0], draws[1])
    torch.testing.assert_close(draws.mean(0), mean, atol=4 * std.max().item() / 20, rtol=0)
    torch.testing.assert_close(draws.std(0), std, atol=0, rtol=0.2)
    batch = {"latent_mean": mean[None], "latent_std": std[None]}
    torch.manual_seed(0)
    scaled = batch_latents(batch, vae)
    torch.manual_seed(0)
    torch.testing.assert_close(scaled, sample_latents(mean, std)[None] * vae.config.scaling_factor)


def test_interrupted_build_resumes_and_only_encodes_missing_chunks(tmp_path, dataset, vae):
    build(tmp_path / "cache", dataset, vae, flip=False)
    before = chunk_path(tmp_path / "cache", 0).stat().st_mtime_ns
    chunk_path(tmp_path / "cache", 1).unlink()  # as if the run had stopped while encoding chunk 1
    with pytest.raises(ValueError, match="incomplete"):
        LatentCache(tmp_path / "cache")
    counting = CountingVAE(vae)
    cache = build(tmp_path / "cache", dataset, counting, flip=False)
    assert counting.encoded == 5  # the rows of chunk 1 only
    assert chunk_path(tmp_path / "cache", 0).stat().st_mtime_ns == before
    assert len(cache) == 12
    counting.encoded = 0
    build(tmp_path / "cache", dataset, counting, flip=False)
    assert counting.encoded == 0  # complete: nothing to do


def test_a_cache_built_with_other_settings_is_refused(tmp_path, dataset, vae):
    build(tmp_path / "cache", dataset, vae, flip=False)
    with pytest.raises(ValueError, match=r"other settings \(flip: cache has False, this run wants True; "
                                         r"settings.model: cache has 'tiny', this run wants 'other'\)"):
        build(tmp_path / "cache", dataset, vae, flip=True, settings={"model": "other"})
    with pytest.raises(ValueError, match="holds no mirrored images"):
        CachedLatents(LatentCache(tmp_path / "cache"), random_flip=True)


def loader_batches(samples, epochs=2, batch_size=4):
    loader = train_dataloader(samples, batch_size)
    for epoch in range(epochs):
        samples.start_epoch(epoch)
        yield from loader


def test_cache_gives_the_same_training_batches_as_the_images(flipped_cache, dataset, vae):
    """Same seed: the same rows in the same order, the same flips, prompts and groups, and latents drawn
    from the same distributions with the same random numbers."""
    cache = flipped_cache
    tokenizer = tiny_clip_tokenizer()
    captioner = Captioner.for_dataset(dataset, "label", synonyms="random", caption_dropout=0.3)
    from_images = PromptedSamples(images(dataset, flip=True, seed=3), captioner, tokenizer, "label")
    from_cache = PromptedSamples(CachedLatents(cache, seed=3, random_flip=True, caption_key="label"), captioner,
                                 tokenizer, "label")
    pairs = list(zip(loader_batches(from_images), loader_batches(from_cache)))
    assert len(pairs) == 6
    for image_batch, cache_batch in pairs:
        assert torch.equal(image_batch["input_ids"], cache_batch["input_ids"])
        assert torch.equal(image_batch["group"], cache_batch["group"])
        torch.manual_seed(1)
        encoded = batch_latents(image_batch, vae)
        torch.manual_seed(1)
        cached = batch_latents(cache_batch, vae)
        torch.testing.assert_close(encoded, cached, atol=1e-5, rtol=1e-4)
    flips = [torch.equal(from_cache.samples[row]["latent_mean"], cache[row]["latent_mean_flipped"])
             for row in range(len(cache))]
    assert 0 < sum(flips) < len(flips)  # the flips really happen, and not to every image
    groups = torch.cat([batch["group"] for batch, _ in pairs])
    assert set(groups.tolist()) == {-1, 0, 1}  # both classes, and dropped prompts as their own group


def test_text_captions_are_cached_too(tmp_path, captioned_folder, vae):
    data = load_image_dataset(train_data_dir=str(captioned_folder))
    transform = FilteredImageTransform(RESOLUTION, 3, center_crop=True)
    source = TrainImages(data, "image", transform, keep_columns=["text"])
    cache = build_latent_cache(tmp_path / "cache", source, vae, {"model": "tiny"}, batch_size=4, caption_key="text")
    assert cache[3]["caption"] == data[3]["text"] == ["a red shape number 3", "a blue shape number 3"]

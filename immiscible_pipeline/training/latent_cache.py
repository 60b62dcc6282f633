"""Encode a dataset with the VAE once, then train from the stored latent distributions.

VAE encoding is a large share of a latent-diffusion step. The cache keeps, per image, the mean and standard
deviation of the VAE's latent distribution (and those of the mirrored image when random flips are on), with
the row's caption value, so training still draws a fresh `mean + std * eps` each time it sees an image:
sampling stays stochastic, exactly as when encoding on the fly.

Layout of a cache folder:
    meta.json                 format, row count, chunk size, flip, dtype and the settings it was built with
    chunk-000000.pt ...       rows [i * chunk_size, (i + 1) * chunk_size): latent_mean, latent_std
                              [, latent_mean_flipped, latent_std_flipped], captions, encoded_by (process index)

Chunks are written atomically (temporary file, then rename), so an interrupted build resumes where it stopped.
Processes share the work: chunk i is encoded by process i % num_processes. Loading maps the chunks into
memory lazily (torch.load(mmap=True)), so a cache larger than RAM still works.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..data import sample_seed

CACHE_FORMAT = 1
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
META_FILE = "meta.json"


def chunk_path(directory: Path, index: int) -> Path:
    return directory / f"chunk-{index:06d}.pt"


def collate_examples(examples: list[dict]) -> dict:
    """Stacks tensors; keeps everything else (captions, which may be strings or lists) as lists."""
    batch = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """mean + std * eps with eps ~ N(0, I) drawn from `generator` (on its device), in mean's dtype and device.

    The one place latents are drawn, for encoding on the fly and for the cache alike, so that both paths
    consume the generator identically."""
    device = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32)
    return mean + std * eps.to(mean.device, mean.dtype)


def scale_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """The latents the UNet is trained on: (z - shift_factor) * scaling_factor (SD v1/v2 have no shift)."""
    shift = getattr(vae_config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return latents * vae_config.scaling_factor


def batch_latents(batch: dict, vae, generator: torch.Generator | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Scaled latents for a training batch: from images (`pixel_values`, encoded now) or from the cache
    (`latent_mean`, `latent_std`), sampled by `sample_latents` either way."""
    device, dtype = vae.device, dtype or vae.dtype
    if "pixel_values" in batch:
        with torch.no_grad():
            dist = vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist
        mean, std = dist.mean, dist.std
    else:
        mean, std = batch["latent_mean"].to(device, dtype), batch["latent_std"].to(device, dtype)
    return scale_latents(sample_latents(mean, std, generator), vae.config)


class LatentCache(torch.utils.data.Dataset):
    """A finished cache folder as a map-style dataset of {latent_mean, latent_std, [..._flipped], caption}."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.meta = read_meta(self.directory)
        if self.meta is None:
            raise ValueError(f"{self.directory} is not a latent cache (no {META_FILE})")
        self.num_rows, self.chunk_size = self.meta["num_rows"], self.meta["chunk_size"]
        missing = [i for i in range(self.num_chunks) if not chunk_path(self.directory, i).exists()]
        if missing:
            raise ValueError(f"the latent cache {self.directory} is incomplete ({len(missing)} of {self.num_chunks} "
                             f"chunks missing); build it again to finish it")
        self._chunks: dict[int, dict] = {}

    @property
    def num_chunks(self) -> int:
        return -(-self.num_rows // self.chunk_size)

    @property
    def flip(self) -> bool:
        return self.meta["flip"]

    def __len__(self) -> int:
        return self.num_rows

    def chunk(self, index: int) -> dict:
        if index not in self._chunks:
            self._chunks[index] = torch.load(chunk_path(self.directory, index), mmap=True, weights_only=True)
        return self._chunks[index]

    def __getitem__(self, row: int) -> dict:
        if not 0 <= row < self.num_rows:
            raise IndexError(row)
        chunk = self.chunk(row // self.chunk_size)
        offset = row % self.chunk_size
        item = {key: chunk[key][offset].float() for key in chunk if key.startswith("latent_")}
        item["caption"] = chunk["captions"][offset]
        return item


class CachedLatents(torch.utils.data.Dataset):
    """Training samples from a `LatentCache`: {latent_mean, latent_std, <caption_key>: caption value}.

    With `random_flip` a sample is the mirrored image's encoding when the draw of (seed, epoch, row) says so:
    the same draw `data.ImageTransform` makes for a centre-cropped image, so the cache and the images give
    the same batches. `seed`, `epoch` and `start_epoch` work as for `data.TrainImages` (and `EpochShuffle`)."""

    def __init__(self, cache: LatentCache, seed: int = 0, random_flip: bool = False, caption_key: str = "caption"):
        if random_flip and not cache.flip:
            raise ValueError(f"the latent cache {cache.directory} holds no mirrored images; build it with "
                             f"--random_flip to train with flips")
        self.cache, self.seed, self.random_flip, self.caption_key = cache, seed, random_flip, caption_key
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.cache)

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        row = self.cache[index]
        suffix = ""
        if self.random_flip:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
            suffix = "_flipped" if torch.rand((), generator=generator) < 0.5 else ""
        return {"latent_mean": row["latent_mean" + suffix], "latent_std": row["latent_std" + suffix],
                self.caption_key: row["caption"]}


def read_meta(directory: Path) -> dict | None:
    path = Path(directory) / META_FILE
    return json.loads(path.read_text()) if path.exists() else None


def expected_meta(num_rows: int, chunk_size: int, flip: bool, dtype: str, settings: dict) -> dict:
    meta = {"format": CACHE_FORMAT, "num_rows": num_rows, "chunk_size": chunk_size, "flip": flip, "dtype": dtype,
            "settings": settings}
    return json.loads(json.dumps(meta))  # as it reads back from disk (tuples become lists)


def _flatten(meta: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in meta.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def check_meta(directory: Path, meta: dict) -> None:
    """Raises a ValueError naming every setting in which the cache at `directory` differs from `meta`."""
    found, wanted = _flatten(read_meta(directory) or {}), _flatten(meta)
    differing = sorted(key for key in set(found) | set(wanted) if found.get(key) != wanted.get(key))
    if differing:
        details = "; ".join(f"{key}: cache has {found.get(key)!r}, this run wants {wanted.get(key)!r}"
                            for key in differing)
        raise ValueError(f"the latent cache {directory} was built with other settings ({details}). Delete it or "
                         f"pass another --cache_latents folder.")


def build_latent_cache(directory: str | os.PathLike, dataset, vae, settings: dict, accelerator=None,
                       batch_size: int = 16, chunk_size: int = 1024, flip: bool = False, dtype: str = "float32",
                       num_workers: int = 0, caption_key: str = "caption") -> LatentCache:
    """Encodes the chunks of `dataset` that are not in `directory` yet and returns the finished cache.

    `dataset` yields {"pixel_values": [C, H, W] in [-1, 1] (no random augmentation), caption_key: value}.
    `settings` (JSON-able: model, resolution, crop ...) is stored and must match on later runs, so a cache
    is never silently reused for another model or preprocessing. With an `accelerator`, every process
    encodes its share (chunk i on process i % num_processes) and all wait for each other at the end.
    """
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype must be one of {sorted(CACHE_DTYPES)}, got {dtype!r}")
    from tqdm.auto import tqdm

    directory = Path(directory)
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    is_local_main = accelerator.is_local_main_process if accelerator is not None else True
    meta = expected_meta(len(dataset), chunk_size, flip, dtype, settings)
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if read_meta(directory) is None:
            (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    _wait(accelerator)
    check_meta(directory, meta)

    num_chunks = -(-len(dataset) // chunk_size)
    todo = [i for i in range(rank, num_chunks, world) if not chunk_path(directory, i).exists()]
    rows = sum(min(chunk_size, len(dataset) - i * chunk_size) for i in todo)
    with tqdm(total=rows, desc=f"Caching latents (process {rank})", unit="img", disable=not is_local_main) as bar:
        for index in todo:
            _encode_chunk(directory, index, dataset, vae, batch_size, chunk_size, flip, CACHE_DTYPES[dtype],
                          rank, num_workers, caption_key, bar)
    _wait(accelerator)
    return LatentCache(directory)


def _wait(accelerator) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


def _encode_chunk(directory, index, dataset, vae, batch_size, chunk_size, flip, dtype, rank, num_workers,
                  caption_key, bar):
    rows = range(index * chunk_size, min((index + 1) * chunk_size, len(dataset)))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, rows), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=collate_examples)
    parts: dict[str, list] = {"latent_mean": [], "latent_std": [], "captions": []}
    if flip:
        parts.update(latent_mean_flipped=[], latent_std_flipped=[])
    for batch in loader:
        pixels = batch["pixel_values"].to(vae.device, vae.dtype)
        views = [("", pixels)] + ([("_flipped", pixels.flip(-1))] if flip else [])
        for suffix, view in views:
            with torch.no_grad():
                dist = vae.encode(view).latent_dist
            parts["latent_mean" + suffix].append(dist.mean.to("cpu", dtype))
            parts["latent_std" + suffix].append(dist.std.to("cpu", dtype))
        parts["captions"].extend(batch[caption_key])
        bar.update(len(pixels))
    chunk = {key: torch.cat(value) if key != "captions" else value for key, value in parts.items()}
    chunk["encoded_by"] = rank
    final = chunk_path(directory, index)
    temporary = final.with_suffix(f".tmp{rank}")
    torch.save(chunk, temporary)
    os.replace(temporary, final)

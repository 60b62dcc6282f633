"""Judging samples by a number: sampling split across processes, feature networks (the FID InceptionV3, a
small classifier trained on the dataset), reference images and their cached features, FID / KID, the
command line `python -m immiscible_pipeline.evaluate`, and the comparison of runs' FID curves.

- `pipeline_metrics`: `evaluate_pipeline` and `TrainingEvaluator` (FID during training), built on
- `sampling`, `features`, `classifier`, `reference_images`, `reference_features`, `fid_kid`;
- `cli`: the command line;
- `fid_curves`, `run_records`, `compare_cli`: `python -m immiscible_pipeline.compare`, the speed-up at equal FID
  of finished runs (the convergence benchmark's tables come from `fid_curves` too).
"""

from .pipeline_metrics import TrainingEvaluator, evaluate_pipeline

__all__ = ["TrainingEvaluator", "evaluate_pipeline"]

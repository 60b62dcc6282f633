"""Judging samples by a number: sampling split across processes, feature networks (the FID InceptionV3, a
small classifier trained on the dataset), reference images and their cached features, FID / KID, and the
command line `python -m immiscible_pipeline.evaluate`.

- `pipeline_metrics`: `evaluate_pipeline` and `TrainingEvaluator` (FID during training), built on
- `sampling`, `features`, `classifier`, `reference_images`, `reference_features`, `fid_kid`;
- `cli`: the command line.
"""

from .pipeline_metrics import TrainingEvaluator, evaluate_pipeline

__all__ = ["TrainingEvaluator", "evaluate_pipeline"]

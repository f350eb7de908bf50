"""``fguide finetune``'s job: Smooth-ECE calibration fine-tuning of a guidance classifier.

The public entry is :func:`finetune` with a :class:`FinetuneConfig`. The package's modules:
:mod:`~fguide.finetune.config` (settings), :mod:`~fguide.finetune.data` (split, augmentation,
batches), :mod:`~fguide.finetune.steps` (loss, gradient accumulation, held-out evaluation),
:mod:`~fguide.finetune.loop` (the training loop, interrupts), :mod:`~fguide.finetune.classifier`
(the classifier wrapper, the x̂0 estimator) and :mod:`~fguide.finetune.job` (checkpoints,
resume, the report: the job itself).
"""

from fguide.finetune.job import (
    ArraySource,
    Classifier,
    ClassifierInput,
    FinetuneConfig,
    FinetuneResult,
    ImageSource,
    Precision,
    X0Estimator,
    accumulate_gradients,
    adm_x0_estimator,
    as_classifier,
    calibration_loss,
    finetune,
    open_data,
    random_crop_arr,
    split_holdout,
    training_loss,
    wrap_module,
)

__all__ = [
    "ArraySource",
    "Classifier",
    "ClassifierInput",
    "FinetuneConfig",
    "FinetuneResult",
    "ImageSource",
    "Precision",
    "X0Estimator",
    "accumulate_gradients",
    "adm_x0_estimator",
    "as_classifier",
    "calibration_loss",
    "finetune",
    "open_data",
    "random_crop_arr",
    "split_holdout",
    "training_loss",
    "wrap_module",
]

"""The module paths of the flat layout (before the packages per job) keep working for one release:
each warns that it is deprecated and re-exports the very objects of the new home."""

from __future__ import annotations

import importlib
import sys

import pytest

# old path -> {name: new home of that name}
MOVED: dict[str, dict[str, str]] = {
    "fguide.sampling_config": {
        **dict.fromkeys(
            "DEFAULT_SHARD_SIZE PARAM_RANGES PRECISIONS SampleConfig build_objective "
            "parse_flags".split(),
            "fguide.config",
        ),
        "model_family": "fguide.families",
        "resolve_config": "fguide.sampling",
    },
    "fguide.sampling_models": {
        "Components": "fguide.families",
        "build_components": "fguide.families",
        "MODEL_FILE": "fguide.families.adm",
    },
    "fguide.paper_configs": dict.fromkeys(
        "PAPER_CONFIGS PaperConfig apply_paper_config paper_config".split(),
        "fguide.sampling.configs",
    ),
    "fguide.calibration_report": dict.fromkeys(
        "TRAJECTORY_FILE ClassifierCalibration LevelCalibration TrajectoryCurves "
        "classifier_calibration find_trajectory load_trajectory_curves parse_noise_levels "
        "plot_calibration_vs_noise plot_trajectory_figures reliability_png_name "
        "trajectory_json write_reliability_diagrams".split(),
        "fguide.evaluation.calibration",
    ),
    "fguide.finetune_config": dict.fromkeys(
        "FREE_KEYS INPUTS PARAM_RANGES PRECISIONS ClassifierInput FinetuneConfig Precision "
        "config_dict".split(),
        "fguide.finetune.config",
    ),
    "fguide.finetune_data": dict.fromkeys(
        "DEFAULT_IMAGE_SIZE TrainLoader check_labels default_image_size labels_of load_one "
        "split_holdout".split(),
        "fguide.finetune.data",
    ),
    "fguide.finetune_steps": dict.fromkeys(
        "BatchStats X0Estimator accumulate_gradients call_classifier classifier_inputs "
        "evaluate_held_out training_loss".split(),
        "fguide.finetune.steps",
    ),
    "fguide.finetune_loop": dict.fromkeys(
        "Interrupt Trainer rng_fork set_train_mode train_loop trim_log".split(),
        "fguide.finetune.loop",
    ),
    "fguide.models.classifiers": dict.fromkeys(
        "CLIP_PREFIX LoadedClassifier classifier_presets is_adm_classifier load_classifier "
        "probe_num_classes state_dict_sha256".split(),
        "fguide.guides",
    ),
    "fguide.cfg_guidance": {
        **dict.fromkeys(
            "CFGClassifierGuidance MicrobatchGuide evaluate_guidance_microbatched "
            "guidance_weight".split(),
            "fguide.models.latent_guidance",
        ),
        "param_dtype": "fguide.accel",
    },
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_warns_and_reexports_the_same_objects(
    old: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, old, raising=False)  # a fresh import: the warning again
    with pytest.warns(DeprecationWarning, match=old.replace(".", r"\.") + " is deprecated"):
        module = importlib.import_module(old)
    names = MOVED[old]
    assert set(names) <= set(module.__all__)
    for name, home in names.items():
        assert getattr(module, name) is getattr(importlib.import_module(home), name), name

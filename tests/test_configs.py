"""Every shipped experiment config parses, names registered models and has valid per-model overrides, so a
typo in a YAML fails here rather than hours into a ``compare``."""
from pathlib import Path

import pytest

from sampletok.models import MODELS
from sampletok.train.experiment import Experiment

CONFIGS = sorted((Path(__file__).parent.parent / "configs" / "experiments").glob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 9


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_experiment_config_is_valid(path):
    exp = Experiment.from_yaml(path)
    labels = [m.display for m in exp.models]
    assert len(set(labels)) == len(labels)
    assert exp.reference is None or exp.reference in labels
    for spec in exp.models:
        assert spec.name in MODELS, f"{path.name}: unknown model {spec.name}"
        spec.train_config(exp.train)  # raises ConfigError on an invalid override

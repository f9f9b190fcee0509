"""Every shipped experiment config parses, names registered models and has valid per-model overrides, its models
can be built, and its dataset paths point at files that exist, so a typo in a YAML fails here rather than hours
into a ``compare``."""

from pathlib import Path

import pytest

from sampletok.features import FeatureLayout
from sampletok.models import MODELS, build_model
from sampletok.train.experiment import Experiment
from tests.conftest import REPO, SHARED_DATA, shared_path

CONFIGS = sorted((REPO / "configs" / "experiments").glob("*.yaml"))


def test_configs_are_found():
    """The parametrized tests below run over the shipped configs, not over an empty list."""
    assert CONFIGS, REPO / "configs" / "experiments"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_experiment_config_is_valid(path):
    exp = Experiment.from_yaml(path)
    labels = [m.display for m in exp.models]
    assert len(set(labels)) == len(labels)
    assert exp.reference is None or exp.reference in labels
    for spec in exp.models:
        assert spec.name in MODELS, f"{path.name}: unknown model {spec.name}"
        spec.train_config(exp.train)  # raises ConfigError on an invalid override


@pytest.fixture(scope="module")
def layout_of(synth_prepared, tmp_path_factory):
    """The feature layout an experiment's models are built on: the small synthetic log for synthetic configs
    (their params must not depend on the generator's sizes), the shipped schema over the first rows of the real
    log for MovieLens configs (their params may name its fields, e.g. SIF's history_fields)."""
    from sampletok.data.dataset import SplitSpec
    from sampletok.data.prepare import prepare
    from sampletok.data.sources import FrameSource
    from sampletok.data.sources.kuairand import load_kuairand
    from sampletok.data.sources.movielens import load_movielens

    READERS = {"movielens": load_movielens, "kuairand": load_kuairand}
    cache: dict[str, FeatureLayout] = {}

    def get(exp: Experiment) -> FeatureLayout:
        if exp.dataset.kind == "synthetic":
            return FeatureLayout.from_dataset(synth_prepared)
        assert exp.dataset.kind in READERS, f"no layout for dataset kind {exp.dataset.kind} in this test"
        data = _existing(exp.dataset.path)
        if str(data) not in cache:
            src, schema = READERS[exp.dataset.kind](data)
            head = FrameSource(src.frame.sort(schema.timestamp).head(5000), "ml head")
            ds = prepare(head, schema, tmp_path_factory.mktemp("ml") / "ds", SplitSpec(), progress=False)
            cache[str(data)] = FeatureLayout.from_dataset(ds)
        return cache[str(data)]

    return get


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_experiment_models_can_be_built(path, layout_of):
    """Each model's params are accepted by its constructor: build_model refuses unknown parameter names and the
    constructor validates values (a source/HGAQ config, a width not divisible by the token count, a field name)."""
    exp = Experiment.from_yaml(path)
    layout = layout_of(exp)
    for spec in exp.models:
        model = build_model(spec.name, layout, **spec.params)
        assert sum(p.numel() for p in model.parameters()) > 0, spec.display


def _existing(p: str) -> Path:
    """``p`` resolved from the repo root (where ``compare`` runs). A path into ../shared/data skips where that
    folder itself is absent (fails on CI); a wrong name inside it still fails."""
    resolved = (REPO / p).resolve()
    if resolved.is_relative_to(SHARED_DATA.resolve()):
        shared_path()
    assert resolved.exists(), f"{p} does not exist relative to the repo ({resolved})"
    return resolved


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_experiment_dataset_paths_resolve_from_the_repo(path):
    """``compare`` runs from the repo root, so a relative dataset path (e.g. ../shared/data/ml-100k) must name an
    existing file or folder relative to it (a run skips where ../shared/data itself is absent, fails on CI)."""
    ds = Experiment.from_yaml(path).dataset
    if ds.kind not in ("movielens", "kuairand", "files"):
        pytest.skip(f"dataset kind {ds.kind} reads no files")
    paths = [ds.path] + ([ds.schema_path] if ds.kind == "files" else [])
    for p in paths:
        assert p, f"{path.name}: dataset kind {ds.kind} needs a path"
        assert not Path(p).is_absolute(), f"{path.name}: {p} is absolute; configs ship relative paths"
        _existing(p)

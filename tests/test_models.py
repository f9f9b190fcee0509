import dataclasses

import pytest
import torch

from sampletok.data.batches import BatchLoader
from sampletok.errors import ConfigError
from sampletok.features import FeatureLayout
from sampletok.models import MODELS, build_model

BASELINES = ["dnn", "dcnv2", "din", "bst", "rankmixer", "onetrans", "hstu"]


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("data", ["toy_prepared", "synth_prepared"])
def test_forward_backward(name, data, request):
    ds = request.getfixturevalue(data)
    torch.manual_seed(0)
    layout = FeatureLayout.from_dataset(ds)
    model = build_model(name, layout)
    rows = ds.rows("train")[:50]
    batch = BatchLoader(ds, rows, 50).build(rows)
    out = model(batch)
    assert out.logits.shape == (len(rows), 1) and torch.isfinite(out.logits).all()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, batch.labels)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # the history branch is used: changing history items changes the score
    model.eval()
    with torch.no_grad():
        a = model(batch).logits
        batch.hist_cat[:] = torch.where(batch.hist_mask.unsqueeze(-1), (batch.hist_cat + 1) % 5 + 1, 0)
        b = model(batch).logits
    assert not torch.allclose(a, b)


def test_din_history_responses_count_only_once_known(synth_prepared):
    """DIN's label-aware history: a past label not yet known at the request cannot change the score,
    whatever its value; flipping a known one does; without the option labels are not read at all."""
    torch.manual_seed(0)
    layout = FeatureLayout.from_dataset(synth_prepared)
    rows = synth_prepared.rows("test")[:128]
    batch = BatchLoader(synth_prepared, rows, 128, hist_len=10).build(rows)
    unknown, known = ~batch.hist_response_mask & batch.hist_mask.unsqueeze(-1), batch.hist_response_mask
    assert unknown.any() and known.any()
    poked, flipped = batch.hist_responses.clone(), batch.hist_responses.clone()
    poked[unknown] = 7.0
    flipped[known] = 1 - flipped[known]
    for with_labels in (True, False):
        model = build_model("din", layout, history_responses=with_labels).eval()
        with torch.no_grad():
            base = model(batch).logits
            torch.testing.assert_close(model(dataclasses.replace(batch, hist_responses=poked)).logits, base)
            changed = model(dataclasses.replace(batch, hist_responses=flipped)).logits
        assert torch.allclose(changed, base) is not with_labels


def test_din_mean_pooling_divides_the_interest_by_the_history_rows(synth_prepared):
    """``attention_pooling: mean`` reaches DIN's activation unit: the same weights give the summed interest
    over the request's number of history rows (zeros without history), and a bad value is a config error."""
    torch.manual_seed(0)
    layout = FeatureLayout.from_dataset(synth_prepared)
    rows = synth_prepared.rows("test")[:64]
    batch = BatchLoader(synth_prepared, rows, 64, hist_len=10).build(rows)
    summed = build_model("din", layout, history_responses=True).eval()
    mean = build_model("din", layout, history_responses=True, attention_pooling="mean").eval()
    mean.load_state_dict(summed.state_dict())
    count = batch.hist_mask.sum(1, keepdim=True).clamp(min=1).float()
    assert (count > 1).any()
    with torch.no_grad():
        torch.testing.assert_close(mean.interest(batch), summed.interest(batch) / count)
        assert not torch.allclose(mean(batch).logits, summed(batch).logits)
    with pytest.raises(ConfigError, match="pooling"):
        build_model("din", layout, attention_pooling="max")


@pytest.mark.parametrize("name", BASELINES)
def test_long_history_and_empty_history(name, synth_prepared):
    layout = FeatureLayout.from_dataset(synth_prepared)
    model = build_model(name, layout).eval()
    rows = synth_prepared.rows("train")[:8]  # the earliest rows: most have no history at all
    batch = BatchLoader(synth_prepared, rows, 8, hist_len=1000).build(rows)
    assert batch.hist_cat.shape[1] == 1000
    with torch.no_grad():
        assert torch.isfinite(model(batch).logits).all()


def test_every_registered_model_is_tested():
    assert set(MODELS) == set(BASELINES) | {"iat", "sif"}  # iat: test_iat.py, sif: test_sif.py


def test_unknown_model_or_parameter_is_a_clear_error(toy_prepared):
    layout = FeatureLayout.from_dataset(toy_prepared)
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        build_model("nope", layout)
    with pytest.raises(ConfigError, match=r"model 'din' has no parameter\(s\) \['depth'\]"):
        build_model("din", layout, depth=3)


def _flat(b, prefix: str = "") -> dict:
    from dataclasses import fields

    from sampletok.features import Batch

    out = {}
    for f in fields(b):
        v = getattr(b, f.name)
        if isinstance(v, torch.Tensor):
            out[prefix + f.name] = v
        elif isinstance(v, Batch):
            out.update(_flat(v, f"{prefix}{f.name}."))
    return out


def _unflat(tensors: dict, like, prefix: str = ""):
    from dataclasses import fields

    from sampletok.features import Batch

    kw = {}
    for f in fields(like):
        v = getattr(like, f.name)
        if isinstance(v, torch.Tensor):
            kw[f.name] = tensors[prefix + f.name]
        elif isinstance(v, Batch):
            kw[f.name] = _unflat(tensors, v, f"{prefix}{f.name}.")
        else:
            kw[f.name] = v
    return Batch(**kw)


@pytest.mark.parametrize(
    "name,params",
    [
        ("dnn", {}),
        ("dcnv2", {}),
        ("din", {"history_responses": True}),
        ("din", {"attention_pooling": "mean"}),
        ("bst", {}),
        ("rankmixer", {}),
        ("onetrans", {}),
        ("hstu", {"history_responses": True}),
        ("sif", {"hgaq": {"fields_per_token": 4, "codes": 32}, "width": 16, "blocks": 1, "heads": 2}),
        ("sif", {"hgaq": {"fields_per_token": 4, "codes": 32}, "width": 16, "blocks": 1, "isolate_target": True}),
        ("sif", {"hgaq": {"fields_per_token": 4, "codes": 32}, "width": 16, "blocks": 1, "head_fields": True}),
    ],
)
def test_models_export_with_torch_export(name, params, synth_prepared):
    """Models are functions of tensors: torch.export traces each (no data-dependent Python branch) and the
    exported program scores as the eager model."""
    model = build_model(name, FeatureLayout.from_dataset(synth_prepared), **params).eval()
    rows = synth_prepared.rows("test")[:8]
    loader = BatchLoader(synth_prepared, rows, 8, hist_len=10, history_samples=model.reads_history_samples)
    batch = loader.build(rows)
    tensors = _flat(batch)
    names = list(tensors)

    class Tensors(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *xs):
            return self.m(_unflat(dict(zip(names, xs, strict=True)), batch)).logits

    wrapped = Tensors(model)
    program = torch.export.export(wrapped, tuple(tensors.values()))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*tensors.values()), wrapped(*tensors.values()))


@pytest.mark.parametrize("name", sorted(set(MODELS) - {"iat"}))  # IAT reads a token store
def test_every_model_scores_a_batch_built_from_tensors_alone(name):
    from sampletok.features import Batch

    layout = FeatureLayout.example()
    model = build_model(name, layout).eval()
    batch = Batch.example(layout, batch_size=5, hist_len=7, history_samples=model.reads_history_samples)
    highs = torch.tensor([layout.vocab_sizes[f.name] for f in layout.cat_fields])
    assert bool(((batch.cat > 0) & (batch.cat < highs)).all())  # every code inside its vocabulary, none padding
    with torch.no_grad():
        out = model(batch).logits
    assert out.shape == (5, 1) and torch.isfinite(out).all()


def test_the_full_model_config_rebuilds_the_same_model():
    from sampletok.models.base import model_config
    from sampletok.tokenizers.hgaq import HGAQConfig

    config = model_config("sif", {"width": 16, "hgaq": {"levels": 2}})
    full = config["params"]
    assert full["width"] == 16 and full["blocks"] == 4 and full["hgaq"] == HGAQConfig(levels=2).model_dump(mode="json")
    layout = FeatureLayout.example()
    torch.manual_seed(0)
    given = build_model("sif", layout, width=16, hgaq={"levels": 2})
    torch.manual_seed(0)
    rebuilt = build_model(config["name"], layout, **full)
    assert rebuilt.cfg == given.cfg
    for (k, a), (_, b) in zip(given.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(ConfigError, match="model 'sif': width"):
        model_config("sif", {"width": "wide"})
    with pytest.raises(ConfigError, match=r"has no parameter\(s\) \['depth'\]"):
        model_config("din", {"depth": 3})

import pytest

from sampletok.data.sources.movielens import shipped_schema
from sampletok.errors import SchemaError
from sampletok.schema import Schema
from tests.conftest import TOY_SCHEMA


@pytest.mark.parametrize("name", ["ml-100k", "ml-latest"])
def test_shipped_schemas_load(name):
    s = shipped_schema(name)
    assert s.sequence is not None and s.task_labels == ["click"]
    assert {f.group for f in s.features} <= {"user", "item", "context", "cross"}


def test_yaml_round_trip_and_stable_fingerprint(tmp_path, toy_schema):
    toy_schema.to_yaml(tmp_path / "s.yaml")
    again = Schema.from_yaml(tmp_path / "s.yaml")
    assert again == toy_schema and again.fingerprint() == toy_schema.fingerprint()
    changed = Schema.from_dict({**TOY_SCHEMA, "name": "other"})
    assert changed.fingerprint() != toy_schema.fingerprint()


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"features": TOY_SCHEMA["features"] + [TOY_SCHEMA["features"][0]]}, "defined twice"),
        ({"sequence": {"fields": ["nope"]}}, "sequence field 'nope'"),
        ({"sequence": {"fields": ["price"]}}, "must be categorical"),
        ({"labels": [{"name": "click", "task": False}]}, "declare it under responses"),
        ({"item": "nope"}, "item field 'nope'"),
        ({"features": [{"name": "x", "type": "float", "group": "user"}]}, "features.0.type"),
        ({"features": [{"name": "x", "type": "numeric", "group": "other"}]}, "features.0.group"),
        ({"labels": [{"name": "uid"}]}, "both as label and feature"),
        ({"unknown_key": 1}, "unknown_key"),
    ],
)
def test_invalid_schemas_name_the_problem(patch, needle):
    with pytest.raises(SchemaError, match=needle):
        Schema.from_dict({**TOY_SCHEMA, **patch}, origin="s.yaml")


def test_bad_yaml_file_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed")
    with pytest.raises(SchemaError, match="bad.yaml"):
        Schema.from_yaml(p)
    with pytest.raises(SchemaError, match="not found"):
        Schema.from_yaml(tmp_path / "missing.yaml")

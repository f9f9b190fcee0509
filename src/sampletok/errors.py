"""Errors a user can act on. The CLI prints them as one line; nothing else is caught."""

from __future__ import annotations

from pathlib import Path


class SampletokError(Exception):
    """Base of every error meant for the user (printed as one line by the CLI)."""


class SchemaError(SampletokError):
    """The schema file or dict is invalid."""


class DataError(SampletokError):
    """Bad input data. The message names the file, the column and, where it applies, the row."""

    def __init__(self, origin: str, message: str, column: str | None = None, row: int | None = None):
        where = origin
        if column is not None:
            where += f", column '{column}'"
        if row is not None:
            where += f", row {row}"
        super().__init__(f"{where}: {message}")
        self.origin, self.message, self.column, self.row = origin, message, column, row

    def __reduce__(self):  # picklable, so that a worker process's error reaches the driver whole (Ray, DDP)
        return type(self), (self.origin, self.message, self.column, self.row)


class StoreError(SampletokError):
    """A token store is missing, corrupt, or was written by a different producer."""


class ConflictError(SampletokError):
    """A write names an instance (an event id) that is stored already with other content."""


class NotFoundError(SampletokError):
    """What a request names is not stored (the service answers 404)."""


class ConfigError(SampletokError):
    """An experiment or model configuration is invalid."""


class TrainingError(SampletokError):
    """Training cannot produce a model (e.g. every validation score was NaN)."""


# ---------------------------------------------------------------- one-line messages from library errors
def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def validation_message(e, prefix: str = "", names: dict[str, str] | None = None) -> str:
    """One line from a pydantic ``ValidationError``: ``field: message (got value)`` parts joined by '; '.

    ``prefix`` is put before every field path (e.g. ``"hgaq."``); ``names`` renames a field path to what the
    user typed (e.g. ``{"max_epochs": "--epochs"}``)."""
    parts = []
    for er in e.errors():
        loc = ".".join(map(str, er["loc"]))
        where = (names or {}).get(loc) or (prefix + loc if loc else prefix.rstrip("."))
        msg = er["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        value = er.get("input")
        if er["type"] not in ("missing", "extra_forbidden") and isinstance(value, (str, int, float, bool)):
            shown = repr(value)
            msg += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
        parts.append(one_line(f"{where}: {msg}" if where else msg))
    return "; ".join(parts)


def validated(
    cls,
    data,
    where: str | None = None,
    prefix: str = "",
    names: dict[str, str] | None = None,
    error: type[SampletokError] = ConfigError,
):
    """``cls.model_validate(data)``, a pydantic ValidationError turned into one-line ``error`` (ConfigError):
    ``where: field: message; ...``."""
    from pydantic import ValidationError

    if not isinstance(data, dict):
        what = where or prefix.rstrip(".") or cls.__name__
        raise error(f"{what}: expected a mapping of {cls.__name__} fields, got {type(data).__name__} {data!r}"[:300])
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        msg = validation_message(e, prefix, names)
        raise error(f"{where}: {msg}" if where else msg) from None


def yaml_message(e: Exception) -> str:
    """One line from a PyYAML error: ``line L, column C: problem``."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e)
    return one_line(f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem)


def load_yaml_mapping(path: str | Path, what: str, keys: str, error: type[SampletokError]) -> dict:
    """A YAML file that must hold a mapping (a schema, an experiment): every way it can fail is one ``error``
    line naming the file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: {what} file not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what} file: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {yaml_message(e)}") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise error(f"{path}: {'an' if what[0] in 'aeiou' else 'a'} {what} must be a YAML mapping ({keys}), got {got}")
    return data


def load_torch_dict(path: str | Path, keys: set[str], what: str, hint: str, option: str = "") -> dict:
    """A ``torch.save``d dict with at least ``keys``; an unreadable or foreign file is one ConfigError line
    naming the ``option`` that gave the path, if any."""
    import torch

    path = Path(path)
    where = f"{option} {path}" if option else str(path)
    if not path.is_file():
        raise ConfigError(f"{where}: file not found ({hint})")
    try:
        saved = torch.load(path, weights_only=False)
    except Exception as e:  # truncated or not a torch file: pickle, zip or EOF errors
        raise ConfigError(f"{where}: not a {what} file ({one_line(e)}); {hint}") from None
    if not (isinstance(saved, dict) and keys <= set(saved)):
        raise ConfigError(f"{where}: not a {what} ({hint})")
    return saved

"""YAML settings files read into pydantic models; every error names the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from store.companions import format_validation_error

M = TypeVar("M", bound=BaseModel)


def read_settings(path: Path, model: type[M], error: type[Exception], overrides: dict | None = None) -> M:
    """The model from the YAML mapping at `path`, with `overrides` (e.g. flags) on top."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise error(f"{path}: cannot read config: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of settings at the top level")
    data |= {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        return model.model_validate(data)
    except ValidationError as err:
        where = f"{path} (or a flag)" if overrides else str(path)
        raise error(f"{where}: {format_validation_error(err)}") from err

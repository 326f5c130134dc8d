"""Schemas of the files vitedge reads: every document is checked before any field is used.

One validation layer, JSON Schema (the ``jsonschema`` library): the files are JSON or YAML
documents, a schema states for each field its type and range declaratively, and the
library reports where a document breaks it (``input.shape[2]``), so a bad file is one line
naming the file, the field and what was expected instead of a ``KeyError`` three stages
later. The schemas pin the fields vitedge uses and allow any other key: other tools and
later versions add sections (``input.transform``, ``quantized``, report sections), and a
reader must not refuse what it does not use. ``schema_version`` is checked first, so a
file written by a newer vitedge gets "upgrade vitedge" rather than a field error.
"""

from __future__ import annotations

import functools

from .errors import VitedgeError

# The layout version of vitedge.json / bundle metadata this vitedge writes and reads.
SCHEMA_VERSION = 1

_POSITIVE_INT = {"type": "integer", "minimum": 1}
_NUMBER = {"type": "number"}
_NAME = {"type": "string", "minLength": 1}
_NUMBERS = {"type": "array", "minItems": 1, "items": _NUMBER}
_POSITIVES = {"type": "array", "minItems": 1, "items": {"type": "number", "exclusiveMinimum": 0}}

ARCH = {
    "type": "object",
    "required": ["img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"],
    "properties": {
        "img_size": _POSITIVE_INT, "patch_size": _POSITIVE_INT, "in_chans": _POSITIVE_INT, "num_classes": _POSITIVE_INT,
        "embed_dim": _POSITIVE_INT, "depth": _POSITIVE_INT, "num_heads": _POSITIVE_INT,
        "mlp_ratio": {"type": "number", "exclusiveMinimum": 0}, "qkv_bias": {"type": "boolean"},
    },
}

_DIM = {"anyOf": [_POSITIVE_INT, _NAME]}
INPUT = {
    "type": "object",
    "required": ["name", "shape", "batch", "mean", "std"],
    "properties": {
        "name": _NAME,
        # [batch (a number, or a name when symbolic), channels, height, width]
        "shape": {"type": "array", "minItems": 4, "maxItems": 4,
                  "prefixItems": [_DIM, _POSITIVE_INT, _POSITIVE_INT, _POSITIVE_INT]},
        "batch": _DIM,
        "mean": _NUMBERS,
        "std": _POSITIVES,
        "resolution": {"type": "object", "required": ["min", "opt", "max"],
                       "properties": {"min": _POSITIVE_INT, "opt": _POSITIVE_INT, "max": _POSITIVE_INT}},
    },
}

_VERSION = {"type": "integer", "minimum": 1}
_THRESHOLDS = {"type": "object", "additionalProperties": {"type": ["number", "null"]}}

ARTIFACT = {
    "type": "object",
    "required": ["family", "arch", "settings", "input", "outputs", "token_budgets", "flops", "opset", "checkpoint"],
    "properties": {
        "schema_version": _VERSION,
        "family": _NAME,
        "arch": ARCH,
        "settings": {"type": "object"},
        "input": INPUT,
        "outputs": {"type": "array", "minItems": 1, "items": _NAME},
        "token_budgets": {"type": "object", "required": ["tokens_per_block", "selections"], "properties": {
            "tokens_per_block": {"type": "array", "items": {
                "type": "object", "required": ["attention", "mlp"],
                "properties": {"attention": _POSITIVE_INT, "mlp": _POSITIVE_INT}}},
            "selections": {"type": "array", "items": {
                "type": "object", "required": ["block", "kept_patches", "tokens_after"],
                "properties": {"block": {"type": "integer", "minimum": 0}, "kept_patches": {"type": "integer", "minimum": 0},
                               "tokens_after": _POSITIVE_INT}}}}},
        "flops": {"type": "object", "required": ["dense", "static", "ratio"],
                  "properties": {"dense": _NUMBER, "static": _NUMBER, "ratio": _NUMBER}},
        "opset": _POSITIVE_INT,
        # a file name inside the artifact folder, never a path out of it
        "model": {"type": "string", "pattern": r"^[^/\\]+\.onnx$", "not": {"enum": [".onnx", "..onnx"]}},
        "checkpoint": {"type": "object", "required": ["path", "sha256"],
                       "properties": {"path": {"type": "string"}, "sha256": {"type": "string"}}},
        "validation": _THRESHOLDS,
        "quantized": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["model"],
            "properties": {"model": {"type": "string", "pattern": r"^[^/\\]+\.onnx$"}}}},
        # per runtime (``ort``): the optimised graph 'vitedge optimize' wrote, or why it did not
        "optimized": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["model", "written", "passes"],
            "properties": {"model": {"type": "string", "pattern": r"^[^/\\]+\.onnx$"}, "written": {"type": "boolean"},
                           "passes": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
                           "source_sha256": {"type": "string"}}}},
    },
}

# per device: p50_ms/p90_ms/... numbers (and labels such as "backend")
_LATENCY = {"type": "object", "additionalProperties": {"type": "object", "required": ["p50_ms"],
                                                       "properties": {"p50_ms": _NUMBER}}}
BUNDLE = {
    "type": "object",
    "required": ["kind", "input", "variants"],
    "properties": {
        "schema_version": _VERSION,
        "kind": {"const": "bundle"},
        "input": {"type": "object", "required": ["batch"], "properties": {"batch": _DIM}},
        "devices": {"type": "array", "items": _NAME},
        "variants": {"type": "array", "items": {
            "type": "object", "required": ["name", "path", "flops"],
            "properties": {
                "name": _NAME,
                "path": {"type": "string", "pattern": r"^[^/\\]+$", "not": {"enum": [".", ".."]}},
                "accuracy": {"type": ["number", "null"]},
                "flops": {"type": "object", "required": ["static"], "properties": {"static": _NUMBER, "ratio": _NUMBER}},
                "latency_ms": _LATENCY,
            }}},
    },
}

# A ``vitedge calibrate`` file; the settings it provides are typed by the family's schema when read.
CALIBRATION_FILE = {
    "type": "object",
    "required": ["kind", "family", "arch", "checkpoint"],
    "properties": {
        "kind": _NAME,
        "family": _NAME,
        "arch": ARCH,
        "checkpoint": {"type": "object", "required": ["sha256"], "properties": {"sha256": {"type": "string"}}},
        "settings": {"type": "object"},
    },
}

REPORT = {
    "type": "object",
    "additionalProperties": {"type": "object", "properties": {"passed": {"type": "boolean"}}},
}

# The "vitedge" entry of a vitedge checkpoint: defaults for what flags leave out.
CHECKPOINT_METADATA = {
    "type": "object",
    "properties": {
        "family": _NAME,
        "arch": ARCH,  # its keys are the backbone config's fields, checked against them at load
        "settings": {"type": "object"},
        "mean": _NUMBERS,
        "std": _POSITIVES,
    },
}

# Types only: the device reader's own checks word the ranges (budget > 0, known backends).
DEVICE = {
    "type": "object",
    "properties": {
        "name": {"type": ["string", "number"]},
        "backends": {"type": ["array", "null"], "items": {"type": "string"}},
        "precisions": {"type": ["array", "null"], "items": {"type": "string"}},
        "gpu": {"type": ["object", "null"], "properties": {"compute_capability": {"type": ["string", "number", "null"]}}},
        "software": {"type": ["object", "null"], "properties": {"tensorrt": {"type": ["string", "number", "null"]}}},
    },
}

# Types only, for the fields the calibration reader does not check itself (it words sizes and sources).
CALIBRATION_SET = {
    "type": "object",
    "properties": {
        "name": {"type": ["string", "null"]}, "seed": {"type": "integer", "minimum": 0},
        "split": {"type": "string"}, "path": {"type": "string"},
    },
}


@functools.lru_cache(maxsize=None)
def _validator(schema_id: int):
    import jsonschema

    schema = _BY_ID[schema_id]
    return jsonschema.Draft202012Validator(schema, format_checker=None)


_BY_ID = {id(s): s for s in (ARTIFACT, BUNDLE, CALIBRATION_FILE, REPORT, CHECKPOINT_METADATA, DEVICE, CALIBRATION_SET)}


def field_name(path) -> str:
    """``["input", "shape", 2]`` → ``input.shape[2]``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _expected(error) -> str:
    """What the schema wanted, in words, from the failing keyword."""
    value, keyword = error.validator_value, error.validator
    if keyword == "type":
        kinds = value if isinstance(value, list) else [value]
        return "expected " + " or ".join({"integer": "an integer", "number": "a number", "string": "a string",
                                          "object": "a mapping", "array": "a list", "boolean": "true or false",
                                          "null": "null"}.get(k, k) for k in kinds)
    if keyword in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        sign = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[keyword]
        return f"expected a value {sign} {value}"
    if keyword in ("minItems", "maxItems"):
        return f"expected {'at least' if keyword == 'minItems' else 'at most'} {value} item(s)"
    if keyword == "minLength":
        return "expected a non-empty string"
    if keyword in ("const", "enum"):
        return f"expected one of {value if keyword == 'enum' else [value]}"
    if keyword in ("pattern", "not"):
        return "expected a plain file name inside the folder"
    if keyword == "anyOf":
        return "expected a positive integer or a name"
    if keyword == "additionalProperties" and value is False:
        return "unknown key"
    return error.message[:120]


def check(document, schema: dict, path, what: str):
    """``document`` if it fits ``schema``, else VitedgeError("<what> <path>: field <f>: expected ..., got ...")."""
    import jsonschema

    validator = _validator(id(schema))
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is None:
        return document
    where = list(error.absolute_path)
    if error.validator == "required":
        missing = next((name for name in error.validator_value if isinstance(error.instance, dict)
                        and name not in error.instance), "?")
        where.append(missing)
        raise VitedgeError(f"{what} {path}: field '{field_name(where)}' is missing")
    got = repr(error.instance)
    got = got if len(got) <= 60 else got[:57] + "..."
    raise VitedgeError(f"{what} {path}: field '{field_name(where)}': {_expected(error)}, got {got}")


def check_version(document, path, what: str, writer: str = "vitedge") -> None:
    """Refuse a document written for a newer layout before reading any of its fields."""
    if not isinstance(document, dict):
        raise VitedgeError(f"{what} {path}: expected a JSON object at the top level, got {type(document).__name__}")
    version = document.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise VitedgeError(f"{what} {path}: field 'schema_version': expected a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise VitedgeError(f"{path} was written by a newer {writer} (schema_version {version}; this one reads up to "
                           f"{SCHEMA_VERSION}): upgrade vitedge or re-export with this version")


__all__ = ["ARTIFACT", "BUNDLE", "CALIBRATION_FILE", "CALIBRATION_SET", "CHECKPOINT_METADATA", "DEVICE", "REPORT",
           "SCHEMA_VERSION", "check", "check_version", "field_name"]

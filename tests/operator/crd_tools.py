"""What an API server does with a custom resource before storing it, re-done for tests:
defaulting from the OpenAPI schema, OpenAPI validation (jsonschema), and the CEL rules
(x-kubernetes-validations) evaluated with a real CEL implementation (cel-python), plus the
Kubernetes CEL library functions the CRDs use (K8S_FUNCTIONS).

The API server's structural checks of `x-kubernetes-list-type: map` lists (the map keys are
unique: a duplicate is refused before any CEL rule runs) are re-done too.

Not re-done (so not checked here): pruning of unknown fields, CEL cost budgets, the
`messageExpression`/`fieldPath` extras, and the API server's own format checks.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"


def load_crd(name: str) -> dict:
    return yaml.safe_load((CRD_DIR / f"loraplex.dev_{name}.yaml").read_text())


def schema_of(crd: dict, version: str = "v1alpha1") -> dict:
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return v["schema"]["openAPIV3Schema"]


def apply_defaults(obj: Any, schema: dict) -> Any:
    """Kubernetes defaulting: a missing property with a `default` gets it (objects defaulted to
    {} are then defaulted recursively); existing objects and array items are walked."""
    if isinstance(obj, dict) and schema.get("type") == "object":
        out = dict(obj)
        for key, sub in (schema.get("properties") or {}).items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = apply_defaults(out[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in out:
                if key not in (schema.get("properties") or {}):
                    out[key] = apply_defaults(out[key], extra)
        return out
    if isinstance(obj, list) and schema.get("type") == "array":
        return [apply_defaults(x, schema.get("items") or {}) for x in obj]
    return obj


def openapi_errors(obj: dict, schema: dict) -> list[str]:
    # Kubernetes CRDs use OpenAPI v3.0 schemas: boolean exclusiveMinimum, like JSON Schema draft 4.
    validator = jsonschema.Draft4Validator(schema)
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj))


def list_map_errors(obj: Any, schema: dict, path: str = "") -> list[str]:
    """Duplicate entries of `x-kubernetes-list-type: map` lists (by their list-map-keys), worded
    as the API server words them ("Duplicate value")."""
    errors = []
    if isinstance(obj, dict) and schema.get("type") == "object":
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else None
        for k, v in obj.items():
            sub = props.get(k, extra)
            if sub is not None:
                errors += list_map_errors(v, sub, f"{path}.{k}" if path else k)
    elif isinstance(obj, list) and schema.get("type") == "array":
        if schema.get("x-kubernetes-list-type") == "map":
            keys = schema.get("x-kubernetes-list-map-keys") or []
            seen = set()
            for i, item in enumerate(obj):
                ident = tuple((item or {}).get(k) for k in keys) if isinstance(item, dict) else (item,)
                if ident in seen:
                    errors.append(f"{path}[{i}]: Duplicate value: {dict(zip(keys, ident))}")
                seen.add(ident)
        for i, item in enumerate(obj):
            errors += list_map_errors(item, schema.get("items") or {}, f"{path}[{i}]")
    return errors


def to_cel(value: Any, schema: dict) -> Any:
    """JSON -> CEL values with the CRD's types (a `number` is a CEL double even when written 8)."""
    t = schema.get("type")
    if value is None:
        return None
    if t == "number":
        return celpy.celtypes.DoubleType(float(value))
    if t == "integer":
        return celpy.celtypes.IntType(int(value))
    if t == "object" and isinstance(value, dict) and (schema.get("properties") or schema.get("additionalProperties")):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else {}
        return celpy.celtypes.MapType({
            celpy.celtypes.StringType(k): to_cel(v, props.get(k, extra)) for k, v in value.items()})
    if t == "array" and isinstance(value, list):
        return celpy.celtypes.ListType([to_cel(v, schema.get("items") or {}) for v in value])
    return celpy.json_to_cel(value)


_ENV = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}


def _sum(items: Any) -> Any:
    """Kubernetes' CEL list library `sum()` (cel-python has no such function)."""
    total = celpy.celtypes.IntType(0)
    for x in items:
        total = total + x
    return total


K8S_FUNCTIONS = {"sum": _sum}


def _program(rule: str) -> Any:
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = _ENV.program(_ENV.compile(rule), functions=K8S_FUNCTIONS)
    return _PROGRAMS[rule]


def cel_rules(schema: dict, path: tuple = ()) -> list[tuple[tuple, dict]]:
    """Every (path, rule) in the schema; '*' in a path stands for array items / map values."""
    out = [(path, r) for r in schema.get("x-kubernetes-validations") or []]
    for key, sub in (schema.get("properties") or {}).items():
        out += cel_rules(sub, path + (key,))
    if isinstance(schema.get("items"), dict):
        out += cel_rules(schema["items"], path + ("*",))
    if isinstance(schema.get("additionalProperties"), dict):
        out += cel_rules(schema["additionalProperties"], path + ("*",))
    return out


def _values_at(obj: Any, schema: dict, path: tuple) -> list[tuple[Any, dict, tuple]]:
    if not path:
        return [(obj, schema, ())]
    head, rest = path[0], path[1:]
    out = []
    if head == "*":
        if isinstance(obj, list):
            for i, item in enumerate(obj):
                out += [(v, s, (i,) + p) for v, s, p in _values_at(item, schema.get("items") or {}, rest)]
        elif isinstance(obj, dict):
            for k, item in obj.items():
                out += [(v, s, (k,) + p) for v, s, p in _values_at(item, schema.get("additionalProperties") or {}, rest)]
    elif isinstance(obj, dict) and head in obj:
        out += [(v, s, (head,) + p) for v, s, p in _values_at(obj[head], schema["properties"][head], rest)]
    return out


def cel_errors(obj: dict, schema: dict, old: dict | None = None) -> list[str]:
    """Messages of the CEL rules that `obj` breaks. Transition rules (using oldSelf) run only
    on an update (`old` given) and only where the old object had a value, as in Kubernetes."""
    errors = []
    for path, rule in cel_rules(schema):
        uses_old = "oldSelf" in rule["rule"]
        old_values = {p: v for v, _, p in _values_at(old, schema, path)} if old is not None else {}
        for value, sub, concrete in _values_at(obj, schema, path):
            activation = {"self": to_cel(value, sub)}
            if uses_old:
                if concrete not in old_values:
                    continue
                activation["oldSelf"] = to_cel(old_values[concrete], sub)
            result = _program(rule["rule"]).evaluate(activation)
            if isinstance(result, Exception):
                raise AssertionError(f"CEL rule {rule['rule']!r} failed to evaluate at {path}: {result!r}")
            if not bool(result):
                errors.append(rule.get("message") or rule["rule"])
    return errors


def admit(crd_name: str, obj: dict, old: dict | None = None) -> tuple[dict, list[str]]:
    """Default, then validate (OpenAPI + CEL) like the API server; returns (object, errors)."""
    schema = schema_of(load_crd(crd_name))
    obj = apply_defaults(obj, schema)
    old = apply_defaults(old, schema) if old is not None else None
    errors = openapi_errors(obj, schema) + list_map_errors(obj, schema)
    if not errors:  # the API server evaluates CEL only on a schema-valid object
        errors = cel_errors(obj, schema, old)
    return obj, errors


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused (`additionalProperties: false` wherever an object
    lists its properties and does not preserve unknown fields): what the API server would
    silently prune, a test reports."""
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k in ("items", "additionalProperties") else v for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            out[key] = [strict(s) for s in schema[key]]
    return out


def admit_foreign(crd: dict, obj: dict) -> tuple[dict, list[str]]:
    """Another project's CRD (e.g. the KEDA HTTP add-on's, vendored in tests/operator/data/): the
    object defaulted, validated strictly against the served version's schema, then its CEL rules."""
    version = obj["apiVersion"].rsplit("/", 1)[-1]
    schema = schema_of(crd, version)
    obj = apply_defaults(obj, schema)
    errors = openapi_errors(obj, strict(schema)) + list_map_errors(obj, schema)
    if not errors:
        errors = cel_errors(obj, schema)
    return obj, errors

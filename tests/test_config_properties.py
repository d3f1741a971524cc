"""Every key of every config section, bad values derived from what the key declares, must be refused by name.

The keys are walked, not listed: the base sections of `distill.config.Config` and the `Config` of every module in
`distill.recipes` that defines one (a `Section`), so a recipe added later is covered without new test code. For
each key the bad values come from its declaration (pydantic `FieldInfo.annotation` and `.metadata`):

* the wrong type (a string for a number, a fraction for an integer, a number for a string, ...), and null where
  null is not allowed;
* non-finite numbers (nan, inf, -inf) for every number;
* each declared bound just outside (ge -> the next value below, gt -> the bound itself, le/lt alike), a value off
  the declared `multiple_of`, a string shorter than `min_length` or blank where a pattern asks for a non-blank;
* a value outside a `Literal`'s choices, a list of the wrong length;

and each must make loading fail with a ConfigError whose message starts with the dotted key. Relations
(`require` in a model validator) are found by search: every pair of keys of one section tree is set to values
that each key's own declaration accepts (its bounds, its default, a large value, its choices); a combination the
config refuses is a relation at work, and its message must name one of the two keys. A section that declares a
model validator but whose relation the search never trips fails the test: the relation would go unchecked.
"""

from __future__ import annotations

import importlib
import json
import math
import pkgutil
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from itertools import combinations
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
from pydantic import BaseModel
from tiny import subprocess_env

import distill.recipes
from distill.base.errors import ConfigError
from distill.config import Config, Section, validate_section
from distill.training.preflight import build_config

INTERNAL = ("recipe", "recipe_name")  # set by build_config from the `recipe:` section, not config keys
LARGE = 10**6


def recipe_configs() -> dict[str, type[Section]]:
    """name -> Config for every module of distill.recipes that declares a Section `Config`."""
    found = {}
    for info in pkgutil.iter_modules(distill.recipes.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"distill.recipes.{info.name}")
        cfg = getattr(module, "Config", None)
        if isinstance(cfg, type) and issubclass(cfg, Section):
            found[info.name] = cfg
    return found


RECIPES = recipe_configs()
FIRST_RECIPE = sorted(RECIPES)[0]


# ---------------------------------------------------------------------------------------------------------------
# Walking the declarations
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    unit: str  # "base" or the recipe's name: which section tree validates it
    path: tuple  # ("trainer", "generator", "lr"), ("recipe", "min_t"), ("trainer", "generator", "betas", 0)
    annotation: Any
    metadata: tuple
    default: Any
    description: str | None

    @property
    def dotted(self) -> str:
        out = ""
        for part in self.path:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
        return out


def _unwrap(ann: Any) -> tuple[Any, list]:
    if get_origin(ann) is Annotated:
        base, *extra = get_args(ann)
        meta: list = []
        for item in extra:
            meta += list(getattr(item, "metadata", [item]))
        return base, meta
    return ann, []


def _split_nullable(ann: Any) -> tuple[Any, bool]:
    args = get_args(ann)
    if get_origin(ann) in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else ann), True
    return ann, False


def _is_section(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def walk(cls: type[BaseModel], unit: str, prefix: tuple = ()) -> list[Key]:
    """Every key under section `cls`: sections themselves, their fields, and the items of tuple fields."""
    keys = []
    for name, field in cls.model_fields.items():
        if not prefix and cls is Config and name in INTERNAL:
            continue
        path = (*prefix, name)
        default = field.get_default(call_default_factory=True)
        keys.append(Key(unit, path, field.annotation, tuple(field.metadata), default, field.description))
        if _is_section(field.annotation):
            keys += walk(field.annotation, unit, path)
        elif get_origin(field.annotation) is tuple:
            for i, item in enumerate(get_args(field.annotation)):
                base, meta = _unwrap(item)
                keys.append(Key(unit, (*path, i), base, tuple(meta), default[i], None))
    return keys


BASE_KEYS = walk(Config, "base")
RECIPE_KEYS = {name: walk(cfg, name, ("recipe",)) for name, cfg in RECIPES.items()}
ALL_KEYS = BASE_KEYS + [k for keys in RECIPE_KEYS.values() for k in keys]


def _bounds(meta) -> dict[str, Any]:
    names = {"Ge": "ge", "Gt": "gt", "Le": "le", "Lt": "lt", "MultipleOf": "multiple_of", "MinLen": "min_length",
             "MaxLen": "max_length"}
    out = {names[type(m).__name__]: getattr(m, names[type(m).__name__]) for m in meta if type(m).__name__ in names}
    for m in meta:
        if getattr(m, "pattern", None):
            out["pattern"] = m.pattern
    return out


# ---------------------------------------------------------------------------------------------------------------
# Bad values derived from a declaration
# ---------------------------------------------------------------------------------------------------------------


def _just_below(v, integer: bool):
    return v - 1 if integer else math.nextafter(v, -math.inf)


def _just_above(v, integer: bool):
    return v + 1 if integer else math.nextafter(v, math.inf)


def _off_multiple(b: dict, integer: bool):
    """A value within the declared bounds that is not a multiple of `multiple_of`."""
    m = b["multiple_of"]
    lo = b.get("ge", b.get("gt", 0))
    hi = b.get("le", b.get("lt", lo + 10 * m))
    for x in ([lo + k for k in range(1, 3 * int(m) + 2)] if integer else [lo + m / 2, lo + m * 1.5]):
        if x % m and x <= hi:
            return x
    raise AssertionError(f"no value off multiple_of={m} within {b}")


def bad_values(key: Key) -> list[tuple[str, Any]]:
    """(what, value) pairs the declaration of `key` refuses."""
    ann, nullable = _split_nullable(key.annotation)
    b = _bounds(key.metadata)
    out: list[tuple[str, Any]] = []
    if not nullable and not _is_section(ann):
        out.append(("null", None))
    if _is_section(ann):
        return [("a number for a section", 3), ("a list for a section", [1, 2])]
    if get_origin(ann) is Literal:
        return out + [("not one of the choices", "no-such-choice"), ("a number for a choice", 12345),
                      ("a list for a choice", list(get_args(ann)[:1]))]
    if ann is bool:
        return out + [("an integer for a bool", 2), ("a string for a bool", "yes"), ("a number for a bool", 1.0)]
    if get_origin(ann) is tuple and get_args(ann)[-1] is Ellipsis:  # variable length, items of one declared type
        item, item_meta = _unwrap(get_args(ann)[0])
        ib = _bounds(item_meta)
        out += [("a string for a list", "abc"), ("a string item", ["abc"])]
        if item in (int, float) and "ge" in ib:
            out.append((f"an item just below ge={ib['ge']}", [_just_below(ib["ge"], item is int)]))
        if b.get("min_length"):
            out.append((f"fewer than min_length={b['min_length']} items", []))
        if b.get("max_length") is not None:
            out.append((f"more than max_length={b['max_length']} items", [ib.get("ge", 1)] * (b["max_length"] + 1)))
        return out
    if get_origin(ann) is tuple:
        n = len(get_args(ann))
        return out + [("one item too few", list(key.default)[:-1]), ("one item too many", [*key.default, key.default[0]]),
                      ("a string for a list", "abc")]
    if get_origin(ann) is list:
        return out + [("a string for a list", "abc"), ("a number for a list", 3)]
    if ann is str:
        out += [("a number for a string", 3), ("a list for a string", ["a"]), ("a bool for a string", True)]
        if b.get("min_length"):
            out.append((f"shorter than min_length={b['min_length']}", "x" * (b["min_length"] - 1)))
        if b.get("max_length") is not None:
            out.append((f"longer than max_length={b['max_length']}", "x" * (b["max_length"] + 1)))
        if "pattern" in b:
            out += [(f"not matching {b['pattern']!r}", s) for s in (" ", "\t ") if not re.search(b["pattern"], s)]
        return out
    if ann in (int, float):
        integer = ann is int
        out += [("a string for a number", "abc"), ("a bool for a number", True), ("a list for a number", [1]),
                ("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)]
        if integer:
            out.append(("a fraction for an integer", 1.5))
        if "ge" in b:
            out.append((f"just below ge={b['ge']}", _just_below(b["ge"], integer)))
        if "gt" in b:
            out.append((f"at gt={b['gt']}", b["gt"]))
        if "le" in b:
            out.append((f"just above le={b['le']}", _just_above(b["le"], integer)))
        if "lt" in b:
            out.append((f"at lt={b['lt']}", b["lt"]))
        if "multiple_of" in b:
            out.append((f"off multiple_of={b['multiple_of']}", _off_multiple(b, integer)))
        return out
    raise AssertionError(f"{key.dotted}: no rule for annotation {key.annotation!r}; teach this test the type")


def _with_value(key: Key, value: Any) -> dict:
    """A raw config (defaults everywhere) with `key` set to `value`."""
    recipe = FIRST_RECIPE if key.unit == "base" else key.unit
    data: dict = {"recipe": {"name": recipe}}
    path = key.path
    if isinstance(path[-1], int):  # a tuple item: the whole list, one item replaced
        items = list(_default_at(path[:-1]))
        items[path[-1]] = value
        path, value = path[:-1], items
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    return data


def _default_at(path: tuple) -> Any:
    key = next(k for k in ALL_KEYS if k.path == path)
    return key.default


CASES = [(key, what, value) for key in ALL_KEYS for what, value in bad_values(key)]


def _case_id(case) -> str:
    key, what, _ = case
    return f"{key.unit}:{key.dotted}:{what}"


def test_every_recipe_and_key_is_walked():
    assert "dmd2" in RECIPES
    # Spot-check the walk reaches nested sections, tuple items and recipe keys.
    dotted = {k.dotted for k in ALL_KEYS}
    for must in ("run.output_dir", "trainer.generator.lr", "trainer.generator.betas[1]", "trainer.critic.warmup_steps",
                 "data.resolution", "recipe.min_t", "recipe.dmd_weight", "trainer.max_grad_norm"):
        assert must in dotted, must
    n_keys = len({(k.unit, k.path) for k in ALL_KEYS})
    print(f"\nconfig property test: {len(RECIPES)} recipes {sorted(RECIPES)}; {n_keys} keys; {len(CASES)} bad values "
          f"({len(BASE_KEYS)} base keys, {sum(map(len, RECIPE_KEYS.values()))} recipe keys)")
    assert len(CASES) >= 5 * n_keys


def test_every_key_is_described():
    # Convention (docs/config.md): every declared key says what it is (and what 0 / null means where it is special).
    missing = [k.dotted for k in ALL_KEYS if not isinstance(k.path[-1], int) and not k.description]
    assert not missing, f"keys without a description: {missing}"


def test_every_key_declares_its_range():
    # Bad values are derived from declarations, so a key that declares nothing would be tested with nothing: every
    # number declares a bound (ge/gt/le/lt), every string a min_length or pattern; bools, Literals and sections
    # carry their range in their type. (Removing `gt=0` from recipe.dmd_weight fails here.)
    bare = []
    for k in ALL_KEYS:
        ann = _split_nullable(k.annotation)[0]
        b = _bounds(k.metadata)
        if ann in (int, float) and not {"ge", "gt", "le", "lt"} & b.keys():
            bare.append(f"{k.dotted} (a number without a bound)")
        if ann is str and not ({"min_length", "pattern"} & b.keys()):
            bare.append(f"{k.dotted} (a string that may be empty)")
    assert not bare, f"keys that declare no range: {bare}"


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_defaults_load(recipe):
    # The bad values below are single changes from the defaults, so the defaults themselves must load.
    cfg = build_config({"recipe": {"name": recipe}})
    assert isinstance(cfg.recipe, RECIPES[recipe])


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_value_is_refused_by_name(case):
    key, what, value = case
    with pytest.raises(ConfigError) as e:
        build_config(_with_value(key, value))
    msg = str(e.value)
    assert msg.startswith((f"{key.dotted}:", f"{key.dotted}[")), f"{key.dotted}={value!r} ({what}): {msg}"
    if not _is_section(_split_nullable(key.annotation)[0]) and not isinstance(value, (list, dict)):
        assert repr(value) in msg or str(value) in msg, f"the value given is not in the message: {msg}"


# ---------------------------------------------------------------------------------------------------------------
# Relations, found by search
# ---------------------------------------------------------------------------------------------------------------


def valid_values(key: Key) -> list[Any]:
    """Values the declaration of `key` alone accepts: its bounds, its default, a large value, its choices."""
    ann, nullable = _split_nullable(key.annotation)
    b = _bounds(key.metadata)
    if get_origin(ann) is Literal:
        out = list(get_args(ann))
    elif ann is bool:
        out = [False, True]
    elif ann in (int, float):
        integer = ann is int
        lo = b["ge"] if "ge" in b else _just_above(b["gt"], integer) if "gt" in b else None
        hi = b["le"] if "le" in b else _just_below(b["lt"], integer) if "lt" in b else None
        out = [key.default, lo, hi, LARGE if hi is None else None, -LARGE if lo is None else None]
        out = [v for v in out if v is not None]
        if "multiple_of" in b:
            m = b["multiple_of"]
            out = [v - v % m + (m if v % m else 0) for v in out]
            out = [v for v in out if (hi is None or v <= hi) and (lo is None or v >= lo)]
        out = [ann(v) for v in out]
    else:
        return []
    return list(dict.fromkeys(out + ([None] if nullable else [])))


def _relation_units() -> list[tuple[str, type[BaseModel], str, list[Key]]]:
    units = [("base", Config, "", [k for k in BASE_KEYS if not isinstance(k.path[-1], int)])]
    for name, cfg in RECIPES.items():
        units.append((name, cfg, "recipe", [k for k in RECIPE_KEYS[name] if not isinstance(k.path[-1], int)]))
    return units


def _validate(cls, prefix: str, settings: dict[tuple, Any]) -> str | None:
    data: dict = {}
    for path, value in settings.items():
        node = data
        for part in path[(1 if prefix else 0):-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    try:
        validate_section(cls, data, prefix)
    except ConfigError as e:
        return str(e)
    return None


def _sections_with_relations(cls: type[BaseModel], path: tuple = ()) -> list[tuple]:
    out = [path] if cls.__pydantic_decorators__.model_validators else []
    for name, field in cls.model_fields.items():
        if _is_section(field.annotation):
            out += _sections_with_relations(field.annotation, (*path, name))
    return out


@pytest.mark.parametrize("unit", [u[0] for u in _relation_units()])
def test_relations_are_refused_by_name(unit):
    _, cls, prefix, keys = next(u for u in _relation_units() if u[0] == unit)
    candidates = {k.path: [v for v in valid_values(k) if v != k.default] for k in keys}
    keys = [k for k in keys if candidates[k.path]]
    tried, refused = 0, []
    for k in keys:  # one key moved to the edge of its own range
        for v in candidates[k.path]:
            tried += 1
            msg = _validate(cls, prefix, {k.path: v})
            if msg is not None:
                assert k.dotted in msg, f"{k.dotted}={v!r} is refused without naming it: {msg}"
                refused.append(msg)
    for a, b in combinations(keys, 2):  # two keys moved at once
        for va in candidates[a.path]:
            for vb in candidates[b.path]:
                tried += 1
                msg = _validate(cls, prefix, {a.path: va, b.path: vb})
                if msg is not None:
                    assert a.dotted in msg or b.dotted in msg, f"{a.dotted}={va!r}, {b.dotted}={vb!r}: {msg}"
                    refused.append(msg)
    print(f"\n{unit}: {tried} in-range combinations tried, {len(refused)} refused by a relation")
    root = f"{prefix}." if prefix else ""
    for section in _sections_with_relations(cls):
        where = root + ".".join(section)
        hit = [m for m in refused if m.startswith(where)] if section else refused
        assert hit, (f"{cls.__module__}.{cls.__name__}{'.' + '.'.join(section) if section else ''} declares a relation "
                     "that no in-range pair of values trips: the search cannot check it (see docs/config.md)")


# A ratchet beside the derived cases (which vanish with the declaration they come from): values that must stay
# refused whatever a declaration says. Removing `multiple_of=4` from data.resolution or `ge=1` from log_every
# fails here.
PINNED_BAD = {
    "dmd2": [("run.output_dir", ""), ("run.output_dir", " "), ("run.max_steps", 0), ("run.seed", -1),
             ("teacher.guidance_scale", -1.0), ("data.resolution", 10), ("data.resolution", 4),
             ("data.batch_size", 0), ("student.num_steps", 0), ("trainer.generator.lr", 0.0),
             ("trainer.generator.lr", -1e-4), ("trainer.critic.weight_decay", -0.1), ("trainer.critic_steps", 0),
             ("trainer.gradient_accumulation_steps", 0), ("trainer.max_grad_norm", 0.0),
             ("trainer.max_grad_norm", -1.0), ("trainer.ema_decay", 1.0), ("trainer.ema_decay", -0.5),
             ("trainer.checkpoint_every", -1), ("trainer.keep_checkpoints", 0), ("trainer.sample_every", -1),
             ("trainer.log_every", 0), ("trainer.max_consecutive_nonfinite", -1), ("trainer.resume", ""),
             ("recipe.min_t", -0.1), ("recipe.max_t", 1.5), ("recipe.dmd_weight", 0.0), ("recipe.dmd_weight", -1.0),
             ("recipe.gan_generator_weight", -1.0), ("recipe.gan_critic_weight", -1.0)],
}


@pytest.mark.parametrize("recipe, key, value", [(r, k, v) for r, pairs in PINNED_BAD.items() for k, v in pairs])
def test_pinned_bad_values_stay_refused(recipe, key, value):
    from distill.config import apply_overrides

    data = apply_overrides({"recipe": {"name": recipe}}, [f"{key}={_yaml_value(value)}"])
    with pytest.raises(ConfigError) as e:
        build_config(data)
    assert str(e.value).startswith(f"{key}:"), str(e.value)


def test_documented_relations():
    # The relations the base config and dmd2 declare, each named by the key at fault with what is valid.
    cases = [
        (["run.max_steps=10", "trainer.generator.warmup_steps=11"], "trainer.generator.warmup_steps: must be <= run.max_steps (10), got 11"),
        (["trainer.critic.warmup_steps=1001"], "trainer.critic.warmup_steps: must be <= run.max_steps (1000), got 1001"),
        (["recipe.min_t=0.5", "recipe.max_t=0.5"], "recipe.min_t: must be < recipe.max_t (0.5), got 0.5"),
        (["recipe.min_t=0.9", "recipe.max_t=0.1"], "recipe.min_t: must be < recipe.max_t (0.1), got 0.9"),
    ]
    from distill.config import apply_overrides

    for overrides, message in cases:
        with pytest.raises(ConfigError) as e:
            build_config(apply_overrides({"recipe": {"name": "dmd2"}}, overrides))
        assert str(e.value) == message


# ---------------------------------------------------------------------------------------------------------------
# Through the command line: exit 2, the key on stderr, no traceback
# ---------------------------------------------------------------------------------------------------------------


def _yaml_value(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return json.dumps(value)  # YAML reads JSON scalars and lists as themselves


def _cli_sample(per_unit: int = 3, recipes: int = 3) -> list[tuple]:
    """A fixed spread of the cases (each subprocess costs seconds): for the base config and for up to `recipes`
    recipes, a bound, a non-finite number and a wrong type, each from a different part of the key list. The
    in-process test above covers every case through the same validation; this checks the CLI's handling."""
    out = []
    for j, unit in enumerate(["base", *sorted(RECIPES)[:recipes]]):
        mine = [c for c in CASES if c[0].unit == unit and isinstance(c[0].path[-1], str)
                and not _is_section(c[0].annotation)]
        bound = [c for c in mine if c[1].startswith(("just below", "just above", "at gt", "at lt", "off multiple"))]
        nonfinite = [c for c in mine if c[1] in ("nan", "inf", "-inf")]
        wrong_type = [c for c in mine if c[1].startswith("a ")]
        groups = [g for g in (bound, nonfinite, wrong_type) if g]
        picks = [g[i * len(g) // 3] for i, g in enumerate(groups)]
        out += picks[:per_unit] if unit == "base" else picks[(j - 1) % len(picks):][:1]  # recipes: kinds rotate
    return out


def test_cli_refuses_a_sample_with_exit_2_and_no_traceback(tmp_path):
    sample = _cli_sample()
    assert sample
    for i, (key, what, value) in enumerate(sample):
        recipe = FIRST_RECIPE if key.unit == "base" else key.unit
        config = tmp_path / f"c{i}.yaml"
        config.write_text(f"recipe: {{name: {recipe}}}\n")
        override = f"{key.dotted}={_yaml_value(value)}"
        proc = subprocess.run([sys.executable, "-m", "distill.cli", "train", str(config), override,
                               f"run.output_dir={tmp_path / 'run'}"] if key.dotted != "run.output_dir" else
                              [sys.executable, "-m", "distill.cli", "train", str(config), override],
                              check=False, capture_output=True, text=True, timeout=120, env=subprocess_env())
        assert proc.returncode == 2, (override, what, proc.stderr[-2000:])
        assert f"{key.dotted}:" in proc.stderr, (override, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "run").exists()

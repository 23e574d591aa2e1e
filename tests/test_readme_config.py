"""README's configuration reference: a row for every config key, with the code's default.

Every table in README.md whose header is `| key | default | meaning |` is read. The first
cell names keys in backticks: the first is a dotted path (`resilience.retry.max_attempts`,
list items as `deployments[].name`), a later one without `.` or `[` is a sibling of the
path before it (`kafka.client_id` / `group_id`), and `{a,b}` expands
(`deployments[].limits.{rpm,tpm}`). The default cell holds one part per key, or one for
all, separated by ` / `: a part that starts with a backticked literal is compared (as
YAML) with the code's default; a required key says `required`; other prose ("unlimited",
"64 MiB") is not compared. So the reference cannot drift from `topics.config`.
"""

from __future__ import annotations

import re
import types
import typing
from collections import deque
from pathlib import Path
from typing import Any, Final

import msgspec
import pytest
import yaml

from topics.config import Config

README: Final = Path(__file__).resolve().parent.parent / "README.md"
HEADER: Final = ("key", "default", "meaning")


class _Required:
    """The default of a key the config must set."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = _Required()

_TICKED: Final = re.compile(r"`([^`]+)`")
_BRACES: Final = re.compile(r"\{([^{}]*)\}")
_CELL_SPLIT: Final = re.compile(r"(?<!\\)\|")


# -- the code's side: every key path and its default -------------------------------------


def _unwrap(tp: Any) -> Any:
    """The type under `Annotated[...]`."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _section_of(tp: Any) -> tuple[type[msgspec.Struct] | None, bool]:
    """(Struct whose fields are keys of their own, is a list of them) for a field type.

    `X`, `X | None` and `list[X]` for a Struct X have keys inside; anything else (scalars,
    unions of several kinds, dicts: `ttl_s_by_model`, `keys[].models`) is one key.
    """
    tp = _unwrap(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = [_unwrap(a) for a in typing.get_args(tp) if a is not type(None)]
        if len(members) != 1:
            return None, False
        tp = members[0]
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        item = _unwrap(item)
        if isinstance(item, type) and issubclass(item, msgspec.Struct):
            return item, True
        return None, False
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp, False
    return None, False


def _default(field: msgspec.structs.FieldInfo) -> Any:
    if field.default is not msgspec.NODEFAULT:
        return field.default
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    return REQUIRED


def config_keys(root: type[msgspec.Struct] = Config) -> dict[str, Any]:
    """Every key path of the config under `root` -> its default (`REQUIRED` if none).

    Breadth first, so a Struct used in two places (`simulator.faults` and the per-key
    `simulator.keys[].faults`) is expanded where its path is shortest; the other use is
    one key ("the same keys as ...").
    """
    keys: dict[str, Any] = {}
    expanded: set[type[msgspec.Struct]] = {root}
    queue: deque[tuple[str, type[msgspec.Struct]]] = deque([("", root)])
    while queue:
        prefix, cls = queue.popleft()
        for field in msgspec.structs.fields(cls):
            path = prefix + field.name
            section, is_list = _section_of(field.type)
            if section is not None and section not in expanded:
                expanded.add(section)
                queue.append((path + ("[]." if is_list else "."), section))
            else:
                keys[path] = _default(field)
    return keys


# -- the README's side: rows of the key tables --------------------------------------------


class Row(msgspec.Struct, frozen=True):
    """One row of a key table: the keys it names, its default cell, the line (for errors)."""

    keys: tuple[str, ...]
    default: str
    line: str


def _expand(spec: str) -> list[str]:
    m = _BRACES.search(spec)
    if m is None:
        return [spec]
    head, tail = spec[: m.start()], spec[m.end() :]
    alternatives = [a.strip() for a in m.group(1).split(",")]
    return [k for a in alternatives for k in _expand(head + a + tail)]


def row_keys(cell: str) -> list[str]:
    """The keys a first cell names (see the module docstring for the format)."""
    keys: list[str] = []
    base: str | None = None
    for spec in _TICKED.findall(cell):
        spec = spec.strip()
        if "." in spec or "[" in spec:
            base = spec
            full = spec
        elif base is None:
            raise ValueError(f"{cell!r}: sibling key {spec!r} before any dotted path")
        else:
            full = base.rsplit(".", 1)[0] + "." + spec
        keys.extend(_expand(full))
    return keys


def _cells(line: str) -> list[str]:
    body = line.strip()
    body = body.removeprefix("|")
    if body.endswith("|") and not body.endswith("\\|"):
        body = body[:-1]
    return [c.strip() for c in _CELL_SPLIT.split(body)]


def reference_rows(markdown: str) -> list[Row]:
    """Rows of every `| key | default | meaning |` table in `markdown`."""
    rows: list[Row] = []
    in_table = False
    for line in markdown.splitlines():
        if not line.lstrip().startswith("|"):
            in_table = False
            continue
        cells = _cells(line)
        if tuple(c.lower() for c in cells[:3]) == HEADER:
            in_table = True
            continue
        if not in_table or set(cells[0]) <= set("-: "):
            continue
        rows.append(Row(tuple(row_keys(cells[0])), cells[1], line))
    return rows


def documented_defaults(row: Row) -> list[tuple[str, str]]:
    """(key, default part) per key of `row`: one part per key, or one part for all."""
    parts = [p.strip() for p in row.default.split(" / ")]
    if len(parts) == 1:
        parts = parts * len(row.keys)
    if len(parts) != len(row.keys):
        raise ValueError(
            f"{len(row.keys)} keys but {len(parts)} defaults (` / `-separated): {row.line}"
        )
    return list(zip(row.keys, parts, strict=True))


def literal(part: str) -> tuple[bool, Any]:
    """(is a literal, its YAML value) for a default part starting with a backticked value."""
    if not part.startswith("`"):
        return False, None
    m = _TICKED.match(part)
    assert m is not None, part
    return True, yaml.safe_load(m.group(1))


def same_default(documented: Any, actual: Any) -> bool:
    if isinstance(actual, bool) or isinstance(documented, bool):
        return type(actual) is type(documented) and actual == documented
    return bool(documented == actual)


# -- the tests ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    return reference_rows(README.read_text(encoding="utf-8"))


def test_every_config_key_has_a_row(rows: list[Row]) -> None:
    documented = {k for r in rows for k in r.keys}
    missing = sorted(set(config_keys()) - documented)
    assert missing == [], f"README's configuration reference has no row for: {missing}"


def test_every_row_names_a_config_key(rows: list[Row]) -> None:
    known = config_keys()
    stale = sorted({k for r in rows for k in r.keys if k not in known})
    assert stale == [], f"README documents keys the config does not have: {stale}"


def test_documented_defaults_are_the_codes(rows: list[Row]) -> None:
    known = config_keys()
    wrong: list[str] = []
    for row in rows:
        for key, part in documented_defaults(row):
            if key not in known:
                continue  # reported by test_every_row_names_a_config_key
            actual = known[key]
            if actual is REQUIRED:
                if part != "required":
                    wrong.append(f"{key}: required in the code, README says {part!r}")
                continue
            is_literal, value = literal(part)
            if is_literal and not same_default(value, actual):
                wrong.append(f"{key}: default {actual!r} in the code, README says {part!r}")
    assert wrong == [], "\n".join(wrong)


# -- the parser and the walker on inputs of their own ---------------------------------------


class _Inner(msgspec.Struct, frozen=True, kw_only=True):
    a: int = 1
    b: list[str] = msgspec.field(default_factory=list)


class _Item(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    inner: _Inner | None = None
    by_model: dict[str, _Inner] = msgspec.field(default_factory=dict)


class _Root(msgspec.Struct, frozen=True, kw_only=True):
    items: list[_Item]
    inner: _Inner = msgspec.field(default_factory=_Inner)
    flag: bool = True


def test_walker_names_list_items_reused_sections_and_dicts_as_keys() -> None:
    assert config_keys(_Root) == {
        "flag": True,
        "inner.a": 1,
        "inner.b": [],
        "items[].name": REQUIRED,
        # _Inner is expanded at its shortest path, `inner`; here it is one key.
        "items[].inner": None,
        "items[].by_model": {},
    }


def test_rows_with_siblings_and_braces_expand_to_every_key() -> None:
    table = "\n".join(
        [
            "| key | default | meaning |",
            "|---|---|---|",
            "| `kafka.client_id` / `group_id` | `quotaflow` / `quotaflow-gateway` | ids |",
            "| `deployments[].limits.{rpm, tpm}` | unlimited | limits |",
            "| `routing.complexity.weights.{length,code}` | `0.35` / `0.5` | weights |",
            "| `a.b` \\| not a key | `1` | an escaped pipe stays in its cell |",
            "",
            "| command | does |",
            "|---|---|",
            "| `quotaflow.run` | not a key table |",
        ]
    )
    rows = reference_rows(table)
    assert [r.keys for r in rows] == [
        ("kafka.client_id", "kafka.group_id"),
        ("deployments[].limits.rpm", "deployments[].limits.tpm"),
        ("routing.complexity.weights.length", "routing.complexity.weights.code"),
        ("a.b",),
    ]
    assert documented_defaults(rows[0]) == [
        ("kafka.client_id", "`quotaflow`"),
        ("kafka.group_id", "`quotaflow-gateway`"),
    ]
    assert documented_defaults(rows[1]) == [
        ("deployments[].limits.rpm", "unlimited"),
        ("deployments[].limits.tpm", "unlimited"),
    ]
    assert [literal(p) for _, p in documented_defaults(rows[2])] == [(True, 0.35), (True, 0.5)]


def test_a_row_with_the_wrong_number_of_defaults_is_refused() -> None:
    (row,) = reference_rows(
        "| key | default | meaning |\n|---|---|---|\n| `x.a` / `b` / `c` | `1` / `2` | m |"
    )
    with pytest.raises(ValueError, match="3 keys but 2 defaults"):
        documented_defaults(row)


@pytest.mark.parametrize(
    ("documented", "actual", "same"),
    [
        (30, 30.0, True),
        ("127.0.0.1:9092", "127.0.0.1:9092", True),
        ([0.8, 1.0], [0.8, 1.0], True),
        (True, True, True),
        (1, True, False),
        (60000, 30000, False),
    ],
)
def test_same_default(documented: Any, actual: Any, same: bool) -> None:
    assert same_default(documented, actual) is same


def test_literal_reads_the_leading_backticked_value_only() -> None:
    assert literal("`60000` (was 30000)") == (True, 60000)
    assert literal("64 MiB") == (False, None)
    assert literal("`{}`") == (True, {})


def test_the_real_config_walks_to_the_paths_the_readme_uses() -> None:
    keys = config_keys()
    for path in (
        "resilience.retry.max_attempts",
        "deployments[].limits.rpm",
        "routing.rules[].min_score",
        "simulator.faults.seed",
        "simulator.keys[].faults",  # SimFaults again: one key, documented as such
        "cache.ttl_s_by_model",  # a dict: one key
        "cache.semantic.thresholds",
    ):
        assert path in keys, path
    assert not any(k.startswith("simulator.keys[].faults.") for k in keys)
    assert not any(k.startswith("cache.ttl_s_by_model.") for k in keys)

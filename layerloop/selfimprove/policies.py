"""Filter policies: which scored candidates of a round join the next round's mix, and why the others do not.

A policy is a tree of rules over a score table (a list of dicts, a ``pyarrow.Table`` or a pandas
DataFrame) with one row per candidate: ``key`` (unique), ``input_key`` (the held input it was generated
from), ``round``, and score columns (``clip_foreground``, ``hps``, ``recomposition_mean``, ``alpha_empty``,
``dup_distance`` ...). Policies are written as YAML-like dicts, one key naming the rule kind:

```yaml
all:
  - threshold: {column: recomposition_mean, op: "<=", value: 2}
  - threshold: {column: alpha_empty, op: "==", value: false}
  - topk: {column: clip_foreground, k: 2, by: input_key}
```

Rule kinds:

* ``threshold: {column, op, value}``: ``op`` is one of ``> >= < <= == !=``; ordering ops need a number.
* ``quantile: {column, q, keep: top|bottom, per: round}``: keeps values at or above the (1 - q) quantile
  (``keep: top``) or at or below the q quantile (``keep: bottom``) of the column, computed separately for
  each value of ``per`` (``per: null``: over the whole table). numpy's linear interpolation; every value
  tied with the cutoff is kept.
* ``topk: {column, k, by: input_key, keep: top|bottom}``: the ``k`` highest (``bottom``: lowest) values
  for each value of ``by``; equal scores are ordered by ``key``, so the choice does not depend on the
  table's row order.
* ``all: [rules]``, ``any: [rules]``, ``not: rule``: combinations, nested freely.

Every rule takes an optional ``name`` (``{name: strict, all: [...]}``), used in decisions and reasons.

How ``all`` combines ranking rules: per-row rules (thresholds and combinations of thresholds) are judged on
every candidate; ranking rules (``quantile``, ``topk``, and combinations containing them) rank only the
candidates that passed all per-row rules of the same ``all`` and the ranking rules listed before them. So
``all: [threshold A, topk B k=2]`` keeps the two best by B *among those passing A*, in either order, and a
candidate failing several thresholds gets a reason for each. ``any`` gives every alternative the same
candidates; ``not`` accepts what its rule rejects.

Missing values: a score that is None (missing in that row) or NaN fails every rule that reads it,
whatever the op (``!=`` included), and is never ranked: a broken score must not let a candidate through.
Infinities compare in thresholds but fail quantile and top-k (they have no meaningful rank cutoff).
A column missing from the whole table is an error naming it and the columns present.

``apply_policy`` returns one ``Decision`` per row, in table order: ``accepted``, the ``rule`` that
accepted it, and for a rejected candidate every failed condition as a readable ``reasons`` string that
names the rule (``"clip_foreground 0.12 < 0.2"``, ``"not in top-2 of input bg_000031 by hps (rank 4,
hps 0.1)"``). ``describe(policy)`` is the one-line text recorded in lineage.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Op = Literal[">", ">=", "<", "<=", "==", "!="]
ORDERING_OPS = {">", ">=", "<", "<="}
NEGATED_OP = {">": "<=", ">=": "<", "<": ">=", "<=": ">", "==": "!=", "!=": "=="}
COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq,
           "!=": operator.ne}


class PolicyError(ValueError):
    """A policy that cannot be parsed, or cannot be applied to a table (missing column, wrong types)."""


# ------------------------------------------------------------------------------------------------ rules
class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str | None = None


class Threshold(Rule):
    column: str = Field(min_length=1)
    op: Op
    value: bool | int | float | str

    @model_validator(mode="after")
    def _comparable(self) -> Threshold:
        if self.op in ORDERING_OPS and isinstance(self.value, (bool, str)):
            raise ValueError(f"op {self.op!r} needs a number, got {self.value!r}")
        if isinstance(self.value, float) and not math.isfinite(self.value):
            raise ValueError(f"value must be a finite number, got {self.value} (NaN scores always fail)")
        return self


class Quantile(Rule):
    column: str = Field(min_length=1)
    q: float = Field(gt=0.0, le=1.0)
    keep: Literal["top", "bottom"] = "top"
    per: str | None = "round"


class TopK(Rule):
    column: str = Field(min_length=1)
    k: int = Field(ge=1)
    by: str = "input_key"
    keep: Literal["top", "bottom"] = "top"


class AllOf(Rule):
    rules: tuple[Rule, ...] = Field(min_length=1)


class AnyOf(Rule):
    rules: tuple[Rule, ...] = Field(min_length=1)


class Not(Rule):
    rule: Rule


RULE_KINDS: dict[str, type[Rule]] = {"threshold": Threshold, "quantile": Quantile, "topk": TopK,
                                     "all": AllOf, "any": AnyOf, "not": Not}
KIND_OF = {cls: kind for kind, cls in RULE_KINDS.items()}


def load_policy(spec: Mapping[str, Any] | Rule, path: str = "policy") -> Rule:
    """Parse a YAML-like dict into a rule tree; errors name the place (``policy.all[1].topk: k ...``)."""
    if isinstance(spec, Rule):
        _check_kinds(spec, path)
        return spec
    kinds = ", ".join(RULE_KINDS)
    if not isinstance(spec, Mapping):
        raise PolicyError(f"{path}: a rule is a mapping with one of the keys {kinds}; got {spec!r}")
    body = dict(spec)
    name = body.pop("name", None)
    present = [key for key in body if key in RULE_KINDS]
    unknown = [key for key in body if key not in RULE_KINDS]
    if unknown or len(present) != 1:
        found = ", ".join(map(str, body)) or "nothing"
        raise PolicyError(f"{path}: a rule has exactly one of the keys {kinds} (and optionally name); "
                          f"got {found}")
    kind = present[0]
    inner = body[kind]
    where = f"{path}.{kind}"
    if kind in ("all", "any"):
        if not isinstance(inner, (list, tuple)) or not inner:
            raise PolicyError(f"{where}: expected a non-empty list of rules, got {inner!r}")
        children = tuple(load_policy(child, f"{where}[{i}]") for i, child in enumerate(inner))
        return _build(RULE_KINDS[kind], where, rules=children, name=name)
    if kind == "not":
        return _build(Not, where, rule=load_policy(inner, where), name=name)
    if not isinstance(inner, Mapping):
        raise PolicyError(f"{where}: expected a mapping of the rule's fields, got {inner!r}")
    fields = dict(inner)
    if name is not None:
        if fields.get("name") not in (None, name):
            raise PolicyError(f"{where}: two names given ({name!r} and {fields['name']!r})")
        fields["name"] = name
    return _build(RULE_KINDS[kind], where, **fields)


def _check_kinds(rule: Rule, path: str) -> None:
    """A tree built in code must use the concrete kinds (a bare ``Rule`` has nothing to judge by)."""
    if type(rule) not in KIND_OF:
        raise PolicyError(f"{path}: {type(rule).__name__} is not a rule kind; use one of "
                          f"{', '.join(cls.__name__ for cls in KIND_OF)}")
    if isinstance(rule, (AllOf, AnyOf)):
        for i, child in enumerate(rule.rules):
            _check_kinds(child, f"{path}.{KIND_OF[type(rule)]}[{i}]")
    elif isinstance(rule, Not):
        _check_kinds(rule.rule, f"{path}.not")


def _build(cls: type[Rule], where: str, **fields: Any) -> Rule:
    try:
        return cls(**fields)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            loc = ".".join(str(part) for part in item["loc"])
            message = item["msg"].removeprefix("Value error, ")
            given = "" if isinstance(item.get("input"), Mapping) else f" (got {item.get('input')!r})"
            problems.append(f"{loc}: {message}{given}" if loc else message)
        raise PolicyError(f"{where}: {'; '.join(problems)}") from None


def dump_policy(rule: Rule) -> dict[str, Any]:
    """The YAML-like dict of a rule tree (``load_policy(dump_policy(r)) == r``)."""
    kind = KIND_OF[type(rule)]
    if isinstance(rule, (AllOf, AnyOf)):
        out: dict[str, Any] = {kind: [dump_policy(child) for child in rule.rules]}
    elif isinstance(rule, Not):
        out = {kind: dump_policy(rule.rule)}
    else:
        fields = rule.model_dump()
        if fields["name"] is None:
            del fields["name"]
        return {kind: fields}
    if rule.name is not None:
        out["name"] = rule.name
    return out


def describe(rule: Mapping[str, Any] | Rule) -> str:
    """One line of text for lineage and reports, e.g.
    ``all of [recomposition_mean <= 2; top-2 by clip_foreground per input_key]``."""
    rule = load_policy(rule)
    if isinstance(rule, Threshold):
        text = f"{rule.column} {rule.op} {_fmt(rule.value)}"
    elif isinstance(rule, Quantile):
        scope = f"per {rule.per}" if rule.per else "of the table"
        text = f"{rule.keep} {_pct(rule.q)} by {rule.column} {scope}"
    elif isinstance(rule, TopK):
        text = f"{rule.keep}-{rule.k} by {rule.column} per {rule.by}"
    elif isinstance(rule, (AllOf, AnyOf)):
        word = "all" if isinstance(rule, AllOf) else "any"
        text = f"{word} of [{'; '.join(describe(child) for child in rule.rules)}]"
    else:
        text = f"not [{describe(rule.rule)}]"
    return f"{rule.name} ({text})" if rule.name else text


# ------------------------------------------------------------------------------------------- decisions
@dataclass(frozen=True)
class Decision:
    key: str
    accepted: bool
    rule: str | None  # the rule that accepted the candidate (its name, else its description); None if rejected
    reasons: tuple[str, ...] = ()  # every failed condition of a rejected candidate; empty if accepted

    def as_row(self) -> dict[str, Any]:
        return {"key": self.key, "accepted": self.accepted, "rule": self.rule, "reasons": list(self.reasons)}


def apply_policy(table: Any, policy: Mapping[str, Any] | Rule) -> list[Decision]:
    """One Decision per row of ``table``, in its order (see the module docstring for the semantics)."""
    rule = load_policy(policy)
    scores = ScoreTable(table)
    scores.require(read_columns(rule))
    everyone = np.ones(len(scores), bool)
    outcome = _evaluate(rule, scores, everyone)
    decisions = []
    for row, key in enumerate(scores.keys):
        accepted = bool(outcome.accepted[row])
        reasons = () if accepted else tuple(outcome.reasons[row])
        if not accepted and not reasons:  # every rejection is explained by construction; never silently
            raise AssertionError(f"policy rejected {key} without a reason")
        decisions.append(Decision(key, accepted, outcome.via[row] if accepted else None, reasons))
    return decisions


class ScoreTable:
    """Rows of a score table as dicts of plain Python values (numpy scalars unwrapped)."""

    def __init__(self, table: Any):
        if hasattr(table, "to_pylist"):  # pyarrow.Table
            rows = table.to_pylist()
        elif hasattr(table, "to_dict") and hasattr(table, "columns"):  # pandas.DataFrame
            rows = table.to_dict("records")
        else:
            rows = list(table)
        self.rows = [{str(k): _plain(v) for k, v in dict(row).items()} for row in rows]
        if hasattr(table, "column_names"):  # a column of nulls still exists
            self.columns = list(table.column_names)
        elif hasattr(table, "to_dict") and hasattr(table, "columns"):
            self.columns = [str(c) for c in table.columns]
        else:  # list of dicts: a column exists when any row has it (rows lacking it read as missing)
            self.columns = list(dict.fromkeys(c for row in self.rows for c in row))
        self.require({"key": "the candidate's identity"})
        self.keys: list[str] = []
        for row in self.rows:
            key = row.get("key")
            if not isinstance(key, str) or not key:
                raise PolicyError(f"every row needs a non-empty string key, got {key!r} in {row}")
            self.keys.append(key)
        seen: set[str] = set()
        for key in self.keys:
            if key in seen:
                raise PolicyError(f"key {key!r} appears twice in the score table")
            seen.add(key)

    def __len__(self) -> int:
        return len(self.rows)

    def require(self, needed: Mapping[str, str]) -> None:
        missing = [f"{column!r} ({why})" for column, why in needed.items() if column not in self.columns]
        if missing and self.rows:
            raise PolicyError(f"the policy needs column(s) {', '.join(missing)}, but the score table has: "
                              f"{', '.join(self.columns) or 'no columns'}")

    def values(self, column: str) -> list[Any]:
        return [row.get(column) for row in self.rows]

    def numbers(self, column: str) -> np.ndarray:
        """The column as float64, NaN where the value is missing; a non-number is an error."""
        out = np.full(len(self.rows), np.nan)
        for i, value in enumerate(self.values(column)):
            if value is None:
                continue
            if not _is_number(value):
                raise PolicyError(f"column {column!r} holds {value!r} for key {self.keys[i]!r}; rules that "
                                  "compare or rank it need numbers")
            out[i] = float(value)
        return out

    def groups(self, column: str | None, rows: np.ndarray, purpose: str) -> dict[Any, list[int]]:
        """Row indices of ``rows`` grouped by ``column`` (one group when None), first-seen order."""
        out: dict[Any, list[int]] = {}
        for i in np.flatnonzero(rows):
            group = None if column is None else self.rows[i].get(column)
            if column is not None and group is None:
                raise PolicyError(f"{purpose} groups by {column!r}, but key {self.keys[i]!r} has no {column}")
            out.setdefault(group, []).append(int(i))
        return out


# ------------------------------------------------------------------------------------------ evaluation
@dataclass
class _Outcome:
    accepted: np.ndarray  # bool per row; False outside the pool the rule was given
    reasons: list[list[str]]  # per row: why the rule rejected it (only rows of the pool)
    via: list[str | None]  # per row: the rule that accepted it


def _evaluate(rule: Rule, table: ScoreTable, pool: np.ndarray) -> _Outcome:
    """Judge the rows in ``pool`` (bool mask); ranking rules rank only those rows."""
    n = len(table)
    if isinstance(rule, (AllOf, AnyOf, Not)):
        return _COMBINATIONS[type(rule)](rule, table, pool)
    accepted = np.zeros(n, bool)
    reasons: list[list[str]] = [[] for _ in range(n)]
    for row, ok, reason in _LEAVES[type(rule)](rule, table, pool):
        accepted[row] = ok
        if not ok:
            reasons[row].append(f"[{rule.name}] {reason}" if rule.name else reason)
    label = _label(rule)
    return _Outcome(accepted, reasons, [label if ok else None for ok in accepted])


def _threshold(rule: Threshold, table: ScoreTable, pool: np.ndarray):
    values = table.values(rule.column)
    compare = COMPARE[rule.op]
    for row in np.flatnonzero(pool):
        value = values[row]
        missing = _missing(rule.column, value)
        if missing:
            yield row, False, missing
            continue
        comparable = isinstance(value, str) if isinstance(rule.value, str) else _is_number(value)
        if not comparable:
            raise PolicyError(f"rule {describe(rule)!r}: column {rule.column!r} holds {value!r} for key "
                              f"{table.keys[row]!r}, which cannot be compared with {rule.value!r}")
        if compare(value, rule.value):
            yield row, True, ""
        elif isinstance(rule.value, bool) and isinstance(value, bool):
            yield row, False, f"{rule.column} is {_fmt(value)}"
        else:
            yield row, False, f"{rule.column} {_fmt(value)} {NEGATED_OP[rule.op]} {_fmt(rule.value)}"


def _quantile(rule: Quantile, table: ScoreTable, pool: np.ndarray):
    raw = table.values(rule.column)
    numbers = table.numbers(rule.column)
    for group, rows in table.groups(rule.per, pool, f"quantile {describe(rule)!r}").items():
        ranked = [row for row in rows if math.isfinite(numbers[row])]
        for row in sorted(set(rows) - set(ranked)):
            yield row, False, _missing(rule.column, raw[row], ranking=True)
        if not ranked:
            continue
        values = numbers[ranked]
        # The top q of v is the bottom q of -v: both directions use q itself, not 1 - q, so that
        # interpolation sees the user's fraction exactly.
        if rule.keep == "top":
            cutoff = -float(np.quantile(-values, rule.q))
            keep = values >= cutoff
        else:
            cutoff = float(np.quantile(values, rule.q))
            keep = values <= cutoff
        scope = "the table" if rule.per is None else f"{rule.per} {group}"
        side = "<" if rule.keep == "top" else ">"
        for row, value, ok in zip(ranked, values, keep):
            yield row, bool(ok), (f"{rule.column} {_fmt(value)} {side} {_fmt(cutoff)}, the {rule.keep} "
                                  f"{_pct(rule.q)} cutoff of {scope}")


def _topk(rule: TopK, table: ScoreTable, pool: np.ndarray):
    raw = table.values(rule.column)
    numbers = table.numbers(rule.column)
    sign = -1.0 if rule.keep == "top" else 1.0
    for group, rows in table.groups(rule.by, pool, f"topk {describe(rule)!r}").items():
        ranked = [row for row in rows if math.isfinite(numbers[row])]
        for row in sorted(set(rows) - set(ranked)):
            yield row, False, _missing(rule.column, raw[row], ranking=True)
        ranked.sort(key=lambda row: (sign * numbers[row], table.keys[row]))  # ties: by key
        scope = f"input {group}" if rule.by == "input_key" else f"{rule.by} {group}"
        for rank, row in enumerate(ranked, start=1):
            yield row, rank <= rule.k, (f"not in {rule.keep}-{rule.k} of {scope} by {rule.column} "
                                        f"(rank {rank}, {rule.column} {_fmt(numbers[row])})")


def _all(rule: AllOf, table: ScoreTable, pool: np.ndarray) -> _Outcome:
    # Per-row rules first, on the whole pool (every failed condition gets its reason); ranking rules then
    # rank what is still eligible, in the order listed.
    outcomes: dict[int, _Outcome] = {}
    eligible = pool.copy()
    for i, child in enumerate(rule.rules):
        if not _ranks(child):
            outcomes[i] = _evaluate(child, table, pool)
            eligible &= outcomes[i].accepted
    for i, child in enumerate(rule.rules):
        if _ranks(child):
            outcomes[i] = _evaluate(child, table, eligible)
            eligible &= outcomes[i].accepted
    reasons: list[list[str]] = [[] for _ in range(len(table))]
    for row in np.flatnonzero(pool & ~eligible):
        for i in range(len(rule.rules)):
            reasons[row].extend(outcomes[i].reasons[row])
    label = _label(rule)
    return _Outcome(eligible, reasons, [label if ok else None for ok in eligible])


def _any(rule: AnyOf, table: ScoreTable, pool: np.ndarray) -> _Outcome:
    outcomes = [_evaluate(child, table, pool) for child in rule.rules]
    accepted = np.zeros(len(table), bool)
    reasons: list[list[str]] = [[] for _ in range(len(table))]
    via: list[str | None] = [None] * len(table)
    for row in np.flatnonzero(pool):
        first = next((o for o in outcomes if o.accepted[row]), None)
        if first is not None:
            accepted[row] = True
            via[row] = f"{rule.name}: {first.via[row]}" if rule.name else first.via[row]
        else:
            for outcome in outcomes:
                reasons[row].extend(outcome.reasons[row])
    return _Outcome(accepted, reasons, via)


def _not(rule: Not, table: ScoreTable, pool: np.ndarray) -> _Outcome:
    inner = _evaluate(rule.rule, table, pool)
    accepted = pool & ~inner.accepted
    reasons: list[list[str]] = [[] for _ in range(len(table))]
    text = f"matches the excluded rule {describe(rule.rule)}"
    for row in np.flatnonzero(pool & inner.accepted):
        reasons[row].append(f"[{rule.name}] {text}" if rule.name else text)
    label = _label(rule)
    return _Outcome(accepted, reasons, [label if ok else None for ok in accepted])


_LEAVES = {Threshold: _threshold, Quantile: _quantile, TopK: _topk}
_COMBINATIONS = {AllOf: _all, AnyOf: _any, Not: _not}


def _ranks(rule: Rule) -> bool:
    """Whether the rule's verdict on a row depends on the other rows (quantile, topk, or contains one)."""
    if isinstance(rule, (Quantile, TopK)):
        return True
    if isinstance(rule, (AllOf, AnyOf)):
        return any(_ranks(child) for child in rule.rules)
    if isinstance(rule, Not):
        return _ranks(rule.rule)
    return False


def read_columns(rule: Rule) -> dict[str, str]:
    """Columns the rule reads -> the rule that reads them (for the missing-column error)."""
    if isinstance(rule, (AllOf, AnyOf)):
        out: dict[str, str] = {}
        for child in rule.rules:
            for column, why in read_columns(child).items():
                out.setdefault(column, why)
        return out
    if isinstance(rule, Not):
        return read_columns(rule.rule)
    text = describe(rule)
    out = {rule.column: text}
    group = rule.per if isinstance(rule, Quantile) else rule.by if isinstance(rule, TopK) else None
    if group is not None:
        hint = "; set per: null to use the whole table" if isinstance(rule, Quantile) else ""
        out.setdefault(group, f"{text}{hint}")
    return out


def _label(rule: Rule) -> str:
    return rule.name or describe(rule)


# -------------------------------------------------------------------------------------------- helpers
def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _is_number(value: Any) -> bool:
    return isinstance(value, (bool, int, float))


def _missing(column: str, value: Any, ranking: bool = False) -> str:
    """The reason a value cannot be judged, or "" when it can (infinities compare, but do not rank)."""
    if value is None:
        return f"{column} is missing"
    if isinstance(value, float) and math.isnan(value):
        return f"{column} is NaN"
    if ranking and isinstance(value, float) and math.isinf(value):
        return f"{column} is {value}, which cannot be ranked"
    return ""


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _pct(q: float) -> str:
    return f"{q * 100:g}%"

"""Filter policies on hand-made score tables: each expected accepted set below is worked out by hand."""

import math
import random

import pyarrow as pa
import pytest

from layerloop.selfimprove.policies import (
    AllOf,
    Decision,
    PolicyError,
    Rule,
    Threshold,
    TopK,
    apply_policy,
    describe,
    dump_policy,
    load_policy,
)

NAN = math.nan
COLUMNS = ("key", "input_key", "round", "clip_foreground", "hps", "recomposition_mean", "alpha_empty")
ROWS = [
    ("a1", "bg_1", 0, 0.30, 0.25, 0.5, False),
    ("a2", "bg_1", 0, 0.12, 0.27, 1.0, False),
    ("a3", "bg_1", 0, 0.25, 0.20, 3.0, False),
    ("a4", "bg_1", 0, 0.28, 0.22, 1.5, True),
    ("b1", "bg_2", 0, 0.22, 0.30, 0.2, False),
    ("b2", "bg_2", 0, 0.22, 0.18, 2.0, False),  # ties b1 on clip_foreground
    ("b3", "bg_2", 0, NAN, 0.31, 0.1, False),  # a broken CLIP score
    ("c1", "bg_3", 1, 0.40, 0.10, 0.3, False),
    ("c2", "bg_3", 1, 0.10, 0.12, 2.5, False),
    ("c3", "bg_3", 1, 0.35, 0.14, 0.4, False),
    ("c4", "bg_3", 1, 0.20, 0.16, None, False),  # recomposition never computed
]
TABLE = [dict(zip(COLUMNS, row)) for row in ROWS]
ALL_KEYS = {row["key"] for row in TABLE}


def decide(policy, table=TABLE):
    """Apply the policy and check the contract every decision list must meet; return {key: Decision}."""
    decisions = apply_policy(table, policy)
    assert [d.key for d in decisions] == [row["key"] for row in table]  # one per row, in table order
    names = _names(load_policy(policy))
    for decision in decisions:
        if decision.accepted:
            assert decision.rule and decision.reasons == ()
        else:
            assert decision.rule is None and decision.reasons, decision
            for reason in decision.reasons:  # each reason names the column or the named rule it failed
                assert any(name in reason for name in names), reason
    return {d.key: d for d in decisions}


def accepted(policy, table=TABLE):
    return {key for key, d in decide(policy, table).items() if d.accepted}


def _names(rule):
    found = {rule.name} if rule.name else set()
    if hasattr(rule, "column"):
        found.add(rule.column)
    for child in getattr(rule, "rules", ()):
        found |= _names(child)
    if hasattr(rule, "rule"):
        found |= _names(rule.rule)
    return found


def threshold(column, op, value):
    return {"threshold": {"column": column, "op": op, "value": value}}


# ---------------------------------------------------------------------------------------- thresholds
@pytest.mark.parametrize("op, expected", [
    (">", {"a1", "a3", "a4", "c1", "c3"}),
    (">=", {"a1", "a3", "a4", "b1", "b2", "c1", "c3"}),
    ("<", {"a2", "c2", "c4"}),
    ("<=", {"a2", "b1", "b2", "c2", "c4"}),
    ("==", {"b1", "b2"}),
    ("!=", {"a1", "a2", "a3", "a4", "c1", "c2", "c3", "c4"}),  # b3 is NaN: it fails even "!="
])
def test_threshold_each_op_and_nan_fails(op, expected):
    decisions = decide(threshold("clip_foreground", op, 0.22))
    assert {k for k, d in decisions.items() if d.accepted} == expected
    assert decisions["b3"].reasons == ("clip_foreground is NaN",)


def test_threshold_reasons_say_value_failed_op_and_limit():
    decisions = decide(threshold("clip_foreground", ">=", 0.2))
    assert decisions["a2"].reasons == ("clip_foreground 0.12 < 0.2",)
    assert decisions["c2"].reasons == ("clip_foreground 0.1 < 0.2",)
    assert decisions["a1"].rule == "clip_foreground >= 0.2"


def test_boolean_and_missing_scores():
    decisions = decide(threshold("alpha_empty", "==", False))
    assert {k for k, d in decisions.items() if not d.accepted} == {"a4"}
    assert decisions["a4"].reasons == ("alpha_empty is true",)
    decisions = decide(threshold("recomposition_mean", "<=", 2))
    assert {k for k, d in decisions.items() if not d.accepted} == {"a3", "c2", "c4"}
    assert decisions["c4"].reasons == ("recomposition_mean is missing",)
    assert decisions["a3"].reasons == ("recomposition_mean 3 > 2",)


def test_a_row_without_the_column_reads_as_missing_but_an_absent_column_is_an_error():
    table = [{"key": "x", "hps": 0.3}, {"key": "y"}]
    assert accepted(threshold("hps", ">", 0.1), table) == {"x"}
    with pytest.raises(PolicyError, match=r"'hsp'.*table has: key, hps"):
        apply_policy(table, threshold("hsp", ">", 0.1))


# ----------------------------------------------------------------------------------------- quantiles
def test_quantile_is_computed_per_round():
    # round 0 hps: .31 .30 .27 .25 .22 .20 .18 -> median .25, kept >= .25; round 1: .16 .14 .12 .10 ->
    # median .13.
    policy = {"quantile": {"column": "hps", "q": 0.5}}
    decisions = decide(policy)
    assert {k for k, d in decisions.items() if d.accepted} == {"a1", "a2", "b1", "b3", "c3", "c4"}
    assert decisions["a3"].reasons == ("hps 0.2 < 0.25, the top 50% cutoff of round 0",)
    assert decisions["c1"].reasons == ("hps 0.1 < 0.13, the top 50% cutoff of round 1",)
    # Over the whole table the median is .20: round 1 loses everything, round 0 keeps more.
    whole = {"quantile": {"column": "hps", "q": 0.5, "per": None}}
    assert accepted(whole) == {"a1", "a2", "a3", "a4", "b1", "b3"}


def test_bottom_quantile_for_error_scores_with_a_missing_value():
    # round 0 recomposition .1 .2 .5 1 1.5 2 3: 25% quantile = .2 + .5*(.5-.2) = .35;
    # round 1 (c4 missing) .3 .4 2.5: 25% quantile = .35.
    decisions = decide({"quantile": {"column": "recomposition_mean", "q": 0.25, "keep": "bottom"}})
    assert {k for k, d in decisions.items() if d.accepted} == {"b1", "b3", "c1"}
    assert decisions["c4"].reasons == ("recomposition_mean is missing",)
    assert decisions["a1"].reasons == ("recomposition_mean 0.5 > 0.35, the bottom 25% cutoff of round 0",)


def test_quantile_one_keeps_everything_with_a_score():
    assert accepted({"quantile": {"column": "clip_foreground", "q": 1.0}}) == ALL_KEYS - {"b3"}


# --------------------------------------------------------------------------------------------- top-k
def test_topk_per_input_with_rank_in_the_reason():
    decisions = decide({"topk": {"column": "clip_foreground", "k": 2, "by": "input_key"}})
    assert {k for k, d in decisions.items() if d.accepted} == {"a1", "a4", "b1", "b2", "c1", "c3"}
    assert decisions["a3"].reasons == ("not in top-2 of input bg_1 by clip_foreground (rank 3, "
                                       "clip_foreground 0.25)",)
    assert decisions["a2"].reasons[0].startswith("not in top-2 of input bg_1 by clip_foreground (rank 4")
    assert decisions["b3"].reasons == ("clip_foreground is NaN",)


def test_topk_ties_are_broken_by_key_whatever_the_row_order():
    policy = {"topk": {"column": "clip_foreground", "k": 1}}
    expected = {"a1", "b1", "c1"}  # b1 and b2 tie at .22: b1 sorts first
    assert accepted(policy) == expected
    for seed in range(5):
        shuffled = TABLE[:]
        random.Random(seed).shuffle(shuffled)
        assert accepted(policy, shuffled) == expected
    swapped = [dict(row, key={"b1": "b2", "b2": "b1"}.get(row["key"], row["key"])) for row in TABLE]
    decisions = decide(policy, swapped)
    assert decisions["b1"].accepted and not decisions["b2"].accepted
    assert "rank 2" in decisions["b2"].reasons[0]


def test_topk_bottom_keeps_the_lowest_error():
    policy = {"topk": {"column": "recomposition_mean", "k": 1, "keep": "bottom"}}
    decisions = decide(policy)
    assert {k for k, d in decisions.items() if d.accepted} == {"a1", "b3", "c1"}
    assert decisions["b1"].reasons == ("not in bottom-1 of input bg_2 by recomposition_mean (rank 2, "
                                       "recomposition_mean 0.2)",)


def test_topk_by_another_column():
    assert accepted({"topk": {"column": "hps", "k": 2, "by": "round"}}) == {"b3", "b1", "c4", "c3"}


# ------------------------------------------------------------------------------------- combinations
def test_all_ranks_only_the_candidates_that_pass_its_thresholds_in_either_order():
    # The README example: rows failing the threshold (a3, c2, c4) are out; top-2 among the rest.
    rows_first = {"all": [threshold("recomposition_mean", "<=", 2),
                          {"topk": {"column": "clip_foreground", "k": 2, "by": "input_key"}}]}
    assert accepted(rows_first) == {"a1", "a4", "b1", "b2", "c1", "c3"}
    # Without the empty-alpha a4, a3 moves up to bg_1's second place.
    policy = {"all": [{"topk": {"column": "clip_foreground", "k": 2}}, threshold("alpha_empty", "==", False)]}
    decisions = decide(policy)
    assert {k for k, d in decisions.items() if d.accepted} == {"a1", "a3", "b1", "b2", "c1", "c3"}
    assert decisions["a4"].reasons == ("alpha_empty is true",)  # not ranked: no top-k reason
    assert decisions["a2"].reasons == ("not in top-2 of input bg_1 by clip_foreground (rank 3, "
                                       "clip_foreground 0.12)",)


def test_all_reports_every_failed_threshold():
    decisions = decide({"all": [threshold("recomposition_mean", "<=", 2), threshold("clip_foreground", ">=", 0.2)]})
    assert {k for k, d in decisions.items() if d.accepted} == {"a1", "a4", "b1", "b2", "c1", "c3"}
    assert decisions["c2"].reasons == ("recomposition_mean 2.5 > 2", "clip_foreground 0.1 < 0.2")


def test_all_with_a_quantile_over_the_eligible_rows():
    # Eligible round 0 hps: .31 .30 .27 .25 .22 .18 -> cutoff .26; round 1: .14 .10 -> .12.
    policy = {"all": [threshold("recomposition_mean", "<=", 2), {"quantile": {"column": "hps", "q": 0.5}}]}
    assert accepted(policy) == {"a2", "b1", "b3", "c3"}


def test_any_accepts_by_the_first_alternative_and_rejects_with_every_reason():
    policy = {"any": [threshold("hps", ">=", 0.3), threshold("clip_foreground", ">=", 0.35)]}
    decisions = decide(policy)
    assert {k for k, d in decisions.items() if d.accepted} == {"b1", "b3", "c1", "c3"}
    assert decisions["b1"].rule == "hps >= 0.3"
    assert decisions["c1"].rule == "clip_foreground >= 0.35"
    assert decisions["a1"].reasons == ("hps 0.25 < 0.3", "clip_foreground 0.3 < 0.35")


def test_not_excludes_what_its_rule_accepts():
    decisions = decide({"not": threshold("alpha_empty", "==", True)})
    assert {k for k, d in decisions.items() if not d.accepted} == {"a4"}
    assert decisions["a4"].reasons == ("matches the excluded rule alpha_empty == true",)


def test_nested_named_policy():
    policy = {"name": "strict", "all": [
        {"any": [threshold("hps", ">=", 0.3), threshold("clip_foreground", ">=", 0.35)]},
        {"not": threshold("alpha_empty", "==", True)},
        {"name": "best-hps", "topk": {"column": "hps", "k": 1}},
    ]}
    decisions = decide(policy)
    # any -> b1 b3 c1 c3; top-1 by hps among them per input: b3 (.31 > .30), c3 (.14 > .10).
    assert {k for k, d in decisions.items() if d.accepted} == {"b3", "c3"}
    assert decisions["b3"].rule == "strict"
    assert decisions["b1"].reasons == ("[best-hps] not in top-1 of input bg_2 by hps (rank 2, hps 0.3)",)
    assert describe(policy) == ("strict (all of [any of [hps >= 0.3; clip_foreground >= 0.35]; "
                                "not [alpha_empty == true]; best-hps (top-1 by hps per input_key)])")


def test_named_alternative_of_any_is_the_accepting_rule():
    policy = {"name": "lenient", "any": [{"name": "pretty", "threshold": {"column": "hps", "op": ">=", "value": 0.3}},
                                         threshold("clip_foreground", ">=", 0.35)]}
    decisions = decide(policy)
    assert decisions["b1"].rule == "lenient: pretty"
    assert decisions["c1"].rule == "lenient: clip_foreground >= 0.35"
    assert decisions["a1"].reasons == ("[pretty] hps 0.25 < 0.3", "clip_foreground 0.3 < 0.35")


# ---------------------------------------------------------------------------------- inputs and output
def test_pyarrow_and_pandas_tables_decide_like_a_list_of_dicts():
    pandas = pytest.importorskip("pandas")
    policy = {"all": [threshold("recomposition_mean", "<=", 2), {"topk": {"column": "clip_foreground", "k": 2}}]}
    expected = apply_policy(TABLE, policy)
    assert apply_policy(pa.Table.from_pylist(TABLE), policy) == expected
    from_pandas = apply_policy(pandas.DataFrame(TABLE), policy)
    assert [(d.key, d.accepted, d.rule) for d in from_pandas] == [(d.key, d.accepted, d.rule) for d in expected]
    assert from_pandas[-1].reasons == ("recomposition_mean is NaN",)  # pandas stores a missing float as NaN


def test_decision_row_and_empty_table():
    decision = Decision("a1", False, None, ("hps 0.1 < 0.2",))
    assert decision.as_row() == {"key": "a1", "accepted": False, "rule": None, "reasons": ["hps 0.1 < 0.2"]}
    assert apply_policy([], threshold("hps", ">", 0)) == []


def test_load_dump_round_trip_and_rule_objects():
    spec = {"name": "p", "all": [threshold("hps", ">", 0.2), {"not": {"quantile": {"column": "hps", "q": 0.1,
                                                                                    "keep": "bottom", "per": None}}},
                                 {"any": [{"topk": {"column": "clip_foreground", "k": 3}}]}]}
    rule = load_policy(spec)
    assert load_policy(dump_policy(rule)) == rule
    assert dump_policy(rule)["all"][1]["not"]["quantile"]["per"] is None  # a None that differs from the default
    built = Threshold(column="hps", op=">", value=0.2)
    assert apply_policy(TABLE, built) == apply_policy(TABLE, threshold("hps", ">", 0.2))
    assert describe(TopK(column="hps", k=2)) == "top-2 by hps per input_key"
    with pytest.raises(PolicyError, match=r"policy\.all\[1\]: Rule is not a rule kind"):
        apply_policy(TABLE, AllOf(rules=(built, Rule(name="bare"))))


# ----------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("spec, message", [
    ({"treshold": {"column": "hps", "op": ">", "value": 1}},
     r"policy: .*one of the keys threshold, quantile.*got treshold"),
    ({"threshold": {"column": "hps", "op": ">", "value": 1}, "topk": {"column": "hps", "k": 1}}, r"exactly one"),
    ({"all": [threshold("hps", ">", 1), threshold("hps", "=>", 1)]}, r"policy\.all\[1\]\.threshold: op: .*'>='"),
    ({"all": [threshold("hps", ">", "high")]}, r"policy\.all\[0\]\.threshold: op '>' needs a number"),
    ({"topk": {"column": "hps", "k": 0}}, r"policy\.topk: k: .*greater than or equal to 1 \(got 0\)"),
    ({"quantile": {"column": "hps", "q": 1.5}}, r"policy\.quantile: q: .*less than or equal to 1"),
    ({"quantile": {"column": "hps", "q": 0.5, "bogus": 1}}, r"policy\.quantile: bogus: Extra inputs"),
    ({"any": []}, r"policy\.any: expected a non-empty list"),
    ({"not": [threshold("hps", ">", 1)]}, r"policy\.not: a rule is a mapping"),
    ({"threshold": {"column": "hps", "op": ">", "value": NAN}}, r"finite"),
    ("hps > 1", r"policy: a rule is a mapping"),
])
def test_invalid_policies_name_the_place_and_the_problem(spec, message):
    with pytest.raises(PolicyError, match=message):
        load_policy(spec)


def test_table_errors_are_clear():
    with pytest.raises(PolicyError, match=r"'clip_composite' \(clip_composite >= 0.2\).*table has: key, input_key"):
        apply_policy(TABLE, {"all": [threshold("hps", ">", 0), threshold("clip_composite", ">=", 0.2)]})
    no_round = [{k: v for k, v in row.items() if k != "round"} for row in TABLE]
    with pytest.raises(PolicyError, match=r"'round' .*set per: null"):
        apply_policy(no_round, {"quantile": {"column": "hps", "q": 0.5}})
    assert len(accepted({"quantile": {"column": "hps", "q": 0.5, "per": None}}, no_round)) == 6
    with pytest.raises(PolicyError, match=r"key 'a1' appears twice"):
        apply_policy(TABLE + TABLE[:1], threshold("hps", ">", 0))
    with pytest.raises(PolicyError, match=r"'hps' holds 'high' for key 'x'"):
        apply_policy([{"key": "x", "input_key": "i", "hps": "high"}], {"topk": {"column": "hps", "k": 1}})
    with pytest.raises(PolicyError, match=r"groups by 'input_key', but key 'x' has no input_key"):
        apply_policy([{"key": "x", "input_key": None, "hps": 1.0}], {"topk": {"column": "hps", "k": 1}})
    with pytest.raises(PolicyError, match=r"cannot be compared"):
        apply_policy([{"key": "x", "hps": "high"}], threshold("hps", ">", 0.5))

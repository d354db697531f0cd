"""The gate's rule and its stated error rate, on synthetic noise: pure functions, no store.

The rule (mnistgen.gate): promote when the improvement d exceeds T = max(t(1 - a; n - 1)·se, z(1 - a)·σ_B),
se² = 2 s² - v + σ_B², a = alpha / K. A reseeded identical recipe must be promoted at most alpha of the time,
a real improvement of a stated size at least a stated fraction of the time, and a winner chosen among K
trials no more often than a single candidate.
"""

import math

import pytest
from scipy import stats

from mnistgen import gate, grades
from mnistgen.commands.registry import rollback_refusal
from mnistgen.config import GRADES, Floor, GateParams
from mnistgen.gate_rate import World, detectable, monte_carlo_error, simulate
from mnistgen.registry import outside_moves

RULE = GateParams(
    primary="fid_cls", higher_is_better=False, agree_in_both_spaces=True, floors=(Floor(metric="fid_cls", max=50.0),)
)
NOISE = {m: gate.TrainingNoise(m, 3, 0.5, 0.08) for m in ("fid_cls", "fid_cls_e2")}  # s = 0.5, v = 0.08


def compared(gain: float, gain_e2: float, eval_sd: float = 0.2) -> list[gate.Comparison]:
    """Paired comparisons where the candidate's FID is lower by `gain` in space 1 and `gain_e2` in space 2."""
    return [gate.Comparison("fid_cls", -gain, eval_sd), gate.Comparison("fid_cls_e2", -gain_e2, eval_sd)]


def decide(comparisons, **kwargs) -> gate.Decision:
    return gate.decide("m", {"fid_cls": 18.0}, {"fid_cls": 20.0}, RULE, comparisons, NOISE, 0.05, **kwargs)


def test_the_threshold_is_the_stated_formula():
    """T = max(t(0.95; 2) * sqrt(2 * 0.25 - 0.08 + 0.04), z(0.95) * 0.2), checked by hand against scipy."""
    verdict = gate.judge(gate.Comparison("fid_cls", -1.0, 0.2), NOISE["fid_cls"], 0.05, higher_is_better=False)
    se = math.sqrt(2 * 0.5**2 - 0.08 + 0.2**2)
    expected = max(stats.t.ppf(0.95, 2) * se, stats.norm.ppf(0.95) * 0.2)
    assert verdict.se == pytest.approx(se) and verdict.threshold == pytest.approx(expected)
    assert verdict.threshold == pytest.approx(2.9199856 * 0.6782330, rel=1e-6)  # 1.98: the t term wins here
    assert verdict.training_sd == pytest.approx(math.sqrt(0.25 - 0.04))
    assert verdict.improvement == 1.0 and verdict.outcome == gate.INCONCLUSIVE
    assert verdict.interval == pytest.approx((1.0 - expected, 1.0 + expected))
    # when the seeds' spread is all evaluation noise, the evaluation noise alone sets the floor
    quiet = gate.judge(gate.Comparison("fid_cls", -1.0, 0.5), gate.TrainingNoise("fid_cls", 3, 0.01, 0.25), 0.05, False)
    assert quiet.threshold == pytest.approx(stats.norm.ppf(0.95) * 0.5)
    # K trials: alpha / K
    chosen = gate.judge(gate.Comparison("fid_cls", -1.0, 0.2), NOISE["fid_cls"], 0.05, False, trials=10)
    assert chosen.level == pytest.approx(0.005) and chosen.t_quantile == pytest.approx(stats.t.ppf(0.995, 2))


def test_promote_only_when_every_compared_metric_is_better_beyond_its_threshold():
    assert decide(compared(2.5, 2.5)).decision == gate.PROMOTE  # 2.5 > 1.98 in both spaces
    straddles = decide(compared(1.0, 2.5))
    assert straddles.decision == gate.INCONCLUSIVE and "the interval holds 0" in straddles.reason
    worse = decide(compared(-3.0, -3.0))
    assert worse.decision == gate.KEEP and "worse beyond the noise" in worse.reason
    flips = decide(compared(2.5, -3.0))  # better in space 1, worse in space 2: the champion stays
    assert flips.decision == gate.KEEP and "fid_cls_e2: better by -3" in flips.reason
    assert [v.metric for v in decide(compared(2.5, 2.5)).verdicts] == ["fid_cls", "fid_cls_e2"]
    assert gate.decide("m", {"fid_cls": 60.0}, None, RULE).decision == gate.REJECT
    assert gate.decide("m", {}, None, RULE).decision == gate.REJECT  # a missing floor metric is a breach
    assert gate.decide("m", {"fid_cls": 40.0}, None, RULE).decision == gate.PROMOTE
    with pytest.raises(ValueError, match="paired comparison"):
        gate.decide("m", {"fid_cls": 10.0}, {"fid_cls": 20.0}, RULE)  # a champion and no comparison: never guessed
    with pytest.raises(ValueError, match="no training noise for fid_cls_e2"):
        gate.decide("m", {"fid_cls": 18.0}, {"fid_cls": 20.0}, RULE, compared(3, 3), {"fid_cls": NOISE["fid_cls"]})


def test_a_zero_difference_reads_as_zero_not_minus_zero():
    said = decide(compared(0.0, 0.0)).reason
    assert "better by 0 [" in said and "better by -0" not in said


def test_a_value_that_is_not_a_number_is_unmeasurable_not_a_verdict():
    nan = gate.decide("m", {"fid_cls": float("nan")}, None, RULE)
    assert nan.decision == gate.UNMEASURABLE and nan.failed and "fid_cls is not a number" in nan.reason
    paired = decide([gate.Comparison("fid_cls", float("nan"), 0.2), gate.Comparison("fid_cls_e2", -3.0, 0.2)])
    assert paired.decision == gate.UNMEASURABLE and "paired difference of fid_cls is not a number" in paired.reason
    assert gate.exit_code([paired, decide(compared(3, 3))]) == 2  # one failed model: exit 2, the other decided


def test_grades_rank_and_a_smoke_run_never_becomes_a_team_champion():
    better = compared(5.0, 5.0)
    below = decide(better, candidate_grade="smoke", champion_grade="default")
    assert below.decision == gate.KEEP and "grade smoke is below the champion's default" in below.reason
    assert decide(better, candidate_grade="experiment", champion_grade="default").decision == gate.KEEP
    assert decide(better, candidate_grade="sweep", champion_grade="default").decision == gate.KEEP
    assert decide(better, candidate_grade="paper", champion_grade="default").decision == gate.PROMOTE
    assert decide(better, candidate_grade="default", champion_grade="experiment").decision == gate.PROMOTE
    assert gate.decide("m", {"fid_cls": 10.0}, None, RULE, candidate_grade="smoke").decision == gate.PROMOTE  # local: allowed
    team = gate.decide("m", {"fid_cls": 10.0}, None, RULE, candidate_grade="smoke", team=True)
    assert team.decision == gate.KEEP and "never becomes a team champion" in team.reason
    ungraded = gate.decide("m", {"fid_cls": 10.0}, None, RULE, candidate_grade="unknown", team=True)
    assert ungraded.decision == gate.ERROR and "no known grade" in ungraded.reason
    assert GRADES.index("experiment") < GRADES.index("default")


def test_a_grade_is_earned_by_the_recipe_not_claimed():
    committed = {"prepare": {"limit_train": 0}, "models": {"gan": {"epochs": 8}}}
    paper = {"prepare": {"limit_train": 0}, "models": {"gan": {"epochs": 40}}}
    profiles = {"default": committed, "paper": paper}
    default_recipe, paper_recipe = grades.recipe_hash(committed, "gan"), grades.recipe_hash(paper, "gan")
    assert grades.earned("default", default_recipe, profiles, "gan")[0] == "default"
    assert grades.earned("paper", paper_recipe, profiles, "gan")[0] == "paper"
    one_epoch = grades.recipe_hash({"prepare": {"limit_train": 0}, "models": {"gan": {"epochs": 1}}}, "gan")
    grade, why = grades.earned("paper", one_epoch, profiles, "gan")  # a 1-epoch run labelled paper
    assert grade == "experiment" and "not the committed paper one" in why
    assert grades.earned("default", paper_recipe, profiles, "gan")[0] == "experiment"  # edited, uncommitted params
    assert grades.earned("default", default_recipe, {"default": None, "paper": None}, "gan")[0] == "experiment"  # no git
    assert grades.earned("smoke", None, profiles, "gan")[0] == "smoke"
    assert grades.earned(None, default_recipe, profiles, "gan")[0] == "unknown"
    assert grades.earned("default", None, profiles, "gan")[0] == "experiment"
    assert grades.recipe_hash(committed, "gan") != grades.recipe_hash(committed, "vae")


ALPHA = 0.05
ROUNDS = 20_000


@pytest.mark.parametrize(
    "world",
    [
        World(training_sd=1.0, eval_sd=1.0),
        World(training_sd=1.0, eval_sd=0.1),  # training noise dominates: the t-test is exact
        World(training_sd=0.1, eval_sd=1.0),  # evaluation noise dominates
        World(training_sd=0.0, eval_sd=1.0),
        World(training_sd=1.0, eval_sd=1.0, seeds=5),
    ],
    ids=["equal", "training", "evaluation", "no-training", "five-seeds"],
)
def test_a_reseeded_identical_recipe_is_promoted_at_most_alpha_of_the_time(world):
    rate = simulate(world, ALPHA, ROUNDS)
    assert rate <= ALPHA + 3 * monte_carlo_error(ALPHA, ROUNDS), f"{rate:.4f} false promotions at alpha {ALPHA}"


def test_the_simulation_can_see_a_rule_that_promotes_too_often():
    """The check above is not blind: the same rule at alpha 0.2 promotes about 0.2 of reseeded recipes."""
    rate = simulate(World(1.0, 0.1), 0.2, ROUNDS)
    assert rate > ALPHA + 3 * monte_carlo_error(ALPHA, ROUNDS) and rate == pytest.approx(0.2, abs=0.02)


def test_a_true_improvement_of_three_combined_sds_is_promoted_more_than_half_the_time():
    """Power: a recipe truly better by 3 x sqrt(2 σ_T² + σ_E²), with 3 seeds, is promoted over 55 % of the time;
    with 5 seeds over 70 %. `detectable` finds the improvement promoted 80 % of the time."""
    scale = math.sqrt(2 * 1.0 + 1.0)
    assert simulate(World(1.0, 1.0, improvement=3 * scale), ALPHA, ROUNDS) > 0.55
    assert simulate(World(1.0, 1.0, seeds=5, improvement=3 * scale), ALPHA, ROUNDS) > 0.70
    needed = detectable(World(1.0, 1.0), ALPHA, power=0.8)
    assert 2 * scale < needed < 6 * scale
    assert simulate(World(1.0, 1.0, improvement=needed), ALPHA, 4_000) >= 0.8 - 0.02


def test_a_winner_of_ten_trials_is_no_more_likely_promoted_once_the_gate_knows():
    """The best of 10 reseeded candidates chosen on one measurement: told nothing, the rule promotes it well above
    alpha; measured again on fresh samples at alpha / 10, at most alpha."""
    chosen = World(training_sd=1.0, eval_sd=1.0, trials=10)
    naive = simulate(World(1.0, 1.0, trials=10, remeasure=False, told_trials=False), ALPHA, ROUNDS)
    assert naive > 2 * ALPHA
    assert simulate(chosen, ALPHA, ROUNDS) <= ALPHA + 3 * monte_carlo_error(ALPHA, ROUNDS)
    assert simulate(World(0.1, 1.0, trials=10), ALPHA, ROUNDS) <= ALPHA + 3 * monte_carlo_error(ALPHA, ROUNDS)


def test_the_ledger_flags_moves_made_outside_the_tool():
    history = [{"at": "t1", "from": None, "to": "1"}, {"at": "t2", "from": "1", "to": "2"}, {"at": "t3", "from": "3", "to": "4"}]
    flags = outside_moves(history, "5")
    assert len(flags) == 2 and "before t3: @champion was v3" in flags[0] and "now: @champion is v5" in flags[1]
    assert outside_moves(history[:2], "2") == []


def test_rollback_keeps_the_grade_rules():
    assert rollback_refusal("1", "smoke", "2", "default", team=False) == "v1 is graded smoke, below champion v2's default"
    assert "only a graded, non-smoke run" in (rollback_refusal("1", "smoke", None, None, team=True) or "")
    assert "only a graded, non-smoke run" in (rollback_refusal("1", None, "2", "default", team=True) or "")
    assert rollback_refusal("1", "default", "2", "default", team=True) is None


def test_the_summary_quotes_each_metrics_difference_interval_threshold_and_alpha():
    """What a pull request's summary (promotion.md) shows of the gate: per model the rule, alpha and K, and per compared
    metric d, its evaluation and training noise, the threshold and the interval d ± T."""
    decided = decide(compared(2.5, 1.0), trials=3)
    decided.candidate_version, decided.champion_version = "2", "1"
    text = gate.to_markdown([decided], gate.exit_code([decided]))
    assert "alpha 0.05, K = 3" in text and "threshold T" in text
    for v in decided.verdicts:
        lo, hi = v.interval
        assert f"| {v.metric} | {v.improvement:.4g} | {v.eval_sd:.3g} |" in text and f"[{lo:.4g}, {hi:.4g}]" in text
    assert gate.to_json([decided], 0)["models"]["m"]["verdicts"][0]["threshold"] == pytest.approx(decided.verdicts[0].threshold)

"""The SLO controller: cost model, acceptance prediction, selection, policies, SLO scheduling."""

from __future__ import annotations

import itertools
import math
import pickle
import random
import time
from dataclasses import replace

import numpy as np
import pytest

from specserve.config import ControlConfig, EngineConfig, SpeculativeConfig
from specserve.control.acceptance import AcceptancePredictor
from specserve.control.controller import SLOController
from specserve.control.cost_model import CostModel, LatencyTable
from specserve.control.policies import POLICIES, RequestView, StepView, build_policy
from specserve.control.selection import RankedNodes, select_nodes
from specserve.control.slo import SLO, SLOConfig
from specserve.control.step_trees import StepTrees
from specserve.control.workload import Outcome, summarize
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.request import FinishReason
from specserve.engine.sampling_params import SamplingParams
from specserve.engine.scheduler import PromptCap, ScheduledRequest, Scheduler
from specserve.spec.tree import TokenTree, TreeBudget
from test_engine import GREEDY, assert_all_slots_free, run
from tiny_models import PROMPTS


def cost_model(base_ms: float, per_token_ms: float, draft_ms: float = 0.5) -> CostModel:
    """Target latency base + per_token * tokens (context-free); a flat draft step."""
    tokens = [1, 8, 64, 512]
    return CostModel(
        model="hand-built",
        device="cpu",
        target=LatencyTable(tokens=tokens, contexts=[0], ms=[[base_ms + per_token_ms * t for t in tokens]]),
        draft=LatencyTable(tokens=tokens, contexts=[0], ms=[[draft_ms] * len(tokens)]),
    )


CHEAP_VERIFY = cost_model(30.0, 0.05)  # a weight-bound forward: extra tokens are nearly free
DEAR_VERIFY = cost_model(5.0, 10.0)  # a compute-bound forward: every token costs in full


# ------------------------------------------------------------------ cost model


def test_latency_table_interpolates_and_extrapolates_linearly():
    table = LatencyTable(tokens=[1, 4], contexts=[100, 300], ms=[[10, 16], [20, 26]])
    assert table(1, 100) == pytest.approx(10)
    assert table(2.5, 100) == pytest.approx(13)
    assert table(8, 100) == pytest.approx(24)  # beyond the grid: the last segment's slope
    assert table(1, 200) == pytest.approx(15)  # between contexts
    assert table(4, 500) == pytest.approx(36)
    assert table(0, 100) == 0.0


def test_latency_curve_evaluates_many_token_counts_like_one():
    table = LatencyTable(tokens=[1, 4, 16], contexts=[100, 300], ms=[[10, 16, 20], [20, 26, 40]])
    curve = table.at_context(180)
    tokens = np.arange(-2, 40)
    assert curve.many(tokens) == pytest.approx([curve(t) for t in tokens])
    assert curve(2.5) == pytest.approx(table(2.5, 180))


def test_copies_with_changed_fields_compute_from_their_own_fields():
    table = LatencyTable(tokens=[1, 4, 16], contexts=[100], ms=[[10, 16, 20]])
    table.at_context(100).many(np.array([8]))
    moved = table.model_copy(update={"tokens": [1, 8, 32]})
    assert moved.at_context(100).many(np.array([8])) == pytest.approx([16.0])
    budget = TreeBudget(depth=4, width=2)
    assert budget.node_limit == 8 and budget.model_copy(update={"depth": 1}).node_limit == 2


def test_latency_table_rejects_a_bad_grid():
    with pytest.raises(ValueError, match="increasing"):
        LatencyTable(tokens=[4, 1], contexts=[0], ms=[[1, 2]])
    with pytest.raises(ValueError, match="one row per context"):
        LatencyTable(tokens=[1, 4], contexts=[0, 10], ms=[[1, 2]])


def test_cost_model_round_trips_through_json(tmp_path):
    path = tmp_path / "profile.json"
    CHEAP_VERIFY.save(path)
    assert CostModel.load(path) == CHEAP_VERIFY
    assert CHEAP_VERIFY.at_context(0).iteration_ms(8, 0, [2, 2]) == pytest.approx(30.4 + 1.0)


# --------------------------------------------------------- acceptance prediction


def chain(probs: list[float]) -> TokenTree:
    tree = TokenTree()
    for i, p in enumerate(probs):
        tree.add(i, i - 1, p)
    return tree


def test_predictor_calibrates_an_overconfident_drafter_by_depth():
    predictor = AcceptancePredictor()
    tree = chain([0.9, 0.9, 0.9])
    before = predictor.values(tree)
    for step in range(200):  # the target accepts only the first token, and only half the time
        predictor.observe("r", tree, [0] if step % 2 else [])
    after = predictor.values(tree)
    assert after[0] == pytest.approx(0.5, abs=0.05)
    assert after[1] < 0.1 and after[2] < 0.1
    assert all(a < b for a, b in zip(after, before))
    assert predictor.rate < 0.4 and predictor.request_rate("r") < 0.6
    assert predictor.mean_confidence == pytest.approx(0.9)


def test_a_requests_rate_is_unbiased_for_trees_deeper_than_one():
    """Chains of three accepting 0, 1, 2, 3 tokens as often as a per-token rate of 0.5 gives:
    the request's rate says 0.5, where a mean of per-step ratios would say 0.33."""
    predictor = AcceptancePredictor()
    pattern = [[], [], [], [], [0], [0], [0, 1], [0, 1, 2]]  # P(k accepted) = 0.5, 0.25, 0.125, 0.125
    for step in range(400):
        predictor.observe("r", chain([0.5, 0.25, 0.125]), pattern[step % len(pattern)])
    assert predictor.rate == pytest.approx(0.5, abs=0.02)
    rates = []
    for step in range(400):  # the rate of every window of the pattern, as plans read it
        predictor.observe("r", chain([0.5, 0.25, 0.125]), pattern[step % len(pattern)])
        rates.append(predictor.request_rate("r"))
    assert sum(rates) / len(rates) == pytest.approx(0.5, abs=0.05)


def test_a_request_that_stopped_speculating_tries_again():
    """A run of misses drives a request's rate far below the others'; the steps it then decodes
    without speculating age that evidence, so its rate returns toward the overall rate (and a
    plan speculates for it again) instead of staying where the misses left it."""
    predictor = AcceptancePredictor()
    for _ in range(100):
        predictor.observe("good", chain([0.9]), [0])
    for _ in range(10):
        predictor.observe("bad", chain([0.9]), [])
    after_misses = predictor.request_rate("bad")
    assert after_misses < 0.3 < predictor.rate
    rates = []
    for _ in range(6):
        predictor.skip("bad")
        rates.append(predictor.request_rate("bad"))
    assert rates == sorted(rates) and rates[0] > after_misses
    assert rates[-1] > max(3 * after_misses, 0.7 * predictor.rate)
    predictor.skip("never seen")  # nothing to age
    assert predictor.request_rate("never seen") == predictor.rate


def test_predictor_decays_old_evidence_exponentially():
    predictor = AcceptancePredictor()
    rng = random.Random(3)
    history = [(rng.random(), rng.random() < 0.5) for _ in range(40_000)]  # renormalises inside
    for f, accepted in history:
        predictor.observe("r", chain([f]), [0] if accepted else [])
    decay = [0.99 ** age for age in range(len(history) - 1, -1, -1)]
    predicted = sum(w * f for w, (f, _) in zip(decay, history))
    observed = sum(w * a for w, (_, a) in zip(decay, history))
    assert predictor.scale(1) == pytest.approx((observed + 2.0) / (predicted + 2.0))


def test_predictor_values_never_grow_along_a_path():
    predictor = AcceptancePredictor()
    for _ in range(50):  # deep nodes are always accepted: their scale exceeds the first level's
        predictor.observe("r", chain([0.9, 0.5, 0.5]), [0, 1, 2])
    values = predictor.values(chain([0.9, 0.5, 0.5]))
    assert values == sorted(values, reverse=True) and values[0] <= 1.0


# ----------------------------------------------------------------- selection


def random_tree(rng: random.Random, size: int) -> TokenTree:
    tree = TokenTree()
    for i in range(size):
        tree.add(i, rng.randrange(-1, i), rng.uniform(0.05, 1.0))
    return tree


def closed_subsets(tree: TokenTree):
    """Every ancestor-closed set of nodes of a small tree."""
    for mask in range(1 << len(tree)):
        nodes = [i for i in range(len(tree)) if mask >> i & 1]
        if all(tree.parents[i] < 0 or mask >> tree.parents[i] & 1 for i in nodes):
            yield nodes


@pytest.mark.parametrize("seed", range(30))
def test_selection_equals_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    trees = [random_tree(rng, rng.randint(1, 5)) for _ in range(3)]
    floors = [rng.choice([0.0, 0.0, rng.uniform(1.0, 3.0)]) for _ in trees]
    budget = rng.randint(0, 10)
    # Floors as selection sees them: at most what the whole tree can yield.
    reachable = [min(f, 1 + sum(t.path_probs)) for f, t in zip(floors, trees)]
    best = None
    for choice in itertools.product(*(list(closed_subsets(t)) for t in trees)):
        if sum(map(len, choice)) > budget:
            continue
        gains = [1 + sum(t.path_probs[n] for n in nodes) for t, nodes in zip(trees, choice)]
        if all(g >= r - 1e-9 for g, r in zip(gains, reachable)):
            best = max(best or 0.0, sum(gains))
    values = [sorted(t.path_probs, reverse=True) for t in trees]
    counts = select_nodes(RankedNodes.of(values), np.array(floors), budget).tolist()
    assert sum(counts) <= budget
    if best is None:  # floors infeasible within the budget: nothing to compare
        return
    gains = [1 + sum(v[:n]) for v, n in zip(values, counts)]
    assert all(g >= r - 1e-9 for g, r in zip(gains, reachable))
    assert sum(gains) == pytest.approx(best)
    for tree, v, n in zip(trees, values, counts):  # the counts name a valid subtree
        chosen = tree.select(n)
        assert len(chosen) == n and sum(chosen.path_probs) == pytest.approx(sum(v[:n]))


@pytest.mark.parametrize("seed", range(20))
def test_a_steps_trees_are_valued_and_cut_together_as_each_would_be_alone(seed):
    rng = random.Random(seed)
    predictor = AcceptancePredictor()
    for _ in range(20 * (seed % 2)):  # odd seeds: uneven calibration, growing with depth somewhere
        tree = chain([rng.choice([0.5, 0.9])] * 4)
        predictor.observe("r", tree, list(range(rng.randint(0, 4))))
    trees = [TokenTree() for _ in range(5)]
    for tree in trees:  # parents-first but not by depth, with ties of value across depths
        for i in range(rng.randint(0, 7)):
            tree.add(i, rng.randrange(-1, i), rng.choice([0.5, 1.0]))
    drafted = StepTrees(trees, predictor.scales)
    counts = [rng.randint(0, len(tree)) for tree in trees]
    ranked = np.split(drafted.ranked.values, np.cumsum(drafted.ranked.sizes)[:-1])
    for tree, values, cut, n in zip(trees, ranked, drafted.cut(np.array(counts)), counts):
        assert values.tolist() == sorted(predictor.values(tree), reverse=True)
        assert cut == tree.select(n, predictor.values(tree))


def test_selection_serves_the_most_urgent_floor_when_the_budget_is_short():
    nodes = RankedNodes.of([[0.9, 0.9], [0.9, 0.9]])
    assert select_nodes(nodes, np.array([1.5, 2.5]), 2).tolist() == [0, 2]


# ------------------------------------------------------------------ policies


def step_view(n: int, slo_ms: float | None = None, behind: bool = False, depth: int = 4, width: int = 1):
    """n decoding requests; ``behind``: 21 tokens in 1.1 s, behind a 50 ms TPOT SLO."""
    return StepView([
        RequestView(
            request_id=f"r{i}",
            context_len=100,
            max_budget=TreeBudget(depth=depth, width=width),
            tpot_slo_s=None if slo_ms is None else slo_ms / 1e3,
            decode_time_s=1.1 if behind else 0.0,
            num_decoded=20 if behind else 0,
        )
        for i in range(n)
    ])


def confident_predictor(rate: float) -> AcceptancePredictor:
    predictor = AcceptancePredictor()
    accepted = int(rate * 10)
    for _ in range(300):
        predictor.observe("warm-up", chain([rate] * 4), list(range(min(accepted // 3, 4))))
    return predictor


def node_values(trees: list[TokenTree]) -> RankedNodes:
    """What the controller hands a policy's select: each node's value (uncalibrated here)."""
    return RankedNodes.of([AcceptancePredictor().values(tree) for tree in trees])


def policy(name: str, cost: CostModel, predictor: AcceptancePredictor | None = None):
    return build_policy(name, cost, predictor or AcceptancePredictor(prior_rate=0.8), 512)


def test_none_and_fixed_do_what_they_say():
    step = step_view(3, depth=3, width=2)
    assert all(b.depth == 0 for b in policy("none", DEAR_VERIFY).draft_budgets(step))
    fixed = policy("fixed", DEAR_VERIFY)
    assert fixed.draft_budgets(step) == [TreeBudget(depth=3, width=2)] * 3
    trees = [chain([0.1, 0.1]), chain([0.9])]
    assert fixed.select(step_view(2), node_values(trees)).tolist() == [2, 1]


@pytest.mark.parametrize("name", ["smartspec", "specserve", "auto"])
def test_adaptive_policies_speculate_when_verification_is_cheap_and_stop_when_dear(name):
    step = step_view(4)
    assert all(b.depth >= 3 for b in policy(name, CHEAP_VERIFY).draft_budgets(step))
    assert all(b.depth == 0 for b in policy(name, DEAR_VERIFY).draft_budgets(step))


def test_smartspec_uses_one_length_for_the_whole_batch():
    budgets = policy("smartspec", cost_model(30.0, 2.0)).draft_budgets(step_view(4))
    assert len({b.depth for b in budgets}) == 1 and all(b.width == 1 for b in budgets)


def test_auto_keeps_speculating_for_a_request_behind_its_slo_even_when_verification_is_dear():
    auto = policy("auto", DEAR_VERIFY)
    assert auto.draft_budgets(step_view(1, slo_ms=50, behind=True))[0].depth > 0
    step = step_view(2, slo_ms=50, behind=True)
    counts = auto.select(step, node_values([chain([0.95, 0.95, 0.95, 0.95])] * 2))
    assert all(n >= 2 for n in counts)  # floors honoured though each node lowers efficiency
    on_track = step_view(2, slo_ms=50)
    assert auto.select(on_track, node_values([chain([0.5, 0.5, 0.5, 0.5])] * 2)).tolist() == [0, 0]
    hopeless = step_view(2, slo_ms=10, behind=True)  # needs ~90 tokens now: best effort only
    assert all(b.depth == 0 for b in auto.draft_budgets(hopeless))
    assert auto.select(hopeless, node_values([chain([0.5, 0.5, 0.5, 0.5])] * 2)).tolist() == [0, 0]


@pytest.mark.parametrize("slack, lifted", [(0.1, [0, 0, 0]), (0.5, [1, 0, 0]), (2.0, [2, 2, 0])])
def test_auto_lifts_requests_behind_their_slo_only_where_that_puts_nobody_else_behind(slack, lifted):
    """Two requests 1.5 tokens short of their 50 ms TPOT SLO after a plain step, one on track
    with ``slack``. Each verified node lengthens the step by 10 ms (0.2 token of every floor):
    lifting one request costs the third 0.2 token of slack, lifting both (two nodes each, as the
    longer step raises their floors too) 0.8, which the third has only in the last case.
    Lifting both there would also keep two of three on track where slack 0.1 keeps one: not worth
    the third's SLO."""
    behind = replace(step_view(1, slo_ms=50).requests[0], decode_time_s=22.5 * 0.05 - 0.035, num_decoded=21)
    on_track = replace(behind, request_id="on-track", decode_time_s=(22 - slack) * 0.05 - 0.035)
    step = StepView([behind, replace(behind, request_id="behind too"), on_track])
    auto = policy("auto", DEAR_VERIFY, AcceptancePredictor(prior_rate=0.75))  # no node pays for itself
    assert step.floors(auto.forward_ms(step, 0) / 1e3).tolist() == pytest.approx([1.5, 1.5, 1.0 - slack])
    assert [b.depth >= n > 0 for b, n in zip(auto.draft_budgets(step), lifted)] == [n > 0 for n in lifted]
    assert auto.select(step, node_values([chain([0.75] * 4)] * 3)).tolist() == lifted


def test_auto_speculates_on_a_drafters_hint_where_the_history_says_not_to():
    cpu_like = cost_model(30.0, 4.4, draft_ms=2.5)  # one more token costs 15 % of a step
    auto = policy("auto", cpu_like, AcceptancePredictor(prior_rate=0.1))
    plain = step_view(1)
    assert auto.draft_budgets(plain)[0].depth == 0
    hinted = StepView([replace(plain.requests[0], alpha_hint=0.9)])  # e.g. a lookup match
    assert auto.draft_budgets(hinted)[0].depth > 0
    doubtful = StepView([replace(plain.requests[0], alpha_hint=0.05)])  # never below the history
    assert auto.draft_budgets(doubtful)[0].depth == 0


def test_auto_speculates_for_goodput_only_on_a_clear_predicted_gain():
    """Drafting one token that the target accepts 10 % of the time is predicted to raise tokens
    per ms by 4.9 % here: within the cost model's error, so auto decodes plainly where SmartSpec
    speculates; at 30 % (24 % more) both speculate. Verifying: a node worth 0.07 token is 3.7 %."""
    flat = cost_model(30.0, 1.0)
    for rate, speculates in ((0.1, False), (0.3, True)):
        predictor = AcceptancePredictor(prior_rate=rate)
        assert policy("smartspec", flat, predictor).draft_budgets(step_view(1))[0].depth > 0
        assert (policy("auto", flat, predictor).draft_budgets(step_view(1))[0].depth > 0) == speculates
    auto = policy("auto", flat)
    assert auto.select(step_view(1), node_values([chain([0.07])])).tolist() == [0]
    assert auto.select(step_view(1), node_values([chain([0.3])])).tolist() == [1]


def test_auto_prices_speculation_without_the_prompt_chunk_beside_it():
    """Beside a long prompt chunk, drafted nodes look cheap relative to the whole forward; auto
    speculates no more than it would in a decode-only step, so waiting prompts keep their time."""
    cpu_like = cost_model(30.0, 4.4, draft_ms=2.5)
    auto = policy("auto", cpu_like, AcceptancePredictor(prior_rate=0.3))
    decode = step_view(4)
    with_prefill = StepView(decode.requests, other_tokens=256)
    assert auto.draft_budgets(with_prefill) == auto.draft_budgets(decode)
    values = node_values([chain([0.3, 0.1])] * 4)
    assert auto.select(with_prefill, values).tolist() == auto.select(decode, values).tolist() == [0, 0, 0, 0]


def test_specserve_stops_drafting_and_trims_tails_by_confidence():
    specserve = policy("specserve", cost_model(30.0, 3.0))
    step = step_view(2)
    rule = specserve.drafting_rule(step)
    assert rule(1, [chain([0.95]), chain([0.95])])
    assert not rule(2, [chain([0.95, 0.05]), chain([0.95, 0.05])])
    assert pickle.loads(pickle.dumps(rule))(1, [chain([0.95]), chain([0.95])])  # may run on a draft actor
    counts = specserve.select(step, node_values([chain([0.95, 0.9, 0.05]), chain([0.9, 0.02, 0.01])]))
    assert counts.tolist() == [2, 1]


def test_adaserve_budget_fits_the_tightest_slo_and_meets_floors():
    never_accepts = AcceptancePredictor(prior_rate=0.0)
    adaserve = policy("adaserve", cost_model(10.0, 1.0, draft_ms=0.0), never_accepts)
    step = step_view(2, slo_ms=20)  # 10 + (2 roots + n) <= 20 * (1 + 0 * n / 2)  ->  n = 8
    assert adaserve.token_budget(step) == 8
    hopeful = policy("adaserve", cost_model(10.0, 1.0, draft_ms=0.0), AcceptancePredictor(prior_rate=0.5))
    assert hopeful.token_budget(step) > 8  # expected extra tokens pay for a longer iteration
    budgets = adaserve.draft_budgets(step)
    assert all(b.depth == 4 and b.node_limit <= 8 for b in budgets)
    behind = step_view(2, slo_ms=20, behind=True)
    counts = adaserve.select(behind, node_values([chain([0.9] * 4), chain([0.2] * 4)]))
    assert sum(counts) <= 8 and counts.tolist() == [4, 4]


def test_controller_clamps_budgets_to_each_requests_cap_and_times_itself():
    controller = SLOController("fixed", None, 512)
    step = step_view(2, depth=2)
    assert [b.depth for b in controller.plan(step)] == [2, 2]
    chosen = controller.select(step, [chain([0.9, 0.1]), chain([0.5])])
    assert [len(t) for t in chosen] == [2, 1]
    assert controller.decision_seconds > 0


def test_the_draft_reads_prompts_only_in_steps_where_nothing_else_decodes():
    none, auto = SLOController("none", None, 512), SLOController("auto", CHEAP_VERIFY, 512)
    assert not none.reads_prompts(decoding=False)
    assert auto.reads_prompts(decoding=False)  # idle: the new request will likely speculate
    assert not auto.reads_prompts(decoding=True)  # nobody waits for a read a request may never need


def test_policies_that_need_a_cost_model_say_so():
    with pytest.raises(ValueError, match="needs a cost model"):
        build_policy("auto", None, AcceptancePredictor(), 512)


# --------------------------------------------------------------- SLO config


def test_slo_classes_resolve_with_overrides_and_unknown_names_fail():
    config = SLOConfig()
    assert config.resolve(None, None, None) == config.classes["chat"]
    assert config.resolve("interactive", 25.0, None) == SLO(tpot_ms=25.0, ttft_ms=config.classes["interactive"].ttft_ms)
    with pytest.raises(ValueError, match="unknown SLO class"):
        config.resolve("platinum", None, None)
    with pytest.raises(ValueError, match="default_class"):
        SLOConfig(default_class="platinum")
    assert SLO(tpot_ms=50, ttft_ms=100).attained(0.09, 0.049)
    assert not SLO(tpot_ms=50, ttft_ms=100).attained(0.11, 0.01)


def test_a_run_reports_which_target_its_requests_missed():
    slo = SLO(tpot_ms=50, ttft_ms=100)
    outcomes = [
        Outcome(slo, ttft_s=0.05, tpot_s=0.04, output_tokens=10),  # both met
        Outcome(slo, ttft_s=0.20, tpot_s=0.04, output_tokens=10),  # late first token
        Outcome(slo, ttft_s=0.05, tpot_s=0.08, output_tokens=10),  # slow decoding
        Outcome(slo, ttft_s=None, tpot_s=None, output_tokens=0, rejected=True),
    ]
    summary = summarize(outcomes, duration_s=1.0)
    assert (summary["slo_attainment"], summary["ttft_attainment"], summary["tpot_attainment"]) == (0.25, 0.5, 0.5)
    assert summary["goodput_tok_s"] == 10.0


def test_slo_classes_scale_for_another_machine():
    config = SLOConfig(classes={"a": SLO(tpot_ms=50, ttft_ms=None)}, default_class="a", on_miss="reject")
    doubled = config.scaled(2.0)
    assert doubled.classes["a"] == SLO(tpot_ms=100, ttft_ms=None)
    assert doubled.on_miss == "reject" and config.classes["a"].tpot_ms == 50
    with pytest.raises(ValueError, match="positive"):
        config.scaled(0)


# ------------------------------------------------------------ the real engine


@pytest.fixture(scope="module")
def cheap_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "cheap.json"
    CHEAP_VERIFY.save(path)
    return path


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_is_lossless_on_the_engine(tiny_model, cheap_profile, name):
    """The target drafts for itself, so adaptive policies speculate; output stays exact."""
    engine = LLMEngine(EngineConfig(
        model=str(tiny_model), max_num_seqs=8, max_model_len=256,
        speculative=SpeculativeConfig(draft_model=str(tiny_model), budget=TreeBudget(depth=4, width=2)),
        control=ControlConfig(policy=name, profile=str(cheap_profile)),
    ))
    plain = LLMEngine(EngineConfig(model=str(tiny_model), max_num_seqs=8, max_model_len=256))
    params = [GREEDY, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, tpot_slo_ms=5.0)] * 2
    expected = [o.output.token_ids for o in run(plain, PROMPTS[:4], params)]
    assert [o.output.token_ids for o in run(engine, PROMPTS[:4], params, stagger=2)] == expected
    assert (engine.spec_stats.accepted > 0) == (name != "none")
    assert_all_slots_free(engine)


def test_drafting_and_verifying_are_timed_apart_from_plain_steps(tiny_model, cheap_profile):
    engine = LLMEngine(EngineConfig(
        model=str(tiny_model), max_num_seqs=8, max_model_len=256,
        speculative=SpeculativeConfig(draft_model=str(tiny_model), budget=TreeBudget(depth=2)),
        control=ControlConfig(policy="auto", profile=str(cheap_profile)),
    ))
    cost = engine.controller.cost
    assert cost.draft_scale == cost.verify_scale == cost.scale == 1.0
    run(engine, PROMPTS[:2], [GREEDY] * 2)
    assert engine.spec_stats.drafted > 0
    # The cheap profile's flat 0.5 ms draft forward is not this machine's: the ratios moved apart.
    assert cost.draft_scale != cost.scale
    assert cost.verify_scale != cost.scale


def test_trees_trimmed_away_still_teach_the_acceptance_rate(tiny_model, cheap_profile, monkeypatch):
    """A request whose whole tree the controller trims is scored on its first guess anyway,
    against the token the target chose: a self-draft's guess is always right."""
    engine = LLMEngine(EngineConfig(
        model=str(tiny_model), max_num_seqs=8, max_model_len=256,
        speculative=SpeculativeConfig(draft_model=str(tiny_model), budget=TreeBudget(depth=2)),
        control=ControlConfig(policy="auto", profile=str(cheap_profile)),
    ))
    controller = engine.controller
    monkeypatch.setattr(controller.policy, "select", lambda step, values: [0] * len(values))
    prior = controller.predictor.rate
    run(engine, PROMPTS[:2], [GREEDY] * 2)
    assert engine.spec_stats.accepted == 0  # nothing was verified
    assert controller.predictor.rate > prior + 0.3
    assert_all_slots_free(engine)


def test_engine_profiles_itself_into_a_keyed_cache(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path))
    engine = LLMEngine(EngineConfig(
        model=str(tiny_model), max_num_seqs=4, max_model_len=256, max_num_batched_tokens=64,
        speculative=SpeculativeConfig(draft_model=str(tiny_model)),
    ))
    path = engine.profile_path()
    assert path.is_file() and path.parent == tmp_path / "profiles"
    cost = CostModel.load(path)
    assert cost.target.tokens[-1] <= 64 and cost.draft is not None
    assert all(ms > 0 for row in cost.target.ms for ms in row)
    assert engine.controller.cost.profile == cost


def test_the_profile_cache_key_follows_the_weight_layout(tiny_model):
    """A step's cost follows the GEMM kernels, so a profile measured with one weight layout is
    not read for another (on a CPU: a GPU has no weight layouts)."""
    def path(layout):
        return LLMEngine(EngineConfig(
            model=str(tiny_model), device="cpu", max_num_seqs=2, max_model_len=128, weight_layout=layout,
            control=ControlConfig(policy="none"),
        )).profile_path()

    assert path("output_major") != path("input_major")
    assert path("output_major") == path("output_major")


def test_a_profile_keeps_each_shapes_least_time_and_never_falls_with_more_work():
    """A stall in one round is not what the shape costs; a shape measured cheaper than a smaller
    one (noise) is evened out upwards."""
    import time as clock

    from specserve.control.profiler import profile_forward

    calls: dict[tuple[int, int], int] = {}

    def forward(slices):
        tokens, context = sum(len(s.token_ids) for s in slices), slices[0].cache_start
        calls[tokens, context] = calls.get((tokens, context), 0) + 1
        stall = 0.03 if calls[tokens, context] == 2 else 0.0  # the first measured round stalls
        clock.sleep(stall + (0.004 if tokens == 1 else 0.001 * (1 + tokens // 64)))

    table = profile_forward(forward, num_slots=4, max_len=512, max_tokens=64, quick=True, repeats=3)
    assert table.tokens == [1, 2, 4, 6, 8, 12, 16, 64]
    for row in table.ms:
        assert row == sorted(row)  # 4 tokens measured cheaper than 1: evened out
        assert row[-1] < 10  # no stall of 30 ms
        assert row[0] >= 3.9
    assert all(calls[shape] == 4 for shape in calls)  # a warm-up, then one per round


def test_the_cost_model_follows_the_machine_online():
    from specserve.control.cost_model import CorrectedCost

    profile = cost_model(10.0, 1.0, draft_ms=2.0)  # 10 + tokens ms
    cost = CorrectedCost(profile)
    for _ in range(60):  # the machine now runs twice as slow as profiled
        cost.observe_forward(tokens=10, context=0, seconds=2 * 20.0 / 1e3)
    assert cost.scale == pytest.approx(2.0, rel=0.01)
    step = cost.at_context(0)
    assert step.target_ms(10) == pytest.approx(40.0, rel=0.01)
    assert step.draft_ms(1) == pytest.approx(4.0, rel=0.01)
    assert cost.prefill_s(90) == pytest.approx(0.2, rel=0.01)
    before = cost.scale
    cost.observe_forward(tokens=10, context=0, seconds=100.0)  # one stall, clamped
    assert cost.scale - before <= 0.1 * (4.0 - before) + 1e-9


def test_drafting_time_is_corrected_apart_from_the_target():
    """What a bare draft forward's profile misses (catching up, building trees, a lookup, an
    actor's round trip) shows in the observed drafting time and is priced from then on."""
    from specserve.control.cost_model import CorrectedCost

    cost = CorrectedCost(cost_model(10.0, 1.0, draft_ms=2.0))
    for _ in range(60):
        cost.observe_forward(tokens=10, context=0, seconds=2 * 20.0 / 1e3)
    assert cost.draft_scale == pytest.approx(2.0, rel=0.01)  # no drafting seen: the target's drift
    for _ in range(60):  # three draft forwards take three times what the profile says
        cost.observe_draft([4, 4, 2], context=0, seconds=3 * 6.0 / 1e3)
    assert cost.draft_scale == pytest.approx(3.0, rel=0.01)
    assert cost.scale == pytest.approx(2.0, rel=0.01)
    step = cost.at_context(0)
    assert step.draft_ms(1) == pytest.approx(6.0, rel=0.01)
    assert step.target_ms(10) == pytest.approx(40.0, rel=0.01)


def test_verifying_steps_are_corrected_apart_from_plain_ones():
    """A step that verifies trees costs more than a plain one of as many tokens (tree masks,
    verification on the host); that shows in its observed time and prices verification only."""
    from specserve.control.cost_model import CorrectedCost

    cost = CorrectedCost(cost_model(10.0, 1.0, draft_ms=2.0))
    for _ in range(60):
        cost.observe_forward(tokens=10, context=0, seconds=2 * 20.0 / 1e3)
    assert cost.verify_scale == pytest.approx(2.0, rel=0.01)  # no verifying seen: the plain drift
    for _ in range(60):
        cost.observe_forward(tokens=14, context=0, seconds=3 * 24.0 / 1e3, verified=True)
    assert cost.verify_scale == pytest.approx(3.0, rel=0.01)
    assert cost.scale == pytest.approx(2.0, rel=0.01)
    step = cost.at_context(0)
    assert step.forward_ms(10, 0) == pytest.approx(40.0, rel=0.01)
    assert step.forward_ms(10, 4) == pytest.approx(72.0, rel=0.01)
    assert step.forward_ms_many(10, np.array([0, 4])) == pytest.approx([40.0, 72.0], rel=0.01)


def test_auto_stops_verifying_once_verifying_steps_are_seen_to_cost_more_than_profiled():
    controller = SLOController("auto", cost_model(30.0, 3.0, draft_ms=4.0), 512)
    controller.predictor = controller.policy.predictor = confident_predictor(0.6)
    step = step_view(4, depth=2)
    trees = [chain([0.6, 0.6]) for _ in range(4)]
    assert sum(len(t) for t in controller.select(step, trees)) > 0
    for _ in range(60):  # steps that verify 8 nodes take twice what the profile says
        controller.observe_forward(12, context=100, seconds=2 * (30.0 + 3.0 * 12) / 1e3, verified=True)
    assert sum(len(t) for t in controller.select(step_view(4, depth=2), trees)) == 0


def test_auto_prices_the_tokens_the_draft_must_catch_up_on():
    """After plain steps the draft has fallen behind: drafting starts with feeding it the
    tokens it missed, which can cost more than speculation gains."""
    tokens = [1, 8, 64, 512]
    profile = cost_model(30.0, 3.0).model_copy(update={"draft": LatencyTable(
        tokens=tokens, contexts=[0], ms=[[2.0 + 0.5 * t for t in tokens]])})
    controller = SLOController("auto", profile, 512)
    controller.predictor = controller.policy.predictor = confident_predictor(0.6)
    assert all(b.depth > 0 for b in controller.plan(step_view(4, depth=2)))
    behind = step_view(4, depth=2)
    for request in behind.requests:
        request.draft_catch_up = 40
    assert all(b.depth == 0 for b in controller.plan(behind))


def test_auto_does_not_speculate_for_goodput_behind_a_prompt_backlog():
    """More than four full steps of prompts queued: speculating would take room and time from
    them, unless a full step without it would put a decoding request behind its SLO (a 512-token
    step costs 30 + 512 x 0.05 ms here: 56 ms against a 50 ms TPOT SLO)."""
    auto = policy("auto", CHEAP_VERIFY, confident_predictor(0.6))
    for slo_ms, speculates in [(None, False), (1000, False), (50, True)]:
        step = step_view(4, slo_ms=slo_ms, depth=2)
        assert all(b.depth > 0 for b in auto.draft_budgets(step))
        assert all(b.depth > 0 for b in auto.draft_budgets(replace(step, queued_prompt_tokens=4 * 512)))
        backlog = auto.draft_budgets(replace(step, queued_prompt_tokens=4 * 512 + 1))
        assert all((b.depth > 0) == speculates for b in backlog)


def test_auto_stops_speculating_once_drafting_is_seen_to_cost_more_than_profiled():
    controller = SLOController("auto", cost_model(30.0, 3.0, draft_ms=4.0), 512)
    controller.predictor = controller.policy.predictor = confident_predictor(0.6)
    step = step_view(4, depth=2)
    assert all(b.depth > 0 for b in controller.plan(step))
    for _ in range(60):  # each of the two draft levels takes 16 ms instead of 4
        controller.observe_draft([4, 4], context=100, seconds=0.032)
    assert all(b.depth == 0 for b in controller.plan(step_view(4, depth=2)))


def test_auto_paces_prompts_to_keep_decoding_requests_on_their_slo():
    """A step costs 30 ms + 1 ms a token. A request 40 ms from falling behind its 100 ms TPOT SLO
    (10.6 tokens due at 1.06 s, 10 done) can take an iteration of up to 40 ms: 9 prompt tokens
    beside its own. One far ahead of it, or without an SLO, still takes no more than 1.5 times
    the 31 ms iteration without prompts: 15 tokens. A prompt that cannot wait may take all the
    first one's slack too (9 tokens), and a whole step beside the others (512: the one ahead
    is 600 ms from its floor). Behind its SLO there is nothing to keep."""
    auto = policy("auto", cost_model(30.0, 1.0), AcceptancePredictor(prior_rate=0.05))  # never speculates
    near = replace(step_view(1, slo_ms=100).requests[0], decode_time_s=1.06, num_decoded=10)
    step = StepView([near])
    budgets = auto.draft_budgets(step)
    assert [b.depth for b in budgets] == [0]
    pacing = auto.prefill_pacing(step, budgets)
    assert (pacing.tokens, pacing.max_tokens) == (9, 9) and pacing.decode_s == pytest.approx(0.031)
    for request in (replace(near, decode_time_s=0.5), step_view(1).requests[0]):
        ahead = StepView([request])
        pacing = auto.prefill_pacing(ahead, auto.draft_budgets(ahead))
        assert (pacing.tokens, pacing.max_tokens) == (15, 512)
    behind = StepView([replace(near, decode_time_s=1.2)])
    assert auto.prefill_pacing(behind, auto.draft_budgets(behind)) is None
    for name in sorted(set(POLICIES) - {"auto"}):
        assert policy(name, cost_model(30.0, 1.0)).prefill_pacing(step, budgets) is None


def prompt_cap(controller: SLOController, step: StepView, scheduler: Scheduler) -> PromptCap | None:
    """The controller's cap at 10 s beside ``step`` (with the queue of ``scheduler``), nothing drafted."""
    queued = replace(step, queued_prompt_tokens=scheduler.queued_prompt_tokens)
    return controller.prompt_cap(queued, [TreeBudget(depth=0)] * len(step.requests), 10.0, scheduler)


def test_only_a_policy_that_reads_the_prompt_queue_has_it_counted():
    from specserve.control.simulator import SimRequest

    scheduler = Scheduler(num_slots=4, max_num_batched_tokens=512)
    scheduler.add(SimRequest("waiting", 300, 4, SLO(ttft_ms=1000), arrival_s=0.0))
    counted = {name: SLOController(name, cost_model(30.0, 1.0), 512).decode_step([], scheduler).queued_prompt_tokens
               for name in POLICIES}
    assert counted == {name: 300 if name == "auto" else 0 for name in POLICIES}


def test_a_prompt_waits_only_while_its_ttft_deadline_leaves_a_margin_over_the_queues_prefill():
    """Prefilling 100 tokens is predicted at 130 ms and a decode-only iteration at 31 ms: a prompt
    may wait while its deadline is more than 2 x 161 ms away. With 700 tokens queued (two steps
    of 512: 2 x (730 + 62) ms), it must start however far its deadline seems."""
    from specserve.control.simulator import SimRequest

    controller = SLOController("auto", cost_model(30.0, 1.0), 512)
    step = step_view(1, slo_ms=100)
    scheduler = Scheduler(num_slots=4, max_num_batched_tokens=512)
    assert prompt_cap(controller, step, scheduler) is None  # no prompt
    scheduler.add(SimRequest("first", 100, 4, SLO(ttft_ms=1000), arrival_s=10.0))
    assert prompt_cap(controller, step, scheduler).waits_if_due_after == (
        pytest.approx(10.322))
    scheduler.add(SimRequest("second", 600, 4, SLO(ttft_ms=1000), arrival_s=10.0))
    assert prompt_cap(controller, step, scheduler).waits_if_due_after == (
        pytest.approx(11.584))


def test_auto_predicts_when_the_decoding_requests_will_have_emitted_every_token_they_may():
    """Without speculation each 32 ms iteration of two requests yields one token each: 5 tokens
    left take 160 ms (the request with more left decides), and without a bound there is no end."""
    auto = policy("auto", cost_model(30.0, 1.0), AcceptancePredictor(prior_rate=0.05))
    for left, finish_s in [((5, 2), 0.16), ((5, math.inf), math.inf)]:
        step = StepView([replace(r, remaining_tokens=n) for r, n in zip(step_view(2).requests, left)])
        pacing = auto.prefill_pacing(step, auto.draft_budgets(step))
        assert pacing.finish_s == pytest.approx(finish_s)


def test_a_prompt_waits_for_the_decoding_requests_when_paced_chunks_could_not_prefill_it_before_they_finish():
    """One request without an SLO decodes 10 more tokens, 31 ms each, beside up to 15 prompt
    tokens: 150 prompt tokens fit in its last 10 iterations. A 100-token prompt is chunked as
    usual; with 600 tokens queued (waits while due after 10 + 2 x (630 + 2 x 31) ms), a prompt
    due after that plus the 310 ms the request needs to finish takes no tokens until it is done."""
    from specserve.control.simulator import SimRequest

    controller = SLOController("auto", cost_model(30.0, 1.0), 512)
    controller.predictor = controller.policy.predictor = AcceptancePredictor(prior_rate=0.05)
    step = StepView([replace(step_view(1).requests[0], remaining_tokens=10)])
    scheduler = Scheduler(num_slots=4, max_num_batched_tokens=512)
    scheduler.add(SimRequest("small", 100, 4, SLO(ttft_ms=60_000), arrival_s=10.0))
    cap = prompt_cap(controller, step, scheduler)
    assert cap.tokens == 15 and cap.holds_if_due_after == math.inf
    scheduler.add(SimRequest("large", 500, 4, SLO(ttft_ms=60_000), arrival_s=10.0))
    cap = prompt_cap(controller, step, scheduler)
    assert cap.waits_if_due_after == pytest.approx(11.384)
    assert cap.holds_if_due_after == pytest.approx(11.694)
    unbounded = StepView([replace(step.requests[0], remaining_tokens=math.inf)])
    assert prompt_cap(controller, unbounded, scheduler).holds_if_due_after == math.inf


def patient_and_urgent():
    """A scheduler holding a batch-class prompt of 300 tokens and an interactive one of 200."""
    from specserve.control.simulator import SimRequest

    slo = SLOConfig().classes
    patient = SimRequest("patient", 300, 4, slo["batch"], arrival_s=0.0)
    urgent = SimRequest("urgent", 200, 4, slo["interactive"], arrival_s=0.0)
    scheduler = Scheduler(num_slots=4, max_num_batched_tokens=512)
    for request in (patient, urgent):
        scheduler.add(request)
    return scheduler, patient, urgent


def test_a_prompt_cap_chunks_the_prompts_that_can_wait_and_without_max_tokens_never_the_urgent_ones():
    scheduler, patient, urgent = patient_and_urgent()
    assert scheduler.queued_prompt_tokens == 500
    cap = PromptCap(0, waits_if_due_after=10.0)  # the patient one is due after 30 s, the urgent one in 1.5
    assert [(i.request.request_id, i.num_new_tokens) for i in scheduler.schedule({}, cap)] == [("urgent", 200)]
    assert scheduler.waiting == [patient]  # left out, it keeps its place
    urgent.num_computed_tokens = 200
    assert scheduler.queued_prompt_tokens == 300
    for done in (0, 50):
        patient.num_computed_tokens = done
        chunks = scheduler.schedule({}, replace(cap, tokens=50))
        assert [(i.request.request_id, i.num_new_tokens) for i in chunks] == [("patient", 50)]
    assert scheduler.queued_prompt_tokens == 250


def test_a_prompt_cap_chunks_urgent_prompts_too_to_what_keeps_the_decoding_requests_on_track():
    scheduler, patient, urgent = patient_and_urgent()
    cap = PromptCap(50, waits_if_due_after=10.0, max_tokens=120)  # the patient one takes its paced 50 besides
    chunks = scheduler.schedule({}, cap)
    assert [(i.request.request_id, i.num_new_tokens) for i in chunks] == [("urgent", 120), ("patient", 50)]
    urgent.num_computed_tokens, patient.num_computed_tokens = 120, 50
    chunks = scheduler.schedule({}, replace(cap, tokens=0))
    assert [(i.request.request_id, i.num_new_tokens) for i in chunks] == [("urgent", 80)]


def test_a_request_that_can_no_longer_make_its_ttft_waits_behind_those_that_can():
    """Earliest deadline first alone would serve the late request first and make the other late
    too. Demoted, it is served best effort after the others (under a cap, as a prompt that
    cannot wait: within what the step leaves)."""
    from specserve.control.simulator import SimRequest

    slo = SLOConfig().classes
    late = SimRequest("late", 300, 4, slo["interactive"], arrival_s=0.0)  # due at 1.5 s
    other = SimRequest("other", 200, 4, slo["chat"], arrival_s=0.5)  # due at 4.5 s
    scheduler = Scheduler(num_slots=4, max_num_batched_tokens=512)
    for request in (late, other):
        scheduler.add(request)
    assert scheduler.waiting == [late, other]
    scheduler.demote_hopeless(now=1.2, prefill_s=lambda r: 0.2)  # its first token could still come at 1.4 s
    assert scheduler.waiting == [late, other]
    scheduler.demote_hopeless(now=1.4, prefill_s=lambda r: 0.2)  # no longer
    assert (scheduler.waiting, scheduler.late) == ([other], [late])
    assert scheduler.queued_prompt_tokens == 200 and scheduler.has_prompts and scheduler.num_unfinished == 2
    without_cap = Scheduler(num_slots=4, max_num_batched_tokens=512)
    without_cap.add(replace(late))
    without_cap.add(replace(other))
    without_cap.demote_hopeless(now=1.4, prefill_s=lambda r: 0.2)
    assert [(i.request.request_id, i.num_new_tokens) for i in without_cap.schedule()] == [("other", 200), ("late", 300)]
    cap = PromptCap(0, waits_if_due_after=10.0, max_tokens=250)  # both deadlines are near: neither can wait
    chunks = scheduler.schedule({}, cap)
    assert [(i.request.request_id, i.num_new_tokens) for i in chunks] == [("other", 200), ("late", 50)]
    scheduler.remove(late)
    assert scheduler.running == [other] and scheduler.num_unfinished == 1


def test_a_prompt_cap_holds_the_prompts_that_can_wait_longest_and_chunks_the_others():
    from specserve.control.simulator import SimRequest

    slo = SLOConfig().classes
    held = SimRequest("held", 300, 4, slo["batch"], arrival_s=0.0)  # due at 30 s
    paced = SimRequest("paced", 300, 4, slo["chat"], arrival_s=10.0)  # due at 14 s
    urgent = SimRequest("urgent", 200, 4, slo["interactive"], arrival_s=0.0)  # due at 1.5 s
    scheduler = Scheduler(num_slots=4, max_num_batched_tokens=512)
    for request in (held, paced, urgent):
        scheduler.add(request)
    cap = PromptCap(50, waits_if_due_after=10.0, holds_if_due_after=20.0)
    chunks = scheduler.schedule({}, cap)
    assert [(i.request.request_id, i.num_new_tokens) for i in chunks] == [("urgent", 200), ("paced", 50)]
    assert scheduler.waiting == [held]
    urgent.num_computed_tokens, paced.num_computed_tokens = 200, 50
    chunks = scheduler.schedule({}, replace(cap, holds_if_due_after=40.0))
    assert [(i.request.request_id, i.num_new_tokens) for i in chunks] == [("paced", 50)]  # the cap is shared


def test_pacing_prompts_lets_a_request_meet_its_tpot_slo_that_a_burst_of_prompts_would_break():
    """A chat request decodes on a 30 ms TPOT SLO (a step costs 20 ms + 0.5 ms a token) when four
    batch requests arrive with 400-token prompts and a minute to their first token. Prefilling
    them at once costs the chat request its SLO; auto (which does not speculate here) paces them
    into its slack, and still serves every one in time."""
    from specserve.control.simulator import AcceptanceModel, SimConfig, SimRequest, Simulator

    def requests():
        chat = SimRequest("chat", 10, 40, SLO(tpot_ms=30, ttft_ms=1000), arrival_s=0.0)
        batch = [SimRequest(f"b{i}", 400, 2, SLO(ttft_ms=60_000), arrival_s=0.1) for i in range(4)]
        return [chat, *batch]

    attained = {}
    for name in ("none", "auto"):
        simulator = Simulator(SimConfig(policy=name), cost_model(20.0, 0.5), AcceptanceModel(mean_confidence=0.02))
        outcomes, _ = simulator.run(requests(), progress=False)
        attained[name] = [o.attained for o in outcomes]
        assert summarize(outcomes, 1.0)["mat"] == 1.0
    assert attained == {"none": [False] + [True] * 4, "auto": [True] * 5}


def test_a_long_prompt_that_can_wait_starts_after_the_decoding_request_it_would_slow_has_finished():
    """A 1,500-token batch prompt arrives while a chat request has 20 tokens to go (a step costs
    20 ms + 0.5 ms a token; paced chunks could not prefill it in that time): auto starts it once
    the chat request is done; none at once, which costs the chat request its SLO."""
    from specserve.control.simulator import AcceptanceModel, SimConfig, SimRequest, Simulator

    for name, attained in [("none", [False, True]), ("auto", [True, True])]:
        chat = SimRequest("chat", 10, 20, SLO(tpot_ms=30, ttft_ms=1000), arrival_s=0.0)
        batch = SimRequest("batch", 1500, 2, SLO(ttft_ms=60_000), arrival_s=0.05)
        simulator = Simulator(SimConfig(policy=name), cost_model(20.0, 0.5), AcceptanceModel(mean_confidence=0.02))
        outcomes, _ = simulator.run([chat, batch], progress=False)
        assert [o.attained for o in outcomes] == attained
        assert (batch.token_times[0] > chat.token_times[-1]) == (name == "auto")


@pytest.mark.parametrize("prompt_trees", [True, False])
def test_the_simulated_draft_drafts_below_or_reads_an_idle_steps_prompt_and_otherwise_catches_up(
    monkeypatch, prompt_trees
):
    """As the engine's draft: a prompt prefilled while nothing decodes is fed to the draft in
    that step (its cost in the TTFT): by the first level of the tree drafted below it, or, when
    the controller plans it none, by a read, so that its first tree feeds only the root. A
    prompt prefilled beside a decoding request is fed whole by the request's first draft level."""
    from specserve.control.simulator import AcceptanceModel, SimConfig, SimRequest, Simulator

    tokens = [1, 8, 64, 512]
    cost = CostModel(
        model="hand-built", device="cpu",
        target=LatencyTable(tokens=tokens, contexts=[0], ms=[[20.0 + 0.5 * t for t in tokens]]),
        draft=LatencyTable(tokens=tokens, contexts=[0], ms=[[1.0 + 0.1 * t for t in tokens]]),
    )
    fed: dict[str, list[int]] = {}
    catch_up = Simulator._catch_up

    def recorded(request: SimRequest) -> int:
        fed.setdefault(request.request_id, []).append(catch_up(request))
        return fed[request.request_id][-1]

    monkeypatch.setattr(Simulator, "_catch_up", staticmethod(recorded))
    if not prompt_trees:
        monkeypatch.setattr(SLOController, "plan_prompts", lambda *args: {})
    idle = SimRequest("idle", 500, 40, SLO(), arrival_s=0.0)
    beside = SimRequest("beside", 300, 40, SLO(), arrival_s=0.4)  # while the first one decodes
    Simulator(SimConfig(policy="fixed"), cost, AcceptanceModel()).run([idle, beside], progress=False)
    if prompt_trees:  # the 8 best of a 4-deep, 2-wide tree: levels feeding the prompt, then 2 nodes each
        assert idle.token_times[0] == pytest.approx((20.0 + 0.5 * 508 + 1.0 + 0.1 * 500 + 3 * 1.2) / 1e3)
        assert fed["idle"][0] == 500
    else:
        assert idle.token_times[0] == pytest.approx((20.0 + 0.5 * 500 + 1.0 + 0.1 * 500) / 1e3)
        assert fed["idle"][0] == 1  # the root
    assert fed["beside"][0] == 301  # the prompt and the root
    assert set(fed["idle"][1:] + fed["beside"][1:]) == {1}  # then the bonus token of each step


@pytest.mark.parametrize("name", ["none", "fixed", "auto"])
def test_a_short_answer_prefilled_while_nothing_decodes_comes_whole_with_its_first_token(name):
    """In simulation: a two-token answer's only decode step could never speculate (no room for
    a node beside the bonus token), but the tree drafted below its prompt is verified by the
    prefill forward, so both tokens come at once where the policy speculates."""
    from specserve.control.simulator import AcceptanceModel, SimConfig, SimRequest, Simulator

    sure = AcceptanceModel(mean_confidence=0.999, concentration=1000.0)
    simulator = Simulator(SimConfig(policy=name), cost_model(20.0, 0.5), sure)
    short = SimRequest("short", 200, 2, SLO(ttft_ms=5_000, tpot_ms=100), arrival_s=0.0)
    simulator.run([short], progress=False)
    assert short.num_output == 2
    assert (short.token_times[0] == short.token_times[1]) == (name != "none")


def test_prompt_trees_are_planned_only_in_steps_where_nothing_else_decodes():
    """The controller plans trees below the prompts a step completes only where the draft reads
    them anyway (nothing decodes, a policy that speculates), without a TPOT floor, and the
    scheduler gives them the room the step's token budget leaves."""
    from specserve.control.simulator import SimRequest

    def step(policy: str, decoding: bool, budget: int = 64) -> tuple[dict[str, RequestView], list[ScheduledRequest]]:
        controller = SLOController(policy, cost_model(20.0, 0.5), budget)
        scheduler = Scheduler(4, budget)
        prompt = SimRequest("prompt", 40, 10, SLO(tpot_ms=50), arrival_s=0.0)
        scheduled = [ScheduledRequest(prompt, 40)]
        if decoding:
            other = SimRequest("other", 40, 10, SLO(), arrival_s=0.0, num_output=1, num_computed_tokens=40)
            scheduled.append(ScheduledRequest(other, 1))

        def view(request: SimRequest) -> RequestView:
            return RequestView.of(request.request_id, request.num_tokens, TreeBudget(depth=4), request.slo,
                                  None, request.num_output, 1.0)

        return controller.plan_prompts(scheduled, view, scheduler), scheduled

    views, scheduled = step("fixed", decoding=False)
    assert list(views) == ["prompt"] and views["prompt"].tpot_slo_s is None
    assert scheduled[0].draft_budget == TreeBudget(depth=4)
    views, scheduled = step("fixed", decoding=False, budget=42)  # room for 2 nodes beside the prompt
    assert scheduled[0].draft_budget.node_limit == 2
    for policy, decoding in [("none", False), ("fixed", True)]:
        views, scheduled = step(policy, decoding)
        assert views == {} and scheduled[0].draft_budget is None


def test_waiting_requests_are_admitted_earliest_ttft_deadline_first(tiny_model):
    engine = LLMEngine(EngineConfig(model=str(tiny_model), max_num_seqs=1, max_model_len=256))
    slow = SamplingParams(max_tokens=2, temperature=0.0, slo_class="batch")
    urgent = SamplingParams(max_tokens=2, temperature=0.0, slo_class="interactive")
    engine.add_request(engine.make_request("first", "hello", slow))
    order = [o.request_id for o in engine.step() if o.finished]  # "first" takes the only slot
    for request_id, params in [("batch", slow), ("interactive", urgent)]:
        engine.add_request(engine.make_request(request_id, "hello", params))
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["first", "interactive", "batch"]


def test_hopeless_requests_are_rejected_with_a_reason_when_configured(tiny_model):
    engine = LLMEngine(EngineConfig(
        model=str(tiny_model), max_num_seqs=1, max_model_len=256,
        control=ControlConfig(slo=SLOConfig(on_miss="reject")),
    ))
    engine.add_request(engine.make_request("ok", "hello", GREEDY))
    finals = {o.request_id: o for o in engine.step() if o.finished}  # "ok" takes the only slot
    engine.add_request(engine.make_request("late", "hello", SamplingParams(max_tokens=4, ttft_slo_ms=1.0)))
    time.sleep(0.01)
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert finals["late"].output.finish_reason is FinishReason.REJECTED
    assert "TTFT SLO of 1 ms" in finals["late"].error
    assert len(finals["ok"].output.token_ids) == GREEDY.max_tokens
    assert_all_slots_free(engine)


def test_hopeless_requests_are_served_after_the_others_by_default(tiny_model):
    """Best effort: a waiting request that can no longer make its TTFT SLO still gets its whole
    answer, but after a request that arrived later and can still make its own."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model), max_num_seqs=1, max_model_len=256))
    engine.add_request(engine.make_request("first", "hello", GREEDY))
    order = [o.request_id for o in engine.step() if o.finished]  # "first" takes the only slot
    engine.add_request(engine.make_request("late", "hello", GREEDY.model_copy(update={"ttft_slo_ms": 1.0})))
    engine.add_request(engine.make_request("on time", "hello", GREEDY.model_copy(update={"ttft_slo_ms": 60_000.0})))
    time.sleep(0.01)
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                order.append(output.request_id)
                finals[output.request_id] = output
    assert order == ["first", "on time", "late"]
    assert len(finals["late"].output.token_ids) == GREEDY.max_tokens
    assert_all_slots_free(engine)


def test_unknown_slo_class_is_a_clear_error(tiny_engine):
    with pytest.raises(ValueError, match="unknown SLO class"):
        tiny_engine.make_request("x", "hello", SamplingParams(slo_class="platinum"))


# ----------------------------------------------------------------- simulator


def sim_requests(n: int = 30):
    from specserve.control.simulator import SimRequest

    slo = SLOConfig().classes
    names = ["interactive", "chat", "batch"]
    return [SimRequest(f"r{i}", 20 + 7 * i % 50, 10 + 3 * i % 20, slo[names[i % 3]], 0.05 * i) for i in range(n)]


def test_simulator_rejects_like_the_engine_when_configured():
    """Under overload, on_miss='reject' drops the waiting requests that can no longer make their
    TTFT (as the engine does) so the ones it serves start sooner."""
    from specserve.control.simulator import AcceptanceModel, SimConfig, Simulator

    overload = [replace(r, arrival_s=0.005 * i) for i, r in enumerate(sim_requests(60))]
    runs = {}
    for on_miss in ("best_effort", "reject"):
        simulator = Simulator(SimConfig(policy="none", max_num_seqs=4, on_miss=on_miss), DEAR_VERIFY, AcceptanceModel())
        runs[on_miss], _ = simulator.run([replace(r) for r in overload], progress=False)
    assert not any(o.rejected for o in runs["best_effort"])
    rejected = [o for o in runs["reject"] if o.rejected]
    assert rejected and all(o.output_tokens == 0 and not o.attained for o in rejected)
    served = [o for o in runs["reject"] if not o.rejected]
    assert served and all(o.output_tokens > 0 for o in served)
    late = [o for o in runs["best_effort"] if o.ttft_s * 1e3 > o.slo.ttft_ms]
    assert len(late) > sum(o.ttft_s * 1e3 > o.slo.ttft_ms for o in served)


def test_the_synthetic_drafter_is_calibrated():
    from specserve.control.simulator import AcceptanceModel

    model, rng = AcceptanceModel(mean_confidence=0.6), random.Random(0)
    predicted = accepted = 0.0
    for _ in range(3000):
        (tree,), _ = model.draft(rng, [TreeBudget(depth=1, width=2)], lambda depth, trees: True)
        predicted += sum(tree.path_probs)
        accepted += len(model.verify(rng, tree))
    assert accepted / predicted == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_simulator_is_deterministic_and_serves_every_request(name):
    from specserve.control.simulator import AcceptanceModel, SimConfig, Simulator

    def simulate():
        simulator = Simulator(SimConfig(policy=name, max_num_seqs=8), CHEAP_VERIFY, AcceptanceModel())
        outcomes, span = simulator.run(sim_requests(), progress=False)
        return summarize(outcomes, span), outcomes

    (first, outcomes), (second, _) = simulate(), simulate()
    assert first == second
    assert [o.output_tokens for o in outcomes] == [r.max_tokens for r in sim_requests()]
    assert (first["mat"] == 1.0) == (name == "none")

"""The draft model on its own Ray actor: same output as co-located, and survives the actor's death."""

from __future__ import annotations

import asyncio
import time

import psutil
import pytest

from specserve.config import ControlConfig, EngineConfig, SpeculativeConfig
from specserve.engine.async_engine import AsyncLLMEngine
from specserve.engine.sampling_params import SamplingParams
from specserve.llm import LLM
from specserve.spec.draft_model import ModelDrafter
from specserve.spec.drafter import DraftRequest
from specserve.spec.remote_drafter import RemoteDrafter
from specserve.spec.tree import TreeBudget
from tiny_models import PROMPTS, build_tiny_eagle, build_tiny_model

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _spec(path: str, placement: str, draft: str | None = None) -> SpeculativeConfig:
    """The target drafting for itself, unless another ``draft`` is given."""
    return SpeculativeConfig(draft_model=draft or path, budget=TreeBudget(depth=3, width=2), draft_placement=placement,
                             draft_num_cpus=0)


def _llm(path: str, placement: str, control: ControlConfig = ControlConfig(policy="fixed"), draft: str | None = None) -> LLM:
    return LLM(path, max_num_seqs=4, speculative=_spec(path, placement, draft), control=control)


PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _run(llm: LLM) -> tuple[list[list[int]], tuple[int, int]]:
    """Greedy outputs of the prompts and the drafted/accepted totals."""
    try:
        outputs = [o.output.token_ids for o in llm.generate(PROMPTS, PARAMS)]
        stats = llm.engine.spec_stats
        return outputs, (stats.drafted, stats.accepted)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("kind", ["model", "eagle"])
def test_draft_actor_gives_the_colocated_output(tmp_path, local_ray, kind):
    """For an EAGLE head the target's features travel to the actor with each step."""
    path = build_tiny_model(tmp_path / "target")
    draft = str(build_tiny_eagle(tmp_path / "eagle", path, repeat=True)) if kind == "eagle" else None
    colocated, colocated_stats = _run(_llm(str(path), "colocated", draft=draft))
    actor, actor_stats = _run(_llm(str(path), "actor", draft=draft))
    assert colocated_stats[1] > 0
    assert actor == colocated
    assert actor_stats == colocated_stats  # the same trees were drafted


def test_draft_actor_asks_the_drafting_rule_after_each_level(tmp_path, local_ray):
    """The rule travels with the step's call and the actor stops where it says, as the engine's
    own drafter does."""
    path = build_tiny_model(tmp_path)
    config = EngineConfig(model=str(path), max_num_seqs=2, max_model_len=128)
    requests = [DraftRequest("a", 0, [1, 5, 9, 12], TreeBudget(depth=3)),
                DraftRequest("b", 1, [3, 4], TreeBudget(depth=3))]
    stop_after_one_level = lambda depth, trees: depth < 1  # noqa: E731 (pickled by value)
    remote = RemoteDrafter(path, config, target_vocab=384, max_len=128, num_cpus=0)
    local = ModelDrafter(path, config, target_vocab=384, max_len=128)
    for drafter in (local, remote):
        trees = drafter.propose(requests, stop_after_one_level)
        assert [max(t.depths) for t in trees] == [1, 1]
        for r in requests:
            drafter.release(r.request_id)
        assert [max(t.depths) for t in drafter.propose(requests)] == [3, 3]


def test_the_catch_up_of_a_draft_actor_is_known_without_asking_it(tmp_path, local_ray):
    """The engine-side drafter mirrors the actor's cache: what it will feed before drafting,
    also after the actor read a prompt."""
    path = build_tiny_model(tmp_path)
    config = EngineConfig(model=str(path), max_num_seqs=2, max_model_len=128)
    remote = RemoteDrafter(path, config, target_vocab=384, max_len=128, num_cpus=0)
    local = ModelDrafter(path, config, target_vocab=384, max_len=128)
    tokens = [1, 5, 9, 12]
    for drafter in (local, remote):
        assert drafter.pending("a", len(tokens)) == 4  # nothing cached: the whole sequence
        tree = drafter.propose([DraftRequest("a", 0, tokens, TreeBudget(depth=2))])[0]
        drafter.accept("a", [tree.tokens[0]])  # a depth-1 node, fed to grow level 2
    assert local.pending("a", len(tokens) + 2) == remote.pending("a", len(tokens) + 2) == 1  # the bonus token
    remote.release("a")
    assert remote.pending("a", 10) == 10
    for drafter in (local, remote):  # a prompt read in its prefill step, sent to the actor without waiting
        drafter.read([DraftRequest("b", 1, tokens, TreeBudget(depth=0))])
        assert drafter.pending("b", len(tokens) + 1) == 1
    trees = [d.propose([DraftRequest("b", 1, tokens + [3], TreeBudget(depth=2))])[0] for d in (local, remote)]
    assert trees[0].tokens == trees[1].tokens and local.forwards == remote.forwards == [1, 1]


def test_killed_draft_actor_loses_no_request_and_is_restarted(tmp_path, local_ray):
    path = str(build_tiny_model(tmp_path))
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    plain = LLM(path, max_num_seqs=4)
    llm = _llm(path, "actor")
    try:
        expected = [o.output.token_ids for o in plain.generate(PROMPTS, params)]
        engine = llm.engine
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(engine.make_request(f"r{i}", prompt, params))
        finals, steps = {}, 0
        while engine.has_unfinished_requests():
            steps += 1
            if steps == 4:
                ray.kill(engine.drafter.actor)
            for output in engine.step():
                if output.finished:
                    finals[output.request_id] = output
        assert [finals[f"r{i}"].output.token_ids for i in range(len(PROMPTS))] == expected
        assert all(o.error is None for o in finals.values())
        assert engine.drafter.restarts == 1
        accepted_before = engine.spec_stats.accepted
        llm.generate(PROMPTS[:1], params)  # the new actor drafts again
        assert engine.spec_stats.accepted > accepted_before
    finally:
        plain.shutdown()
        llm.shutdown()


def test_a_draft_actor_is_profiled_on_the_actor(tmp_path, local_ray):
    """The cost model of an engine whose draft runs on an actor has a draft table, and the
    profile cache key names the draft model as for a co-located one."""
    path = build_tiny_model(tmp_path / "target")
    draft = build_tiny_model(tmp_path / "draft", num_hidden_layers=1, seed=1)
    llm = _llm(str(path), "actor", draft=str(draft))
    colocated = _llm(str(path), "colocated", draft=str(draft))
    try:
        cost = llm.engine.profile(quick=True)
        assert cost.draft is not None and cost.draft.tokens == cost.target.tokens
        assert all(ms > 0 for row in cost.draft.ms for ms in row)
        assert llm.engine.profile_path() == colocated.engine.profile_path()
    finally:
        llm.shutdown()
        colocated.shutdown()


def _draft_actor_pids() -> set[int]:
    # Ray titles an actor's process "ray::<class>[.<method>]".
    return {p.pid for p in psutil.process_iter(["cmdline"])
            if any(part.startswith("ray::DraftWorker") for part in p.info["cmdline"] or ())}


def _ray_clusters() -> int:
    return sum(p.info["name"] == "gcs_server" for p in psutil.process_iter(["name"]))


def test_an_engine_process_starts_its_draft_actor_on_the_callers_ray_and_takes_it_along(tmp_path, local_ray):
    """How a Serve replica runs an engine whose draft is an actor: the engine's own process joins
    the caller's Ray cluster, drafts there as a co-located draft does, and its actor ends with it."""
    path = str(build_tiny_model(tmp_path))
    colocated, colocated_stats = _run(_llm(path, "colocated"))
    before = _draft_actor_pids()
    config = EngineConfig(model=path, max_num_seqs=4, speculative=_spec(path, "actor"),
                          control=ControlConfig(policy="fixed"))
    engine = AsyncLLMEngine(config, own_process=True, torch_threads=1)
    try:
        async def final(prompt):
            return [o async for o in engine.generate(prompt, PARAMS)][-1].output.token_ids
        async def run_all():
            return await asyncio.gather(*(final(p) for p in PROMPTS))
        assert asyncio.run(asyncio.wait_for(run_all(), 120)) == colocated
        # How much is drafted follows the arrivals (a prompt prefilled while nothing else
        # decodes drafts in its prefill step), which differ from the colocated batch's.
        stats = engine.spec_stats()
        assert stats.accepted > 0 and colocated_stats[1] > 0
        started = _draft_actor_pids() - before
        assert len(started) == 1 and _ray_clusters() == 1  # the caller's, no second one
    finally:
        engine.shutdown()
    deadline = time.monotonic() + 60
    while started & _draft_actor_pids() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not started & _draft_actor_pids()

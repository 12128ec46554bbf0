"""The draft model on its own Ray actor: same output as co-located, and survives the actor's death."""

from __future__ import annotations

import pytest

from specserve.config import ControlConfig, SpeculativeConfig
from specserve.engine.sampling_params import SamplingParams
from specserve.llm import LLM
from specserve.spec.tree import TreeBudget
from tiny_models import PROMPTS, build_tiny_model

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _llm(path: str, placement: str) -> LLM:
    spec = SpeculativeConfig(draft_model=path, budget=TreeBudget(depth=3, width=2), draft_placement=placement,
                             draft_num_cpus=0)
    return LLM(path, max_num_seqs=4, speculative=spec, control=ControlConfig(policy="fixed"))


def test_draft_actor_gives_the_colocated_output(tmp_path, local_ray):
    path = str(build_tiny_model(tmp_path))
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outputs = {}
    for placement in ("colocated", "actor"):
        llm = _llm(path, placement)
        try:
            outputs[placement] = [o.output.token_ids for o in llm.generate(PROMPTS, params)]
            stats = llm.engine.spec_stats
            assert stats.accepted > 0
            outputs[placement + "-stats"] = (stats.drafted, stats.accepted)
        finally:
            llm.shutdown()
    assert outputs["actor"] == outputs["colocated"]
    assert outputs["actor-stats"] == outputs["colocated-stats"]  # the same trees were drafted


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

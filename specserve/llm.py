"""The small offline Python API: ``LLM(...).generate(prompts)`` and ``.chat(messages)``."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from specserve.config import EngineConfig
from specserve.engine.llm_engine import LLMEngine, Prompt
from specserve.engine.request import RequestOutput
from specserve.engine.sampling_params import SamplingParams

Messages = list[dict[str, str]]


class LLM:
    """Batch generation on an in-process engine.

    >>> llm = LLM()  # the embedded default model
    >>> llm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0))
    """

    def __init__(self, model: str | None = None, **engine_options) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (all batched together); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        all_params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(all_params) != len(prompts):
            raise ValueError("give one SamplingParams or one per prompt")
        # Validate everything before anything runs, so a bad prompt fails the call cleanly.
        requests = [
            self.engine.make_request(f"offline-{i}", prompt, p.model_copy(update={"output_kind": "final_only"}))
            for i, (prompt, p) in enumerate(zip(prompts, all_params))
        ]
        for request in requests:
            self.engine.add_request(request)
        finals: dict[str, RequestOutput] = {}
        with tqdm(total=len(requests), desc="generate", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finals[output.request_id] = output
                        bar.update(1)
        ordered = [finals[r.request_id] for r in requests]
        failed = [o.error for o in ordered if o.error]
        if failed:
            raise RuntimeError(failed[0])
        return ordered

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        params: SamplingParams | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate replies to conversations, formatted with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.engine.apply_chat_template(list(c)) for c in conversations]
        return self.generate(prompts, params, use_tqdm)

    def shutdown(self) -> None:
        self.engine.shutdown()

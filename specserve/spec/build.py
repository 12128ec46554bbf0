"""Build the drafter an engine's speculative config asks for."""

from __future__ import annotations

from pathlib import Path

from specserve.config import EngineConfig, SpeculativeConfig
from specserve.models.default_model import default_draft_dir
from specserve.models.loader import ModelFiles
from specserve.spec.draft_model import ModelDrafter
from specserve.spec.drafter import Drafter
from specserve.spec.hybrid import HybridDrafter
from specserve.spec.ngram import NgramDrafter
from specserve.spec.remote_drafter import RemoteDrafter


def build_drafter(config: EngineConfig, target_vocab: int, max_len: int) -> Drafter:
    spec: SpeculativeConfig = config.speculative
    if spec.method == "ngram":
        return NgramDrafter(spec.ngram_min, spec.ngram_max)
    path = Path(ModelFiles.check(spec.draft_model or default_draft_dir(), tokenizer=False).path)
    if spec.draft_placement == "actor":
        model: Drafter = RemoteDrafter(path, config, target_vocab, max_len, spec.draft_num_cpus, spec.draft_num_gpus)
    else:
        model = ModelDrafter(path, config, target_vocab, max_len)
    return HybridDrafter(model, NgramDrafter(spec.ngram_min, spec.ngram_max)) if spec.method == "hybrid" else model

"""One point of a toxicity/fluency trade-off: sample the prompts, judge them, score the perplexities.

Shared by the ProFS selection (`vsteer profs-sweep`, on validation prompts) and the trade-off curves of
`vsteer compare` (on its test prompts), so both measure a setting the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vsteer_hf.eval.prompts import PromptRecord
from vsteer_hf.eval.runner import GenerationSettings, generate_method, summarize
from vsteer_hf.eval.stats import Estimate


@dataclass
class TradeoffPoint:
    """A setting's toxic rate and mean toxicity (95% intervals over prompts), the perplexity of its
    generations under `ppl_model` when given, and the reference text's perplexity under the model."""

    label: str
    setting: dict[str, Any]
    n: int
    toxic_rate: Estimate
    toxicity_mean: Estimate
    reference_perplexity: float | None = None
    perplexity: Estimate | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    flags: list[float] | None = field(default=None, repr=False, compare=False)  # toxic (1) or not, per generation
    groups: list[str] | None = field(default=None, repr=False, compare=False)  # the prompt id of each

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "setting": self.setting,
            "n": self.n,
            "toxic_rate": self.toxic_rate.as_dict(),
            "toxicity_mean": self.toxicity_mean.as_dict(),
            "reference_perplexity": self.reference_perplexity,
            "perplexity": self.perplexity.as_dict() if self.perplexity is not None else None,
            **self.extra,
        }


def reference_slice(tokenizer: Any, text: str, start: int, count: int) -> list[int]:
    """Tokens [start, start + count) of `text`: `vsteer compare` reports the first tokens, so a
    selection that must not look at them scores the ones after."""
    from vsteer_hf.eval.reference_text import reference_token_ids

    ids = reference_token_ids(tokenizer, text, start + count)[start:]
    if len(ids) < 2:
        raise ValueError(
            f"the reference text has fewer than {start + 2} tokens; give a longer --reference-text or a smaller offset."
        )
    return ids


def measure_point(
    label: str,
    setting: dict[str, Any],
    model: Any,
    tokenizer: Any,
    prompts: list[PromptRecord],
    settings: GenerationSettings,
    judge: Any,
    judge_threshold: float = 0.5,
    reference_ids: list[int] | None = None,
    steer: Any = None,
    ppl_model: Any = None,
    progress: bool = False,
) -> TradeoffPoint:
    """Generate `prompts` with `model` (steered by `steer` if given) and measure the point."""
    from vsteer_hf.eval.perplexity import text_perplexity

    run = generate_method(label, model, tokenizer, prompts, settings, steer, progress)
    summary = summarize(run, judge, threshold=judge_threshold, ppl_model=ppl_model, progress=progress)
    reference = None
    if reference_ids is not None:
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 512
        reference = text_perplexity(model, reference_ids, window=min(512, int(limit)))
    return TradeoffPoint(
        label=label,
        setting=setting,
        n=summary.n,
        toxic_rate=summary.toxic_rate,
        toxicity_mean=summary.toxicity_mean,
        reference_perplexity=reference,
        perplexity=summary.perplexity,
        extra={"interventions_per_token": summary.interventions_per_token},
        flags=[float(score > judge_threshold) for score in summary.scores],
        groups=list(run.prompt_ids),
    )

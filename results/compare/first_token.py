"""Norm of each position's layer-14 output on SmolLM2 for a few pair texts: position 0 vs the rest.

Run from the repository root after `vsteer extract` + `vsteer label --workdir runs/smollm2-rtp`:
    PYTHONPATH=. python results/compare/first_token.py > results/compare/first_token.json
"""

import json

import torch

from vsteer_hf.backbones import load_backbone
from vsteer_hf.profs import preference_pairs_from_cache

model, tok = load_backbone("smollm2-135m-instruct", progress=False)
pairs = preference_pairs_from_cache("runs/smollm2-rtp", max_pairs=20)
first, rest, top_dims = [], [], {}
with torch.no_grad():
    for _, good, _ in pairs:
        ids = tok(good, return_tensors="pt")["input_ids"]
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states[15][0]  # output of layer 14
        norms = hs.norm(dim=-1)
        first.append(float(norms[0]))
        rest.append(float(norms[1:].median()))
        for d in hs[0].abs().topk(3).indices.tolist():
            top_dims[d] = top_dims.get(d, 0) + 1
out = {
    "texts": len(first),
    "first_token_norm_median": float(torch.tensor(first).median()),
    "other_positions_norm_median": float(torch.tensor(rest).median()),
    "top3_dims_of_position0_counts": dict(sorted(top_dims.items(), key=lambda kv: -kv[1])[:6]),
}
print(json.dumps(out))

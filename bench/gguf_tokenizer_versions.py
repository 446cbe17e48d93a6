"""Gemma3's GGUF under the installed transformers: tokenizer probe, logits on fixed ids, dense perplexity,
for the tokenizer as loaded from the GGUF and as saved and reloaded (what layerprune's cached HF
directory holds).

Loads the GGUF with transformers itself (not through layerprune, whose tokenizer check would refuse a
broken conversion), so two versions can be compared side by side (BENCHMARKS.md, "Gemma3 tokenizer"):

    python bench/gguf_tokenizer_versions.py
    pip install --no-deps --target /tmp/tf517 transformers==5.17.0 'huggingface_hub>=1.5,<2'
    pip install --target /tmp/tf517 httpx
    PYTHONPATH=/tmp/tf517 python bench/gguf_tokenizer_versions.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layerprune.evaluation.perplexity import perplexity  # noqa: E402
from layerprune.models.loading import _PROBE  # noqa: E402

GGUF = Path("~/.cache/layerprune/gguf/gemma-3-270m-q4_k_m.gguf").expanduser()

if __name__ == "__main__":
    tok = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    model = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32).eval()
    ids = torch.tensor([[2, 651, 6037, 576, 6081, 603, 7127, 235265, 714, 6037]])  # the same ids for every version
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    out = {"transformers": transformers.__version__, "logits_sum_fixed_ids": float(logits.sum()),
           "logits_absmax_fixed_ids": float(logits.abs().max())}
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        for name, t in (("from_gguf", tok), ("saved_and_reloaded", AutoTokenizer.from_pretrained(d))):
            out[name] = {"probe_tokens": len(t(_PROBE, add_special_tokens=False)["input_ids"]), "probe_chars": len(_PROBE),
                         "first_ids": t("Senjō no Valkyria 3")["input_ids"][:6],
                         "wikitext2_ppl_512_2windows": perplexity(model, t, "wikitext2", seqlen=512, max_windows=2)["ppl"]}
    print(json.dumps(out))

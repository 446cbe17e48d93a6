"""Perplexity, zero-shot (lm-eval), sparsity audit and speed."""

from layerprune.evaluation.audit import sparsity_audit
from layerprune.evaluation.perplexity import perplexity, perplexity_many

__all__ = ["perplexity", "perplexity_many", "sparsity_audit"]

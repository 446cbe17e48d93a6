"""Perplexity, zero-shot (lm-eval), sparsity audit and speed."""

from layerprune.evaluation.audit import sparsity_audit
from layerprune.evaluation.perplexity import perplexity

__all__ = ["perplexity", "sparsity_audit"]

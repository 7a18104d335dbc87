"""opensci-patch: load open-sci-ref models with bit-identical logits on every released transformers."""

__version__ = "0.1.0"

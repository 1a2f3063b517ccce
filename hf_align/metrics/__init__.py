"""hf_align.metrics."""

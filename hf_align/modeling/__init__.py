"""hf_align.modeling."""

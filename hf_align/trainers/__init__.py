"""hf_align.trainers."""

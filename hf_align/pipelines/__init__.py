"""hf_align.pipelines."""

"""Images -> CLIP -> activation cache: image sources, CLIP loading and layer capture, the
extraction pipeline (Ray Data or in-process) and the content-addressed Parquet cache."""

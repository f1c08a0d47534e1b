"""Downstream evaluation of generated data: segmenters and detectors trained on it (``models``, ``train``), image
scores, the papers' protocols and tables (``protocols``, ``tables``) and the generation metrics (``generation_eval``).
See segmentation/README.md."""

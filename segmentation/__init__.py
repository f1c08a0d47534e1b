"""Downstream evaluation (in progress; see the tracker): models trained on generated data, image scores, protocols."""

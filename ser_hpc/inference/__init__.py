"""Labelling new recordings with an aggregated ensemble folder (jobs/predict.py)."""

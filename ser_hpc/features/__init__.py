"""Frozen-backbone features computed once and read back by every head (``train.features=cached``)."""

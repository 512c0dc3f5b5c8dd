"""Pipelines over compiled graphs, one file per diffusers pipeline."""

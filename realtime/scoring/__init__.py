"""Scoring: preprocessing, modality routing, inference workers, alert logic."""

"""Alert thresholds from normal video, and event-level evaluation."""

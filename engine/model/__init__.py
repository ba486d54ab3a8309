"""The model: frozen encoder, fusion teacher, student branches, anomaly maps."""

"""The simulator: synthetic endoscopy stills and examination videos (test and demo harness)."""

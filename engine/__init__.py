"""CEMD model: encoder, multimodal teacher, student branches, training and scoring.

`engine` never imports `realtime` or `calibration`.
"""

__version__ = "0.1.0"

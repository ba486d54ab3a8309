"""`python -m engine.synth [2.0]`: regenerate the documentation figure of the simulator."""

import sys
from pathlib import Path

from engine.synth.stills import GENERATOR_VERSION, render_example_grid

gen = sys.argv[1] if len(sys.argv) > 1 else GENERATOR_VERSION
name = "synth_examples.png" if gen == GENERATOR_VERSION else f"synth_examples_{gen}.png"
print(render_example_grid(Path(__file__).resolve().parents[2] / "docs" / "img" / name, seed=0, generator=gen))

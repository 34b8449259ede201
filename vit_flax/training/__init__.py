"""Training: the optimizer, the jitted steps, the host -> device feeds, the one epoch loop
(solo runs and groups of runs), its reporting, and `run` (what train.py does)."""

"""Pieces that sit between the frozen towers: the projection bridge and (later) LoRA."""

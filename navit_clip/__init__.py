"""navit-clip: CLIP-style pretraining whose image tower is NaViT (Patch n' Pack)."""

__version__ = "0.1.0"

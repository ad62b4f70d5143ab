"""Model side: NaViT image tower, text tower and the CLIP head. Sees PackedBatch tensors only."""

"""Data side: shards -> decoded samples -> sized, patchified images -> PackedBatch. No torch.nn here."""

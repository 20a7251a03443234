"""Process groups and the DeepSpeed engine."""

"""Adapter checkpoints: structural key mapping, atomic files, model cards."""

"""Committed, authored data of the learner (contrastive pairs)."""

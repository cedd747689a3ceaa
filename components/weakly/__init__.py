"""Weakly supervised semantic segmentation from image-level labels (AFA / TSCD style): CAMs,
refinement, pseudo labels, affinity from attention and self-correcting distillation."""

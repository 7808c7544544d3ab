"""Evaluation: prompt sources with fixed splits, and judges that score generations as P(undesirable)."""

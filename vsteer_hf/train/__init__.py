"""Training the value head: feature extraction, losses, trainer and threshold calibration."""

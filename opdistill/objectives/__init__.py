"""Pure tensor functions for the training objectives: no I/O, no models."""

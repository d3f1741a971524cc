"""Evaluation: metrics and the FD-digits judge, the digits teacher/student comparison, and text-to-image
generation for FID, CLIP and speed from exported folders."""

"""Calibration and evaluation data: text and audio sources turned into token sequences and clips."""

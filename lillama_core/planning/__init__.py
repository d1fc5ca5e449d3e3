"""Rank plans: parameter accounting, the allocation strategies, and the measurements some of them need
(whitened spectra, per-layer sensitivity)."""

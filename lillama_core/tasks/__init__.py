"""One adapter per modality (causal language models, speech-to-text): calibration, evaluation and the
wiring each needs."""

"""Quality, speed and size of a model: `evaluate` (the one path, through the model's task) gives an EvalRecord;
perplexity.py and speed.py hold the measurements, record.py the typed EvalRecord and a run's RunMetrics."""

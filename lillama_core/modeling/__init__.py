"""Network surgery: find a model's repeated blocks and linear layers, load teachers, and the file shipped
inside every export (`shipped.py`), which rebuilds low-rank and integer layers without lillama_core."""

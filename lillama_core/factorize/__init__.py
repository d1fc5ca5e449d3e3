"""Pure factorisation maths: W (out x in) ~ B (out x r) @ A (r x in), plain and activation-whitened SVD."""

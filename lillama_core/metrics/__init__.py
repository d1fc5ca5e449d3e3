"""Quality, speed and size of a model: perplexity, tokens/s, parameters and memory."""

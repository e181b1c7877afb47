"""Loading models: the embedded GGUF, any GGUF file, mlx-lm folders and hub ids, tiny models."""

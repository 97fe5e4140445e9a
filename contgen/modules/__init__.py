"""Lightning wiring: the modules that put tokenizer, backbone, head and sampler together."""

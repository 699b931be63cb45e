"""megatron-gad: Generative Adversarial Distillation on Megatron-Core."""

__version__ = "0.1.0"

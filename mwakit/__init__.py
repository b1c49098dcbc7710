"""mwakit: merge model checkpoints (PEFT/LoRA first) with Metrics-Weighted Averaging."""

__version__ = "0.1.0"

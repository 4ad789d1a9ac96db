"""Fine-tuning: data and batches, loss, setup (precision, seeds, LoRA), checkpoints, the run."""

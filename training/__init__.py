"""Training: data loading, projector alignment, LoRA instruction tuning and CLIP pretraining."""

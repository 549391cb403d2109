"""Training: SimCSE, supervised SimCSE and DiffCSE on the HF Trainer (`diffcse train`)."""

"""Training: the loop (single process and DDP), the streaming loader, checkpoints, the objective."""

"""Self-supervised pretraining of a cell encoder (DINO or SimCLR, through lightly) on the crops of a cell table."""

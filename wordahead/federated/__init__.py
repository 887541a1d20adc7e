"""Federated learning on Flower: the community LoRA adapter, trained where the text is."""

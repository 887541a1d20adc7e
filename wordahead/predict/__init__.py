"""predict: whole-word suggestions from the model, blended with the suggestion sources."""

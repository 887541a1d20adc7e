"""predict.sources: what besides the model decides a suggestion (the user's phrases, ...)."""

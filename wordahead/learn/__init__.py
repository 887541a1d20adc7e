"""learn: the nightly job: LoRA training on the typing log, adapter versions, phrases, schedule."""

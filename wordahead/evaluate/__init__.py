"""evaluate: typing simulations that measure what predictions save."""

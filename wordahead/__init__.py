"""keyboard: private, personalized next-word prediction that runs on your own machine."""

__version__ = "0.1.0"

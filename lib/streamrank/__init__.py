"""streamrank: the nightly batch ML pipeline behind live-stream commerce."""

__version__ = "0.1.0"

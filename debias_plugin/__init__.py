"""debias_plugin: measure and remove social bias in language models, inside the tools you already use."""

__version__ = "0.1.0"

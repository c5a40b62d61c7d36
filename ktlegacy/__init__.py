"""ktlegacy: make ktransformers build, run and ship on Volta (sm70) and Turing (sm75) GPUs."""

__version__ = "0.1.0"

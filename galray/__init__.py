"""galray: galaxy survey cutouts to embeddings, sparse features and image tokens, on Ray."""

__version__ = "0.1.0"

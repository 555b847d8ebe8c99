"""Nightingale: streaming neural text-to-speech (Chatterbox on MLX).

The code lives in the top-level folders models/, daemon/ and client/, which install
as nightingale.models, nightingale.daemon and nightingale.client.
"""

__version__ = "0.1.0"

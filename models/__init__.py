"""The Chatterbox pipeline on MLX."""

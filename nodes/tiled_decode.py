"""Tiled VAE decode node (see vae_tiling/)."""

NODES: list = []

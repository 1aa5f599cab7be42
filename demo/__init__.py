"""`headroom demo`: a self-made diffusion transformer, converted, loaded under a budget and sampled."""

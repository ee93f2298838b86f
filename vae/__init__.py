"""Categorical VAE with Gumbel-softmax latents (Jang, Gu & Poole 2017; Maddison et al. 2017)."""

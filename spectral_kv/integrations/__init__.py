"""Framework integrations: transformers (`SpectralCache`, attention/mask functions) and Unsloth."""

"""ALL-PET in JAX: data, masks, attention, models and training for projection-domain PET."""

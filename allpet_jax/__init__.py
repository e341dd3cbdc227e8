"""ALL-PET in JAX: data, masks, attention, models and training for projection-domain PET."""

from allpet_jax import xla_cpu as _xla_cpu

_xla_cpu.apply()  # before any computation: XLA reads XLA_FLAGS when it creates its CPU client

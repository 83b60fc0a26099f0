"""TLoRA core: transform + residual adapters, host-free."""

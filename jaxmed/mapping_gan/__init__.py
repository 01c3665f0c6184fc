"""The mapping-GAN system (SPEC.md S0): study loading, the fused training step, application."""

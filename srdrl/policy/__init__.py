"""The VLA policy: VLM, action expert, flow matching and the sampler."""
